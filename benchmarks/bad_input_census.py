"""Census of the command line's bad-input matrix (tests/bad_input_cases.py) for whatever
lcnn_plugin is importable: each case is counted as

- clear: exit status 2, one line on stderr naming one of the case's options or argument values;
- unclear: a non-zero exit whose message is several lines or does not name it;
- silent: exit status 0 (numbers or files produced from bad input);
- crash: a Python traceback;

and, apart, how many changed, removed or added a file in the workspace.

    python benchmarks/bad_input_census.py            # this checkout
    /path/to/old/venv/bin/python benchmarks/bad_input_census.py   # another version
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bad_input_cases import CLI_CASES, build_workspace, snapshot  # noqa: E402


def _subjects(argv: list[str]) -> list[str]:
    """What the case may be about: its options (``eps_l2``, ``eps-l2``) and the names of its
    arguments (a model, a folder's or file's name)."""
    flags = [a.split("=")[0].lstrip("-") for a in argv[1:] if a.startswith("--")]
    values = [Path(a).name for a in argv[1:] if not a.startswith("--") and a]
    return [*flags, *(f.replace("-", "_") for f in flags), *values]


def main() -> None:
    from lcnn_plugin.cli import main as lcnn

    counts: Counter = Counter()
    touched = 0
    with tempfile.TemporaryDirectory() as tmp:
        ws = build_workspace(Path(tmp))
        for argv, _ in CLI_CASES:
            argv = [a.format(ws=ws) for a in argv]
            before = snapshot(ws)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    status = lcnn(argv)
                except SystemExit as e:
                    status = e.code if isinstance(e.code, int) else 1
                except BaseException:  # noqa: BLE001 - a crash is what is counted
                    traceback.print_exc()
                    status = 1
            text = err.getvalue()
            lines = [line for line in text.splitlines() if line.strip()]
            names = any(word in text for word in _subjects(argv))
            if "Traceback" in text:
                kind = "crash"
            elif status == 0:
                kind = "silent"
            elif len(lines) == 1 and names:
                kind = "clear"
            else:
                kind = "unclear"
            counts[kind] += 1
            changed = snapshot(ws) != before
            touched += changed
            mark = " files changed" if changed else ""
            print(f"{kind:8s}{mark}  lcnn {' '.join(argv)}", file=sys.__stdout__)
    total = sum(counts.values())
    kinds = ", ".join(f"{k} {counts[k]}" for k in ("clear", "unclear", "silent", "crash"))
    print(f"\n{total} cases: {kinds}; workspace changed by {touched}")


if __name__ == "__main__":
    main()
