"""o's attention inside o's GEMV (teal::attention_o, TEAL_ATTENTION_O) against what the decode step
runs without it, per layer at Llama-3-8B's attention and o shapes, one row.

What the step runs without it: teal::decode_attention_step (RoPE, the cache write, the split
attention and its combine: two launches) followed by o's product, by our GEMV (teal::sparse_gemv)
or, for bf16 at 0%, by cuBLAS. With it: one launch, each o program computing its K block's heads'
attention over positions 0..p itself. Each method runs in one CUDA graph over `--layers` layer
copies (distinct caches and weights, so L2 cannot hold them), L2 flushed between replays; µs a
layer. Every context first checks the op against the two-op path (the same inputs, a relative
error of at most 2%).

    python -m benchmarks.bench_attention_o --contexts 128 256 384 512 1024 --out benchmarks/results/attention_o/bench

It answers where the op pays (linear.ATTENTION_O_MAX_CACHE). Its predecessor, a lab kernel with q
given and dense bf16 o only, measured the best case (results/small_programs/ section 3).
"""
from __future__ import annotations

import argparse
import datetime
import math
from collections.abc import Callable

import torch
import triton

from benchmarks.timing import graph_time_us
from files import write_report
from teal_kernels.ops import attention_o, decode_attention_step, sparse_gemv

FORMATS = ("bf16", "int8")


class Layer:
    """One layer's random q|k|v row, caches, W_o^T (bf16, and int8 with its column scales), residual
    and thresholds at the asked sparsity of the attention output's magnitudes; all distinct memory."""

    def __init__(self, n_head: int, n_kv: int, d: int, s_max: int, n: int, device: torch.device, seed: int):
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.n_head, self.n_kv, self.d = n_head, n_kv, d
        dtype = torch.bfloat16
        self.qkv = torch.randn(1, (n_head + 2 * n_kv) * d, generator=self.g, device=device).to(dtype)
        angles = torch.rand(d // 2, generator=self.g, device=device) * 6.0
        self.cs = torch.stack([angles.cos(), angles.sin()], -1)
        self.new_caches(s_max)
        k = n_head * d
        self.w = {"bf16": (torch.randn(k, n, generator=self.g, device=device) / math.sqrt(k)).to(dtype),
                  "int8": torch.randint(-127, 128, (k, n), generator=self.g, device=device, dtype=torch.int8)}
        self.scales = {"bf16": None, "int8": torch.rand(n, generator=self.g, device=device) / (64 * math.sqrt(k))}
        self.res = torch.randn(1, n, generator=self.g, device=device).to(dtype)
        self.y = torch.randn(1, k, generator=self.g, device=device).to(dtype)  # o's input when timed alone
        self.thr = torch.zeros(1, dtype=torch.float32, device=device)

    def new_caches(self, s_max: int) -> None:
        """Random K and V caches [1, Hkv, s_max, D] (the attention op's split count follows s_max)."""
        shape = (1, self.n_kv, s_max, self.d)
        self.k = torch.randn(shape, generator=self.g, device=self.qkv.device).to(self.qkv.dtype)
        self.v = torch.randn(shape, generator=self.g, device=self.qkv.device).to(self.qkv.dtype)

    def attention(self, pos: torch.Tensor) -> torch.Tensor:
        """The attention step's output [1, H * D]."""
        return decode_attention_step(self.qkv, self.cs, self.k, self.v, pos, self.n_head).reshape(1, -1)

    def set_sparsity(self, sparsity: float, pos: torch.Tensor) -> None:
        """o's threshold: that quantile of the attention output's magnitudes (0: the dense product)."""
        self.thr.fill_(0.0 if sparsity == 0 else torch.quantile(self.attention(pos).float().abs(), sparsity).item())

    def fused(self, fmt: str, pos: torch.Tensor) -> torch.Tensor:
        return attention_o(self.qkv, self.cs, self.k, self.v, pos, self.n_head, self.w[fmt], self.thr,
                           [self.w[fmt].shape[1]], self.scales[fmt], self.res)

    def our_o(self, fmt: str, y: torch.Tensor) -> torch.Tensor:
        return sparse_gemv(y, self.w[fmt], self.thr, [self.w[fmt].shape[1]], self.scales[fmt], None, 0, False,
                           self.res)


def measure(layers: list[Layer], contexts: list[int], sparsities: list[float], s_max: int,
            timer: Callable[[Callable[[int], object], int], float]) -> list[dict]:
    """Per context, format and sparsity: the op checked against the two-op path on layer 0, then
    `timer(step, len(layers))` (µs a call of step(i), i over the layers) of every method."""
    rows = []
    for context in contexts:
        p = context - 1
        positions = max(s_max, context + 8)
        for lay in layers:
            lay.new_caches(positions)
        pos = torch.tensor([p], dtype=torch.int64, device=layers[0].qkv.device)
        attention = {"attention step": lambda i: layers[i].attention(pos)}
        for fmt in FORMATS:
            for sparsity in sparsities:
                for lay in layers:
                    lay.set_sparsity(sparsity, pos)
                want = layers[0].our_o(fmt, layers[0].attention(pos)).float()
                got = layers[0].fused(fmt, pos).float()
                error = ((got - want).abs().max() / want.abs().max()).item()
                if not error <= 2e-2:
                    raise SystemExit(f"error: attention_o misses the two-op path at context {context}, {fmt}, "
                                     f"sparsity {sparsity} ({error:.2e})")
                methods = {
                    "attention_o": lambda i, f=fmt: layers[i].fused(f, pos),
                    "attention step + our o": lambda i, f=fmt: layers[i].our_o(f, layers[i].attention(pos)),
                    "our o alone": lambda i, f=fmt: layers[i].our_o(f, layers[i].y),
                }
                if fmt == "bf16" and sparsity == 0:
                    methods["attention step + cuBLAS o"] = lambda i: layers[i].attention(pos) @ layers[i].w["bf16"] \
                        + layers[i].res
                us = {name: timer(step, len(layers)) for name, step in {**methods, **attention}.items()}
                attention = {}  # timed once a context
                rows.append({"context": context, "s_max": positions, "weights": fmt, "sparsity": sparsity,
                             "max_rel_error": error, "us": us})
                print(context, fmt, sparsity, {k: round(v, 2) for k, v in us.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 384, 512, 1024],
                        help="positions attended (p + 1)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5],
                        help="o's input sparsity (a quantile of the attention output's magnitudes)")
    parser.add_argument("--layers", type=int, default=8, help="layer copies per graph (33.5 MB of bf16 W_o each)")
    parser.add_argument("--s_max", type=int, default=280,
                        help="cache positions (bench_decode's 256-token runs: 280; the attention op's split count "
                             "follows it), raised to context + 8 where smaller")
    parser.add_argument("--out", default="benchmarks/results/attention_o/bench")
    args = parser.parse_args()
    if min(args.contexts) < 1 or args.layers < 1 or args.s_max < 1:
        parser.error("--contexts, --layers and --s_max must be at least 1")
    if not all(0 <= s < 1 for s in args.sparsity):
        parser.error("--sparsity values must be in [0, 1)")
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.bench_attention_o needs a CUDA GPU")
    device = torch.device("cuda")
    n_head, n_kv, d, n = 32, 8, 128, 4096  # Llama-3-8B's attention and o
    layers = [Layer(n_head, n_kv, d, args.s_max, n, device, seed=i) for i in range(args.layers)]
    rows = measure(layers, args.contexts, args.sparsity, args.s_max,
                   lambda step, copies: graph_time_us(step, copies, calls=4 * copies))

    names = list(dict.fromkeys(k for r in rows for k in r["us"]))
    gpu = torch.cuda.get_device_name(device)
    lines = [f"# o's attention inside o's GEMV, Llama-3-8B shapes, one row - {gpu}, torch {torch.__version__}, "
             f"triton {triton.__version__}, {datetime.date.today()}", "",
             f"`python -m benchmarks.bench_attention_o --contexts {' '.join(map(str, args.contexts))} "
             f"--sparsity {' '.join(map(str, args.sparsity))} --layers {args.layers} --s_max {args.s_max}`", "",
             "µs a layer, CUDA graphs over the layer copies (L2 flushed between replays); the attention step "
             "alone is timed once a context.", "",
             "| context | cache positions | weights | sparsity | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    lines += [f"| {r['context']} | {r['s_max']} | {r['weights']} | {r['sparsity']} | "
              + " | ".join(f"{r['us'][k]:.2f}" if k in r["us"] else "" for k in names) + " |" for r in rows]
    write_report(args.out, {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                            "date": str(datetime.date.today()), "rows": rows}, lines)


if __name__ == "__main__":
    main()
