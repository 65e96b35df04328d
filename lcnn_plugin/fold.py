"""Fold eval-mode BatchNorm into the convolution before it.

In eval, BatchNorm (torch's, or :class:`~lcnn_plugin.layers.LipschitzBatchNorm2d` with its
γ clip) is a per-channel affine map y_c = a_c x_c + b_c; after a convolution with applied
weight W (W/σ for our spectrally normalised convs, σ frozen in eval) and bias c, the pair is
one convolution with weight a_c W_c and bias a_c c_c + b_c. Folding keeps the function and
removes the normalisation from every forward, backward and double backward.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from . import validate as check
from .layers.norm import LipschitzBatchNorm2d
from .layers.spectral import SNConv1d, SNConv2d, SNConv3d, SpectralNorm, spectral_input_shapes

# exactly these classes are affine maps the folding knows; subclasses may do more (timm's
# BatchNormAct2d and our LipschitzBatchNormAct2d apply an activation, Conv2dSame pads inside
# forward, StdConv2d standardises its weight) and are never folded
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, SNConv1d, SNConv2d, SNConv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, LipschitzBatchNorm2d)


def _plain(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """``module`` is one of ``classes`` exactly, with no hook that changes its forward."""
    return type(module) in classes and not module._forward_hooks and not module._forward_pre_hooks


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) with bn(x)_c = a_c x_c + b_c in eval."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    a = torch.rsqrt(bn.running_var.double() + bn.eps)
    b = -bn.running_mean.double() * a
    if bn.affine:
        a, b = a * bn.weight.double(), b * bn.weight.double() + bn.bias.double()
    if isinstance(bn, LipschitzBatchNorm2d):
        scale = bn.lipschitz_scale().double()
        a, b = a * scale, b * scale
    return a, b


def _folded_conv(conv: nn.modules.conv._ConvNd, bn: nn.modules.batchnorm._BatchNorm,
                 shape: tuple[int, ...] | None) -> nn.Module:
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(conv.kernel_size)]
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
              padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
              padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    w = conv.weight.double()
    engine = SpectralNorm.of(conv)
    if engine is not None:  # c/σ as eval applies it on this input shape (default: the trained one)
        w = w * engine.eval_factor(conv, shape).double()
    bias = conv.bias.double() if conv.bias is not None else w.new_zeros(w.shape[0])
    a, b = _bn_affine(bn)
    shape = (-1,) + (1,) * (w.dim() - 1)
    new.weight.data.copy_(w * a.view(shape))
    new.bias.data.copy_(bias * a + b)
    return new


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> torch.fx.GraphModule:
    """A copy of ``model`` (eval) with every conv → BatchNorm pair folded into one conv.

    A pair is folded when the BatchNorm (torch's BatchNorm1d/2d/3d or our LipschitzBatchNorm2d,
    exactly: a subclass such as a BatchNorm with an activation is left as it is) has as its only
    input the output of a 1d/2d/3d convolution (torch's or our spectrally normalised one,
    exactly, without forward hooks) that nothing else uses. ``example_input`` (optional):
    one eval forward on it finds each spectral norm's input shape, whose eval σ is folded
    (without it: the trained shape's). The model is traced with torch.fx (raises if it cannot be);
    the original is not modified. The copy's parameters do not require grad.
    """
    from .bound import _Tracer

    check.module(model)
    was_training = model.training
    model.eval()
    try:
        shapes = {}
        if example_input is not None:
            with torch.no_grad():
                shapes = spectral_input_shapes(model, example_input)
        try:
            graph = _Tracer().trace(model)
        except Exception as e:  # noqa: BLE001 - reported with the model's name
            name = type(model).__name__
            raise ValueError(f"fold_batchnorm: {name} cannot be traced by torch.fx ({e})") from e
        # deep-copied together, so that the shapes stay keyed by the copy's modules
        gm, shapes = copy.deepcopy((torch.fx.GraphModule(model, graph), shapes))
    finally:
        model.train(was_training)
    gm.eval()
    modules = dict(gm.named_modules())
    with torch.no_grad():
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not _plain(modules[node.target], _BNS):
                continue
            src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
            if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1):
                continue
            conv = modules[src.target]
            if not _plain(conv, _CONVS):
                continue
            parent, _, name = src.target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, name, _folded_conv(conv, modules[node.target], shapes.get(conv)))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm
