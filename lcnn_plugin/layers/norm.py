"""γ-Lipschitz BatchNorm.

In eval, BatchNorm is the per-channel affine map y_c = w_c (x_c − μ_c)/σ_c + b_c with
σ_c = sqrt(running_var_c + eps); its Lipschitz constant is L_bn = max_c |w_c|/σ_c
(w ≡ 1 without affine). The γ-Lipschitz version scales the output by
min(1, γ / L_bn), so that its Lipschitz constant is min(γ, L_bn). For the paper's
affine-free BN this is the reference rule y = BN(x)·min(1, γ·min_c σ_c). The scale uses
the running statistics in training too (as the reference does); γ is learnable, stored as
``log_gamma`` (init log 10) and pulled toward 1 by the LCNN penalty λ_γ·Σ|log γ|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn

from .spectral import layer_name


def _check_bn_input(bn: nn.BatchNorm2d, x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != bn.num_features:
        raise ValueError(
            f"{layer_name(bn)}: expected input of shape (N, {bn.num_features}, H, W), got {tuple(x.shape)}"
        )


torch.fx.wrap("_check_bn_input")  # one opaque call under torch.fx: no control flow on traced shapes


class LipschitzBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose eval-mode Lipschitz constant is at most a learnable γ.

    Args:
        num_features: channels C.
        gamma: initial γ (> 0), default 10.
        affine: False for the paper's LCNN; True to keep the weight and bias of a
            converted pretrained BatchNorm.
        learnable_gamma: if False, γ is a fixed buffer.
        eps, momentum: as for ``nn.BatchNorm2d``. Running statistics are required.
    """

    def __init__(
        self,
        num_features: int,
        gamma: float = 10.0,
        affine: bool = False,
        learnable_gamma: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=True, device=device, dtype=dtype,
        )
        gamma = float(gamma)
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"LipschitzBatchNorm2d: gamma must be finite and > 0, got {gamma}")
        log_gamma = torch.tensor(math.log(gamma), device=device, dtype=dtype)
        if learnable_gamma:
            self.log_gamma = nn.Parameter(log_gamma)
        else:
            self.register_buffer("log_gamma", log_gamma)

    @property
    def gamma(self) -> torch.Tensor:
        return self.log_gamma.exp()

    def bn_lipschitz(self) -> torch.Tensor:
        """L_bn = max_c |w_c| / sqrt(running_var_c + eps) (a 0-d tensor, differentiable in w)."""
        inv_std = torch.rsqrt(self.running_var + self.eps)
        if self.affine:
            return (self.weight.abs() * inv_std).amax()
        return inv_std.amax()

    def lipschitz_scale(self) -> torch.Tensor:
        """min(1, γ / L_bn) = γ / max(L_bn, γ): the factor applied to the BatchNorm output
        (written so that L_bn = 0, e.g. a zero-initialised affine weight, gives 1, not 0·∞)."""
        gamma = self.gamma
        return gamma / torch.maximum(self.bn_lipschitz(), gamma)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        """Checked by :func:`_check_bn_input` instead (torch's check branches on a traced shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_bn_input(self, x)
        if self.training:
            return super().forward(x) * self.lipschitz_scale().to(x.dtype)
        # eval: the per-channel affine map as one addcmul. Not F.batch_norm: its CPU backward in
        # eval is wrong for a batch of one whose gradient has channels-last strides (torch 2.14:
        # a BatchNorm followed by flatten(2).transpose(1, 2), as in LeViT)
        scale = self.lipschitz_scale()
        w = torch.rsqrt(self.running_var + self.eps) * scale
        shift = -self.running_mean * w
        if self.affine:
            w = w * self.weight
            shift = shift * self.weight + self.bias * scale
        return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, w.to(x.dtype).view(1, -1, 1, 1))

    def lipschitz(self, input_shape: Sequence[int] | None = None) -> float:
        """Eval-mode Lipschitz constant min(γ, L_bn)."""
        with torch.no_grad():
            return float(torch.minimum(self.gamma, self.bn_lipschitz()))

    def curvature_bound(self, input_shape: Sequence[int] | None = None) -> float:
        return 0.0

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gamma={float(self.gamma.detach()):.4g}"


class LipschitzBatchNormAct2d(LipschitzBatchNorm2d):
    """γ-Lipschitz BatchNorm followed by ``drop`` and ``act`` (the layout of timm's
    BatchNormAct2d, same state_dict keys plus ``log_gamma``); what :func:`lcnn_plugin.convert`
    turns a BatchNormAct2d into. ``lipschitz()``/``curvature_bound()`` are the BatchNorm's;
    :func:`lcnn_plugin.model_bound` composes ``bound_chain()`` (BN, drop, act)."""

    def __init__(self, num_features: int, act: nn.Module | None = None, drop: nn.Module | None = None,
                 **kwargs) -> None:  # noqa: ANN003
        super().__init__(num_features, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))

    def bound_chain(self) -> list[tuple[str, nn.Module]]:
        """The parts in the order they are applied (the first is this BatchNorm itself)."""
        return [("", self), ("drop", self.drop), ("act", self.act)]
