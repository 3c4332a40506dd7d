"""Where a sparse GEMV call's fixed cost goes: the same tuned kernel with work and without.

Per Llama-3-8B shape (bf16, one row, the stored config), graph-timed like bench_kernels
(benchmarks/timing.py: 32 calls per replay, rotating weights):

- ``sparse_50``: the kernel at 50% sparsity (the decode case);
- ``no_rows``: the same call with an infinite threshold, so no weight row is read: launch,
  thresholds, x and the compaction, the partial store, the ticket and the last program's
  reduction, without the streaming part;
- ``no_rows_skip``: as ``no_rows`` with the compaction off (the chunk-skipping loop): what the
  prefix sum and the scratch round trip cost;
- ``no_rows_block_k_x2``: as ``no_rows`` with twice the rows per program (half the K blocks):
  how the cost moves with the grid and the partials the last program sums;
- ``empty_same_grid``: a Triton kernel that does nothing, launched on the same grid (what launch
  and CTA scheduling cost in the graph);
- ``empty_one_program``: the same with one program (the graph's per-kernel floor);
- ``linear_tiny``: cuBLAS on a 1 x 64 x 64 product (cuBLAS's floor, same timer);
- ``dense_half_k``: the same kernel and config at 0% on a dense matrix of K/2 rows: the bytes of
  the 50% call without any row selection (what the sparsity handling itself costs);
- ``cublas_half_k``: cuBLAS (F.linear, nn.Linear's [N, K/2] layout) on those K/2 rows: what a
  vendor GEMV takes for exactly the bytes a 50% call must read, the bound of any kernel that
  runs as one launch per projection (``cublas_full_k``: the dense projection, for scale).

A per-call cost far above ``empty_same_grid`` in ``no_rows`` is work inside the kernel that does
not scale with the bytes read (the target of the next GEMV change). Usage::

    python -m benchmarks.fixed_cost --out benchmarks/results/fixed_cost
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.timing import MODEL_SHAPES, Problem, copies_for, graph_time_us, make_weight, make_x, threshold_for
from files import write_report
from teal_kernels.triton_gemv import cdiv, get_config, gpu_name, sparse_gemv_triton, weight_format_name


@triton.jit
def _empty_kernel(out_ptr, FLAG: tl.constexpr):
    """Nothing but a launch (the store never runs: FLAG is 0), so the time is launch + scheduling."""
    if FLAG:
        tl.store(out_ptr, 0)


def probe(k: int, splits: list[int]) -> dict:
    n = sum(splits)
    weights = [make_weight("bf16", k, n, "cuda", seed=1)]
    weights += [make_weight("bf16", k, n, "cuda", seed=1 + i) for i in range(1, copies_for(k * n * 2))]
    x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
    cfg = get_config(gpu_name(x.device), weight_format_name(weights[0][0], 0), 1, k, n)
    row = {"k": k, "n": n, "config": cfg.to_dict()}
    variants = (("sparse_50", 0.5, cfg), ("no_rows", None, cfg),
                ("no_rows_skip", None, dataclasses.replace(cfg, compact=False, num_stages=1)),
                ("no_rows_block_k_x2", None, dataclasses.replace(cfg, block_k=2 * cfg.block_k)))
    for name, sparsity, config in variants:
        thr = (threshold_for(x, sparsity, len(splits)) if sparsity is not None
               else torch.full((len(splits),), float("inf"), device="cuda"))
        problems = [Problem(x, w, thr, splits, None, None, 0) for w, _, _, _ in weights]
        row[name] = graph_time_us(lambda i: sparse_gemv_triton(*problems[i].args(), config=config), len(problems))
    half = [make_weight("bf16", k // 2, n, "cuda", seed=50 + i) for i in range(copies_for(k * n))]
    x_half = x[:, : k // 2].contiguous()
    zero = torch.zeros(len(splits), device="cuda")
    row["dense_half_k"] = graph_time_us(
        lambda i: sparse_gemv_triton(x_half, half[i][0], zero, splits, config=cfg), len(half))
    linear_half = [w.t().contiguous() for w, _, _, _ in half]
    row["cublas_half_k"] = graph_time_us(lambda i: torch.nn.functional.linear(x_half, linear_half[i]), len(half))
    del linear_half, half
    linear_full = [w.t().contiguous() for w, _, _, _ in weights]
    row["cublas_full_k"] = graph_time_us(lambda i: torch.nn.functional.linear(x, linear_full[i]), len(linear_full))
    del linear_full
    grid = (cdiv(k, cfg.block_k), sum(cdiv(s, cfg.block_n) for s in splits))
    flag = torch.zeros(1, device="cuda")
    row["programs"] = grid[0] * grid[1]
    row["empty_same_grid"] = graph_time_us(lambda i: _empty_kernel[grid](flag, FLAG=0, num_warps=cfg.num_warps), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fixed_cost"),
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.fixed_cost needs a CUDA GPU")
    rows = [{"layer": layer, **probe(k, splits)} for layer, k, splits in MODEL_SHAPES["llama3-8b"]]
    flag = torch.zeros(1, device="cuda")
    a, b = (torch.ones(shape, device="cuda", dtype=torch.bfloat16) for shape in ((1, 64), (64, 64)))
    floors = {
        "empty_one_program": graph_time_us(lambda i: _empty_kernel[(1,)](flag, FLAG=0), 1),
        "linear_tiny": graph_time_us(lambda i: torch.nn.functional.linear(a, b), 1),
    }
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    lines = [f"# Sparse GEMV fixed cost, Llama-3-8B shapes, bf16, M = 1 ({meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']})", "",
             f"Floors (µs per call in a graph): empty one-program Triton kernel {floors['empty_one_program']:.2f}, "
             f"cuBLAS 1x64x64 {floors['linear_tiny']:.2f}.", "",
             "| layer | K | N | programs | 50% µs | no rows read µs | no rows, no compaction µs | "
             "no rows, 2x block_k µs | empty kernel, same grid µs | ours dense K/2 µs | cuBLAS K/2 µs | "
             "cuBLAS K µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['k']} | {r['n']} | {r['programs']} | {r['sparse_50']:.2f} | {r['no_rows']:.2f} | "
              f"{r['no_rows_skip']:.2f} | {r['no_rows_block_k_x2']:.2f} | {r['empty_same_grid']:.2f} | "
              f"{r['dense_half_k']:.2f} | {r['cublas_half_k']:.2f} | {r['cublas_full_k']:.2f} |" for r in rows]
    per_layer = {c: sum(r[c] for r in rows) for c in ("sparse_50", "dense_half_k", "cublas_half_k")}
    lines += ["", "Per layer (the four calls): " + ", ".join(f"{c} {v:.1f} µs" for c, v in per_layer.items()) + "."]
    write_report(args.out, {"meta": meta, "floors": floors, "rows": rows, "per_layer": per_layer}, lines)


if __name__ == "__main__":
    main()
