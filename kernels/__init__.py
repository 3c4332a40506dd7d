"""Triton kernels of the TEAL inference path (see kernels/sparse_gemv.py)."""

from kernels.sparse_gemv import (
    KernelConfig,
    dequantize_weight,
    get_config,
    sparse_gemv,
    sparse_gemv_reference,
    sparse_gemv_triton,
)

__all__ = [
    "KernelConfig",
    "dequantize_weight",
    "get_config",
    "sparse_gemv",
    "sparse_gemv_reference",
    "sparse_gemv_triton",
]
