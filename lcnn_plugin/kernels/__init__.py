"""Fused kernels (Triton). Importing this package never requires Triton; the kernels do."""

from .softplus import fused_centered_softplus, triton_available, use_fused_softplus

__all__ = ["fused_centered_softplus", "triton_available", "use_fused_softplus"]
