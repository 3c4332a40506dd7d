"""x @ W for packed int4 W without a bf16 copy of W: the short prefills of int4 models on CUDA.

A quantized prefill dequantizes each matrix once into bf16 and runs cuBLAS (teal_kernels/dequantize.py).
At short prompts that pass costs about as much as bf16's whole GEMM (H200, Llama-3-8B gate|up at 128
tokens: 87 us for the pass, 114 us for cuBLAS; benchmarks/results/int4_prefill/), while a GEMM that
read the int4 bytes would read a quarter of bf16's. This kernel dequantizes each [BLOCK_K, BLOCK_N]
weight tile in registers with that pass's arithmetic (float32, rounded once to bf16) and multiplies
it on the tensor cores. The packed layout keeps two columns a byte (column 2j in byte j's low nibble, 2j + 1 in its
high one), so a tile splits into an even and an odd half, each a product of its own, interleaved
once at the end. The products are computed transposed, W^T x^T, so the operand made in registers
is the left one: Hopper's wgmma takes its left operand from registers, the right one from shared
memory, and x's tile is what the pipeline streams in (the "swap AB" arrangement of int4 GEMMs).

Written without a GPU (interpreter tests against float64; its sm_90 compile is checked by
tests/sm90_compile.py): PackedLinear uses it only under TEAL_INT4_MATMUL=1 until the H200 has
measured it (benchmarks/bench_prefill.py).

Entry point: ``int4_matmul_triton`` (the ``teal::int4_matmul`` op of teal_kernels/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from teal_kernels.dequantize import _rounded
from teal_kernels.reference import KERNEL_DTYPES, weight_format
from teal_kernels.triton_gemv import INTERPRETED

__all__ = ["int4_matmul_triton"]

BLOCK_N = 128  # output columns a program writes: two halves of 64, a wgmma's 64 rows each


@triton.jit
def _half_product(acc, q, s_ptr, z_ptr, offs, ok, xt, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc [HALF, BLOCK_M] + W_half^T x^T for one half of the weight tile: codes q [BLOCK_K, HALF]
    dequantized with the group's scales and zeros at `offs`, rounded to DTYPE as the dequantize
    pass does, then multiplied (the interpreter multiplies in float32: its bf16 dot is unreliable)."""
    s = tl.load(s_ptr + offs, mask=ok, other=0.0)
    z = tl.load(z_ptr + offs, mask=ok, other=0.0)
    w = _rounded((q.to(tl.float32) - 8.0) * s[None, :] + z[None, :], DTYPE, INTERPRET)
    if INTERPRET:
        return tl.dot(tl.trans(w).to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(tl.trans(w), xt, acc)


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, M, K, N, W_ROW,
                        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows [pid_m * BLOCK_M, + BLOCK_M) x columns [pid_n * BLOCK_N, + BLOCK_N) of x @ W; BLOCK_K
    divides the group, so each weight tile takes one row of scales and zeros."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    HALF: tl.constexpr = BLOCK_N // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    byte_cols = pid_n * HALF + tl.arange(0, HALF)
    byte_ok = byte_cols < W_ROW
    acc_even = tl.zeros([HALF, BLOCK_M], dtype=tl.float32)
    acc_odd = tl.zeros([HALF, BLOCK_M], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + rows[None, :] * K + ks[:, None], mask=row_ok[None, :], other=0.0)  # x^T tile
        b = tl.load(w_ptr + ks[:, None] * W_ROW + byte_cols[None, :], mask=byte_ok[None, :], other=0).to(tl.int32)
        offs = k0 // GROUP_SIZE * N + 2 * byte_cols
        acc_even = _half_product(acc_even, b & 0xF, scale_ptr, zero_ptr, offs, byte_ok, xt, DTYPE, INTERPRET)
        acc_odd = _half_product(acc_odd, b >> 4, scale_ptr, zero_ptr, offs + 1, byte_ok, xt, DTYPE, INTERPRET)
    out = tl.reshape(tl.join(tl.trans(acc_even), tl.trans(acc_odd)), [BLOCK_M, BLOCK_N])
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], _rounded(out, DTYPE, INTERPRET),
             mask=row_ok[:, None] & (cols < N)[None, :])


def int4_matmul_triton(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                       block_m: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 3) -> Tensor:
    """x [M, K] (bf16/fp16) @ W for packed int4 W (uint8 [K, N/2], scales and zeros [K/group_size, N]),
    float32 accumulation, output in x's dtype; W's values are the dequantize pass's, rounded to x's
    dtype. Rejects (TypeError / ValueError, one line) other dtypes, the format's shape errors,
    non-contiguous tensors and offsets past 2**31."""
    if x.dtype not in KERNEL_DTYPES or w.dtype != torch.uint8:
        raise TypeError(f"int4_matmul_triton takes bf16/fp16 x and packed int4 (uint8) w, got {x.dtype} and {w.dtype}.")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"int4_matmul_triton needs x [M, K] and w [K, N/2], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}.")
    _, n = weight_format(w, x.dtype, KERNEL_DTYPES, scales, zeros, group_size)
    if any(t.device != x.device for t in (w, scales, zeros)):
        raise ValueError(f"w, scales and zeros must be on x's device {x.device}.")
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    if not all(t.is_contiguous() for t in (x, w, scales, zeros)):
        raise ValueError("int4_matmul_triton needs contiguous x, w, scales and zeros.")
    m, k = x.shape
    if max(m * k, k * n, m * n) >= 2**31:
        raise ValueError(f"int4_matmul_triton uses 32-bit offsets: M*K, K*N and M*N must be below 2**31 "
                         f"(M={m}, K={k}, N={n}).")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, block_m))
    _int4_matmul_kernel[grid](x, w, scales, zeros, out, m, k, n, w.shape[1], GROUP_SIZE=group_size,
                              BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=min(block_k, group_size),
                              NUM_STAGES=num_stages, INTERPRET=INTERPRETED, num_warps=num_warps)
    return out
