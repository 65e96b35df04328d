"""Retrofit any timm (or plain torch) model into a low-curvature network.

``model, report = lcnn_plugin.convert(model)`` returns a converted **copy** (``inplace=True``
converts the model itself) and a :class:`ConversionReport` that lists every change and
every part left uncontrolled, with the reason:

- activation modules (torch's ReLU, ReLU6, LeakyReLU, GELU, SiLU, Hardswish, Mish, ELU, CELU,
  SELU, Softplus, PReLU, RReLU; timm's GELU, GELUTanh, QuickGELU, Swish, HardSwish, Mish,
  HardMish, PReLU and their memory-efficient twins; the ``.act`` of timm's norm-act layers)
  become :class:`~lcnn_plugin.layers.CenteredSoftplus`. Gates (sigmoid, hard-sigmoid,
  tanh, GLU) stay and are reported.
- ``nn.Conv1d/2d/3d`` and ``nn.Linear`` become :class:`~lcnn_plugin.layers.SNConv2d` (etc.)
  and :class:`~lcnn_plugin.layers.SNLinear` (operator-norm spectral normalisation, same
  state_dict keys plus ``sn_v``/``sn_sigma``). Their subclasses (timm's Conv2dSame,
  StdConv2d, ScaledStdConv2d, Linear, ...) keep their class and get
  :class:`~lcnn_plugin.layers.InputSpectralNorm`: f(x/σ) with σ the operator norm of the
  layer's own forward. The convs inside MixedConv2d are ordinary convs and are converted.
- ``nn.BatchNorm2d`` and timm's ``BatchNormAct2d`` (with running statistics) become
  :class:`~lcnn_plugin.layers.LipschitzBatchNorm2d` / ``LipschitzBatchNormAct2d``, keeping
  statistics and affine parameters.
- ``max_pool="avg"`` replaces max-pooling (not twice differentiable) by average pooling.

Everything else (LayerNorm, GroupNorm, attention, gates, CondConv, other BatchNorms,
parameters used directly in a forward, and functional nonlinearities such as ``F.relu`` or
``F.scaled_dot_product_attention`` called inside a module's forward, found by recording one
forward on ``example_input``) stays as it is and is listed; ``strict=True`` raises
:class:`ConversionError` naming each such module instead, before anything is changed.

``preserve_function=True`` (for pretrained models) keeps the outputs: activations get a
large β (``s0`` is within log 2/β of ReLU everywhere), every spectrally normalised layer a
learnable scale c = σ (``sn_log_scale``; the LCNN objective's λ_γ·Σ|log| term pulls it
toward 1 as it does γ), every γ-BN a γ at least its Lipschitz constant. The report gives the
measured agreement with the original on ``example_input``. Only ReLU is reproduced this
way; other activations change the function (their report entries say so).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import ops
from . import validate as check
from .bound import ModelBound, grouped, model_bound
from .layers.activation import CenteredSoftplus
from .layers.norm import LipschitzBatchNorm2d, LipschitzBatchNormAct2d
from .layers.spectral import (
    InputSpectralNorm,
    SNConv1d,
    SNConv2d,
    SNConv3d,
    SNLinear,
    SpectralNorm,
    enable_sn_scale,
    is_spectrally_normalized,
    spectral_input_shapes,
)

__all__ = ["ConversionError", "ConversionReport", "PRESERVE_BETA", "convert", "strip"]

PRESERVE_BETA = 1000.0  # β of preserve_function: |s0(x) − relu(x)| ≤ log 2/β ≈ 7e-4


_SN_CLASSES = {nn.Conv1d: SNConv1d, nn.Conv2d: SNConv2d, nn.Conv3d: SNConv3d}
_LCNN_LAYERS = (CenteredSoftplus, LipschitzBatchNorm2d)


class ConversionError(ValueError):
    """A model that cannot be converted as asked (strict mode, already converted, bad input)."""


@dataclass
class Change:
    path: str
    kind: str  # activation, conv, linear, batchnorm, pooling
    source: str
    target: str
    note: str = ""


@dataclass
class Kept:
    path: str
    kind: str  # gate, normalization, attention, pooling, batchnorm, conv, parameters, functional, ...
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` changed and what it left, with the bounds after conversion."""

    model: str
    changes: list[Change] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    bound: ModelBound | None = None
    bound_error: str | None = None  # why there is no bound (None when bound is set)
    agreement: dict[str, float] | None = None  # preserve_function: measured on example_input
    warnings: list[str] = field(default_factory=list)  # legal but probably not meant

    def counts(self) -> dict[str, dict[str, int]]:
        """{"converted": {kind: n}, "kept": {kind: n}}."""
        return dict(converted=dict(Counter(c.kind for c in self.changes)),
                    kept=dict(Counter(k.kind for k in self.kept)))

    def as_dict(self) -> dict[str, Any]:
        return dict(
            model=self.model, counts=self.counts(), settings=self.settings,
            changes=[vars(c) for c in self.changes], kept=[vars(k) for k in self.kept],
            bound=None if self.bound is None else self.bound.as_dict(),
            bound_error=self.bound_error, agreement=self.agreement, warnings=self.warnings,
        )

    def __str__(self) -> str:
        counts = self.counts()
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"  # noqa: E731
        lines = [f"Conversion of {self.model}:",
                 f"  converted: {fmt(counts['converted'])}",
                 f"  left as is: {fmt(counts['kept'])}"]
        lines += [f"    {line}" for line in grouped([(k.path, f"[{k.kind}] {k.reason}") for k in self.kept])]
        notes = [(c.path, f"{c.source} -> {c.target}: {c.note}") for c in self.changes if c.note]
        if notes:
            lines.append("  notes:")
            lines += [f"    {line}" for line in grouped(notes)]
        if self.agreement is not None:
            a = self.agreement
            lines.append(f"  agreement with the original on {a['n_examples']} examples: top-1 "
                         f"{100 * a['top1_agreement']:.2f}%, max |Δ output| {a['max_abs_diff']:.3g} "
                         f"(relative {a['rel_diff']:.3g})")
        if self.bound is not None:
            lines += ["  " + line for line in str(self.bound).splitlines()]
        else:
            lines.append(f"  bounds: {self.bound_error}")
        return "\n".join(lines)


# --- planning ------------------------------------------------------------------------------

def _is_converted(m: nn.Module) -> bool:
    return isinstance(m, _LCNN_LAYERS) or is_spectrally_normalized(m)


def _kept_reason(m: nn.Module, opts: dict[str, Any]) -> tuple[str, str] | None:
    """(kind, reason) for a module that stays uncontrolled, None if it needs no report."""
    name = type(m).__name__
    if not opts["spectral_norm"] and isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return "linear" if isinstance(m, nn.Linear) else "conv", f"{name}: spectral_norm=False"
    if not opts["lipschitz_bn"] and isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batchnorm", f"{name}: lipschitz_bn=False"
    op = ops.kind_of(m)
    if op is not None and op.kept is not None:
        kind, why = op.kept
        if op.convert == "pooling" and opts["max_pool"] == "keep":
            why += " (max_pool='avg' replaces it)"
        return kind, f"{name}: {why}"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) or "BatchNorm" in name:
        why = "no running statistics" if getattr(m, "running_var", 0) is None else \
            "only BatchNorm2d and timm's BatchNormAct2d are converted"
        return "batchnorm", f"{name}: {why}"
    if op is not None or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and not len(m._modules):
        return None  # known with nothing to report (linear and bounded), or an empty container
    own = [n for n, p in m._parameters.items() if p is not None]
    if own and len(m._modules):
        return "parameters", f"{name} uses parameters {', '.join(own)} in its own forward: not controlled"
    if own:
        return "other", f"{name} (parameters {', '.join(own)}): no conversion known"
    if not len(m._modules):
        return "other", f"{name}: parameter-free module of unknown kind, not analysed"
    return None


@dataclass
class _Plan:
    convert: dict[str, str]  # path -> kind of conversion
    kept: list[Kept]
    excluded: list[str]


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == r or r == "" or path.startswith(r + ".") for r in roots)


def _make_plan(model: nn.Module, opts: dict[str, Any], exclude: Sequence[str],
               allow_converted: bool) -> _Plan:
    convert: dict[str, str] = {}
    kept: list[Kept] = []
    excluded: list[str] = []
    opaque: list[str] = []  # modules whose insides are not converted (attention, excluded, ours)
    for path, m in model.named_modules():
        if _under(path, opaque):
            continue
        if any(fnmatch.fnmatchcase(path, pat) for pat in exclude):
            excluded.append(path)
            opaque.append(path)
            kept.append(Kept(path, "excluded", f"{type(m).__name__}: excluded by the caller"))
            continue
        if _is_converted(m):
            if not allow_converted:
                raise ConversionError(
                    f"model is already converted ({path or '<model>'} is {type(m).__name__}); converting "
                    "twice would normalise twice. Pass allow_converted=True to convert only the plain "
                    "layers that remain (for instance a new head after reset_classifier)")
            opaque.append(path)
            continue
        t = type(m)
        op = ops.kind_of(m)
        action = op.convert if op is not None else None
        if action == "activation":
            convert[path] = "activation"
        elif opts["lipschitz_bn"] and (t is nn.BatchNorm2d and m.track_running_stats
                                       or t.__name__ == "BatchNormAct2d" and m.running_var is not None):
            convert[path] = "batchnorm"
        elif opts["spectral_norm"] and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) \
                and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            # subclasses too: one with its own forward keeps it and is normalised on its input
            convert[path] = "linear" if isinstance(m, nn.Linear) else "conv"
        elif action == "pooling" and opts["max_pool"] == "avg" and t is nn.MaxPool2d \
                and m.dilation in (1, (1, 1)) and not m.return_indices:
            convert[path] = "pooling"
        else:
            reason = _kept_reason(m, opts)
            if reason is not None:
                kept.append(Kept(path, *reason))
            if isinstance(m, nn.MultiheadAttention):
                opaque.append(path)  # MultiheadAttention applies its Linear weights functionally
    return _Plan(convert, kept, excluded)


# --- the example forward: reference outputs and functional nonlinearities -----------------

class _FunctionalRecorder(TorchFunctionMode):
    def __init__(self, stack: list[str], found: dict[str, set[str]]) -> None:
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = getattr(func, "__name__", "")
        if self.stack and name.lstrip("_") in ops.NONLINEAR_FUNCTIONS:
            self.found.setdefault(self.stack[-1], set()).add(name.lstrip("_"))
        return func(*args, **(kwargs or {}))


def _record_forward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, set[str]]]:
    """Eval forward (no grad): (output, {module path: functional nonlinearities it called})."""
    paths = {id(m): p for p, m in model.named_modules()}
    stack: list[str] = []
    found: dict[str, set[str]] = {}

    def pre(m: nn.Module, args: Any) -> None:
        if id(m) in paths:
            stack.append(paths[id(m)])

    def post(m: nn.Module, args: Any, out: Any) -> None:
        if id(m) in paths and stack:
            stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
             nn.modules.module.register_module_forward_hook(post)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _FunctionalRecorder(stack, found):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return _logits(out), found


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], torch.Tensor):
        return out[-1]  # features_only models: the last feature map
    raise ConversionError(f"the model's forward returned {type(out).__name__}, expected a tensor")


# --- building the new modules ---------------------------------------------------------------

def _new_bn(old: nn.Module, gamma: float, preserve: bool) -> LipschitzBatchNorm2d:
    kw = dict(affine=old.affine, eps=old.eps, momentum=old.momentum)
    if type(old).__name__ == "BatchNormAct2d":
        new = LipschitzBatchNormAct2d(old.num_features, act=old.act, drop=old.drop, **kw)
    else:
        new = LipschitzBatchNorm2d(old.num_features, **kw)
    new.load_state_dict(old.state_dict(), strict=False)
    new.to(device=old.running_var.device, dtype=old.running_var.dtype)
    if preserve:  # γ ≥ L_bn: the clip min(1, γ/L_bn) is 1
        with torch.no_grad():
            gamma = max(gamma, float(new.bn_lipschitz()) * (1 + 1e-6))
    with torch.no_grad():
        new.log_gamma.fill_(math.log(gamma))
    return new


def _new_sn(old: nn.Module) -> nn.Module:
    t = type(old)
    if t is nn.Linear:
        new = SNLinear(old.in_features, old.out_features, bias=old.bias is not None,
                       device=old.weight.device, dtype=old.weight.dtype)
    elif t in _SN_CLASSES:
        new = _SN_CLASSES[t](
            old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
            dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
            padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)
    else:  # a subclass with its own forward: normalise its input, keep the layer
        InputSpectralNorm.apply(old)
        return old
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    return new


def _new_module(kind: str, old: nn.Module, opts: dict[str, Any]) -> tuple[nn.Module, str]:
    """(replacement, note) for one planned conversion."""
    if kind == "activation":
        note = ""
        if not isinstance(old, (nn.ReLU, nn.ReLU6)):
            note = f"a different function than {type(old).__name__}"
        elif isinstance(old, nn.ReLU6):
            note = "not clipped at 6"
        return CenteredSoftplus(beta=opts["beta"]).to(opts["device"]), note
    if kind == "batchnorm":
        return _new_bn(old, opts["gamma"], opts["preserve_function"]), ""
    if kind == "pooling":
        return nn.AvgPool2d(old.kernel_size, old.stride, old.padding, ceil_mode=old.ceil_mode,
                            count_include_pad=False), "not function-preserving"
    return _new_sn(old), ""


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _settle_spectral_norms(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """One eval forward on the example; each spectrally normalised layer's input shape there
    becomes its trained shape (σ and v converged, see :meth:`SpectralNorm.reset`). Returns
    the layers."""
    spectral_input_shapes(model, example_input, settle=True)
    return [m for m in model.modules() if is_spectrally_normalized(m)]


# --- the public functions -------------------------------------------------------------------

def _default_input(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    if size is None:
        raise ConversionError("example_input is required: the model has no pretrained_cfg['input_size']")
    p = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, *size, generator=gen)
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def convert(
    model: nn.Module,
    *,
    beta: float | None = None,
    spectral_norm: bool = True,
    lipschitz_bn: bool = True,
    gamma: float = 10.0,
    preserve_function: bool = False,
    exclude: str | Sequence[str] = (),
    strict: bool = False,
    example_input: torch.Tensor | None = None,
    max_pool: str = "keep",
    inplace: bool = False,
    bound: bool = False,
    allow_converted: bool = False,
) -> tuple[nn.Module, ConversionReport]:
    """Convert ``model`` into an LCNN; returns (converted model, :class:`ConversionReport`).

    Args:
        model: any ``nn.Module`` (a timm model stays a timm model: same class, same methods).
        beta: initial β of every CenteredSoftplus (default 5, the paper's; with
            ``preserve_function`` :data:`PRESERVE_BETA`).
        spectral_norm, lipschitz_bn: convert conv/linear layers, BatchNorms.
        gamma: initial γ of the γ-Lipschitz BatchNorms (the paper's 10).
        preserve_function: keep the outputs (see the module docstring); the report gives the
            measured agreement on ``example_input``.
        exclude: fnmatch patterns of module paths (e.g. ``"head.*"``) left as they are, insides
            included; they are listed in the report.
        strict: raise :class:`ConversionError` naming every module that would be left
            uncontrolled, before changing anything.
        example_input: a batch in the model's input space; default: 4 uniform [0, 1] images of
            ``pretrained_cfg['input_size']``. Runs the forward that finds functional
            nonlinearities, sets the spectral norms' trained input shapes (σ converged there)
            and measures agreement.
        max_pool: "keep" or "avg" (replace ``nn.MaxPool2d`` by average pooling).
        inplace: convert ``model`` itself instead of a deep copy.
        bound: also compute the data-free bounds (:func:`lcnn_plugin.model_bound`, certified)
            at the example's input size; off by default (seconds to a minute for large models
            at 224×224): ``model_bound(converted, input_size)`` or ``lcnn bound`` later.
        allow_converted: leave layers that are already LCNN layers alone and convert the rest
            (e.g. a new classifier after ``reset_classifier``); otherwise an already converted
            model raises :class:`ConversionError`.
    """
    check.module(model)
    check.choice("max_pool", max_pool, ("keep", "avg"))
    if beta is None:
        beta = PRESERVE_BETA if preserve_function else 5.0
    check.number("beta", beta, 0, above=True)
    check.number("gamma", gamma, 0, above=True)
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    if not all(isinstance(p, str) and p for p in exclude):
        raise check.InputError(f"exclude: expected module path patterns (non-empty strings), got {exclude!r}")
    if example_input is None:
        example_input = _default_input(model)
    else:
        check.check_inputs(example_input, None, "example_input", unit_box=False)
    paths = [p for p, _ in model.named_modules()]
    unmatched = [f"exclude: {pat!r} matched no module path (paths look like "
                 f"{', '.join(repr(p) for p in paths[1:4])})"
                 for pat in exclude if not any(fnmatch.fnmatchcase(p, pat) for p in paths)]
    for message in unmatched:
        check.warn(message)
    opts = dict(beta=float(beta), spectral_norm=spectral_norm, lipschitz_bn=lipschitz_bn, gamma=float(gamma),
                preserve_function=preserve_function, max_pool=max_pool)
    report_settings = dict(opts, exclude=exclude)
    opts["device"] = example_input.device

    plan = _make_plan(model, opts, exclude, allow_converted)
    reference, functional = _record_forward(model, example_input)
    seen = {k.path for k in plan.kept}
    for path in sorted(functional):
        m = model.get_submodule(path) if path else model
        skip = path in plan.convert or path in seen or _is_converted(m) \
            or type(m).__module__.startswith("torch.nn") or _under(path, plan.excluded)
        if not skip:
            names = ", ".join(sorted(functional[path]))
            why = f"{type(m).__name__}.forward calls {names}: not converted"
            plan.kept.append(Kept(path, "functional", why))
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    plan.kept.sort(key=lambda k: order[k.path])
    if strict:
        bad = [k for k in plan.kept if k.kind != "excluded"]
        if bad:
            raise ConversionError("strict conversion: cannot control " + "; ".join(
                f"{k.path or '<model>'}: {k.reason}" for k in bad))

    target = model if inplace else copy.deepcopy(model)
    report = ConversionReport(type(model).__name__, kept=plan.kept, settings=report_settings,
                              warnings=unmatched)
    occurrences: dict[int, list[str]] = {}
    for path, m in target.named_modules(remove_duplicate=False):
        occurrences.setdefault(id(m), []).append(path)
    done: dict[int, nn.Module] = {}
    # children first: a BatchNormAct2d takes its (already converted) act with it
    for path in sorted(plan.convert, key=lambda p: -p.count(".") if p else 1):
        kind = plan.convert[path]
        old = target.get_submodule(path) if path else target
        if id(old) in done:
            continue
        new, note = _new_module(kind, old, opts)
        done[id(old)] = new
        for p in occurrences[id(old)]:
            if p:
                _set_module(target, p, new)
            else:
                target = new
        target_name = type(new).__name__ + (" + InputSpectralNorm" if new is old else "")
        report.changes.append(Change(path, kind, type(old).__name__, target_name, note))
    report.changes.sort(key=lambda c: order[c.path])

    was_training = target.training
    target.eval()
    try:
        with torch.no_grad():
            sn_layers = _settle_spectral_norms(target, example_input)
            if preserve_function:  # c = σ: each layer applies its original weight again
                for m in sn_layers:
                    if m.sn_log_scale is None:
                        enable_sn_scale(m, m.sn_sigma)
                report.agreement = _agreement(reference, _logits(target(example_input)))
    finally:
        target.train(was_training)
    if bound:
        try:
            report.bound = model_bound(target, tuple(example_input.shape[1:]))
        except Exception as e:  # noqa: BLE001 - the reason is the report's content
            report.bound_error = f"none ({type(e).__name__}: {e})"
    else:
        report.bound_error = "not computed (convert(..., bound=True), model_bound() or `lcnn bound`)"
    return target, report


def _agreement(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    ref, out = ref.double().flatten(1), out.double().flatten(1)
    diff = (out - ref).abs().max()
    return dict(n_examples=ref.shape[0],
                top1_agreement=float((ref.argmax(1) == out.argmax(1)).double().mean()),
                max_abs_diff=float(diff), rel_diff=float(diff / ref.abs().max().clamp_min(1e-30)))


def strip(model: nn.Module, inplace: bool = False, example_input: torch.Tensor | None = None) -> nn.Module:
    """Bake the spectral norms and γ clips of a converted model into plain layers (eval).

    SN convs and linears become ``nn.Conv*``/``nn.Linear`` with weight c·W/σ (frozen σ); layers
    with :class:`~lcnn_plugin.layers.InputSpectralNorm` get c/σ folded into their weight (or,
    for weight-standardising convs, whose forward would undo it, keep a constant input
    scale); γ-BNs become ``nn.BatchNorm2d`` (plus their drop/act) with the clip folded into
    the affine parameters. σ depends on the input shape a layer sees: the result computes the
    same eval outputs as the model on inputs of ``example_input``'s size (one eval forward on
    it finds each layer's shape), or, without it, of the size the model was trained on. It is
    for inference and export (returns a copy unless ``inplace``; put it in eval mode: training
    a stripped model trains a plain network).
    """
    check.module(model)
    target, stripped = _strip(model, inplace, example_input)
    if not stripped:
        check.warn(f"strip: {type(model).__name__} has no LCNN layer to strip (not converted?); "
                   "returned unchanged")
    return target


def _strip(model: nn.Module, inplace: bool, example_input: torch.Tensor | None) -> tuple[nn.Module, int]:
    """(the stripped model, how many layers were stripped); see :func:`strip`."""
    shapes: dict[str, tuple[int, ...]] = {}
    if example_input is not None:
        paths = {id(m): p for p, m in model.named_modules()}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                shapes = {paths[id(m)]: s for m, s in spectral_input_shapes(model, example_input).items()}
        finally:
            model.train(was_training)
    target = model if inplace else copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}
    for path, m in list(target.named_modules(remove_duplicate=False)):
        if id(m) in replaced:
            new = replaced[id(m)]
        elif isinstance(m, LipschitzBatchNorm2d):
            new = _strip_bn(m)
        elif InputSpectralNorm.of(m) is not None:
            new = _strip_input_sn(m, shapes.get(path))
        elif is_spectrally_normalized(m):
            new = _strip_sn(m, shapes.get(path))
        else:
            continue
        replaced[id(m)] = new
        if path:
            _set_module(target, path, new)
        else:
            target = new
    return target, len(replaced)


def _strip_sn(m: nn.Module, shape: tuple[int, ...] | None) -> nn.Module:
    if isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    else:
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(m.kernel_size)]
        new = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight.double() * SpectralNorm.of(m).eval_factor(m, shape).double())
        if m.bias is not None:
            new.bias.copy_(m.bias)
    return new.train(m.training)


def _strip_bn(m: LipschitzBatchNorm2d) -> nn.Module:
    new = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=True,
                         device=m.running_var.device, dtype=m.running_var.dtype)
    with torch.no_grad():
        s = m.lipschitz_scale().double()
        new.running_mean.copy_(m.running_mean)
        new.running_var.copy_(m.running_var)
        new.num_batches_tracked.copy_(m.num_batches_tracked)
        w = m.weight.double() if m.affine else torch.ones_like(m.running_var, dtype=torch.float64)
        b = m.bias.double() if m.affine else torch.zeros_like(m.running_var, dtype=torch.float64)
        new.weight.copy_(w * s)
        new.bias.copy_(b * s)
    new.train(m.training)
    if isinstance(m, LipschitzBatchNormAct2d):
        from timm.layers import BatchNormAct2d

        act = BatchNormAct2d(m.num_features, eps=m.eps, momentum=m.momentum, apply_act=False,
                             device=m.running_var.device, dtype=m.running_var.dtype)
        act.load_state_dict(new.state_dict())
        act.drop, act.act = m.drop, m.act
        return act.train(m.training)
    return new


class _InputScale:
    """Forward pre-hook x ↦ x·k with a constant k (what strip leaves of an InputSpectralNorm on a
    weight-standardising conv)."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] * self.k, *args[1:])


def _strip_input_sn(m: nn.Module, shape: tuple[int, ...] | None) -> nn.Module:
    hook = InputSpectralNorm.of(m)
    with torch.no_grad():
        k = SpectralNorm.of(m).eval_factor(m, shape)
    hook.remove(m)
    # weight standardisation (timm StdConv2d, ScaledStdConv2d) is scale invariant: scaling the
    # weight would do nothing, so the constant scale stays on the input
    if "StdConv" in type(m).__name__:
        m.register_forward_pre_hook(_InputScale(float(k)))
    else:
        with torch.no_grad():
            m.weight.mul_(k.to(m.weight.dtype))
    return m
