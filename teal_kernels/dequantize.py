"""Quantized weights to bf16/fp16 in one pass: the prefill of int8 and int4 models on CUDA.

Decode reads quantized weights through the sparse GEMV (teal_kernels/triton_gemv.py). Prefill is
compute-bound, and there a GEMV-shaped kernel loses badly: a Triton GEMM that read the packed int4
words (one tl.dot per nibble plane, 16 columns wide) ran 2.7-7.9x slower than bf16 cuBLAS on the
H200 (benchmarks/results/int4_prefill/). The float32 path before it (a float32 copy of the matrix,
then a float32 GEMM) was 18-20x slower. So PackedLinear dequantizes each matrix once per prefill
call into x's dtype and hands it to cuBLAS: this kernel reads the quantized bytes once and writes
the [K, N] matrix once (2 bytes a weight: 17-88 us per Llama-3-8B matrix on the H200, about a copy's
bandwidth), whatever the prompt length.

The value of every weight is the reference's (teal_kernels/reference.py ``dequantize_weight``): int8
q * s[n]; int4 (q - 8) * s[g, n] + z[g, n], computed in float32 and rounded once to x's dtype. The
interpreter gives the reference's bits exactly; compiled, the GPU may fuse the int4 multiply-add
(one rounding instead of two), so the result is within one unit in the last place of x's dtype.

Entry point: ``dequantize_triton`` (the ``teal::dequantize`` op of teal_kernels/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from teal_kernels.reference import FMT_INT4, KERNEL_DTYPES, weight_format
from teal_kernels.triton_gemv import INTERPRETED, cdiv

__all__ = ["dequantize_triton"]

BLOCK_K = 32  # rows a program writes: divides every int4 group size, so a program lies in one group
BLOCK_N = 256  # columns a program writes (512 bytes of bf16 a row)


@triton.jit
def _rounded(w, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> DTYPE, round to nearest even. The interpreter truncates float32 to bf16 (triton 3.9),
    so there bf16 is rounded on the bits (finite values only, as here)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = w.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return w.to(DTYPE)


@triton.jit
def _dequantize_kernel(w_ptr, scale_ptr, zero_ptr, out_ptr, K, N, W_ROW,
                       INT4: tl.constexpr, GROUP_SIZE: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows [pid_k * BLOCK_K, + BLOCK_K) x columns [pid_n * BLOCK_N, + BLOCK_N) of the [K, N] matrix
    (rows past K and columns past N masked; int4's K is a multiple of its group, so of BLOCK_K)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows[:, None] < K) & col_ok[None, :]
    if INT4:
        # byte j of a row holds column 2j in its low nibble and 2j + 1 in its high one
        byte_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        b = tl.load(w_ptr + rows[:, None] * W_ROW + byte_cols[None, :], mask=byte_cols[None, :] < W_ROW,
                    other=0).to(tl.int32)  # K is whole groups: no row mask
        q = tl.reshape(tl.join(b & 0xF, b >> 4), [BLOCK_K, BLOCK_N]).to(tl.float32) - 8.0
        group = pid_k * BLOCK_K // GROUP_SIZE
        s = tl.load(scale_ptr + group * N + cols, mask=col_ok, other=0.0)
        z = tl.load(zero_ptr + group * N + cols, mask=col_ok, other=0.0)
        w = q * s[None, :] + z[None, :]
    else:
        q = tl.load(w_ptr + rows[:, None] * W_ROW + cols[None, :], mask=ok, other=0).to(tl.float32)
        s = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        w = q * s[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], _rounded(w, out_ptr.dtype.element_ty, INTERPRET), mask=ok)


def dequantize_triton(w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                      dtype: torch.dtype) -> Tensor:
    """The real weight W^T [K, N] in `dtype` (bf16 or fp16) of an int8 (w int8 [K, N], scales [N]) or
    packed int4 (w uint8 [K, N/2], scales and zeros [K/group_size, N]) matrix. Rejects (TypeError /
    ValueError, one line) other dtypes, the formats' shape errors, non-contiguous tensors and
    matrices of 2**31 or more elements."""
    if dtype not in KERNEL_DTYPES or w.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"dequantize_triton makes bf16/fp16 from int8 or packed int4 (uint8) w, "
                        f"got {w.dtype} -> {dtype}.")
    if w.dim() != 2:
        raise ValueError(f"dequantize_triton needs a 2-D w, got shape {tuple(w.shape)}.")
    k = w.shape[0]
    fmt, n = weight_format(w, dtype, KERNEL_DTYPES, scales, zeros, group_size)
    if any(t is not None and t.device != w.device for t in (scales, zeros)):
        raise ValueError(f"scales and zeros must be on w's device {w.device}.")
    if w.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    if not all(t.is_contiguous() for t in (w, scales) + (() if zeros is None else (zeros,))):
        raise ValueError("dequantize_triton needs contiguous w, scales and zeros.")
    if k * n >= 2**31:
        raise ValueError(f"dequantize_triton uses 32-bit offsets: K*N must be below 2**31 (K={k}, N={n}).")
    out = torch.empty(k, n, dtype=dtype, device=w.device)
    grid = (cdiv(k, BLOCK_K), cdiv(n, BLOCK_N))
    _dequantize_kernel[grid](w, scales, scales if zeros is None else zeros, out, k, n, w.shape[1],
                             INT4=fmt == FMT_INT4, GROUP_SIZE=max(group_size, 1), BLOCK_K=BLOCK_K,
                             BLOCK_N=BLOCK_N, INTERPRET=INTERPRETED, num_warps=4)
    return out
