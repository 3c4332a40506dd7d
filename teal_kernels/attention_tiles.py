"""Triton pieces of decode attention that two kernels share: the split-KV attention kernels
(teal_kernels/attention.py) and the sparse GEMV's attention prologue, where o's GEMV computes its
own input (teal_kernels/triton_gemv.py, ATTENTION). A module of their own, so that neither kernel
file imports the other.

K/V caches are [B, Hkv, S_max, D] with contiguous rows of D; a q|k|v row holds the n_head query
heads, then the Hkv keys, then the Hkv values, D values each. The softmax runs online in fp32,
base 2 (scores scaled by scale * log2(e)).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def default_block_s(d: int, elem_bytes: int) -> int:
    """Positions per tile: 16 KB of K (and of V) per tile, 16..64 positions (tl.dot needs >= 16)."""
    return max(16, min(64, 16384 // (d * elem_bytes)))


@triton.jit
def load_position(pos_ptr, S_MAX):
    """p from the device, clamped to 0..S_MAX-1 so that a bad value cannot read out of bounds."""
    return tl.minimum(tl.maximum(tl.load(pos_ptr).to(tl.int32), 0), S_MAX - 1)


@triton.jit
def rotate_pairs(x_ptr, rows, ok, cs_ptr, N: tl.constexpr, D: tl.constexpr):
    """RoPE of rows of length D at x_ptr + rows * D: pairs (2i, 2i+1) rotated by cs[i] = (cos, sin),
    in fp32 as model.apply_rotary_emb, rounded back to x's dtype; [len(rows), D] in pair order."""
    i = tl.arange(0, D // 2)
    even = tl.load(x_ptr + rows[:, None] * D + 2 * i[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    odd = tl.load(x_ptr + rows[:, None] * D + 2 * i[None, :] + 1, mask=ok[:, None], other=0.0).to(tl.float32)
    cos = tl.load(cs_ptr + 2 * i)[None, :]
    sin = tl.load(cs_ptr + 2 * i + 1)[None, :]
    out = tl.join(even * cos - odd * sin, odd * cos + even * sin)  # [rows, D/2, 2]
    return tl.reshape(out, [N, D]).to(x_ptr.dtype.element_ty)


@triton.jit
def new_token(row, heads, heads_ok, kvh, H_KV, GROUP, cs_ptr, HEADS_PAD: tl.constexpr, D: tl.constexpr):
    """From the q|k|v row of the new token: the query heads `heads` [HEADS_PAD, D] and KV head kvh's
    key [1, D], both rotated (RoPE), and its value [D]."""
    n_head = H_KV * GROUP
    q = rotate_pairs(row, heads, heads_ok, cs_ptr, HEADS_PAD, D)
    one = tl.arange(0, 1)
    k_new = rotate_pairs(row + n_head * D, kvh + one, one == 0, cs_ptr, 1, D)
    v_new = tl.load(row + (n_head + H_KV + kvh) * D + tl.arange(0, D))
    return q, k_new, v_new


@triton.jit
def kv_tile(k_base, v_base, s, s_ok, d, stride_ks, stride_kd, stride_vs, stride_vd):
    """K and V at positions s ([BLOCK_S, D] each; zeros where not s_ok)."""
    k = tl.load(k_base + s[:, None] * stride_ks + d[None, :] * stride_kd, mask=s_ok[:, None], other=0.0)
    v = tl.load(v_base + s[:, None] * stride_vs + d[None, :] * stride_vd, mask=s_ok[:, None], other=0.0)
    return k, v


@triton.jit
def attend_tile(q, k, v, s_ok, m_i, l_i, acc, qk_scale_log2, DOT_FP32: tl.constexpr):
    """One K/V tile [BLOCK_S, D] into the online softmax of the group's queries q [GROUP_PAD, D]:
    (running max, running sum, output accumulator) in fp32, base 2."""
    if DOT_FP32:
        scores = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        scores = tl.dot(q, tl.trans(k))  # bf16/fp16 operands, fp32 accumulation
    scores = tl.where(s_ok[None, :], scores * qk_scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    probs = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    if DOT_FP32:
        pv = tl.dot(probs, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(probs.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def heads_attention(row, cs_ptr, k_ptr, v_ptr, pos_ptr, S_MAX, stride_kh, stride_ks, qk_scale_log2, head0, writes,
                    H_KV, GROUP: tl.constexpr, HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, D: tl.constexpr,
                    BLOCK_S: tl.constexpr, KV_STAGES: tl.constexpr, DOT_FP32: tl.constexpr):
    """The attention output of the new token (q|k|v row `row`, batch row 0 of the caches) for the
    HEADS query heads head0 .. head0 + HEADS - 1 (all in one KV group) over positions 0..p, as one
    program computes it: the cache's tiles of positions 0..p-1 in turn, KV_STAGES of them in flight,
    then position p. Returns [HEADS * D] in head order, fp32 values rounded to the cache's dtype (as
    the attention op's output is).

    With `writes` the program stores the new key and value at p. Every program takes them from
    registers, as one last step of the online softmax after the loop, so none depends on another's
    write having landed, and no tile needs patching at p (two selects a K/V element)."""
    p = load_position(pos_ptr, S_MAX)
    kvh = head0 // GROUP
    hb = tl.arange(0, HEADS_PAD)  # tl.dot's rows: at least 16, the heads past HEADS are zero queries
    q, k_new, v_new = new_token(row, head0 + hb, hb < HEADS, kvh, H_KV, GROUP, cs_ptr, HEADS_PAD, D)
    if DOT_FP32:
        q = q.to(tl.float32)
    d = tl.arange(0, D)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_kh
    if writes:
        tl.store(k_base + p * stride_ks + d[None, :], k_new)
        tl.store(v_base + p * stride_ks + d, v_new)
    m_i = tl.full([HEADS_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HEADS_PAD], dtype=tl.float32)
    acc = tl.zeros([HEADS_PAD, D], dtype=tl.float32)
    for s0 in tl.range(0, p, BLOCK_S, num_stages=KV_STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < p
        k, v = kv_tile(k_base, v_base, s, s_ok, d, stride_ks, 1, stride_ks, 1)
        m_i, l_i, acc = attend_tile(q, k, v, s_ok, m_i, l_i, acc, qk_scale_log2, DOT_FP32)
    # position p, as attend_tile would take it: fp32 products of the operands, the probability
    # rounded to V's dtype for the product with V (tl.dot's bf16 / fp16 operands)
    score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1) * qk_scale_log2
    m_new = tl.maximum(m_i, score)
    alpha = tl.exp2(m_i - m_new)
    prob = tl.exp2(score - m_new)
    l_i = l_i * alpha + prob
    prob_v = prob if DOT_FP32 else prob.to(v_new.dtype).to(tl.float32)
    acc = acc * alpha[:, None] + prob_v[:, None] * v_new.to(tl.float32)[None, :]
    out = (acc / l_i[:, None]).to(k_ptr.dtype.element_ty).to(tl.float32)
    # rows 0..HEADS-1 of [HEADS_PAD, D], flattened: the first of HEADS_PAD // HEADS slabs of HEADS rows
    slabs = tl.reshape(out, [HEADS_PAD // HEADS, HEADS, D])
    first = (tl.arange(0, HEADS_PAD // HEADS) == 0)[:, None, None]
    return tl.reshape(tl.sum(tl.where(first, slabs, 0.0), axis=0), [HEADS * D])
