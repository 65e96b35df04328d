"""``lcnn quickstart``: standard vs LCNN+GradReg on the embedded data, end to end, offline.

Trains a standard ResNet-10/w16 (near-ReLU softplus, cross-entropy) and an LCNN
ResNet-10/w16 with the LCNN+GradReg objective on the embedded synthetic set (see
:mod:`lcnn_plugin.data`), then measures both on held-out images: accuracy, E‖∇f‖, E‖∇²f‖
and E C_f (Lanczos, 200 images by default) and PGD-L2 robust accuracy at ε = 1, 2, 3 (500
images by default, with the honesty checks). Writes the two runs, ``results.json`` and ``quickstart.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from . import plots
from . import validate as check
from .curvature import report as curvature_report
from .data import load_dataset
from .robustness import evaluate
from .train import TrainConfig, train

MODELS = {
    "standard": ("lcnn_standard_resnet10_w16_cifar", "standard"),
    "LCNN+GradReg": ("lcnn_resnet10_w16_cifar", "lcnn+gradreg"),
}
EPS_L2 = (1.0, 2.0, 3.0)


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    eps = [0.0, *EPS_L2]
    curves = {n: (eps, [r["accuracy"], *[r["robust"][f"{e:g}"] for e in EPS_L2]], None)
              for n, r in rows.items()}
    plots.save(str(path), [lambda ax: plots.geometry_bars(ax, rows),
                           lambda ax: plots.accuracy_curves(ax, curves, "PGD-L2 ε")], (9, 3.5))


def run(out: str | Path = "lcnn-quickstart", *, epochs: int = 4, train_examples: int = 3200,
        curvature_examples: int = 200, robust_examples: int = 500, overwrite: bool = False,
        progress: bool = True) -> dict[str, Any]:
    """Run the quickstart into ``out``; returns the figures and the printed ``text``.

    ``out`` must be new, empty, or an earlier quickstart's (its marker): ``overwrite`` then
    replaces it. Every argument is checked before anything is written or removed."""
    check.integer("epochs", epochs)
    check.integer("train_examples", train_examples, 128)  # one batch of 128
    check.integer("curvature_examples", curvature_examples)
    check.integer("robust_examples", robust_examples)
    out = Path(out)
    if check.check_dir("out", out, "quickstart") and not overwrite:
        raise check.InputError(f"out: {out} holds an earlier quickstart; pass --overwrite or choose "
                               "another --out")
    check.claim_dir(out, "quickstart", clear=overwrite)
    t0 = time.perf_counter()
    test = load_dataset("synthetic", "test")
    rows: dict[str, dict[str, Any]] = {}
    for label, (model_name, objective) in MODELS.items():
        t = time.perf_counter()
        config = TrainConfig(model=model_name, objective=objective, epochs=epochs, batch_size=128,
                             max_train_examples=train_examples, eval_examples=None)
        result = train(config, out / label.lower().replace("+", "-"), progress=progress)
        train_s = time.perf_counter() - t
        model = result.model
        curv = curvature_report(model, test.sample(curvature_examples).batches(100), progress=False)
        rob = evaluate(model, test.sample(robust_examples).batches(250), ["pgdl2"], {"L2": list(EPS_L2)},
                       progress=False, model_name=label, dataset="synthetic-test", check_examples=128)
        rows[label] = dict(
            model=model_name, objective=objective, accuracy=result.history[-1]["test_acc"],
            grad_norm=curv.stats["grad_norm"]["mean"], hessian_norm=curv.stats["hessian_norm"]["mean"],
            curvature=curv.stats["curvature"]["mean"],
            robust={f"{e.eps:g}": e.robust_acc for e in rob.entries},
            checks_passed=not rob.flagged, train_seconds=train_s,
        )
    _plot(rows, out / "quickstart.png")
    head = ["model", "test acc", "E‖∇f‖", "E‖∇²f‖", "E C_f", *[f"PGD-L2 ε={e:g}" for e in EPS_L2], "checks"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        cells = [label, f"{100 * r['accuracy']:.1f}%", f"{r['grad_norm']:.3g}", f"{r['hessian_norm']:.3g}",
                 f"{r['curvature']:.3g}", *[f"{100 * r['robust'][f'{e:g}']:.1f}%" for e in EPS_L2],
                 "ok" if r["checks_passed"] else "FLAGGED"]
        lines.append("| " + " | ".join(cells) + " |")
    seconds = time.perf_counter() - t0
    lines += ["", f"held-out synthetic images: accuracy on {len(test)}, curvature on {curvature_examples} "
              f"(Lanczos), robustness on {robust_examples} (PGD-L2, 10 steps, α = 2.5ε/10)",
              f"plot: {out / 'quickstart.png'}   figures: {out / 'results.json'}   total {seconds:.0f} s"]
    report = dict(rows=rows, seconds=seconds, out=str(out), text="\n".join(lines))
    (out / "results.json").write_text(json.dumps(report, indent=1))
    return report
