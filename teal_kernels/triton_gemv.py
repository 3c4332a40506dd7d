"""Triton threshold-sparse GEMV for small-batch decode (TEAL activation sparsity).

Computes teal_kernels.reference's product (formats and the definition are documented there) for
M <= MAX_BATCH rows, skipping the weight rows of zeroed inputs. Decode is memory bound, hence the
goal: the time of a call should fall with sparsity towards the time needed to read only the kept
rows.

Entry point: ``sparse_gemv_triton`` (explicit config for tuning and tests; the model reaches it
through the ``teal::sparse_gemv`` op of teal_kernels/ops.py), plus ``get_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import threading
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

from teal_kernels.attention_tiles import LOG2E, default_block_s, heads_attention
from teal_kernels.reference import (FMT_FLOAT, FMT_INT4, FMT_INT8, MAX_BATCH, MAX_DOT_ROWS, MAX_SEGMENTS,
                                    check_norm_statistics, dot_design_fits, env_switch, validate, validate_step,
                                    weight_format_name, write_norm_statistics)
from teal_kernels.speed_table import lookup_names

__all__ = ["INTERPRETED", "KernelConfig", "attention_o_fits", "attention_o_triton", "attention_prologue_fits",
           "get_config", "gpu_name", "sparse_gemv_triton"]

_SEGMENT_SLOTS = tl.constexpr(MAX_SEGMENTS)  # the kernel walks this many (possibly empty) segments
# K/V tiles in flight in the attention prologue (its lab kernel: 2 beat 1 at every context, 16.7 vs
# 17.0 us at 128 positions, 19.5 vs 21.1 at 256; H200, results/small_programs/ section 3)
ATTENTION_KV_STAGES = tl.constexpr(2)
TUNED_CONFIGS_PATH = Path(__file__).with_name("tuned_configs.json")


# ---------------------------------------------------------------------------
# Per-shape launch configuration
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch, and which kernel design runs.

    design: "dot" (masked tiles through tl.dot, pipelined num_stages deep), "gather" (one row: the
    dot design over each K block's kept rows, listed once; a batch runs "dot") or "rows" (FMA
    lanes, one row chunk at a time).  block_n: output columns per program.  block_k: input rows per
    program (split-K).  sub_k: rows per inner step (skip granularity, or gathered rows per step
    if compact).  compact ("rows" only): gather the kept rows of the K-block (True) or walk fixed
    row chunks with a skip branch and masked loads (False).  num_stages: "dot" and "gather", Triton's pipeline
    depth; "rows" with compact: 1 one chunk at a time, 2 loads the next chunk's weight rows into
    registers before this chunk's FMAs (twice the bytes in flight, more registers), 3 or more runs
    the loop through Triton's software pipeline that deep (num_stages - 1 chunks in flight in
    shared memory by cp.async, no registers held for them); it launches without PDL (launch_options),
    with which a table of its winners lost 6-10% end to end (results/pipelined/, results/long_k/).
    int8's 8B shapes run it over K blocks of 512-4096 rows (long_k/); the tuner offers it only when
    asked (tune_kernels --kinds), with the long K blocks (few split-K partials) a deep pipeline needs.
    lane_sum ("rows"): sum each chunk's rows as they are multiplied into as few accumulator rows
    per batch row as the tile's layout allows without a cross-thread sum (_lane_groups: 1 for
    1024 bf16 columns at 4 warps, 2 for 512), instead of keeping sub_k rows to the end: fewer
    registers (qkv's 32 x 512 fp32 accumulator is 128 of the 251 a thread Nsight Compute
    reported), so more programs per SM.
    max_registers: a cap on the registers a thread (ptxas .maxnreg), 0 for the compiler's choice:
    more programs an SM, fewer registers for latency hiding within one, spills past some point.
    The int4 dot tile takes 168, so 3 programs an SM, and its warps wait on latency
    (results/int4_stalls/); capped at 128 it spills 128 bytes a thread (local sm_90 compile) and
    fits 4. The bf16 rows tile of 512 x 16 takes 167 and fits in 128 without spills.
    """

    block_n: int = 128
    block_k: int = 256
    sub_k: int = 32
    compact: bool = True
    num_warps: int = 4
    num_stages: int = 1
    design: str = "rows"
    lane_sum: bool = False
    max_registers: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> KernelConfig:
        """Strict: a stored config with an unknown or missing field is an error, not a default;
        only fields added after configs were stored (_LATER_FIELDS) may be missing, and take their
        defaults, which is what ran when those configs were tuned."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not set(d) <= names or not names - _LATER_FIELDS <= set(d):
            raise ValueError(f"kernel config fields {sorted(d)} do not match {sorted(names)}")
        return cls(**d)


_LATER_FIELDS = {"lane_sum", "max_registers"}


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr-function wrappers in
# newer Triton (3.9 on this project's CI: 4.3 and 2.6 us a call on its CPU, against 0.03 for the
# integer expression), and an eager launch computes several: the launchers use these.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def dot_tile_rows(m: int) -> int:
    """Rows of the "dot" design's tl.dot tile for a batch of m rows: m rounded up to a power of two,
    at least 16 (tl.dot's minimum; smaller batches are repeated to fill it)."""
    return max(16, next_power_of_2(m))


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


def get_config(device_name: str, weight_format: str, m: int, k: int, n: int, dense: bool = False) -> KernelConfig:
    """Tuned config for this GPU and shape if benchmarks/tune_kernels.py stored one (for it, else
    for its stand-in: speed_table.lookup_names), else a heuristic.

    ``dense``: a call without thresholds takes the entry's "dense_config" where the tuner stored one
    (the fastest config at 0% differed from the sparse levels' winner), else its "config".
    fp16 reuses bf16 entries (same bytes per element); past MAX_BATCH rows a batch takes the entry
    of its tl.dot tile's rows (16, 32 or 64: the compiled kernel is the same).  Never autotunes.
    """
    table = _tuned_table()
    formats = [weight_format, "bf16"] if weight_format == "fp16" else [weight_format]
    rows = m if m <= MAX_BATCH else dot_tile_rows(m)
    for name, fmt in itertools.product(lookup_names(device_name), formats):
        entry = table.get(config_key(name, fmt, rows, k, n))
        if entry is not None:
            return KernelConfig.from_dict(entry["dense_config" if dense and "dense_config" in entry else "config"])
    return _heuristic_config(weight_format, m, k, n)


def _heuristic_config(weight_format: str, m: int, k: int, n: int) -> KernelConfig:
    """Config of a shape nobody tuned.

    One bf16 or fp16 row of a matrix of 8M weights or more: the "gather" design, as every 8B winner
    on the H200 and the H100 has it since 2026-12-06. Against the rows rule below it took 1.5-15% less
    time a call on every Llama-2-7B, Llama-3.2-3B and Llama-3-70B-shard (tp8) shape at 0-65% and
    decoded Llama-2-7B at 50% at 296 tok/s against 267, Llama-3.2-3B at 478 against 453 (H100,
    results/gather_heuristic_2026_12_06/).

    Other float or int8 rows (decode): the compact "rows" design as the tuner's Llama-3-8B winners
    on the H200 have it (it gives seven of the eight bf16 and int8 winners of 2026-12-02, int8
    down took 256-row blocks; the dot rule below took 25-50% longer than the winners at 65%
    sparsity on every bf16 shape, and made TEAL slower than dense on the Llama-3.2-1B shape,
    results/decode_llama32_1b_fused.md): 512 columns (256 for int8), 16 rows
    per step for matrices of 32M weights or more, else 32, blocks of 512 rows where that still
    makes 400 programs, else 256, halved while there are fewer than 128 programs.

    One int4 row: the dot design as the H200's int4-g128 winners on every Llama-3-8B shape had it:
    256 columns, a whole group of 128 rows a step (the group scale applied once a tile), 512 rows a
    block (1024 past K = 8192), three stages; the rule below took 1.4-1.7x their time at 50%. (8B
    gate|up has since taken 2048-row blocks, 6 stages deep: a tie alone, faster end to end,
    results/int4_long_k/; not tried on other shapes, so the heuristic keeps 512.)

    Batches: the "dot" design, rows of up to 512 columns (1 KiB of bf16; fewer past 16
    batch rows, for the same accumulator), SUB_K = 32 (64 for int4 at 2-16 rows),
    three stages, block_k for about 256 programs (two per SM on an H200), the rule the lab's
    fastest Llama-3-8B tiles follow (results/gemv_lab.md).  _fit_config makes it legal for the
    shape (or falls back to the "rows" design)."""
    if m == 1 and weight_format in ("bf16", "fp16") and k * n >= 1 << 23 and k % 16 == 0 and n % 16 == 0:
        # the "gather" design as the 8B winners have it on the H200 and the H100 (2026-12-06): 256
        # columns, 32 rows a step, 6 stages, blocks of 512 rows doubled while over 256 programs
        # (128-224 programs on the 8B shapes) and halved while under 128
        programs_n = cdiv(n, 256)
        block_k = 512
        while programs_n * cdiv(k, block_k) > 256 and block_k < k:
            block_k *= 2
        while programs_n * cdiv(k, block_k) < 128 and block_k > 64:
            block_k //= 2
        return KernelConfig(block_n=256, block_k=block_k, sub_k=32, compact=True, num_stages=6, design="gather")
    if m == 1 and not weight_format.startswith("int4"):
        block_n = max(16, min(256 if weight_format == "int8" else 512, next_power_of_2(n)))
        sub_k = 16 if k * n >= 1 << 25 else 32
        programs_n = cdiv(n, block_n)
        block_k = 512 if programs_n * cdiv(k, 512) >= 400 else 256
        while programs_n * cdiv(k, block_k) < 128 and block_k > 2 * sub_k:
            block_k //= 2
        return KernelConfig(block_n=block_n, block_k=block_k, sub_k=sub_k, compact=True, design="rows")
    if m == 1:  # int4 decode: the tuned winners of all four 8B shapes (results/int4_heuristic/)
        return KernelConfig(block_n=256, block_k=1024 if k > 8192 else 512, sub_k=128, num_stages=3, design="dot")
    # an accumulator of at most 16 x 512 fp32 (taller tiles for batches past 16 rows get narrower)
    block_n = max(16, min(512 * 16 // dot_tile_rows(m), next_power_of_2(n)))
    programs_n = cdiv(n, block_n)
    block_k = max(128, min(1024, next_power_of_2(max(1, k * programs_n // 256))))
    # int4 at 2-16 rows: every tuned winner on the H200's 8B shapes reads 64 or 128 rows a tile
    # (at 16 rows 7-26% faster than the best SUB_K = 32 config; benchmarks/results/quant_rows/)
    sub_k = 64 if weight_format.startswith("int4") and 1 < m <= 16 else 32
    return KernelConfig(block_n=block_n, block_k=block_k, sub_k=sub_k, num_stages=3, design="dot")


def _rows_heuristic(weight_format: str, m: int, k: int, n: int) -> KernelConfig:
    """The "rows" design: 256-byte slices of weight rows, ~4K accumulator elements per program
    (2K for int4, which also keeps a per-group sum), and ~1K programs to fill the GPU."""
    int4 = weight_format.startswith("int4")
    bytes_per_elem = 0.5 if int4 else 1.0 if weight_format == "int8" else 2.0
    budget = 2048 if int4 else 4096
    block_m = next_power_of_2(m)
    block_n = min(256, int(256 / bytes_per_elem), budget // (2 * block_m), max(16, next_power_of_2(n)))
    sub_k = max(2, min(32, budget // (block_m * block_n)))
    programs_n = cdiv(n, block_n)
    block_k = next_power_of_2(cdiv(k, max(1, 1024 // programs_n)))
    block_k = max(64, sub_k, min(512, block_k))
    return KernelConfig(block_n=block_n, block_k=block_k, sub_k=sub_k)


def _fit_config(cfg: KernelConfig, fmt: int, group_size: int, m: int, k: int,
                split_sizes: list[int], words_aligned: bool = True) -> KernelConfig:
    """Check the config and fit it to the shape.  "rows": block_k holds whole int4 groups and
    sub_k fits one group.  "dot": block_n divides every segment, sub_k (>= 16, a tl.dot tile)
    divides K and the int4 group, block_k is a multiple of sub_k (dividing K unless no divisor
    keeps half the asked block_k and cutting the last block costs at most an eighth of K); int4 also needs
    block_n >= 128 (a plane of block_n / 8 columns is a tl.dot tile), at most block_n / 64 warps
    per 16 rows of the tile (more would repeat a plane's dot) and weights readable as int32 words (``words_aligned``).
    A shape where that is impossible (a segment or K not a multiple of 16, 128 for int4) runs
    the "rows" design."""
    for name in ("block_n", "block_k", "sub_k"):
        v = getattr(cfg, name)
        if name == "block_k" and cfg.design in ("dot", "gather") and v > 0 and v % cfg.sub_k == 0:
            continue  # the dot design fits block_k to a divisor of K's tiles: a fitted config refits unchanged
        if v < 1 or v & (v - 1):
            raise ValueError(f"KernelConfig.{name} must be a power of two, got {v}.")
    if cfg.design not in ("dot", "gather", "rows"):
        raise ValueError(f"KernelConfig.design must be 'dot', 'gather' or 'rows', got {cfg.design!r}.")
    if cfg.max_registers and not 32 <= cfg.max_registers <= 255:
        raise ValueError(f"KernelConfig.max_registers must be 0 (no cap) or 32..255, got {cfg.max_registers}.")
    if cfg.design in ("dot", "gather"):
        if cfg.block_n < 16 or cfg.sub_k < 16:
            raise ValueError(f"the {cfg.design} design needs block_n and sub_k >= 16 (a tl.dot tile), got {cfg}.")
        col_pow2 = min(s & -s for s in split_sizes)  # largest power of two dividing every segment
        sub_k = min(cfg.sub_k, group_size) if fmt == FMT_INT4 else cfg.sub_k
        while sub_k > 16 and k % sub_k:
            sub_k //= 2
        block_n = min(cfg.block_n, col_pow2)
        min_n = 128 if fmt == FMT_INT4 else 16
        if dot_design_fits(fmt == FMT_INT4, k, split_sizes) and block_n >= min_n and (words_aligned or fmt != FMT_INT4):
            # "gather" takes one row; its int4 blocks are whole groups, at most one a row of the tile
            gather = cfg.design == "gather" and m == 1
            by_groups = gather and fmt == FMT_INT4
            unit = group_size if by_groups else sub_k
            # block_k in units of a tile (gather's int4: a group): the largest multiple dividing K within
            # the asked one if that keeps at least half of it; else the asked one with the last block
            # cut at K (the kernel's EVEN_K) where the cut-off units are at most an eighth of K's
            # (Llama-2-7B's down: 1024 rows instead of 256)
            n_tiles = k // unit
            tiles = min(max(1, cfg.block_k // unit), n_tiles, dot_tile_rows(m) if by_groups else n_tiles)
            if gather:  # a power of two (one tl.arange lists the block's rows); the last block is cut at K
                tiles = 1 << (tiles.bit_length() - 1)
            else:
                divisor = tiles
                while n_tiles % divisor:
                    divisor -= 1
                cut_off = cdiv(n_tiles, tiles) * tiles - n_tiles
                if 2 * divisor >= tiles or 8 * cut_off > n_tiles:
                    tiles = divisor
            # warps split the tile's rows in 16s
            warps = min(cfg.num_warps, block_n // 64 * dot_tile_rows(m) // 16) if fmt == FMT_INT4 else cfg.num_warps
            return dataclasses.replace(cfg, block_n=block_n, sub_k=sub_k, block_k=tiles * unit, num_warps=warps,
                                       design="gather" if gather else "dot")
        name = {FMT_INT4: f"int4-g{group_size}", FMT_INT8: "int8"}.get(fmt, "bf16")
        cfg = _rows_heuristic(name, m, k, sum(split_sizes))
    if cfg.block_n < 16:
        raise ValueError(f"KernelConfig.block_n must be at least 16, got {cfg.block_n}.")
    block_k = max(cfg.block_k, group_size) if fmt == FMT_INT4 else cfg.block_k
    window = group_size if fmt == FMT_INT4 else block_k
    return dataclasses.replace(cfg, block_k=block_k, sub_k=min(cfg.sub_k, window))


@functools.lru_cache(maxsize=4096)
def _planned_config(device_name: str, weight_format: str, fmt: int, group_size: int, m: int, k: int,
                    split_sizes: tuple[int, ...], words_aligned: bool, dense: bool = False) -> KernelConfig:
    """get_config fitted to the shape, once per layer and batch: it is the same for every call, and
    costs some 40 us of Python, which an eager prefill (hundreds of calls) would pay each time."""
    config = get_config(device_name, weight_format, m, k, sum(split_sizes), dense)
    return _fit_config(config, fmt, group_size, m, k, list(split_sizes), words_aligned)


# ---------------------------------------------------------------------------
# Integer weights to floats in a few bit operations (GPU), plain conversions (interpreter)
# ---------------------------------------------------------------------------
#
# A decode GEMV must convert every weight it reads, and at int4's byte rate the plain
# integer-to-float conversion (I2F, a quarter-rate instruction) costs more time than the load
# (H200: int4 gate_up 99 -> 67 us with this alone; int8, measured once, moved by -2 to +2 us per
# matrix: it is not conversion-bound). The classic alternative, written as PTX for four bytes at
# a time: place the integer in the mantissa of a float whose exponent makes one mantissa unit
# equal 1, then subtract that float's integer part. Exact, because every value involved is an
# integer the format holds.
#   int8 -> fp32: byte u = q + 128 (xor 0x80) placed under 0x4B000000 (2^23) by one prmt,
#     then 2^23 + u - (2^23 + 128) = q.
#   int4 words -> bf16 pairs: the same byte of two rows' words into the low bytes of two 16-bit
#     halves (prmt), a nibble masked under 0x4300 (bf16 128.0, whose mantissa unit is 1) by one
#     lop3, then one packed fma: (128 + n) * 1 - 136 = n - 8. fp16 uses 0x6400 (1024.0) and 1032.
# The interpreter cannot run PTX, so it takes the plain conversions (same values).


@triton.jit
def _int8_to_f32(q, INTERPRET: tl.constexpr):
    """int8 tile as fp32 (exact)."""
    if INTERPRET:
        return q.to(tl.float32)
    else:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 u, m;
            xor.b32 u, $4, 0x80808080;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, u, m, 0x7440;
            prmt.b32 $1, u, m, 0x7441;
            prmt.b32 $2, u, m, 0x7442;
            prmt.b32 $3, u, m, 0x7443;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""",
            constraints="=r,=r,=r,=r,r", args=[q], dtype=tl.float32, is_pure=True, pack=4,
        )


def _planes_asm(magic: int, one: int, bias: int, fma: str) -> str:
    """PTX for two packed int32 words ($8: row k, $9: row k + 1 of the same 8 columns) -> eight
    16-bit float pairs $0..$7, pair i = (nibble i of $8, nibble i of $9) - 8, i.e. column 8w + i of
    both rows: exactly a tl.dot B-operand register when the pair is consecutive along K.  Per byte
    j: one prmt puts byte j of each word into the low byte of one 16-bit half, one lop3 masks the
    low nibble under `magic` (a float whose mantissa unit is 1), a shift and a lop3 the high one,
    and one packed `fma` by `one` and `bias` (= -(magic value + 8)) per pair."""
    lines = [".reg .b32 t, h, one, bias;",
             f"mov.b32 one, {one:#06x}{one:04x};", f"mov.b32 bias, {bias:#06x}{bias:04x};"]
    for j in range(4):
        lines += [
            f"prmt.b32 t, $8, $9, {0x0400 + 0x0101 * j:#06x};",
            "shr.b32 h, t, 4;",
            f"lop3.b32 t, t, 0x000F000F, {magic:#06x}{magic:04x}, 0xEA;",
            f"lop3.b32 h, h, 0x000F000F, {magic:#06x}{magic:04x}, 0xEA;",
            f"{fma} ${2 * j}, t, one, bias;",
            f"{fma} ${2 * j + 1}, h, one, bias;",
        ]
    return "{\n" + "\n".join(lines) + "\n}"


_PLANES_CONSTRAINTS = tl.constexpr("=r," * 8 + "r,r")
_PLANES_BF16 = tl.constexpr(_planes_asm(0x4300, 0x3F80, 0xC308, "fma.rn.bf16x2"))  # 128.0, 1.0, -136.0
_PLANES_FP16 = tl.constexpr(_planes_asm(0x6400, 0x3C00, 0xE408, "fma.rn.f16x2"))  # 1024.0, 1.0, -1032.0


@triton.jit
def _int4_planes(words, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """int32 tile of packed int4 (8 columns per word, column 8w + i in nibble i) -> eight tiles
    of the word's shape, tile i = nibble i - 8 in DTYPE (bf16 or fp16, exact).  The interpreter
    keeps them int8 (its int8 to bf16 cast is unreliable; _dot multiplies in fp32 there)."""
    if INTERPRET:
        return ((words & 0xF).to(tl.int8) - 8, ((words >> 4) & 0xF).to(tl.int8) - 8,
                ((words >> 8) & 0xF).to(tl.int8) - 8, ((words >> 12) & 0xF).to(tl.int8) - 8,
                ((words >> 16) & 0xF).to(tl.int8) - 8, ((words >> 20) & 0xF).to(tl.int8) - 8,
                ((words >> 24) & 0xF).to(tl.int8) - 8, ((words >> 28) & 0xF).to(tl.int8) - 8)
    elif DTYPE == tl.bfloat16:
        return tl.inline_asm_elementwise(
            asm=_PLANES_BF16, constraints=_PLANES_CONSTRAINTS, args=[words], is_pure=True, pack=2,
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                   tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16))
    else:
        return tl.inline_asm_elementwise(
            asm=_PLANES_FP16, constraints=_PLANES_CONSTRAINTS, args=[words], is_pure=True, pack=2,
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16))


# ---------------------------------------------------------------------------
# Kernel: split-K sparse GEMV with an in-kernel, deterministic K reduction
# ---------------------------------------------------------------------------
#
# Grid (K blocks, N blocks).  Program (pk, pn) owns rows [pk*BLOCK_K, +BLOCK_K) and
# BLOCK_N columns of one segment (segments are tiled separately, so a program has a
# single threshold).  The K block is walked in windows (one int4 group, otherwise the
# whole block); the int4 group scale/zero is applied once per window.
#
# Row selection, per KernelConfig.compact:
#   * False: chunks of SUB_K consecutive rows; a chunk where no batch row keeps any x
#     is skipped by a scalar branch (no weight load issued); otherwise masked loads.
#   * True: the kept rows of the block (union over the batch) are compacted with a
#     prefix sum into a per-program index list in global scratch, beside their
#     thresholded x values, then gathered SUB_K at a time, so nearly every weight load
#     is a full row (one extra scratch round trip per program, but no extra launch).
#     The loop reads x from the scratch, not through the row ids: the x load does not
#     wait for the id load, and the gated prologue's SiLU(gate) * up runs once per
#     element in the compaction instead of per gathered lane in the loop (where it
#     doubled down's time, 24 -> 51 us at 50% on the H200).  With PREFETCH the next
#     chunk's weight rows are requested before this chunk's FMAs, so a program keeps two
#     chunks of loads in flight instead of one (the loop is latency-bound otherwise).
#
# Batch: the accumulator is a 2-D [BLOCK_M * SUB_K, BLOCK_N] tile whose lane r holds
# batch row r // SUB_K and chunk row r % SUB_K.  Each lane loads its weight row only
# if its own x is kept, so every batch row uses its own mask; lanes of different batch
# rows that need the same weight row hit L1, and DRAM sees the union.  For M = 1 this
# is the plain 2-D GEMV tile, with one cross-lane reduction at the very end.
#
# Reduction over K blocks: each program stores its fp32 partial [M, BLOCK_N] to a
# workspace and takes a ticket from a per-column-block arrival counter; the last
# arriving program sums the GRID_K partials in a fixed order, applies the int8
# column scale, casts, writes the output and resets the counter.  One launch per
# call, no memset (each call leaves the counters at zero) and bit-reproducible
# results.  tl.atomic_add into fp32 would need a memset and a cast (3 launches) and
# depend on arrival order; a separate reduction kernel would be 2 launches.


@triton.jit
def _rms_scale(x_ptr, M, K, eps, BLOCK_M: tl.constexpr, NORM_BLOCK: tl.constexpr = 1024):
    """1 / sqrt(mean(x[m]^2) + eps) per batch row [BLOCK_M], fp32 (model.RMSNorm's statistics;
    the sum's order differs from torch's, so the last bits may): every program reads the whole
    rows, a few KB from L2, instead of a separate norm kernel writing them, in loads of NORM_BLOCK
    values, each waiting on the last (the loop is unrolled by two: local sm_90 SASS)."""
    m_offs = tl.arange(0, BLOCK_M)
    squares = tl.zeros([BLOCK_M, NORM_BLOCK], dtype=tl.float32)  # summed across threads once, after the loop
    for k0 in range(0, K, NORM_BLOCK):
        cols = k0 + tl.arange(0, NORM_BLOCK)
        h = tl.load(x_ptr + m_offs[:, None] * K + cols[None, :], mask=(m_offs < M)[:, None] & (cols < K)[None, :],
                    other=0.0).to(tl.float32)
        squares += h * h
    return _scale_of(tl.sum(squares, axis=1), K, eps)


@triton.jit
def _scale_of(squares, K, eps):
    """The RMSNorm scale from a row's sum of squares."""
    return 1.0 / tl.sqrt_rn(squares / K + eps)


@triton.jit
def _normed(h, scale, nw, DTYPE: tl.constexpr):
    """model.RMSNorm's output from the residual stream h (fp32 values of DTYPE), its row scale and
    the norm weight nw (fp32; callers request it before the statistics, a weight no barrier waits
    for): (h * scale) rounded to DTYPE, times nw, rounded again."""
    return ((h * scale).to(DTYPE).to(tl.float32) * nw).to(DTYPE).to(tl.float32)


@triton.jit
def _masked_x(x_ptr, lane_m, rows, ok, threshold, K, GATED: tl.constexpr, nw_ptr, scale, NORM: tl.constexpr):
    """x[lane_m, rows] as fp32 where |x| > threshold and ok, else 0. GATED: x is SiLU(gate) * up
    of a [M, 2K] gate|up row, computed in fp32 and rounded to x's dtype like the unfused model.
    NORM: x is RMSNorm of the residual stream at x_ptr, `scale` its row's _rms_scale per lane."""
    if GATED:
        gate = tl.load(x_ptr + lane_m * 2 * K + rows, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + lane_m * 2 * K + K + rows, mask=ok, other=0.0).to(tl.float32)
        xv = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        xv = tl.load(x_ptr + lane_m * K + rows, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            xv = _normed(xv, scale, tl.load(nw_ptr + rows, mask=ok, other=0.0).to(tl.float32), x_ptr.dtype.element_ty)
    return tl.where(tl.abs(xv) > threshold, xv, 0.0)


@triton.jit
def _weight_rows(
    w_ptr, rows, load, col_start, col_end, W_ROW,
    FORMAT: tl.constexpr, COL_ALIGN: tl.constexpr, LANES: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Rows ``rows`` of W^T as fp32 [LANES, BLOCK_N] (q - 8 for int4), reading only where ``load``."""
    if FORMAT == 2:  # int4: BLOCK_N // 2 bytes per row, low nibble = even column
        byte_cols = tl.multiple_of(col_start // 2, COL_ALIGN // 2) + tl.arange(0, BLOCK_N // 2)
        byte_end = tl.multiple_of(col_end // 2, COL_ALIGN // 2)
        packed = tl.load(
            w_ptr + rows[:, None] * W_ROW + byte_cols[None, :],
            mask=load[:, None] & (byte_cols < byte_end)[None, :],
            other=0,
        )
        q = tl.join(packed & 0xF, packed >> 4).reshape(LANES, BLOCK_N)
        return q.to(tl.float32) - 8.0
    else:
        cols = col_start + tl.arange(0, BLOCK_N)
        wt = tl.load(w_ptr + rows[:, None] * W_ROW + cols[None, :], mask=load[:, None] & (cols < col_end)[None, :])
        if FORMAT == 1:
            return _int8_to_f32(wt, INTERPRET)
        return wt.to(tl.float32)


@triton.jit
def _lane_rows(v, SUM: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, SUB_K: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One chunk's products [BLOCK_M * SUB_K, BLOCK_N] -> [BLOCK_M * GROUPS, BLOCK_N] if SUM
    (LANE_SUM): chunk row j is added into row j % GROUPS of its batch row, so with GROUPS the rows
    the tile's layout spreads over threads and warps, no sum leaves a thread. Else ``v`` unchanged
    (the lanes are summed once, after the loop)."""
    if SUM:
        if BLOCK_M == 1 and GROUPS == 1:  # no reshape: it can cost a layout conversion inside the loop
            out = tl.sum(v, axis=0)[None, :]
        elif BLOCK_M == 1:
            out = tl.sum(tl.reshape(v, [SUB_K // GROUPS, GROUPS, BLOCK_N]), axis=0)
        else:
            out = tl.reshape(tl.sum(tl.reshape(v, [BLOCK_M, SUB_K // GROUPS, GROUPS, BLOCK_N]), axis=1),
                             [BLOCK_M * GROUPS, BLOCK_N])
    else:
        out = v
    return out


@triton.jit
def _group_sum(acc, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A LANE_SUM accumulator [BLOCK_M * GROUPS, BLOCK_N] -> [BLOCK_M, BLOCK_N]."""
    if GROUPS == 1:
        out = acc
    else:
        out = tl.sum(tl.reshape(acc, [BLOCK_M, GROUPS, BLOCK_N]), axis=1)
    return out


@triton.jit
def _exclusive_prefix(v, RUN: tl.constexpr):
    """Exclusive prefix sum of a 1-D int tensor of a multiple of RUN values (the gather design's kept rows -> their slots in its
    list), as runs of RUN neighbours (one thread's vector load: summed in registers) and a scan of the
    runs' totals. tl.cumsum over the whole block scanned across threads once for every value a thread
    holds: 5 SHFL.UP and a shared-memory step a 128 values at 4 warps (local sm_90 SASS, triton 3.6:
    92 SHFL.UP at int4 gate|up's 2048-row block, 10 with runs). The rows design takes it for one row
    and long blocks (int8 gate|up's 4096 rows: 160 -> 20 SHFL.UP, 248 -> 216 registers; down's 1024:
    40 -> 5, 109 -> 96); at 256-512 rows it saved a few instructions and moved registers both ways."""
    runs = tl.reshape(v, [v.shape[0] // RUN, RUN])
    totals = tl.sum(runs, axis=1)
    before = tl.cumsum(totals, 0) - totals
    return tl.reshape(before[:, None] + tl.cumsum(runs, 1) - runs, [v.shape[0]])


@triton.jit
def _kept_slots(slots, slot_x, slot, last, lane_m, BLOCK_M: tl.constexpr):
    """Row ids and thresholded x of compaction slots ``slot`` (zeros past ``last``)."""
    rows = tl.load(slots + slot, mask=slot < last, other=0, cache_modifier=".cg")
    xm = tl.load(slot_x + slot * BLOCK_M + lane_m, mask=slot < last, other=0.0, cache_modifier=".cg")
    return rows, xm


@triton.jit
def _column_block_output(part_ptr, out_ptr, res_ptr, scale_ptr, counter_ptr, pid_n, GRID_K, M, N, m_offs, cols,
                         out_ok, FORMAT: tl.constexpr, RESIDUAL: tl.constexpr, RED_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         sw_ptr=None, scaled_ptr=None, sumsq_ptr=None, STATS: tl.constexpr = False):
    """The last program of a column block: the sum of its GRID_K fp32 partials [M, BLOCK_N] (RED_K of
    them requested at once, in a fixed order: loaded one by one, each load waited for the last, which
    for down's 14 partials would be ~8 of the int4 gather call's 10.2 µs with no row read on the H100 at
    ~0.6 µs a trip, an estimate), times the int8 column
    scale, rounded, plus the residual (the unfused model's rounding: product to x's dtype, then the
    sum); stores the output rows m_offs < M and resets the arrival counter for the next call. STATS (the
    dot design, BLOCK_N a multiple of 16 from a column that is one): also what the next RMSNorm's consumer
    takes instead of the norm (reference.norm_statistics): out * sw rounded, and out's squares summed
    a 16-column tile."""
    # what the sum does not produce is requested first, so it arrives with the partials: issued after
    # the sum's loop, the residual and the norm's weight were two more round trips (local sm_90 SASS).
    # With the combine's change in attention.py: int4 + int8 head at 50%, H100, 498.2 / 498.5 -> 503.7 /
    # 503.9 tok/s (results/packed_scales_2026_12_06/, section 5)
    if FORMAT == 1:
        col_scale = tl.load(scale_ptr + cols, mask=cols < N, other=0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + m_offs[:, None] * N + cols[None, :], mask=out_ok, other=0.0)
    if STATS:
        sw = tl.load(sw_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, GRID_K, RED_K):
        r = r0 + tl.arange(0, RED_K)
        offs = (r[:, None, None] * M + m_offs[None, :, None]) * N + cols[None, None, :]
        ok = (r < GRID_K)[:, None, None] & out_ok[None, :, :]
        total += tl.sum(tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
    if FORMAT == 1:
        total *= col_scale[None, :]
    result = total.to(out_ptr.dtype.element_ty)
    if RESIDUAL:
        result = (result.to(tl.float32) + res.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m_offs[:, None] * N + cols[None, :], result, mask=out_ok)
    if STATS:
        h = result.to(tl.float32)
        tl.store(scaled_ptr + m_offs[:, None] * N + cols[None, :], (h * sw[None, :]).to(out_ptr.dtype.element_ty),
                 mask=out_ok)
        TILES: tl.constexpr = BLOCK_N // 16
        tiles = tl.min(tl.reshape(cols, [TILES, 16]), axis=1) // 16
        squares = tl.sum(tl.reshape(h * h, [BLOCK_M, TILES, 16]), axis=2)
        tl.store(sumsq_ptr + m_offs[:, None] * (N // 16) + tiles[None, :], squares,
                 mask=(m_offs < M)[:, None] & (tiles < N // 16)[None, :])
    tl.store(counter_ptr + pid_n, 0)  # ready for the next call


@triton.jit
def _sparse_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, thr_ptr, res_ptr, nw_ptr,
    out_ptr, part_ptr, counter_ptr, idx_ptr, xs_ptr,
    k_ptr, v_ptr, pos_ptr, cs_ptr, S_MAX, stride_kh, stride_ks, qk_scale_log2,  # ATTENTION's
    M, K, N, W_ROW, GRID_K, eps,
    SPLITS,  # column boundaries of the segments (trailing empty segments allowed)
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, COL_ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
    WINDOW: tl.constexpr, COMPACT: tl.constexpr, PREFETCH: tl.constexpr, PIPELINE: tl.constexpr,
    LANE_SUM: tl.constexpr,
    LANE_GROUPS: tl.constexpr, RED_K: tl.constexpr,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, WHOLE_ROW: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
    ATTENTION: tl.constexpr = False,  # x is a q|k|v row: the input is its attention (see attention_o_triton)
    ATT_GROUP: tl.constexpr = 1, ATT_HEADS_PAD: tl.constexpr = 16, ATT_D: tl.constexpr = 16,
    ATT_BLOCK_S: tl.constexpr = 16,
):
    LANES: tl.constexpr = BLOCK_M * SUB_K
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)

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
    if PDL:  # launched early: no memory access before the previous kernel has finished
        tl.extra.cuda.gdc_wait()
    threshold = tl.load(thr_ptr + seg)
    cols = col_start + tl.arange(0, BLOCK_N)
    cols_ok = cols < col_end
    lane = tl.arange(0, LANES)
    lane_m = lane // SUB_K
    lane_k = lane % SUB_K
    m_ok = lane_m < M
    k_block = pid_k * BLOCK_K
    m_offs = tl.arange(0, BLOCK_M)
    if NORM and not COMPACT:  # the lanes' scale (the compact path takes it with its block's load)
        row_scale = _rms_scale(x_ptr, M, K, eps, BLOCK_M)  # [BLOCK_M]
        lane_scale = tl.sum(tl.where(lane_m[:, None] == m_offs[None, :], row_scale[None, :], 0.0), axis=1)
    else:
        row_scale = tl.zeros([BLOCK_M], dtype=tl.float32)
        lane_scale = tl.zeros([LANES], dtype=tl.float32)

    if COMPACT:
        # Slot i of this program's scratch <- i-th row of the block kept by any batch row.
        block_rows = k_block + tl.arange(0, BLOCK_K)
        block_ok = (m_offs[:, None] < M) & (block_rows[None, :] < K)
        if ATTENTION:
            # The block's rows are whole query heads of one KV group (M = 1): their attention over
            # the cache, computed here (RoPE, the group's first column block writes the new key and
            # value), then thresholded as a loaded x would be.
            att = heads_attention(x_ptr, cs_ptr, k_ptr, v_ptr, pos_ptr, S_MAX, stride_kh, stride_ks, qk_scale_log2,
                                  k_block // ATT_D, (pid_n == 0) & (k_block % (ATT_GROUP * ATT_D) == 0),
                                  K // (ATT_GROUP * ATT_D), ATT_GROUP, BLOCK_K // ATT_D, ATT_HEADS_PAD, ATT_D,
                                  ATT_BLOCK_S, ATTENTION_KV_STAGES, INTERPRET)
            block_x = tl.reshape(att, [BLOCK_M, BLOCK_K])
            block_x = tl.where(tl.abs(block_x) > threshold, block_x, 0.0)
        elif NORM:
            # The block's residual stream is loaded before the statistics' loads, so both are in
            # flight at once; a block that holds every row gives the statistics itself.
            h = tl.load(x_ptr + m_offs[:, None] * K + block_rows[None, :], mask=block_ok, other=0.0).to(tl.float32)
            nw = tl.load(nw_ptr + block_rows[None, :], mask=block_ok, other=0.0).to(tl.float32)
            if WHOLE_ROW:
                row_scale = _scale_of(tl.sum(h * h, axis=1), K, eps)
            else:
                row_scale = _rms_scale(x_ptr, M, K, eps, BLOCK_M)
            block_x = _normed(h, row_scale[:, None], nw, x_ptr.dtype.element_ty)
            block_x = tl.where(tl.abs(block_x) > threshold, block_x, 0.0)
        else:
            block_x = _masked_x(x_ptr, m_offs[:, None], block_rows[None, :], block_ok, threshold, K, GATED,
                                nw_ptr, row_scale[:, None], NORM)
        kept = (tl.max(tl.abs(block_x), axis=0) > 0).to(tl.int32)
        slots = idx_ptr + (pid_n * GRID_K + pid_k) * BLOCK_K
        slot_x = xs_ptr + (pid_n * GRID_K + pid_k) * BLOCK_K * BLOCK_M  # [slot, batch row] fp32
        win_kept = tl.sum(tl.reshape(kept, [BLOCK_K // WINDOW, WINDOW]), axis=1)
        win_ids = tl.arange(0, BLOCK_K // WINDOW)
        if BLOCK_M == 1 and BLOCK_K >= 1024:  # long blocks (int8 gate|up, down): _exclusive_prefix
            kept = (tl.reshape(block_x, [BLOCK_K]) != 0.0).to(tl.int32)  # x's own layout, not a max's
            dest = _exclusive_prefix(kept, 8)
        else:
            dest = tl.cumsum(kept, 0) - kept
        tl.store(slots + dest, block_rows, mask=kept > 0)
        tl.store(slot_x + dest[None, :] * BLOCK_M + m_offs[:, None], block_x, mask=(kept > 0)[None, :])
        tl.debug_barrier()  # every thread's slot writes are visible before the gathers

    # Accumulator rows: one per lane, summed once at the end (int4: at each group's end), or with
    # LANE_SUM LANE_GROUPS per batch row, each chunk's lanes summed into them as it is multiplied.
    ACC_ROWS: tl.constexpr = BLOCK_M * LANE_GROUPS if LANE_SUM else LANES
    if FORMAT == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([ACC_ROWS, BLOCK_N], dtype=tl.float32)
    n_windows = tl.cdiv(tl.minimum(K - k_block, BLOCK_K), WINDOW)  # none past row K
    for win in tl.range(0, n_windows):
        win_start = k_block + win * WINDOW
        if FORMAT == 2:  # sum of x * (q - 8) and of x in this group, scaled below
            wacc = tl.zeros([ACC_ROWS, BLOCK_N], dtype=tl.float32)
            xacc = tl.zeros([LANES], dtype=tl.float32)
        else:
            wacc = acc
        if COMPACT:
            first = tl.sum(tl.where(win_ids < win, win_kept, 0), axis=0)
            last = first + tl.sum(tl.where(win_ids == win, win_kept, 0), axis=0)
            if PIPELINE > 1:
                # Triton's software pipeline: the row ids, x and weight rows of the next PIPELINE - 1
                # chunks are in flight (cp.async into shared memory, no registers held) during this one's
                # FMAs. With NORM and several K blocks, local triton 3.9 loads the weight rows a byte at a
                # time here (the run-time loop of _rms_scale before it; WHOLE_ROW has no such loop); on the
                # H200 (triton 3.6) that was not seen (results/long_k/ section 5).
                for chunk in tl.range(first, last, SUB_K, num_stages=PIPELINE):
                    rows, xm = _kept_slots(slots, slot_x, chunk + lane_k, last, lane_m, BLOCK_M)
                    wt = _weight_rows(w_ptr, rows, xm != 0, col_start, col_end, W_ROW, FORMAT, COL_ALIGN, LANES,
                                      BLOCK_N, INTERPRET)
                    wacc += _lane_rows(xm[:, None] * wt, LANE_SUM, LANE_GROUPS, BLOCK_M, SUB_K, BLOCK_N)
                    if FORMAT == 2:
                        xacc += xm
            else:
                slot = first + lane_k
                rows, xm = _kept_slots(slots, slot_x, slot, last, lane_m, BLOCK_M)
                if PREFETCH:  # the first chunk's weight rows; the loop keeps one chunk in flight ahead
                    wt = _weight_rows(w_ptr, rows, xm != 0, col_start, col_end, W_ROW, FORMAT, COL_ALIGN, LANES, BLOCK_N,
                                      INTERPRET)
                    slot += SUB_K
                    rows, next_xm = _kept_slots(slots, slot_x, slot, last, lane_m, BLOCK_M)
                for _ in tl.range(first, last, SUB_K):
                    # Issue the next loads (row ids and x; with PREFETCH also the next chunk's weight
                    # rows) before this chunk's FMAs wait on its weights.
                    slot += SUB_K
                    if PREFETCH:
                        next_wt = _weight_rows(w_ptr, rows, next_xm != 0, col_start, col_end, W_ROW, FORMAT, COL_ALIGN,
                                               LANES, BLOCK_N, INTERPRET)
                        rows, after_xm = _kept_slots(slots, slot_x, slot, last, lane_m, BLOCK_M)
                    else:
                        wt = _weight_rows(w_ptr, rows, xm != 0, col_start, col_end, W_ROW, FORMAT, COL_ALIGN, LANES,
                                          BLOCK_N, INTERPRET)
                        rows, next_xm = _kept_slots(slots, slot_x, slot, last, lane_m, BLOCK_M)
                    wacc += _lane_rows(xm[:, None] * wt, LANE_SUM, LANE_GROUPS, BLOCK_M, SUB_K, BLOCK_N)
                    if FORMAT == 2:
                        xacc += xm
                    xm = next_xm
                    if PREFETCH:
                        next_xm = after_xm
                        wt = next_wt
        else:
            win_end = tl.minimum(win_start + WINDOW, K)
            rows = win_start + lane_k
            xm = _masked_x(x_ptr, lane_m, rows, (rows < win_end) & m_ok, threshold, K, GATED, nw_ptr, lane_scale,
                           NORM)
            for c in range(0, WINDOW, SUB_K):
                # Prefetch the next chunk's x, then skip this chunk if no batch row keeps any row.
                next_rows = rows + SUB_K
                next_xm = _masked_x(x_ptr, lane_m, next_rows, (next_rows < win_end) & m_ok, threshold, K, GATED,
                                    nw_ptr, lane_scale, NORM)
                if tl.max(tl.abs(xm), axis=0) > 0:
                    wt = _weight_rows(
                        w_ptr, rows, xm != 0, col_start, col_end, W_ROW, FORMAT, COL_ALIGN, LANES, BLOCK_N, INTERPRET
                    )
                    wacc += _lane_rows(xm[:, None] * wt, LANE_SUM, LANE_GROUPS, BLOCK_M, SUB_K, BLOCK_N)
                    if FORMAT == 2:
                        xacc += xm
                rows = next_rows
                xm = next_xm
        if FORMAT == 2:
            group = win_start // GROUP_SIZE
            s, z = _scales_zeros(scale_ptr, zero_ptr, group * N + cols, cols_ok)
            if LANE_SUM:
                w_sum = _group_sum(wacc, LANE_GROUPS, BLOCK_M, BLOCK_N)
            else:
                w_sum = tl.sum(tl.reshape(wacc, [BLOCK_M, SUB_K, BLOCK_N]), axis=1)
            x_sum = tl.sum(tl.reshape(xacc, [BLOCK_M, SUB_K]), axis=1)
            acc += w_sum * s[None, :] + x_sum[:, None] * z[None, :]
        else:
            acc = wacc

    if PDL:  # the next kernel may start launching (it waits for this grid before any access)
        tl.extra.cuda.gdc_launch_dependents()
    # Publish this block's partial; the last program of the column block reduces.
    out_ok = (m_offs[:, None] < M) & cols_ok[None, :]
    if FORMAT == 2:
        partial = acc
    elif LANE_SUM:
        partial = _group_sum(acc, LANE_GROUPS, BLOCK_M, BLOCK_N)
    else:
        partial = tl.sum(tl.reshape(acc, [BLOCK_M, SUB_K, BLOCK_N]), axis=1)
    tl.store(part_ptr + (pid_k * M + m_offs[:, None]) * N + cols[None, :], partial, mask=out_ok)
    tl.debug_barrier()  # all threads' partial stores precede the release below
    ticket = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if ticket == GRID_K - 1:
        _column_block_output(part_ptr, out_ptr, res_ptr, scale_ptr, counter_ptr, pid_n, GRID_K, M, N, m_offs, cols,
                             out_ok, FORMAT, RESIDUAL, RED_K, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------
# Kernel: masked tiles through tl.dot, software-pipelined ("dot" design)
# ---------------------------------------------------------------------------
#
# Grid (N blocks, K blocks).  BLOCK_N divides every segment (so a program has one threshold and
# no column mask) and SUB_K divides K; the tile loop has a static trip count BLOCK_K // SUB_K.
# This is the design of benchmarks/gemv_lab.py's ``_tgemv`` (masked mode), kept literal: a first
# port with dynamic loop bounds and a column mask returned zeros for a quarter of the columns at
# M = 1 on the H200 (results/NOTES.md), while the lab kernel was right.  Where BLOCK_K does not
# divide K (EVEN_K false: Llama-2-7B's down, K = 11008 = 86 int4 groups, would otherwise take
# 256-row blocks), the last block's tiles past K read x as zero, so their weight rows are dropped
# like any zeroed input's, and int4 takes the last group's scale for them.
#
# Tile t: x [BLOCK_M, SUB_K] thresholded at the batch's own size (BLOCK_M = M rounded up to a
# power of two), then repeated to the DOT_M = max(16, BLOCK_M) rows of the tl.dot (16 is its
# minimum; row r holds batch row r % BLOCK_M; only rows < M are stored; batches of 16-64 rows, a
# quantized model's short prefills, take tiles of their own height): padding the batch with zero
# rows instead made every x-side step of the loop (loads, thresholds, the keep mask, int4's sum of
# x) 16 times wider at M = 1.  Weight
# rows whose x is zero in every batch row are predicated off, the others read whole; the product
# runs on tl.dot, which Triton pipelines num_stages deep (cp.async into shared memory): the lab
# measured 10-30% more bandwidth than FMA lanes at batch 1.  int8 and int4 weights are converted
# to x's dtype (exact: |q| <= 128) before the dot; int4 tiles lie inside one group (SUB_K divides
# the group size) and take its scale and zero right after their dot:
# y += s * (x . (q - 8)) + z * sum(x).  int4 is read as int32 words of 8 columns; nibble i of
# every word (columns 8w + i, a "plane") is one dot into its own accumulator, the eight
# interleaved once after the loop.  Loading bytes instead made Triton gather the tl.dot operand
# byte by byte from shared memory (two rows per register pair: 64 LDS.U8 and 32 PRMT per tile
# and thread, SASS of triton 3.6, sm_90); words load whole and _int4_planes converts a pair of
# rows' words straight into the operand's registers.
#
# "gather" (one row, GATHER): the masked tiles above cost the same work at any sparsity, since a
# dropped row is only a predicated-off load; int4's tile is bound by its conversions and barriers,
# not by bytes (H200, gate|up: 36.2 us at 0%, 33.0 at 65%, results/tinygemm_table_2026_12_05/).
# Here the program first lists its block's kept rows and their x in a scratch (a prefix sum, as
# the rows design's compaction), then reads them SUB_K at a time, so the tiles follow the kept
# rows. A tile now spans int4 groups; at one row the tl.dot's other 15 rows are free, so row g of
# the x tile holds the x of the block's g-th group (zero elsewhere) and accumulator row g sums
# group g alone: blocks of at most 16 groups, and each group's scale and zero are applied once a
# block (_group_scaled) instead of once a tile. The block's scales and zeros prefetched into L2 before
# the PDL wait (prefetch.global.L2) lost: H100, 2026-12-06, gate|up at 50% 20.50 -> 21.67 µs a call,
# the int4 50% step 482.6 -> 451.7 tok/s (results/gather_prologue_2026_12_06/); not kept. Requested into
# registers before the loop (after the wait) lost too: H100, 2026-12-06, gate|up 20.49 -> 22.25 µs, down
# 13.57 -> 15.11, the step 504.3 / 504.8 -> 497.5 / 499.1 alternating (results/scales_early_2026_12_06/).
#
# Reduction over K blocks, one launch, no memset, as in the "rows" design: each program stores
# its fp32 partial and the last program of the column block (arrival ticket) sums them in a fixed
# order, applies the int8 column scale and the residual and writes the output.  fp32 atomics into
# a self-cleaning accumulator instead gained only on bf16 q|k|v (17.0 against 18.4 us dense, H200,
# 2026-12-02), which the tuned configs run in the "rows" design, and lost a program's partial in
# about 1% of calls, with or without a fence after the atomics (results/int8_retune/): removed.


@triton.jit
def _dot_x_tile(x_ptr, m_offs, m_ok, rows, threshold, K, GATED: tl.constexpr, nw_ptr, row_scale,
                NORM: tl.constexpr, EVEN_K: tl.constexpr, M=1, eps=0.0, OWN_STATS: tl.constexpr = False):
    """Thresholded x [BLOCK_M, SUB_K] in fp32 (batch rows past M and, unless EVEN_K, weight rows
    past K are zero); GATED and NORM as _masked_x. OWN_STATS (the gather design's one block): NORM's
    row_scale is computed here, after the tile's load is requested, so the tile and the whole rows
    (in loads of 4096 values: one round trip at K = 4096) are in flight together."""
    if EVEN_K:
        ok = m_ok[:, None]
    else:
        ok = m_ok[:, None] & (rows < K)[None, :]
    if GATED:
        gate = tl.load(x_ptr + m_offs[:, None] * 2 * K + rows[None, :], mask=ok, other=0.0)
        up = tl.load(x_ptr + m_offs[:, None] * 2 * K + K + rows[None, :], mask=ok, other=0.0)
        gate = gate.to(tl.float32)
        xv = (gate * tl.sigmoid(gate) * up.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        xv = tl.load(x_ptr + m_offs[:, None] * K + rows[None, :], mask=ok, other=0.0).to(tl.float32)
        if NORM:
            nw = tl.load(nw_ptr + rows[None, :], mask=ok, other=0.0).to(tl.float32)
            if OWN_STATS:
                row_scale = _rms_scale(x_ptr, M, K, eps, m_offs.shape[0], 4096)
            xv = _normed(xv, row_scale[:, None], nw, x_ptr.dtype.element_ty)
    return tl.where(tl.abs(xv) > threshold, xv, 0.0)


@triton.jit
def _dot_w_tile(w_ptr, rows, keep, col0, W_ROW, SUB_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``rows`` x columns [col0, col0 + BLOCK_N) of W^T (float, int8, or int4's int32 words),
    read only where ``keep``."""
    cols = tl.multiple_of(col0, BLOCK_N) + tl.arange(0, BLOCK_N)
    return tl.load(w_ptr + rows[:, None] * W_ROW + cols[None, :], mask=keep[:, None], other=0)


@triton.jit
def _scales_zeros(scale_ptr, zero_ptr, offs, ok):
    """int4 groups' float32 scales and zeros at `offs` (0 where not ok; ok None: all read): two float32
    loads, or (int32 pointers: reference.pack_scales_zeros's words, given as both) one load of bf16
    pairs, each half placed in a float's high bits (exact)."""
    if zero_ptr.dtype.element_ty == tl.int32:
        words = _load_where(zero_ptr + offs, ok)
        return (words & -65536).to(tl.float32, bitcast=True), (words << 16).to(tl.float32, bitcast=True)
    else:
        return _load_where(scale_ptr + offs, ok), _load_where(zero_ptr + offs, ok)


@triton.jit
def _load_where(ptrs, ok):
    """tl.load of `ptrs`, 0 where not `ok` (None: no mask)."""
    if ok is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _plane_step(acc, xt, plane, x_sum, scale_ptr, zero_ptr, offs, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """One int4 plane's dot, scaled by its group: acc + s * (x . (q - 8)) + z * sum(x)."""
    s, z = _scales_zeros(scale_ptr, zero_ptr, offs, None)
    return acc + _dot(xt, plane, DTYPE, INTERPRET) * s[None, :] + x_sum * z[None, :]


@triton.jit
def _plane_steps(a0, a1, a2, a3, a4, a5, a6, a7, xt, p0, p1, p2, p3, p4, p5, p6, p7, x_sum, scale_ptr, zero_ptr,
                 offs, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """_plane_step for each of a tile's eight nibble planes (`offs`: the group's scale/zero offsets
    of plane 0's columns)."""
    a0 = _plane_step(a0, xt, p0, x_sum, scale_ptr, zero_ptr, offs, DTYPE, INTERPRET)
    a1 = _plane_step(a1, xt, p1, x_sum, scale_ptr, zero_ptr, offs + 1, DTYPE, INTERPRET)
    a2 = _plane_step(a2, xt, p2, x_sum, scale_ptr, zero_ptr, offs + 2, DTYPE, INTERPRET)
    a3 = _plane_step(a3, xt, p3, x_sum, scale_ptr, zero_ptr, offs + 3, DTYPE, INTERPRET)
    a4 = _plane_step(a4, xt, p4, x_sum, scale_ptr, zero_ptr, offs + 4, DTYPE, INTERPRET)
    a5 = _plane_step(a5, xt, p5, x_sum, scale_ptr, zero_ptr, offs + 5, DTYPE, INTERPRET)
    a6 = _plane_step(a6, xt, p6, x_sum, scale_ptr, zero_ptr, offs + 6, DTYPE, INTERPRET)
    a7 = _plane_step(a7, xt, p7, x_sum, scale_ptr, zero_ptr, offs + 7, DTYPE, INTERPRET)
    return a0, a1, a2, a3, a4, a5, a6, a7


@triton.jit
def _group_scaled(a0, a1, a2, a3, a4, a5, a6, a7, x_sums, scale_ptr, zero_ptr, offs, ok):
    """The "gather" design's plane accumulators [DOT_M, BLOCK_N / 8], row g holding group g's
    x . (q - 8), -> the one output row sum_g s_g * row g + z_g * sum(x in g), [DOT_M, BLOCK_N] with the
    row repeated. The block's scales and zeros are requested first, as two loads in flight together,
    and arrive while the planes are interleaved: scaled a plane at a time, each load waited behind the
    previous plane's layout conversion (its barriers), 16 round trips to memory a call (local sm_90
    SASS)."""
    s, z = _scales_zeros(scale_ptr, zero_ptr, offs, ok)
    acc = _interleave8(a0, a1, a2, a3, a4, a5, a6, a7)
    row = tl.sum(acc * s + x_sums[:, None] * z, axis=0)
    return tl.broadcast_to(row[None, :], acc.shape)


@triton.jit
def _interleave8(p0, p1, p2, p3, p4, p5, p6, p7):
    """Eight [R, C] tiles -> [R, 8 * C] with column 8c + i from tile i."""
    t = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tl.reshape(t, [p0.shape[0], 8 * p0.shape[1]])


@triton.jit
def _dot_rows(v, BLOCK_M: tl.constexpr, DOT_M: tl.constexpr):
    """[BLOCK_M, ...] -> [DOT_M, ...] with row r = v[r % BLOCK_M] (BLOCK_M divides DOT_M)."""
    if BLOCK_M == DOT_M:
        return v
    elif len(v.shape) == 1:
        return tl.reshape(tl.broadcast_to(v[None, :], [DOT_M // BLOCK_M, BLOCK_M]), [DOT_M])
    else:
        return tl.reshape(tl.broadcast_to(v[None, :, :], [DOT_M // BLOCK_M, BLOCK_M, v.shape[1]]),
                          [DOT_M, v.shape[1]])


@triton.jit
def _dot(xt, wt, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """xt [DOT_M, SUB_K] @ wt [SUB_K, BLOCK_N] in fp32; both operands are exact in x's dtype.
    The interpreter's bf16 dot is unreliable, so it multiplies in fp32."""
    if INTERPRET:
        return tl.dot(xt, wt.to(tl.float32), input_precision="ieee")
    return tl.dot(xt.to(DTYPE), wt.to(DTYPE))


@triton.jit
def _dot_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, thr_ptr, res_ptr, nw_ptr,
    out_ptr, part_ptr, counter_ptr, idx_ptr, xs_ptr,
    sw_ptr, scaled_ptr, sumsq_ptr,  # STATS's (the next norm's weight, its input and sums of squares)
    M, K, N, W_ROW, eps,
    SPLITS,  # column boundaries of the segments (trailing empty segments allowed)
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_K: tl.constexpr,
    GATED: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
    GATHER: tl.constexpr = False, GROUPS: tl.constexpr = 1,  # the "gather" design (one row): see above
    RED_K: tl.constexpr = 1,  # partials the last program requests at once (_column_block_output)
    STATS: tl.constexpr = False,  # the output's norm statistics too (_column_block_output)
):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_k = tl.num_programs(1)
    col0 = pid_n * BLOCK_N
    seg = 0
    for j in tl.static_range(1, _SEGMENT_SLOTS):
        seg += (col0 >= SPLITS[j]).to(tl.int32)
    cols = tl.multiple_of(col0, BLOCK_N) + tl.arange(0, BLOCK_N)
    if PDL:  # launched early: no memory access before the previous kernel has finished
        tl.extra.cuda.gdc_wait()
    threshold = tl.load(thr_ptr + seg)
    m_offs = tl.arange(0, BLOCK_M)
    m_ok = m_offs < M
    k0 = pid_k * BLOCK_K
    if NORM and not GATHER:
        row_scale = _rms_scale(x_ptr, M, K, eps, BLOCK_M)
    else:  # unread, or (GATHER) computed with the block's x
        row_scale = tl.zeros([BLOCK_M], dtype=tl.float32)

    acc = tl.zeros([DOT_M, BLOCK_N], dtype=tl.float32)
    if FORMAT == 2:  # one accumulator per nibble plane (columns 8w + i), interleaved once at the end
        NW: tl.constexpr = BLOCK_N // 8
        a0 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a1 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a2 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a3 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a4 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a5 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a6 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        a7 = tl.zeros([DOT_M, NW], dtype=tl.float32)
        plane_cols = col0 + 8 * tl.arange(0, NW)
    if GATHER:  # M = 1: the block's kept rows, listed once, then read SUB_K a tile
        block_rows = k0 + tl.arange(0, BLOCK_K)
        block_x = tl.reshape(_dot_x_tile(x_ptr, m_offs, m_ok, block_rows, threshold, K, GATED, nw_ptr, row_scale,
                                         NORM, EVEN_K, M, eps, OWN_STATS=True), [BLOCK_K])
        kept = (block_x != 0.0).to(tl.int32)
        dest = _exclusive_prefix(kept, 8)
        slots = (pid_n * grid_k + pid_k) * BLOCK_K
        tl.store(idx_ptr + slots + dest, block_rows, mask=kept > 0)
        tl.store(xs_ptr + slots + dest, block_x, mask=kept > 0)
        n_kept = tl.sum(kept, axis=0)
        tl.debug_barrier()  # every thread's list entries are visible before the tiles read them
        group_rows = tl.arange(0, DOT_M)
        # int4: each group's sum of x, row g of DOT_M (from the block, not summed again in every tile)
        group_x = tl.sum(tl.reshape(block_x, [GROUPS, BLOCK_K // GROUPS]), axis=1)
        x_sums = tl.sum(tl.where(group_rows[:, None] == tl.arange(0, GROUPS)[None, :], group_x[None, :], 0.0), axis=1)
        for c in tl.range(0, n_kept, SUB_K):
            slot = c + tl.arange(0, SUB_K)
            listed = slot < n_kept
            rows = tl.load(idx_ptr + slots + slot, mask=listed, other=k0, cache_modifier=".cg")
            xv = tl.load(xs_ptr + slots + slot, mask=listed, other=0.0, cache_modifier=".cg")
            # row g of the tile holds the x of the block's g-th group (all of x at GROUPS = 1)
            xt = tl.where(((rows - k0) // (BLOCK_K // GROUPS))[None, :] == group_rows[:, None], xv[None, :], 0.0)
            if FORMAT == 2:
                words = _dot_w_tile(w_ptr, rows, listed, pid_n * NW, W_ROW, SUB_K, NW)
                p0, p1, p2, p3, p4, p5, p6, p7 = _int4_planes(words, DTYPE, INTERPRET)
                a0 += _dot(xt, p0, DTYPE, INTERPRET)
                a1 += _dot(xt, p1, DTYPE, INTERPRET)
                a2 += _dot(xt, p2, DTYPE, INTERPRET)
                a3 += _dot(xt, p3, DTYPE, INTERPRET)
                a4 += _dot(xt, p4, DTYPE, INTERPRET)
                a5 += _dot(xt, p5, DTYPE, INTERPRET)
                a6 += _dot(xt, p6, DTYPE, INTERPRET)
                a7 += _dot(xt, p7, DTYPE, INTERPRET)
            else:
                wt = _dot_w_tile(w_ptr, rows, listed, col0, W_ROW, SUB_K, BLOCK_N)
                if FORMAT == 1:
                    wt = _int8_to_f32(wt, INTERPRET)
                acc += _dot(xt, wt, DTYPE, INTERPRET)
        if FORMAT == 2:  # each group's scale and zero, once a block: row g of the tile is group g
            groups = k0 // GROUP_SIZE + group_rows
            g_ok = ((group_rows < GROUPS) & (groups < K // GROUP_SIZE))[:, None]
            acc = _group_scaled(a0, a1, a2, a3, a4, a5, a6, a7, x_sums, scale_ptr, zero_ptr,
                                groups[:, None] * N + cols[None, :], g_ok)
    else:
        for t in tl.range(0, BLOCK_K // SUB_K):
            rows = k0 + t * SUB_K + tl.arange(0, SUB_K)
            x_batch = _dot_x_tile(x_ptr, m_offs, m_ok, rows, threshold, K, GATED, nw_ptr, row_scale, NORM, EVEN_K)
            keep = tl.max(tl.abs(x_batch), axis=0) > 0.0
            xt = _dot_rows(x_batch, BLOCK_M, DOT_M)
            if FORMAT == 2:  # w_ptr: int32 words, W_ROW words per row; dropped rows read as 0 (q - 8 = -8, x 0)
                words = _dot_w_tile(w_ptr, rows, keep, pid_n * NW, W_ROW, SUB_K, NW)
                p0, p1, p2, p3, p4, p5, p6, p7 = _int4_planes(words, DTYPE, INTERPRET)
                x_sum = _dot_rows(tl.sum(x_batch, axis=1), BLOCK_M, DOT_M)[:, None]
                group = (k0 + t * SUB_K) // GROUP_SIZE
                if not EVEN_K:  # a tile past K (all x zero) takes the last group's finite scale and zero
                    group = tl.minimum(group, K // GROUP_SIZE - 1)
                offs = group * N + plane_cols
                a0, a1, a2, a3, a4, a5, a6, a7 = _plane_steps(a0, a1, a2, a3, a4, a5, a6, a7, xt, p0, p1, p2, p3, p4,
                                                              p5, p6, p7, x_sum, scale_ptr, zero_ptr, offs, DTYPE,
                                                              INTERPRET)
            else:
                wt = _dot_w_tile(w_ptr, rows, keep, col0, W_ROW, SUB_K, BLOCK_N)
                if FORMAT == 1:  # int8 -> fp32 by bit operations, then one packed cvt to x's dtype
                    wt = _int8_to_f32(wt, INTERPRET)
                acc += _dot(xt, wt, DTYPE, INTERPRET)
    if FORMAT == 2 and not GATHER:
        acc = _interleave8(a0, a1, a2, a3, a4, a5, a6, a7)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()

    out_rows = tl.arange(0, DOT_M)
    out_offs = out_rows[:, None] * N + cols[None, :]
    out_ok = (out_rows < M)[:, None] & (cols < N)[None, :]
    tl.store(part_ptr + pid_k * M * N + out_offs, acc, mask=out_ok)
    tl.debug_barrier()  # every thread's partial precedes the release below
    ticket = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if ticket == grid_k - 1:
        _column_block_output(part_ptr, out_ptr, res_ptr, scale_ptr, counter_ptr, pid_n, grid_k, M, N, m_offs, cols,
                             m_ok[:, None] & (cols < N)[None, :], FORMAT, RESIDUAL, RED_K, BLOCK_M, BLOCK_N,
                             sw_ptr, scaled_ptr, sumsq_ptr, STATS)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------

_MAX_COUNTERS = 1 << 14
_REDUCTION_FLOATS = 16384  # fp32 partials the last program loads at once (at most 128 registers a thread at 4 warps)
_counters: dict[torch.device, Tensor] = {}
INTERPRETED = not isinstance(_sparse_gemv_kernel, JITFunction)  # TRITON_INTERPRET=1 at import
# Programmatic dependent launch (Hopper+): each GEMV and attention kernel starts launching while
# the previous one finishes (it waits before touching memory). On by default where the GPU has it
# (H200, 2026-12-03: fused step bf16 at 50% 304.1 -> 310.6 tok/s, dense 217.1 / 216.8; the
# README's PDL section); TEAL_PDL=0 turns it off, 1 asks for it.
PDL_ENV = "TEAL_PDL"
# The rows design's software-pipelined loop (num_stages >= 3, 30-120 KB of shared memory) launches
# without PDL unless TEAL_PDL_PIPELINED=1: through PDL a table of pipelined int8 winners decoded 10%
# slower than with plain launches (H200, 2026-12-04, 50%: 335.3 against 370.7 tok/s, results/long_k/).
PDL_PIPELINED_ENV = "TEAL_PDL_PIPELINED"


def launch_options(device: torch.device, pipelined: bool = False) -> dict:
    """Extra launch arguments of the GEMV and attention kernels: ``launch_pdl`` on a CUDA device
    of compute capability 9.0 or newer unless TEAL_PDL=0 (the interpreter has no PDL; older GPUs
    have no griddepcontrol instructions), and for a software-pipelined rows kernel only with
    TEAL_PDL_PIPELINED=1; the kernels' PDL constexpr is its value."""
    pdl, pipelined_pdl = env_switch(PDL_ENV, default="1"), env_switch(PDL_PIPELINED_ENV)  # both checked
    if not pdl or (pipelined and not pipelined_pdl) or device.type != "cuda" or INTERPRETED:
        return {}
    return {"launch_pdl": True} if _compute_capability(device) >= (9, 0) else {}


@functools.cache
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised buffer: the kernel writes every element it later reads."""
    return torch.empty(shape, dtype=dtype, device=device)


def arrival_counters(device: torch.device) -> Tensor:
    """Per-device int32 arrival counters of the K reduction, zero between calls (each call
    leaves them so), never freed (graphs keep their address).

    Allocated from a helper thread: torch.compile's CUDA-graph trees send every
    allocation of the calling thread during warm-up into their private pool, which
    must hold only their own tensors.
    """
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("Call sparse_gemv once on this device before capturing a CUDA graph.")
        made: list[Tensor] = []

        def allocate() -> None:
            made.append(torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        worker = threading.Thread(target=allocate)
        worker.start()
        worker.join()
        if not made:
            raise RuntimeError(f"Could not allocate the arrival counters on {device}.")
        counters = _counters[device] = made[0]
    return counters


def _lane_groups(cfg: KernelConfig, fmt: int, elem_bytes: int, col_align: int) -> int:
    """With lane_sum: the chunk rows that Triton's blocked layout of a [rows, block_n] weight tile
    spreads over threads and warps (16-byte loads along the columns, 32 threads, then the warps
    fill the columns first and the rows after), so that summing the rest stays in each thread.
    Any power of two up to sub_k gives the same sums in another order; this one costs no
    cross-thread sum in the loop. int4 (bytes unpacked into two columns each) keeps 1."""
    if not cfg.lane_sum or fmt == FMT_INT4:
        return 1
    vector = min(16 // elem_bytes, col_align)
    return max(1, min(cfg.sub_k, cfg.num_warps * 32 * vector // cfg.block_n))


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
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    dense: bool = False,
    stats: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Run the Triton kernel (on CUDA, or on CPU under TRITON_INTERPRET=1).

    ``config`` overrides the tuned/heuristic config (used by the tuner and tests); ``gated``,
    ``norm_weight`` (with ``eps``) and ``residual`` are the prologue / epilogue fusions of
    teal_kernels/reference.py; ``dense`` (no thresholds: a dense call) picks the table's config
    for 0% where it has one (get_config). ``stats`` (stats_weight, scaled, sumsq): also write the
    output's reference.norm_statistics into scaled and sumsq, in the dot design's epilogue (torch
    computes them after a rows-design call).
    """
    fmt = validate(x, w, thresholds, split_sizes, scales, zeros, group_size, True, gated, residual, norm_weight,
                   MAX_DOT_ROWS)
    if stats is not None:
        check_norm_statistics((x.shape[0], sum(split_sizes)), x.dtype, *stats)
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    m, k = x.shape[0], w.shape[0]
    n = w.shape[1] * (2 if fmt == FMT_INT4 else 1)
    words_aligned = fmt == FMT_INT4 and w.shape[1] % 4 == 0 and w.data_ptr() % 16 == 0
    if config is None:
        cfg = _planned_config(gpu_name(x.device), weight_format_name(w, group_size), fmt, group_size, m, k,
                              tuple(split_sizes), words_aligned, dense)
    else:
        cfg = _fit_config(config, fmt, group_size, m, k, split_sizes, words_aligned)
    if m > MAX_BATCH and cfg.design == "rows":
        raise ValueError(f"M={m} > {MAX_BATCH} rows need the dot design, which this shape cannot take "
                         f"(segments {split_sizes}, K={k}: multiples of {128 if fmt == FMT_INT4 else 16} needed).")
    if cfg.design == "rows":
        out = _launch_rows(x, w, fmt, m, k, n, cfg, thresholds, split_sizes, scales, zeros, group_size, gated,
                           residual, norm_weight, eps)
        if stats is not None:  # the rows design has no statistics epilogue: torch writes them
            write_norm_statistics(out, *stats)
        return out
    splits, grid_k, grid_n, counters, out, partials = _launch_buffers(x, m, k, n, cfg, split_sizes)
    pdl = launch_options(x.device)
    if fmt == FMT_INT4:  # read as int32 words of 8 columns (_fit_config checked the alignment)
        w = w.view(torch.int32)
    gather = cfg.design == "gather"
    block_m = next_power_of_2(m)
    if gather:  # the list of each block's kept rows and their thresholded x
        slots = grid_n * grid_k * cfg.block_k
        idx, xs = _alloc((slots,), torch.int32, x.device), _alloc((slots,), torch.float32, x.device)
    else:
        idx = xs = counters  # unused
    _dot_gemv_kernel[(grid_n, grid_k)](
        x, w, *_aux_args(x, thresholds, scales, zeros, residual, norm_weight), out, partials, counters, idx, xs,
        *(stats or (x, x, x)), m, k, n, w.shape[1], float(eps), splits, STATS=stats is not None,
        GATHER=gather, GROUPS=cfg.block_k // group_size if gather and fmt == FMT_INT4 else 1,
        RED_K=_reduction_step(grid_k, block_m, cfg.block_n),
        FORMAT=fmt, GROUP_SIZE=max(group_size, 1), BLOCK_M=block_m, DOT_M=dot_tile_rows(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        SUB_K=cfg.sub_k, **_fusions(gated, residual, norm_weight), EVEN_K=k % cfg.block_k == 0,
        INTERPRET=INTERPRETED, PDL=bool(pdl), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
        **_registers(cfg),
    )
    return out  # the epilogue wrote any statistics: a dot / gather block_n is a multiple of 16 (_fit_config)


def _reduction_step(grid_k: int, block_m: int, block_n: int) -> int:
    """Partials the last program of a column block requests at once: all of them where they fit the
    register budget."""
    return max(1, min(next_power_of_2(grid_k), _REDUCTION_FLOATS // (block_m * block_n)))


def _launch_buffers(x: Tensor, m: int, k: int, n: int, cfg: KernelConfig,
                    split_sizes: list[int]) -> tuple[tuple[int, ...], int, int, Tensor, Tensor, Tensor]:
    """What both designs' launches need: the segment boundaries padded with N to a fixed length (one
    compiled kernel for any segment count), the grid, the arrival counters, the output and the
    K blocks' fp32 partials."""
    splits = (0, *itertools.accumulate(split_sizes), *([n] * (MAX_SEGMENTS - len(split_sizes))))
    grid_k = cdiv(k, cfg.block_k)
    grid_n = sum(cdiv(s, cfg.block_n) for s in split_sizes)
    if grid_n > _MAX_COUNTERS:
        raise ValueError(f"N={n} needs {grid_n} column blocks, more than {_MAX_COUNTERS}; use a larger block_n.")
    counters = arrival_counters(x.device)
    out = _alloc((m, n), x.dtype, x.device)
    partials = _alloc((grid_k, m, n), torch.float32, x.device)
    return splits, grid_k, grid_n, counters, out, partials


def _aux_args(x: Tensor, thresholds: Tensor, scales: Tensor | None, zeros: Tensor | None, residual: Tensor | None,
              norm_weight: Tensor | None) -> tuple[Tensor, ...]:
    """The kernels' scale, zero, threshold, residual and norm-weight pointers (a stand-in where absent)."""
    return (scales if scales is not None else thresholds, zeros if zeros is not None else thresholds, thresholds,
            residual if residual is not None else x, norm_weight if norm_weight is not None else x)


def _fusions(gated: bool, residual: Tensor | None, norm_weight: Tensor | None) -> dict:
    """The kernels' prologue / epilogue constexprs."""
    return dict(GATED=gated, RESIDUAL=residual is not None, NORM=norm_weight is not None)


def _registers(cfg: KernelConfig) -> dict:
    return {"maxnreg": cfg.max_registers} if cfg.max_registers else {}


def _launch_rows(x: Tensor, w: Tensor, fmt: int, m: int, k: int, n: int, cfg: KernelConfig, thresholds: Tensor,
                 split_sizes: list[int], scales: Tensor | None, zeros: Tensor | None, group_size: int, gated: bool,
                 residual: Tensor | None, norm_weight: Tensor | None, eps: float,
                 attention: tuple | None = None) -> Tensor:
    """The "rows" design's launch; `attention` (k_cache, v_cache, input_pos, freqs_cis, group, scale) makes x a
    q|k|v row whose attention is the input (attention_o_triton)."""
    splits, grid_k, grid_n, counters, out, partials = _launch_buffers(x, m, k, n, cfg, split_sizes)
    block_m = next_power_of_2(m)
    if attention is None:
        att_args, att_consts = (x, x, x, x, 1, 0, 0, 1.0), {}
    else:
        k_cache, v_cache, input_pos, freqs_cis, group, scale = attention
        d = k_cache.shape[3]
        att_args = (k_cache, v_cache, input_pos, freqs_cis, k_cache.shape[2], k_cache.stride(1), k_cache.stride(2),
                    scale * LOG2E)
        att_consts = dict(ATTENTION=True, ATT_GROUP=group, ATT_HEADS_PAD=max(16, cfg.block_k // d), ATT_D=d,
                          ATT_BLOCK_S=default_block_s(d, k_cache.element_size()))
    if cfg.compact:  # compaction scratch: kept row ids and their thresholded x values
        slots = grid_n * grid_k * cfg.block_k
        idx, xs = _alloc((slots,), torch.int32, x.device), _alloc((slots * block_m,), torch.float32, x.device)
    else:
        idx = xs = counters  # unused
    # Largest power of two dividing every program's first column: lets loads vectorize.
    col_align = min(cfg.block_n, 32, *(s & -s for s in split_sizes))
    pipeline = cfg.num_stages if cfg.compact and cfg.num_stages > 2 else 1
    pdl = launch_options(x.device, pipelined=pipeline > 1)
    _sparse_gemv_kernel[(grid_k, grid_n)](
        x, w, *_aux_args(x, thresholds, scales, zeros, residual, norm_weight), out, partials, counters, idx, xs,
        *att_args,
        m, k, n, w.shape[1], grid_k, float(eps), splits,
        FORMAT=fmt, GROUP_SIZE=max(group_size, 1), COL_ALIGN=col_align,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SUB_K=cfg.sub_k,
        WINDOW=group_size if fmt == FMT_INT4 else cfg.block_k, COMPACT=cfg.compact,
        PREFETCH=cfg.compact and cfg.num_stages == 2, PIPELINE=pipeline,
        LANE_SUM=cfg.lane_sum,
        LANE_GROUPS=_lane_groups(cfg, fmt, w.element_size(), col_align),
        RED_K=_reduction_step(grid_k, block_m, cfg.block_n),
        **_fusions(gated, residual, norm_weight),
        WHOLE_ROW=cfg.compact and grid_k == 1, INTERPRET=INTERPRETED, PDL=bool(pdl),
        num_warps=cfg.num_warps, num_stages=1, **pdl, **_registers(cfg), **att_consts,
    )
    return out


def attention_prologue_fits(cfg: KernelConfig, fmt: int, m: int, n_head: int, n_kv: int, d: int) -> bool:
    """Whether o's GEMV with config `cfg` can compute its own input, the attention: one row, float or
    int8 weights, the compact "rows" design, K blocks of whole query heads within one KV group."""
    return (m == 1 and fmt != FMT_INT4 and cfg.design == "rows" and cfg.compact and n_head % n_kv == 0
            and cfg.block_k % d == 0 and (n_head // n_kv * d) % cfg.block_k == 0)


def attention_o_fits(device_name: str, weight_format: str, k: int, split_sizes: tuple[int, ...], n_head: int,
                     n_kv: int, d: int) -> bool:
    """attention_prologue_fits for the config a one-row call of this o projection gets on the device."""
    if weight_format.startswith("int4"):
        return False
    fmt = FMT_INT8 if weight_format == "int8" else FMT_FLOAT
    cfg = _planned_config(device_name, weight_format, fmt, 0, 1, k, split_sizes, True)
    return attention_prologue_fits(cfg, fmt, 1, n_head, n_kv, d)


def attention_o_triton(
    qkv: Tensor,
    freqs_cis: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    n_head: int,
    w: Tensor,
    thresholds: Tensor,
    split_sizes: list[int],
    scales: Tensor | None = None,
    residual: Tensor | None = None,
    config: KernelConfig | None = None,
) -> Tensor:
    """o's projection of the decode step's attention in one launch: what decode_attention_step
    (RoPE, cache write at p, attention over 0..p) followed by sparse_gemv of its output would give,
    [1, N]. Each program of o's GEMV computes the attention of its K block's query heads itself, so
    the attention's own launches go away; every column block repeats it (from L2), which pays only
    at short contexts (PackedLinear decides). Mutates k_cache and v_cache. Rejects (ValueError)
    what validate_step / validate reject, more than one row, int4 weights, caches whose rows are not
    contiguous or whose strides differ, and a config that attention_prologue_fits refuses."""
    b, _, d = validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, None)
    x = qkv[:, : n_head * d]  # the shape and dtype o's input has
    fmt = validate(x, w, thresholds, split_sizes, scales, None, 0, True, False, residual, None, MAX_BATCH)
    if qkv.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError("The Triton kernel needs a CUDA device or TRITON_INTERPRET=1 set before import.")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1:
        raise ValueError(f"attention_o: the caches need equal strides and contiguous rows, got {k_cache.stride()} "
                         f"and {v_cache.stride()}.")
    k, n = w.shape
    n_kv = k_cache.shape[1]
    if config is None:
        cfg = _planned_config(gpu_name(qkv.device), weight_format_name(w, 0), fmt, 0, b, k, tuple(split_sizes), True)
    else:
        cfg = _fit_config(config, fmt, 0, b, k, split_sizes)
    if not attention_prologue_fits(cfg, fmt, b, n_head, n_kv, d):
        raise ValueError(f"attention_o: {b} row(s), format {weight_format_name(w, 0)} and config {cfg} cannot take "
                         f"the attention of {n_head} heads / {n_kv} KV heads of {d}: one row, float or int8 weights, "
                         f"the compact rows design with K blocks of whole heads inside one KV group needed.")
    return _launch_rows(qkv, w, fmt, b, k, n, cfg, thresholds, split_sizes, scales, None, 0, False, residual, None,
                        0.0, (k_cache, v_cache, input_pos, freqs_cis, n_head // n_kv, 1.0 / math.sqrt(d)))
