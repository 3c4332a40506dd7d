"""Weight formats of the TEAL decode path, their validation, and the plain-torch reference product.

This module imports no Triton: it is what runs on the CPU (and on any platform where Triton is not
installed), and the definition the Triton kernels are tested against.

    out[m, n] = sum_k W[k, n] * x[m, k] * (|x[m, k]| > thresholds[seg(n)])

The weight is stored transposed, ``w`` of shape [K, N], so dropping input ``k`` means not reading
one contiguous row. Formats (told apart by ``w.dtype``):
  * bf16 / fp16 (float32 on the CPU) ``w`` [K, N], the same dtype as ``x``;
  * int8 ``w`` [K, N] with float32 ``scales`` [N]:  W = w * scales[n];
  * int4 ``w`` uint8 [K, N // 2] (column 2j in the low nibble of byte j, 2j + 1 in the high
    nibble) with float32 ``scales``/``zeros`` [K // group_size, N] (or, as both, the int32 words of
    pack_scales_zeros: the two rounded to bf16):
    W = (q - 8) * scales[k // g, n] + zeros[k // g, n].
Output segments: ``split_sizes`` cut N into segments (fused q|k|v: three, gate|up: two) that share
the input but each have their own threshold.

Three fusions for the decode path (decode.py): ``gated`` takes x as the gate|up projection's output
[M, 2K] and uses x = SiLU(gate) * up (computed in float32, rounded once to x's dtype) as the input;
``residual`` [M, N] is added to the output (the product rounded to x's dtype first, then the sum),
which is what the unfused model computes; ``norm_weight`` [K] (with ``eps``) takes x as the
residual stream and uses model.RMSNorm's output as the input (``rms_normed``).
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor


def env_switch(name: str, default: str = "0") -> bool:
    """An on/off environment switch: "1" on, "0" off; any other value is an error."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


# Decode attention in 16-position tiles where the cache is short (teal_kernels/attention.block_s_for says
# why; on by default): named here, Triton-free, so that decode.py can check a bad value at install.
SHORT_TILES_ENV = "TEAL_ATTENTION_SHORT_TILES"

MAX_BATCH = 8  # rows of x the decode kernels take; larger batches are GEMMs (dequantize + matmul)
# rows the Triton kernel's "dot" design takes (tl.dot tiles of up to 64 rows): an int8/int4 model's
# short prefills on CUDA read the quantized weights once, without a bf16 copy (PackedLinear decides)
MAX_DOT_ROWS = 64
MAX_SEGMENTS = 8
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # activation dtypes of the decode kernels
ATTENTION_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
MAX_GROUP = 64  # query heads per KV head the attention kernel takes (its accumulator is in registers)
INT4_GROUP_SIZES = (32, 64, 128)

# Weight-format codes (the Triton kernels take them as a constexpr).
FMT_FLOAT, FMT_INT8, FMT_INT4 = 0, 1, 2


def dequantize_weight(
    w: Tensor, scales: Tensor | None = None, zeros: Tensor | None = None, group_size: int = 0
) -> Tensor:
    """Return the real weight W^T as float32 [K, N] for any of the three formats."""
    if w.dtype in (torch.bfloat16, torch.float16, torch.float32):
        return w.float()
    if w.dtype == torch.int8:
        if scales is None:
            raise ValueError("int8 weights need per-output-channel float32 scales of shape [N].")
        return w.float() * scales.float()
    if w.dtype == torch.uint8:
        if scales is None or zeros is None or group_size <= 0:
            raise ValueError("int4 weights need scales, zeros and a positive group_size.")
        if scales.dtype == torch.int32:
            scales, zeros = unpack_scales_zeros(scales)
        k = w.shape[0]
        # [groups, group_size, N]: the group's scale and zero broadcast, never expanded to [K, N]
        q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k // group_size, group_size, -1).float() - 8.0
        return (q * scales.float()[:, None] + zeros.float()[:, None]).reshape(k, -1)
    raise TypeError(f"Unsupported weight dtype {w.dtype}; expected bf16, fp16, int8 or uint8 (packed int4).")


def dot_design_fits(int4: bool, k: int, split_sizes: list[int]) -> bool:
    """Whether the Triton kernel's "dot" design takes a matrix of K rows and these output segments:
    tiles of at least 16 rows (K a multiple of 16) whose columns stay in one segment (each a
    multiple of 16; of 128 for int4, whose nibble planes of a tile's columns are tl.dot tiles)."""
    return k % 16 == 0 and min(s & -s for s in split_sizes) >= (128 if int4 else 16)


def weight_format_name(w: Tensor, group_size: int = 0) -> str:
    """Config-table name of a weight format: bf16, fp16, fp32, int8 or int4-g{group_size}."""
    if w.dtype == torch.uint8:
        return f"int4-g{group_size}"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "int8"}[w.dtype]


def validate(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None,
    zeros: Tensor | None,
    group_size: int,
    for_kernel: bool,
    gated: bool = False,
    residual: Tensor | None = None,
    norm_weight: Tensor | None = None,
    max_rows: int = MAX_BATCH,
) -> int:
    """Check every argument of a sparse GEMV; return the format code.

    ``for_kernel`` adds the limits of the decode kernels (at most ``max_rows`` rows, contiguity,
    32-bit offsets) and refuses float32 (the reference also serves float32 models on the CPU for
    quality work).
    """
    x_dtypes = {torch.bfloat16: "bf16", torch.float16: "fp16"} | ({} if for_kernel else {torch.float32: "fp32"})
    if x.dtype not in x_dtypes:
        raise TypeError(f"x must be {' or '.join(x_dtypes.values())}, got {x.dtype}.")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}.")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [K, N] (transposed weight), got shape {tuple(w.shape)}.")
    m, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    if w.shape[0] != k or (gated and x.shape[1] != 2 * k):
        what = "x [M, 2K] (gate | up)" if gated else "x [M, K]"
        raise ValueError(f"w must have K={k} rows to match {what} of shape {tuple(x.shape)}, "
                         f"got shape {tuple(w.shape)}.")

    fmt, n = weight_format(w, x.dtype, tuple(x_dtypes), scales, zeros, group_size)

    if not isinstance(split_sizes, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in split_sizes):
        raise ValueError(f"split_sizes must be a list of positive ints, got {split_sizes!r}.")
    if not 1 <= len(split_sizes) <= MAX_SEGMENTS:
        raise ValueError(f"split_sizes must have 1..{MAX_SEGMENTS} entries, got {len(split_sizes)}.")
    if sum(split_sizes) != n:
        raise ValueError(f"split_sizes must sum to N={n}, got sum {sum(split_sizes)}.")
    if fmt == FMT_INT4 and any(s % 2 for s in split_sizes):
        raise ValueError(f"int4 split_sizes must be even (two columns per byte), got {split_sizes}.")
    if thresholds.dtype != torch.float32 or thresholds.shape != (len(split_sizes),):
        raise ValueError(
            f"thresholds must be float32 of shape [{len(split_sizes)}] (one per segment), "
            f"got {thresholds.dtype} {tuple(thresholds.shape)}."
        )
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype):
        raise ValueError(f"residual must be {x.dtype} of shape [{m}, {n}], got {residual.dtype} "
                         f"{tuple(residual.shape)}.")
    if norm_weight is not None and (gated or norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"norm_weight must be {x.dtype} of shape [{k}] and cannot go with gated, got "
                         f"{norm_weight.dtype} {tuple(norm_weight.shape)}{' (gated)' if gated else ''}.")
    for name, t in (("w", w), ("thresholds", thresholds), ("scales", scales), ("zeros", zeros),
                    ("residual", residual), ("norm_weight", norm_weight)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}.")

    if for_kernel:
        if not 1 <= m <= max_rows:
            raise ValueError(f"sparse_gemv handles batch 1..{max_rows} here, got M={m}; use the dense path instead.")
        for name, t in (("x", x), ("w", w), ("thresholds", thresholds), ("scales", scales), ("zeros", zeros),
                        ("residual", residual), ("norm_weight", norm_weight)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous.")
        if k * n >= 2**31:
            raise ValueError(f"K*N must be below 2**31 for 32-bit offsets, got K={k}, N={n}.")
    return fmt


def weight_format(w: Tensor, x_dtype: torch.dtype, float_dtypes: tuple[torch.dtype, ...], scales: Tensor | None,
                  zeros: Tensor | None, group_size: int) -> tuple[int, int]:
    """(format code, N) of a 2-D w [K, ...] and its scales/zeros for inputs of `x_dtype` (float w:
    one of `float_dtypes`, x's own); TypeError / ValueError, one line, where they do not fit."""
    k = w.shape[0]
    if w.dtype in float_dtypes:
        fmt, n = FMT_FLOAT, w.shape[1]
        if w.dtype != x_dtype:
            raise TypeError(f"Floating-point w must have x's dtype {x_dtype}, got {w.dtype}.")
        if scales is not None or zeros is not None or group_size != 0:
            raise ValueError("Floating-point w takes no scales, zeros or group_size.")
    elif w.dtype == torch.int8:
        fmt, n = FMT_INT8, w.shape[1]
        if zeros is not None or group_size != 0:
            raise ValueError("int8 w takes per-channel scales only (no zeros, group_size=0).")
        _check_aux("scales", scales, (n,))
    elif w.dtype == torch.uint8:
        fmt, n = FMT_INT4, 2 * w.shape[1]
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}.")
        if k % group_size != 0:
            raise ValueError(f"int4 needs K divisible by group_size, got K={k}, group_size={group_size}.")
        if scales is not None and scales.dtype == torch.int32:  # pack_scales_zeros's words, given as both
            _check_aux("scales", scales, (k // group_size, n), (torch.int32,))
            # compared by dtype and shape, not identity: Inductor's lowering hands the op two distinct tensors
            if zeros is None or zeros.dtype != torch.int32 or zeros.shape != scales.shape:
                raise ValueError("packed int4 scales (int32 words of pack_scales_zeros) go as both scales and zeros.")
        else:
            _check_aux("scales", scales, (k // group_size, n))
            _check_aux("zeros", zeros, (k // group_size, n))
    else:
        raise TypeError(f"w dtype must be bf16, fp16, int8 or uint8 (packed int4), got {w.dtype}.")
    return fmt, n


def _check_aux(name: str, t: Tensor | None, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...] = (torch.float32,)
               ) -> None:
    if t is None or t.dtype not in dtypes or tuple(t.shape) != shape:
        got = "None" if t is None else f"{t.dtype} {tuple(t.shape)}"
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be {names} of shape {list(shape)}, got {got}.")


def pack_scales_zeros(scales: Tensor, zeros: Tensor) -> Tensor:
    """int4 scales and zeros [G, N] rounded to bf16 and packed into one int32 word each (the scale in the
    high half, the zero in the low half): 4 bytes a group and output, read by one load, instead of 8 in
    two. Pass the words as both scales and zeros; every path widens them exactly (unpack_scales_zeros)."""
    high = scales.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    low = zeros.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    return (high << 16) | (low & 0xFFFF)


def unpack_scales_zeros(words: Tensor) -> tuple[Tensor, Tensor]:
    """pack_scales_zeros's words -> float32 (scales, zeros): each half placed in a float's high bits."""
    return (words & -65536).view(torch.float32), (words << 16).view(torch.float32)


def gated_input(x: Tensor) -> Tensor:
    """SiLU(gate) * up of a gate|up output [M, 2K], in float32, rounded once to x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


NORM_STATS_TILE = 16  # outputs a sum of squares covers (int4_mma's mma tile height)


def norm_statistics(out: Tensor, stats_weight: Tensor) -> tuple[Tensor, Tensor]:
    """What a projection hands the RMSNorm's consumer instead of the norm running (the statistics'
    epilogues of int4_mma and the sparse GEMV): out * stats_weight rounded to out's dtype [M, N], and
    out's squares summed a NORM_STATS_TILE-output tile, [M, N / NORM_STATS_TILE] float32."""
    h = out.float()
    return (h * stats_weight.float()).to(out.dtype), h.square().view(h.shape[0], -1, NORM_STATS_TILE).sum(dim=2)


def write_norm_statistics(out: Tensor, stats_weight: Tensor, scaled: Tensor, sumsq: Tensor) -> None:
    """norm_statistics of `out` written into the buffers `scaled` and `sumsq` (check_norm_statistics's)."""
    for buffer, value in zip((scaled, sumsq), norm_statistics(out, stats_weight)):
        buffer.copy_(value)


def check_norm_statistics(out_shape: tuple[int, int], dtype: torch.dtype, stats_weight: Tensor, scaled: Tensor,
                          sumsq: Tensor) -> None:
    """ValueError (one line) unless the statistics' buffers fit an output [M, N] of `dtype`: stats_weight [N],
    scaled [M, N] of dtype and sumsq [M, N / NORM_STATS_TILE] float32, both contiguous."""
    m, n = out_shape
    if (n % NORM_STATS_TILE or tuple(stats_weight.shape) != (n,) or tuple(scaled.shape) != (m, n)
            or tuple(sumsq.shape) != (m, n // NORM_STATS_TILE) or scaled.dtype != dtype
            or sumsq.dtype != torch.float32 or not (scaled.is_contiguous() and sumsq.is_contiguous())):
        raise ValueError(f"norm statistics of an output {dtype} [{m}, {n}] need N a multiple of {NORM_STATS_TILE}, "
                         f"a weight [{n}], contiguous scaled {dtype} [{m}, {n}] and sumsq float32 "
                         f"[{m}, {n // NORM_STATS_TILE}]; got weight {tuple(stats_weight.shape)}, scaled {scaled.dtype} "
                         f"{tuple(scaled.shape)}, sumsq {sumsq.dtype} {tuple(sumsq.shape)}")


def rms_normed(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.RMSNorm's output for x [..., K]: float32 statistics, rounded to x's dtype, times the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.type_as(x)


def masked_product(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None,
    zeros: Tensor | None,
    group_size: int,
    gated: bool = False,
    residual: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """The product itself, unvalidated: float32 math, output in x's dtype.

    Reads no tensor value on the host, so it is usable under torch.compile.
    """
    if gated:
        x = gated_input(x)
    if norm_weight is not None:
        x = rms_normed(x, norm_weight, eps)
    weight = dequantize_weight(w, scales, zeros, group_size)
    xf = x.float()
    outs = []
    for j, w_cols in enumerate(weight.split(list(split_sizes), dim=1)):
        kept = torch.where(xf.abs() > thresholds[j], xf, 0.0)
        outs.append(kept @ w_cols)
    out = torch.cat(outs, dim=1).to(x.dtype)
    return out if residual is None else (out.float() + residual.float()).to(x.dtype)


def sparse_gemv_reference(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    group_size: int = 0,
    gated: bool = False,
    residual: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
) -> Tensor:
    """Threshold-sparse x @ W^T in plain torch, any batch size, any device."""
    validate(x, w, thresholds, split_sizes, scales, zeros, group_size, False, gated, residual, norm_weight)
    return masked_product(x, w, thresholds, split_sizes, scales, zeros, group_size, gated, residual, norm_weight,
                          eps)


# ---------------------------------------------------------------------------
# Decode attention over the filled prefix of a static KV cache (teal_kernels/attention.py)
# ---------------------------------------------------------------------------


def attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float | None = None
) -> Tensor:
    """Plain-torch ``decode_attention`` in float32 (the path on a CPU without the interpreter).

    Masks positions > p with a comparison against the device tensor, so it reads no value on
    the host and stays capturable; it reads the whole cache, and masks with ``where`` so that
    non-finite garbage beyond p cannot leak in.
    """
    validate_attention(q, k_cache, v_cache, input_pos, scale)
    b, h, d = q.shape
    h_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = h // h_kv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keep = torch.arange(s_max, device=q.device) <= input_pos.reshape(1).to(torch.int64)  # [S]
    qf = q.float().view(b, h_kv, group, d)
    k = torch.where(keep[:, None], k_cache.float(), 0.0)
    v = torch.where(keep[:, None], v_cache.float(), 0.0)
    scores = torch.einsum("bngd,bnsd->bngs", qf, k) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bngs,bnsd->bngd", torch.softmax(scores, dim=-1), v)
    return out.reshape(b, h, d).to(q.dtype)




def validate_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, scale: float | None) -> None:
    """Check every argument; raise ValueError/TypeError naming what is rejected and why."""
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [B, H, D] (one decode token per sequence), got shape {tuple(q.shape)}.")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D [B, Hkv, S_max, D], got shape {tuple(k_cache.shape)}.")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}.")
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"q must be bf16, fp16 or fp32, got {q.dtype}.")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}.")
    b, h, d = q.shape
    kb, h_kv, s_max, kd = k_cache.shape
    if kb != b or kd != d:
        raise ValueError(
            f"k_cache [B, Hkv, S_max, D] = {tuple(k_cache.shape)} does not match q [B, H, D] = {tuple(q.shape)}."
        )
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"the query head count H={h} must be a multiple of the KV head count Hkv={h_kv}.")
    if h // h_kv > MAX_GROUP:
        raise ValueError(f"at most {MAX_GROUP} query heads per KV head are supported, got H/Hkv={h // h_kv}.")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head dim D must be a power of two in 16..256 (tl.dot tile), got D={d}.")
    if b == 0 or s_max == 0:
        raise ValueError(f"empty batch or cache: B={b}, S_max={s_max}.")
    if input_pos.dtype not in (torch.int32, torch.int64) or input_pos.numel() != 1 or input_pos.dim() > 1:
        raise ValueError(
            f"input_pos must be an int32/int64 tensor of shape [1] holding the current position, "
            f"got {input_pos.dtype} of shape {tuple(input_pos.shape)}."
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("input_pos", input_pos)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}.")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}.")


def validate_step(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                  n_head: int, scale: float | None) -> tuple[int, int, int]:
    """Check the arguments of the fused decode step; return the [B, H, D] shape of its output."""
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D [B, Hkv, S_max, D], got shape {tuple(k_cache.shape)}.")
    b, h_kv, _, d = k_cache.shape
    width = (n_head + 2 * h_kv) * d
    if qkv.dim() != 2 or qkv.shape != (b, width):
        raise ValueError(f"qkv must be [B, (n_head + 2 Hkv) D] = [{b}, {width}], got {tuple(qkv.shape)}.")
    if qkv.stride(1) != 1:
        raise ValueError("qkv rows must be contiguous.")
    if freqs_cis.dtype != torch.float32 or freqs_cis.numel() != d or not freqs_cis.is_contiguous():
        raise ValueError(f"freqs_cis must be a contiguous float32 [D/2, 2] (cos, sin) table of one position, "
                         f"got {freqs_cis.dtype} {tuple(freqs_cis.shape)}.")
    if freqs_cis.device != k_cache.device:
        raise ValueError(f"freqs_cis must be on the cache's device {k_cache.device}, got {freqs_cis.device}.")
    validate_attention(qkv[:, : n_head * d].view(b, n_head, d), k_cache, v_cache, input_pos, scale)
    return b, n_head, d


def rope_pairs(x: Tensor, cos_sin: Tensor) -> Tensor:
    """model.apply_rotary_emb for one position: pairs (2i, 2i+1) of x [..., D] rotated by
    cos_sin [D/2, 2], in float32, back to x's dtype."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    c, s = cos_sin[..., 0], cos_sin[..., 1]
    out = torch.stack([xs[..., 0] * c - xs[..., 1] * s, xs[..., 1] * c + xs[..., 0] * s], dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention_step_reference(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor,
                             input_pos: Tensor, n_head: int, scale: float | None = None) -> Tensor:
    """Plain-torch fused decode step: RoPE, cache write at p (in place), attention over 0..p."""
    b, h, d = validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)
    h_kv = k_cache.shape[1]
    cs = freqs_cis.reshape(d // 2, 2)
    q = rope_pairs(qkv[:, : h * d].reshape(b, h, d), cs)
    k = rope_pairs(qkv[:, h * d: (h + h_kv) * d].reshape(b, h_kv, 1, d), cs)
    v = qkv[:, (h + h_kv) * d:].reshape(b, h_kv, 1, d)
    pos = input_pos.reshape(1).to(torch.int64)
    k_cache.index_copy_(2, pos, k)
    v_cache.index_copy_(2, pos, v)
    return attention_reference(q, k_cache, v_cache, input_pos, scale)


def attention_o_reference(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                          n_head: int, w: Tensor, thresholds: Tensor, split_sizes: list[int],
                          scales: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """The decode step's attention (attention_step_reference: the caches written at p in place)
    followed by o's threshold-sparse product of it, with `residual` added: [B, N]. Every argument
    is checked before the caches are written."""
    b, _, d = validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, None)
    validate(qkv[:, : n_head * d], w, thresholds, split_sizes, scales, None, 0, False, False, residual)  # o's input
    y = attention_step_reference(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head)
    return masked_product(y.reshape(b, -1), w, thresholds, split_sizes, scales, None, 0, False, residual)
