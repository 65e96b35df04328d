"""lcnn-plugin: low-curvature neural networks for the PyTorch robustness ecosystem.

Importing the package registers the LCNN ResNets with timm::

    import timm, lcnn_plugin
    model = timm.create_model("lcnn_resnet18_cifar", num_classes=100)

and ``lcnn_plugin.convert(model)`` retrofits any timm model (see :mod:`lcnn_plugin.convert`).
"""

from . import layers, models
from .bound import ModelBound, UnboundedError, model_bound
from .convert import ConversionError, ConversionReport, convert, strip
from .fold import fold_batchnorm
from .layers import CenteredSoftplus, LipschitzBatchNorm2d, SNConv2d, SNLinear

__version__ = "0.1.0"

__all__ = [
    "CenteredSoftplus",
    "ConversionError",
    "ConversionReport",
    "LipschitzBatchNorm2d",
    "ModelBound",
    "SNConv2d",
    "SNLinear",
    "UnboundedError",
    "convert",
    "fold_batchnorm",
    "layers",
    "model_bound",
    "models",
    "strip",
]
