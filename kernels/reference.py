"""Weight formats of the TEAL decode path, their validation, and the plain-torch reference product.

This module imports no Triton: it is what runs on the CPU (and on any platform where Triton is not
installed), and the definition the Triton kernels are tested against.

    out[m, n] = sum_k W[k, n] * x[m, k] * (|x[m, k]| > thresholds[seg(n)])

The weight is stored transposed, ``w`` of shape [K, N], so dropping input ``k`` means not reading
one contiguous row. Formats (told apart by ``w.dtype``):
  * bf16 / fp16 (float32 on the CPU) ``w`` [K, N], the same dtype as ``x``;
  * int8 ``w`` [K, N] with float32 ``scales`` [N]:  W = w * scales[n];
  * int4 ``w`` uint8 [K, N // 2] (column 2j in the low nibble of byte j, 2j + 1 in the high
    nibble) with float32 ``scales``/``zeros`` [K // group_size, N]:
    W = (q - 8) * scales[k // g, n] + zeros[k // g, n].
Output segments: ``split_sizes`` cut N into segments (fused q|k|v: three, gate|up: two) that share
the input but each have their own threshold.
"""
from __future__ import annotations

import torch
from torch import Tensor

MAX_BATCH = 8  # rows of x the decode kernels take; larger batches are GEMMs (dequantize + matmul)
MAX_SEGMENTS = 8
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # activation dtypes of the decode kernels
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
        k = w.shape[0]
        q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, -1).float() - 8.0
        s = scales.float().repeat_interleave(group_size, dim=0)
        z = zeros.float().repeat_interleave(group_size, dim=0)
        return q * s + z
    raise TypeError(f"Unsupported weight dtype {w.dtype}; expected bf16, fp16, int8 or uint8 (packed int4).")


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
) -> int:
    """Check every argument of a sparse GEMV; return the format code.

    ``for_kernel`` adds the limits of the decode kernels (batch, contiguity, 32-bit offsets) and
    refuses float32 (the reference also serves float32 models on the CPU for quality work).
    """
    x_dtypes = {torch.bfloat16: "bf16", torch.float16: "fp16"} | ({} if for_kernel else {torch.float32: "fp32"})
    if x.dtype not in x_dtypes:
        raise TypeError(f"x must be {' or '.join(x_dtypes.values())}, got {x.dtype}.")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}.")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [K, N] (transposed weight), got shape {tuple(w.shape)}.")
    m, k = x.shape
    if w.shape[0] != k:
        raise ValueError(f"w must have K={k} rows to match x [M, K], got shape {tuple(w.shape)}.")

    if w.dtype in x_dtypes:
        fmt, n = FMT_FLOAT, w.shape[1]
        if w.dtype != x.dtype:
            raise TypeError(f"Floating-point w must have x's dtype {x.dtype}, got {w.dtype}.")
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
        _check_aux("scales", scales, (k // group_size, n))
        _check_aux("zeros", zeros, (k // group_size, n))
    else:
        raise TypeError(f"w dtype must be bf16, fp16, int8 or uint8 (packed int4), got {w.dtype}.")

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
    for name, t in (("w", w), ("thresholds", thresholds), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}.")

    if for_kernel:
        if not 1 <= m <= MAX_BATCH:
            raise ValueError(f"sparse_gemv handles batch 1..{MAX_BATCH}, got M={m}; use the dense path instead.")
        for name, t in (("x", x), ("w", w), ("thresholds", thresholds), ("scales", scales), ("zeros", zeros)):
            if t is not None and not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous.")
        if k * n >= 2**31:
            raise ValueError(f"K*N must be below 2**31 for 32-bit offsets, got K={k}, N={n}.")
    return fmt


def _check_aux(name: str, t: Tensor | None, shape: tuple[int, ...]) -> None:
    if t is None or t.dtype != torch.float32 or tuple(t.shape) != shape:
        got = "None" if t is None else f"{t.dtype} {tuple(t.shape)}"
        raise ValueError(f"{name} must be float32 of shape {list(shape)}, got {got}.")


def masked_product(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None,
    zeros: Tensor | None,
    group_size: int,
) -> Tensor:
    """The product itself, unvalidated: float32 math, output in x's dtype.

    Reads no tensor value on the host, so it is usable under torch.compile.
    """
    weight = dequantize_weight(w, scales, zeros, group_size)
    xf = x.float()
    outs = []
    for j, w_cols in enumerate(weight.split(list(split_sizes), dim=1)):
        kept = torch.where(xf.abs() > thresholds[j], xf, 0.0)
        outs.append(kept @ w_cols)
    return torch.cat(outs, dim=1).to(x.dtype)


def sparse_gemv_reference(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    group_size: int = 0,
) -> Tensor:
    """Threshold-sparse x @ W^T in plain torch, any batch size, any device."""
    validate(x, w, thresholds, split_sizes, scales, zeros, group_size, for_kernel=False)
    return masked_product(x, w, thresholds, split_sizes, scales, zeros, group_size)
