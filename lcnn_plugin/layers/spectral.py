"""Spectral normalisation by the true operator norm of a layer on its real input shape.

A convolution is a linear operator A on inputs of shape (C, *spatial). torch's
``spectral_norm`` normalises by the norm of the weight reshaped to a (C_out, C_in·k·k)
matrix, which is not the norm of A (it under-estimates a random 3×3 conv by about 1.5×).
Here σ = ‖A‖₂ is estimated by power iteration with A (the layer's own padding, stride,
dilation and groups) and its exact adjoint Aᵀ, on the input shape the layer actually sees:

- zeros padding: Aᵀ is conv_transpose (with the output_padding that gives back the input
  size for every stride) followed by a crop;
- circular, reflect, replicate padding: the padding is a gather, so its adjoint is a
  scatter-add through the same index map. The operator norm is therefore exact, not a
  bound, for every padding mode (the reflect/replicate pads are part of A).

State: ``sn_v`` (the right singular vector, shape (1, C_in, *spatial), persistent so that a
saved model evaluates identically) and ``sn_sigma`` (the σ used in eval). 15 iterations
when the layer first sees an input shape (or a new one), then one warm-started iteration
per training forward; eval uses the frozen σ. Nothing in forward reads a tensor value on
the host, so there is no host-device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._lanczos import lanczos_extreme

_EPS = 1e-12

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


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm().clamp_min(_EPS)


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


class ConvOperator:
    """The bias-free linear map of a ``nn.ConvNd`` on inputs of a given spatial shape.

    ``forward(v)`` is exactly the layer without bias; ``adjoint(u)`` is its exact transpose.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, spatial: Sequence[int]) -> None:
        self.conv = conv
        self.nd = len(conv.kernel_size)
        self.spatial = tuple(int(s) for s in spatial)
        if len(self.spatial) != self.nd:
            raise ValueError(
                f"{layer_name(conv)}: expected {self.nd} spatial dims, got {self.spatial}"
            )
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
    def forward(self, v: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        w = c.weight if weight is None else weight
        return _CONV[self.nd](self._pad(v), w, None, c.stride, 0, c.dilation, c.groups)

    def adjoint(self, u: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        w = c.weight if weight is None else weight
        y = _CONV_T[self.nd](
            u, w, None, c.stride, 0, self.output_padding, c.groups, c.dilation
        )
        return self._pad_adjoint(y)

    def power_iteration(
        self, v: torch.Tensor, n_iter: int, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``n_iter`` steps of v ← AᵀAv/‖AᵀAv‖ (no grad). Returns the new unit v."""
        with torch.no_grad():
            for _ in range(n_iter):
                v = _normalize(self.adjoint(self.forward(v, weight), weight))
        return v


class _SpectralNormBase:
    """Shared bookkeeping of the spectral-norm layers (mixed into nn.ConvNd / nn.Linear)."""

    n_power_iterations_init: int = 15
    _sn_hold: bool = False  # True: training forwards use sn_v without stepping it

    def _init_sn_state(self, n_power_iterations_init: int) -> None:
        if n_power_iterations_init < 1:
            raise ValueError(
                f"{type(self).__name__}: n_power_iterations_init must be >= 1, "
                f"got {n_power_iterations_init}"
            )
        self.n_power_iterations_init = int(n_power_iterations_init)
        w = self.weight
        self.register_buffer("sn_v", torch.zeros(0, dtype=w.dtype, device=w.device))
        self.register_buffer("sn_sigma", torch.ones((), dtype=w.dtype, device=w.device))
        self.register_parameter("sn_log_scale", None)

    def enable_scale(self, scale: float | torch.Tensor) -> None:
        """Apply c·W/σ with a learnable c (see :func:`enable_sn_scale`)."""
        enable_sn_scale(self, scale)

    def _sn_factor(self, sigma: torch.Tensor) -> torch.Tensor:
        """c/σ, the factor the layer applies to its weight (see :func:`sn_factor`)."""
        return sn_factor(self.sn_log_scale, sigma)

    def _random_unit(self, shape: Sequence[int]) -> torch.Tensor:
        w = self.weight
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = torch.randn(*shape, generator=gen, dtype=torch.float64)
        return _normalize(v).to(device=w.device, dtype=w.dtype)

    def _sn_sigma_for_forward(self, v_update) -> torch.Tensor:
        """σ for this forward: one warm-started step with grad in training, frozen in eval."""
        if not self.training:
            return self.sn_sigma
        if not self._sn_hold:
            with torch.no_grad():
                self.sn_v.copy_(v_update(self.sn_v.detach()))
        # a copy: a later training forward (CURE, attacks) updates sn_v in place, and this
        # forward's graph must keep the v it used
        sigma = self._apply_operator(self.sn_v.clone()).norm()
        with torch.no_grad():
            self.sn_sigma.copy_(sigma)
        return sigma

    def normalized_weight(self) -> torch.Tensor:
        """The weight the layer applies in eval: c·W/σ with the frozen σ."""
        return self.weight * self._sn_factor(self.sn_sigma)

    def _load_sn_state(self, state_dict: dict, prefix: str) -> None:
        """Accept a saved ``sn_v`` of any spatial size (re-shape the buffer to it) and a saved
        ``sn_log_scale`` (create the parameter to receive it)."""
        if prefix + "sn_log_scale" in state_dict and self.sn_log_scale is None:
            self.enable_scale(1.0)
        key = prefix + "sn_v"
        if key in state_dict:
            saved = state_dict[key]
            if saved.numel() and not self._sn_v_compatible(saved):
                # e.g. timm adapting the first conv to another in_chans: recompute later.
                state_dict[key] = torch.zeros(0, dtype=saved.dtype)
                state_dict[prefix + "sn_sigma"] = torch.ones((), dtype=saved.dtype)
                saved = state_dict[key]
            self.sn_v = torch.empty_like(saved, device=self.sn_v.device, dtype=self.sn_v.dtype)


class SpectralNormConv(_SpectralNormBase):
    """Mixin: a ``nn.ConvNd`` whose applied weight is W/‖A‖₂ (see the module docstring)."""

    def _sn_v_compatible(self, saved: torch.Tensor) -> bool:
        return saved.dim() == 2 + len(self.kernel_size) and saved.shape[1] == self.in_channels

    def _operator(self, spatial: Sequence[int]) -> ConvOperator:
        op = getattr(self, "_sn_op", None)
        if op is None or op.spatial != tuple(spatial):
            op = ConvOperator(self, spatial)
            object.__setattr__(self, "_sn_op", op)  # not a submodule, not state
        return op

    def _apply_operator(self, v: torch.Tensor) -> torch.Tensor:
        return self._operator(v.shape[2:]).forward(v)

    def _check_input(self, x: torch.Tensor) -> None:
        nd = len(self.kernel_size)
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            dims = ("L",) if nd == 1 else ("H", "W") if nd == 2 else ("D", "H", "W")
            raise ValueError(
                f"{layer_name(self)}: expected input of shape (N, {self.in_channels}, "
                f"{', '.join(dims)}), got {tuple(x.shape)}"
            )

    def reset_power_iteration(self, spatial: Sequence[int], n_iter: int | None = None) -> None:
        """Start the power iteration afresh for inputs of this spatial shape."""
        n_iter = self.n_power_iterations_init if n_iter is None else n_iter
        op = self._operator(spatial)
        v = self._random_unit((1, self.in_channels, *op.spatial))
        v = op.power_iteration(v, n_iter)
        with torch.no_grad():
            self.sn_v = v
            self.sn_sigma.copy_(op.forward(v).norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if tuple(self.sn_v.shape[2:]) != tuple(x.shape[2:]) or self.sn_v.dim() != x.dim():
            self.reset_power_iteration(x.shape[2:])
        op = self._operator(x.shape[2:])
        sigma = self._sn_sigma_for_forward(lambda v: op.power_iteration(v, 1))
        return self._conv_forward(x, self.weight * self._sn_factor(sigma), self.bias)

    def operator_norm(
        self,
        spatial: Sequence[int] | None = None,
        weight: torch.Tensor | None = None,
        tol: float = 1e-10,
        max_iter: int = 2000,
    ) -> tuple[float, int, bool]:
        """‖A‖₂ of the raw weight (or ``weight``), run to convergence (:func:`conv_operator_norm`).

        Returns (σ, operator applications, converged); starts from ``sn_v`` when it has
        this shape. Krylov estimates approach σ from below; ``tol`` is relative, on σ².
        """
        spatial = tuple(self.sn_v.shape[2:]) if spatial is None else tuple(spatial)
        if not spatial:
            raise ValueError(
                f"{layer_name(self)}: no input shape known yet; pass spatial= or run a forward"
            )
        return conv_operator_norm(self, spatial, weight, tol, max_iter, self._warm_start(spatial))

    def _warm_start(self, spatial: tuple) -> torch.Tensor | None:
        if self.sn_v.numel() and tuple(self.sn_v.shape[2:]) == spatial:
            return self.sn_v.detach().clone()
        return None

    def lipschitz(self) -> float:
        """Eval-mode Lipschitz constant c·‖A‖₂/σ_frozen on the stored input shape."""
        sigma, _, _ = self.operator_norm()
        return sigma * float(self._sn_factor(self.sn_sigma).detach())

    def curvature_bound(self) -> float:
        return 0.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self._load_sn_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def conv_operator_norm(
    conv: nn.modules.conv._ConvNd,
    spatial: Sequence[int],
    weight: torch.Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 2000,
    v0: torch.Tensor | None = None,
) -> tuple[float, int, bool]:
    """Operator 2-norm of any ``nn.ConvNd`` (bias excluded) on inputs of shape (C, *spatial).

    Restarted Lanczos on AᵀA in float64 (cycles of 64 steps, each restarted from the last
    Ritz vector) until λ = σ² changes by at most ``tol`` (relative), or ``max_iter``
    operator applications. Returns (σ, applications of AᵀA, converged).
    """
    w = (conv.weight if weight is None else weight).detach().double()
    op = ConvOperator(conv, spatial)
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        v0 = torch.randn(1, conv.in_channels, *op.spatial, generator=gen, dtype=torch.float64)
    return gram_operator_norm(lambda t: op.adjoint(op.forward(t, w), w),
                              v0.detach().to(device=w.device, dtype=torch.float64), tol, max_iter)


def gram_operator_norm(
    gram: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, tol: float, max_iter: int
) -> tuple[float, int, bool]:
    """‖A‖₂ from its Gram operator AᵀA by restarted Lanczos (cycles of 64 steps, each
    restarted from the last Ritz vector) until λ = σ² changes by at most ``tol`` (relative)
    or ``max_iter`` applications. Returns (σ, applications of AᵀA, converged)."""
    v, used, lam_prev = v0, 0, None
    with torch.no_grad():
        while used < max_iter:
            res = lanczos_extreme(gram, v, max_steps=min(64, max_iter - used), tol=tol)
            used += res.steps
            v = res.vector
            lam = max(res.eigenvalue, 0.0)
            if res.converged and (lam_prev is None or abs(lam - lam_prev) <= tol * lam):
                return lam**0.5, used, True
            lam_prev = lam
    return lam_prev**0.5, used, False


class SNConv1d(SpectralNormConv, nn.Conv1d):
    """``nn.Conv1d`` normalised by its true operator norm (see :class:`SpectralNormConv`)."""

    def __init__(self, *args, n_power_iterations_init: int = 15, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._init_sn_state(n_power_iterations_init)


class SNConv2d(SpectralNormConv, nn.Conv2d):
    """``nn.Conv2d`` normalised by its true operator norm (see :class:`SpectralNormConv`)."""

    def __init__(self, *args, n_power_iterations_init: int = 15, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_sn_state(n_power_iterations_init)


class SNConv3d(SpectralNormConv, nn.Conv3d):
    """``nn.Conv3d`` normalised by its true operator norm (see :class:`SpectralNormConv`)."""

    def __init__(self, *args, n_power_iterations_init: int = 15, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Conv3d.__init__(self, *args, **kwargs)
        self._init_sn_state(n_power_iterations_init)


class SNLinear(_SpectralNormBase, nn.Linear):
    """``nn.Linear`` whose applied weight is W/σ, σ the matrix spectral norm of W.

    15 power iterations at construction (and on :meth:`reset_power_iteration`), one
    warm-started iteration per training forward, σ frozen in eval.
    """

    def __init__(self, *args, n_power_iterations_init: int = 15, **kwargs) -> None:  # noqa: ANN002,ANN003
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_sn_state(n_power_iterations_init)
        self.reset_power_iteration()

    def _sn_v_compatible(self, saved: torch.Tensor) -> bool:
        return saved.shape == (self.in_features,)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "sn_v"):
            self.reset_power_iteration()

    def _apply_operator(self, v: torch.Tensor) -> torch.Tensor:
        return self.weight @ v

    def reset_power_iteration(self, n_iter: int | None = None) -> None:
        n_iter = self.n_power_iterations_init if n_iter is None else n_iter
        v = self._random_unit((self.in_features,))
        with torch.no_grad():
            w = self.weight
            for _ in range(n_iter):
                v = _normalize(w.t() @ (w @ v))
            self.sn_v = v
            self.sn_sigma.copy_((w @ v).norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{layer_name(self)}: expected input of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        if self.sn_v.numel() == 0:
            self.reset_power_iteration()
        w = self.weight
        sigma = self._sn_sigma_for_forward(lambda v: _normalize(w.t() @ (w @ v)))
        return F.linear(x, self.weight * self._sn_factor(sigma), self.bias)

    def lipschitz(self) -> float:
        """Eval-mode Lipschitz constant: c·exact ‖W‖₂ (SVD) over the frozen σ."""
        w = self.weight.detach().double()
        return float(torch.linalg.matrix_norm(w, ord=2)) * float(self._sn_factor(self.sn_sigma).detach())

    def curvature_bound(self) -> float:
        return 0.0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self._load_sn_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
