"""timm-registered LCNN ResNets; importing this module registers them."""

from .cifar_resnet import CifarResNet
from .lcnn_resnet import KINDS, BasicBlock, Bottleneck, LcnnResNet

__all__ = ["KINDS", "BasicBlock", "Bottleneck", "CifarResNet", "LcnnResNet"]
