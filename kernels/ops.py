"""The ``teal::sparse_gemv`` torch op: what PackedLinear calls for decode-sized batches.

One op, one implementation per device: CUDA runs the Triton kernel (kernels/triton_gemv.py), the
CPU runs the plain-torch reference (kernels/reference.py), so a dense model works where Triton is
not installed. ``TEAL_CPU_KERNELS=interpreter`` (with ``TRITON_INTERPRET=1`` set before Triton is
imported) makes the CPU run the Triton kernel in Triton's interpreter instead: that is how CI tests
the model -> kernel path without a GPU. A ``register_fake`` lets ``torch.compile(fullgraph=True)``
trace through the op (CUDA graphs included).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from kernels.reference import masked_product, validate

CPU_KERNELS_ENV = "TEAL_CPU_KERNELS"  # "reference" (default) or "interpreter"


def _triton_launcher():
    """Imported on first use: Triton is optional on the CPU."""
    from kernels.triton_gemv import sparse_gemv_triton
    return sparse_gemv_triton


@torch.library.custom_op("teal::sparse_gemv", mutates_args=(), device_types="cpu")
def _sparse_gemv_cpu(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    group_size: int = 0,
) -> Tensor:
    mode = os.environ.get(CPU_KERNELS_ENV, "reference")
    if mode == "interpreter":
        from kernels.triton_gemv import INTERPRETED
        if not INTERPRETED:
            raise RuntimeError(f"{CPU_KERNELS_ENV}=interpreter needs TRITON_INTERPRET=1 set before Triton is imported")
        return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size)
    if mode != "reference":
        raise ValueError(f"{CPU_KERNELS_ENV} must be 'reference' or 'interpreter', got {mode!r}")
    validate(x, w, thresholds, split_sizes, scales, zeros, group_size, for_kernel=True)
    return masked_product(x, w, thresholds, split_sizes, scales, zeros, group_size)


@_sparse_gemv_cpu.register_kernel("cuda")
def _sparse_gemv_cuda(x, w, thresholds, split_sizes, scales=None, zeros=None, group_size=0):
    return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size)


@_sparse_gemv_cpu.register_fake
def _(x, w, thresholds, split_sizes, scales=None, zeros=None, group_size=0):
    validate(x, w, thresholds, split_sizes, scales, zeros, group_size, for_kernel=True)
    return x.new_empty(x.shape[0], sum(split_sizes))


def sparse_gemv(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    group_size: int = 0,
) -> Tensor:
    """Threshold-sparse x @ W^T for 1 <= M <= MAX_BATCH rows (formats: kernels/reference.py).

    Output [M, N] in x.dtype, float32 accumulation; rows of W for zeroed inputs are not read on
    the GPU.
    """
    return torch.ops.teal.sparse_gemv(x, w, thresholds, list(split_sizes), scales, zeros, group_size)
