"""Split-KV flash-decode attention over the filled prefix of a static KV cache.

    out[b, h] = softmax_s(q[b, h] . k[b, h // G, s] * scale) @ v[b, h // G, s],  s = 0..p

One new query per sequence (decode), G = H // Hkv query heads per KV head (GQA), and
p = input_pos[0] the position just written into the cache (the same for every batch row,
as in model.py).  Positions beyond p are never read, so the cost grows with the context
instead of with the cache size, and garbage there (stale or NaN) cannot leak in.

p is read inside the kernels from the device tensor ``input_pos``, never on the host:
the call is captured once in a CUDA graph and replayed with a changing position.  So
the grid is fixed (by B, Hkv, S_max and the GPU's SM count), and the kernels derive the
work split from p:

  * The filled prefix 0..p is cut into NUM_SPLITS chunks of equal length, rounded up to
    whole BLOCK_S tiles: chunk = ceil(ceil((p + 1) / NUM_SPLITS) / BLOCK_S) * BLOCK_S.
    Short contexts use only the first few splits; long ones spread over all of them, so
    every context keeps as many SMs busy as it can use (a chunk length fixed by S_max
    would leave 1024 positions of Llama-3-8B on 32 programs).
  * Stage 1 (``_split_kernel``), grid (B * Hkv, NUM_SPLITS).  A program owns one (batch,
    KV head, chunk) and all G query heads of that group, so each K/V tile is read once
    per group: the scores are one [G, D] x [D, BLOCK_S] dot per tile, followed by an
    online softmax in fp32.  A program whose chunk starts beyond p returns at once,
    writing nothing.  The others store their normalized output and log-sum-exp (base 2).
  * Stage 2 (``_combine_kernel``), grid (B * H,), reads p again, so it knows how many
    chunks hold data (ceil((p + 1) / chunk)), and merges them with the log-sum-exp rule.
  * With NUM_SPLITS = 1, stage 1 writes the output itself and stage 2 is not launched.

The fused decode step (FUSED): stage 1 reads q from the q|k|v projection row and applies RoPE
itself, and the program whose chunk holds p writes the rotated key and the value of the new token
into the caches (and uses them in place of what its first tile read there): RoPE, the cache write
and attention in one launch. Under PDL stage 1 reads its first tile before it waits for the
previous kernel (see _split_kernel).

Entry points: ``decode_attention_triton`` and ``decode_attention_step_triton`` (launchers with
explicit split count and tile, for tests and tuning); the model reaches them through the
``teal::decode_attention`` / ``teal::decode_attention_step`` ops of teal_kernels/ops.py. The plain-torch
definitions (and the argument checks) are in teal_kernels/reference.py.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from teal_kernels.attention_tiles import LOG2E, attend_tile, default_block_s, kv_tile, load_position, new_token
from teal_kernels.reference import (MAX_GROUP, SHORT_TILES_ENV, env_switch, validate_attention as _validate,
                                    validate_step)
from teal_kernels.triton_gemv import cdiv, launch_options, next_power_of_2

__all__ = ["INTERPRETED", "MAX_SPLITS", "decode_attention_step_triton", "decode_attention_triton",
           "block_s_for", "default_block_s", "default_num_splits"]

MAX_SPLITS = 64  # stage 2 holds [MAX_SPLITS, D] fp32 partials in registers
PROGRAMS_PER_SM = 2  # stage-1 programs to aim for per SM (D=128 bf16: ~70 KB shared memory, 135 registers)
CPU_SM_COUNT = 132  # stand-in under the interpreter (an H200's count), so CPU runs split like the GPU


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


# SHORT_TILES_ENV (teal_kernels/reference.py, where decode.py checks it without Triton; on by default,
# 0 turns it off): caches of at most SHORT_CACHE positions take 16-position tiles. The longer tile (64
# for D = 128 in bf16) compiles to 255 registers with spills; 16 does not. H100, one call, µs a layer
# (results/att_tiles_2026_12_05/): 5.76 against 6.85 at 128 positions, 8.52 against 8.60 at 1024, 13.28
# against 12.42 at 4096 (so longer caches keep the long tile). End to end, Llama-3-8B, alternating in one
# process (H100, 2026-12-05, results/int4_defaults_2026_12_05/): int4-g128 + int8 head 396.8 / 396.2 ->
# 401.6 / 402.2 tok/s dense, bf16 166.9 / 165.7 -> 167.5 / 167.4 dense and 254.3 / 253.9 -> 255.3 /
# 255.1 at 50%. The step's graph is captured once per cache, so the tile follows the cache's size,
# never the position.
SHORT_CACHE = 1024


def block_s_for(d: int, elem_bytes: int, s_max: int) -> int:
    """Positions a tile for a cache of s_max positions: default_block_s, or 16 for a short cache
    where SHORT_TILES_ENV is on (the default)."""
    if s_max <= SHORT_CACHE and env_switch(SHORT_TILES_ENV, default="1"):
        return 16
    return default_block_s(d, elem_bytes)


def default_num_splits(batch: int, n_kv: int, s_max: int, block_s: int, sm_count: int) -> int:
    """Splits per (batch, KV head): enough for ~PROGRAMS_PER_SM programs per SM on a long context.

    A power of two, at most MAX_SPLITS and at most one per BLOCK_S tile of the cache.  Fixed
    by shapes only (not by the position), so one CUDA graph serves every decode step.
    """
    want = max(1, cdiv(PROGRAMS_PER_SM * sm_count, batch * n_kv))
    splits = min(MAX_SPLITS, cdiv(s_max, block_s), want)
    return 1 << (splits.bit_length() - 1)  # round down to a power of two


@triton.jit
def _chunk_len(p, NUM_SPLITS, BLOCK_S: tl.constexpr):
    """Positions per split for the prefix 0..p: an equal share, rounded up to whole tiles."""
    return tl.cdiv(tl.cdiv(p + 1, NUM_SPLITS), BLOCK_S) * BLOCK_S


# ---------------------------------------------------------------------------
# Stage 1: one program per (batch, KV head, chunk), all query heads of the group
# ---------------------------------------------------------------------------


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, o_part_ptr, lse_part_ptr, cs_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    qk_scale_log2,  # scale * log2(e): the softmax runs in base 2
    H_KV, S_MAX, NUM_SPLITS,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # power of two >= 16 (tl.dot's smallest M)
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SINGLE: tl.constexpr,  # one chunk covers the cache: write the final output directly
    DOT_FP32: tl.constexpr,  # fp32 operands with IEEE products (fp32 inputs; interpreter)
    FUSED: tl.constexpr,  # q_ptr is the q|k|v projection row: RoPE q and k, write k and v at p
    PDL: tl.constexpr,  # launched early: wait for the previous kernel before reading what it wrote
):
    # Before the PDL wait this kernel reads only what earlier kernels wrote, never the previous
    # one (the q|k|v projection): the position (written before the step) and, FUSED, the chunk's
    # first K/V tile (positions below p, written by earlier steps; p itself is this kernel's own
    # write, patched in below). So the first tile's latency hides behind the previous kernel, as
    # the preload GEMV's weights do (teal_kernels/preload_gemv.py). A kernel launched under PDL
    # starts only once the previous one has passed its own wait, so every earlier kernel is done.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    p = load_position(pos_ptr, S_MAX)
    chunk = _chunk_len(p, NUM_SPLITS, BLOCK_S)
    start = split * chunk
    if start > p:
        return  # chunk entirely beyond the filled prefix: stage 2 does not read it
    end = tl.minimum(start + chunk, p + 1)

    b = (pid_bh // H_KV).to(tl.int64)
    kvh = (pid_bh % H_KV).to(tl.int64)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    g_ok = g < GROUP
    heads = kvh * GROUP + g  # query heads of this KV head
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    s = start + tl.arange(0, BLOCK_S)
    s_ok = s < end  # every tile holds at least one valid position, so m_i stays finite
    if FUSED:
        k, v = kv_tile(k_base, v_base, s, s_ok, d, stride_ks, stride_kd, stride_vs, stride_vd)
    if PDL:
        tl.extra.cuda.gdc_wait()
    if not FUSED:  # the cache at p may be the previous kernel's write (model.py's cache update)
        k, v = kv_tile(k_base, v_base, s, s_ok, d, stride_ks, stride_kd, stride_vs, stride_vd)

    if FUSED:
        # Row b of q|k|v: H*D query values, then H_KV*D keys, then H_KV*D values (stride_qb apart).
        row = q_ptr + b * stride_qb
        q, k_new, v_new = new_token(row, heads, g_ok, kvh, H_KV, GROUP, cs_ptr, GROUP_PAD, D)
        k = tl.where((s == p)[:, None], k_new, k)  # the first tile may hold p: its new key and value
        v = tl.where((s == p)[:, None], v_new[None, :], v)
        if end == p + 1:  # this chunk holds position p: write the new key and value
            tl.store(k_base + p * stride_ks + d[None, :] * stride_kd, k_new)
            tl.store(v_base + p * stride_vs + d * stride_vd, v_new)
            tl.debug_barrier()  # the stores are visible to every thread before the loop's tiles load
    else:
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=g_ok[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    m_i, l_i, acc = attend_tile(q, k, v, s_ok, m_i, l_i, acc, qk_scale_log2, DOT_FP32)
    for s0 in range(start + BLOCK_S, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        k, v = kv_tile(k_base, v_base, s, s_ok, d, stride_ks, stride_kd, stride_vs, stride_vd)
        m_i, l_i, acc = attend_tile(q, k, v, s_ok, m_i, l_i, acc, qk_scale_log2, DOT_FP32)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()

    acc = acc / l_i[:, None]
    rows = (b * H_KV + kvh) * GROUP + g  # flat (batch, query head) index
    if SINGLE:
        tl.store(out_ptr + rows[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        part = rows * NUM_SPLITS + split
        tl.store(o_part_ptr + part[:, None] * D + d[None, :], acc, mask=g_ok[:, None])
        tl.store(lse_part_ptr + part, m_i + tl.log2(l_i), mask=g_ok)


# ---------------------------------------------------------------------------
# Stage 2: merge the chunks that hold data, one program per (batch, query head)
# ---------------------------------------------------------------------------


@triton.jit
def _combine_kernel(
    o_part_ptr, lse_part_ptr, pos_ptr, out_ptr,
    S_MAX, NUM_SPLITS,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # p was written before the step, so it is read before the PDL wait: after the wait the partials
    # are then one round trip, not two (local sm_90 SASS; measured together with the GEMV's epilogue
    # loads, teal_kernels/triton_gemv.py's _column_block_output)
    p = load_position(pos_ptr, S_MAX)
    n_valid = tl.cdiv(p + 1, _chunk_len(p, NUM_SPLITS, BLOCK_S))  # the rest hold stale memory
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    sp_ok = sp < n_valid
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    lse = tl.load(lse_part_ptr + row * NUM_SPLITS + sp, mask=sp_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))  # chunk 0 always holds data: the max is finite
    o = tl.load(o_part_ptr + (row * NUM_SPLITS + sp[:, None]) * D + d[None, :], mask=sp_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------

INTERPRETED = not isinstance(_split_kernel, JITFunction)  # TRITON_INTERPRET=1 at import


def _launch(q_src: Tensor, q_strides: tuple[int, int, int], cs: Tensor, fused: bool, b: int, h: int,
            k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float | None,
            num_splits: int | None, block_s: int | None, num_warps: int) -> Tensor:
    """Stage 1 (+ stage 2 when split) for q given as [B, H, D] strides (plain) or as q|k|v rows."""
    if q_src.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    h_kv, s_max, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if block_s is None:
        block_s = block_s_for(d, k_cache.element_size(), s_max)
    if block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"block_s must be a power of two >= 16 (tl.dot tile), got {block_s}.")
    if num_splits is None:
        num_splits = default_num_splits(b, h_kv, s_max, block_s, _sm_count(q_src.device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}.")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    single = num_splits == 1

    out = torch.empty((b, h, d), dtype=k_cache.dtype, device=k_cache.device)
    if single:  # stage 1 writes `out`; the partial pointers are unused
        o_part = lse_part = out
    else:
        o_part = torch.empty((b * h, num_splits, d), dtype=torch.float32, device=out.device)
        lse_part = torch.empty((b * h, num_splits), dtype=torch.float32, device=out.device)

    pdl = launch_options(q_src.device)
    _split_kernel[(b * h_kv, num_splits)](
        q_src, k_cache, v_cache, input_pos, out, o_part, lse_part, cs,
        *q_strides, *k_cache.stride(), *v_cache.stride(),
        scale * LOG2E, h_kv, s_max, num_splits,
        GROUP=h // h_kv, GROUP_PAD=max(16, next_power_of_2(h // h_kv)), D=d,
        BLOCK_S=block_s, SINGLE=single,
        DOT_FP32=INTERPRETED or k_cache.dtype == torch.float32, FUSED=fused, PDL=bool(pdl),
        num_warps=num_warps, **pdl,
    )
    if not single:
        _combine_kernel[(b * h,)](
            o_part, lse_part, input_pos, out, s_max, num_splits,
            D=d, BLOCK_S=block_s, SPLITS_PAD=next_power_of_2(num_splits), PDL=bool(pdl),
            num_warps=4 if num_splits * d <= 4096 else 8, **pdl,
        )
    return out


def decode_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
    block_s: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """Run the Triton kernels (on CUDA, or on CPU under TRITON_INTERPRET=1).

    ``num_splits`` (default ``default_num_splits``, 1..MAX_SPLITS) and ``block_s`` (positions
    per tile, a power of two >= 16, default ``block_s_for``) are exposed for tests and
    tuning.  Positions outside 0..S_max-1 are clamped in the kernel (a host check would sync).
    """
    _validate(q, k_cache, v_cache, input_pos, scale)
    return _launch(q, q.stride(), q, False, q.shape[0], q.shape[1], k_cache, v_cache, input_pos, scale,
                   num_splits, block_s, num_warps)


def decode_attention_step_triton(
    qkv: Tensor,
    freqs_cis: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    n_head: int,
    scale: float | None = None,
    num_splits: int | None = None,
    block_s: int | None = None,
    num_warps: int = 4,
) -> Tensor:
    """The decode step of attention in one op: RoPE on q and k, k and v written into the caches at
    position p, attention over 0..p. qkv [B, (n_head + 2 Hkv) D] is the fused projection's output,
    freqs_cis the (cos, sin) pairs of position p ([D/2, 2] float32, any leading ones).
    Mutates k_cache and v_cache; returns [B, n_head, D]."""
    q_shape = validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)
    b = q_shape[0]
    return _launch(qkv, (qkv.stride(0), 0, 0), freqs_cis, True, b, n_head, k_cache, v_cache, input_pos, scale,
                   num_splits, block_s, num_warps)
