"""Kernels of the TEAL decode path.

- ``teal_kernels.reference``: weight formats, validation, dequantization and the plain-torch product
  (no Triton import: the CPU path).
- ``teal_kernels.triton_gemv``: the Triton sparse GEMV and its per-shape launch configs.
- ``teal_kernels.ops``: the ``teal::sparse_gemv`` torch op (CUDA: Triton; CPU: the reference).
"""
from teal_kernels.ops import sparse_gemv
from teal_kernels.reference import MAX_BATCH, dequantize_weight, sparse_gemv_reference

__all__ = ["MAX_BATCH", "dequantize_weight", "sparse_gemv", "sparse_gemv_reference"]
