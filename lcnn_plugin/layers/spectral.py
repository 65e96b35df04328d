"""Spectral normalisation by the true operator norm of a layer on its real input shape.

A convolution is a linear operator A on inputs of shape (C, *spatial). torch's
``spectral_norm`` normalises by the norm of the weight reshaped to a (C_out, C_in·k·k)
matrix, which is not the norm of A (it under-estimates a random 3×3 conv by about 1.5×).
Here σ = ‖A‖₂ on the input shape the layer actually sees, from A and its exact adjoint Aᵀ.

One engine, :class:`SpectralNorm`, serves every normalised layer through an operator
(apply ``matvec`` and adjoint ``rmatvec`` on a batch of inputs of the layer's real shape):

- :class:`ConvOperator` for ``SNConv1d/2d/3d`` (any stride, dilation, groups, padding mode:
  zeros padding's adjoint is a crop, circular/reflect/replicate padding's a scatter-add
  through the same index map, so the norm is exact, not a bound);
- :class:`MatrixOperator` for ``SNLinear``;
- :class:`AffineOperator` for any affine layer f normalised on its input by
  :class:`InputSpectralNorm` (A v = f(v) − f(0), Aᵀ by autograd).

State, on the layer (the state_dict keys of every earlier version): ``sn_v`` (the right
singular vector on the *trained* input shape), ``sn_sigma`` (the σ eval uses on that shape)
and, with :func:`enable_sn_scale`, a learnable scale c (``sn_log_scale``); the layer applies
c/σ. Semantics:

- training: on a new input shape, σ is first computed to convergence (Lanczos on AᵀA, Ritz
  residual ≤ 1e-4·σ²) and becomes the trained state; then every training forward takes one
  warm-started power step v ← AᵀAv/‖AᵀAv‖ and uses σ = ‖Av‖, differentiable in the weights.
  A training forward that runs inside a backward pass (gradient checkpointing's
  recomputation) takes no step, so it sees the σ of the forward it recomputes.
- eval: σ is frozen. On the trained shape it is the stored σ; on any other shape, σ computed
  to convergence for that shape from the weights as they are at its first eval forward,
  kept in a cache beside the state (never written to it) until the next training forward,
  :meth:`~SpectralNorm.reset`, :meth:`~SpectralNorm.clear` or ``load_state_dict``. Eval
  outputs therefore depend only on the state, the weights and the input, whatever else was
  evaluated before; as with the stored σ, editing weights in eval does not move σ.

Forwards have no data-dependent Python control flow: the shape logic lives in functions that
torch.fx records as single calls (``torch.fx.wrap``), and torch.compile traces through.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import linalg

_EPS = 1e-12
INIT_TOL = 1e-4  # Ritz residual / σ² of a new shape's σ (σ within ~1e-4 relative)
INIT_MAX_ITER = 1000  # operator applications allowed for it
BOUND_TOL = 1e-6  # Ritz residual / σ² of the float64 Lanczos estimates behind the bounds
CERT_TARGET = 0.01  # a certified bound's lower side is refined until within 1% of the upper
DENSE_SMALL = 256  # inputs of at most this many elements: the dense operator's SVD at once
DENSE_LIMIT = 1024  # ... up to this many: the dense SVD where the symbol's bound is loose
GRAM_LIMIT = 1024  # a convolution whose Gram matrix has at most this many rows: exact where loose
TIGHT_GRAM_LIMIT = 16384  # ... within gram_limit() (a 2 GiB float64 factorisation)
_GRAM_LIMIT = contextvars.ContextVar("gram_limit", default=GRAM_LIMIT)

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def layer_name(module: nn.Module) -> str:
    """The module's path in its model when known (see :func:`name_layers`), else its class."""
    return getattr(module, "_lcnn_name", None) or type(module).__name__


def name_layers(model: nn.Module) -> nn.Module:
    """Record each submodule's path so that its errors can name it. Returns ``model``."""
    for name, m in model.named_modules():
        if name:
            object.__setattr__(m, "_lcnn_name", name)
    return model


def enable_sn_scale(module: nn.Module, scale: float | torch.Tensor) -> None:
    """Give a spectrally normalised layer a learnable scale c (``sn_log_scale``, init ``scale``),
    e.g. c = σ to keep a pretrained layer's function; the LCNN objective pulls log c toward 0."""
    w = module.weight
    log_c = torch.as_tensor(scale, dtype=w.dtype).log().to(w.device)
    module.sn_log_scale = nn.Parameter(log_c.detach().clone())


def sn_factor(log_scale: torch.Tensor | None, sigma: torch.Tensor) -> torch.Tensor:
    """c/σ with c = exp(log_scale) (1 without a scale); σ ≥ 1e-12, so a zero layer stays zero
    instead of NaN."""
    sigma = sigma.clamp_min(_EPS)
    return 1.0 / sigma if log_scale is None else log_scale.exp() / sigma


# --- operators -------------------------------------------------------------------------------

class Operator(Protocol):
    """A linear map on batches of inputs of shape (B, *in_shape)."""

    in_shape: tuple[int, ...]

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor: ...


class ConvOperator:
    """The bias-free linear map of a ``nn.ConvNd`` on inputs of shape (C, *spatial).

    ``matvec(v)`` is exactly the layer without bias (with ``weight``, default the layer's
    own); ``rmatvec(u)`` is its exact transpose.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, spatial: Sequence[int],
                 weight: torch.Tensor | None = None) -> None:
        self.conv = conv
        self.weight = weight
        self.nd = len(conv.kernel_size)
        self.spatial = tuple(int(s) for s in spatial)
        if len(self.spatial) != self.nd:
            raise ValueError(f"{layer_name(conv)}: expected {self.nd} spatial dims, got {self.spatial}")
        self.in_shape = (conv.in_channels, *self.spatial)
        # F.pad order: last dim first, (left, right) pairs; the same the layer uses.
        self.pads = tuple(int(p) for p in conv._reversed_padding_repeated_twice)
        self.mode = conv.padding_mode
        padded = []
        for d in range(self.nd):
            left, right = self.pads[2 * (self.nd - 1 - d)], self.pads[2 * (self.nd - 1 - d) + 1]
            padded.append(self.spatial[d] + left + right)
        self.padded = tuple(padded)
        out, out_pad = [], []
        for d in range(self.nd):
            span = conv.dilation[d] * (conv.kernel_size[d] - 1) + 1
            if self.padded[d] < span:
                raise ValueError(
                    f"{layer_name(conv)}: input size {self.spatial} is smaller than the "
                    f"kernel's span along dim {d} after padding"
                )
            o = (self.padded[d] - span) // conv.stride[d] + 1
            out.append(o)
            out_pad.append(self.padded[d] - ((o - 1) * conv.stride[d] + span))
        self.out_spatial = tuple(out)
        self.output_padding = tuple(out_pad)
        self._index: torch.Tensor | None = None

    def _w(self) -> torch.Tensor:
        return self.conv.weight if self.weight is None else self.weight

    # -- padding and its adjoint -------------------------------------------------------
    def _pad(self, v: torch.Tensor) -> torch.Tensor:
        if not any(self.pads):
            return v
        mode = "constant" if self.mode == "zeros" else self.mode
        return F.pad(v, self.pads, mode=mode)

    def _pad_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        if not any(self.pads):
            return y
        if self.mode == "zeros":
            sl = [slice(None), slice(None)]
            for d in range(self.nd):
                left = self.pads[2 * (self.nd - 1 - d)]
                sl.append(slice(left, left + self.spatial[d]))
            return y[tuple(sl)]
        index = self._gather_index(y.device)
        out = y.new_zeros(y.shape[0], y.shape[1], math.prod(self.spatial))
        out.index_add_(2, index, y.flatten(2))
        return out.view(y.shape[0], y.shape[1], *self.spatial)

    def _gather_index(self, device: torch.device) -> torch.Tensor:
        """For each padded position, the flat index of the input element it copies."""
        if self._index is None or self._index.device != device:
            n = math.prod(self.spatial)
            idx = torch.arange(n, dtype=torch.float64).view(1, 1, *self.spatial)
            self._index = F.pad(idx, self.pads, mode=self.mode).round().long().flatten().to(device)
        return self._index

    # -- the operator ------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return _CONV[self.nd](self._pad(v), self._w(), None, c.stride, 0, c.dilation, c.groups)

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        c = self.conv
        y = _CONV_T[self.nd](u, self._w(), None, c.stride, 0, self.output_padding, c.groups, c.dilation)
        return self._pad_adjoint(y)

    # -- the dense Gram matrix ------------------------------------------------------------------
    def gram_size(self) -> int:
        """Rows of the smaller Gram matrix, AᵀA or AAᵀ."""
        return min(math.prod(self.in_shape), self.conv.out_channels * math.prod(self.out_spatial))

    def gram(self) -> torch.Tensor:
        """The smaller of AᵀA and AAᵀ (:meth:`gram_size` rows, float64), from the tap matrices
        W_a: A = Σ_a S_a ⊗ W_a with S_a the 0/1 map of the positions tap a reads, so AᵀA is made
        of blocks Σ W_aᵀW_b (AAᵀ of W_a W_bᵀ), one per pair of positions two taps connect through
        an output (input) position; rows ordered by position, then channel."""
        c, nd = self.conv, self.nd
        w = self._w().detach().double()
        g, co, cig = c.groups, c.out_channels // c.groups, w.shape[1]
        taps = list(itertools.product(*(range(k) for k in c.kernel_size)))
        mats = w.new_zeros(len(taps), c.out_channels, c.in_channels)
        for gi in range(g):
            block = w[gi * co:(gi + 1) * co].flatten(2).permute(2, 0, 1)  # (taps, co, ci/g)
            mats[:, gi * co:(gi + 1) * co, gi * cig:(gi + 1) * cig] = block
        # the input position each (tap, output position) reads, −1 for a zero of the padding
        n_in = math.prod(self.spatial)
        if self.mode == "zeros":
            source = F.pad(torch.arange(n_in, dtype=torch.float64).view(1, 1, *self.spatial), self.pads,
                           value=-1.0).round().long().view(self.padded)
        else:  # every padded position copies an input element: the adjoint's index map
            source = self._gather_index(torch.device("cpu")).view(self.padded)
        reads = torch.empty(len(taps), math.prod(self.out_spatial), dtype=torch.long)
        outs = torch.cartesian_prod(*(torch.arange(o) for o in self.out_spatial)).view(-1, nd)
        for i, tap in enumerate(taps):
            pos = [outs[:, d] * c.stride[d] + tap[d] * c.dilation[d] for d in range(nd)]
            reads[i] = source[tuple(pos)]
        inputs = math.prod(self.in_shape) <= c.out_channels * len(outs)
        # AᵀA: block (input p, input q) = Σ W_aᵀW_b over outputs reading p by tap a and q by tap b;
        # AAᵀ: block (output o, output o') = Σ W_a W_bᵀ over inputs read by o with tap a, o' with b
        side, ch = (n_in, c.in_channels) if inputs else (len(outs), c.out_channels)
        gram = w.new_zeros(side, ch, side, ch)
        for a in range(len(taps)):
            for b in range(len(taps)):
                if inputs:
                    ok = (reads[a] >= 0) & (reads[b] >= 0)
                    rows, cols = reads[a][ok], reads[b][ok]
                else:  # pairs of outputs reading one input position, a from the first, b the second
                    hit = (reads[a][:, None] == reads[b][None, :]) & (reads[a][:, None] >= 0)
                    rows, cols = hit.nonzero(as_tuple=True)
                if len(rows) == 0:
                    continue
                block = mats[a].T @ mats[b] if inputs else mats[a] @ mats[b].T
                if not block.any():
                    continue
                for p, q in zip(rows.tolist(), cols.tolist()):
                    gram[p, :, q, :] += block
        return gram.view(side * ch, side * ch)

    # -- a certified upper bound -------------------------------------------------------------
    def torus_bound(self) -> tuple[float, torch.Tensor]:
        """An upper bound of ‖A‖₂ from the convolution's symbol on a torus, and the symbol's
        top singular vector as an input (a start vector for Lanczos). float64.

        zeros padding: the input sits isometrically in a torus of T ≥ n + max(left, right)
        (a multiple of the stride; the left and right paddings share the torus' zeros) where
        the layer is a strided circular convolution whose every read of the padding lands on
        a zero, and the layer's outputs are some of its outputs, so ‖A‖ ≤ its norm.
        circular padding: the torus is the input's own. reflect/replicate padding: the layer
        is a padding-free convolution on the padded input after the copy map P (‖P‖ = √(the
        most copies of one input element)), so ‖A‖ ≤ ‖P‖ times that convolution's bound.
        Phase by phase (x_r[q] = x[s q + r]), a strided circular convolution is a stride-1
        one from C·Πs channels, whose norm is the largest singular value of its symbol over
        the torus' frequencies (exact). Outputs that meet on the torus (circular padding
        wider than 'same', or a stride not dividing the input) count √(multiplicity).
        """
        c = self.conv
        nd, g = self.nd, c.groups
        copy_norm = 1.0
        if self.mode in ("reflect", "replicate"):
            counts = torch.bincount(self._gather_index(torch.device("cpu")))
            copy_norm = float(counts.max()) ** 0.5
        torus, stride, offset, mult = [], [], [], 1
        for d in range(nd):
            left = self.pads[2 * (nd - 1 - d)]
            s = c.stride[d]
            if self.mode == "circular":
                n, off = self.spatial[d], -left
                if n % s:
                    s = 1  # positions (i·stride − left) mod n on the stride-1 torus
                    pos = [(i * c.stride[d] - left) % n for i in range(self.out_spatial[d])]
                    mult *= max(pos.count(p) for p in set(pos))
                else:
                    mult *= -(-self.out_spatial[d] // (n // s))
            elif self.mode == "zeros":
                # the input at [left, left + n) of the torus, the padded positions read p ≤ pmax:
                # a read below left or past the input lands on zeros iff T ≥ n + left and
                # T ≥ pmax + 1 − left (= n + the right padding actually read); the two paddings
                # share the torus' zeros
                right = self.pads[2 * (nd - 1 - d) + 1] - self.output_padding[d]
                n, off = -(-(self.spatial[d] + max(left, right)) // s) * s, 0
            else:  # the padded input of reflect/replicate: no wrap-around
                n, off = -(-self.padded[d] // s) * s, 0
            torus.append(n)
            stride.append(s)
            offset.append(off)
        small = [t // s for t, s in zip(torus, stride)]
        phases = math.prod(stride)
        w = self._w().detach().double()
        co, ci = w.shape[0] // g, w.shape[1]
        w = w.reshape(g, co, ci, *c.kernel_size)
        if self.mode == "zeros":  # taps that only ever meet the padding do not act: drop them
            for d in range(nd):
                left, n, reads = self.pads[2 * (nd - 1 - d)], self.spatial[d], range(self.out_spatial[d])
                hit = [any(0 <= i * c.stride[d] + a * c.dilation[d] - left < n for i in reads)
                       for a in range(c.kernel_size[d])]
                mask = torch.tensor(hit, dtype=w.dtype).view([-1 if e == 3 + d else 1 for e in range(3 + nd)])
                w = w * mask
        shifts: dict[tuple[int, ...], int] = {}  # torus shift -> its column
        placed = []
        for tap in itertools.product(*(range(k) for k in c.kernel_size)):
            phase, shift = 0, []
            for d in range(nd):
                pos = tap[d] * c.dilation[d] + offset[d]
                phase = phase * stride[d] + pos % stride[d]
                shift.append((pos // stride[d]) % small[d])
            placed.append((tap, phase, shifts.setdefault(tuple(shift), len(shifts))))
        kernel = w.new_zeros(g, len(shifts), co, ci, phases)
        for tap, phase, j in placed:
            kernel[:, j, :, :, phase] += w[(slice(None),) * 3 + tap]
        kernel = kernel.flatten(3, 4)  # (g, shifts, co, ci·phases)
        used = kernel.abs().amax((0, 2, 3)).nonzero().flatten().tolist() or [0]
        at = torch.tensor([list(k) for k in shifts], dtype=torch.float64)[used]  # (used, nd)
        kernel = kernel[:, used].to(torch.complex128)
        # every tap at one shift: the symbol is that matrix times a phase, one frequency will do
        if len(used) == 1:
            omega = torch.zeros(1, nd, dtype=torch.float64)
            mats = kernel  # (g, 1, co, ci·phases)
        else:
            # the symbol Σ_shifts K_shift e^{-2πi⟨ω, shift⟩/small} at one frequency of each pair
            # ±ω (a real kernel's symbol at −ω is the conjugate, with the same singular values),
            # as one small matmul over the used shifts instead of an FFT of the torus
            omega = _half_grid(small)
            turns = (omega / torch.tensor(small, dtype=torch.float64)) @ at.T  # (frequencies, used)
            dft = torch.polar(torch.ones_like(turns), -2 * math.pi * turns)
            mats = (dft @ kernel.flatten(2)).view(g, -1, co, kernel.shape[-1])  # (g, freqs, co, ci·phases)
        top, where, u = _max_gram_eigenvalue(mats)
        size = max(min(mats.shape[-2:]), len(used))  # the DFT's sums over the shifts too
        bound = top ** 0.5 * (1 + _rounding(size)) * (mult * copy_norm**2) ** 0.5
        return bound, self._torus_vector(u, where[0], omega[where[1]], small, stride, torus)

    def _torus_vector(self, u: torch.Tensor, group: int, omega: torch.Tensor, small: Sequence[int],
                      stride: Sequence[int], torus: Sequence[int]) -> torch.Tensor:
        """The real part of the plane wave u·e^{-2πi⟨ω, q⟩/small} (u (ci·phases,) the symbol's
        top right singular vector at ω) as an input of the layer: phases put back in place,
        cropped from the torus to the input (the zeros-padded frame: from the left padding)."""
        nd = self.nd
        grid = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in small), indexing="ij")
        angle = sum(-2 * math.pi * float(omega[d]) * grid[d] / small[d] for d in range(nd))
        wave = (u.view(-1, *([1] * nd)) * torch.polar(torch.ones_like(angle), angle)).real
        ci = self.conv.in_channels // self.conv.groups
        wave = wave.view(ci, *stride, *small)  # (ci, s_1..s_nd, t_1..t_nd) → (ci, t_1 s_1, ...)
        order = [0] + [x for d in range(nd) for x in (1 + nd + d, 1 + d)]
        wave = wave.permute(order).reshape(ci, *torus)
        if self.mode != "circular":
            sl = []
            for d in range(nd):
                left = self.pads[2 * (nd - 1 - d)] if self.mode == "zeros" else 0
                sl.append(slice(left, left + self.spatial[d]))
            wave = wave[(slice(None), *sl)]
        v = wave.new_zeros(self.conv.in_channels, *self.spatial)
        v[group * ci:(group + 1) * ci] = wave
        return v.unsqueeze(0)


def _half_grid(small: Sequence[int]) -> torch.Tensor:
    """One frequency of each pair {ω, −ω} of the torus ``small`` (the pair's first in row-major
    order), as rows (count, nd) of float64 indices."""
    full = torch.cartesian_prod(*(torch.arange(n) for n in small)).view(-1, len(small))
    n = torch.tensor(list(small))
    weights = torch.cumprod(torch.cat([n.flip(0)[:-1].new_ones(1), n.flip(0)[:-1]]), 0).flip(0)
    index = (full * weights).sum(1)
    partner = (((n - full) % n) * weights).sum(1)
    return full[index <= partner].double()


class MatrixOperator:
    """x ↦ W x of a linear layer (rows of a batch (B, in_features))."""

    def __init__(self, linear: nn.Linear, weight: torch.Tensor | None = None) -> None:
        self.linear = linear
        self.weight = weight
        self.in_shape = (linear.in_features,)

    def _w(self) -> torch.Tensor:
        return self.linear.weight if self.weight is None else self.weight

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return v @ self._w().t()

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return u @ self._w()


class AffineOperator:
    """The linear part A v = f(v) − f(0) of an affine layer f (its own ``forward``, hooks
    bypassed), with Aᵀu by autograd (A is constant, so any point serves)."""

    def __init__(self, module: nn.Module, in_shape: Sequence[int]) -> None:
        self.module = module
        self.in_shape = tuple(int(s) for s in in_shape)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.module.forward(torch.cat([v, torch.zeros_like(v[:1])]))
        return out[:-1] - out[-1:]

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            v = torch.zeros(u.shape[0], *self.in_shape, dtype=u.dtype, device=u.device, requires_grad=True)
            (g,) = torch.autograd.grad(self.module.forward(v), v, u)
        return g


def _rounding(n: int) -> float:
    """Relative margin for float64 rounding in the n×n products and factorisations behind a
    bound (8·n²·u, u = 2⁻⁵³: above the normwise backward-error bounds γₙ·n of a Gram product,
    a Householder reduction, a Cholesky factorisation and a DFT over at most n shifts)."""
    return 8 * n * n * 2.0**-53


def _lanczos_top(gram: torch.Tensor, start: torch.Tensor, steps: int = 6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top Ritz value (..., ) and vector (..., n, 1) of a batch of Hermitian matrices after
    ``steps`` Lanczos steps (full re-orthogonalisation) from ``start`` (..., n, 1): lower
    estimates of λmax, as good as several times as many power steps for the same passes over
    the matrices."""
    n = gram.shape[-1]
    v = start.to(gram.dtype)
    v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-300)
    basis, alphas, betas = [v], [], []
    k = min(steps, n)
    for j in range(k):
        w = gram @ v
        alphas.append((v.mH @ w).real)
        if j + 1 == k:
            break
        q = torch.cat(basis, -1)
        w = w - q @ (q.mH @ w)
        w = w - q @ (q.mH @ w)  # twice is enough (Kahan-Parlett)
        beta = w.norm(dim=-2, keepdim=True)
        betas.append(beta)
        v = w / beta.clamp_min(1e-300)
        basis.append(v)
    t = torch.zeros(*gram.shape[:-2], k, k, dtype=torch.float64)
    for i in range(k):
        t[..., i, i] = alphas[i][..., 0, 0]
        if i + 1 < k:
            t[..., i, i + 1] = t[..., i + 1, i] = betas[i][..., 0, 0]
    values, vectors = torch.linalg.eigh(t)
    ritz = torch.cat(basis, -1) @ vectors[..., -1:].to(gram.dtype)
    return values[..., -1], ritz


def _max_gram_eigenvalue(mats: torch.Tensor, chunk: int = 64) -> tuple[float, tuple[int, int], torch.Tensor]:
    """max over a batch (g, f, m, n) of complex matrices M of λmax(MᴴM) = ‖M‖², certified, where
    it is attained, and M's top right singular vector there as a batched Lanczos run found it
    (a start for Lanczos on the layer, not part of the bound). Exact for the matrix whose
    Lanczos estimate is largest; every other is shown to be at most that value (1 + 1e-6) by a
    Cholesky factorisation of μI − MᴴM (a third of an eigen-solve). Of those that fail, the
    one estimated largest is solved exactly, μ raised to it if it is larger, and the rest
    tried again, until none is left."""
    g, f = mats.shape[:2]
    grams, estimates, vectors = [], [], []
    gen = torch.Generator().manual_seed(0)
    for start in range(0, f, chunk):  # frequency chunks bound the temporaries
        m = mats[:, start:start + chunk]
        gram = m.mH @ m if m.shape[-1] <= m.shape[-2] else m @ m.mH
        value, v = _lanczos_top(gram, torch.randn(*gram.shape[:-1], 1, generator=gen, dtype=torch.float64))
        grams.append(gram)
        vectors.append(v)
        estimates.append(value)
    estimate = torch.cat(estimates, 1)  # (g, f) Rayleigh quotients

    def gram_at(gi: int, fi: int) -> torch.Tensor:
        return grams[fi // chunk][gi, fi % chunk]

    def above(mu: float, grams_: torch.Tensor) -> torch.Tensor:
        """Which of a batch of Gram matrices are not shown to be ⪯ μI."""
        shifted = grams_.neg()
        shifted.diagonal(dim1=-2, dim2=-1).add_(mu)
        return torch.linalg.cholesky_ex(shifted)[1] != 0

    i = int(estimate.argmax())
    where = (i // f, i % f)
    best = float(torch.linalg.eigvalsh(gram_at(*where))[-1])
    mu = max(best, 0.0) * (1 + 1e-6)
    failed = [(gi, c * chunk + fi) for c, gram in enumerate(grams)
              for gi, fi in above(mu, gram).nonzero().tolist()]
    cleared = mu  # the largest μ under which some matrix was shown ⪯ μI
    while failed:
        failed.sort(key=lambda p: float(estimate[p]))
        gi, fi = failed.pop()
        lam = float(torch.linalg.eigvalsh(gram_at(gi, fi))[-1])
        if lam > best:
            best, where = lam, (gi, fi)
            mu = best * (1 + 1e-6)
        if failed:
            still = above(mu, torch.stack([gram_at(*p) for p in failed])).tolist()
            if not all(still):
                cleared = max(cleared, mu)
            failed = [p for p, bad in zip(failed, still) if bad]
    gi, fi = where
    v = vectors[fi // chunk][gi, fi % chunk, :, 0]
    m = mats[gi, fi]
    if m.shape[-1] > m.shape[-2]:  # the Gram was MMᴴ: v is a left singular vector
        v = m.mH @ v
    return max(best, cleared), where, v / v.norm().clamp_min(1e-300)


@dataclass(frozen=True)
class NormCertificate:
    """Two-sided bounds of an operator norm: ``lower`` ≤ ‖A‖₂ ≤ ``upper``.

    ``upper`` is None when no certified bound is known (``lower`` is then a converged Lanczos
    estimate, from below). ``method`` says how ``upper`` was obtained: ``dense`` (the SVD of
    the operator built column by column), ``svd`` (a matrix), ``torus`` (the convolution's
    symbol, :meth:`ConvOperator.torus_bound`), ``gram`` (a Cholesky factorisation of the
    convolution's Gram matrix, :func:`gram_limit`) or ``estimate`` (none).
    """

    upper: float | None
    lower: float
    method: str

    @property
    def gap(self) -> float | None:
        """upper/lower − 1 (None without an upper bound)."""
        if self.upper is None:
            return None
        return self.upper / self.lower - 1 if self.lower > 0 else (0.0 if self.upper == 0 else math.inf)

    def scaled(self, c: float) -> NormCertificate:
        return NormCertificate(None if self.upper is None else self.upper * c, self.lower * c, self.method)


def matrix_certificate(weight: torch.Tensor) -> NormCertificate:
    """Bounds of a matrix's 2-norm from its SVD in float64 (``svd``)."""
    w = weight.detach().double()
    sigma = float(torch.linalg.matrix_norm(w, ord=2))
    margin = _rounding(min(w.shape))
    return NormCertificate(sigma * (1 + margin), sigma * (1 - margin), "svd")


def dense_norm(op: Operator) -> float:
    """‖A‖₂ by the SVD of A, built by applying the operator to the identity (float64)."""
    d = math.prod(op.in_shape)
    cols = []
    with torch.no_grad():
        for start in range(0, d, 512):
            eye = torch.zeros(min(512, d - start), d, dtype=torch.float64, device=_device(op))
            eye[:, start:].fill_diagonal_(1.0)
            cols.append(op.matvec(eye.view(-1, *op.in_shape)).flatten(1))
    return float(torch.linalg.matrix_norm(torch.cat(cols), ord=2))


def _device(op: Operator) -> torch.device:
    """The device the operator computes on (the weight it applies, or its module's)."""
    if isinstance(op, (ConvOperator, MatrixOperator)):
        return op._w().device
    p = next(op.module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def certify(op: Operator, v0: torch.Tensor | None = None, target: float = CERT_TARGET,
            dense_limit: int = DENSE_LIMIT) -> NormCertificate:
    """Bounds of ‖A‖₂ of a float64 operator by the cheapest route that is within ``target``.

    A matrix: its SVD. An input of at most :data:`DENSE_SMALL` elements: the dense operator's
    SVD. A convolution: the symbol's bound (:meth:`ConvOperator.torus_bound`) with a lower
    bound ‖A v‖ from Lanczos on AᵀA, started at ``v0`` (default: the symbol's vector) and run
    until within ``target`` of it or converged (Ritz residual ≤ :data:`INIT_TOL`·σ²); still
    further apart, exact from the Gram matrix when it has at most :data:`GRAM_LIMIT` rows
    (:func:`gram_limit` sets another), else the dense SVD when the input has at most
    ``dense_limit`` elements, else the bound as it is (loose). Any other operator (no known
    structure): the dense SVD up to ``dense_limit`` elements, else only the Lanczos estimate
    (to :data:`BOUND_TOL`, ``upper`` None).
    """
    if isinstance(op, MatrixOperator):
        return matrix_certificate(op._w())
    d = math.prod(op.in_shape)
    upper = None
    if d <= DENSE_SMALL:
        return _dense_certificate(op)
    if isinstance(op, ConvOperator):
        upper, start = op.torus_bound()
        v0 = start if v0 is None else v0
    elif d <= dense_limit:
        return _dense_certificate(op)
    seeded = _seeded_start(op.in_shape, torch.empty((), dtype=torch.float64, device=_device(op)))
    # a little of the seeded vector: a start inside an invariant subspace (one group of a
    # grouped convolution, an exact eigenvector) would keep Lanczos from the top
    v0 = seeded if v0 is None else linalg.unit(v0.reshape(seeded.shape)) + 1e-3 * seeded
    enough = None if upper is None else (upper / (1 + target)) ** 2
    tol, max_iter = (BOUND_TOL, 2000) if upper is None else (INIT_TOL, 300)
    with torch.no_grad():
        _, _, _, v = linalg.operator_norm(_gram(op), v0, tol=tol, max_iter=max_iter, cycle=16, enough=enough)
        lower = float(op.matvec(linalg.unit(v)).norm()) * (1 - _rounding(d))
    if upper is None:
        return NormCertificate(None, lower, "estimate")
    if lower > upper:
        raise RuntimeError(f"a Rayleigh quotient ({lower}) exceeds the certified bound ({upper}): "
                           "the bound is wrong for this operator")
    if upper > lower * (1 + target):
        if op.gram_size() <= _GRAM_LIMIT.get():
            return _gram_certificate(op, v)
        if d <= dense_limit:
            return _dense_certificate(op)
    return NormCertificate(upper, lower, "torus")


@contextlib.contextmanager
def gram_limit(rows: int = TIGHT_GRAM_LIMIT) -> Iterator[None]:
    """Within: :func:`certify` makes a convolution's bound exact where the symbol's is loose when
    its Gram matrix has up to ``rows`` rows (outside: :data:`GRAM_LIMIT`; memory 8·rows² bytes,
    time ~rows³/3 flops: a 512-channel 3×3 convolution on 4×4 inputs has 8192 rows, a 256-channel
    one on 8×8 16384)."""
    token = _GRAM_LIMIT.set(int(rows))
    try:
        yield
    finally:
        _GRAM_LIMIT.reset(token)


def _gram_certificate(op: ConvOperator, v: torch.Tensor) -> NormCertificate:
    """Bounds from the dense Gram matrix G (:meth:`ConvOperator.gram`): Lanczos from ``v`` to
    a Ritz residual of :data:`BOUND_TOL`·σ² gives the lower bound; ‖A‖² ≤ μ = (lower·(1+1e-7))²
    when the Cholesky factorisation of μI − G succeeds; if it fails (Lanczos did not find the
    top), μ is G's largest eigenvalue."""
    with torch.no_grad():
        _, _, _, v = linalg.operator_norm(_gram(op), v, tol=BOUND_TOL, max_iter=2000, cycle=16)
        lower = float(op.matvec(linalg.unit(v)).norm())
    gram = op.gram()
    # G's entries are sums over the other side (inputs of AAᵀ, outputs of AᵀA); the
    # factorisation's or eigen-solver's error grows with G's rows
    margin = _rounding(max(math.prod(op.in_shape), op.conv.out_channels * math.prod(op.out_spatial)))
    mu = (lower * (1 + 1e-7)) ** 2
    gram.neg_().diagonal().add_(mu)  # μI − G in place (G: up to 2 GiB)
    if int(torch.linalg.cholesky_ex(gram)[1]) != 0:
        gram.diagonal().sub_(mu)  # G again, to a rounding of μ on the diagonal (within the margin)
        mu = max(float(torch.linalg.eigvalsh(gram.neg_())[-1]), 0.0)
        lower = max(lower, math.sqrt(mu * (1 - margin)))
    lower *= 1 - _rounding(math.prod(op.in_shape))
    return NormCertificate(math.sqrt(mu * (1 + margin)), lower, "gram")


def _dense_certificate(op: Operator) -> NormCertificate:
    sigma = dense_norm(op)
    margin = _rounding(math.prod(op.in_shape))
    return NormCertificate(sigma * (1 + margin), sigma * (1 - margin), "dense")


def _gram(op: Operator):  # noqa: ANN202
    """v ↦ (AᵀA + εI)v: the shift keeps a power iteration alive while A = 0 (e.g. a
    zero-initialised gain) and moves no eigenvector."""
    return lambda v: op.rmatvec(op.matvec(v)) + _EPS * v


def _seeded_start(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """The fixed unit start vector of every power iteration and Lanczos run (seed 0)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
    return linalg.unit(v).to(device=like.device, dtype=like.dtype)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _recomputing() -> bool:
    """True when a forward runs inside a backward pass: gradient checkpointing's recomputation."""
    if torch.compiler.is_compiling():  # compiled graphs recompute functionally
        return False
    return torch._C._current_graph_task_id() != -1


# --- the engine ----------------------------------------------------------------------------

class SpectralNorm:
    """The spectral-normalisation engine of one layer (see the module docstring).

    ``kind``: ``"conv"`` (an ``nn.ConvNd`` normalising its weight), ``"linear"`` (an
    ``nn.Linear`` normalising its weight) or ``"affine"`` (any affine layer, normalised on
    its input by :class:`InputSpectralNorm`). Use :meth:`attach` to add it to a layer and
    :meth:`of` to find it.
    """

    def __init__(self, kind: str) -> None:
        if kind not in ("conv", "linear", "affine"):
            raise ValueError(f"kind must be 'conv', 'linear' or 'affine', got {kind!r}")
        self.kind = kind
        self._ops: dict[tuple[int, ...], Operator] = {}
        self._eval: dict[tuple, torch.Tensor] = {}  # eval σ of untrained shapes

    # -- attaching ----------------------------------------------------------------------
    @classmethod
    def attach(cls, module: nn.Module, kind: str) -> SpectralNorm:
        """Register the state (``sn_v``, ``sn_sigma``, ``sn_log_scale``) and the engine on ``module``."""
        w = module.weight
        engine = cls(kind)
        module.register_buffer("sn_v", torch.zeros(0, dtype=w.dtype, device=w.device))
        module.register_buffer("sn_sigma", torch.ones((), dtype=w.dtype, device=w.device))
        module.register_parameter("sn_log_scale", None)
        module.register_load_state_dict_pre_hook(_load_pre_hook)
        object.__setattr__(module, "_sn_engine", engine)
        return engine

    @staticmethod
    def of(module: nn.Module) -> SpectralNorm | None:
        """The engine of ``module``, or None."""
        return module.__dict__.get("_sn_engine")

    def detach(self, module: nn.Module) -> None:
        """Remove the engine and its state from ``module``."""
        hooks = module._load_state_dict_pre_hooks
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is _load_pre_hook]:
            del hooks[key]
        for name in ("sn_v", "sn_sigma", "sn_log_scale"):
            delattr(module, name)
        del module.__dict__["_sn_engine"]

    # -- shapes and operators -----------------------------------------------------------
    def input_shape(self, module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
        """The per-example input shape the operator acts on (a linear layer's norm does not
        depend on the leading dimensions: it acts on each row alike)."""
        if self.kind == "linear" or isinstance(module, nn.Linear):
            return (x.shape[-1],)
        return tuple(x.shape[1:])

    def trained_shape(self, module: nn.Module) -> tuple[int, ...] | None:
        """The input shape of the stored state (None before the first training forward)."""
        v = module.sn_v
        if v.numel() == 0:
            return None
        return tuple(v.shape) if self.kind == "linear" else tuple(v.shape[1:])

    def operator(self, module: nn.Module, shape: Sequence[int], weight: torch.Tensor | None = None,
                 ) -> Operator:
        """The layer's operator on inputs of ``shape`` (cached per shape for the layer's own weight)."""
        shape = tuple(shape)
        if weight is None and shape in self._ops:
            return self._ops[shape]
        if self.kind == "conv":
            if shape[0] != module.in_channels:
                raise ValueError(f"{layer_name(module)}: input shape {shape} has not "
                                 f"{module.in_channels} channels")
            op = ConvOperator(module, shape[1:], weight)
        elif self.kind == "linear":
            op = MatrixOperator(module, weight)
        else:
            op = AffineOperator(module, shape)
        if weight is None:
            self._ops[shape] = op
        return op

    def _batched(self, module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
        return module.sn_v.view(1, *shape)

    # -- σ ----------------------------------------------------------------------------------
    def converged(self, module: nn.Module, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ = ‖A v‖, v) on inputs of ``shape`` with v the top right singular vector by
        Lanczos to a Ritz residual ≤ :data:`INIT_TOL`·σ², in the layer's dtype (at least
        float32). Writes nothing."""
        shape = tuple(shape)
        w = module.weight
        low = w.dtype in (torch.float16, torch.bfloat16)
        if self.kind == "affine":
            target = copy.deepcopy(module).float() if low else module
            op = AffineOperator(target, shape)
        else:
            op = self.operator(module, shape, w.detach().float() if low else None)
        like = w.float() if low else w
        v0 = _seeded_start(shape, like)
        with torch.no_grad():
            _, used, ok, v = linalg.operator_norm(_gram(op), v0, tol=INIT_TOL, max_iter=INIT_MAX_ITER)
            if not ok:
                warnings.warn(f"{layer_name(module)}: the spectral norm at input shape {shape} did not "
                              f"converge in {used} iterations", RuntimeWarning, stacklevel=3)
            v = v.to(w.dtype)
            sigma = self.operator(module, shape).matvec(v).norm()
        return sigma, v

    def reset(self, module: nn.Module, shape: Sequence[int]) -> None:
        """Make ``shape`` the trained shape, with σ and v converged (see :meth:`converged`)."""
        shape = tuple(shape)
        sigma, v = self.converged(module, shape)
        with torch.no_grad():
            module.sn_v = v.reshape(shape) if self.kind == "linear" else v
            module.sn_sigma.copy_(sigma)
        self._eval.clear()

    def clear(self, module: nn.Module) -> None:
        """Forget the trained state (e.g. after the weights are re-initialised)."""
        if hasattr(module, "sn_v"):
            module.sn_v = module.sn_v.new_zeros(0)
            module.sn_sigma.fill_(1.0)
        self._eval.clear()

    def eval_sigma(self, module: nn.Module, shape: Sequence[int]) -> torch.Tensor:
        """The σ an eval forward uses on inputs of ``shape`` (see the module docstring)."""
        shape = tuple(shape)
        if self.trained_shape(module) == shape:
            return module.sn_sigma
        w = module.weight
        key = (shape, w.device, w.dtype)
        sigma = self._eval.get(key)
        if sigma is None:
            sigma = self._eval[key] = self.converged(module, shape)[0]
        if sigma.is_inference() and not torch.is_inference_mode_enabled():
            sigma = self._eval[key] = sigma.clone()  # usable by autograd outside inference mode
        return sigma

    def factor(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """c/σ for a forward on ``x``: one warm-started step in training, σ by shape in eval."""
        shape = self.input_shape(module, x)
        if not module.training:
            return sn_factor(module.sn_log_scale, self.eval_sigma(module, shape))
        if self.trained_shape(module) != shape:
            self.reset(module, shape)
        if self._eval:  # the weights move in training: eval recomputes σ of other shapes
            self._eval.clear()
        op = self.operator(module, shape)
        v = self._batched(module, shape)
        if not _recomputing():
            # the affine adjoint runs autograd: its saved tensors are its own, not those of
            # an enclosing non-reentrant checkpoint (whose recomputation takes no step)
            own = torch.autograd.graph.saved_tensors_hooks(_same, _same) if self.kind == "affine" \
                else contextlib.nullcontext()
            with torch.no_grad(), own:
                v.copy_(linalg.unit(_gram(op)(v)))
        # a copy: a later training forward (CURE, attacks) steps sn_v in place, and this
        # forward's graph must keep the v it used
        sigma = op.matvec(v.clone()).norm()
        with torch.no_grad():
            module.sn_sigma.copy_(sigma)
        return sn_factor(module.sn_log_scale, sigma)

    def eval_factor(self, module: nn.Module, shape: Sequence[int] | None = None) -> torch.Tensor:
        """c/σ as eval applies it on inputs of ``shape`` (default: the trained shape)."""
        return sn_factor(module.sn_log_scale, self.eval_sigma(module, self._shape_or_trained(module, shape)))

    def _shape_or_trained(self, module: nn.Module, shape: Sequence[int] | None) -> tuple[int, ...]:
        if shape is not None:
            return tuple(int(s) for s in shape)
        trained = self.trained_shape(module)
        if trained is None and self.kind == "linear":
            return (module.in_features,)
        if trained is None:
            raise ValueError(f"{layer_name(module)}: no input shape known yet; pass the input shape "
                             "or run a training forward")
        return trained

    # -- bounds -----------------------------------------------------------------------------
    def operator_norm(self, module: nn.Module, shape: Sequence[int] | None = None,
                      tol: float = BOUND_TOL, max_iter: int = 2000) -> tuple[float, int, bool]:
        """‖A‖₂ of the layer's raw operator (without c/σ) on inputs of ``shape``, in float64:
        (σ, applications of AᵀA, converged). Krylov estimates approach σ from below."""
        shape = self._shape_or_trained(module, shape)
        if self.kind == "affine":
            op = AffineOperator(copy.deepcopy(module).double(), shape)
        else:
            op = self.operator(module, shape, module.weight.detach().double())
        if self.trained_shape(module) == shape:
            v0 = self._batched(module, shape).detach().double()
        else:
            v0 = _seeded_start(shape, torch.empty((), dtype=torch.float64, device=module.weight.device))
        return _bound_norm(op, v0, tol, max_iter)

    def certificate(self, module: nn.Module, shape: Sequence[int] | None = None) -> NormCertificate:
        """Bounds of ‖A‖₂ of the layer's raw operator (without c/σ) on inputs of ``shape``,
        float64 (see :func:`certify`): exact for a linear layer and for small inputs, the
        symbol's bound for a convolution, only an estimate for an affine layer (whose
        structure is unknown) on inputs above :data:`DENSE_LIMIT` elements."""
        shape = self._shape_or_trained(module, shape)
        if self.kind == "affine":
            op: Operator = AffineOperator(copy.deepcopy(module).double(), shape)
        else:
            op = self.operator(module, shape, module.weight.detach().double())
        v0 = self._batched(module, shape).detach().double() if self.trained_shape(module) == shape else None
        return certify(op, v0)

    def lipschitz_certificate(self, module: nn.Module, shape: Sequence[int] | None = None) -> NormCertificate:
        """Bounds of the eval-mode Lipschitz constant c·‖A‖₂/σ on inputs of ``shape``."""
        shape = self._shape_or_trained(module, shape)
        return self.certificate(module, shape).scaled(float(self.eval_factor(module, shape).detach()))

    def lipschitz(self, module: nn.Module, shape: Sequence[int] | None = None) -> float:
        """Eval-mode Lipschitz constant c·‖A‖₂/σ on inputs of ``shape`` (default: trained):
        a certified upper bound, or the estimate where none is known (see :meth:`certificate`)."""
        cert = self.lipschitz_certificate(module, shape)
        return cert.lower if cert.upper is None else cert.upper

    # -- state ------------------------------------------------------------------------------
    def _compatible(self, module: nn.Module, saved: torch.Tensor) -> bool:
        if self.kind == "conv":
            return saved.dim() == 2 + len(module.kernel_size) and saved.shape[1] == module.in_channels
        if self.kind == "linear":
            return tuple(saved.shape) == (module.in_features,)
        return saved.dim() >= 2 and saved.shape[0] == 1

    def load(self, module: nn.Module, state_dict: dict, prefix: str) -> None:
        """Accept a saved ``sn_v`` of any input shape (resize the buffer to it; one from another
        layer shape, e.g. timm adapting the first conv to other in_chans, is dropped and
        recomputed) and a saved ``sn_log_scale`` (create the parameter to receive it)."""
        if prefix + "sn_log_scale" in state_dict and module.sn_log_scale is None:
            enable_sn_scale(module, 1.0)
        key = prefix + "sn_v"
        saved = state_dict.get(key)
        if saved is not None:
            if saved.numel() and not self._compatible(module, saved):
                state_dict[key] = torch.zeros(0, dtype=saved.dtype)
                state_dict[prefix + "sn_sigma"] = torch.ones((), dtype=saved.dtype)
                saved = state_dict[key]
            module.sn_v = torch.empty_like(saved, device=module.sn_v.device, dtype=module.sn_v.dtype)
        self._eval.clear()


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
    SpectralNorm.of(module).load(module, state_dict, prefix)


# --- what forwards call (single nodes under torch.fx) ----------------------------------------

def _sn_factor(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """c/σ of ``module`` for a forward on ``x`` (see :meth:`SpectralNorm.factor`)."""
    return module._sn_engine.factor(module, x)


def _check_conv_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> None:
    nd = len(module.kernel_size)
    if x.dim() != nd + 2 or x.shape[1] != module.in_channels:
        dims = ("L",) if nd == 1 else ("H", "W") if nd == 2 else ("D", "H", "W")
        raise ValueError(
            f"{layer_name(module)}: expected input of shape (N, {module.in_channels}, "
            f"{', '.join(dims)}), got {tuple(x.shape)}"
        )


def _check_linear_input(module: nn.Linear, x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] != module.in_features:
        raise ValueError(
            f"{layer_name(module)}: expected input of shape (..., {module.in_features}), got {tuple(x.shape)}"
        )


torch.fx.wrap("_sn_factor")
torch.fx.wrap("_check_conv_input")
torch.fx.wrap("_check_linear_input")


# --- the layers ------------------------------------------------------------------------------

class _SNLayer:
    """What every spectrally normalised layer offers (mixed into nn.ConvNd / nn.Linear)."""

    def enable_scale(self, scale: float | torch.Tensor) -> None:
        """Apply c·W/σ with a learnable c (see :func:`enable_sn_scale`)."""
        enable_sn_scale(self, scale)

    def normalized_weight(self, input_shape: Sequence[int] | None = None) -> torch.Tensor:
        """The weight the layer applies in eval on inputs of ``input_shape`` (default: the
        trained shape): c·W/σ."""
        return self.weight * self._sn_engine.eval_factor(self, input_shape)

    def operator_norm(self, input_shape: Sequence[int] | None = None, tol: float = BOUND_TOL,
                      max_iter: int = 2000) -> tuple[float, int, bool]:
        """‖A‖₂ of the raw weight on inputs of ``input_shape`` (per example, e.g. (C, H, W)),
        float64 Lanczos: (σ, applications, converged)."""
        return self._sn_engine.operator_norm(self, input_shape, tol, max_iter)

    def lipschitz(self, input_shape: Sequence[int] | None = None) -> float:
        """Eval-mode Lipschitz constant c·‖A‖₂/σ on inputs of ``input_shape``, certified
        (an upper bound of it; see :meth:`lipschitz_certificate`)."""
        return self._sn_engine.lipschitz(self, input_shape)

    def lipschitz_certificate(self, input_shape: Sequence[int] | None = None) -> NormCertificate:
        """Bounds lower ≤ c·‖A‖₂/σ ≤ upper on inputs of ``input_shape``, and how they were found."""
        return self._sn_engine.lipschitz_certificate(self, input_shape)

    def curvature_bound(self, input_shape: Sequence[int] | None = None) -> float:
        return 0.0

    def reset_parameters(self) -> None:
        super().reset_parameters()
        engine = SpectralNorm.of(self)
        if engine is not None:
            engine.clear(self)


class SpectralNormConv(_SNLayer):
    """Mixin: a ``nn.ConvNd`` whose applied weight is c·W/‖A‖₂ (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_conv_input(self, x)
        return self._conv_forward(x, self.weight * _sn_factor(self, x), self.bias)


class SNConv1d(SpectralNormConv, nn.Conv1d):
    """``nn.Conv1d`` normalised by its true operator norm (see :class:`SpectralNormConv`)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Conv1d.__init__(self, *args, **kwargs)
        SpectralNorm.attach(self, "conv")


class SNConv2d(SpectralNormConv, nn.Conv2d):
    """``nn.Conv2d`` normalised by its true operator norm (see :class:`SpectralNormConv`)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Conv2d.__init__(self, *args, **kwargs)
        SpectralNorm.attach(self, "conv")


class SNConv3d(SpectralNormConv, nn.Conv3d):
    """``nn.Conv3d`` normalised by its true operator norm (see :class:`SpectralNormConv`)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Conv3d.__init__(self, *args, **kwargs)
        SpectralNorm.attach(self, "conv")


class SNLinear(_SNLayer, nn.Linear):
    """``nn.Linear`` whose applied weight is c·W/σ, σ the matrix spectral norm of W (same
    engine and semantics as the convolutions; the input shape is (in_features,))."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Linear.__init__(self, *args, **kwargs)
        SpectralNorm.attach(self, "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_linear_input(self, x)
        return F.linear(x, self.weight * _sn_factor(self, x), self.bias)


def is_spectrally_normalized(module: nn.Module) -> bool:
    """True for SN layers and layers carrying :class:`InputSpectralNorm`."""
    return SpectralNorm.of(module) is not None


def spectral_input_shapes(model: nn.Module, x: torch.Tensor, settle: bool = False,
                          ) -> dict[nn.Module, tuple[int, ...]]:
    """Run ``model(x)`` (as the model's mode and grad mode are) and return the input shape each
    spectrally normalised layer saw first (per example, as :meth:`SpectralNorm.input_shape`).
    ``settle``: that shape becomes the layer's trained shape (:meth:`SpectralNorm.reset`)
    before its forward runs, so that σ is computed once per layer (an eval forward on a new
    shape would compute it for the eval cache first)."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        if module not in shapes:
            engine = SpectralNorm.of(module)
            shapes[module] = engine.input_shape(module, args[0])
            if settle:
                engine.reset(module, shapes[module])

    handles = [m.register_forward_pre_hook(record, prepend=True)
               for m in model.modules() if is_spectrally_normalized(m)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


class InputSpectralNorm:
    """Forward pre-hook applying f(c·x/σ) to an affine layer f that cannot be normalised
    through its weight: timm's ``Conv2dSame`` pads for the input size inside forward, and
    ``StdConv2d``/``ScaledStdConv2d`` standardise the weight, which would undo W/σ. For an
    affine f(x) = A x + b, f(x/σ) = A x/σ + b, so scaling the input normalises any of them
    while the layer keeps its class, its forward and its state_dict keys. σ = ‖A‖₂ on the
    layer's real input shape by the :class:`SpectralNorm` engine (kind ``"affine"``).

    Use :meth:`apply` to add it to a layer, :meth:`of` to find it, :meth:`remove` to take it
    off (the layer's own function is then restored).
    """

    @classmethod
    def apply(cls, module: nn.Module) -> InputSpectralNorm:
        """Normalise ``module`` (an affine layer with a ``weight``) in place; returns the hook."""
        if not isinstance(module, nn.Module) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(f"{layer_name(module)}: expected a layer with a weight tensor")
        if SpectralNorm.of(module) is not None:
            raise ValueError(f"{layer_name(module)}: already spectrally normalised")
        hook = cls()
        SpectralNorm.attach(module, "affine")
        module.register_forward_pre_hook(hook)
        return hook

    @staticmethod
    def of(module: nn.Module) -> InputSpectralNorm | None:
        """The hook on ``module``, or None."""
        return next((h for h in module._forward_pre_hooks.values() if isinstance(h, InputSpectralNorm)), None)

    enable_scale = staticmethod(enable_sn_scale)  # f(c·x/σ) with a learnable c (``sn_log_scale``)

    def remove(self, module: nn.Module) -> None:
        """Take the normalisation off ``module`` (its state buffers and scale too)."""
        for key in [k for k, h in module._forward_pre_hooks.items() if h is self]:
            del module._forward_pre_hooks[key]
        SpectralNorm.of(module).detach(module)

    def lipschitz(self, module: nn.Module, input_shape: Sequence[int] | None = None) -> float:
        """Eval-mode Lipschitz constant c·‖A‖₂/σ on inputs of ``input_shape`` (default: trained):
        certified on inputs of at most :data:`DENSE_LIMIT` elements, else an estimate (the
        layer's structure is unknown; see :meth:`lipschitz_certificate`)."""
        return SpectralNorm.of(module).lipschitz(module, input_shape)

    def lipschitz_certificate(self, module: nn.Module, input_shape: Sequence[int] | None = None
                              ) -> NormCertificate:
        return SpectralNorm.of(module).lipschitz_certificate(module, input_shape)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (x * _sn_factor(module, x), *args[1:])


def conv_operator_norm(
    conv: nn.modules.conv._ConvNd,
    spatial: Sequence[int],
    weight: torch.Tensor | None = None,
    tol: float = BOUND_TOL,
    max_iter: int = 2000,
) -> tuple[float, int, bool]:
    """Operator 2-norm of any ``nn.ConvNd`` (bias excluded) on inputs of shape (C, *spatial),
    float64 Lanczos on AᵀA to a Ritz residual ≤ ``tol``·σ²: (σ, applications, converged)."""
    w = (conv.weight if weight is None else weight).detach().double()
    op = ConvOperator(conv, spatial, w)
    return _bound_norm(op, _seeded_start(op.in_shape, w), tol, max_iter)


def conv_certificate(conv: nn.modules.conv._ConvNd, spatial: Sequence[int],
                     weight: torch.Tensor | None = None) -> NormCertificate:
    """Certified bounds of the operator 2-norm of any ``nn.ConvNd`` (bias excluded) on inputs
    of shape (C, *spatial): see :func:`certify` and :meth:`ConvOperator.torus_bound`."""
    return certify(ConvOperator(conv, spatial, (conv.weight if weight is None else weight).detach().double()))


def _bound_norm(op: Operator, v0: torch.Tensor, tol: float,
                max_iter: int) -> tuple[float, int, bool]:
    """The bounds' float64 ‖A‖₂ (restarted Lanczos on AᵀA): (σ, applications, converged)."""
    with torch.no_grad():
        sigma, used, ok, _ = linalg.operator_norm(_gram(op), v0, tol=tol, max_iter=max_iter)
    return sigma, used, ok
