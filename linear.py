"""PackedLinear: the one projection type behind TEAL sparsity and weight quantization.

The weight is stored transposed, [in_features, out_features], so that the decode kernel can skip
the whole contiguous row of every input entry TEAL zeroes; prefill multiplies by the same tensor
(`x @ W^T` is a plain GEMM for cuBLAS), so nothing is stored twice. Formats: bf16/fp16 ("fp"),
int8 per output channel, int4 groupwise along the input dimension (layouts in teal_kernels/reference.py).

This file owns three decisions, each in one place:
- which decoder modules are projections and how their outputs split into threshold segments
  (`PROJECTION_TABLE`, `projection_splits`, `segments`);
- which kernel runs for a projection call (`PackedLinear.forward`);
- which modules a quantized checkpoint holds (`QuantConfig`, `prepare_quantized`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from teal_kernels import MAX_BATCH, dequantize_weight, sparse_gemv, sparse_gemv_reference
from teal_kernels import bf16_mma as bmma
from teal_kernels import int4_mma as mma
from teal_kernels.ops import (attention_o, bf16_mma, bf16_mma_stats, cpu_runs_interpreter, dense_gemv, dequantize,
                              int4_mma, int4_mma_stats, quant_gemm, sparse_gemv_stats)
from teal_kernels.reference import (INT4_GROUP_SIZES, KERNEL_DTYPES, dot_design_fits, env_switch, gated_input,
                                    pack_scales_zeros)
from teal_kernels.speed_table import estimated_sparse_beats_dense, measured_on, sparse_beats_dense
from teal_kernels.tinygemm import int4pack, int4pack_fits, int4pack_mm

FORMATS = ("fp", "int8", "int4")

# Decoder projections: module path inside a block -> one label per output segment (each segment
# gets its own TEAL threshold; q|k|v and gate|up are fused weights that share one input).
PROJECTION_TABLE: dict[str, tuple[str, ...]] = {
    "attention.wqkv": ("q", "k", "v"),
    "attention.wo": ("o",),
    "feed_forward.w13": ("gate", "up"),
    "feed_forward.w2": ("down",),
}
PROJECTIONS: tuple[str, ...] = tuple(label for labels in PROJECTION_TABLE.values() for label in labels)


class Segment(NamedTuple):
    module: str  # full module name, e.g. "layers.3.attention.wqkv"
    index: int  # segment index inside the module's output
    label: str  # one of PROJECTIONS


def projection_splits(model: nn.Module) -> dict[str, list[int]]:
    """Full module name -> output segment widths, for every decoder projection, layer by layer."""
    cfg = model.config
    kv = cfg.n_local_heads * cfg.head_dim
    widths = {"attention.wqkv": [cfg.n_head * cfg.head_dim, kv, kv], "attention.wo": [cfg.dim],
              "feed_forward.w13": [cfg.intermediate_size] * 2, "feed_forward.w2": [cfg.dim]}
    return {f"layers.{i}.{path}": list(widths[path]) for i in range(cfg.n_layer) for path in PROJECTION_TABLE}


def segments(model: nn.Module) -> list[Segment]:
    """Every threshold segment in the canonical order files store them: layer by layer q..down."""
    return [Segment(name, j, label) for name in projection_splits(model)
            for j, label in enumerate(PROJECTION_TABLE[name.split(".", 2)[2]])]


# Dense decode calls of small float matrices on CUDA: the preload kernel (teal_kernels/preload_gemv.py)
# instead of cuBLAS, where its weights fit; TEAL_PRELOAD_GEMV=0 (read when a PackedLinear is built)
# keeps cuBLAS.
PRELOAD_ENV = "TEAL_PRELOAD_GEMV"


@torch.compiler.assume_constant_result
def preload_gemv_fits(device: torch.device, k: int, n: int) -> bool:
    """Whether the preload kernel can run a dense decode-sized [K, N] float call on `device` (a
    constant to torch.compile, which cannot trace the device's properties)."""
    if device.type != "cuda":
        return False
    from teal_kernels.preload_gemv import preload_fits  # imports Triton: CUDA only
    return preload_fits(k, n, torch.cuda.get_device_properties(device).multi_processor_count)


# Dense calls of int8/int4 weights on CUDA of up to this many rows (short prefills, batches past
# MAX_BATCH) run the Triton kernel's "dot" design, which reads the quantized weights once and converts
# them in registers, instead of a bf16 copy per matrix and cuBLAS. H200, Llama-3-8B shapes, int4-g128,
# CUDA graphs (benchmarks/results/quant_rows/): at 16 rows, in one call, the kernel took 155.3 us per
# layer (133.6 retuned, in a later call), dequantize + cuBLAS 277.0, bf16 117.7; at 24 rows 246 vs 278
# but slower on q|k|v and o; at 32 a tie; slower past.
QUANTIZED_KERNEL_ROWS = 16

# Dense prefills of int8/int4 weights on CUDA past those rows, up to QUANT_GEMM_ROWS rows:
# teal::quant_gemm, a GEMM that dequantizes each weight tile in registers (teal_kernels/dequantize.py)
# and so never writes or reads a bf16 copy; past them dequantize + cuBLAS. H200, 8B shapes, CUDA
# graphs, GEMM against dequantize + cuBLAS at 16-128 rows:
# - int8 (benchmarks/results/quant_gemm_2026_12_05/): q|k|v 24-34 vs 32-36 us, o 17-24 vs 22-26,
#   gate|up 67-89 vs 154-200, down 37-49 vs 80-84; at 512 rows it loses on every matrix (gate|up
#   352 vs 278).
# - int4 with its heuristic layout (benchmarks/results/int4_vec_2026_12_05/): a layer 193-240 vs
#   274-330 us (gate|up 95-113 vs 145-191, down 48-60 vs 76-80); q|k|v and o lose by up to 6 us
#   (q|k|v at 128 rows 40.4 vs 34.4). Not measured past 128 rows.
# TEAL_QUANT_GEMM (read when a PackedLinear is built): unset, these rows; 1, every quantized
# prefill; 0, none.
QUANT_GEMM_ROWS = {"int8": 128, "int4": 128}
QUANT_GEMM_ENV = "TEAL_QUANT_GEMM"


def quant_gemm_rows(fmt: str) -> int:
    """Rows up to which a dense prefill of a `fmt` layer on CUDA runs teal::quant_gemm (0 for float
    weights). The switch is parsed for every format, so a bad value fails for bf16 models too."""
    forced = env_switch(QUANT_GEMM_ENV) if QUANT_GEMM_ENV in os.environ else None
    if fmt == "fp":
        return 0
    if forced is None:
        return QUANT_GEMM_ROWS[fmt]
    return sys.maxsize if forced else 0


@torch.compiler.assume_constant_result
def kernel_verdict_for(device: torch.device, weight_format: str, rows: int, k: int, n: int,
                       sparsity: float, dense: str = "dense_us") -> tuple[bool | None, str | None]:
    """(does the sparse kernel beat the dense path, the GPU whose measurement says so) for a decode
    call on a CUDA device: the speed table's verdict (this GPU's or its stand-in's), else the size
    model's (None: not measured); `dense`: the table's field that times the dense path ("dense_us";
    "tinygemm_us" or "int4_mma_us" for an int4 layer with attach_int4pack's copy). A layer with
    int4_mma's copy and no int4_mma time for its shape stays dense: a kernel slower than tinygemm is
    slower than int4_mma too, and where ours beat tinygemm int4_mma still beat it (H100, 2026-12-05,
    results/int4_defaults_2026_12_05/: gate|up at 50% 30.5 against 29.1 µs, and with int4_mma's fusions
    the 50% step decoded 401 tok/s against 445 dense). A constant to torch.compile: Dynamo can trace
    neither torch.cuda.get_device_name nor the table file's read, and a compiled step whose first call
    reaches this (no eager call before it) failed."""
    name = torch.cuda.get_device_name(device)
    measured = sparse_beats_dense(name, weight_format, rows, k, n, sparsity, dense)
    if measured is not None:
        return measured, measured_on(name, weight_format, rows, k, n, dense)
    if dense == "int4_mma_us":
        slower_than_tinygemm = sparse_beats_dense(name, weight_format, rows, k, n, sparsity, "tinygemm_us") is False
        return False, measured_on(name, weight_format, rows, k, n, "tinygemm_us") if slower_than_tinygemm else None
    return estimated_sparse_beats_dense(weight_format, k, n, sparsity, rows), None


def sparse_kernel_takes_norm(fmt: str, n_rows: int, override: bool | None = None) -> bool:
    """Whether the sparse GEMV computes a handed RMSNorm itself (one kernel fewer) instead of
    torch before it, for PackedLinear's `fmt` ("fp", "int8", "int4"): `override` (TEAL_FUSED_NORM)
    if set, else at one row for every format, where the H200 measured it faster (Llama-3.2-1B 50%
    1134.7 -> 1169.2 tok/s, Llama-3-8B 298.1 -> 299.4; 8B int8 with an int8 head 268.0 -> 271.7
    dense, 352.2 -> 359.2 at 50%; 8B int4-g128 with an int8 head 316.0 -> 321.4 dense, 328.5 ->
    335.1 at 50%, in both orders in one session: benchmarks/results/NOTES.md, results/norm_1b/,
    results/int8_retune/, results/small_programs/). int4 once lost with it (312.4 -> 284.8), when
    its gate|up ran 4x as many programs, each computing the statistics. The tuner times the same
    calls (benchmarks/tune_kernels.py --decode_fusions)."""
    if n_rows > MAX_BATCH:  # a short quantized prefill: each program would read every row's whole x
        return False
    return n_rows == 1 if override is None else override


# o's decode GEMV computes its own input, the attention (teal::attention_o: no attention launches),
# where the KV cache holds at most ATTENTION_O_MAX_CACHE positions: each of its programs walks the
# whole prefix one K/V tile after another, so it pays at short contexts only. H200, Llama-3-8B o in
# bf16, its lab kernel against the attention op + our o (results/small_programs/ section 3): 16.7 vs
# 21.2 us at 128 positions, 19.5 vs 21.7 at 256, 25.3 vs 21.8 at 512 (benchmarks/bench_attention_o.py
# times the op itself). End to end (H200, 2026-12-05, int8 + int8 head, results/switches_2026_12_05/):
# off / on / off / on in one call, 287.9 / 291.2 / 288.5 / 291.4 tok/s dense, 387.5 / 393.5 / 387.6 /
# 393.3 at 50% (+1.1% / +1.5%). bf16 lost (H100, 2026-12-05, results/attention_o_bf16_2026_12_05/):
# 166.6 -> 164.1 tok/s dense, 253.8 -> 250.1 at 50%, and per layer at every context (128 positions:
# 25.5 against 24.8 us; int8 there 19.0 against 21.3). So on by default for int8 weights only;
# TEAL_ATTENTION_O=1 / 0 (read when a PackedLinear is built) turns it on / off for every format.
ATTENTION_O_ENV = "TEAL_ATTENTION_O"
ATTENTION_O_MAX_CACHE = 384

# Dense decode calls of int4 weights on CUDA through torch's tinygemm instead of our GEMV: per 8B
# matrix it was 11-44% faster than our kernel at 0% and faster than it at 50% on all but gate|up
# (H200, benchmarks/results/int4_tinygemm/). It needs a second copy of the weights in its own layout
# (0.5 byte a weight more, scales and zeros in bf16: teal_kernels/tinygemm.py), made by
# attach_int4pack when the fused decode path is installed. End to end (H200, 2026-12-05, Llama-3-8B
# int4-g128 + int8 head, dense, results/switches_2026_12_05/): 319.9 -> 352.2 tok/s (tinygemm-only
# gpt-fast style with its own int4 head: 333.7); its rows round alike at 1 and 5 rows on every 8B
# shape (benchmarks/batch_rows.py), so self-speculation's verify still gives plain greedy's tokens.
# On by default; TEAL_INT4_TINYGEMM=0 turns it off (no copy: 0.5 byte a weight less).
TINYGEMM_ENV = "TEAL_INT4_TINYGEMM"
# TEAL_INT4_MMA (on by default; 0 turns it off): int4-g128 layers get teal_kernels/int4_mma.py's copy
# instead of tinygemm's (the same bytes, scales and zeros in float32), and their dense decode calls run
# on tensor cores from Gluon. End to end (H100, 2026-12-05, Llama-3-8B int4-g128 + int8 head,
# results/int4_mma_2026_12_05b/ run 7): 382.9 / 383.0 tok/s dense against tinygemm's 346.8 (alternating),
# 387.9 / 387.4 at 50% against 368.7. Its row-invariant sums passed the GPU tests after that
# (results/int4_mma_2026_12_05c/: a row's output has the same bits alone and among 5 rows on every 8B
# shape); other group sizes and Tritons without Gluon keep tinygemm's.
INT4_MMA_ENV = "TEAL_INT4_MMA"
# TEAL_INT4_MMA_GATE (on by default with TEAL_INT4_MMA; 0 turns it off): gate|up layers whose shape pairs
# (int4_mma.pairs: N >= 16384) get int4_mma's paired copy, and their dense decode calls return
# SiLU(gate) * up from the kernel's epilogue: one kernel fewer a layer. End to end (H100, 2026-12-05,
# results/int4_mma_2026_12_05c/ run 2): 371.3 -> 385.7 tok/s dense, 379.3 / 389.4 -> 389.6 at 50%.
INT4_MMA_GATE_ENV = "TEAL_INT4_MMA_GATE"
# TEAL_INT4_MMA_NORM_STATS (on by default with TEAL_INT4_MMA; 0 turns it off): where o and gate|up both run
# int4_mma, the RMSNorm
# between them runs in neither torch nor a prologue: o's epilogue writes h * the norm's weight and h's
# squares summed a 16-row tile (PackedLinear.product_with_norm_stats), gate|up scales its product by
# the row's 1 / rms from those sums (forward's norm_stats); the same between down and the next block's
# q|k|v. Two kernels fewer a layer, and gate|up's and q|k|v's weights requested while the GEMV before
# runs (PDL). End to end (H100, 2026-12-05, Llama-3-8B int4-g128 + int8 head, alternating in one process,
# results/int4_defaults_2026_12_05/): 396.8 / 396.2 -> 420.0 / 420.1 tok/s dense; 397.7 / 397.3 -> 392.3 /
# 396.3 at 50% (where gate|up runs the gather kernel, so the statistics pass only q|k|v's norm).
INT4_MMA_NORM_STATS_ENV = "TEAL_INT4_MMA_NORM_STATS"
# TEAL_SPARSE_NORM_STATS (on by default with INT4_MMA_NORM_STATS_ENV since 2026-12-06; 0 turns it off): a
# sparse decode call of our kernel gives the next norm's statistics as int4_mma's epilogue does
# (teal::sparse_gemv_stats): at 50% on the 8B shape down runs sparse and the next block's q|k|v int4_mma, so
# the norm between them ran in a kernel of its own (31 calls, 66 µs of a 2212 µs step). H100, Llama-3-8B
# int4-g128 + int8 head at 50%, alternating in one process (results/packed_scales_2026_12_06/): 487.4 /
# 486.3 -> 499.4 / 499.6 tok/s; dense 448.2 -> 448.8 (unchanged: no sparse call).
SPARSE_NORM_STATS_ENV = "TEAL_SPARSE_NORM_STATS"
# TEAL_INT4_MMA_BF16_SCALES (on by default with TEAL_INT4_MMA; 0 turns it off): int4_mma's copy keeps its
# scales and zeros in bf16, as tinygemm's copy does (4 bytes a group and output instead of 8: 68 bytes a
# group and output in all instead of 72, 5.6% fewer); its dense decode calls then multiply weights the
# reference's rounded (SmolLM2 with tinygemm's bf16 scales: under 0.1% perplexity,
# docs/quantization/tinygemm_scales.md). Alone it lost (H100, 2026-12-05, one process: 396.8 / 396.2 ->
# 388.8 / 389.2 tok/s dense, int4-g128 + int8 head); with the norms' statistics it wins: 425.9 / 426.0
# (statistics and short attention tiles) -> 444.8 / 444.5 (all three), results/int4_defaults_2026_12_05/.
INT4_MMA_BF16_SCALES_ENV = "TEAL_INT4_MMA_BF16_SCALES"
# TEAL_INT4_BF16_SCALES (on by default since 2026-12-06; 0 turns it off): our Triton kernels (the sparse
# GEMV, the dequantize of prefills) read an int4 layer's scales and zeros rounded to bf16 and packed in pairs,
# one int32 word a group and output (attach_bf16_scales, reference.pack_scales_zeros): one 4-byte load where
# two float32 loads read 8 bytes. The words round as int4_mma's bf16 copy does, so a layer's dense and sparse
# calls multiply the same weights. H100, 2026-12-06 (forty-first session, results/packed_scales_2026_12_06/):
# graph-timed per call at 50%, float32 -> packed, two rounds, µs: q|k|v 11.76 / 10.46 -> 11.23 / 9.74, o
# 9.42 / 9.45 -> 8.92 / 8.75, gate|up 20.35 / 20.23 -> 20.24 / 19.80, down 13.52 / 13.41 -> 13.50 / 13.25;
# int4-g128 + int8 head at 50% in one process 485.4 -> 487.7 tok/s. Its first form, two bf16 tensors, lost
# (482.5 -> 448.9 tok/s, results/issue11_h100_2026_12_06/): their 2-byte loads came in another layout than
# the accumulators' and were converted through shared memory; a packed word loads in the float32 scales'.
INT4_BF16_SCALES_ENV = "TEAL_INT4_BF16_SCALES"
# TEAL_BF16_MMA (off by default; 1 turns it on, read when the fused decode path is installed): bf16 decoder
# projections on CUDA too large for the preload GEMV run their dense decode calls through
# teal_kernels/bf16_mma.py (tensor cores from Gluon, the [K, N] weights read in place: no copy) instead of
# cuBLAS, with int4_mma's fusions: gate|up returns SiLU(gate) * up, and o and down give the next RMSNorm's
# statistics to gate|up and q|k|v, which scale their products by 1 / rms (no norm kernel). Per matrix it
# ties cuBLAS; a layer's four 8B matrices in sequence took 156.6 µs with PDL against cuBLAS's 162.0 (H100,
# 2026-12-06, benchmarks/bf16_mma_lab.py, results/bf16_mma_2026_12_06/). End to end (H100, same day, one
# process): Llama-3-8B dense 167.5 / 167.8 -> 170.5 / 170.4 tok/s; Llama-2-7B 186.3 -> 165.0 with the first
# launch rule (its down on 8 K warps), changed since and not yet measured: so off by default. Sparse calls
# keep our sparse GEMV.
BF16_MMA_ENV = "TEAL_BF16_MMA"


def int4_bf16_scales() -> bool:
    """Whether our kernels read int4 scales and zeros as packed bf16 pairs (INT4_BF16_SCALES_ENV)."""
    return env_switch(INT4_BF16_SCALES_ENV, default="1")


def int4_mma_scale_dtype() -> torch.dtype:
    """The dtype of int4_mma's copy's scales and zeros (INT4_MMA_BF16_SCALES_ENV): what attach_int4pack
    packs, and what the benchmarks pack to time an int4 layer's dense decode path."""
    return torch.bfloat16 if env_switch(INT4_MMA_BF16_SCALES_ENV, default="1") else torch.float32


@torch.compiler.assume_constant_result
def attention_o_fits_for(device: torch.device, weight_format: str, k: int, split_sizes: tuple[int, ...],
                         n_head: int, n_kv: int, d: int) -> bool:
    """Whether teal::attention_o runs as one kernel for this o projection on `device`: CUDA, or the
    CPU's Triton interpreter (tests; the CPU's own kernels are faster apart), with weights and a config
    the kernel takes (a constant to torch.compile, which cannot trace the config table's read)."""
    if device.type != "cuda" and not (device.type == "cpu" and cpu_runs_interpreter()):
        return False
    from teal_kernels.triton_gemv import attention_o_fits, gpu_name  # imports Triton
    return attention_o_fits(gpu_name(device), weight_format, k, split_sizes, n_head, n_kv, d)


class PackedLinear(nn.Module):
    """y = x W^T over a transposed weight, optionally with TEAL thresholds per output segment.

    `split_sizes` names the output segments that share one input but get their own threshold
    (q|k|v: three, gate|up: two, o and down: one). A threshold of 0 keeps every nonzero input, so
    thresholds of zeros are exactly the dense layer.
    """

    def __init__(self, in_features: int, out_features: int, split_sizes: list[int] | None = None,
                 fmt: str = "fp", group_size: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
        self.in_features, self.out_features = in_features, out_features
        self.split_sizes = list(split_sizes or [out_features])
        if sum(self.split_sizes) != out_features:
            raise ValueError(f"split_sizes {self.split_sizes} do not sum to {out_features}")
        self.fmt, self.group_size = fmt, group_size
        k, n = in_features, out_features
        if fmt == "fp":
            weight = torch.empty(k, n, dtype=dtype, device=device)
        elif fmt == "int8":
            weight = torch.empty(k, n, dtype=torch.int8, device=device)
            self.register_buffer("scales", torch.empty(n, dtype=torch.float32, device=device))
        else:
            weight = torch.empty(k, n // 2, dtype=torch.uint8, device=device)
            self.register_buffer("scales", torch.empty(k // group_size, n, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.empty(k // group_size, n, dtype=torch.float32, device=device))
        self.register_buffer("weight", weight)
        # TEAL state: off until teal.sparsify() sets thresholds; prefill stays dense unless asked.
        n_seg = len(self.split_sizes)
        self.register_buffer("thresholds", torch.zeros(n_seg, dtype=torch.float32, device=device))
        # What a dense call of the kernel gets (quantized weights are always read by the kernel).
        self.register_buffer("no_thresholds", torch.zeros(n_seg, dtype=torch.float32, device=device),
                             persistent=False)
        self.sparse = False
        self.sparse_prefill = False
        self.preload_allowed = env_switch(PRELOAD_ENV, default="1")  # a bad value fails here, not mid-decode
        self.attention_allowed = env_switch(ATTENTION_O_ENV, default="1" if fmt == "int8" else "0")
        self.quant_gemm_rows = quant_gemm_rows(fmt)
        # rows up to which a dense quantized call on CUDA runs the kernel (QUANTIZED_KERNEL_ROWS where the
        # shape takes the dot design, else the decode batches only)
        self.quantized_kernel_rows = (QUANTIZED_KERNEL_ROWS if fmt != "fp" and dot_design_fits(
            fmt == "int4", in_features, self.split_sizes) else MAX_BATCH)
        # Parameter-weighted target sparsity of the segments (teal.sparsify sets it from the
        # thresholds file): what the measured speed table is read at.
        self.target_sparsity: float | None = None
        self._kernel_pays: dict[tuple[str, int, float, str], tuple[bool | None, str | None]] = {}  # kernel_verdict cache
        # int4: tinygemm's copy of the weights for dense decode calls, or int4_mma's (attach_int4pack), not saved
        self.register_buffer("int4pack_weight", None, persistent=False)
        self.register_buffer("int4pack_scales_zeros", None, persistent=False)
        self.register_buffer("int4mma_words", None, persistent=False)
        self.register_buffer("int4mma_scales", None, persistent=False)
        self.register_buffer("int4mma_zeros", None, persistent=False)
        # int4: the scales and zeros as packed bf16 pairs that our kernels read instead (attach_bf16_scales), not saved
        self.register_buffer("kernel_scales", None, persistent=False)
        self.register_buffer("kernel_zeros", None, persistent=False)
        self.bf16_mma = False  # BF16_MMA_ENV: dense bf16 decode calls run teal_kernels/bf16_mma.py (attach_bf16_mma)
        # a gate|up layer whose dense tensor-core calls return SiLU(gate) * up (int4_mma's paired copy, or bf16_mma)
        self.mma_gate = False
        self.mma_norm_stats = False  # its dense tensor-core calls give / take a norm's statistics (decode.py)
        self.sparse_norm_stats = False  # SPARSE_NORM_STATS_ENV: its sparse decode calls give them too

    @classmethod
    def from_linear(cls, linear: nn.Linear, split_sizes: list[int] | None = None) -> "PackedLinear":
        w = linear.weight.detach()
        packed = cls(w.shape[1], w.shape[0], split_sizes, dtype=w.dtype, device=w.device)
        packed.weight = w.t().contiguous()
        return packed

    def attach_int4pack(self, use_mma: bool = False, gate_epilogue: bool = False,
                        mma_scale_dtype: torch.dtype = torch.float32) -> bool:
        """Give an int4 layer a dense copy of its weights, which its dense decode calls then run through:
        with `use_mma`, int4_mma's where it takes the shape (INT4_MMA_ENV; on CUDA only with a Triton that
        has Gluon), else tinygemm's (TINYGEMM_ENV). With `gate_epilogue` too (a gate|up layer,
        INT4_MMA_GATE_ENV), int4_mma's paired copy where the shape pairs: its dense decode calls then return
        SiLU(gate) * up (gates_in_epilogue); `mma_scale_dtype` the copy's scales' and zeros' dtype
        (INT4_MMA_BF16_SCALES_ENV). False where neither takes the shape (it stays on our kernel). A copy of
        the weights as they are now: load them first (the fused path's install does)."""
        if self.fmt != "int4":
            return False
        if use_mma and mma.fits(self.in_features, self.out_features, self.group_size, torch.bfloat16) and (
                not self.weight.is_cuda or mma.available()):
            self.mma_gate = gate_epilogue and mma.pairs(self.in_features, self.out_features)
            self.int4mma_words, self.int4mma_scales, self.int4mma_zeros = mma.pack(
                self.weight, self.scales, self.zeros, self.mma_gate, mma_scale_dtype)
            return True
        if not int4pack_fits(self.in_features, self.out_features, self.group_size, torch.bfloat16):
            return False
        self.int4pack_weight, self.int4pack_scales_zeros = int4pack(self.weight, self.scales, self.zeros,
                                                                    self.group_size)
        return True

    def use_bf16_mma(self, gate_up: bool, sparse_stats: bool) -> bool:
        """Let a bf16 layer's dense decode calls run teal_kernels/bf16_mma.py (BF16_MMA_ENV) where a config
        fits its shape: giving and taking the norms' statistics, a `gate_up` layer gating where a config with
        two column groups fits, and with `sparse_stats` its sparse calls giving the statistics too. False
        (nothing set) for other formats and shapes. attach_bf16_mma decides the device."""
        if self.fmt != "fp" or self.weight.dtype != torch.bfloat16 or bmma.config_for(
                self.in_features, self.out_features) is None:
            return False
        self.bf16_mma = self.mma_norm_stats = True
        self.mma_gate = gate_up and bmma.config_for(self.in_features, self.out_features, gate=True) is not None
        self.sparse_norm_stats = sparse_stats
        return True

    @property
    def has_dense_int4_copy(self) -> bool:
        """Whether attach_int4pack gave this layer a copy (tinygemm's or int4_mma's)."""
        return self.int4pack_weight is not None or self.int4mma_words is not None

    def _quant_args(self) -> tuple[Tensor | None, Tensor | None]:
        if self.kernel_scales is not None:
            return self.kernel_scales, self.kernel_zeros
        return getattr(self, "scales", None), getattr(self, "zeros", None)

    def attach_bf16_scales(self) -> bool:
        """Give an int4 layer its scales and zeros rounded to bf16 and packed in pairs, which every later
        call reads (INT4_BF16_SCALES_ENV): values rounded as int4_mma's bf16 copy rounds them. False for
        other formats."""
        if self.fmt != "int4":
            return False
        self.kernel_scales = self.kernel_zeros = pack_scales_zeros(self.scales, self.zeros)
        return True

    def dense_weight_t(self, dtype: torch.dtype) -> Tensor:
        """The weight as [in, out] in `dtype`; int formats dequantized: on CUDA into bf16/fp16 by one
        Triton pass over the quantized bytes, elsewhere through float32 (the reference)."""
        if self.fmt == "fp":
            return self.weight.to(dtype)
        if self.weight.is_cuda and dtype in KERNEL_DTYPES:
            return dequantize(self.weight, *self._quant_args(), self.group_size, dtype)
        return dequantize_weight(self.weight, *self._quant_args(), self.group_size).to(dtype)

    @property
    def format_name(self) -> str:
        """bf16 / fp16 / fp32 / int8 / int4-g<G>: the name speed and config tables use."""
        if self.fmt == "fp":
            return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.weight.dtype, "fp32")
        return f"int4-g{self.group_size}" if self.fmt == "int4" else self.fmt

    def kernel_verdict(self, device: torch.device, rows: int = 1) -> tuple[bool | None, str | None]:
        """(does the sparse kernel at this layer's target sparsity beat the dense path for a decode
        call on `device`, the GPU whose measurement says so): the speed table's verdict, else the
        size model's (None, as the GPU's). (None, None) off CUDA or without a target."""
        if device.type != "cuda" or self.target_sparsity is None:
            return None, None
        dense = ("int4_mma_us" if self.int4mma_words is not None else
                 "tinygemm_us" if self.int4pack_weight is not None else "dense_us")  # the dense path's field
        key = (str(device), rows, self.target_sparsity, dense)  # the device's name is asked on a miss only
        if key not in self._kernel_pays:
            self._kernel_pays[key] = kernel_verdict_for(device, self.format_name, rows, self.in_features,
                                                        self.out_features, self.target_sparsity, dense)
        return self._kernel_pays[key]

    def sparse_kernel_pays(self, device: torch.device, rows: int = 1) -> bool | None:
        """kernel_verdict's answer alone."""
        return self.kernel_verdict(device, rows)[0]

    def applies_sparsity(self, x: Tensor) -> bool:
        """TEAL acts on decode steps (one position per sequence) and, if asked, on prefill; a GPU
        decode call stays dense where the speed table measured the kernel slower (never slower
        than dense, at the cost of the skipped rows)."""
        rows = x.numel() // x.shape[-1]
        decode_step = x.dim() < 3 or x.shape[-2] == 1
        if not self.sparse or not (decode_step or self.sparse_prefill):
            return False
        return rows > MAX_BATCH or self.sparse_kernel_pays(x.device, rows) is not False

    def set_target_sparsity(self, per_segment: list[float] | None) -> None:
        """Record the segments' target sparsity (weighted by their widths) for the speed table."""
        self.target_sparsity = None if per_segment is None else \
            sum(s * w for s, w in zip(per_segment, self.split_sizes, strict=True)) / self.out_features

    def _dense_copy_call(self, x: Tensor, sparse: bool) -> bool:
        """Whether this call runs on attach_int4pack's dense copy: a dense int4 decode call in bf16."""
        n_rows = x.numel() // x.shape[-1]
        return self.has_dense_int4_copy and not sparse and n_rows <= MAX_BATCH and x.dtype == torch.bfloat16

    def _mma_call(self, x: Tensor, sparse: bool) -> bool:
        """Whether this call runs on tensor cores from Gluon: a dense decode call in bf16 of an int4 layer
        with int4_mma's copy, or of a bf16 layer with bf16_mma on (attach_bf16_mma)."""
        on_tensor_cores = self.bf16_mma or self.int4mma_words is not None
        return (on_tensor_cores and not sparse and x.numel() // x.shape[-1] <= MAX_BATCH
                and x.dtype == torch.bfloat16)

    def gates_in_epilogue(self, x: Tensor) -> bool:
        """Whether this call can return SiLU(gate) * up of its gate|up product from its tensor-core
        kernel's epilogue (forward's gate_product): decode.py then hands the down projection the gated input."""
        return self.mma_gate and self._mma_call(x, self.applies_sparsity(x))

    def takes_norm_stats(self, x: Tensor) -> bool:
        """Whether this call of x's shape runs a tensor-core kernel with the statistics on (int4_mma with
        INT4_MMA_NORM_STATS_ENV, or bf16_mma): it can then give the next norm's statistics
        (product_with_norm_stats) or take them (forward's norm_stats)."""
        return self.mma_norm_stats and self._mma_call(x, self.applies_sparsity(x))

    def gives_norm_stats(self, x: Tensor) -> bool:
        """Whether this call of x's shape can give the next norm's statistics (product_with_norm_stats):
        where takes_norm_stats, from int4_mma's epilogue; with sparse_norm_stats, a sparse decode call of
        bf16 rows, from our kernel's (teal::sparse_gemv_stats)."""
        if self.takes_norm_stats(x):
            return True
        n_rows = x.numel() // x.shape[-1]
        return (self.sparse_norm_stats and x.dtype == torch.bfloat16 and n_rows <= MAX_BATCH
                and self.out_features % 16 == 0 and self.applies_sparsity(x))

    def product_with_norm_stats(self, x: Tensor, residual: Tensor, norm: nn.Module, gated: bool = False,
                                into: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Where gives_norm_stats: (h = self(x, gated, residual), h * norm.weight rounded, h's squares
        summed a 16-output tile [rows, N / 16] float32): the input and norm_stats of the projection
        after `norm`, which then runs in no kernel of its own. `into`: contiguous buffers [rows, N] and
        [rows, N / 16] to write the last two into (the next block's, decode.py), else new ones."""
        rows = x.reshape(-1, x.shape[-1])
        n_rows = rows.shape[0]
        scaled, sumsq = into or (rows.new_empty(n_rows, self.out_features),
                                 rows.new_empty(n_rows, self.out_features // 16, dtype=torch.float32))
        res = residual.reshape(-1, self.out_features)
        if self.takes_norm_stats(x):
            x_in = gated_input(rows) if gated else rows
            out = (bf16_mma_stats(x_in, self.weight, res, norm.weight, scaled, sumsq) if self.bf16_mma else
                   int4_mma_stats(x_in, self.int4mma_words, self.int4mma_scales, self.int4mma_zeros, res, norm.weight,
                                  scaled, sumsq))
        else:  # a sparse decode call (gives_norm_stats)
            out = sparse_gemv_stats(rows, self.weight, self.thresholds, self.split_sizes, *self._quant_args(),
                                    self.group_size, gated, res, norm.weight, scaled, sumsq)
        shape = (*x.shape[:-1], self.out_features)
        return out.view(shape), scaled.view(shape), sumsq

    def forward(self, x: Tensor, gated: bool = False, residual: Tensor | None = None,
                norm: nn.Module | None = None, norm_in_sparse_kernel: bool | None = None,
                gate_product: bool = False, norm_stats: Tensor | None = None) -> Tensor:
        """x [..., K] -> [..., N]. The decode path's fusions (decode.py): with `gated`, x is a
        gate|up output [..., 2K] and the input is SiLU(gate) * up; `residual` [..., N] is added
        to the output; with `norm` (model.RMSNorm), x is the residual stream and the input is
        norm(x). The decode kernels do them in their prologue / epilogue, the norm: always in the
        preload GEMV (CUDA), in the sparse GEMV (CUDA) as `sparse_kernel_takes_norm` says (TEAL_FUSED_NORM:
        `norm_in_sparse_kernel`), elsewhere torch (int4_mma has no norm prologue: it lost twice,
        teal_kernels/int4_mma.py). `gate_product` (where gates_in_epilogue says so): SiLU(gate) * up of
        the product, [..., N / 2], from int4_mma's epilogue.
        `norm_stats` (with `norm`, where takes_norm_stats): x is h * norm.weight and norm_stats h's
        tile sums of squares (the projection before's product_with_norm_stats); int4_mma scales the
        product by 1 / rms."""
        sparse = self.applies_sparsity(x)
        thresholds = self.thresholds if sparse else self.no_thresholds
        # bf16/fp16 on a CPU: a GEMM over the [K, N] layout ran 10-36x slower than in float32 on an
        # AVX2 host (docs/cpu/), so there dense calls take the branches below too: the row kernel
        # for decode, the float32 reference for prefill
        cpu_half = x.device.type == "cpu" and x.dtype in KERNEL_DTYPES
        dense_float = self.fmt == "fp" and not sparse and not cpu_half
        n_rows = x.numel() // x.shape[-1]
        # a dense int4 decode call of a layer with a dense copy (attach_int4pack: tinygemm's or int4_mma's)
        dense_copy = self._dense_copy_call(x, sparse)
        mma_call = self._mma_call(x, sparse)  # int4_mma / bf16_mma: they take the residual
        if gate_product != (mma_call and self.mma_gate):  # a gating layer's tensor-core products come out gated
            raise ValueError(f"gate_product={gate_product} on a call that {'runs' if mma_call else 'does not run'} "
                             f"a {'gating' if self.mma_gate else 'plain'} tensor-core kernel")
        if norm_stats is not None and not (mma_call and norm is not None):
            raise ValueError("norm_stats needs its norm and a call that runs int4_mma or bf16_mma (takes_norm_stats)")
        kernel_rows = self.quantized_kernel_rows if x.device.type == "cuda" and not sparse else MAX_BATCH
        decode_kernel = (not dense_float and not dense_copy and not mma_call and n_rows <= kernel_rows
                         and x.dtype in KERNEL_DTYPES)
        preload = (dense_float and not mma_call and self.preload_allowed and n_rows <= MAX_BATCH
                   and x.dtype == self.weight.dtype and x.dtype in KERNEL_DTYPES
                   and preload_gemv_fits(x.device, self.in_features, self.out_features))
        # A dense prefill of int8/int4 weights on CUDA past quantized_kernel_rows: dense_weight_t
        # dequantizes the matrix once into x's dtype, then cuBLAS (H200, 8B shapes, 2048 tokens:
        # 1.15-1.20x bf16's time, 16-17x faster than the float32 product; benchmarks/results/int4_prefill/),
        # or teal::quant_gemm up to quant_gemm_rows rows (QUANT_GEMM_ROWS)
        quantized_prefill = (self.fmt != "fp" and not sparse and not decode_kernel and not dense_copy
                             and x.device.type == "cuda" and x.dtype in KERNEL_DTYPES)
        # the norm in the kernel: the preload GEMV's, the sparse GEMV's as sparse_kernel_takes_norm says
        kernel_norm = x.device.type == "cuda" and (preload or (
            decode_kernel and sparse_kernel_takes_norm(self.fmt, n_rows, norm_in_sparse_kernel)))
        if norm is not None and not kernel_norm and norm_stats is None:
            x, norm = norm(x), None
        rows = x.reshape(-1, x.shape[-1])
        res = None if residual is None else residual.reshape(-1, self.out_features)
        norm_args = (None, 0.0) if norm is None else (norm.weight, norm.eps)
        if preload:
            # small dense float on CUDA: weights loaded before the kernel waits on its input
            out = dense_gemv(rows, self.weight, gated, res, *norm_args)
        elif dense_float or quantized_prefill or dense_copy or mma_call:
            # cuBLAS / the CPU's BLAS / tinygemm, the fusions left to torch (Inductor); int4_mma takes
            # the residual itself
            x_in = gated_input(rows) if gated else rows
            if mma_call and self.bf16_mma:
                out = bf16_mma(x_in, self.weight, res, gate_product, norm_stats, 0.0 if norm is None else norm.eps)
            elif mma_call:
                out = int4_mma(x_in, self.int4mma_words, self.int4mma_scales, self.int4mma_zeros, res, gate_product,
                               norm_stats, 0.0 if norm is None else norm.eps)
            elif dense_copy:
                out = int4pack_mm(x_in, self.int4pack_weight, self.int4pack_scales_zeros, self.group_size)
            elif quantized_prefill and n_rows <= self.quant_gemm_rows:
                out = quant_gemm(x_in.contiguous(), self.weight, *self._quant_args(), self.group_size)
            else:
                out = x_in @ self.dense_weight_t(x.dtype)
            out = out if res is None or mma_call else out + res
        elif decode_kernel:
            # Decode: the teal::sparse_gemv op (Triton on CUDA, C++ on the CPU: teal_kernels/cpu.py); rows of
            # zeroed inputs are never read.
            out = sparse_gemv(rows, self.weight, thresholds, self.split_sizes, *self._quant_args(), self.group_size,
                              gated, res, *norm_args, dense=not sparse)
        else:
            # Sparse prefill, float32 (quality work) and bf16/fp16 on a CPU: dequantize and multiply, in
            # float32.
            out = sparse_gemv_reference(rows, self.weight, thresholds, self.split_sizes, *self._quant_args(),
                                        self.group_size, gated, res)
        return out.view(*x.shape[:-1], out.shape[-1])  # N, or N / 2 with gate_product

    def takes_attention(self, qkv: Tensor, k_cache: Tensor, n_head: int) -> bool:
        """Whether this o projection's decode step computes its own input, the attention of the
        q|k|v row `qkv` [1, W] (attention_product): switched on (ATTENTION_O_ENV), one row of a
        kernel dtype, a cache of at most ATTENTION_O_MAX_CACHE positions, CUDA (or the CPU's Triton
        interpreter), weights and a config the kernel takes, and no forward pre-hook waiting to see
        the input (SparsityMeter)."""
        if (not self.attention_allowed or self._forward_pre_hooks or qkv.shape[0] != 1
                or qkv.dtype not in KERNEL_DTYPES or k_cache.shape[2] > ATTENTION_O_MAX_CACHE):
            return False
        return attention_o_fits_for(qkv.device, self.format_name, self.in_features, tuple(self.split_sizes), n_head,
                                    k_cache.shape[1], k_cache.shape[3])

    def attention_product(self, qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor,
                          input_pos: Tensor, n_head: int, residual: Tensor) -> Tensor:
        """self(attention) + residual for a decode step where takes_attention: the attention of q|k|v
        row `qkv` (RoPE by freqs_cis [D/2, 2], k and v written into the caches at input_pos) and o's
        product of it in one op (teal::attention_o), thresholded as forward would. [1, N]."""
        thresholds = self.thresholds if self.applies_sparsity(qkv[:, : self.in_features]) else self.no_thresholds
        return attention_o(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, self.weight, thresholds,
                           self.split_sizes, getattr(self, "scales", None), residual)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, splits={self.split_sizes}, "
                f"fmt={self.fmt}{f'-g{self.group_size}' if self.fmt == 'int4' else ''}, sparse={self.sparse}")


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) by `module`."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def packed_projections(model: nn.Module) -> dict[str, PackedLinear]:
    """The decoder projections that are PackedLinear (lm_head excluded, even when quantized)."""
    mods = {name: model.get_submodule(name) for name in projection_splits(model)}
    return {name: m for name, m in mods.items() if isinstance(m, PackedLinear)}


def pack_model(model: nn.Module) -> nn.Module:
    """Swap every decoder projection nn.Linear for a PackedLinear (idempotent; lm_head stays)."""
    for name, splits in projection_splits(model).items():
        child = model.get_submodule(name)
        if isinstance(child, nn.Linear):
            swap_module(model, name, PackedLinear.from_linear(child, splits))
    return model


def attach_int4pack(model: nn.Module) -> list[str]:
    """Unless TINYGEMM_ENV is 0, give every int4 decoder projection on CUDA, and an int4 lm_head
    (quantize.py --lm_head int4), a dense copy of its weights: int4_mma's unless INT4_MMA_ENV is 0 where
    it takes the layer (gate|up ones paired unless INT4_MMA_GATE_ENV is 0; the projections giving and
    taking norms' statistics where INT4_MMA_NORM_STATS_ENV is 1; scales and zeros in bf16 where
    INT4_MMA_BF16_SCALES_ENV is 1), else tinygemm's (idempotent); the names of those that have one."""
    if not env_switch(TINYGEMM_ENV, default="1"):
        return []
    use_mma = env_switch(INT4_MMA_ENV, default="1")
    gate = env_switch(INT4_MMA_GATE_ENV, default="1") and use_mma
    norm_stats = env_switch(INT4_MMA_NORM_STATS_ENV, default="1") and use_mma
    sparse_stats = env_switch(SPARSE_NORM_STATS_ENV, default="1") and norm_stats
    scale_dtype = int4_mma_scale_dtype()
    projections = packed_projections(model)
    layers = int4_cuda_layers(model)
    names = [name for name, m in layers.items()
             if m.has_dense_int4_copy or m.attach_int4pack(use_mma, gate and name.endswith("feed_forward.w13"),
                                                           scale_dtype)]
    for name in names:
        layers[name].mma_norm_stats = norm_stats and name in projections and layers[name].int4mma_words is not None
        layers[name].sparse_norm_stats = sparse_stats and layers[name].mma_norm_stats
    return names


def attach_bf16_mma(model: nn.Module) -> list[str]:
    """With BF16_MMA_ENV on, let every bf16 decoder projection on CUDA that the preload GEMV does not take
    run its dense decode calls through bf16_mma where it takes the shape (PackedLinear.use_bf16_mma;
    Gluon in this Triton), their sparse calls giving the norms' statistics too unless SPARSE_NORM_STATS_ENV
    is 0 (idempotent); the names of those that do."""
    if not env_switch(BF16_MMA_ENV):
        return []
    sparse_stats = env_switch(SPARSE_NORM_STATS_ENV, default="1")
    return [name for name, m in packed_projections(model).items()
            if m.weight.is_cuda and not preload_gemv_fits(m.weight.device, m.in_features, m.out_features)
            and bmma.available() and m.use_bf16_mma(name.endswith("feed_forward.w13"), sparse_stats)]


def int4_cuda_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """The int4 decoder projections on CUDA, and an int4 lm_head (quantize.py --lm_head int4), by name."""
    head = getattr(model, "output", None)
    candidates = {**packed_projections(model), **({"output": head} if isinstance(head, PackedLinear) else {})}
    return {name: m for name, m in candidates.items() if m.fmt == "int4" and m.weight.is_cuda}


def attach_bf16_scales(model: nn.Module) -> list[str]:
    """Unless INT4_BF16_SCALES_ENV is 0, give every int4 layer on CUDA (int4_cuda_layers) its scales and
    zeros as packed bf16 pairs for our kernels; the names of those that got them."""
    if not int4_bf16_scales():
        return []
    return [name for name, m in int4_cuda_layers(model).items() if m.attach_bf16_scales()]


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints: which modules hold which format (the math is in quantize.py)
# ---------------------------------------------------------------------------------------------

QUANT_MODES = ("int8", "int4")
QUANT_METADATA_KEY = "quantization"


class QuantizationError(ValueError):
    """A quantization request this model cannot take; the message is one line meant for the user."""


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized checkpoint records in its safetensors metadata, so loading needs no flags."""

    mode: str
    group_size: int = 0  # int4 only; int8 scales are per output channel
    # lm_head: False (float head), "int8" (an int8 head whatever `mode`: its error reaches every
    # logit), "int4" (with int4 projections: the head in their format, as gpt-fast's int4 quantizes
    # every nn.Linear), or True (files written before 2026-12-02: the head in `mode`)
    lm_head: bool | str = False

    def __post_init__(self) -> None:
        if self.lm_head not in (False, True, "int8", "int4"):
            raise QuantizationError(f"unknown lm_head format {self.lm_head!r}; expected false, 'int8' or 'int4'")
        if self.mode not in QUANT_MODES:
            raise QuantizationError(f"unknown quantization mode {self.mode!r}; expected one of {QUANT_MODES}")
        if self.lm_head == "int4" and self.mode != "int4":
            raise QuantizationError("an int4 lm_head takes the projections' int4 format: it needs --mode int4")
        expected = INT4_GROUP_SIZES if self.mode == "int4" else (0,)
        if self.group_size not in expected:
            raise QuantizationError(f"unsupported group size {self.group_size} for {self.mode}; "
                                    f"expected one of {', '.join(map(str, expected))}")

    @classmethod
    def request(cls, mode: str, group_size: int, lm_head: bool | str | None) -> "QuantConfig":
        """From user options: the group size only applies to int4; a quantized head is int8 unless
        asked for "int4" (True means int8)."""
        head = "int8" if lm_head is True else lm_head or False
        return cls(mode, group_size if mode == "int4" else 0, head)

    @property
    def head_format(self) -> tuple[str, int] | None:
        """(mode, group size) of a quantized lm_head, or None for a float head."""
        if self.lm_head is False:
            return None
        return ("int8", 0) if self.lm_head == "int8" else (self.mode, self.group_size)

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}" if self.mode == "int4" else self.mode

    def to_metadata(self) -> dict[str, str]:
        return {QUANT_METADATA_KEY: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: object) -> "QuantConfig | None":
        """The config a weights file records, or None for a float checkpoint."""
        if QUANT_METADATA_KEY not in meta:
            return None
        try:
            return cls(**json.loads(meta[QUANT_METADATA_KEY]))
        except (TypeError, ValueError) as e:  # QuantizationError is a ValueError
            raise QuantizationError(f"{source}: bad {QUANT_METADATA_KEY!r} metadata: {e}") from None


def quantization_targets(model: nn.Module, cfg: QuantConfig) -> dict[str, tuple[list[int], str, int]]:
    """Module names to quantize -> (output splits, mode, group size); every check runs before
    anything is swapped. A tied lm_head gets its own quantized copy: the embedding lookup keeps
    the float table."""
    targets = {name: (splits, cfg.mode, cfg.group_size) for name, splits in projection_splits(model).items()}
    if cfg.head_format is not None:
        targets["output"] = ([model.config.vocab_size], *cfg.head_format)
    for name, (_, mode, group_size) in targets.items():
        module = model.get_submodule(name)
        if isinstance(module, PackedLinear) and module.fmt != "fp":
            current = QuantConfig(module.fmt, module.group_size).label
            raise QuantizationError(f"model is already quantized ({current}); requantizing as "
                                    f"{cfg.label} would compound the error: start from the float checkpoint")
        k = module.in_features
        if mode == "int4" and k % group_size:
            fits = [g for g in INT4_GROUP_SIZES
                    if all(model.get_submodule(t).in_features % g == 0 for t, v in targets.items() if v[1] == "int4")]
            raise QuantizationError(f"{name}: K={k} is not divisible by group size {group_size} "
                                    f"(group sizes that fit this model: {fits or 'none'})")
    return targets


def prepare_quantized(model: nn.Module, cfg: QuantConfig, source: object) -> None:
    """Swap the (meta-device) model's projections for empty ones of cfg's format, so that
    load_state_dict(assign=True) can fill them from a quantized checkpoint."""
    try:
        targets = quantization_targets(model, cfg)
    except QuantizationError as e:
        raise QuantizationError(f"{source}: {e}") from None
    for name, (splits, mode, group_size) in targets.items():
        old = model.get_submodule(name)
        swap_module(model, name, PackedLinear(old.in_features, old.out_features, splits, mode, group_size,
                                              device=old.weight.device))
