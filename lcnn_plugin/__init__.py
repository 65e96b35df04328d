"""lcnn-plugin: low-curvature neural networks for the PyTorch robustness ecosystem.

Importing the package registers the LCNN ResNets with timm::

    import timm, lcnn_plugin
    model = timm.create_model("lcnn_resnet18_cifar", num_classes=100)
"""

from . import layers, models
from .bound import ModelBound, UnboundedError, model_bound
from .fold import fold_batchnorm
from .layers import CenteredSoftplus, LipschitzBatchNorm2d, SNConv2d, SNLinear

__version__ = "0.1.0"

__all__ = [
    "CenteredSoftplus",
    "LipschitzBatchNorm2d",
    "ModelBound",
    "SNConv2d",
    "SNLinear",
    "UnboundedError",
    "fold_batchnorm",
    "layers",
    "model_bound",
    "models",
]
