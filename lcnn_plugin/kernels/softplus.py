"""Centered softplus as one Triton kernel: value, first and second derivative in one pass.

For z = βx and t = −|z| (so e = exp(t) ∈ (0, 1] never overflows):

    s0(x)   = (max(z, 0) + log((1 + e)/2)) / β
    s0'(x)  = σ(z)                 = 1/(1 + e) for z ≥ 0, e/(1 + e) otherwise
    s0''(x) = β σ(z)(1 − σ(z))     = β e/(1 + e)²

log((1 + e)/2) is taken from its Taylor series t/2 + t²/8 − t⁴/192 + t⁶/2880 for |t| < 0.01
(no cancellation next to 0) and from the logarithm elsewhere. The kernel computes in
float32 (float64 for float64 inputs) and stores in the input's dtype.

Autograd: the forward saves σ and βσ(1 − σ); the backward is g·σ(z) computed by a second
autograd function whose own backward is g·βσ(1 − σ), so the double backward that a
Hessian-vector product needs is exact and costs no extra kernel. β is a constant here (the
curvature estimate freezes parameters); training with a learnable β uses the torch path.
Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for tests).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

try:  # Triton is optional: CUDA wheels of torch ship it, CPU-only installs may not.
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - depends on the environment
    triton = tl = None
    _IMPORT_ERROR = e


def triton_available(device: torch.device | str = "cuda") -> bool:
    """True when the kernel can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_BLOCK = 1024

if triton is not None:

    @triton.jit
    def _csp_kernel(x_ptr, y_ptr, s_ptr, ds_ptr, n, beta,
                    DERIVS: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        x = x.to(tl.float64) if F64 else x.to(tl.float32)
        z = x * beta
        t = -tl.abs(z)
        e = tl.exp(t)
        one_e = 1.0 + e
        t2 = t * t
        series = t * 0.5 + t2 * (0.125 + t2 * (-1.0 / 192.0 + t2 * (1.0 / 2880.0)))
        g = tl.where(t > -0.01, series, tl.log(one_e * 0.5))
        y = (tl.maximum(z, 0.0) + g) / beta
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if DERIVS:
            s = tl.where(z >= 0, 1.0 / one_e, e / one_e)
            ds = beta * e / (one_e * one_e)
            tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
            tl.store(ds_ptr + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, beta: float, derivs: bool) -> tuple[torch.Tensor, ...]:
    if triton is None:
        raise RuntimeError(f"the fused centered softplus needs Triton ({_IMPORT_ERROR})")
    if not triton_available(x.device):
        raise RuntimeError(
            f"the fused centered softplus runs on CUDA tensors (or CPU tensors under "
            f"TRITON_INTERPRET=1); got a tensor on {x.device}"
        )
    x = x.contiguous()
    y = torch.empty_like(x)
    s = torch.empty_like(x) if derivs else y
    ds = torch.empty_like(x) if derivs else y
    n = x.numel()
    if n:
        _csp_kernel[(triton.cdiv(n, _BLOCK),)](
            x, y, s, ds, n, beta, DERIVS=derivs, F64=x.dtype == torch.float64, BLOCK=_BLOCK
        )
    return (y, s, ds) if derivs else (y,)


class _Slope(torch.autograd.Function):
    """Returns the saved σ(βx); its gradient in x is the saved βσ(1 − σ)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, s: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(ds)
        return s.view_as(s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (ds,) = ctx.saved_tensors
        return grad * ds, None, None


class _CenteredSoftplus(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:  # noqa: ANN001
        derivs = ctx.needs_input_grad[0]
        out = _launch(x, beta, derivs)
        if derivs:
            ctx.save_for_backward(x, out[1], out[2])
        return out[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        x, s, ds = ctx.saved_tensors
        return grad * _Slope.apply(x, s, ds), None


def fused_centered_softplus(x: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """s0(x; β) by the Triton kernel; differentiable twice in x, β treated as a constant."""
    if isinstance(beta, torch.Tensor):
        if beta.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "fused_centered_softplus: β requires grad, but the fused kernel treats β as a "
                "constant; use the torch implementation (the default) to train β"
            )
        beta = float(beta)
    if not beta > 0:
        raise ValueError(f"fused_centered_softplus: beta must be > 0, got {beta}")
    return _CenteredSoftplus.apply(x, beta)


@contextlib.contextmanager
def use_fused_softplus(model: nn.Module) -> Iterator[int]:
    """Within the block, every CenteredSoftplus of ``model`` runs the Triton kernel.

    Yields the number of modules switched; their previous setting is restored on exit.
    """
    from ..layers.activation import CenteredSoftplus

    mods = [m for m in model.modules() if isinstance(m, CenteredSoftplus)]
    previous = [m.fused for m in mods]
    for m in mods:
        m.fused = True
    try:
        yield len(mods)
    finally:
        for m, p in zip(mods, previous):
            m.fused = p
