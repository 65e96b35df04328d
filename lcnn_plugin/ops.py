"""One table of facts about the operations a model is built from, and one tracer.

For each torch/timm module class and each function or tensor method a traced graph can
call, the table says what the operation is (``role``), whether it is piecewise linear and
twice differentiable, how its Lipschitz constant L and second-derivative bound K are found
(``rule``) and what :func:`~lcnn_plugin.convert` does with it (``convert``, or why it is
``kept``). :mod:`~lcnn_plugin.bound`, :mod:`~lcnn_plugin.convert`, :mod:`~lcnn_plugin.fold`
and :mod:`~lcnn_plugin.curvature.piecewise` all read it, so they cannot disagree.

Facts of a class hold for that class, torch's own subclasses and subclasses that keep its
``forward``; any other subclass with a forward of its own (timm's BatchNormAct2d applies an
activation, Conv2dSame pads inside forward) matches only an entry of its own, or none
(unknown). Our own layers carry
their constants (``lipschitz()`` / ``curvature_bound()``, :mod:`lcnn_plugin.layers`); a
layer made of parts (``bound_chain()``, e.g. LipschitzBatchNormAct2d) is judged part by part
(:func:`parts`).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from .layers.activation import CenteredSoftplus
from .layers.norm import LipschitzBatchNorm2d, LipschitzBatchNormAct2d
from .layers.spectral import (
    InputSpectralNorm,
    NormCertificate,
    SNConv1d,
    SNConv2d,
    SNConv3d,
    SNLinear,
    conv_certificate,
    matrix_certificate,
)


@dataclass(frozen=True)
class Local:
    """Constants of one operation: Lipschitz L, curvature K, normalised N (None: unbounded)."""

    L: float | None
    K: float | None
    N: float | None


LINEAR = Local(1.0, 0.0, 0.0)  # norm-preserving rearrangements and projections (L ≤ 1)
PIECEWISE = Local(1.0, None, None)  # 1-Lipschitz, not twice differentiable

# A module's rule: (module, input shape with batch) -> its constants, the bounds of its norm
# (a linear map), or the reason it has none.
Rule = Callable[[nn.Module, Sequence[int]], "Local | NormCertificate | str"]


@dataclass(frozen=True)
class Op:
    """Facts about one kind of operation.

    role: rearrange, copy, linear, conv, batchnorm, pooling, padding, upsample, activation,
        gate, normalization, attention, scale, add, neg, concat, reduce, other.
    piecewise_linear: its output is piecewise linear in its input (in eval).
    smooth: twice differentiable everywhere.
    rule: its constants for :func:`~lcnn_plugin.model_bound`: a :class:`Local`, a
        :data:`Rule`, a string (why it has none), or None: the layer's own (``lipschitz()``,
        ``curvature_bound()``, ``lipschitz_certificate()``).
    convert: what :func:`~lcnn_plugin.convert` makes of it ("activation", "conv", "linear",
        "batchnorm", "pooling"; None: nothing).
    kept: (kind, reason) reported by convert for a module it leaves uncontrolled; None when
        there is nothing to report (linear and bounded).
    """

    role: str
    piecewise_linear: bool
    smooth: bool
    rule: Local | Rule | str | None
    convert: str | None = None
    kept: tuple[str, str] | None = None

    @property
    def linear(self) -> bool:
        return self.piecewise_linear and self.smooth


def _pair(v: Any, n: int = 2) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


# --- rules -----------------------------------------------------------------------------------

def _pool_axis_norm(size: int, pool: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Exact 2-norm of a 1-D averaging operator, built by pooling the identity."""
    eye = torch.eye(size, dtype=torch.float64).view(size, 1, 1, size)
    mat = pool(eye).reshape(size, -1)
    return float(torch.linalg.matrix_norm(mat, ord=2))


def _avg_pool(m: nn.Module, shape: Sequence[int]) -> Local | str:
    if len(shape) != 4:
        return f"{type(m).__name__}: only 2-D average pooling is bounded"
    h, w = shape[-2:]
    if isinstance(m, nn.AdaptiveAvgPool2d):
        oh, ow = _pair(m.output_size)
        oh, ow = oh or h, ow or w
        return Local(_pool_axis_norm(h, lambda t: F.adaptive_avg_pool2d(t, (1, oh)))
                     * _pool_axis_norm(w, lambda t: F.adaptive_avg_pool2d(t, (1, ow))), 0.0, 0.0)
    if m.divisor_override:
        return "AvgPool2d with divisor_override is not supported"
    k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
    norm = 1.0
    for axis, n in enumerate((h, w)):
        norm *= _pool_axis_norm(n, lambda t, a=axis: F.avg_pool2d(
            t, (1, k[a]), (1, s[a]), (0, p[a]), m.ceil_mode, m.count_include_pad))
    return Local(norm, 0.0, 0.0)


def _max_pool(m: nn.Module, shape: Sequence[int]) -> Local | str:
    if not isinstance(m, nn.MaxPool2d) or _pair(m.dilation) != (1, 1):
        return f"no bound is known for {type(m).__name__}"
    # |max_w x − max_w y| ≤ max_{i∈w} |x_i − y_i|, each input in ≤ ⌈k/s⌉² windows
    k, s = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
    return Local(math.sqrt(math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1])), None, None)


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, shape: Sequence[int]) -> Local | str:
    if m.running_var is None:
        return "BatchNorm without running statistics is not Lipschitz-bounded in eval"
    inv = torch.rsqrt(m.running_var.double() + m.eps)
    if m.affine:
        inv = inv * m.weight.detach().double().abs()
    return Local(float(inv.max()), 0.0, 0.0)


def _upsample(m: nn.Upsample, shape: Sequence[int]) -> Local | str:
    factors = m.scale_factor
    if m.mode == "nearest" and factors is not None:
        factors = _pair(factors, len(shape) - 2)
        if all(float(f).is_integer() for f in factors):  # each input copied Π fᵢ times
            return Local(math.sqrt(math.prod(factors)), 0.0, 0.0)
    return "Upsample: only nearest upsampling by integer factors is bounded"


def _conv(m: nn.modules.conv._ConvNd, shape: Sequence[int]) -> NormCertificate:
    return conv_certificate(m, shape[2:])


def _linear(m: nn.Linear, shape: Sequence[int]) -> NormCertificate:
    return matrix_certificate(m.weight)


def _leaky(m: nn.LeakyReLU, shape: Sequence[int]) -> Local:
    return Local(max(1.0, abs(m.negative_slope)), None, None)


def _softplus(m: nn.Softplus, shape: Sequence[int]) -> Local:
    return Local(1.0, m.beta / 4.0, float(m.beta))


SIGMOID = Local(0.25, 1.0 / (6.0 * math.sqrt(3.0)), 1.0)  # max |σ'|, max |σ''|
TANH = Local(1.0, 4.0 / (3.0 * math.sqrt(3.0)), 2.0)  # max |tanh'|, max |tanh''|


# --- modules ---------------------------------------------------------------------------------

def _timm_classes(module: str, names: Sequence[str]) -> tuple[type, ...]:
    try:
        mod = __import__(module, fromlist=["_"])
    except ImportError:
        return ()
    return tuple(c for c in (getattr(mod, n, None) for n in names) if isinstance(c, type))


_GATE_WHY = "gate kept (multiplies input-dependent features: not Lipschitz-controlled)"
_NORM_WHY = "divides by input-dependent statistics: not Lipschitz-controlled"
NO_BOUND = "no bound is known"
_MAXPOOL = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)

# (classes, facts), most specific first
MODULES: list[tuple[tuple[type, ...], Op]] = [
    # our layers: constants from the layer itself
    ((SNConv1d, SNConv2d, SNConv3d), Op("conv", True, True, None)),
    ((SNLinear,), Op("linear", True, True, None)),
    # LipschitzBatchNormAct2d: the facts of its first part, the BatchNorm (see parts())
    ((LipschitzBatchNorm2d, LipschitzBatchNormAct2d), Op("batchnorm", True, True, None)),
    ((CenteredSoftplus,), Op("activation", False, True, None)),
    # torch and timm
    ((nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd, nn.PixelShuffle,
      nn.PixelUnshuffle) + _timm_classes("timm.layers", ("DropPath", "DropBlock2d", "PatchDropout")),
     Op("rearrange", True, True, LINEAR)),
    ((nn.modules.padding._ConstantPadNd,), Op("padding", True, True, LINEAR)),
    ((nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd),
     Op("padding", True, True, f"{NO_BOUND} for reflect/replicate padding modules")),
    ((nn.modules.conv._ConvTransposeNd,),
     Op("conv", True, True, "transposed convolutions are not supported by the bound",
        kept=("conv", "transposed convolutions get no spectral norm"))),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), Op("conv", True, True, _conv, convert="conv")),
    ((nn.Linear,), Op("linear", True, True, _linear, convert="linear")),
    ((nn.modules.batchnorm._BatchNorm,), Op("batchnorm", True, True, _batchnorm, convert="batchnorm")),
    ((nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.modules.pooling._AvgPoolNd,
      nn.modules.pooling._AdaptiveAvgPoolNd), Op("pooling", True, True, _avg_pool)),
    ((nn.MaxPool2d,), Op("pooling", True, False, _max_pool, convert="pooling",
                         kept=("pooling", "Lipschitz but not twice differentiable, curvature unbounded"))),
    (_MAXPOOL, Op("pooling", True, False, _max_pool,
                  kept=("pooling", "Lipschitz but not twice differentiable, curvature unbounded"))),
    ((nn.Upsample,), Op("upsample", True, True, _upsample)),
    ((nn.ReLU6,), Op("activation", True, False, PIECEWISE, convert="activation")),
    ((nn.Hardtanh,), Op("activation", True, False, PIECEWISE,
                        kept=("activation", "Hardtanh: piecewise linear, not converted"))),
    ((nn.ReLU,), Op("activation", True, False, PIECEWISE, convert="activation")),
    ((nn.LeakyReLU,), Op("activation", True, False, _leaky, convert="activation")),
    ((nn.PReLU, nn.RReLU) + _timm_classes("timm.layers.activations", ("PReLU",)),
     Op("activation", True, False, f"{NO_BOUND} for learnable or random slopes", convert="activation")),
    ((nn.Softplus,), Op("activation", False, True, _softplus, convert="activation")),
    ((nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.ELU, nn.CELU, nn.SELU)
     + _timm_classes("timm.layers.activations",
                     ("GELU", "GELUTanh", "QuickGELU", "Swish", "HardSwish", "Mish", "HardMish"))
     + _timm_classes("timm.layers.activations_me", ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe")),
     Op("activation", False, False, NO_BOUND, convert="activation")),
    ((nn.Sigmoid,) + _timm_classes("timm.layers.activations", ("Sigmoid",)),
     Op("gate", False, True, SIGMOID, kept=("gate", _GATE_WHY))),
    ((nn.Tanh,) + _timm_classes("timm.layers.activations", ("Tanh",)),
     Op("gate", False, True, TANH, kept=("gate", _GATE_WHY))),
    ((nn.Hardsigmoid,) + _timm_classes("timm.layers.activations", ("HardSigmoid",))
     + _timm_classes("timm.layers.activations_me", ("HardSigmoidMe",)),
     Op("gate", True, False, NO_BOUND, kept=("gate", _GATE_WHY))),
    ((nn.GLU, nn.Softmax), Op("gate", False, True, NO_BOUND, kept=("gate", _GATE_WHY))),
    ((nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.instancenorm._InstanceNorm)
     + tuple(c for c in (getattr(nn, "RMSNorm", None),) if c)
     + _timm_classes("timm.layers", ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d")),
     Op("normalization", False, True, NO_BOUND, kept=("normalization", _NORM_WHY))),
    ((nn.MultiheadAttention,), Op("attention", False, True, NO_BOUND,
                                  kept=("attention", "softmax of input-dependent scores, not "
                                        "Lipschitz-controlled"))),
    # traced through by torch.fx (its pooling functions are judged); max or average by a setting
    (_timm_classes("timm.layers", ("SelectAdaptivePool2d",)), Op("pooling", True, False, NO_BOUND)),
]

# modules known to convert by class name only (timm classes whose import path moves between releases)
NAMED: dict[str, Op] = {
    name: Op("attention", False, True, NO_BOUND,
             kept=("attention", "softmax of input-dependent scores, not Lipschitz-controlled"))
    for name in ("Attention", "MultiQueryAttentionV2", "AttentionPool2d")
} | {
    name: Op("scale", True, True, NO_BOUND,
             kept=("scale", "learnable per-channel scale γ, not normalised (Lipschitz max |γ|)"))
    for name in ("LayerScale", "LayerScale2d", "Scale")
} | {
    "CondConv2d": Op("conv", False, True, NO_BOUND,
                     kept=("conv", "input-dependent (routed) weights, no spectral norm")),
    # BatchNorm, then its drop and act (traced through: its parts are judged)
    "BatchNormAct2d": Op("batchnorm", False, False, NO_BOUND, convert="batchnorm"),
}


def reason(rule: str, name: str) -> str:
    """The words of a rule that is a reason, for the operation called ``name``."""
    return f"{NO_BOUND} for {name}" if rule == NO_BOUND else rule


def _inherits(t: type, cls: type) -> bool:
    """``t`` shares the facts of ``cls``: a subclass that keeps its forward, or one of torch's
    own (nn.Dropout of _DropoutNd, nn.SyncBatchNorm of _BatchNorm)."""
    return issubclass(t, cls) and (t.forward is cls.forward or t.__module__.startswith("torch.nn."))


def module_op(m: nn.Module) -> Op | None:
    """The facts of ``m``'s class (None: not in the table). A subclass from outside torch
    that overrides ``forward`` inherits nothing: it matches only its own entry."""
    t = type(m)
    for classes, op in MODULES:
        if t in classes:
            return op
    for classes, op in MODULES:
        if any(_inherits(t, cls) for cls in classes):
            return op
    return NAMED.get(t.__name__)


def kind_of(m: nn.Module) -> Op | None:
    """The entry of the nearest class in the table that ``m`` is an instance of, whatever its
    forward (timm's LayerNorm2d is a LayerNorm): what kind of module it is, for reports and
    for :func:`~lcnn_plugin.convert`; its facts (rule, piecewise linear) are
    :func:`module_op`'s."""
    op = module_op(m)
    if op is not None:
        return op
    for classes, op in MODULES:
        if isinstance(m, classes):
            return op
    return None


def parts(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parts of a layer in the order it applies them: ``bound_chain()`` where the layer
    has one (LipschitzBatchNormAct2d: BN, drop, act), else the layer alone."""
    chain = getattr(m, "bound_chain", None)
    return chain() if chain is not None else [("", m)]


def layer_op(m: nn.Module) -> Op | None:
    """The facts of one part (see :func:`parts`): an affine layer normalised on its input
    (:class:`~lcnn_plugin.layers.InputSpectralNorm`) is a linear layer with its own constants."""
    if InputSpectralNorm.of(m) is not None:
        return Op("linear", True, True, None)
    return module_op(m)


# --- functions and tensor methods ------------------------------------------------------------

def _fn(role: str, pl: bool, smooth: bool, rule: Local | str, names: str) -> dict[str, Op]:
    op = Op(role, pl, smooth, rule)
    return dict.fromkeys(names.split(), op)


FUNCTIONS: dict[str, Op] = {
    **_fn("rearrange", True, True, LINEAR,
          "view reshape flatten permute transpose contiguous squeeze unsqueeze float double to clone "
          "split chunk unbind dropout getitem"),
    **_fn("copy", True, True, LINEAR, "expand expand_as broadcast_to repeat"),
    **_fn("add", True, True, LINEAR, "add sub iadd isub"),
    **_fn("scale", True, True, LINEAR, "mul truediv div imul itruediv"),
    **_fn("neg", True, True, LINEAR, "neg"),
    **_fn("concat", True, True, LINEAR, "cat concat"),
    **_fn("reduce", True, True, LINEAR, "mean sum"),
    **_fn("padding", True, True, LINEAR, "pad"),
    **_fn("pooling", True, True, NO_BOUND, "avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d "
          "adaptive_avg_pool2d adaptive_avg_pool3d"),
    **_fn("pooling", True, False, NO_BOUND, "max_pool1d max_pool2d max_pool3d adaptive_max_pool1d "
          "adaptive_max_pool2d adaptive_max_pool3d max_pool1d_with_indices max_pool2d_with_indices "
          "max_pool3d_with_indices adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices"),
    **_fn("activation", True, False, PIECEWISE, "relu relu_ relu6 hardtanh"),
    **_fn("activation", True, False, NO_BOUND, "leaky_relu hardsigmoid clamp clip"),
    **_fn("activation", False, True, SIGMOID, "sigmoid"),
    **_fn("activation", False, True, TANH, "tanh"),
    **_fn("activation", False, False, NO_BOUND, "gelu silu mish hardswish elu selu celu erf"),
    **_fn("activation", False, True, NO_BOUND, "softplus softmax log_softmax glu"),
    **_fn("normalization", False, True, NO_BOUND, "layer_norm group_norm batch_norm rms_norm normalize"),
    **_fn("attention", False, True, NO_BOUND, "scaled_dot_product_attention"),
}

DIVISIONS = frozenset({"truediv", "div", "itruediv"})  # the "scale" operations that divide

# functional nonlinearities: what convert reports when a module's own forward calls them
NONLINEAR_FUNCTIONS = frozenset(name for name, op in FUNCTIONS.items() if not op.linear)


def function_name(target: Any) -> str | None:
    """The name a graph target is known by in :data:`FUNCTIONS`: a tensor method's name, or
    the ``__name__`` of a function of torch or of :mod:`operator`; None for anything else (a
    user's function that happens to share a name is not torch's)."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if module in ("_operator", "operator") or module.startswith("torch") or module == "" and name:
        return name
    return None


def function_op(target: Any) -> Op | None:
    """The facts of a call_function / call_method target (None: not in the table)."""
    name = function_name(target)
    return None if name is None else FUNCTIONS.get(name)


def basic_index(index: Any) -> bool:
    """A ``getitem`` index of ints, slices, None and Ellipsis only: it selects, never copies."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


# --- the tracer ------------------------------------------------------------------------------

class Tracer(torch.fx.Tracer):
    """torch.fx's tracer with our layers (and layers normalised on their input) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if hasattr(m, "lipschitz") and hasattr(m, "curvature_bound") or InputSpectralNorm.of(m):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, who: str = "") -> torch.fx.GraphModule:
    """``model`` as a GraphModule (a single leaf layer is wrapped so that it is one call).
    Raises ValueError naming the model (and ``who`` asked) when torch.fx cannot trace it."""
    tracer = Tracer()
    if tracer.is_leaf_module(model, ""):
        model = nn.Sequential(model)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is reported, not hidden
        prefix = f"{who}: " if who else ""
        raise ValueError(f"{prefix}{type(model).__name__} cannot be traced by torch.fx ({e})") from e
    return torch.fx.GraphModule(model, graph)


__all__ = [
    "DIVISIONS", "FUNCTIONS", "LINEAR", "Local", "MODULES", "NAMED", "NO_BOUND", "NONLINEAR_FUNCTIONS",
    "Op", "Tracer", "basic_index", "function_op", "kind_of", "layer_op", "module_op", "parts", "reason",
    "trace",
]


# -- second derivatives ------------------------------------------------------------------------
# Curvature (Hessian-vector products) and the gradient penalties (GradReg, CURE) differentiate a
# model twice. Two torch operations have no double backward: hardsigmoid (MobileNetV3, GhostNet,
# LCNet gates) and the fused CPU attention kernel (ViT, DeiT, MobileViT); within
# :func:`second_derivatives` they are computed by equivalents that have one, with the same values.
_NO_SECOND = re.compile(r"derivative for (\S+) is not implemented"
                        r"|forward AD with (\S+) that does not support")


class _TwiceDifferentiable(TorchFunctionMode):
    """hardsigmoid(x) as relu6(x + 3) / 6: torch's own formula (the same values, bit for bit, and
    the same zero derivative at ±3), made of operations with a double backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001,ANN204
        if func is F.hardsigmoid:
            return F.relu6(args[0] + 3) / 6
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def second_derivatives() -> Iterator[None]:
    """Within: hardsigmoid computed as relu6(x + 3) / 6, and scaled_dot_product_attention by
    its math kernel (the fused kernels have no double backward). A per-op Python hook: used
    only where a model needs it (:func:`twice`)."""
    with sdpa_kernel(SDPBackend.MATH), _TwiceDifferentiable():
        yield


def no_second_derivative(err: BaseException) -> str | None:
    """The operation named by torch's "derivative for OP is not implemented" (or "forward AD
    with OP that does not support it", torch.func), else None."""
    m = _NO_SECOND.search(str(err)) if isinstance(err, RuntimeError) else None
    return (m.group(1) or m.group(2)) if m else None


def twice(fn: Callable[[], Any], who: str, reset: Callable[[], None] | None = None) -> Any:
    """``fn()``; if it fails for an operation without a second derivative, ``reset()`` then
    ``fn()`` again within :func:`second_derivatives`; if that fails alike, a ValueError naming
    the operation and ``who`` asked."""
    return _with_equivalents(fn, who, reset)[0]


def second_derivative_mode(probe: Callable[[], Any], who: str
                           ) -> Callable[[], contextlib.AbstractContextManager]:
    """What to run a model's double backwards in (called once per use): ``nullcontext`` when
    ``probe()`` runs as it is, :func:`second_derivatives` when it runs only within it; else a
    ValueError (as :func:`twice`)."""
    return second_derivatives if _with_equivalents(probe, who)[1] else contextlib.nullcontext


def _with_equivalents(fn: Callable[[], Any], who: str, reset: Callable[[], None] | None = None
                      ) -> tuple[Any, bool]:
    """(``fn()``, False), or (``fn()`` within :func:`second_derivatives`, True) after
    ``reset()`` when torch has no second derivative of an operation it ran into."""
    try:
        return fn(), False
    except RuntimeError as e:
        if no_second_derivative(e) is None:
            raise
    if reset is not None:
        reset()
    with second_derivatives():
        try:
            return fn(), True
        except RuntimeError as e:
            _refuse(e, who)


def _refuse(err: RuntimeError, who: str) -> NoReturn:
    op = no_second_derivative(err)
    if op is None:
        raise err
    raise ValueError(f"{who} differentiates the model twice, and torch has no second derivative of {op}, "
                     "which the model uses (hardsigmoid and fused attention are replaced by equivalents "
                     "that have one; this operation has none)") from err
