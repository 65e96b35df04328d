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

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import ops
from .hvp import LossFn, _checked_labels, _checked_losses, per_example_cross_entropy


def piecewise_linear_violations(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Operations of ``model`` (traced with torch.fx) that are not piecewise linear, as
    "node: reason" strings; empty when the model is piecewise linear in eval. What is
    piecewise linear is the table's word (:mod:`lcnn_plugin.ops`); a layer made of parts
    (LipschitzBatchNormAct2d: BN, drop, act) is judged part by part."""
    try:
        gm = ops.trace(model)
    except ValueError as e:  # the reason is returned
        return [str(e)]
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
            for suffix, m in ops.parts(modules[node.target]):
                op = ops.layer_op(m)
                if op is None or not op.piecewise_linear:
                    where = f"{node.target}.{suffix}" if suffix else node.target
                    bad.append(f"{where}: {type(m).__name__} is not piecewise linear")
            continue
        op = ops.function_op(node.target)
        if op is not None and op.role == "scale":
            varying = [a for a in node.args if a in dependent]
            divides = ops.function_name(node.target) in ops.DIVISIONS
            divides_by_input = divides and node.args[0] not in dependent
            if len(varying) > 1 or divides_by_input:
                bad.append(f"{node.name}: an input-dependent product or divisor")
        elif op is None or not op.piecewise_linear:
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
