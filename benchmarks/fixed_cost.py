"""Where a sparse GEMV call's fixed cost goes: the same tuned kernel with work and without.

Per Llama-3-8B shape (bf16 unless --format, one row, the stored config), graph-timed like
bench_kernels (benchmarks/timing.py: 32 calls per replay, rotating weights):

- ``sparse_50``: the kernel at 50% sparsity (the decode case);
- ``no_rows``: the same call with an infinite threshold, so no weight row is read: launch,
  thresholds, x and the compaction, the partial store, the ticket and the last program's
  reduction, without the streaming part;
- ``no_rows_skip`` (the "rows" design): as ``no_rows`` with the compaction off (the chunk-skipping
  loop): what the prefix sum and the scratch round trip cost;
- ``no_rows_one_stage`` (the "dot" and "gather" designs, which always list or mask their rows): as
  ``no_rows`` with Triton's software pipeline off (one stage): what its prologue and waits cost in a
  call whose loop never runs;
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

For an int8 / int4 ``--format`` the rows are ``sparse_50``, ``no_rows`` and ``dense_half_k`` (with
K/2's own config; the variants above that change the rows design's loop are bf16's only), and for
int4-g128 ``mma_full_k`` / ``mma_half_k``: teal_kernels/int4_mma.py's dense product (what int4 decode
runs dense) on K and on K/2 rows, the tensor-core bound of a 50% call that read only its kept rows.

A per-call cost far above ``empty_same_grid`` in ``no_rows`` is work inside the kernel that does
not scale with the bytes read (the target of the next GEMV change). Usage::

    python -m benchmarks.fixed_cost --out benchmarks/results/fixed_cost [--format int4-g128]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.timing import (MODEL_SHAPES, Problem, copies_for, graph_time_us, make_weight, make_x, parse_format,
                               threshold_for)
from files import write_report
from teal_kernels.triton_gemv import cdiv, get_config, gpu_name, sparse_gemv_triton, weight_format_name


@triton.jit
def _empty_kernel(out_ptr, FLAG: tl.constexpr):
    """Nothing but a launch (the store never runs: FLAG is 0), so the time is launch + scheduling."""
    if FLAG:
        tl.store(out_ptr, 0)


def _bytes(weight: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in weight[:3] if t is not None)


def probe(k: int, splits: list[int], fmt: str) -> dict:
    n = sum(splits)
    weights = [make_weight(fmt, k, n, "cuda", seed=1)]
    weights += [make_weight(fmt, k, n, "cuda", seed=1 + i) for i in range(1, copies_for(_bytes(weights[0])))]
    group = weights[0][3]
    x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
    cfg = get_config(gpu_name(x.device), weight_format_name(weights[0][0], group), 1, k, n)
    row = {"k": k, "n": n, "config": cfg.to_dict()}
    variants = [("sparse_50", 0.5, cfg), ("no_rows", None, cfg)]
    if fmt == "bf16":
        if cfg.design == "rows":
            variants.append(("no_rows_skip", None, dataclasses.replace(cfg, compact=False, num_stages=1)))
        else:
            variants.append(("no_rows_one_stage", None, dataclasses.replace(cfg, num_stages=1)))
        variants.append(("no_rows_block_k_x2", None, dataclasses.replace(cfg, block_k=2 * cfg.block_k)))
    for name, sparsity, config in variants:
        thr = (threshold_for(x, sparsity, len(splits)) if sparsity is not None
               else torch.full((len(splits),), float("inf"), device="cuda"))
        problems = [Problem(x, w, thr, splits, scales, zeros, group) for w, scales, zeros, _ in weights]
        row[name] = graph_time_us(lambda i: sparse_gemv_triton(*problems[i].args(), config=config), len(problems))
    half = [make_weight(fmt, k // 2, n, "cuda", seed=50 + i) for i in range(copies_for(_bytes(weights[0]) // 2))]
    x_half = x[:, : k // 2].contiguous()
    zero = torch.zeros(len(splits), device="cuda")
    # bf16: the 50% call's own config on K/2 rows; int formats: K/2's own (whole groups a block)
    half_cfg = cfg if fmt == "bf16" else get_config(gpu_name(x.device), weight_format_name(half[0][0], group), 1,
                                                    k // 2, n)
    row["dense_half_k"] = graph_time_us(
        lambda i: sparse_gemv_triton(x_half, half[i][0], zero, splits, half[i][1], half[i][2], group, config=half_cfg),
        len(half))
    if fmt == "int4-g128":
        from linear import int4_mma_scale_dtype
        from teal_kernels.int4_mma import int4_mma, pack
        for name, xs, ws in (("mma_full_k", x, weights), ("mma_half_k", x_half, half)):
            packed = [pack(*w[:3], scale_dtype=int4_mma_scale_dtype()) for w in ws]  # the product's copy
            row[name] = graph_time_us(lambda i, xs=xs, packed=packed: int4_mma(xs, *packed[i]), len(packed))
            del packed
    if fmt != "bf16":
        return row
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


COLUMNS = {"sparse_50": "50% µs", "no_rows": "no rows read µs", "no_rows_skip": "no rows, no compaction µs",
           "no_rows_one_stage": "no rows, 1 stage µs",
           "no_rows_block_k_x2": "no rows, 2x block_k µs", "empty_same_grid": "empty kernel, same grid µs",
           "dense_half_k": "ours dense K/2 µs", "cublas_half_k": "cuBLAS K/2 µs", "cublas_full_k": "cuBLAS K µs",
           "mma_half_k": "int4_mma K/2 µs", "mma_full_k": "int4_mma K µs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fixed_cost"),
                        help="writes OUT.json and OUT.md")
    parser.add_argument("--format", default="bf16", help="bf16 (default), int8 or int4-g<group> (random weights)")
    args = parser.parse_args()
    try:
        parse_format(args.format)
    except ValueError as e:
        parser.error(str(e))
    if args.format == "fp16":
        parser.error("--format takes bf16, int8 or int4-g<group>")
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.fixed_cost needs a CUDA GPU")
    rows = [{"layer": layer, **probe(k, splits, args.format)} for layer, k, splits in MODEL_SHAPES["llama3-8b"]]
    flag = torch.zeros(1, device="cuda")
    a, b = (torch.ones(shape, device="cuda", dtype=torch.bfloat16) for shape in ((1, 64), (64, 64)))
    floors = {
        "empty_one_program": graph_time_us(lambda i: _empty_kernel[(1,)](flag, FLAG=0), 1),
        "linear_tiny": graph_time_us(lambda i: torch.nn.functional.linear(a, b), 1),
    }
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "format": args.format}
    columns = [c for c in COLUMNS if any(c in r for r in rows)]  # a table may mix designs
    lines = [f"# Sparse GEMV fixed cost, Llama-3-8B shapes, {args.format}, M = 1 ({meta['gpu']}, torch "
             f"{meta['torch']}, triton {meta['triton']})", "",
             f"Floors (µs per call in a graph): empty one-program Triton kernel {floors['empty_one_program']:.2f}, "
             f"cuBLAS 1x64x64 {floors['linear_tiny']:.2f}.", "",
             "| layer | K | N | design | " + " | ".join(COLUMNS[c] for c in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    lines += [f"| {r['layer']} | {r['k']} | {r['n']} | {r['config']['design']} | "
              + " | ".join(f"{r[c]:.2f}" if c in r else "" for c in columns) + " |" for r in rows]
    per_layer = {c: sum(r[c] for r in rows) for c in columns if all(c in r for r in rows)}
    lines += ["", "Per layer (the four calls): " + ", ".join(f"{c} {v:.1f} µs" for c, v in per_layer.items()) + "."]
    write_report(args.out, {"meta": meta, "floors": floors, "rows": rows, "per_layer": per_layer}, lines)


if __name__ == "__main__":
    main()
