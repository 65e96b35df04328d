"""He et al.'s CIFAR ResNet-20/32 ("option A" shortcuts), for the pretrained checkpoints.

Registered in timm as ``cifar_resnet20`` and ``cifar_resnet32``. The layout (and state_dict
names conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear) matches the widely used
akamaster/pytorch_resnet_cifar10 checkpoints, which timm loads from a local file::

    timm.create_model("cifar_resnet20", pretrained=True,
                      pretrained_cfg_overlay=dict(file="resnet20-12fca82f.th"))

(timm strips their ``module.`` prefix and unwraps ``state_dict``). Inputs are [0, 1] pixels:
the normalisation those checkpoints were trained with (ImageNet mean and std) is the
model's first operation, so attacks and curvature see the model's own input space. ReLU
and max-free, BatchNorm in eval: the model is piecewise linear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ..validate import choice

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class OptionABlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN + shortcut, ReLU; the shortcut subsamples and zero-pads
    channels where the shape changes (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(cout, **dd)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(cout, **dd)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()  # modules, so that lcnn_plugin.convert sees them
        self.pad = (cout - cin) // 2
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.stride != 1 or self.pad:
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return self.act2(out + short)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs, widths 16/32/64, input normalisation built in."""

    def __init__(self, n: int = 3, num_classes: int = 10, in_chans: int = 3,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 drop_rate: float = 0.0, global_pool: str = "avg", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"CifarResNet: unexpected arguments {sorted(kwargs)}")
        dd = dict(device=device, dtype=dtype)
        if in_chans != len(mean) or in_chans != len(std):
            raise ValueError(f"CifarResNet: mean and std need {in_chans} values (in_chans)")
        self.num_classes, self.num_features, self.drop_rate = num_classes, 64, drop_rate
        self.head_hidden_size, self.in_chans = 64, in_chans
        self.pool_type = choice("global_pool", global_pool, ("avg", ""))  # "": no global pooling
        self.feature_info = [dict(num_chs=c, reduction=r, module=m) for c, r, m in (
            (16, 1, "act1"), (16, 1, "layer1"), (32, 2, "layer2"), (64, 4, "layer3"))]
        self.register_buffer("mean", torch.tensor(mean, **dd).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, **dd).view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(16, **dd)
        self.act1 = nn.ReLU()
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            stride = 2 if i else 1
            blocks = [OptionABlock(cin, width, stride, dd)]
            blocks += [OptionABlock(width, width, 1, dd) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes, **dd) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1((x - self.mean) / self.std)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.dropout(x.mean((2, 3)) if self.pool_type else x, self.drop_rate, self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.pool_type = choice("global_pool", global_pool, ("avg", ""))
        self.num_classes = num_classes
        p = self.conv1.weight  # the model's current device and dtype (after .to())
        dd = dict(device=p.device, dtype=p.dtype)
        self.linear = nn.Linear(64, num_classes, **dd) if num_classes else nn.Identity()
        self.linear.train(self.training)


default_cfgs = generate_default_cfgs({
    name: dict(url="", num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), crop_pct=1.0,
               interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), first_conv="conv1",
               classifier="linear", license="bsd-2-clause")
    for name in ("cifar_resnet20", "cifar_resnet32")
})


# features_only: hooks on the whole model (its forward normalises the input before conv1);
# passed as a copy: timm pops from it
_FEATURES = dict(feature_cls="hook", no_rewrite=True, out_indices=(0, 1, 2, 3))


def _strip_prefix(state_dict: dict[str, torch.Tensor], model: CifarResNet) -> dict[str, torch.Tensor]:
    state_dict = state_dict.get("state_dict", state_dict)
    out = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out.setdefault("mean", model.mean)  # the checkpoints hold no normalisation buffers
    out.setdefault("std", model.std)
    return out


@register_model
def cifar_resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (He et al. 2016, option A), 0.27M parameters, ImageNet normalisation inside."""
    return build_model_with_cfg(CifarResNet, "cifar_resnet20", pretrained, pretrained_filter_fn=_strip_prefix,
                                feature_cfg=dict(_FEATURES), **dict(dict(n=3), **kwargs))


@register_model
def cifar_resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (He et al. 2016, option A), 0.46M parameters, ImageNet normalisation inside."""
    return build_model_with_cfg(CifarResNet, "cifar_resnet32", pretrained, pretrained_filter_fn=_strip_prefix,
                                feature_cfg=dict(_FEATURES), **dict(dict(n=5), **kwargs))
