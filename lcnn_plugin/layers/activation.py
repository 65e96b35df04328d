"""Centered softplus with a learnable sharpness β.

    s0(x; β) = (softplus(βx) − log 2) / β,     β = exp(log_β) + β_floor

s0(0) = 0, s0' = sigmoid(βx) ∈ (0, 1) (1-Lipschitz), s0'' = β·σ(βx)(1 − σ(βx)) ≤ β/4,
|s0''| / |s0'| ≤ β, and s0(x) → x/2 as β → 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

_LOG2 = math.log(2.0)


# log((1 + e^z)/2) = z/2 + z²·Σₖ cₖ z^{2k}: Taylor coefficients (truncation < 1e-10 for |z| < 1/2)
_SERIES = (0.125, -5.2083333333333333e-03, 3.4722222222222222e-04, -2.6351686507936508e-05,
           2.1356922398589065e-06)


def _value_exact(z: torch.Tensor) -> torch.Tensor:
    """softplus(z) − log 2 as log1p(expm1(t)/2) (t = −|z|): last-bit accurate, float64."""
    t = -z.abs()
    g = torch.log1p(torch.expm1(t) * 0.5)
    return torch.where(z < 0, g, z + g)


def _value_fast(z: torch.Tensor) -> torch.Tensor:
    """softplus(z) − log 2 from vectorised ops only (exp, log, mul, add; in place on fresh
    temporaries: no autograd here): the Taylor series for |z| < 1/2 (no cancellation, relative
    error ~1e-7 down to the smallest z) and relu(z) + log(1 + e^{−|z|}) − log 2 beyond
    (|value| > 0.22: a few 1e-7 relative). expm1/log1p/softplus are not vectorised on many CPUs;
    this costs about what ``F.softplus`` does."""
    a = z.abs()
    big = z.clamp_min(0.0).add_(a.neg().exp_().add_(1.0).log_()).sub_(_LOG2)
    zc = z.clamp(-0.5, 0.5)
    w = zc * zc
    q = w * _SERIES[-1]
    q.add_(_SERIES[-2])
    for c in _SERIES[-3::-1]:
        q.mul_(w).add_(c)
    small = q.mul_(w).add_(zc, alpha=0.5)
    return torch.where(a < 0.5, small, big, out=big)


def shifted_softplus(z: torch.Tensor) -> torch.Tensor:
    """softplus(z) − log 2: accurate near 0 (no cancellation against log 2), finite for any
    finite z, with exact first and second derivatives.

    The value is computed without autograd (float64: log1p(expm1(−|z|)/2), last-bit accurate;
    other dtypes: float32 math from vectorised ops, see :func:`_value_fast`). Derivatives come
    from h = d·σ(z) + d²·σ(z)(1 − σ(z))/2 with d = z − z.detach(): h is exactly 0, its first
    derivative at the point is σ(z) and its second σ(z)(1 − σ(z)) (the exact softplus
    derivatives, z = 0 included), for backward, double backward and forward-mode AD alike.
    Under ``torch.no_grad`` (outside torch.func transforms) h is skipped.
    """
    zd = z.detach()
    value = _value_exact(zd) if z.dtype == torch.float64 else _value_fast(zd.float()).to(z.dtype)
    if not (torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._functorch.is_functorch_wrapped_tensor(z)):
        return value
    s = torch.sigmoid(zd)
    k = (1.0 - s).mul_(s).mul_(0.5)
    d = z - zd
    return torch.addcmul(value, d, torch.addcmul(s, d, k))


def centered_softplus(x: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Functional centered softplus s0(x; β) = (softplus(βx) − log 2)/β."""
    return shifted_softplus(x * beta) / beta


torch.fx.wrap("centered_softplus")  # one node under torch.fx (its body branches on dtype and grad mode)


class CenteredSoftplus(nn.Module):
    """Centered softplus s0(x; β) with one learnable β per module (stored as ``log_beta``).

    Args:
        beta: initial β (> 0). The paper initialises at 5.
        learnable: if False, β is a buffer (a fixed-β centered softplus).
        beta_floor: β = exp(log_β) + beta_floor keeps β away from 0.
        inplace: accepted so that ``act_layer(inplace=True)`` works as for timm's
            activations; the op is never applied in place (β needs x for its gradient).

    Eval-mode bounds (the layer protocol used by :mod:`lcnn_plugin.bound`):
    ``lipschitz() == 1``, ``curvature_bound() == β/4`` (max s0''),
    ``normalized_curvature_bound() == β`` (max |s0''|/|s0'|).
    """

    def __init__(
        self,
        beta: float = 5.0,
        learnable: bool = True,
        beta_floor: float = 1e-3,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        beta = float(beta)
        if not math.isfinite(beta) or not beta_floor >= 0 or beta <= beta_floor:
            raise ValueError(
                f"CenteredSoftplus: beta must be finite and > beta_floor={beta_floor}, got {beta}"
            )
        self.beta_floor = float(beta_floor)
        self.inplace = inplace  # kept for repr/compat only, see the docstring
        log_beta = torch.tensor(math.log(beta - self.beta_floor))
        if learnable:
            self.log_beta = nn.Parameter(log_beta)
        else:
            self.register_buffer("log_beta", log_beta)

    @property
    def beta(self) -> torch.Tensor:
        """The current β as a (differentiable) 0-d tensor."""
        return self.log_beta.exp() + self.beta_floor

    fused = False  # True: the Triton kernel (see lcnn_plugin.kernels.use_fused_softplus)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from ..kernels.softplus import fused_centered_softplus

            return fused_centered_softplus(x, self.beta)
        return centered_softplus(x, self.beta.to(x.dtype))

    def lipschitz(self, input_shape: Sequence[int] | None = None) -> float:
        return 1.0

    def curvature_bound(self, input_shape: Sequence[int] | None = None) -> float:
        return float(self.beta.detach()) / 4.0

    def normalized_curvature_bound(self) -> float:
        return float(self.beta.detach())

    def extra_repr(self) -> str:
        kind = "learnable" if isinstance(self.log_beta, nn.Parameter) else "fixed"
        return f"beta={float(self.beta.detach()):.4g} ({kind})"
