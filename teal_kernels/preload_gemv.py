"""Dense decode GEMV for small matrices: the weights are loaded before the kernel waits on its input.

A small model's decode step is a chain of ~300 short kernels, each bound by latency, not bytes:
cuBLAS takes 3.7 us for any of SmolLM2-135M's projections (1-4 MB, under 1 us of bytes at the
H200's bandwidth; results/profile_smollm2_fused.md). With programmatic dependent launch (PDL) a
kernel starts while the previous one still runs and must wait (griddepcontrol.wait) before it
reads what that kernel writes. The weights are not written by anyone, so this kernel issues all
of its weight loads first, then waits, then reads x: the weight latency hides behind the previous
kernel, and what remains on the chain is x's load, the products and the store.

That needs every weight a program reads in registers at once: one program owns BLOCK_N output
columns over the whole of K (no split-K, so no cross-program reduction), a [K_PAD, BLOCK_N] tile
of at most MAX_TILE elements. So it serves K <= 2048 in bf16/fp16 only, up to MAX_BATCH rows (one
after the other, on the same registers), and the grid must fit on the GPU in one wave to hide
anything (``preload_fits``). It computes the
decode path's fusions (teal_kernels/reference.py): RMSNorm of the residual stream in its prologue
(``norm_weight``), SiLU(gate) * up (``gated``) and the residual add in its epilogue; no thresholds
(it is the dense path: PackedLinear calls it where its sparse calls stay dense).

Entry point: ``dense_gemv_preload`` (the ``teal::dense_gemv`` op of teal_kernels/ops.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from teal_kernels.reference import KERNEL_DTYPES, MAX_BATCH
from teal_kernels.triton_gemv import INTERPRETED, _normed, cdiv, launch_options, next_power_of_2

__all__ = ["MAX_K", "dense_gemv_preload", "preload_config", "preload_fits"]

MAX_TILE = 32768  # weight elements a program holds: 128 bf16 (64 registers) a thread at 8 warps
MAX_K = MAX_TILE // 16  # 16 columns (32 bytes, one sector) is the narrowest row slice worth a load
PROGRAMS_PER_SM = 2  # a grid larger than this many programs per SM runs in waves: the later ones preload nothing


def preload_config(k: int) -> tuple[int, int, int]:
    """(K_PAD, BLOCK_N, num_warps) for K: the whole K (padded to a power of two) by the widest
    power-of-two column slice that keeps the tile within MAX_TILE, at most 64 columns; 4 warps up
    to 16K elements, else 8."""
    k_pad = next_power_of_2(k)
    block_n = max(16, min(64, MAX_TILE // 2 // k_pad))
    return k_pad, block_n, 4 if k_pad * block_n <= MAX_TILE // 2 else 8


def preload_fits(k: int, n: int, sm_count: int) -> bool:
    """Whether a [K, N] product can run this kernel with its weights preloaded: K within
    MAX_K and the grid in one wave."""
    if k > MAX_K:
        return False
    _, block_n, _ = preload_config(k)
    return cdiv(n, block_n) <= PROGRAMS_PER_SM * sm_count


@triton.jit
def _preload_gemv_kernel(
    x_ptr, w_ptr, res_ptr, nw_ptr, out_ptr,
    M, K, N, eps,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.arange(0, K_PAD)
    rows_ok = rows < K
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < N
    # The weights first: nothing writes them, so they may be read before the previous kernel ends.
    w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the previous kernel's writes (x, the residual) are visible after this
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start preloading its own weights
    # Batch rows one after the other, each by the same code: a row's bits do not depend on the rows
    # beside it (speculation's verify then rounds as plain decoding does).
    for m in range(M):
        x_row = x_ptr + m * (2 * K if GATED else K)
        if GATED:  # x is the gate|up row [2K]
            gate = tl.load(x_row + rows, mask=rows_ok, other=0.0).to(tl.float32)
            up = tl.load(x_row + K + rows, mask=rows_ok, other=0.0).to(tl.float32)
            xv = (gate * tl.sigmoid(gate) * up).to(DTYPE).to(tl.float32)
        else:
            xv = tl.load(x_row + rows, mask=rows_ok, other=0.0).to(tl.float32)
            if NORM:  # x is the residual stream: RMSNorm's statistics over the row this program holds
                scale = 1.0 / tl.sqrt_rn(tl.sum(xv * xv, axis=0) / K + eps)
                xv = _normed(xv, scale, tl.load(nw_ptr + rows, mask=rows_ok, other=0.0).to(tl.float32), DTYPE)
        result = tl.sum(xv[:, None] * w.to(tl.float32), axis=0).to(DTYPE)
        if RESIDUAL:  # the unfused model's rounding: product to x's dtype, then the sum
            res = tl.load(res_ptr + m * N + cols, mask=cols_ok, other=0.0)
            result = (result.to(tl.float32) + res.to(tl.float32)).to(DTYPE)
        tl.store(out_ptr + m * N + cols, result, mask=cols_ok)


def dense_gemv_preload(x: Tensor, w: Tensor, gated: bool = False, residual: Tensor | None = None,
                       norm_weight: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """x [M, K] (gated: [M, 2K]) @ w [K, N] -> [M, N] in x's dtype, 1 <= M <= MAX_BATCH, fp32
    accumulation, with the fusions above. Rejects what the kernel cannot hold (K > MAX_K, other
    dtypes, mismatched shapes) with a ValueError; runs on CUDA, or on the CPU under
    TRITON_INTERPRET=1."""
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_BATCH or w.dim() != 2:
        raise ValueError(f"dense_gemv_preload takes x [M, K] with 1 <= M <= {MAX_BATCH} and w [K, N], got "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    (m, kx), (k, n) = x.shape, w.shape
    if kx != (2 * k if gated else k):
        raise ValueError(f"x has {kx} columns; w [{k}, {n}] needs {2 * k if gated else k}")
    if k > MAX_K:
        raise ValueError(f"K={k} exceeds the preload kernel's MAX_K={MAX_K}")
    if x.dtype not in KERNEL_DTYPES or w.dtype != x.dtype:
        raise ValueError(f"dense_gemv_preload takes bf16/fp16 x and w of one dtype, got {x.dtype} and {w.dtype}")
    for name, t, size in (("residual", residual, m * n), ("norm_weight", norm_weight, k)):
        if t is not None and (t.numel() != size or t.dtype != x.dtype):
            raise ValueError(f"{name} must hold {size} values of {x.dtype}, got {tuple(t.shape)} {t.dtype}")
    if gated and norm_weight is not None:
        raise ValueError("gated and norm_weight exclude each other (the norm acts on the residual stream)")
    x, w = x.contiguous(), w.contiguous()
    k_pad, block_n, warps = preload_config(k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pdl = launch_options(x.device)
    _preload_gemv_kernel[(cdiv(n, block_n),)](
        x, w, residual.contiguous() if residual is not None else x, norm_weight if norm_weight is not None else x,
        out, m, k, n, float(eps),
        K_PAD=k_pad, BLOCK_N=block_n, GATED=gated, RESIDUAL=residual is not None, NORM=norm_weight is not None,
        PDL=bool(pdl), num_warps=warps, num_stages=1, **pdl,
    )
    return out
