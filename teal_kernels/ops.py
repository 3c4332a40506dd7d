"""The torch ops of the decode path: ``teal::sparse_gemv`` (what PackedLinear calls for
decode-sized batches, and a quantized model's short prefills on CUDA; ``teal::sparse_gemv_stats``: with the
next RMSNorm's statistics), ``teal::dense_gemv`` (its
dense decode calls of small float matrices on CUDA), ``teal::dequantize`` (a quantized matrix in
bf16/fp16 for longer prefills on CUDA), ``teal::quant_gemm`` (such a prefill's product without the
bf16 copy: int8 and int4 prefills of 17-128 rows, linear.QUANT_GEMM_ROWS), ``teal::int4_mma`` (dense
int4-g128 decode calls on tensor cores from a packed copy, linear.INT4_MMA_ENV; ``teal::int4_mma_stats``: with
the next RMSNorm's statistics), ``teal::bf16_mma`` (dense bf16 decode calls of large matrices on tensor
cores, reading the [K, N] weights in place, linear.BF16_MMA_ENV; ``teal::bf16_mma_stats``: with the next
RMSNorm's statistics), ``teal::decode_attention`` and ``teal::decode_attention_step``
(the fused decode path's attention, decode.py), and ``teal::attention_o`` (that attention computed
inside o's GEMV, at short contexts: linear.PackedLinear.attention_product).

One op, one implementation per device: CUDA runs the Triton kernels (teal_kernels/triton_gemv.py,
teal_kernels/attention.py); the CPU runs ``teal::sparse_gemv`` with the C++ row-skipping kernel of
teal_kernels/cpu.py (the plain-torch reference where it cannot be built) and attention with the
plain-torch references (teal_kernels/reference.py), so a model works where Triton is not installed.
``TEAL_CPU_KERNELS=reference`` forces the references; ``TEAL_CPU_KERNELS=interpreter`` (with
``TRITON_INTERPRET=1`` set before Triton is imported) makes the CPU run the Triton kernels in
Triton's interpreter instead: that is how CI tests the model -> kernel path without a GPU.
``register_fake`` lets ``torch.compile(fullgraph=True)`` trace through the ops (CUDA graphs
included).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from teal_kernels import cpu
from teal_kernels.reference import (KERNEL_DTYPES, MAX_DOT_ROWS, attention_o_reference, attention_reference,
                                    attention_step_reference, check_norm_statistics, dequantize_weight, masked_product,
                                    rms_normed, validate, validate_attention, validate_step, write_norm_statistics)

CPU_KERNELS_ENV = "TEAL_CPU_KERNELS"  # "native" (default), "reference" or "interpreter"
CPU_KERNEL_MODES = ("native", "reference", "interpreter")


def _triton_launcher():
    """Imported on first use: Triton is optional on the CPU."""
    from teal_kernels.triton_gemv import sparse_gemv_triton
    return sparse_gemv_triton


def _cpu_kernels() -> str:
    """What the CPU implementations run: the C++ kernel (native), the plain-torch reference, or the
    Triton kernels interpreted."""
    mode = os.environ.get(CPU_KERNELS_ENV, "native")
    if mode not in CPU_KERNEL_MODES:
        raise ValueError(f"{CPU_KERNELS_ENV} must be 'native', 'reference' or 'interpreter', got {mode!r}")
    if mode == "interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{CPU_KERNELS_ENV}=interpreter needs TRITON_INTERPRET=1 set before Triton is imported")
    return mode


def cpu_runs_interpreter() -> bool:
    """Whether the CPU implementations run the Triton kernels in Triton's interpreter."""
    return _cpu_kernels() == "interpreter"


@torch.compiler.assume_constant_result
def _cpu_native() -> bool:
    """Whether CPU calls go straight to the C++ ops (``teal_cpu::``, teal_kernels/cpu.py). Those are
    registered in C++, so a compiled graph calls them without the Python custom op's dispatch; a
    compiled graph takes the answer of its trace."""
    return _cpu_kernels() == "native" and cpu.available()


def _eager() -> bool:
    """Outside torch.compile's tracing a CUDA call goes to the Triton launcher itself: the custom op
    adds its dispatch (dequantize on the H200's host: 60.6 us a call through the op, 36.1 without;
    benchmarks/results/NOTES.md), which an eager prefill of hundreds of calls would pay; a traced
    call needs the op."""
    return not torch.compiler.is_compiling()


@torch.library.custom_op("teal::sparse_gemv", mutates_args=(), device_types="cpu")
def _sparse_gemv_cpu(
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
    dense: bool = False,
) -> Tensor:
    mode = _cpu_kernels()
    if mode == "interpreter":
        return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size, gated=gated,
                                  residual=residual, norm_weight=norm_weight, eps=eps, dense=dense)
    if norm_weight is not None:  # the CPU kernel has no norm prologue: torch normalizes first
        validate(x, w, thresholds, split_sizes, scales, zeros, group_size, True, gated, residual, norm_weight)
        x = rms_normed(x, norm_weight, eps)
    args = (x, w, thresholds, split_sizes, scales, zeros, group_size)
    if mode == "native" and cpu.available():
        return cpu.sparse_gemv_cpu(*args, gated=gated, residual=residual)
    validate(*args, for_kernel=True, gated=gated, residual=residual)
    return masked_product(*args, gated=gated, residual=residual)


@_sparse_gemv_cpu.register_kernel("cuda")
def _sparse_gemv_cuda(x, w, thresholds, split_sizes, scales=None, zeros=None, group_size=0, gated=False,
                      residual=None, norm_weight=None, eps=0.0, dense=False):
    return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size, gated=gated,
                              residual=residual, norm_weight=norm_weight, eps=eps, dense=dense)


@_sparse_gemv_cpu.register_fake
def _(x, w, thresholds, split_sizes, scales=None, zeros=None, group_size=0, gated=False, residual=None,
      norm_weight=None, eps=0.0, dense=False):
    validate(x, w, thresholds, split_sizes, scales, zeros, group_size, for_kernel=True, gated=gated,
             residual=residual, norm_weight=norm_weight, max_rows=MAX_DOT_ROWS)
    return x.new_empty(x.shape[0], sum(split_sizes))


def sparse_gemv(
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
    dense: bool = False,
) -> Tensor:
    """Threshold-sparse x @ W^T for 1 <= M <= MAX_BATCH rows, on CUDA up to MAX_DOT_ROWS where the
    shape takes the kernel's dot design (formats, and the `gated`, `residual` and `norm_weight`
    fusions: teal_kernels/reference.py). `dense`: the call has no thresholds (all zero), so CUDA
    takes the tuned table's config for 0% where it stored one.

    Output [M, N] in x.dtype, float32 accumulation; rows of W for zeroed inputs are not read on
    the GPU.
    """
    # with a norm the op's CPU implementation normalizes first (PackedLinear hands norms over on CUDA only)
    if x.device.type == "cpu" and _cpu_native() and norm_weight is None:
        return cpu.sparse_gemv_cpu(x, w, thresholds, split_sizes, scales, zeros, group_size, gated, residual)
    if x.is_cuda and _eager():
        return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size, gated=gated,
                                  residual=residual, norm_weight=norm_weight, eps=eps, dense=dense)
    return torch.ops.teal.sparse_gemv(x, w, thresholds, list(split_sizes), scales, zeros, group_size, gated,
                                      residual, norm_weight, eps, dense)


@torch.library.custom_op("teal::sparse_gemv_stats", mutates_args=("scaled", "sumsq"), device_types="cpu")
def _sparse_gemv_stats_cpu(x: Tensor, w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None,
                           zeros: Tensor | None, group_size: int, gated: bool, residual: Tensor | None,
                           stats_weight: Tensor, scaled: Tensor, sumsq: Tensor, dense: bool = False) -> Tensor:
    if cpu_runs_interpreter():  # the launcher checks the buffers
        return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size, gated=gated,
                                  residual=residual, dense=dense, stats=(stats_weight, scaled, sumsq))
    check_norm_statistics((x.shape[0], sum(split_sizes)), x.dtype, stats_weight, scaled, sumsq)
    out = _sparse_gemv_cpu(x, w, thresholds, split_sizes, scales, zeros, group_size, gated, residual)
    write_norm_statistics(out, stats_weight, scaled, sumsq)
    return out


@_sparse_gemv_stats_cpu.register_kernel("cuda")
def _(x, w, thresholds, split_sizes, scales, zeros, group_size, gated, residual, stats_weight, scaled, sumsq,
      dense=False):
    return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size, gated=gated,
                              residual=residual, dense=dense, stats=(stats_weight, scaled, sumsq))


@_sparse_gemv_stats_cpu.register_fake
def _(x, w, thresholds, split_sizes, scales, zeros, group_size, gated, residual, stats_weight, scaled, sumsq,
      dense=False):
    return x.new_empty(x.shape[0], sum(split_sizes))


def sparse_gemv_stats(x: Tensor, w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None,
                      zeros: Tensor | None, group_size: int, gated: bool, residual: Tensor | None,
                      stats_weight: Tensor, scaled: Tensor, sumsq: Tensor, dense: bool = False) -> Tensor:
    """sparse_gemv's output (no norm prologue), returned, and what the RMSNorm after it hands its
    consumer instead of running, written into `scaled` (out * stats_weight, [M, N]) and `sumsq` (out's
    squares summed a 16-output tile, [M, N / 16] float32): reference.norm_statistics, as int4_mma_stats
    gives them. On CUDA the dot design's epilogue writes them (torch after a rows-design call)."""
    if x.is_cuda and _eager():
        return _triton_launcher()(x, w, thresholds, split_sizes, scales, zeros, group_size, gated=gated,
                                  residual=residual, dense=dense, stats=(stats_weight, scaled, sumsq))
    return torch.ops.teal.sparse_gemv_stats(x, w, thresholds, list(split_sizes), scales, zeros, group_size, gated,
                                            residual, stats_weight, scaled, sumsq, dense)


@torch.library.custom_op("teal::dense_gemv", mutates_args=(), device_types="cpu")
def _dense_gemv_cpu(x: Tensor, w: Tensor, gated: bool = False, residual: Tensor | None = None,
                    norm_weight: Tensor | None = None, eps: float = 0.0) -> Tensor:
    if cpu_runs_interpreter():
        from teal_kernels.preload_gemv import dense_gemv_preload
        return dense_gemv_preload(x, w, gated, residual, norm_weight, eps)
    no_thresholds = torch.zeros(1, dtype=torch.float32)
    return masked_product(x, w, no_thresholds, [w.shape[1]], None, None, 0, gated, residual, norm_weight, eps)


@_dense_gemv_cpu.register_kernel("cuda")
def _(x, w, gated=False, residual=None, norm_weight=None, eps=0.0):
    from teal_kernels.preload_gemv import dense_gemv_preload
    return dense_gemv_preload(x, w, gated, residual, norm_weight, eps)


@_dense_gemv_cpu.register_fake
def _(x, w, gated=False, residual=None, norm_weight=None, eps=0.0):
    return x.new_empty(x.shape[0], w.shape[1])


def dense_gemv(x: Tensor, w: Tensor, gated: bool = False, residual: Tensor | None = None,
               norm_weight: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """Dense x [M, K] @ w [K, N] (M <= MAX_BATCH) of a small float matrix with the decode path's fusions, weights
    loaded before the kernel waits on its input (teal_kernels/preload_gemv.py): the GPU decode
    path of the matrices where that beats cuBLAS (PackedLinear decides)."""
    return torch.ops.teal.dense_gemv(x, w, gated, residual, norm_weight, eps)


@torch.library.custom_op("teal::dequantize", mutates_args=(), device_types="cpu")
def _dequantize_cpu(w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, dtype: torch.dtype) -> Tensor:
    if cpu_runs_interpreter():
        from teal_kernels.dequantize import dequantize_triton
        return dequantize_triton(w, scales, zeros, group_size, dtype)
    return dequantize_weight(w, scales, zeros, group_size).to(dtype)


@_dequantize_cpu.register_kernel("cuda")
def _(w, scales, zeros, group_size, dtype):
    from teal_kernels.dequantize import dequantize_triton
    return dequantize_triton(w, scales, zeros, group_size, dtype)


@_dequantize_cpu.register_fake
def _(w, scales, zeros, group_size, dtype):
    return w.new_empty(w.shape[0], w.shape[1] * (2 if w.dtype == torch.uint8 else 1), dtype=dtype)


def dequantize(w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, dtype: torch.dtype) -> Tensor:
    """The real weight W^T [K, N] of an int8 / packed int4 matrix in bf16 or fp16, in one pass over its
    bytes (teal_kernels/dequantize.py): what PackedLinear hands cuBLAS for a quantized prefill on CUDA."""
    if w.is_cuda and _eager():
        from teal_kernels.dequantize import dequantize_triton
        return dequantize_triton(w, scales, zeros, group_size, dtype)
    return torch.ops.teal.dequantize(w, scales, zeros, group_size, dtype)


@torch.library.custom_op("teal::quant_gemm", mutates_args=(), device_types="cpu")
def _quant_gemm_cpu(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int) -> Tensor:
    if cpu_runs_interpreter():
        from teal_kernels.dequantize import quant_gemm_triton
        return quant_gemm_triton(x, w, scales, zeros, group_size)
    return (x.float() @ dequantize_weight(w, scales, zeros, group_size).to(x.dtype).float()).to(x.dtype)


@_quant_gemm_cpu.register_kernel("cuda")
def _(x, w, scales, zeros, group_size):
    from teal_kernels.dequantize import quant_gemm_triton
    return quant_gemm_triton(x, w, scales, zeros, group_size)


@_quant_gemm_cpu.register_fake
def _(x, w, scales, zeros, group_size):
    return x.new_empty(x.shape[0], scales.shape[-1])


def quant_gemm(x: Tensor, w: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int) -> Tensor:
    """x [M, K] @ the real weight of an int8 / packed int4 matrix, each weight tile dequantized in
    registers (teal_kernels/dequantize.py): a quantized prefill on CUDA up to linear.QUANT_GEMM_ROWS rows."""
    if x.is_cuda and _eager():
        from teal_kernels.dequantize import quant_gemm_triton
        return quant_gemm_triton(x, w, scales, zeros, group_size)
    return torch.ops.teal.quant_gemm(x, w, scales, zeros, group_size)


@torch.library.custom_op("teal::int4_mma", mutates_args=(), device_types="cpu")
def _int4_mma_cpu(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None = None,
                  gate: bool = False, sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    from teal_kernels.int4_mma import int4_mma_reference
    return int4_mma_reference(x, words, scales, zeros, residual, gate, sumsq, eps)


@_int4_mma_cpu.register_kernel("cuda")
def _(x, words, scales, zeros, residual=None, gate=False, sumsq=None, eps=0.0):
    from teal_kernels.int4_mma import int4_mma as int4_mma_gluon
    return int4_mma_gluon(x, words, scales, zeros, residual, gate, sumsq, eps)


@_int4_mma_cpu.register_fake
def _(x, words, scales, zeros, residual=None, gate=False, sumsq=None, eps=0.0):
    return x.new_empty(x.shape[0], scales.shape[0] // 2 if gate else scales.shape[0])


def int4_mma(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None = None,
             gate: bool = False, sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """x [M <= 8, K] bf16 @ an int4-g128 matrix in teal_kernels/int4_mma.py's packed copy (+ residual;
    with gate, a paired gate|up copy's SiLU(gate) * up; with sumsq and the norm's eps, int4_mma_stats'
    sums for the norm before it):
    a dense int4 decode call on tensor cores (Gluon) on CUDA, the float32 reference elsewhere."""
    if x.is_cuda and _eager():
        from teal_kernels.int4_mma import int4_mma as int4_mma_gluon
        return int4_mma_gluon(x, words, scales, zeros, residual, gate, sumsq, eps)
    return torch.ops.teal.int4_mma(x, words, scales, zeros, residual, gate, sumsq, eps)


@torch.library.custom_op("teal::int4_mma_stats", mutates_args=("scaled", "sumsq"), device_types="cpu")
def _int4_mma_stats_cpu(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None,
                        stats_weight: Tensor, scaled: Tensor, sumsq: Tensor) -> Tensor:
    from teal_kernels.int4_mma import int4_mma_reference
    out = int4_mma_reference(x, words, scales, zeros, residual)
    write_norm_statistics(out, stats_weight, scaled, sumsq)
    return out


@_int4_mma_stats_cpu.register_kernel("cuda")
def _(x, words, scales, zeros, residual, stats_weight, scaled, sumsq):
    from teal_kernels.int4_mma import int4_mma_with_stats
    return int4_mma_with_stats(x, words, scales, zeros, residual, stats_weight, scaled, sumsq)


@_int4_mma_stats_cpu.register_fake
def _(x, words, scales, zeros, residual, stats_weight, scaled, sumsq):
    return x.new_empty(x.shape[0], scales.shape[0])


def int4_mma_stats(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None,
                   stats_weight: Tensor, scaled: Tensor, sumsq: Tensor) -> Tensor:
    """int4_mma's product (+ residual), returned, and what the RMSNorm after it hands its consumer
    instead of running, written into `scaled` (out * stats_weight, [M, N]) and `sumsq` (out's squares
    summed a 16-row tile, [M, N / 16] float32): teal_kernels/int4_mma.py's int4_mma_with_stats."""
    if x.is_cuda and _eager():
        from teal_kernels.int4_mma import int4_mma_with_stats
        return int4_mma_with_stats(x, words, scales, zeros, residual, stats_weight, scaled, sumsq)
    return torch.ops.teal.int4_mma_stats(x, words, scales, zeros, residual, stats_weight, scaled, sumsq)


@torch.library.custom_op("teal::bf16_mma", mutates_args=(), device_types="cpu")
def _bf16_mma_cpu(x: Tensor, w: Tensor, residual: Tensor | None = None, gate: bool = False,
                  sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    from teal_kernels.bf16_mma import bf16_mma_reference
    return bf16_mma_reference(x, w, residual, gate, sumsq, eps)


@_bf16_mma_cpu.register_kernel("cuda")
def _(x, w, residual=None, gate=False, sumsq=None, eps=0.0):
    from teal_kernels.bf16_mma import bf16_mma as bf16_mma_gluon
    return bf16_mma_gluon(x, w, residual, gate, sumsq, eps)


@_bf16_mma_cpu.register_fake
def _(x, w, residual=None, gate=False, sumsq=None, eps=0.0):
    return x.new_empty(x.shape[0], w.shape[1] // 2 if gate else w.shape[1])


def bf16_mma(x: Tensor, w: Tensor, residual: Tensor | None = None, gate: bool = False,
             sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """x [M <= 8, K] bf16 @ w [K, N] bf16 (+ residual; with gate, a gate|up matrix's SiLU(gate) * up; with
    sumsq and the norm's eps, bf16_mma_stats' sums for the norm before it): a dense bf16 decode call on
    tensor cores (Gluon, teal_kernels/bf16_mma.py) on CUDA, the float32 reference elsewhere."""
    if x.is_cuda and _eager():
        from teal_kernels.bf16_mma import bf16_mma as bf16_mma_gluon
        return bf16_mma_gluon(x, w, residual, gate, sumsq, eps)
    return torch.ops.teal.bf16_mma(x, w, residual, gate, sumsq, eps)


@torch.library.custom_op("teal::bf16_mma_stats", mutates_args=("scaled", "sumsq"), device_types="cpu")
def _bf16_mma_stats_cpu(x: Tensor, w: Tensor, residual: Tensor | None, stats_weight: Tensor, scaled: Tensor,
                        sumsq: Tensor) -> Tensor:
    from teal_kernels.bf16_mma import bf16_mma_reference
    out = bf16_mma_reference(x, w, residual)
    write_norm_statistics(out, stats_weight, scaled, sumsq)
    return out


@_bf16_mma_stats_cpu.register_kernel("cuda")
def _(x, w, residual, stats_weight, scaled, sumsq):
    from teal_kernels.bf16_mma import bf16_mma_with_stats
    return bf16_mma_with_stats(x, w, residual, stats_weight, scaled, sumsq)


@_bf16_mma_stats_cpu.register_fake
def _(x, w, residual, stats_weight, scaled, sumsq):
    return x.new_empty(x.shape[0], w.shape[1])


def bf16_mma_stats(x: Tensor, w: Tensor, residual: Tensor | None, stats_weight: Tensor, scaled: Tensor,
                   sumsq: Tensor) -> Tensor:
    """bf16_mma's product (+ residual), returned, and what the RMSNorm after it hands its consumer instead
    of running, written into `scaled` (out * stats_weight, [M, N]) and `sumsq` (out's squares summed a
    16-output tile, [M, N / 16] float32): teal_kernels/bf16_mma.py's bf16_mma_with_stats."""
    if x.is_cuda and _eager():
        from teal_kernels.bf16_mma import bf16_mma_with_stats
        return bf16_mma_with_stats(x, w, residual, stats_weight, scaled, sumsq)
    return torch.ops.teal.bf16_mma_stats(x, w, residual, stats_weight, scaled, sumsq)


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("teal::decode_attention", mutates_args=(), device_types="cpu")
def _decode_attention_cpu(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                          scale: float | None = None) -> Tensor:
    if cpu_runs_interpreter():
        from teal_kernels.attention import decode_attention_triton
        return decode_attention_triton(q, k_cache, v_cache, input_pos, scale)
    return attention_reference(q, k_cache, v_cache, input_pos, scale)


@_decode_attention_cpu.register_kernel("cuda")
def _(q, k_cache, v_cache, input_pos, scale=None):
    from teal_kernels.attention import decode_attention_triton
    return decode_attention_triton(q, k_cache, v_cache, input_pos, scale)


@_decode_attention_cpu.register_fake
def _(q, k_cache, v_cache, input_pos, scale=None):
    validate_attention(q, k_cache, v_cache, input_pos, scale)
    return torch.empty_like(q)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                     scale: float | None = None) -> Tensor:
    """Attention of one new token per sequence over cache positions 0..input_pos[0].

    q [B, H, D] (RoPE applied), k_cache/v_cache [B, Hkv, S_max, D] of q's dtype already holding
    the new token, input_pos int32/int64 [1] on q's device (read on the device: CUDA-graph safe).
    Returns [B, H, D] in q's dtype, fp32 softmax; scale defaults to 1/sqrt(D).
    """
    return torch.ops.teal.decode_attention(q, k_cache, v_cache, input_pos, scale)


@torch.library.custom_op("teal::decode_attention_step", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def _decode_attention_step_cpu(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor,
                               input_pos: Tensor, n_head: int, scale: float | None = None) -> Tensor:
    if cpu_runs_interpreter():
        from teal_kernels.attention import decode_attention_step_triton
        return decode_attention_step_triton(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)
    return attention_step_reference(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)


@_decode_attention_step_cpu.register_kernel("cuda")
def _(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale=None):
    from teal_kernels.attention import decode_attention_step_triton
    return decode_attention_step_triton(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)


@_decode_attention_step_cpu.register_fake
def _(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale=None):
    return qkv.new_empty(validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale))


def decode_attention_step(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor,
                          input_pos: Tensor, n_head: int, scale: float | None = None) -> Tensor:
    """Attention's decode step in one op: RoPE of q and k, k and v written into the caches at
    input_pos (in place), attention over 0..input_pos. qkv [B, (n_head + 2 Hkv) D] is the fused
    q|k|v projection's output; freqs_cis the [D/2, 2] (cos, sin) of the position. Returns
    [B, n_head, D]."""
    if qkv.device.type == "cpu" and qkv.dtype in KERNEL_DTYPES and _cpu_native():  # float32: the reference
        return cpu.decode_attention_step_cpu(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)
    return torch.ops.teal.decode_attention_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)


@torch.library.custom_op("teal::attention_o", mutates_args=("k_cache", "v_cache"), device_types="cpu")
def _attention_o_cpu(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                     n_head: int, w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None = None,
                     residual: Tensor | None = None) -> Tensor:
    if cpu_runs_interpreter():
        from teal_kernels.triton_gemv import attention_o_triton
        return attention_o_triton(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, w, thresholds, split_sizes,
                                  scales, residual)
    return attention_o_reference(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, w, thresholds, split_sizes,
                                 scales, residual)


@_attention_o_cpu.register_kernel("cuda")
def _(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, w, thresholds, split_sizes, scales=None, residual=None):
    from teal_kernels.triton_gemv import attention_o_triton
    return attention_o_triton(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, w, thresholds, split_sizes,
                              scales, residual)


@_attention_o_cpu.register_fake
def _(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, w, thresholds, split_sizes, scales=None, residual=None):
    validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, None)
    return qkv.new_empty(qkv.shape[0], w.shape[1])


def attention_o(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor, n_head: int,
                w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
    """decode_attention_step (RoPE, k and v written into the caches at input_pos, attention over
    0..input_pos) followed by o's sparse_gemv of its [B, n_head * D] output (float or int8 `w`, with
    `residual` added), in one op: on CUDA one launch, o's GEMV computing the attention of its own
    input (teal_kernels/triton_gemv.py attention_o_triton; one row, configs it fits). Returns [B, N]."""
    return torch.ops.teal.attention_o(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, w, thresholds,
                                      list(split_sizes), scales, residual)
