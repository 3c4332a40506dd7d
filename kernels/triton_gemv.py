"""Triton threshold-sparse GEMV for small-batch decode (TEAL activation sparsity).

Computes kernels.reference's product (formats and the definition are documented there) for
M <= MAX_BATCH rows, skipping the weight rows of zeroed inputs. Decode is memory bound, hence the
goal: the time of a call should fall with sparsity towards the time needed to read only the kept
rows.

Entry point: ``sparse_gemv_triton`` (explicit config for tuning and tests; the model reaches it
through the ``teal::sparse_gemv`` op of kernels/ops.py), plus ``get_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import threading
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from kernels.reference import FMT_INT4, MAX_SEGMENTS, validate, weight_format_name

__all__ = ["INTERPRETED", "KernelConfig", "get_config", "gpu_name", "sparse_gemv_triton"]

_SEGMENT_SLOTS = tl.constexpr(MAX_SEGMENTS)  # the kernel walks this many (possibly empty) segments
TUNED_CONFIGS_PATH = Path(__file__).with_name("tuned_configs.json")


# ---------------------------------------------------------------------------
# Per-shape launch configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch.

    block_n: output columns per program.  block_k: input rows per program (split-K).
    sub_k: rows per tile of the main loop (the K of its tl.dot, so at least 16).
    compact: gather the kept rows of each window before the loop (True), or walk consecutive
    rows with the dropped ones predicated off (False).  num_stages: software-pipeline depth.
    """

    block_n: int = 256
    block_k: int = 512
    sub_k: int = 32
    compact: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        """Strict: a stored config with an unknown or missing field is an error, not a default."""
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise ValueError(f"kernel config fields {sorted(d)} do not match {sorted(names)}")
        return cls(**d)


def config_key(device_name: str, weight_format: str, m: int, k: int, n: int) -> str:
    """Key of tuned_configs.json, e.g. ``NVIDIA H200|int4-g128|M1|K4096|N6144``."""
    return f"{device_name}|{weight_format}|M{m}|K{k}|N{n}"


def gpu_name(device: torch.device) -> str:
    """The name configs are keyed by: torch.cuda.get_device_name, or "cpu" (interpreter)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def _tuned_table() -> dict:
    if not TUNED_CONFIGS_PATH.exists():
        return {}
    return json.loads(TUNED_CONFIGS_PATH.read_text())


def get_config(device_name: str, weight_format: str, m: int, k: int, n: int) -> KernelConfig:
    """Tuned config for this GPU and shape if benchmarks/tune_kernels.py stored one, else a heuristic.

    fp16 reuses bf16 entries (same bytes per element).  Never autotunes.
    """
    table = _tuned_table()
    formats = [weight_format, "bf16"] if weight_format == "fp16" else [weight_format]
    for fmt in formats:
        entry = table.get(config_key(device_name, fmt, m, k, n))
        if entry is not None:
            return KernelConfig.from_dict(entry["config"])
    return _heuristic_config(weight_format, m, k, n)


def _heuristic_config(weight_format: str, m: int, k: int, n: int) -> KernelConfig:
    """Rows of 512 bytes (1 KiB for wide matrices), SUB_K = 32, three stages, and block_k chosen
    for about 256 programs: two per SM on an H200.  The lab's fastest Llama-3-8B tiles
    (results/gemv_lab.md) follow this rule within a factor of two."""
    int4 = weight_format.startswith("int4")
    bytes_per_elem = 0.5 if int4 else 1.0 if weight_format == "int8" else 2.0
    row_bytes = 1024 if n >= 16384 else 512
    block_n = max(16, min(1024, int(row_bytes / bytes_per_elem), triton.next_power_of_2(n)))
    programs_n = triton.cdiv(n, block_n)
    block_k = triton.next_power_of_2(max(1, k * programs_n // 256))
    block_k = max(128 if int4 else 64, min(1024, block_k))
    return KernelConfig(block_n=block_n, block_k=block_k, sub_k=32)


def _fit_config(cfg: KernelConfig, fmt: int, group_size: int) -> KernelConfig:
    """Check powers of two and the tl.dot minimum; make block_k hold whole int4 groups and
    sub_k fit one group."""
    for name in ("block_n", "block_k", "sub_k"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}.")
    for name in ("block_n", "sub_k"):
        if getattr(cfg, name) < 16:
            raise ValueError(f"KernelConfig.{name} must be at least 16 (a tl.dot tile), got {getattr(cfg, name)}.")
    if cfg.num_stages < 1:
        raise ValueError(f"KernelConfig.num_stages must be at least 1, got {cfg.num_stages}.")
    block_k = max(cfg.block_k, group_size) if fmt == FMT_INT4 else cfg.block_k
    window = group_size if fmt == FMT_INT4 else block_k
    return dataclasses.replace(cfg, block_k=block_k, sub_k=min(cfg.sub_k, window))


# ---------------------------------------------------------------------------
# Kernel: split-K sparse GEMV, masked tiles through tl.dot, fp32 atomics + arrival ticket
# ---------------------------------------------------------------------------
#
# Grid (N blocks, K blocks).  Program (pn, pk) owns BLOCK_N columns of one segment (segments are
# tiled separately, so a program has a single threshold) and rows [pk*BLOCK_K, +BLOCK_K).
#
# Main loop: tiles of SUB_K rows.  The x tile [BLOCK_M, SUB_K] is thresholded; the weight rows
# whose x is zero for every batch row are predicated off (no DRAM traffic), the others are read
# whole (BLOCK_N contiguous elements).  The product runs on tl.dot with the batch padded to
# BLOCK_M >= 16: the H200 design lab (benchmarks/gemv_lab.py, results/gemv_lab.md) measured this
# 10-30% faster than FMA tiles at batch 1, because Triton software-pipelines loads that feed a
# dot (num_stages deep, through shared memory) and keeps more bytes in flight.  ``compact``
# gathers the kept rows of each window first (prefix sum into a scratch index list) so tiles are
# full; it pays at high sparsity.  int4 walks one window per group and applies the group's scale
# and zero once per window: y += s * sum(x * (q - 8)) + z * sum(x).
#
# Reduction over K blocks: fp32 atomics into a per-device workspace, then an arrival ticket per
# column block; the last program to arrive reads the sum, applies the int8 column scale and the
# residual, writes the output, and zeroes the workspace and its counter for the next call.  One
# launch, no memset.  The fp32 summation order follows arrival, so on a GPU the last bits can
# differ from run to run (the float64-referenced tests bound the error).
#
# Programmatic dependent launch (PDL, Hopper): launched with launch_pdl, the kernel may start
# while the previous kernel of the stream finishes; it reads no memory before gdc_wait (the
# first H200 run read the thresholds before it and raced with the kernel that wrote them), and
# lets the next kernel start launching after its main loop.


@triton.jit
def _masked_x(x_ptr, m_offs, rows, ok, threshold, K, GATED: tl.constexpr):
    """x[m_offs, rows] as fp32 where |x| > threshold and ok, else 0. GATED: x is SiLU(gate) * up
    of a [M, 2K] gate|up row, computed in fp32 and rounded to x's dtype like the unfused model."""
    if GATED:
        gate = tl.load(x_ptr + m_offs * 2 * K + rows, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + m_offs * 2 * K + K + rows, mask=ok, other=0.0).to(tl.float32)
        xv = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        xv = tl.load(x_ptr + m_offs * K + rows, mask=ok, other=0.0).to(tl.float32)
    return tl.where(tl.abs(xv) > threshold, xv, 0.0)


@triton.jit
def _weight_tile(
    w_ptr, rows, load, col_start, col_end, W_ROW,
    FORMAT: tl.constexpr, COL_ALIGN: tl.constexpr, SUB_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows ``rows`` of W^T [SUB_K, BLOCK_N], reading only where ``load``: the float weights as
    stored, int8 as stored, int4 as q - 8 in int8 (exact in any float type)."""
    if FORMAT == 2:  # int4: BLOCK_N // 2 bytes per row, low nibble = even column
        byte_cols = tl.multiple_of(col_start // 2, COL_ALIGN // 2) + tl.arange(0, BLOCK_N // 2)
        byte_end = tl.multiple_of(col_end // 2, COL_ALIGN // 2)
        packed = tl.load(
            w_ptr + rows[:, None] * W_ROW + byte_cols[None, :],
            mask=load[:, None] & (byte_cols < byte_end)[None, :],
            other=0x88,  # q = 8 in both nibbles: a skipped row contributes 0
        )
        q = tl.join(packed & 0xF, packed >> 4).reshape(SUB_K, BLOCK_N)
        return q.to(tl.int8) - 8
    else:
        cols = col_start + tl.arange(0, BLOCK_N)
        return tl.load(w_ptr + rows[:, None] * W_ROW + cols[None, :],
                       mask=load[:, None] & (cols < col_end)[None, :], other=0)


@triton.jit
def _tile_product(acc, xt, wt, DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += xt [BLOCK_M, SUB_K] @ wt [SUB_K, BLOCK_N] in fp32.  The operands
    are exact in x's dtype (x itself; bf16/fp16/int8/int4 weights); the interpreter's bf16 dot
    is not reliable, so it multiplies in fp32."""
    if IEEE:
        return tl.dot(xt, wt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(xt.to(DTYPE), wt.to(DTYPE), acc)


@triton.jit
def _fence_gpu(token):
    """fence.acq_rel.gpu in every thread: its earlier fp32 additions are performed at the GPU
    before the CTA barrier that precedes the arrival ticket (a barrier alone does not wait for
    another thread's outstanding reductions).  Returns ``token`` so the call has a use."""
    return tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [token], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, thr_ptr, res_ptr,
    out_ptr, ws_ptr, counter_ptr, idx_ptr,
    M, K, N, W_ROW,
    SPLITS,  # column boundaries of the segments (trailing empty segments allowed)
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, COL_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
    WINDOW: tl.constexpr, COMPACT: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
    PDL: tl.constexpr, IEEE: tl.constexpr, FENCE: tl.constexpr,
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_k = tl.num_programs(1)

    # Segment and columns of this program.
    first_block = 0
    col_start = 0
    col_end = 0
    seg = 0
    for j in tl.static_range(_SEGMENT_SLOTS):
        n_blocks = tl.cdiv(SPLITS[j + 1] - SPLITS[j], BLOCK_N)
        mine = (pid_n >= first_block) & (pid_n < first_block + n_blocks)
        col_start = tl.where(mine, SPLITS[j] + (pid_n - first_block) * BLOCK_N, col_start)
        col_end = tl.where(mine, SPLITS[j + 1], col_end)
        seg = tl.where(mine, j, seg)
        first_block += n_blocks
    col_start = tl.multiple_of(col_start, COL_ALIGN)  # alignment hints let loads vectorize
    col_end = tl.multiple_of(col_end, COL_ALIGN)
    cols = col_start + tl.arange(0, BLOCK_N)
    cols_ok = cols < col_end
    m_offs = tl.arange(0, BLOCK_M)
    m_ok = m_offs < M
    k_block = pid_k * BLOCK_K
    if PDL:
        tl.extra.cuda.gdc_wait()  # no memory is read before: any input may come from the previous kernel
    threshold = tl.load(thr_ptr + seg)

    if COMPACT:
        # Slot i of this program's scratch <- i-th row of the block kept by any batch row.
        block_rows = k_block + tl.arange(0, BLOCK_K)
        block_x = _masked_x(x_ptr, m_offs[:, None], block_rows[None, :], m_ok[:, None] & (block_rows < K)[None, :],
                            threshold, K, GATED)
        kept = (tl.max(tl.abs(block_x), axis=0) > 0).to(tl.int32)
        slots = idx_ptr + (pid_n * grid_k + pid_k) * BLOCK_K
        tl.store(slots + tl.cumsum(kept, 0) - kept, block_rows, mask=kept > 0)
        win_kept = tl.sum(tl.reshape(kept, [BLOCK_K // WINDOW, WINDOW]), axis=1)
        win_ids = tl.arange(0, BLOCK_K // WINDOW)
        tl.debug_barrier()  # every thread's slot writes are visible before the gathers

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_windows = tl.cdiv(tl.minimum(K - k_block, BLOCK_K), WINDOW)  # none past row K
    for win in range(0, n_windows):
        win_start = k_block + win * WINDOW
        if COMPACT:
            first = tl.sum(tl.where(win_ids < win, win_kept, 0), axis=0)
            end = first + tl.sum(tl.where(win_ids == win, win_kept, 0), axis=0)
        else:
            first = win_start
            end = tl.minimum(win_start + WINDOW, K)
        if FORMAT == 2:  # this group's sums, scaled after the loop
            wacc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            wacc = acc
        for t in tl.range(first, end, SUB_K):
            span = t + tl.arange(0, SUB_K)
            in_window = span < end
            if COMPACT:
                rows = tl.load(slots + span, mask=in_window, other=0)
            else:
                rows = span
            xt = _masked_x(x_ptr, m_offs[:, None], rows[None, :], m_ok[:, None] & in_window[None, :],
                           threshold, K, GATED)
            keep = tl.max(tl.abs(xt), axis=0) > 0
            wt = _weight_tile(w_ptr, rows, keep, col_start, col_end, W_ROW, FORMAT, COL_ALIGN, SUB_K, BLOCK_N)
            wacc = _tile_product(wacc, xt, wt, DTYPE, IEEE)
            if FORMAT == 2:
                xsum += tl.sum(xt, axis=1)
        if FORMAT == 2:
            group = win_start // GROUP_SIZE
            s = tl.load(scale_ptr + group * N + cols, mask=cols_ok, other=0.0)
            z = tl.load(zero_ptr + group * N + cols, mask=cols_ok, other=0.0)
            acc += wacc * s[None, :] + xsum[:, None] * z[None, :]
        else:
            acc = wacc
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()

    # Add this block's partial; the last program of the column block finishes the output.
    out_offs = m_offs[:, None] * N + cols[None, :]
    out_ok = m_ok[:, None] & cols_ok[None, :]
    tl.atomic_add(ws_ptr + out_offs, acc, mask=out_ok, sem="relaxed")
    if FENCE:
        pid_n = _fence_gpu(pid_n)
    tl.debug_barrier()  # all threads' additions precede the release below
    ticket = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if ticket == grid_k - 1:
        total = tl.load(ws_ptr + out_offs, mask=out_ok, other=0.0, cache_modifier=".cg")
        tl.store(ws_ptr + out_offs, tl.zeros_like(total), mask=out_ok)  # ready for the next call
        tl.store(counter_ptr + pid_n, 0)
        if FORMAT == 1:
            total *= tl.load(scale_ptr + cols, mask=cols_ok, other=0.0)[None, :]
        result = total.to(out_ptr.dtype.element_ty)
        if RESIDUAL:  # the unfused model's rounding: product to x's dtype, then the sum
            res = tl.load(res_ptr + out_offs, mask=out_ok, other=0.0)
            result = (result.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_offs, result, mask=out_ok)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------

_MAX_COUNTERS = 1 << 14
_WORKSPACE_FLOATS = 1 << 22  # 16 MiB: M * N of the largest projection (M <= 8, N <= 512K)
_scratch: dict[torch.device, tuple[Tensor, Tensor]] = {}
INTERPRETED = not isinstance(_sparse_gemv_kernel, JITFunction)  # TRITON_INTERPRET=1 at import
PDL_ENV = "TEAL_PDL"  # "0" launches without programmatic dependent launch (for measuring it)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer: the kernel writes every element it later reads."""
    return torch.empty(shape, dtype=dtype, device=device)


def _persistent_scratch(device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-device arrival counters (int32) and fp32 workspace, zero between calls, never freed
    (captured graphs keep their addresses).  Every call leaves them at zero again.

    Allocated from a helper thread: torch.compile's CUDA-graph trees send every
    allocation of the calling thread during warm-up into their private pool, which
    must hold only their own tensors.
    """
    scratch = _scratch.get(device)
    if scratch is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("Call sparse_gemv once on this device before capturing a CUDA graph.")
        made: list[Tensor] = []

        def allocate() -> None:
            made.append(torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device))
            made.append(torch.zeros(_WORKSPACE_FLOATS, dtype=torch.float32, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        worker = threading.Thread(target=allocate)
        worker.start()
        worker.join()
        if len(made) != 2:
            raise RuntimeError(f"Could not allocate the sparse_gemv scratch buffers on {device}.")
        scratch = _scratch[device] = (made[0], made[1])
    return scratch


@functools.cache
def _uses_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or newer, not interpreted, not switched off."""
    if INTERPRETED or device.type != "cuda" or os.environ.get(PDL_ENV, "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def sparse_gemv_triton(
    x: Tensor,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    group_size: int = 0,
    config: KernelConfig | None = None,
    gated: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """Run the Triton kernel (on CUDA, or on CPU under TRITON_INTERPRET=1).

    ``config`` overrides the tuned/heuristic config (used by the tuner and tests); ``gated`` and
    ``residual`` are the prologue / epilogue fusions of kernels/reference.py.  Calls on one
    device share a workspace: run them on one stream.
    """
    fmt = validate(x, w, thresholds, split_sizes, scales, zeros, group_size, True, gated, residual)
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    m, k = x.shape[0], w.shape[0]
    n = w.shape[1] * (2 if fmt == FMT_INT4 else 1)
    if config is None:
        config = get_config(gpu_name(x.device), weight_format_name(w, group_size), m, k, n)
    cfg = _fit_config(config, fmt, group_size)

    grid_k = triton.cdiv(k, cfg.block_k)
    grid_n = sum(triton.cdiv(s, cfg.block_n) for s in split_sizes)
    if grid_n > _MAX_COUNTERS:
        raise ValueError(f"N={n} needs {grid_n} column blocks, more than {_MAX_COUNTERS}; use a larger block_n.")
    if m * n > _WORKSPACE_FLOATS:
        raise ValueError(f"M*N={m * n} exceeds the kernel's workspace of {_WORKSPACE_FLOATS} floats.")
    # Boundaries padded with N to a fixed length: one compiled kernel for any segment count.
    splits = (0, *itertools.accumulate(split_sizes), *([n] * (MAX_SEGMENTS - len(split_sizes))))

    out = _alloc((m, n), x.dtype, x.device)
    counters, workspace = _persistent_scratch(x.device)
    idx = _alloc((grid_n * grid_k * cfg.block_k,), torch.int32, x.device) if cfg.compact else counters
    # Largest power of two dividing every program's first column: lets loads vectorize.
    col_align = min(cfg.block_n, 32, *(s & -s for s in split_sizes))
    pdl = _uses_pdl(x.device)

    _sparse_gemv_kernel[(grid_n, grid_k)](
        x, w, scales if scales is not None else thresholds, zeros if zeros is not None else thresholds, thresholds,
        residual if residual is not None else x,
        out, workspace, counters, idx,
        m, k, n, w.shape[1], splits,
        FORMAT=fmt, GROUP_SIZE=max(group_size, 1), COL_ALIGN=col_align,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SUB_K=cfg.sub_k,
        WINDOW=group_size if fmt == FMT_INT4 else cfg.block_k, COMPACT=cfg.compact,
        GATED=gated, RESIDUAL=residual is not None, PDL=pdl, IEEE=INTERPRETED,
        FENCE=not INTERPRETED and os.environ.get("TEAL_GEMV_FENCE", "1") == "1",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
    return out
