"""Lanczos with full re-orthogonalisation for the extreme eigenvalues of a symmetric operator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LanczosResult:
    eigenvalue: float  # the Ritz value of largest magnitude (signed)
    steps: int  # operator applications
    converged: bool
    residual: float  # ‖A q − θ q‖ of the Ritz pair: an eigenvalue lies within it of θ
    vector: torch.Tensor  # the Ritz vector, unit norm


def lanczos_extreme(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    max_steps: int = 300,
    tol: float = 1e-10,
) -> LanczosResult:
    """Largest-|λ| eigenpair of the symmetric operator ``matvec`` (Krylov space from ``v0``).

    Stops when the Ritz value changes by at most ``tol`` (relative) between steps, when the
    Krylov space is exhausted (exact), or after ``max_steps`` applications.
    """
    q = v0 / v0.norm()
    basis: list[torch.Tensor] = [q.flatten()]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    theta_prev = None
    converged = False
    steps = 0
    while steps < max_steps:
        w = matvec(basis[-1].view_as(v0)).flatten()
        steps += 1
        alphas.append(torch.dot(w, basis[-1]))
        Q = torch.stack(basis, 1)
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - Q @ (Q.t() @ w)
        beta = w.norm()
        T = torch.diag(torch.stack(alphas))
        if betas:
            off = torch.stack(betas)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        k = int(evals.abs().argmax())
        theta = float(evals[k])
        exhausted = float(beta) <= 1e-12 * max(abs(theta), 1e-30)
        if exhausted or (
            theta_prev is not None and abs(theta - theta_prev) <= tol * abs(theta)
        ):
            converged = True
            break
        theta_prev = theta
        betas.append(beta)
        basis.append(w / beta)
    s = evecs[:, k]
    Q = torch.stack(basis[: len(alphas)], 1)
    vec = (Q @ s.to(Q.dtype)).view_as(v0)
    residual = float(beta * s[-1].abs())
    return LanczosResult(theta, steps, converged, residual, vec / vec.norm())
