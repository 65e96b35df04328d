"""Fold eval-mode BatchNorm into the convolution before it.

In eval, BatchNorm is a per-channel affine map y_c = a_c x_c + b_c; after a convolution with
weight W and bias c the pair is one convolution with weight a_c W_c and bias a_c c_c + b_c
(torch's ``fuse_conv_bn_eval``). Folding keeps the function and removes the normalisation
from every forward, backward and double backward.

The folding works at the right depth: :func:`~lcnn_plugin.strip` (which knows every LCNN
layer) first bakes spectral norms and γ clips into plain torch layers, then only exact
``nn.Conv1d/2d/3d`` → ``nn.BatchNorm1d/2d/3d`` pairs are fused. Anything that is more than
an affine map (a BatchNorm with an activation, a conv that pads or standardises inside its
forward, a layer with a forward hook) is never folded.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from . import ops
from . import validate as check

# exactly these classes are affine maps whose parameters say all they do; subclasses may do
# more (timm's BatchNormAct2d applies an activation, Conv2dSame pads inside forward)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _plain(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """``module`` is one of ``classes`` exactly, with no hook that changes its forward."""
    return type(module) in classes and not module._forward_hooks and not module._forward_pre_hooks


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """A copy of ``model`` (eval) with its LCNN layers stripped and every conv → BatchNorm
    pair folded into one conv.

    The model is first stripped (:func:`~lcnn_plugin.strip`: spectral norms and γ clips baked
    into plain layers, σ as eval applies it on ``example_input``'s size, or on the trained
    size without it). A pair is then folded when a BatchNorm of the conv's dimension (torch's
    ``nn.BatchNorm1d/2d/3d`` exactly, with running statistics) has as its only input the
    output of an ``nn.Conv1d/2d/3d`` (exactly, without hooks) that nothing else uses, and each
    of the two modules is called once. The
    model is traced with torch.fx (ValueError naming it if it cannot be); the original is not
    modified. The copy's parameters do not require grad.
    """
    from .convert import _strip

    check.module(model)
    stripped, _ = _strip(model, inplace=False, example_input=example_input)  # restores model's mode
    stripped.eval()
    gm = ops.trace(stripped, who="fold_batchnorm")
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            bn = modules[node.target]
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and calls[src.target] == calls[node.target] == 1):  # a module called twice stays
                continue
            conv = modules[src.target]
            if not (_plain(conv, _CONVS) and _plain(bn, (_BNS[type(conv)],)) and bn.running_var is not None):
                continue
            parent, _, name = src.target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, name, fuse_conv_bn_eval(conv, bn))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm
