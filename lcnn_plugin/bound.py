"""Data-free Lipschitz and curvature bounds of a model in eval mode.

For maps with Lipschitz constant L and second-derivative bound K (‖D²f(x)[u,u]‖ ≤ K‖u‖²):

    composition g∘h:   L = L_g L_h,        K = K_g L_h² + L_g K_h
    sum f + g:         L = L_f + L_g,      K = K_f + K_g
    scaling c·f:       L = |c| L_f,        K = |c| K_f

so for a chain K_f ≤ Σᵢ Kᵢ (Π_{j<i} L_j)² Π_{j>i} L_j. The model is traced with torch.fx
(:func:`lcnn_plugin.ops.trace`: our layers and torch's built-in modules are leaves), shapes
are propagated on a zero input of ``input_size``, and the rules above are applied along the
graph, residual sums included. Each layer's own constants come from the layer
(``lipschitz_certificate()`` or ``lipschitz()`` / ``curvature_bound()``, see
:mod:`lcnn_plugin.layers`) or, for torch's modules and functions, from the rules of the one
table of op facts (:mod:`lcnn_plugin.ops`: a convolution's operator norm on its real input
shape, a linear layer's SVD, a pooling operator's exact norm, eval BatchNorm's max |w|/σ).

Operator norms are certified upper bounds (:func:`lcnn_plugin.layers.conv_certificate`:
exact for small inputs, from the convolution's symbol otherwise, each with a lower bound
from Lanczos): L_f and K_f are then upper bounds, and the result says ``certified``. A
layer whose structure admits no certified bound (an affine layer normalised on its input
above :data:`~lcnn_plugin.layers.spectral.DENSE_LIMIT` inputs) contributes its converged
estimate, and the result names it; a certified bound more than 1% above its lower bound
(a zero-padded convolution on a small input) is named as loose.

Also reported: the paper's normalised form C ≤ Σᵢ βᵢ Π_{j≤i} γ_j, one term per
activation i (βᵢ its max |s''|/|s'|, the product taken over the Lipschitz constants of the
layers before it, on the path that makes it largest). It is the paper's expression, not a
certified bound on ‖∇²f‖/‖∇f‖ for general graphs.

Where a module or operation cannot be bounded, the result says which and why, and the
affected quantity is None: no number is returned that the rules above do not justify.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import ops
from . import validate as check
from .layers.spectral import CERT_TARGET, TIGHT_GRAM_LIMIT, InputSpectralNorm, NormCertificate, gram_limit
from .ops import Local


class UnboundedError(ValueError):
    """Raised (with ``strict=True``) when some part of a model cannot be bounded."""


@dataclass
class LayerEntry:
    """One layer's constants; ``norm``: how its operator norm was bounded (None: a closed form)."""

    name: str
    kind: str
    local: Local
    norm: NormCertificate | None = None


@dataclass
class ModelBound:
    """Bounds of x ↦ model(x) (the logits) in eval mode on inputs of ``input_size``."""

    lipschitz: float | None
    curvature: float | None
    normalized_curvature: float | None
    input_size: tuple[int, ...]
    unbounded: list[tuple[str, str]] = field(default_factory=list)
    layers: list[LayerEntry] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unbounded

    @property
    def estimated(self) -> list[str]:
        """Layers whose operator norm is only an estimate (no certified upper bound is known)."""
        return [e.name for e in self.layers if e.norm is not None and e.norm.upper is None]

    @property
    def certified(self) -> bool:
        """Every constant is bounded and each layer's is a certified upper bound."""
        return self.ok and not self.estimated

    @property
    def loose(self) -> list[tuple[str, float]]:
        """Layers whose certified bound is more than 1% above the best lower bound found."""
        return [(e.name, e.norm.gap) for e in self.layers
                if e.norm is not None and e.norm.gap is not None and e.norm.gap > CERT_TARGET]

    def as_dict(self) -> dict[str, Any]:
        return dict(
            lipschitz=self.lipschitz, curvature=self.curvature,
            normalized_curvature=self.normalized_curvature, input_size=list(self.input_size),
            certified=self.certified, estimated=self.estimated,
            loose=[dict(layer=n, gap=g) for n, g in self.loose],
            unbounded=[dict(where=w, why=y) for w, y in self.unbounded],
        )

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "unbounded" if v is None else f"{v:.6g}"

        status = "certified" if self.certified else "NOT certified" if self.ok else "incomplete"
        lines = [
            f"Data-free bounds (eval, input {tuple(self.input_size)}), {status}:",
            f"  Lipschitz            L_f <= {fmt(self.lipschitz)}",
            f"  second derivative    K_f <= {fmt(self.curvature)}",
            f"  paper's normalised form  {fmt(self.normalized_curvature)}",
            f"  layers bounded: {len(self.layers)}",
        ]
        if self.estimated:
            more = f", … (+{len(self.estimated) - 4} more)" if len(self.estimated) > 4 else ""
            lines.append(f"  only estimated (no certified norm bound for the layer's structure): "
                         f"{', '.join(self.estimated[:4])}{more}")
        if self.loose:
            worst = max(self.loose, key=lambda t: t[1])
            lines.append(f"  certified but loose (> {CERT_TARGET:.0%} above the best lower bound): "
                         f"{len(self.loose)} layers, worst {worst[0]} (+{worst[1]:.1%}); "
                         f"tight=True (lcnn bound --tight) bounds those with up to {TIGHT_GRAM_LIMIT} Gram "
                         "rows exactly")
        lines += [f"  not bounded: {line}" for line in grouped(self.unbounded)]
        return "\n".join(lines)


def grouped(pairs: Sequence[tuple[str, str]], show: int = 4) -> list[str]:
    """One line per distinct reason: "reason (n): where, where, … (+k more)"."""
    by_reason: dict[str, list[str]] = {}
    for where, why in pairs:
        by_reason.setdefault(why, []).append(where or "<model>")
    lines = []
    for why, wheres in by_reason.items():
        more = f", … (+{len(wheres) - show} more)" if len(wheres) > show else ""
        lines.append(f"{why} ({len(wheres)}): {', '.join(wheres[:show])}{more}")
    return lines


# --- the constants of one layer ----------------------------------------------------------

def _linear_local(norm: NormCertificate) -> Local:
    """A linear map's constants: its certified norm bound (the estimate where there is none)."""
    return Local(norm.lower if norm.upper is None else norm.upper, 0.0, 0.0)


def _local_of_module(m: nn.Module, shape: Sequence[int]) -> tuple[Local, str | None, NormCertificate | None]:
    """(constants, why not bounded or None, the bounds of its operator norm for a linear map)."""
    in_shape = tuple(shape[1:])  # per example: the layers' constants are for this input shape
    name = type(m).__name__
    hook = InputSpectralNorm.of(m)
    if hook is not None:
        try:
            norm = hook.lipschitz_certificate(m, in_shape)
        except ValueError as e:
            return Local(None, None, None), str(e), None
        return _linear_local(norm), None, norm
    if hasattr(m, "lipschitz_certificate"):
        norm = m.lipschitz_certificate(in_shape)
        return _linear_local(norm), None, norm
    if hasattr(m, "lipschitz") and hasattr(m, "curvature_bound"):
        norm_fn = getattr(m, "normalized_curvature_bound", None)
        return Local(float(m.lipschitz(in_shape)), float(m.curvature_bound(in_shape)),
                     float(norm_fn()) if norm_fn else 0.0), None, None
    op = ops.module_op(m)
    rule = ops.NO_BOUND if op is None or op.rule is None else op.rule
    res = rule(m, shape) if callable(rule) else rule
    if isinstance(res, str):
        return Local(None, None, None), ops.reason(res, name), None
    if isinstance(res, NormCertificate):
        return _linear_local(res), None, res
    if res.K is None or res.L is None:
        return res, f"{name} is not twice differentiable: curvature unbounded", None
    return res, None, None


@dataclass(frozen=True)
class _Flow:
    """Bounds of the map from the model input to one graph node.

    L, K: Lipschitz and curvature bounds (None: unbounded). G: the largest product of
    Lipschitz constants along any path to the node; terms: each activation's term βᵢ·Gᵢ of
    the paper's normalised form (None: unbounded).
    """

    L: float | None
    K: float | None
    G: float | None
    terms: dict[str, float] | None


_INPUT = _Flow(1.0, 0.0, 1.0, {})
_NONE = _Flow(None, None, None, None)


def _mul(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a * b


def _compose(name: str, outer: Local, inner: _Flow) -> _Flow:
    K = None
    if None not in (outer.L, outer.K, inner.L, inner.K):
        K = outer.K * inner.L**2 + outer.L * inner.K
    terms = None
    if inner.terms is not None and outer.N is not None and inner.G is not None:
        terms = dict(inner.terms)
        if outer.N:
            terms[name] = outer.N * inner.G
    return _Flow(_mul(outer.L, inner.L), K, _mul(outer.L, inner.G), terms)


def _sum(parts: Sequence[_Flow], quadrature: bool = False) -> _Flow:
    def add(vals: list[float | None]) -> float | None:
        if any(v is None for v in vals):
            return None
        return math.sqrt(sum(v * v for v in vals)) if quadrature else sum(vals)

    G = None if any(p.G is None for p in parts) else max(p.G for p in parts)
    terms: dict[str, float] | None = {}
    for p in parts:
        if p.terms is None:
            terms = None
            break
        for k, v in p.terms.items():
            terms[k] = max(v, terms.get(k, 0.0))
    return _Flow(add([p.L for p in parts]), add([p.K for p in parts]), G, terms)


def _scale(c: float, inner: _Flow) -> _Flow:
    c = abs(float(c))
    return _Flow(_mul(c, inner.L), _mul(c, inner.K), _mul(c, inner.G), inner.terms)


def _constant(gm: torch.fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """|c| as a float64 tensor for a number or a parameter/buffer, else None."""
    if isinstance(arg, (int, float)):
        return torch.tensor(abs(float(arg)), dtype=torch.float64)
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = gm
        for part in arg.target.split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor):
            return value.detach().double().abs()
    return None


def model_bound(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    strict: bool = False,
    tight: bool = False,
) -> ModelBound:
    """Data-free bounds of ``model`` (in eval mode) on inputs of ``input_size`` (C, H, W).

    ``input_size`` defaults to the model's ``pretrained_cfg['input_size']``. With
    ``strict=True`` an unbounded part raises :class:`UnboundedError` naming it. With
    ``tight=True`` a convolution whose symbol's bound is more than 1% loose is bounded
    exactly from its Gram matrix when that has at most
    :data:`~lcnn_plugin.layers.spectral.TIGHT_GRAM_LIMIT` rows (a dense factorisation per
    layer: about 3 minutes on 2 CPU cores for ResNet-18 at 32×32, 4 GiB; by default such layers are
    named as loose). The model is put in eval for the computation and its mode restored
    afterwards.
    """
    check.module(model)
    if input_size is None:
        input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if input_size is None:
            raise ValueError("input_size is required: the model has no pretrained_cfg['input_size']")
    input_size = tuple(int(s) for s in input_size)
    was_training = model.training
    model.eval()
    try:
        with gram_limit() if tight else contextlib.nullcontext():
            return _bound(model, input_size, strict)
    finally:
        model.train(was_training)


def _arg(node: torch.fx.Node, i: int, key: str, default: Any) -> Any:
    return node.kwargs.get(key, node.args[i] if len(node.args) > i else default)


def _bound(model: nn.Module, input_size: tuple[int, ...], strict: bool) -> ModelBound:
    try:
        gm = ops.trace(model)
    except ValueError as e:
        raise UnboundedError(str(e)) from e
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_size, device=dev, dtype=dtype))

    state: dict[torch.fx.Node, _Flow] = {}
    unbounded: list[tuple[str, str]] = []
    layers: list[LayerEntry] = []
    modules = dict(gm.named_modules())
    output: _Flow | None = None

    def numel(n: Any) -> int:
        return math.prod(n.meta["tensor_meta"].shape)

    def flag(where: str, why: str) -> None:
        unbounded.append((where, why))

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            state[node] = _INPUT
            continue
        if node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, torch.fx.Node) or arg not in state:
                raise UnboundedError("the model's output is not a tensor computed from its input")
            output = state[arg]
            continue
        deps = [a for a in node.all_input_nodes if a in state]
        if not deps:
            continue  # constant with respect to the input (parameters, shapes, ...)
        is_tensor = "tensor_meta" in node.meta
        if not is_tensor and node.op != "call_module":
            continue  # python values derived from shapes
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and a in state]
        if node.op == "call_module":
            flow = state[deps[0]]
            for suffix, m in ops.parts(modules[node.target]):
                where = f"{node.target}.{suffix}" if suffix else node.target
                local, why, norm = _local_of_module(m, deps[0].meta["tensor_meta"].shape)
                layers.append(LayerEntry(where, type(m).__name__, local, norm))
                if why:
                    flag(where, why)
                flow = _compose(f"{node.name}.{suffix}" if suffix else node.name, local, flow)
            state[node] = flow
            continue
        name = ops.function_name(node.target) or getattr(node.target, "__name__", str(node.target))
        op = ops.function_op(node.target)
        role = op.role if op is not None else None
        refused = None  # why this operation is not bounded
        if role == "rearrange":
            if name == "getitem" and not ops.basic_index(node.args[1]):
                refused = "indexing with tensors or lists (it can copy elements) is not bounded"
            elif name == "dropout" and _arg(node, 2, "training", True) and _arg(node, 1, "p", 0.5):
                refused = "dropout applied in eval (training=True) is not bounded"
            else:
                state[node] = state[deps[0]]
        elif role == "copy":  # broadcasting copies every element the same number of times
            local = Local(math.sqrt(numel(node) / numel(deps[0])), 0.0, 0.0)
            state[node] = _compose(node.name, local, state[deps[0]])
        elif role == "add":
            if _arg(node, 2, "alpha", 1) != 1:
                refused = f"{name} with alpha is not bounded"
            else:
                state[node] = _sum([state[a] for a in tensor_args])
        elif role == "scale":
            divide = name in ops.DIVISIONS
            others = [_constant(gm, a) for a in node.args if a not in tensor_args]
            if len(tensor_args) != 1 or len(others) != 1 or others[0] is None:
                refused = f"{name}: only multiplication by a constant is bounded"
            elif divide and node.args[0] is not tensor_args[0]:
                refused = "division by an input-dependent tensor is not bounded"
            else:  # elementwise scaling by a constant c: Lipschitz max |c| (max |1/c| for a division)
                c = 1.0 / others[0] if divide else others[0]
                state[node] = _scale(float(c.max()), state[tensor_args[0]])
        elif role == "neg":
            state[node] = state[deps[0]]
        elif role == "concat":
            state[node] = _sum([state[a] for a in node.args[0] if a in state], quadrature=True)
        elif role == "reduce":  # a mean (sum) of k elements has norm 1/√k (√k)
            k = numel(deps[0]) / (numel(node) or 1)
            local = Local(math.sqrt(k) if name == "sum" else 1.0 / math.sqrt(k), 0.0, 0.0)
            state[node] = _compose(node.name, local, state[deps[0]])
        elif role == "padding":
            mode = _arg(node, 2, "mode", "constant")
            if mode != "constant":
                refused = f"{mode} padding is not bounded"
            else:  # constant padding: an isometric embedding plus a constant
                state[node] = state[deps[0]]
        elif op is not None and isinstance(op.rule, Local):  # an elementwise function
            if op.rule.K is None:
                flag(node.name, f"{name} is not twice differentiable: curvature unbounded")
            state[node] = _compose(node.name, op.rule, state[deps[0]])
        else:
            refused = ops.reason(op.rule if op is not None and isinstance(op.rule, str) else ops.NO_BOUND,
                                 f"the operation {name}")
        if refused is not None:
            flag(node.name, refused)
            state[node] = _NONE

    assert output is not None
    normalized = None if output.terms is None else sum(output.terms.values())
    result = ModelBound(output.L, output.K, normalized, input_size, unbounded, layers)
    if strict and unbounded:
        raise UnboundedError("cannot bound: " + "; ".join(f"{w}: {y}" for w, y in unbounded))
    return result
