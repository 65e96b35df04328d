"""Per-example largest-|λ| estimators over batched Hessian-vector products.

Each takes ``hvp``: (B, d) → (B, d), the per-example products Hᵢvᵢ, and returns
(|λ|, HVPs used per example, converged mask, error estimate) as tensors of shape (B,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)


def lanczos(
    hvp: Matvec, v0: torch.Tensor, tol: float = 1e-3, max_iter: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Lanczos with full re-orthogonalisation, stopping per example.

    Example i stops when the residual of its top Ritz pair, rᵢ = βⱼ|sⱼ|, is at most
    ``tol``·|θᵢ| (an eigenvalue of Hᵢ then lies within rᵢ of θᵢ), or when its Krylov space
    is exhausted (exact). The error estimate returned is rᵢ/|θᵢ|.
    """
    B, d = v0.shape
    max_iter = min(max_iter, d)
    q = _unit(v0)
    basis = [q]
    alphas, betas = [], []
    value = torch.zeros(B, dtype=v0.dtype, device=v0.device)
    error = torch.full_like(value, float("inf"))
    steps = torch.zeros(B, dtype=torch.long, device=v0.device)
    done = torch.zeros(B, dtype=torch.bool, device=v0.device)
    prev_beta = torch.zeros_like(value)
    for j in range(max_iter):
        w = hvp(basis[-1])
        a = (w * basis[-1]).sum(1)
        w = w - a[:, None] * basis[-1]
        if j:
            w = w - prev_beta[:, None] * basis[-2]
        Q = torch.stack(basis, 1)  # (B, j+1, d)
        for _ in range(2):
            w = w - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", Q, w), Q)
        beta = w.norm(dim=1)
        alphas.append(a)
        T = torch.diag_embed(torch.stack(alphas, 1))
        if betas:
            off = torch.stack(betas, 1)
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        k = evals.abs().argmax(1)
        theta = evals.gather(1, k[:, None]).squeeze(1)
        s_last = evecs[:, -1, :].gather(1, k[:, None]).squeeze(1)
        resid = (beta * s_last).abs()
        scale = theta.abs()
        exhausted = beta <= 1e-10 * scale.clamp_min(1e-30)
        now = ~done & ((resid <= tol * scale) | exhausted | (scale == 0))
        live = ~done
        value = torch.where(live, theta.abs(), value)
        error = torch.where(live, torch.where(scale > 0, resid / scale, torch.zeros_like(resid)), error)
        steps = steps + live.long()
        done = done | now
        if bool(done.all()) or j == max_iter - 1:
            break
        betas.append(beta)
        prev_beta = beta
        basis.append(torch.where(exhausted[:, None], torch.zeros_like(w), w / beta.clamp_min(1e-30)[:, None]))
    return value, steps, done, error


def power(
    hvp: Matvec, v0: torch.Tensor, tol: float = 1e-5, max_iter: int = 500
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power iteration reading |λ| from ‖Hv‖ (robust when λmax ≈ −λmin, unlike ⟨v,Hv⟩).

    Example i stops when ‖Hᵢvᵢ‖ changes by at most ``tol`` (relative) between steps; that
    relative change is the error estimate.
    """
    v = _unit(v0)
    B = v.shape[0]
    value = torch.zeros(B, dtype=v.dtype, device=v.device)
    error = torch.full_like(value, float("inf"))
    steps = torch.zeros(B, dtype=torch.long, device=v.device)
    done = torch.zeros(B, dtype=torch.bool, device=v.device)
    for _ in range(max_iter):
        hv = hvp(v)
        est = hv.norm(dim=1)
        change = (est - value).abs() / est.clamp_min(1e-30)
        live = ~done
        steps = steps + live.long()
        error = torch.where(live, torch.where(est > 0, change, torch.zeros_like(change)), error)
        value = torch.where(live, est, value)
        done = done | (live & ((change <= tol) | (est == 0)))
        if bool(done.all()):
            break
        v = torch.where(done[:, None], v, _unit(hv))
    return value, steps, done, error


def reference(
    hvp: Matvec, v0: torch.Tensor, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's estimator exactly: k steps of u ← Hu/(‖Hu‖ + 1e-6), then |⟨u, Hu⟩|.

    k + 1 HVPs. The error estimate is the relative residual ‖Hu − ⟨u,Hu⟩u‖/|⟨u,Hu⟩| of the
    final pair; ``converged`` is never claimed (the method has no stopping rule).
    """
    u = _unit(v0)
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
