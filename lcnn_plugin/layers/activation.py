"""Centered softplus with a learnable sharpness β.

    s0(x; β) = (softplus(βx) − log 2) / β,     β = exp(log_β) + β_floor

s0(0) = 0, s0' = sigmoid(βx) ∈ (0, 1) (1-Lipschitz), s0'' = β·σ(βx)(1 − σ(βx)) ≤ β/4,
|s0''| / |s0'| ≤ β, and s0(x) → x/2 as β → 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG2 = math.log(2.0)


def shifted_softplus(z: torch.Tensor) -> torch.Tensor:
    """softplus(z) − log 2, accurate to the last bit near 0 and finite for any finite z.

    With t = −|z| (built with ``where`` so that its derivative is ±1, never 0 at z = 0)
    and g(t) = log1p(expm1(t)/2) = log((1 + e^t)/2), softplus(z) − log 2 = g(t) for z < 0
    and z + g(t) for z ≥ 0. Neither branch overflows (t ≤ 0), there is no cancellation
    against log 2, and autograd's first and second derivatives are exactly σ(z) and
    σ(z)(1 − σ(z)) everywhere, z = 0 included.
    """
    neg = z < 0
    t = torch.where(neg, z, -z)
    g = torch.log1p(torch.expm1(t) * 0.5)
    return torch.where(neg, g, z + g)


def centered_softplus(x: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Functional centered softplus s0(x; β) = (softplus(βx) − log 2)/β."""
    return shifted_softplus(x * beta) / beta


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

    def lipschitz(self) -> float:
        return 1.0

    def curvature_bound(self) -> float:
        return float(self.beta.detach()) / 4.0

    def normalized_curvature_bound(self) -> float:
        return float(self.beta.detach())

    def extra_repr(self) -> str:
        kind = "learnable" if isinstance(self.log_beta, nn.Parameter) else "fixed"
        return f"beta={float(self.beta.detach()):.4g} ({kind})"
