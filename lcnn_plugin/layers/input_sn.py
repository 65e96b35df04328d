"""Spectral normalisation of any linear layer, applied to its input: y = layer(c·x/σ).

:class:`~lcnn_plugin.layers.SNConv2d` and :class:`~lcnn_plugin.layers.SNLinear` divide the
weight by σ. Layers whose forward does more than apply their weight cannot be normalised
that way: timm's ``Conv2dSame`` pads for the input size inside forward, and
``StdConv2d``/``ScaledStdConv2d`` standardise the weight, which would undo W/σ. For an
affine layer f(x) = A x + b, f(x/σ) = A x/σ + b, so scaling the input normalises any of
them while the layer keeps its class, its forward and its state_dict keys.

σ = ‖A‖₂ on the layer's real input shape, with A v = f(v) − f(0) and Aᵀu from autograd (no
knowledge of the layer's internals), by power iteration as in the SN layers: 15 iterations
on a new input shape, one warm-started iteration per training forward (σ differentiable in
the weights), frozen in eval. State lives on the layer: buffers ``sn_v`` and ``sn_sigma``,
and with :meth:`InputSpectralNorm.enable_scale` a learnable ``sn_log_scale`` (c).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .spectral import _EPS, _normalize, enable_sn_scale, gram_operator_norm, layer_name, sn_factor


def linear_map(module: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A v = f(v) − f(0) for an affine layer f (one call on a batch of two)."""
    out = module.forward(torch.cat([v, torch.zeros_like(v)]))
    return out[:1] - out[1:]


def adjoint_map(module: nn.Module, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Aᵀu for an affine layer f, by autograd at the point v (any point: A is constant)."""
    with torch.enable_grad():
        v = v.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(module.forward(v), v, u)
    return g


class InputSpectralNorm:
    """Forward pre-hook that applies f(c·x/σ); see the module docstring.

    Use :meth:`apply` to add it to a layer, :meth:`of` to find it, :meth:`remove` to take it
    off (the layer's own function is then restored).
    """

    def __init__(self, n_power_iterations_init: int = 15) -> None:
        if n_power_iterations_init < 1:
            raise ValueError(f"n_power_iterations_init must be >= 1, got {n_power_iterations_init}")
        self.n_power_iterations_init = int(n_power_iterations_init)

    # -- attaching ----------------------------------------------------------------------
    @classmethod
    def apply(cls, module: nn.Module, n_power_iterations_init: int = 15) -> InputSpectralNorm:
        """Normalise ``module`` (an affine layer with a ``weight``) in place; returns the hook."""
        if not isinstance(module, nn.Module) or not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise TypeError(f"{layer_name(module)}: expected a layer with a weight tensor")
        if cls.of(module) is not None:
            raise ValueError(f"{layer_name(module)}: already spectrally normalised")
        w = module.weight
        hook = cls(n_power_iterations_init)
        module.register_buffer("sn_v", torch.zeros(0, dtype=w.dtype, device=w.device))
        module.register_buffer("sn_sigma", torch.ones((), dtype=w.dtype, device=w.device))
        module.register_parameter("sn_log_scale", None)
        module.register_forward_pre_hook(hook)
        module.register_load_state_dict_pre_hook(InputSpectralNorm._load_pre_hook)
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
        hooks = module._load_state_dict_pre_hooks
        for key in [k for k, h in hooks.items() if h.hook is InputSpectralNorm._load_pre_hook]:
            del hooks[key]
        for name in ("sn_v", "sn_sigma", "sn_log_scale"):
            delattr(module, name)

    # -- the power iteration ------------------------------------------------------------
    @staticmethod
    def _v_shape(module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
        if isinstance(module, nn.Linear):
            return (1, module.in_features)  # per-token map: ‖A‖ does not depend on the rest
        return (1, *x.shape[1:])

    def reset_power_iteration(self, module: nn.Module, shape: tuple[int, ...]) -> None:
        """Start afresh for inputs of ``shape`` (batch dimension 1 included)."""
        w = module.weight
        gen = torch.Generator(device="cpu").manual_seed(0)
        v = _normalize(torch.randn(*shape, generator=gen, dtype=torch.float64)).to(w.device, w.dtype)
        with torch.no_grad():
            for _ in range(self.n_power_iterations_init):
                v = self._step(module, v)
            module.sn_v = v
            module.sn_sigma.copy_(linear_map(module, v).norm())

    @staticmethod
    def _step(module: nn.Module, v: torch.Tensor) -> torch.Tensor:
        """v ← (AᵀA + εI)v/‖·‖: the shift keeps v non-zero (and the iteration alive) while A = 0,
        e.g. a zero-initialised gain."""
        return _normalize(adjoint_map(module, v, linear_map(module, v)) + _EPS * v)

    def factor(self, module: nn.Module, sigma: torch.Tensor) -> torch.Tensor:
        """c/σ (see :func:`~lcnn_plugin.layers.spectral.sn_factor`)."""
        return sn_factor(module.sn_log_scale, sigma)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shape = self._v_shape(module, x)
        if tuple(module.sn_v.shape) != shape:
            self.reset_power_iteration(module, shape)
        if module.training:
            if not getattr(module, "_sn_hold", False):
                with torch.no_grad():
                    module.sn_v.copy_(self._step(module, module.sn_v))
            sigma = linear_map(module, module.sn_v.clone()).norm()
            with torch.no_grad():
                module.sn_sigma.copy_(sigma)
        else:
            sigma = module.sn_sigma
        return (x * self.factor(module, sigma).to(x.dtype), *args[1:])

    # -- bounds and state ---------------------------------------------------------------
    def lipschitz(self, module: nn.Module, tol: float = 1e-10, max_iter: int = 2000) -> float:
        """Eval-mode Lipschitz constant c·‖A‖₂/σ_frozen (‖A‖₂ by float64 Lanczos)."""
        if module.sn_v.numel() == 0:
            raise ValueError(f"{layer_name(module)}: no input shape known yet; run a forward first")
        m64 = copy.deepcopy(module).double()
        gram = lambda t: adjoint_map(m64, t, linear_map(m64, t))  # noqa: E731
        sigma, _, converged = gram_operator_norm(gram, module.sn_v.detach().double(), tol, max_iter)
        if not converged:
            raise ValueError(f"{layer_name(module)}: operator-norm estimate did not converge")
        return sigma * float(self.factor(module, module.sn_sigma.detach()))

    @staticmethod
    def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:  # noqa: ANN002
        saved = state_dict.get(prefix + "sn_v")
        if saved is not None:
            module.sn_v = torch.empty_like(saved, device=module.sn_v.device, dtype=module.sn_v.dtype)
        if prefix + "sn_log_scale" in state_dict and module.sn_log_scale is None:
            InputSpectralNorm.enable_scale(module, 1.0)
