"""Markdown summary of a pytest-benchmark JSON file: ``python benchmarks/summarize.py FILE.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def summarize(path: str) -> str:
    try:
        data = json.loads(Path(path).read_text())
        benches = data["benchmarks"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"summarize: {path} is not a pytest-benchmark JSON file ({e})") from e
    m = data.get("machine_info", {})
    lines = [f"# Benchmarks ({data.get('datetime', '?')})", "",
             f"Machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} CPUs, "
             f"Python {m.get('python_version', '?')}", "",
             "| benchmark | time (s) | figures |", "|---|---|---|"]
    for b in benches:
        stats = b.get("stats") or {}
        mean = stats.get("mean")
        figures = "; ".join(f"{k}: {_fmt(v)}" for k, v in b.get("extra_info", {}).items())
        lines.append(f"| {b['name']} | {'' if mean is None else f'{mean:.4g}'} | {figures} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/summarize.py FILE.json")
    sys.stdout.write(summarize(sys.argv[1]))
