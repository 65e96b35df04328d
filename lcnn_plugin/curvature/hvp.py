"""Hessian-vector products of per-example losses with respect to the input.

In eval mode examples are independent, so one HVP of Σᵢ fᵢ with a batch of vectors V gives
every per-example product Hᵢvᵢ at once (the sum trick). Two engines:

- ``autograd``: one forward and backward with ``create_graph=True``; every HVP is then one
  backward through the retained gradient graph (the graph is re-used across iterations).
- ``func``: forward-over-reverse with torch.func (``jvp`` of ``grad``); no graph is kept,
  each HVP recomputes the forward and backward with a tangent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("autograd", "func")


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example's label (log-softmax + NLL), shape (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


class HVP:
    """Input gradient g (B, ...) and ``apply(V)`` = per-example Hᵢ Vᵢ of the losses."""

    def __init__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, engine: str
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.engine = engine
        self.count = 0
        if engine == "autograd":
            self._x = x.detach().requires_grad_(True)
            losses = _losses(model, self._x, y, loss_fn)
            if not losses.requires_grad:
                raise ValueError("the loss has no differentiable path from the input x")
            (g,) = torch.autograd.grad(losses.sum(), self._x, create_graph=True, allow_unused=True)
            if g is None:
                raise ValueError("the loss has no differentiable path from the input x")
            self._g = g
            self.grad = g.detach()
            return
        params = {k: v.detach() for k, v in model.named_parameters()}
        params.update(dict(model.named_buffers()))

        def total(t: torch.Tensor) -> torch.Tensor:
            logits = torch.func.functional_call(model, params, (t,))
            return _checked_losses(logits, y, loss_fn, t.shape[0]).sum()

        self._grad_fn = torch.func.grad(total)
        self._x = x.detach()
        self.grad = self._grad_fn(self._x).detach()

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.engine == "autograd":
            if not self._g.requires_grad:  # the gradient does not depend on x: H = 0
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(self._g, self._x, grad_outputs=v, retain_graph=True,
                                        allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv
        return torch.func.jvp(self._grad_fn, (self._x,), (v,))[1]


def _checked_losses(logits: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, n: int) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"model must return logits of shape (B={n}, C), got {tuple(logits.shape)}")
    losses = loss_fn(logits, y)
    if losses.shape != (n,):
        raise ValueError(f"loss_fn must return one loss per example, shape ({n},), got {tuple(losses.shape)}")
    return losses


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    return _checked_losses(model(x), y, loss_fn, x.shape[0])
