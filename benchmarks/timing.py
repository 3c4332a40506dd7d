"""Shared helpers of the kernel benchmarks: layer shapes, synthetic inputs and a
CUDA-graph timer that rotates through weight copies so the 60 MB L2 cannot hold them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from linear import sparse_kernel_takes_norm
from teal_kernels.reference import gated_input, rms_normed


# (layer, K, split sizes of N): fused q|k|v and gate|up use one threshold per segment.
MODEL_SHAPES: dict[str, list[tuple[str, int, list[int]]]] = {
    "llama3-8b": [
        ("qkv", 4096, [4096, 1024, 1024]),
        ("o", 4096, [4096]),
        ("gate_up", 4096, [14336, 14336]),
        ("down", 14336, [4096]),
    ],
    "smollm2-135m": [
        ("qkv", 576, [576, 192, 192]),
        ("o", 576, [576]),
        ("gate_up", 576, [1536, 1536]),
        ("down", 1536, [576]),
    ],
    "llama3.2-1b": [
        ("qkv", 2048, [2048, 512, 512]),
        ("o", 2048, [2048]),
        ("gate_up", 2048, [8192, 8192]),
        ("down", 8192, [2048]),
    ],
    "llama3.2-3b": [
        ("qkv", 3072, [3072, 1024, 1024]),
        ("o", 3072, [3072]),
        ("gate_up", 3072, [8192, 8192]),
        ("down", 8192, [3072]),
    ],
    # one GPU's shard of Llama-3-70B under 8-way tensor parallelism (tp.py: q|k|v and gate|up split
    # by columns, o and down by rows). Mistral-7B's projections are Llama-3-8B's.
    "llama3-70b-tp8": [
        ("qkv", 8192, [1024, 128, 128]),
        ("o", 1024, [8192]),
        ("gate_up", 8192, [3584, 3584]),
        ("down", 3584, [8192]),
    ],
    "llama2-7b": [
        ("qkv", 4096, [4096, 4096, 4096]),
        ("o", 4096, [4096]),
        ("gate_up", 4096, [11008, 11008]),
        ("down", 11008, [4096]),
    ],
    # Llama-3-8B's output head alone, for a quantized head (quantize.py --lm_head): always dense, so
    # tune it at sparsity 0 only (`--sparsities 0`)
    "llama3-8b-head": [("lm_head", 4096, [128256])],
}
ROTATION_BYTES = 256 << 20  # > 4x the H200's L2


# decode.py's call of each projection (MODEL_SHAPES' layer names): the RMSNorm in q|k|v's and
# gate|up's prologue where linear.sparse_kernel_takes_norm says so, the residual added in o's and
# down's epilogue, SiLU(gate) * up read by down from the gate|up output.
DECODE_FUSIONS: dict[str, tuple[str, ...]] = {
    "qkv": ("norm",), "o": ("residual",), "gate_up": ("norm",), "down": ("gated", "residual"), "lm_head": (),
}


@dataclass
class Problem:
    """One sparse GEMV call: inputs in the layout sparse_gemv expects. x is the activation the
    thresholds cut; a fused call (fused_call) reads x_in instead, with `fusion` its keyword arguments."""

    x: torch.Tensor
    w: torch.Tensor
    thresholds: torch.Tensor
    split_sizes: list[int]
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    group_size: int
    x_in: torch.Tensor | None = None
    fusion: dict = field(default_factory=dict)

    def args(self) -> tuple:
        x = self.x if self.x_in is None else self.x_in
        return (x, self.w, self.thresholds, self.split_sizes, self.scales, self.zeros, self.group_size)


def decode_fusions(layer: str, fmt: str, m: int) -> tuple[str, ...]:
    """DECODE_FUSIONS of `layer` for weights of format `fmt` (bf16, int8, int4-g128, ...) at m rows:
    the norm only where linear.sparse_kernel_takes_norm has the sparse GEMV compute it."""
    kind, _ = parse_format(fmt)
    packed = "fp" if kind in ("bf16", "fp16") else kind
    return tuple(f for f in DECODE_FUSIONS[layer] if f != "norm" or sparse_kernel_takes_norm(packed, m))


def fused_call(x: torch.Tensor, fusions: tuple[str, ...], n: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """(the input the kernel reads, its fusion keyword arguments, the activation the thresholds cut)
    for an activation-like x [M, K] and the `fusions` of one call ("gated", "norm", "residual"):
    gated reads [x, 1], whose SiLU(x) * 1 is thresholded; norm reads x as the residual stream under a
    norm weight of ones; residual adds an [M, n] tensor to the output."""
    unknown = set(fusions) - {"gated", "norm", "residual"}
    if unknown:
        raise ValueError(f"unknown fusions {sorted(unknown)}; expected gated, norm or residual")
    x_in, kwargs, act = x, {}, x
    if "gated" in fusions:
        x_in = torch.cat([x, torch.ones_like(x)], dim=1)
        kwargs["gated"] = True
        act = gated_input(x_in)
    if "norm" in fusions:
        kwargs.update(norm_weight=torch.ones(x.shape[1], dtype=x.dtype, device=x.device), eps=1e-5)
        act = rms_normed(x, kwargs["norm_weight"], kwargs["eps"])
    if "residual" in fusions:
        kwargs["residual"] = make_x(x.shape[0], n, x.dtype, x.device, seed=2)
    return x_in, kwargs, act


def parse_format(fmt: str) -> tuple[str, int]:
    """'bf16' -> ('bf16', 0); 'int4-g128' -> ('int4', 128)."""
    if fmt.startswith("int4-g"):
        return "int4", int(fmt.removeprefix("int4-g"))
    if fmt in ("bf16", "fp16", "int8"):
        return fmt, 0
    raise ValueError(f"Unknown weight format {fmt!r}; expected bf16, fp16, int8 or int4-g<group>.")


def make_weight(fmt: str, k: int, n: int, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    """Random weight of format ``fmt`` as (w, scales, zeros, group_size)."""
    kind, group = parse_format(fmt)
    g = torch.Generator(device=device).manual_seed(seed)
    if kind in ("bf16", "fp16"):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        w = (torch.randn(k, n, generator=g, device=device) * 0.02).to(dtype)
        return w, None, None, 0
    if kind == "int8":
        w = torch.randint(-127, 128, (k, n), generator=g, device=device, dtype=torch.int8)
        return w, torch.rand(n, generator=g, device=device) * 1e-3, None, 0
    w = torch.randint(0, 256, (k, n // 2), generator=g, device=device, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=g, device=device) * 1e-2
    zeros = torch.randn(k // group, n, generator=g, device=device) * 1e-3
    return w, scales, zeros, group


def as_decode_reads(weight: tuple) -> tuple:
    """A make_weight tuple with its int4 scales and zeros as decode's kernels read them: packed bf16 pairs
    given as both unless TEAL_INT4_BF16_SCALES is 0 (linear.attach_bf16_scales), else as made."""
    from linear import int4_bf16_scales
    from teal_kernels.reference import pack_scales_zeros
    w, scales, zeros, group = weight
    if not group or not int4_bf16_scales():
        return weight
    words = pack_scales_zeros(scales, zeros)
    return w, words, words, group


def make_x(m: int, k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, k, generator=g, device=device).to(dtype)


def threshold_for(x: torch.Tensor, sparsity: float, segments: int) -> torch.Tensor:
    """Same threshold for every segment: the ``sparsity``-quantile of |x| (0 keeps everything)."""
    t = torch.quantile(x.abs().float().flatten(), sparsity).item() if sparsity > 0 else 0.0
    return torch.full((segments,), t, dtype=torch.float32, device=x.device)


def weight_bytes_needed(p: Problem) -> int:
    """Bytes of weight (plus scales/zeros) a perfect kernel reads: only rows some batch row keeps."""
    n = sum(p.split_sizes)
    kept = sum(
        int((p.x.abs().float() > p.thresholds[j]).any(dim=0).sum()) * size
        for j, size in enumerate(p.split_sizes)
    )
    per_elem = p.w.element_size() * p.w.shape[1] / n  # 0.5 for packed int4
    aux = {id(t): t for t in (p.scales, p.zeros) if t is not None}  # packed int4 words go as both: once
    extra = sum(t.numel() * t.element_size() for t in aux.values())
    return int(kept * per_elem) + extra


def copies_for(bytes_per_copy: int) -> int:
    """Weight copies to rotate through so one graph replay streams > ROTATION_BYTES."""
    return max(2, min(16, math.ceil(ROTATION_BYTES / max(bytes_per_copy, 1))))


def graph_time_us(step: Callable[[int], object], n_variants: int, calls: int = 32, rep: int = 100) -> float:
    """Median µs per call of ``step(i)`` replayed in one CUDA graph cycling over i < n_variants.

    Runs every variant once eagerly first (JIT compilation, persistent buffers), then
    captures ``calls`` calls (rounded up to a multiple of n_variants) and times replays
    with triton.testing.do_bench, which flushes L2 between replays.
    """
    import triton.testing

    calls = math.ceil(calls / n_variants) * n_variants
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(n_variants):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i % n_variants)
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")
    del graph
    return ms * 1e3 / calls
