"""The package's figures (matplotlib, written to files; used by ``lcnn quickstart`` and
``lcnn reproduce``). Each function draws from summary figures, not from models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

GEOMETRY = {"grad_norm": "E‖∇f‖", "hessian_norm": "E‖∇²f‖", "curvature": "E C_f"}


def geometry_bars(ax: Any, rows: Mapping[str, Mapping[str, float]]) -> None:
    """Bars of the mean gradient norm, Hessian norm and curvature per model (log scale);
    ``rows``: model → {grad_norm, hessian_norm, curvature} means."""
    names = list(rows)
    width = 0.8 / len(GEOMETRY)
    for i, (key, label) in enumerate(GEOMETRY.items()):
        ax.bar([j + width * i for j in range(len(names))], [rows[n][key] for n in names], width=width,
               label=label)
    ax.set_xticks([j + width for j in range(len(names))], names, rotation=30 if len(names) > 3 else 0,
                  ha="right" if len(names) > 3 else "center")
    ax.set_yscale("log")
    ax.set_title("input geometry (test images)")
    ax.legend()


def accuracy_curves(ax: Any, curves: Mapping[str, tuple[Sequence[float], Sequence[float],
                                                        Sequence[tuple[float, float]] | None]],
                    xlabel: str) -> None:
    """Accuracy (%) against ε per model; ``curves``: model → (ε values, accuracies in [0, 1],
    95% intervals or None)."""
    for name, (eps, accs, ci) in curves.items():
        y = [100 * a for a in accs]
        if ci is None:
            ax.plot(eps, y, "o-", label=name)
        else:
            err = [[100 * (a - lo) for a, (lo, _) in zip(accs, ci)],
                   [100 * (hi - a) for a, (_, hi) in zip(accs, ci)]]
            ax.errorbar(eps, y, yerr=err, fmt="o-", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("robust accuracy")
    ax.legend(fontsize="small")


def relative_gradient_robustness(ax: Any, curves: Mapping[str, Mapping[str, Sequence[float]]],
                                 radii: Sequence[float]) -> None:
    """Mean ± std of r(x, δ) (see :func:`lcnn_plugin.curvature.relative_gradient_robustness`)
    against ‖δ‖ per model; ``curves``: model → {"mean": [...], "std": [...]} over ``radii``."""
    for name, c in curves.items():
        ax.errorbar(list(radii), list(c["mean"]), yerr=list(c["std"]), label=name, capsize=3, fmt="o-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("‖δ‖₂ of the random perturbation (pixels in [0, 1])")
    ax.set_ylabel("‖∇f(x+δ) − ∇f(x)‖ / ‖∇f(x)‖")
    ax.set_title("relative gradient robustness (lower: smoother)")
    ax.legend(fontsize="small")


def save(path: str, draw: Sequence[Any], size: tuple[float, float]) -> None:
    """One row of panels, ``draw[i](ax)`` drawing panel i, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(draw), figsize=size, squeeze=False)
    for fn, ax in zip(draw, axes[0]):
        fn(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
