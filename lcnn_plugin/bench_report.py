"""``lcnn bench-report``: a pytest-benchmark JSON file as a markdown report and a plot.

Benchmarks written by the pytest plugin's fixtures (``extra_info["lcnn"]``, see
:mod:`lcnn_plugin.pytest_plugin`) get their own tables — robust accuracy per attack and ε with
95% intervals, protocols and honesty checks; curvature statistics; throughput against a
twin — and the plot of robust accuracy against ε per model (one panel per norm). Every other
benchmark is listed with its mean time and its extra_info.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import plots
from .validate import InputError

__all__ = ["load", "markdown", "plot"]


def load(path: str | Path) -> dict[str, Any]:
    """The benchmark JSON at ``path`` (an error names the file and what is wrong)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from e
    except ValueError as e:
        raise InputError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise InputError(
            f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list; write one with "
            "pytest --benchmark-json=FILE)"
        )
    return data


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _ours(data: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [
        b["extra_info"]["lcnn"]
        for b in data["benchmarks"]
        if isinstance(b.get("extra_info", {}).get("lcnn"), dict)
        and b["extra_info"]["lcnn"].get("kind") == kind
    ]


def markdown(data: dict[str, Any], plot_name: str | None = None) -> str:
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    lines = [
        f"# Benchmarks ({data.get('datetime', '?')})",
        "",
        f"Machine: {m.get('cpu', {}).get('brand_raw', '?')}, {m.get('cpu', {}).get('count', '?')} CPUs, "
        f"Python {m.get('python_version', '?')}"
        + (f"; commit {c.get('id')}{' (dirty)' if c.get('dirty') else ''}" if c.get("id") else ""),
        "",
    ]
    rob = _ours(data, "robustness")
    if rob:
        lines += [
            "## Robust accuracy",
            "",
            "| model | data | n | attack | norm | ε | clean % | robust % (95% CI) | seconds |",
            "|---" * 9 + "|",
        ]
        for r in rob:
            for row in r["rows"]:
                lo, hi = row["robust_acc_ci95"]
                lines.append(
                    f"| {r['model']} | {r['dataset']} | {row['n_examples']} | {row['attack']} | "
                    f"{row['norm']} | {row['eps']:.4g} | {_pct(r['clean_acc'])} | {_pct(row['robust_acc'])} "
                    f"({_pct(lo)}–{_pct(hi)}) | {row.get('seconds', 0.0):.1f} |"
                )
        protocols = {
            row["attack"]: row.get("protocol", "")
            for r in rob
            for row in r["rows"]
            if row["attack"] != "worst-case"
        }
        lines += ["", "Protocols:", *[f"- {a}: {p}" for a, p in protocols.items()], "", "Honesty checks:"]
        for r in rob:
            failed = [ch for ch in r["checks"] if not ch["passed"]]
            verdict = (
                "not run"
                if not r["checks"]
                else "all passed"
                if not failed
                else "FLAGGED — " + "; ".join(f"{ch['name']}: {ch['detail']}" for ch in failed)
            )
            lines.append(f"- {r['model']} ({r['dataset']}): {verdict}")
        if plot_name:
            lines += ["", f"![robust accuracy against ε]({plot_name})"]
        lines.append("")
    curv = _ours(data, "curvature")
    if curv:
        lines += [
            "## Input curvature",
            "",
            "| model | data | n | E‖∇f‖ | E‖∇²f‖ | E C_f | method | converged |",
            "|---" * 8 + "|",
        ]
        for r in curv:
            cells = [f"{r['stats'][k]['mean']:.4g} ± {r['stats'][k]['std']:.2g}" for k in plots.GEOMETRY]
            lines.append(
                f"| {r['model']} | {r['data']} | {r['n']} | "
                + " | ".join(cells)
                + f" | {r['method']} | {_pct(r['converged_fraction'])}% |"
            )
        lines.append("")
    thr = _ours(data, "throughput")
    if thr:
        lines += [
            "## Throughput against a twin",
            "",
            "| what | model | twin | batch | model s | twin s | ratio |",
            "|---" * 7 + "|",
        ]
        for r in thr:
            s = r["seconds"]
            lines.append(
                f"| {r['what']} | {r['model']} | {r['twin']} | {r['batch']} | {s[r['model']]:.4g} | "
                f"{s[r['twin']]:.4g} | {r['ratio']:.3f} |"
            )
        lines.append("")
    others = [b for b in data["benchmarks"] if "lcnn" not in b.get("extra_info", {})]
    if others:
        lines += ["## Other benchmarks", "", "| benchmark | time (s) | figures |", "|---|---|---|"]
        for b in others:
            mean = (b.get("stats") or {}).get("mean")
            figures = "; ".join(f"{k}: {_fmt(v)}" for k, v in b.get("extra_info", {}).items())
            lines.append(f"| {b['name']} | {'' if mean is None else f'{mean:.4g}'} | {figures} |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: str | Path) -> bool:
    """Robust accuracy against ε per model and attack, one panel per norm; False when the file
    holds no robustness benchmark (nothing is written)."""
    panels: dict[str, dict[str, tuple]] = {}
    for r in _ours(data, "robustness"):
        by: dict[tuple[str, str], list[dict]] = {}
        for row in r["rows"]:
            by.setdefault((row["norm"], row["attack"]), []).append(row)
        for (norm, attack), rows in by.items():
            rows.sort(key=lambda row: row["eps"])
            eps = [0.0, *[row["eps"] for row in rows]]
            accs = [r["clean_acc"], *[row["robust_acc"] for row in rows]]
            ci = [tuple(r["clean_acc_ci95"]), *[tuple(row["robust_acc_ci95"]) for row in rows]]
            panels.setdefault(norm, {})[f"{r['model']} {attack}"] = (eps, accs, ci)
    if not panels:
        return False
    draw = [lambda ax, n=n, c=c: plots.accuracy_curves(ax, c, f"{n} ε") for n, c in panels.items()]
    plots.save(str(path), draw, (6 * len(draw), 4))
    return True
