"""The LCNN building blocks.

Every layer here reports its eval-mode Lipschitz constant (``lipschitz()``) and a bound on
the norm of its second derivative (``curvature_bound()``); :mod:`lcnn_plugin.bound`
composes them into bounds of a whole model.
"""

from .activation import CenteredSoftplus, centered_softplus, shifted_softplus
from .input_sn import InputSpectralNorm
from .norm import LipschitzBatchNorm2d, LipschitzBatchNormAct2d
from .spectral import (
    ConvOperator,
    SNConv1d,
    SNConv2d,
    SNConv3d,
    SNLinear,
    SpectralNormConv,
    conv_operator_norm,
    layer_name,
    name_layers,
)

__all__ = [
    "CenteredSoftplus",
    "ConvOperator",
    "InputSpectralNorm",
    "LipschitzBatchNorm2d",
    "LipschitzBatchNormAct2d",
    "SNConv1d",
    "SNConv2d",
    "SNConv3d",
    "SNLinear",
    "SpectralNormConv",
    "centered_softplus",
    "conv_operator_norm",
    "layer_name",
    "name_layers",
    "shifted_softplus",
]
