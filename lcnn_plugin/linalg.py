"""The project's eigen-solvers: batched Lanczos and power iteration on symmetric operators.

One implementation serves the spectral norms of the layers (B = 1, the Gram operator AᵀA),
the data-free bounds (float64, tight tolerance) and the curvature estimates (B examples,
their input Hessians). Vectors are batched: shape (B, ...), one independent problem per
row; ``matvec`` maps such a batch to a batch of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

_TINY = 1e-30


def unit(v: torch.Tensor) -> torch.Tensor:
    """Each row of ``v`` (shape (B, ...)) scaled to unit 2-norm (a zero row stays zero)."""
    norms = v.flatten(1).norm(dim=1).clamp_min(_TINY)
    return v / norms.view(-1, *([1] * (v.dim() - 1)))


@dataclass
class EigResult:
    """Per-row results, each of shape (B,) (``vector``: (B, ...)).

    value: the largest |eigenvalue| estimate (a Ritz value's magnitude);
    steps: operator applications spent on the row; converged: the stopping rule held;
    error: relative error estimate of ``value`` (see the method); vector: the Ritz vector.
    """

    value: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor
    error: torch.Tensor
    vector: torch.Tensor


def lanczos(matvec: Matvec, v0: torch.Tensor, tol: float = 1e-3, max_iter: int = 64) -> EigResult:
    """Largest-|λ| eigenpairs of B symmetric operators by Lanczos with full re-orthogonalisation.

    Row i stops when the residual of its top Ritz pair, rᵢ = βⱼ|sⱼ| = ‖Hqᵢ − θᵢqᵢ‖, is at
    most ``tol``·|θᵢ| (an eigenvalue then lies within rᵢ of θᵢ), when its Krylov space is
    exhausted (exact), or after ``max_iter`` steps. Rows that stopped are no longer updated
    (the operator is still applied to the whole batch). error = rᵢ/|θᵢ|.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    shape = v0.shape
    B, d = shape[0], v0[0].numel()
    max_iter = min(max_iter, d)
    Q = v0.new_zeros(B, max_iter, d)  # the orthonormal Krylov basis, preallocated
    Q[:, 0] = unit(v0.reshape(B, d))
    T = v0.new_zeros(B, max_iter, max_iter)  # the tridiagonal projection
    value = torch.zeros(B, dtype=v0.dtype, device=v0.device)
    error = torch.full_like(value, float("inf"))
    steps = torch.zeros(B, dtype=torch.long, device=v0.device)
    done = torch.zeros(B, dtype=torch.bool, device=v0.device)
    coeffs = v0.new_zeros(B, max_iter)  # each row's Ritz vector in the basis
    for j in range(max_iter):
        q = Q[:, j]
        w = matvec(q.view(shape)).reshape(B, d)
        a = (w * q).sum(1)
        basis = Q[:, : j + 1]
        for _ in range(2):  # full re-orthogonalisation, twice is enough
            w = w - torch.einsum("bk,bkd->bd", torch.einsum("bkd,bd->bk", basis, w), basis)
        beta = w.norm(dim=1)
        T[:, j, j] = a
        evals, evecs = torch.linalg.eigh(T[:, : j + 1, : j + 1])
        k = evals.abs().argmax(1)
        theta = evals.gather(1, k[:, None]).squeeze(1)
        s = evecs.gather(2, k[:, None, None].expand(B, j + 1, 1)).squeeze(2)  # (B, j+1)
        resid = (beta * s[:, -1]).abs()
        scale = theta.abs()
        exhausted = beta <= 1e-10 * scale.clamp_min(_TINY)
        now = ~done & ((resid <= tol * scale) | exhausted | (scale == 0))
        live = ~done
        value = torch.where(live, scale, value)
        error = torch.where(live, torch.where(scale > 0, resid / scale.clamp_min(_TINY), 0.0), error)
        coeffs[:, : j + 1] = torch.where(live[:, None], s, coeffs[:, : j + 1])
        steps = steps + live.long()
        done = done | now
        if j == max_iter - 1 or bool(done.all()):
            break
        T[:, j, j + 1] = T[:, j + 1, j] = beta
        Q[:, j + 1] = torch.where(exhausted[:, None], 0.0, w / beta.clamp_min(_TINY)[:, None])
    vector = unit(torch.einsum("bk,bkd->bd", coeffs, Q)).view(shape)
    return EigResult(value, steps, done, error, vector)


def power(matvec: Matvec, v0: torch.Tensor, tol: float = 1e-5, max_iter: int = 500) -> EigResult:
    """Power iteration reading |λ| from ‖Hv‖ (robust when λmax ≈ −λmin, unlike ⟨v,Hv⟩).

    Row i stops when ‖Hᵢvᵢ‖ changes by at most ``tol`` (relative) between steps; that
    relative change is the error estimate.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    v = unit(v0)
    B = v.shape[0]
    value = torch.zeros(B, dtype=v.dtype, device=v.device)
    error = torch.full_like(value, float("inf"))
    steps = torch.zeros(B, dtype=torch.long, device=v.device)
    done = torch.zeros(B, dtype=torch.bool, device=v.device)
    bcast = (-1,) + (1,) * (v.dim() - 1)
    for _ in range(max_iter):
        hv = matvec(v)
        est = hv.flatten(1).norm(dim=1)
        change = (est - value).abs() / est.clamp_min(_TINY)
        live = ~done
        steps = steps + live.long()
        error = torch.where(live, torch.where(est > 0, change, 0.0), error)
        value = torch.where(live, est, value)
        done = done | (live & ((change <= tol) | (est == 0)))
        if bool(done.all()):
            break
        v = torch.where(done.view(bcast), v, unit(hv))
    return EigResult(value, steps, done, error, v)


def operator_norm(
    gram: Matvec, v0: torch.Tensor, tol: float = 1e-4, max_iter: int = 2000, cycle: int = 48,
    enough: float | None = None,
) -> tuple[float, int, bool, torch.Tensor]:
    """‖A‖₂ of one operator from its Gram operator AᵀA (``v0``: shape (1, ...)).

    Restarted Lanczos: cycles of at most ``cycle`` steps (bounding the basis' memory), each
    restarted from the last Ritz vector, until the Ritz pair's residual is at most ``tol``
    times λ = σ², or a whole cycle raises λ by at most ``tol``/10 relative (a cluster of top
    eigenvalues: the residual of one Ritz vector then falls slowly while λ has settled), or
    λ reaches ``enough`` (after a cycle; counted as converged), or ``max_iter``
    applications. Returns (σ, applications of AᵀA, converged, the top right singular vector
    estimate, shape of ``v0``).
    """
    v, used, lam = v0, 0, None
    if v0.device.type == "meta":  # shapes only: no value can be computed
        return 1.0, 0, True, v0
    while True:
        res = lanczos(gram, v, tol=tol, max_iter=min(cycle, max_iter - used))
        used += int(res.steps[0])
        v = res.vector
        settled = lam is not None and float(res.value[0]) - lam <= 0.1 * tol * lam
        lam = float(res.value[0])
        converged = bool(res.converged[0]) or settled or (enough is not None and lam >= enough)
        if converged or used >= max_iter:
            return lam**0.5, used, converged, v
