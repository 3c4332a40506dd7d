"""Quantized weights for prefill on CUDA: a one-pass dequantization, and a GEMM that dequantizes tiles.

Decode reads quantized weights through the sparse GEMV (teal_kernels/triton_gemv.py). A prefill is a
GEMM, and two ways of running it over int8 / packed int4 weights live here:

- ``dequantize_triton`` (the default): read the quantized bytes once and write the [K, N] matrix in
  x's dtype, which PackedLinear hands cuBLAS. The pass runs near the memory's speed (H200, 8B
  gate|up, int4: 87 us for 59 MB read and 235 MB written, 3.4 TB/s; benchmarks/results/int4_prefill/),
  so its cost is bytes: 2.25 bytes a weight more than bf16's GEMM reads. That is 1.15x bf16's time
  at 2048 tokens and 1.6-2x at 128, where the GEMM itself is bound by its 2 bytes a weight.
- ``quant_gemm_triton`` (int8 and int4 prefills of 17-128 rows by default, linear.QUANT_GEMM_ROWS): a
  tiled GEMM that reads the quantized bytes and converts each [BLOCK_K, BLOCK_N] tile in registers to
  the values the pass above writes, then multiplies on the tensor cores (on sm_90 the converted tile
  goes through shared memory into wgmma: local SASS of triton 3.6 shows HGMMA). It reads 0.5 (int4)
  or 1 (int8) byte a weight once per BLOCK_M rows of x. H200, 8B shapes, a layer (q|k|v + o +
  gate|up + down) at 16 / 64 / 128 rows: int8 beats dequantize + cuBLAS on every matrix
  (benchmarks/results/quant_gemm_2026_12_05/) and loses at 512; int4 takes 193 / 201 / 240 us
  against 274 / 275 / 330 (benchmarks/results/int4_vec_2026_12_05/; bf16 117 / 121 / 170).
  int4's layout decides its speed: with 16 bytes of a packed row a thread (the compiler's choice
  without a hint), each thread holds 32 columns of one row and reads a scale and a zero from shared
  memory for every weight, and the pipeliner's copies of those scales are repeated by every thread
  holding the same columns. So the heuristic reads 4 bytes a thread (GemmConfig.int4_vec) and
  loads a group's scales once into registers (int4_scales "group"): gate|up at 128 rows 240 ->
  113 us. Nsight Compute, same kernel: 239 -> 116 us; L1/shared-memory throughput 92% -> 52% of peak,
  and the shared loads' 17-way bank conflicts (22 M) are gone.
  Two earlier int4 GEMMs lost to bf16 by 2-11x: one tl.dot per 16-column nibble plane
  (mma.sync), and wgmma with the converted weights as its register operand and one program per
  whole K (benchmarks/results/int4_prefill/, int4_matmul/).

The value of every weight is the reference's (teal_kernels/reference.py ``dequantize_weight``): int8
q * s[n]; int4 (q - 8) * s[g, n] + z[g, n], computed in float32 and rounded once to x's dtype. The
interpreter gives the reference's bits exactly; compiled, the GPU may fuse the int4 multiply-add
(one rounding instead of two), so a weight is within one unit in the last place of x's dtype.

Entry points: ``dequantize_triton`` and ``quant_gemm_triton`` (the ``teal::dequantize`` and
``teal::quant_gemm`` ops of teal_kernels/ops.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from teal_kernels.reference import FMT_INT4, KERNEL_DTYPES, weight_format
from teal_kernels.triton_gemv import INTERPRETED, _int8_to_f32, _scales_zeros, cdiv

__all__ = ["GemmConfig", "dequantize_triton", "quant_gemm_config", "quant_gemm_triton"]

BLOCK_K = 32  # rows a program of the pass writes: divides every int4 group size, so a program lies in one group
BLOCK_N = 256  # columns it writes (512 bytes of bf16 a row)


# ---------------------------------------------------------------------------------------------
# One tile of the real weight, in float32
# ---------------------------------------------------------------------------------------------

@triton.jit
def _int4_codes(w_ptr, rows, row_ok, col0, W_ROW, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
                INT4_VEC: tl.constexpr):
    """float32 q - 8 [len(rows), BLOCK_N] of the packed int4 columns [col0, col0 + BLOCK_N) (col0 even;
    rows outside row_ok and bytes past the row read code 0, so -8).

    INT4_VEC caps the bytes of a packed row that one thread reads together (a hint to the compiler's
    layout, no effect on values): at 16 a thread holds 32 columns of one row and so needs 32 scales
    and 32 zeros for 32 weights; at 4 or 2 it holds fewer columns of more rows, which share them."""
    # byte j of a row holds column 2j in its low nibble and 2j + 1 in its high one
    byte_cols = tl.max_contiguous(col0 // 2 + tl.arange(0, BLOCK_N // 2), INT4_VEC)
    b = tl.load(w_ptr + rows[:, None] * W_ROW + byte_cols[None, :],
                mask=row_ok[:, None] & (byte_cols[None, :] < W_ROW), other=0).to(tl.int32)
    nib = tl.reshape(tl.join(b & 0xF, b >> 4), [rows.shape[0], BLOCK_N])
    if INTERPRET:
        return nib.to(tl.float32) - 8.0
    return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + n - (2^23 + 8) = n - 8


@triton.jit
def _group_scales(scale_ptr, zero_ptr, group, N, cols, ok):
    """int4 group `group`'s scales and zeros of `cols` (0 where not ok)."""
    return _scales_zeros(scale_ptr, zero_ptr, group * N + cols, ok)


@triton.jit
def _dequantized_tile(w_ptr, scale_ptr, zero_ptr, rows, row_ok, col0, N, W_ROW, group, INT4: tl.constexpr,
                      BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 weights [len(rows), BLOCK_N] of columns [col0, col0 + BLOCK_N) (col0 even; columns
    past N are 0, rows outside row_ok read code 0: int8 0, int4 -8 * s + z, which callers pair with
    x = 0). An int4 tile lies inside int4 group `group`.

    Integers become floats by bit tricks rather than I2F, a quarter-rate instruction on the GPU:
    placed in the mantissa of 2^23 (0x4B000000), whose mantissa unit is 1, then 2^23 plus the
    format's offset subtracted (int8: triton_gemv's _int8_to_f32). Exact: every value involved is an
    integer a float32 holds. The interpreter converts plainly (same values)."""
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if INT4:
        s, z = _group_scales(scale_ptr, zero_ptr, group, N, cols, col_ok)
        return _int4_codes(w_ptr, rows, row_ok, col0, W_ROW, BLOCK_N, INTERPRET, 16) * s[None, :] + z[None, :]
    else:
        q = tl.load(w_ptr + rows[:, None] * W_ROW + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0)
        s = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        return _int8_to_f32(q, INTERPRET) * s[None, :]  # the GEMV's conversion (PTX, 4 bytes at a time)


@triton.jit
def _rounded(w, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 -> DTYPE, round to nearest even. The interpreter truncates float32 to bf16 (triton 3.9),
    so there bf16 is rounded on the bits (finite values only, as here)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = w.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return w.to(DTYPE)


def _checked_format(w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, dtype: torch.dtype,
                    caller: str) -> tuple[int, int]:
    """(format code, N) of an int8 / packed int4 matrix for a kernel computing in `dtype`; TypeError /
    ValueError / RuntimeError, one line, for what the kernels reject."""
    if dtype not in KERNEL_DTYPES or w.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"{caller} takes int8 or packed int4 (uint8) w and bf16/fp16, got {w.dtype} and {dtype}.")
    if w.dim() != 2:
        raise ValueError(f"{caller} needs a 2-D w, got shape {tuple(w.shape)}.")
    fmt, n = weight_format(w, dtype, KERNEL_DTYPES, scales, zeros, group_size)
    if any(t is not None and t.device != w.device for t in (scales, zeros)):
        raise ValueError(f"scales and zeros must be on w's device {w.device}.")
    if w.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    if not all(t.is_contiguous() for t in (w, scales) + (() if zeros is None else (zeros,))):
        raise ValueError(f"{caller} needs contiguous w, scales and zeros.")
    if w.shape[0] * n >= 2**31:
        raise ValueError(f"{caller} uses 32-bit offsets: K*N must be below 2**31 (K={w.shape[0]}, N={n}).")
    return fmt, n


# ---------------------------------------------------------------------------------------------
# Kernel: the matrix in x's dtype, one pass
# ---------------------------------------------------------------------------------------------

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
    row_ok = rows < K
    w = _dequantized_tile(w_ptr, scale_ptr, zero_ptr, rows, row_ok, pid_n * BLOCK_N, N, W_ROW,
                          pid_k * BLOCK_K // GROUP_SIZE, INT4, BLOCK_N, INTERPRET)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], _rounded(w, out_ptr.dtype.element_ty, INTERPRET),
             mask=row_ok[:, None] & (cols[None, :] < N))


def dequantize_triton(w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                      dtype: torch.dtype) -> Tensor:
    """The real weight W^T [K, N] in `dtype` (bf16 or fp16) of an int8 (w int8 [K, N], scales [N]) or
    packed int4 (w uint8 [K, N/2], scales and zeros [K/group_size, N]) matrix. Rejects (TypeError /
    ValueError, one line) other dtypes, the formats' shape errors, non-contiguous tensors and
    matrices of 2**31 or more elements."""
    fmt, n = _checked_format(w, scales, zeros, group_size, dtype, "dequantize_triton")
    k = w.shape[0]
    out = torch.empty(k, n, dtype=dtype, device=w.device)
    grid = (cdiv(k, BLOCK_K), cdiv(n, BLOCK_N))
    _dequantize_kernel[grid](w, scales, scales if zeros is None else zeros, out, k, n, w.shape[1],
                             INT4=fmt == FMT_INT4, GROUP_SIZE=max(group_size, 1), BLOCK_K=BLOCK_K,
                             BLOCK_N=BLOCK_N, INTERPRET=INTERPRETED, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# Kernel: x @ W, each weight tile dequantized in registers
# ---------------------------------------------------------------------------------------------
# Grid: one program per [BLOCK_M, BLOCK_N] output tile, the row block varying fastest, so the
# programs running together share a column block: its quantized bytes come from memory once and
# from L2 for the other row blocks (x is read once per column block instead: 16 MB for 2048 tokens
# at K = 4096, from L2 where it fits). The K loop loads an x tile
# and a weight tile (Triton pipelines both num_stages deep), converts the weights to x's dtype
# (_dequantized_tile, then one rounding: the values dequantize_triton writes) and accumulates
# tl.dot in float32. int4's BLOCK_K divides its group, so a tile has one group's scales; where they
# come from is INT4_SCALES: "step" loads them with the tile (the pipeliner copies them into shared
# memory, every thread its own columns: at 16 bytes a thread, 32 scales and 32 zeros a thread a
# step, local SASS), "group" once a group into registers by plain loads (cached, latency exposed
# once a group), "ahead" likewise one group ahead (more registers, latency hidden).
# Split K: where the output tiles are fewer than the SMs (q|k|v, o and down below ~256 tokens:
# 32-48 tiles on 132 SMs), each tile's K is cut into splits run by programs of their own, which
# write float32 partials that one sum adds (in order: deterministic) and rounds once.

@triton.jit
def _quant_gemm_kernel(x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, M, N, K, W_ROW, K_PER_SPLIT,
                       INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                       INT4_VEC: tl.constexpr, INT4_SCALES: tl.constexpr, INTERPRET: tl.constexpr):
    """out[pid_k] = x[:, ks] @ W[ks, :] over the rows ks of split pid_k (K_PER_SPLIT, a multiple of
    BLOCK_K); out is [M, N] in x's dtype with one split, float32 [splits, M, N] partials with more."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m
    pid_n = pid // grid_m
    m_offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m_offs < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    HELD: tl.constexpr = INT4_SCALES != "step"  # the group's scales and zeros live in registers
    if INT4 and HELD:
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        z = tl.zeros([BLOCK_N], dtype=tl.float32)
        if INT4_SCALES == "ahead":
            s_next, z_next = _group_scales(scale_ptr, zero_ptr, k_start // GROUP_SIZE, N, cols, col_ok)
    for k0 in range(k_start, tl.minimum(K, k_start + K_PER_SPLIT), BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # every row is inside K
            row_ok = rows >= 0
        else:
            row_ok = rows < K
        xt = tl.load(x_ptr + m_offs[:, None] * K + rows[None, :], mask=m_ok[:, None] & row_ok[None, :], other=0.0)
        if INT4:
            if not HELD:
                s, z = _group_scales(scale_ptr, zero_ptr, k0 // GROUP_SIZE, N, cols, col_ok)
            elif (k0 % GROUP_SIZE == 0) | (k0 == k_start):  # a split may start inside a group
                if INT4_SCALES == "ahead":
                    s, z = s_next, z_next
                    following = tl.minimum(k0 // GROUP_SIZE + 1, K // GROUP_SIZE - 1)  # the last: again
                    s_next, z_next = _group_scales(scale_ptr, zero_ptr, following, N, cols, col_ok)
                else:
                    s, z = _group_scales(scale_ptr, zero_ptr, k0 // GROUP_SIZE, N, cols, col_ok)
            w = _int4_codes(w_ptr, rows, row_ok, pid_n * BLOCK_N, W_ROW, BLOCK_N, INTERPRET, INT4_VEC)
            wt = _rounded(w * s[None, :] + z[None, :], dtype, INTERPRET)
        else:
            wt = _rounded(_dequantized_tile(w_ptr, scale_ptr, zero_ptr, rows, row_ok, pid_n * BLOCK_N, N, W_ROW,
                                            0, INT4, BLOCK_N, INTERPRET), dtype, INTERPRET)
        if INTERPRET:  # the interpreter's bf16 dot is unreliable: fp32 of the same operands
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    out = out_ptr + pid_k * M * N + m_offs[:, None] * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & (cols[None, :] < N))


class GemmConfig(NamedTuple):
    """A launch of _quant_gemm_kernel: its tile, warps, pipeline depth, register cap (None: none), K
    splits (None: quant_gemm_splits decides), int4's bytes a thread reads together (_int4_codes'
    INT4_VEC) and where int4's scales come from ("step", "group" or "ahead": the kernel's
    INT4_SCALES). int8 ignores the last two."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    max_registers: int | None = None
    split_k: int | None = None
    int4_vec: int = 4
    int4_scales: str = "group"


def quant_gemm_config(m: int, group_size: int) -> GemmConfig:
    """The launch for an M-row product. A heuristic, not tuned: the smallest row block that holds M
    up to 128 rows, 256-row blocks past it (the conversion, per weight, is shared by more rows).
    A program waits for its wgmma every step (local SASS), so the conversion of one program can
    only overlap another's product: the register caps let three 64-row programs (162 registers)
    or two 128-row ones (128, 8 bytes spilled) share an SM. int4's BLOCK_K is at most its group.
    int4 reads 4 bytes of a packed row a thread, with a group's scales in registers: the fastest of
    16 / 4 / 2 bytes and per-step / per-group / a-group-ahead scales on every 8B matrix at 16-128 rows
    with these tiles (H200, benchmarks/results/int4_vec_2026_12_05/); the 256-row tile was measured
    at 128 rows only, where per-step scales beat held ones (gate|up 185 against 206 us), so it keeps them."""
    block_k = 64 if group_size == 0 else min(64, group_size)
    if m <= 64:
        return GemmConfig(64, 128, block_k, 4, 3, 168)
    if m <= 128:
        return GemmConfig(128, 128, block_k, 8, 3, 128)
    return GemmConfig(256, 128, block_k, 8, 3, int4_scales="step")


INT4_SCALES = ("step", "group", "ahead")  # GemmConfig.int4_scales: see the kernel's comment
MIN_SPLIT_STEPS = 8  # BLOCK_K steps a split runs at least: shorter ones pay more for partials than they gain


def quant_gemm_splits(tiles: int, k: int, block_k: int, sms: int) -> int:
    """K splits for `tiles` output tiles on `sms` SMs: doubled while the programs are fewer than the
    SMs and each split stays at least MIN_SPLIT_STEPS steps long; 1 where the tiles fill the SMs.
    8B at 64 tokens on 132 SMs: q|k|v (48 tiles) 4, o (32) 8, down (32) 8, gate|up (224) 1."""
    splits = 1
    while tiles * splits < sms and k >= splits * 2 * MIN_SPLIT_STEPS * block_k:
        splits *= 2
    return splits


def quant_gemm_triton(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                      config: GemmConfig | None = None) -> Tensor:
    """x [M, K] (bf16/fp16) @ the real weight of an int8 / packed int4 matrix (as dequantize_triton
    takes it) -> [M, N] in x's dtype, float32 accumulation; `config` overrides the heuristic
    (benchmarks/bench_prefill.py --gemm_configs). Rejects, one line, what dequantize_triton
    rejects, x of another dtype, shape or device, non-contiguous x, M*K, M*N or splits*M*N of 2**31
    or more, an int4 BLOCK_K that does not divide the group, an int4_vec other than 1-16 bytes
    (a power of two) and an unknown int4_scales."""
    fmt, n = _checked_format(w, scales, zeros, group_size, x.dtype, "quant_gemm_triton")
    k = w.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"quant_gemm_triton needs x [M, {k}], got shape {tuple(x.shape)}.")
    if x.device != w.device or not x.is_contiguous():
        raise ValueError(f"quant_gemm_triton needs a contiguous x on w's device {w.device}.")
    m = x.shape[0]
    if max(m * k, m * n) >= 2**31:
        raise ValueError(f"quant_gemm_triton uses 32-bit offsets: M*K and M*N must be below 2**31 (M={m}).")
    if m == 0:
        return x.new_empty(0, n)
    cfg = config or quant_gemm_config(m, group_size)
    if cfg.int4_vec not in (1, 2, 4, 8, 16):
        raise ValueError(f"quant_gemm_triton: int4_vec must be 1, 2, 4, 8 or 16 bytes, got {cfg.int4_vec}.")
    if cfg.int4_scales not in INT4_SCALES:
        raise ValueError(f"quant_gemm_triton: int4_scales must be one of {INT4_SCALES}, got {cfg.int4_scales!r}.")
    if fmt == FMT_INT4 and group_size % cfg.block_k:
        raise ValueError(f"quant_gemm_triton: int4's BLOCK_K must divide its group, got {cfg.block_k} for "
                         f"{group_size}.")
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    splits = cfg.split_k or quant_gemm_splits(tiles, k, cfg.block_k, _sm_count(x.device))
    k_per_split = cdiv(cdiv(k, splits), cfg.block_k) * cfg.block_k
    splits = cdiv(k, k_per_split)  # a split past K would only write zeros
    if splits * m * n >= 2**31:
        raise ValueError(f"quant_gemm_triton uses 32-bit offsets: splits*M*N must be below 2**31 ({splits} splits).")
    out = x.new_empty(m, n) if splits == 1 else x.new_empty(splits, m, n, dtype=torch.float32)
    registers = {"maxnreg": cfg.max_registers} if cfg.max_registers and not INTERPRETED else {}
    _quant_gemm_kernel[(tiles, splits)](
        x, w, scales, scales if zeros is None else zeros, out, m, n, k, w.shape[1], k_per_split,
        INT4=fmt == FMT_INT4, GROUP_SIZE=max(group_size, 1), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0, INT4_VEC=cfg.int4_vec, INT4_SCALES=cfg.int4_scales,
        INTERPRET=INTERPRETED, num_warps=cfg.warps, num_stages=cfg.stages, **registers)
    return out if splits == 1 else out.sum(0).to(x.dtype)  # the float32 partials summed, rounded once


def _sm_count(device: torch.device) -> int:
    """The device's SMs; the interpreter (CPU) counts an H100's 132, so its splits are a GPU's."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
