"""The curvature-only largest-|λ| estimators over batched Hessian-vector products: the
paper's reference estimator and dense Hessians. (Lanczos and power iteration are
:mod:`lcnn_plugin.linalg`'s, shared with the spectral norms and the bounds.)

Each takes ``hvp``: (B, d) → (B, d), the per-example products Hᵢvᵢ, and returns
(|λ|, HVPs used per example, converged mask, error estimate) as tensors of shape (B,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..linalg import unit

Matvec = Callable[[torch.Tensor], torch.Tensor]


def reference(
    hvp: Matvec, v0: torch.Tensor, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's estimator exactly: k steps of u ← Hu/(‖Hu‖ + 1e-6), then |⟨u, Hu⟩|.

    k + 1 HVPs. The error estimate is the relative residual ‖Hu − ⟨u,Hu⟩u‖/|⟨u,Hu⟩| of the
    final pair; ``converged`` is never claimed (the method has no stopping rule).
    """
    u = unit(v0)
    for _ in range(k):
        hu = hvp(u)
        u = hu / (hu.norm(dim=1, keepdim=True) + 1e-6)
    hu = hvp(u)
    rq = (u * hu).sum(1)
    resid = (hu - rq[:, None] * u).norm(dim=1) / rq.abs().clamp_min(1e-30)
    B = u.shape[0]
    steps = torch.full((B,), k + 1, dtype=torch.long, device=u.device)
    return rq.abs(), steps, torch.zeros(B, dtype=torch.bool, device=u.device), resid


def exact(
    hvp: Matvec, d: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense per-example Hessians from d HVPs with the unit vectors, then eigvalsh."""
    B = like.shape[0]
    cols = []
    for i in range(d):
        e = torch.zeros(B, d, dtype=like.dtype, device=like.device)
        e[:, i] = 1.0
        cols.append(hvp(e))
    H = torch.stack(cols, 2)
    H = 0.5 * (H + H.transpose(1, 2))
    value = torch.linalg.eigvalsh(H).abs().amax(1)
    steps = torch.full((B,), d, dtype=torch.long, device=like.device)
    ones = torch.ones(B, dtype=torch.bool, device=like.device)
    return value, steps, ones, torch.zeros(B, dtype=like.dtype, device=like.device)
