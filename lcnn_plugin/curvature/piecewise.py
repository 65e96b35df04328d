"""The exact input Hessian of a piecewise-linear model: H = Jᵀ A J.

When every operation between input and logits is piecewise linear (convolutions, linear
layers, eval BatchNorm, ReLU-family activations, max and average pooling, sums,
rearrangements), the logits z(x) have zero second derivative almost everywhere, so the
Hessian of f(x) = ℓ(z(x)) is exactly Jᵀ A J with J = ∂z/∂x (C × d) and A = ∇²_z ℓ
(diag p − ppᵀ for cross-entropy). Its non-zero eigenvalues are those of the C × C matrix
G^{1/2} A G^{1/2}, G = J Jᵀ; so ‖∇²f‖₂ costs C backward passes and a small
eigendecomposition, with no iteration and no approximation.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..bound import _REARRANGE_FUNCS, _REARRANGE_METHODS, _Tracer
from .hvp import LossFn, _checked_labels, _checked_losses, per_example_cross_entropy

_PL_MODULES = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6,
    nn.LeakyReLU, nn.Hardtanh, nn.PReLU, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Flatten,
    nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
)
_PL_FUNCS = {
    operator.add, operator.sub, operator.neg, torch.add, torch.sub, torch.neg, torch.cat,
    torch.concat, torch.relu, F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.sum, F.pad,
    "add", "sub", "neg", "relu", "mean", "sum",
} | _REARRANGE_FUNCS | _REARRANGE_METHODS
_DIV_FUNCS = {operator.truediv, torch.div, "div"}
_SCALE_FUNCS = {operator.mul, torch.mul, "mul"} | _DIV_FUNCS


def piecewise_linear_violations(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Operations of ``model`` (traced with torch.fx) that are not piecewise linear, as
    "node: reason" strings; empty when the model is piecewise linear in eval."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - the reason is returned
        return [f"{type(model).__name__}: cannot be traced by torch.fx ({e})"]
    gm = torch.fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())
    bad = []
    dependent = set()  # nodes whose value depends on the input
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
        if node.op in ("placeholder", "output") or not any(a in dependent for a in node.all_input_nodes):
            continue
        dependent.add(node)
        if "tensor_meta" not in node.meta:
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if not isinstance(m, _PL_MODULES):
                bad.append(f"{node.target}: {type(m).__name__} is not piecewise linear")
            continue
        if node.target in _SCALE_FUNCS:
            varying = [a for a in node.args if a in dependent]
            divides_by_input = node.target in _DIV_FUNCS and node.args[0] not in dependent
            if len(varying) > 1 or divides_by_input:
                bad.append(f"{node.name}: an input-dependent product or divisor")
        elif node.target not in _PL_FUNCS:
            name = getattr(node.target, "__name__", str(node.target))
            bad.append(f"{node.name}: {name} is not known to be piecewise linear")
    return bad


def piecewise_linear_curvature(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(‖∇ₓf‖, ‖∇²ₓf‖, C) per example, exact for a piecewise-linear ``model`` (not checked here).

    ``y`` None: the predicted labels."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = model(x)
        y = _checked_labels(z, y, x.shape[0], loss_fn)
        losses = _checked_losses(z, y, loss_fn)
    B, C = z.shape
    if not losses.requires_grad:
        raise ValueError("the loss has no differentiable path from the input x")
    (g,) = torch.autograd.grad(losses.sum(), x, retain_graph=True)
    rows = [torch.autograd.grad(z[:, c].sum(), x, retain_graph=c < C - 1)[0].reshape(B, -1) for c in range(C)]
    J = torch.stack(rows, 1).double()  # (B, C, d); the sum trick: examples are independent in eval
    zd = z.detach().double()
    if loss_fn is per_example_cross_entropy:
        p = zd.softmax(1)
        A = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        def one(zi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return loss_fn(zi[None], yi[None])[0]

        A = torch.func.vmap(torch.func.hessian(one))(zd, y)
    e, U = torch.linalg.eigh(J @ J.transpose(1, 2))
    root = U @ torch.diag_embed(e.clamp_min(0).sqrt()) @ U.transpose(1, 2)
    M = root @ A @ root
    hess = torch.linalg.eigvalsh(0.5 * (M + M.transpose(1, 2))).abs().amax(1)
    return g.reshape(B, -1).norm(dim=1), hess.to(x.dtype), C
