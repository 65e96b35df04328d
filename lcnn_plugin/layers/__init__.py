"""The LCNN building blocks.

Every layer here reports its eval-mode Lipschitz constant (``lipschitz(input_shape)``) and a
bound on the norm of its second derivative (``curvature_bound(input_shape)``) on inputs of a
given per-example shape; :mod:`lcnn_plugin.bound` composes them into bounds of a whole model.
"""

from .activation import CenteredSoftplus, centered_softplus, shifted_softplus
from .norm import LipschitzBatchNorm2d, LipschitzBatchNormAct2d
from .spectral import (
    AffineOperator,
    ConvOperator,
    InputSpectralNorm,
    MatrixOperator,
    NormCertificate,
    SNConv1d,
    SNConv2d,
    SNConv3d,
    SNLinear,
    SpectralNorm,
    SpectralNormConv,
    conv_certificate,
    conv_operator_norm,
    is_spectrally_normalized,
    layer_name,
    name_layers,
)

__all__ = [
    "AffineOperator",
    "CenteredSoftplus",
    "ConvOperator",
    "InputSpectralNorm",
    "LipschitzBatchNorm2d",
    "LipschitzBatchNormAct2d",
    "MatrixOperator",
    "NormCertificate",
    "SNConv1d",
    "SNConv2d",
    "SNConv3d",
    "SNLinear",
    "SpectralNorm",
    "SpectralNormConv",
    "centered_softplus",
    "conv_certificate",
    "conv_operator_norm",
    "is_spectrally_normalized",
    "layer_name",
    "name_layers",
    "shifted_softplus",
]
