"""Per-example input curvature: gradient norm, Hessian spectral norm, normalised curvature.

For f the per-example cross-entropy of the true label (or of the predicted label when no
label is given, or a per-example loss the caller passes), with the model in eval mode:

    grad_norm      ‖∇ₓf‖₂
    hessian_norm   ‖∇²ₓf‖₂ (largest |eigenvalue|; the input Hessian is indefinite)
    curvature      hessian_norm / (grad_norm + eps),  eps = 1e-6 as in the paper

Methods: ``lanczos`` (default; batched, full re-orthogonalisation, stops per example on a
residual bound), ``power`` (|λ| from ‖Hv‖), ``reference`` (the paper's estimator exactly,
for comparison), ``exact`` (dense Hessians, small inputs only) and ``piecewise_linear``
(exact Jᵀ A J for ReLU-type networks, C backward passes, no iteration).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import linalg, ops
from .. import validate as check
from ..fold import fold_batchnorm
from . import eigen
from .hvp import ENGINES, HVP, LossFn, per_example_cross_entropy, resolve_engine
from .piecewise import piecewise_linear_curvature, piecewise_linear_violations

METHODS = ("lanczos", "power", "reference", "exact", "piecewise_linear")

__all__ = [
    "CurvatureReport", "CurvatureResult", "ENGINES", "METHODS", "measure",
    "per_example_cross_entropy", "piecewise_linear_violations", "relative_gradient_robustness",
    "report",
]


@dataclass
class CurvatureResult:
    """Per-example quantities (shape (B,)) and how they were obtained."""

    grad_norm: torch.Tensor
    hessian_norm: torch.Tensor
    curvature: torch.Tensor
    method: str
    engine: str
    hvps: torch.Tensor  # Hessian-vector products spent on each example
    converged: torch.Tensor  # bool
    error: torch.Tensor  # relative error estimate of hessian_norm (see the method)
    eps: float = 1e-6
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.grad_norm.shape[0]


class _EvalNoParamGrad:
    """Eval mode and no parameter gradients; the caller's state is restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.training = self.model.training
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


def measure(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    method: str = "lanczos",
    engine: str = "auto",
    loss_fn: LossFn | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    k: int = 10,
    eps: float = 1e-6,
    max_batch: int | None = None,
    seed: int = 0,
    fold_bn: bool | None = None,
    _piecewise_checked: bool = False,
) -> CurvatureResult:
    """Per-example gradient norm, Hessian norm and normalised curvature of ``model`` at ``x``.

    Args:
        model: maps (B, ...) inputs to (B, C) logits; measured in eval mode, without
            parameter gradients (its mode and requires_grad flags are restored).
        x: inputs (B, ...), e.g. [0, 1] pixels. y: labels (B,), or None for the predicted ones.
        method: ``lanczos`` | ``power`` | ``reference`` | ``exact`` | ``piecewise_linear``
            (the model must be piecewise linear: checked, with an error naming the first
            operations that are not).
        engine: HVP engine, ``auto`` | ``autograd`` | ``func`` | ``compiled`` | ``triton``
            (see :mod:`lcnn_plugin.curvature.hvp`); ``auto`` is recorded as what it chose.
        loss_fn: per-example loss (logits, y) → (B,); default cross-entropy.
        tol, max_iter: stopping rule of ``lanczos`` (residual, default 1e-3, 64 steps) and
            ``power`` (relative change, default 1e-5, 500 steps). k: steps of ``reference``.
        eps: the ε of curvature = hessian_norm / (grad_norm + ε).
        max_batch: measure in chunks of at most this many examples (memory).
        seed: seeds the random start vectors (results are deterministic).
        fold_bn: measure a copy of the model with eval BatchNorm folded into the
            convolutions before it (fewer operations per HVP), used only when its logits on
            ``x`` equal the model's (within 1e-5 of their scale). None (default) folds when it
            can and says in ``options["fold_bn"]`` whether it did and in
            ``options["fold_bn_note"]`` why not; True raises when it cannot (untraceable, or a
            different function); False never folds.
        _piecewise_checked: internal (report() checks a model once, not every batch).
    """
    check.choice("method", method, METHODS)
    check.choice("engine", engine, ENGINES)
    check.integer("max_batch", max_batch, optional=True)
    check.integer("max_iter", max_iter, optional=True)
    check.integer("k", k)
    check.integer("seed", seed, 0)
    check.number("tol", tol, 0, above=True, optional=True)
    check.number("eps", eps, 0)
    check.module(model)
    check.check_inputs(x, y, "x", unit_box=False)
    loss_fn = loss_fn or per_example_cross_entropy
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chunks = range(0, x.shape[0], max_batch or x.shape[0])
    parts = []
    engine = resolve_engine(engine, model, x)
    with _EvalNoParamGrad(model):
        model, fold_bn, fold_note = _fold_choice(model, x, fold_bn)
        if method == "piecewise_linear" and not _piecewise_checked:
            _require_piecewise_linear(model, x)
        for start in chunks:
            stop = start + (max_batch or x.shape[0])
            yc = None if y is None else y[start:stop]
            chunk = functools.partial(_measure_chunk, model, x[start:stop], yc, method, engine, loss_fn, tol,
                                      max_iter, k, gen)
            # a model without a second derivative is measured again with equivalents (ops.twice)
            parts.append(ops.twice(chunk, "measure()", functools.partial(gen.set_state, gen.get_state())))
    cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
    grad_norm, hessian_norm, hvps, converged, error = cat
    options = dict(tol=tol, max_iter=max_iter, k=k, seed=seed, max_batch=max_batch, fold_bn=fold_bn,
                   fold_bn_note=fold_note)
    return CurvatureResult(
        grad_norm, hessian_norm, hessian_norm / (grad_norm + eps), method, engine,
        hvps, converged, error, eps, options,
    )


def _require_piecewise_linear(model: nn.Module, x: torch.Tensor) -> None:
    bad = piecewise_linear_violations(model, x[:1])
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ValueError("method='piecewise_linear' needs a piecewise-linear model; not: "
                         + "; ".join(bad[:3]) + more)


def _fold_choice(model: nn.Module, x: torch.Tensor, fold_bn: bool | None
                 ) -> tuple[nn.Module, bool, str | None]:
    """(the model to measure, whether it is the folded copy, why not) for measure()'s
    ``fold_bn`` (see there); the model in eval mode."""
    auto = fold_bn is None
    if auto:
        fold_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not fold_bn:
        return model, False, None
    try:
        folded, note = _folded_if_same(model, x)
    except ValueError as e:  # not traceable: measured as it is (recorded in options)
        if not auto:
            raise
        return model, False, str(e)
    if note is not None and not auto:
        raise ValueError(f"fold_bn=True: {note}")
    return folded, note is None, note


def _folded_if_same(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, str | None]:
    """(the BatchNorm-folded copy, None) when its logits on ``x`` equal the model's within 1e-5
    of their scale; otherwise (the model, why not)."""
    folded = fold_batchnorm(model, x[:1])
    with torch.no_grad():
        want, got = model(x), folded(x)
    scale = float(want.abs().max()) + 1e-30
    err = float((got - want).abs().max()) / scale
    if not err <= 1e-5:
        return model, (f"the folded copy's logits differ from the model's by {err:.2g} of their scale "
                       "(a layer the folding does not know); measured unfolded")
    return folded, None


def _measure_chunk(model, x, y, method, engine, loss_fn, tol, max_iter, k, gen):  # noqa: ANN001,ANN202
    B, d = x.shape[0], x[0].numel()
    if method == "piecewise_linear":
        grad_norm, value, C = piecewise_linear_curvature(model, x, y, loss_fn)
        full = torch.full((B,), C, dtype=torch.long, device=x.device)
        return grad_norm, value, full, torch.ones_like(full, dtype=torch.bool), torch.zeros_like(value)
    op = HVP(model, x, y, loss_fn, engine)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return op.apply(v.view_as(x)).reshape(B, d)

    v0 = torch.randn(B, d, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
    if method in ("lanczos", "power"):
        solve = linalg.lanczos if method == "lanczos" else linalg.power
        default_tol, default_iter = (1e-3, 64) if method == "lanczos" else (1e-5, 500)
        r = solve(hvp, v0, tol=default_tol if tol is None else tol, max_iter=max_iter or default_iter)
        res = r.value, r.steps, r.converged, r.error
    elif method == "reference":
        res = eigen.reference(hvp, v0, k=k)
    else:
        res = eigen.exact(hvp, d, v0)
    value, steps, done, error = res
    return op.grad.reshape(B, d).norm(dim=1), value.detach(), steps, done, error.detach()


@dataclass
class CurvatureReport:
    """Dataset-level statistics over exactly the examples seen."""

    n: int
    stats: dict[str, dict[str, float]]
    values: dict[str, torch.Tensor]
    method: str
    hvps_mean: float
    converged_fraction: float
    options: dict[str, Any] = field(default_factory=dict)  # fold_bn: whether the folded copy was measured

    def __str__(self) -> str:
        lines = [f"curvature over {self.n} examples ({self.method}; mean HVPs "
                 f"{self.hvps_mean:.1f}; converged {100 * self.converged_fraction:.1f}%)"]
        for name, s in self.stats.items():
            lines.append(f"  {name:13s} mean {s['mean']:.5g}  std {s['std']:.5g}  "
                         f"median {s['q50']:.5g}  [q05 {s['q05']:.5g}, q95 {s['q95']:.5g}]")
        return "\n".join(lines)


_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def report(
    model: nn.Module,
    loader: Iterable,
    *,
    max_examples: int | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    **measure_kwargs: Any,
) -> CurvatureReport:
    """Measure every example of ``loader`` (batches (x, y) or x) and summarise.

    Statistics are over exactly the examples measured (at most ``max_examples``); nothing is
    zero-filled. ``measure_kwargs`` go to :func:`measure`; ``fold_bn`` is decided (and the model
    folded and checked) once, on the first batch, and recorded in ``options``; so is the
    piecewise-linear check of ``method="piecewise_linear"`` (one trace, not one per batch).
    """
    from tqdm.auto import tqdm

    check.integer("max_examples", max_examples, optional=True)
    results: list[CurvatureResult] = []
    seen = 0
    fold_bn = measure_kwargs.pop("fold_bn", None)
    target = fold_note = None
    bar = tqdm(total=max_examples, disable=not progress, desc="curvature", unit="ex")
    for batch in loader:
        x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if max_examples is not None:
            x = x[: max_examples - seen]
            y = None if y is None else y[: max_examples - seen]
        if device is not None:
            x = x.to(device)
            y = None if y is None else y.to(device)
        if target is None:  # fold (and check the folded copy) and trace once, on the first batch
            check.module(model)
            check.check_inputs(x, y, "x", unit_box=False)
            with _EvalNoParamGrad(model):
                target, fold_bn, fold_note = _fold_choice(model, x, fold_bn)
                if measure_kwargs.get("method") == "piecewise_linear":
                    _require_piecewise_linear(target, x)
        r = measure(target, x, y, seed=seen, fold_bn=False, _piecewise_checked=True, **measure_kwargs)
        results.append(r)
        seen += len(r)
        bar.update(len(r))
        if max_examples is not None and seen >= max_examples:
            break
    bar.close()
    if not results:
        raise check.InputError("loader: yielded no examples")
    values = {name: torch.cat([getattr(r, name) for r in results]).double().cpu()
              for name in ("grad_norm", "hessian_norm", "curvature")}
    stats = {}
    for name, v in values.items():
        q = torch.quantile(v, torch.tensor(_QUANTILES, dtype=v.dtype))
        stats[name] = dict(mean=float(v.mean()), std=float(v.std()) if len(v) > 1 else 0.0,
                           **{f"q{int(round(p * 100)):02d}": float(t) for p, t in zip(_QUANTILES, q)})
    hvps = torch.cat([r.hvps for r in results]).double()
    conv = torch.cat([r.converged for r in results]).double()
    return CurvatureReport(seen, stats, values, results[0].method, float(hvps.mean()), float(conv.mean()),
                           dict(fold_bn=fold_bn, fold_bn_note=fold_note))


def relative_gradient_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    radii: Sequence[float] = (0.01, 0.05, 0.1, 0.5, 1.0),
    n_samples: int = 4,
    seed: int = 0,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """r(x, δ) = ‖∇f(x+δ) − ∇f(x)‖ / ‖∇f(x)‖ for random δ of each norm in ``radii``.

    Returns a tensor (len(radii), n_samples, B). Labels default to the prediction at x and
    stay fixed under the perturbation.
    """
    check.module(model)
    check.check_inputs(x, y, "x", unit_box=False)
    for r in check.distinct("radii", radii):
        check.number("radii", r, 0)
    loss_fn = loss_fn or per_example_cross_entropy
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with _EvalNoParamGrad(model):
        if y is None:
            with torch.no_grad():
                y = model(x).argmax(1)

        def grad_at(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(model(t), y).sum(), t)
            return g.flatten(1)

        g0 = grad_at(x)
        out = torch.empty(len(radii), n_samples, x.shape[0], dtype=torch.float64)
        for i, r in enumerate(radii):
            for s in range(n_samples):
                d = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x)
                d = d / d.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
                g = grad_at(x + r * d)
                out[i, s] = ((g - g0).norm(dim=1) / g0.norm(dim=1).clamp_min(1e-30)).double().cpu()
    return out

