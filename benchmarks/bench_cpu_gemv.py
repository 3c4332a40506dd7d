"""The CPU row kernel (teal_cpu::sparse_gemv) per projection shape, beside oneDNN's product
(F.linear) and a plain streaming read (Tensor.sum) of the same weights.

Each shape gets `--layers` distinct random weights, called in turn as a model's decode step calls
its layers, so the weights come from DRAM and not from cache; the median over `--reps` passes is
reported as microseconds a call and GB/s of the bytes the call must read (kept rows only). The
read-only row streams the same bytes through torch's own (OpenMP) threads, which under
OMP_WAIT_POLICY=PASSIVE (generate.py's setting) pay a wake-up a call.

    python -m benchmarks.bench_cpu_gemv --out docs/cpu/row_kernel/gemv
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from files import write_report
from teal_kernels import cpu

# SmolLM2-135M's decode GEMVs [K, N] (q|k|v, o, gate|up, down) and its tied lm_head
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}


def per_call_us(fn: Callable[[int], object], n: int, reps: int) -> float:
    """Median over `reps` passes of the time a call takes, each pass calling fn(0) .. fn(n - 1)."""
    for i in range(n):
        fn(i)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30, help="distinct weights per shape (lm_head: one)")
    p.add_argument("--reps", type=int, default=9, help="passes over the weights (median reported)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5], help="TEAL levels for the row kernel")
    p.add_argument("--out", type=Path, default=Path("docs/cpu/row_kernel/gemv"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if not cpu.available():
        raise SystemExit("error: the C++ CPU kernel did not build here")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES.items():
        count = 1 if name == "lm_head" else args.layers
        weights = [torch.randn(k, n, generator=gen).bfloat16() for _ in range(count)]  # [K, N]: the kernel's layout
        x = torch.randn(1, k, generator=gen).bfloat16()
        nbytes = k * n * 2
        ways: dict[str, tuple[Callable[[int], object], float]] = {}
        for level in args.sparsity if name != "lm_head" else [0.0]:
            th = torch.tensor([x.float().abs().quantile(level).item() if level else 0.0])
            kept = (x.float().abs() > th).float().mean().item()
            ways[f"row kernel {level:.0%}"] = (
                lambda i, th=th: torch.ops.teal_cpu.sparse_gemv(x, weights[i], th, [n], None, None, 0, False, None),
                kept)
        dense_t = [w.t().contiguous() for w in weights]  # nn.Linear's [N, K]
        ways["F.linear (oneDNN)"] = (lambda i: torch.nn.functional.linear(x, dense_t[i]), 1.0)
        ways["sum (read only)"] = (lambda i: weights[i].sum(), 1.0)
        for way, (fn, kept) in ways.items():
            us = per_call_us(fn, count, args.reps)
            rows.append({"shape": name, "k": k, "n": n, "way": way, "us": us, "gb_s": nbytes * kept / us / 1e3})
            print(rows[-1], flush=True)
        del dense_t
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "layers": args.layers, "reps": args.reps}
    lines = [f"# CPU GEMV per call, SmolLM2-135M shapes, bf16 ({meta['date']}, {meta['threads']} threads, "
             f"torch {meta['torch']})", "",
             f"`python -m benchmarks.bench_cpu_gemv --layers {args.layers} --reps {args.reps}` "
             f"({args.layers} weights a shape in turn; GB/s of the bytes a call must read)", "",
             "| shape [K, N] | way | us a call | GB/s |", "|---|---|---|---|"]
    lines += [f"| {r['shape']} [{r['k']}, {r['n']}] | {r['way']} | {r['us']:.1f} | {r['gb_s']:.1f} |" for r in rows]
    write_report(args.out, {"meta": meta, "rows": rows}, lines)


if __name__ == "__main__":
    main()
