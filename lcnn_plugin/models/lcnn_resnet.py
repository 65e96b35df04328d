"""LCNN ResNets (Srinivas et al., NeurIPS 2022) and the paper's baselines, registered in timm.

One skeleton, three kinds:

- ``lcnn``: centered softplus with learnable β (init 5), convolutions normalised by their
  true operator norm, γ-Lipschitz affine-free BatchNorm (γ init 10);
- ``standard``: the paper's standard baseline, near-ReLU plain softplus (β = 1000), plain
  convolutions and affine-free BatchNorm;
- ``softplus``: the softplus + weight decay baseline, plain softplus with β = 10.

All three use the paper's split residual blocks, block(x) = act(½[F(x/√2) + S(x/√2)]),
bias-free convolutions and a spectrally normalised classifier. The ``_cifar`` variants have
the CIFAR stem (3×3 stride-1 conv, no pooling); the others the ImageNet stem (7×7
stride-2 conv, then a 3×3 stride-2 *average* pool: a max-pool is not twice differentiable).
Inputs are [0, 1] pixels: the pretrained_cfg has mean 0 and std 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..layers import CenteredSoftplus, LipschitzBatchNorm2d, SNConv2d, SNLinear, name_layers

_INV_SQRT2 = 1.0 / math.sqrt(2.0)

_KIND_DOC = {
    "lcnn": "LCNN (centered softplus with learnable β=5, operator-norm spectral norm, γ-Lipschitz BN)",
    "standard": "standard baseline (near-ReLU softplus β=1000, plain convs and BN)",
    "softplus": "softplus + weight decay baseline (softplus β=10, plain convs and BN)",
}

KINDS = {
    # kind: (activation, β, spectral-norm convs, γ-Lipschitz BN)
    "lcnn": ("centered", 5.0, True, True),
    "standard": ("softplus", 1000.0, False, False),
    "softplus": ("softplus", 10.0, False, False),
}


class _Factory:
    """Builds the layers of one kind of network."""

    def __init__(self, kind: str, beta: float | None, gamma: float, dd: dict[str, Any]) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        act, default_beta, self.spectral, self.lipschitz_bn = KINDS[kind]
        self.act_kind = act
        self.beta = default_beta if beta is None else float(beta)
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)
        self.dd = dd  # device and dtype of every parameter and buffer

    def conv(self, cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
        cls = SNConv2d if self.spectral else nn.Conv2d
        return cls(cin, cout, k, stride=stride, padding=k // 2, bias=False, **self.dd)

    def norm(self, c: int) -> nn.BatchNorm2d:
        if self.lipschitz_bn:
            return LipschitzBatchNorm2d(c, gamma=self.gamma, affine=False, **self.dd)
        return nn.BatchNorm2d(c, affine=False, **self.dd)

    def act(self) -> nn.Module:
        if self.act_kind == "centered":
            return CenteredSoftplus(self.beta).to(**self.dd)
        return nn.Softplus(beta=self.beta)



def _classifier(cin: int, num_classes: int, dd: dict[str, Any]) -> nn.Module:
    """The spectrally normalised classifier of every kind (none for num_classes = 0)."""
    return SNLinear(cin, num_classes, **dd) if num_classes else nn.Identity()


class _SplitResidual(nn.Module):
    """Shared forward of the split residual blocks: act(½[F(x/√2) + S(x/√2)])."""

    shortcut: nn.Module | None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * _INV_SQRT2
        sc = x if self.shortcut is None else self.shortcut(x)
        return self.act_out(0.5 * (self.residual(x) + sc))


class BasicBlock(_SplitResidual):
    expansion = 1

    def __init__(self, f: _Factory, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = f.conv(cin, planes, 3, stride)
        self.bn1 = f.norm(planes)
        self.act1 = f.act()
        self.conv2 = f.conv(planes, cout, 3)
        self.bn2 = f.norm(cout)
        self.shortcut = _shortcut(f, cin, cout, stride)
        self.act_out = f.act()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))


class Bottleneck(_SplitResidual):
    expansion = 4

    def __init__(self, f: _Factory, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = f.conv(cin, planes, 1)
        self.bn1 = f.norm(planes)
        self.act1 = f.act()
        self.conv2 = f.conv(planes, planes, 3, stride)
        self.bn2 = f.norm(planes)
        self.act2 = f.act()
        self.conv3 = f.conv(planes, cout, 1)
        self.bn3 = f.norm(cout)
        self.shortcut = _shortcut(f, cin, cout, stride)
        self.act_out = f.act()

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


def _shortcut(f: _Factory, cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(f.conv(cin, cout, 1, stride), f.norm(cout))


def _check_input(x: torch.Tensor, in_chans: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"LcnnResNet: expected input of shape (N, {in_chans}, H, W), got {tuple(x.shape)}"
        )


torch.fx.wrap("_check_input")  # an opaque call when traced (see lcnn_plugin.bound)


class LcnnResNet(nn.Module):
    """A ResNet of split residual blocks built from one :data:`KINDS` entry.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage (4 stages, widths width·2^i).
        num_classes: classifier outputs (0: no classifier, pooled features).
        in_chans: input channels.
        stem: ``"cifar"`` (3×3 stride 1, no pooling) or ``"imagenet"`` (7×7 stride 2 and a
            3×3 stride-2 average pool).
        kind: ``"lcnn"``, ``"standard"`` or ``"softplus"``.
        beta: activation β (default by kind: 5, 1000, 10). gamma: initial γ of γ-BN (10).
        global_pool: timm pool type of the head. drop_rate: dropout before the classifier.
        width: channels of the stem and the first stage (64).
        device, dtype: of every parameter and buffer (``"meta"`` builds the structure only).
    """

    def __init__(
        self,
        block: str = "basic",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        kind: str = "lcnn",
        beta: float | None = None,
        gamma: float = 10.0,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        width: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if not (isinstance(width, int) and width >= 1):
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if in_chans < 1 or num_classes < 0:
            raise ValueError(f"need in_chans >= 1 and num_classes >= 0, got {in_chans}, {num_classes}")
        block_cls = blocks[block]
        f = _Factory(kind, beta, gamma, dict(device=device, dtype=dtype))
        self.kind = kind
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # registration order is execution order (timm's FeatureListNet relies on it)
        cifar = stem == "cifar"
        self.conv1 = f.conv(in_chans, width, 3) if cifar else f.conv(in_chans, width, 7, stride=2)
        self.bn1 = f.norm(width)
        self.act1 = f.act()
        self.pool = nn.Identity() if cifar else nn.AvgPool2d(3, stride=2, padding=1)
        reduction = 1 if cifar else 2
        self.feature_info = [dict(num_chs=width, reduction=reduction, module="act1")]
        reduction *= 1 if cifar else 2

        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            reduction *= stride
            stage = []
            for j in range(n):
                stage.append(block_cls(f, cin, planes, stride if j == 0 else 1))
                cin = planes * block_cls.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=cin, reduction=reduction, module=f"layer{i + 1}"))
        self.num_features = self.head_hidden_size = cin
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = _classifier(cin * self.global_pool.feat_mult(), num_classes, f.dd)
        name_layers(self)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.feature_info) - 1)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^conv1|bn1|act1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the stages in training. The spectral norms' recomputation reuses the
        forward's σ (see :mod:`lcnn_plugin.layers.spectral`); as with any checkpointed
        BatchNorm, running statistics are updated again when the stages are recomputed."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        in_features = self.num_features * self.global_pool.feat_mult()
        p = next(self.parameters())  # the model's current device and dtype (after .to())
        self.fc = _classifier(in_features, num_classes, dict(device=p.device, dtype=p.dtype))
        self.fc.train(self.training)
        name_layers(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_chans)
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            return checkpoint_seq(nn.Sequential(*self.stages), x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _filter_fn(state_dict: dict[str, torch.Tensor], model: LcnnResNet) -> dict[str, torch.Tensor]:
    """Drop the classifier's power-iteration state where timm will drop its weight.

    timm discards a checkpoint's classifier when num_classes differs; the spectral-norm
    state of that classifier must go with it (the new head keeps its own).
    """
    w = state_dict.get("fc.weight")
    fc = model.get_classifier()
    if w is not None and (not isinstance(fc, nn.Linear) or w.shape[0] != fc.out_features):
        state_dict = {k: v for k, v in state_dict.items() if k not in ("fc.sn_v", "fc.sn_sigma")}
    return state_dict


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> LcnnResNet:
    return build_model_with_cfg(
        LcnnResNet, variant, pretrained, pretrained_filter_fn=_filter_fn, **kwargs
    )


_ZERO_MEAN, _UNIT_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _cfg(stem: str, **kwargs: Any) -> dict[str, Any]:
    base = dict(
        url="", mean=_ZERO_MEAN, std=_UNIT_STD, first_conv="conv1", classifier="fc",
        license="apache-2.0",
    )
    if stem == "cifar":
        base.update(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
                    interpolation="bilinear")
    else:
        base.update(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                    crop_pct=0.875, interpolation="bilinear")
    base.update(kwargs)
    return base


# name: (block, layers, width, description)
_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64, "ResNet-18"),
    "resnet34": ("basic", (3, 4, 6, 3), 64, "ResNet-34"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64, "ResNet-50"),
    "resnet10_w16": ("basic", (1, 1, 1, 1), 16, "ResNet-10 of width 16 (0.31M parameters, for quick runs)"),
}
_PREFIX = {"lcnn": "lcnn_", "standard": "lcnn_standard_", "softplus": "lcnn_softplus_"}
_STEMS = {"resnet10_w16": ("cifar",)}  # the small variant is CIFAR-only


def _name(kind: str, arch: str, stem: str) -> str:
    return f"{_PREFIX[kind]}{arch}" + ("_cifar" if stem == "cifar" else "")


def _variants() -> list[tuple[str, str, str]]:
    return [(kind, arch, stem) for kind in KINDS for arch in _ARCHS
            for stem in _STEMS.get(arch, ("cifar", "imagenet"))]


default_cfgs = generate_default_cfgs({_name(k, a, s): _cfg(s) for k, a, s in _variants()})


def _register(kind: str, arch: str, stem: str) -> None:
    name = _name(kind, arch, stem)
    block, layers, width, desc = _ARCHS[arch]

    def create(pretrained: bool = False, **kwargs: Any) -> LcnnResNet:
        args = dict(block=block, layers=layers, stem=stem, kind=kind, width=width)
        return _create(name, pretrained, **dict(args, **kwargs))

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    stem_doc = "CIFAR stem (3×3 stride 1, no pooling)" if stem == "cifar" else "ImageNet stem"
    create.__doc__ = f"{desc}, {_KIND_DOC[kind]}, {stem_doc}."
    globals()[name] = register_model(create)


for _variant in _variants():
    _register(*_variant)
