"""Hessian-vector products of per-example losses with respect to the input.

In eval mode examples are independent, so one HVP of Σᵢ fᵢ with a batch of vectors V gives
every per-example product Hᵢvᵢ at once (the sum trick). Engines:

- ``autograd``: one forward and backward with ``create_graph=True``; every HVP is then one
  backward through the retained gradient graph (the graph is re-used across iterations).
- ``func``: forward-over-reverse with torch.func (``jvp`` of ``grad``); no graph is kept,
  each HVP recomputes the forward and backward with a tangent.
- ``compiled``: the ``func`` HVP compiled with torch.compile (on CUDA with
  ``mode="reduce-overhead"``: the fixed-shape iteration is replayed as a CUDA graph). One
  compilation per model, input shape and loss; the first call pays it.
- ``triton``: ``autograd`` with every CenteredSoftplus computed by the fused Triton kernel
  (value, σ and σ' in one pass; see :mod:`lcnn_plugin.kernels.softplus`). CUDA, or CPU
  under ``TRITON_INTERPRET=1``.
- ``auto``: ``triton`` for CUDA inputs when Triton is available and the model has a
  CenteredSoftplus, ``autograd`` otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import check_logits

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("auto", "autograd", "func", "compiled", "triton")


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example's label (log-softmax + NLL), shape (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def resolve_engine(engine: str, model: nn.Module, x: torch.Tensor) -> str:
    """The engine ``auto`` stands for on this model and input (others are returned as given)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    from ..kernels.softplus import triton_available
    from ..layers.activation import CenteredSoftplus

    has_csp = any(isinstance(m, CenteredSoftplus) for m in model.modules())
    return "triton" if x.is_cuda and has_csp and triton_available(x.device) else "autograd"


def _checked_labels(logits: torch.Tensor, y: torch.Tensor | None, n: int, loss_fn: LossFn) -> torch.Tensor:
    """The labels (``y``, or the predicted ones), after :func:`~lcnn_plugin.validate.check_logits`
    (probabilities and single outputs are refused only for the default cross-entropy)."""
    check_logits(logits.detach(), y, n, "y", logits=loss_fn is per_example_cross_entropy)
    if y is None:
        return logits.detach().argmax(1)
    return y.to(device=logits.device, dtype=torch.long)


def _checked_losses(logits: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    n = logits.shape[0]
    losses = loss_fn(logits, y)
    if losses.shape != (n,):
        raise ValueError(f"loss_fn must return one loss per example, shape ({n},), got {tuple(losses.shape)}")
    return losses


def _func_hvp(model: nn.Module, params: dict, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
    def total(t: torch.Tensor) -> torch.Tensor:
        return _checked_losses(torch.func.functional_call(model, params, (t,)), y, loss_fn).sum()

    return torch.func.jvp(torch.func.grad(total), (x,), (v,))[1]


_COMPILED: dict[str, Callable] = {}


def _compiled_hvp(device: torch.device) -> Callable:
    mode = "reduce-overhead" if device.type == "cuda" else None
    key = mode or "default"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_func_hvp, mode=mode, dynamic=False)
    return _COMPILED[key]


class HVP:
    """Input gradient ``grad`` (B, ...), labels ``y`` and ``apply(V)`` = per-example Hᵢ Vᵢ.

    ``y`` None: the predicted labels (from the same forward that gives the gradient).
    """

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, loss_fn: LossFn, engine: str
    ) -> None:
        self.engine = resolve_engine(engine, model, x)
        self.count = 0
        n = x.shape[0]
        if self.engine in ("autograd", "triton"):
            from ..kernels.softplus import use_fused_softplus

            ctx = use_fused_softplus(model) if self.engine == "triton" else contextlib.nullcontext()
            self._x = x.detach().requires_grad_(True)
            with ctx, torch.enable_grad():
                logits = model(self._x)
                self.y = _checked_labels(logits, y, n, loss_fn)
                losses = _checked_losses(logits, self.y, loss_fn)
                if not losses.requires_grad:
                    raise ValueError("the loss has no differentiable path from the input x")
                (g,) = torch.autograd.grad(losses.sum(), self._x, create_graph=True, allow_unused=True)
            if g is None:
                raise ValueError("the loss has no differentiable path from the input x")
            self._g = g
            self.grad = g.detach()
            return
        self._params = {k: v.detach() for k, v in model.named_parameters()}
        self._params.update(dict(model.named_buffers()))
        self._model, self._loss_fn = model, loss_fn
        self._x = x.detach()
        with torch.no_grad():
            self.y = _checked_labels(model(self._x), y, n, loss_fn)

        def total(t: torch.Tensor) -> torch.Tensor:
            logits = torch.func.functional_call(model, self._params, (t,))
            return _checked_losses(logits, self.y, loss_fn).sum()

        self.grad = torch.func.grad(total)(self._x).detach()
        self._hvp = _compiled_hvp(x.device) if self.engine == "compiled" else _func_hvp

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.engine in ("autograd", "triton"):
            if not self._g.requires_grad:  # the gradient does not depend on x: H = 0
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(self._g, self._x, grad_outputs=v, retain_graph=True,
                                        allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv
        return self._hvp(self._model, self._params, self._loss_fn, self._x, self.y, v.contiguous())
