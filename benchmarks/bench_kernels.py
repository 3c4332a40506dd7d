"""Sparse GEMV vs cuBLAS on Llama layer shapes, across activation sparsity.

    python benchmarks/bench_kernels.py [--formats bf16 int8 int4-g128] [--out benchmarks/results/kernels]

For each layer and sparsity s (x ~ N(0, 1), threshold = s-quantile of |x|) it times
our kernel (config from teal_kernels/tuned_configs.json or the heuristic), ``x @ w_t``
and ``F.linear(x, w)`` with w in [N, K] (both dense bf16/fp16, so they do not depend
on s or on our weight format), and for int4 formats torch's tinygemm product at the same
group size (gpt-fast's int4 path, benchmarks/baselines.py; dense) and, for int4-g128,
teal_kernels/int4_mma.py's (dense), all in CUDA graphs that rotate over weight copies.
Effective TB/s = bytes of the weight rows actually needed / time.  Writes
``OUT.json`` (with GPU, versions, date, command) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton

from benchmarks.baselines import TorchInt4Linear
from benchmarks.timing import (
    MODEL_SHAPES,
    Problem,
    as_decode_reads,
    copies_for,
    decode_fusions,
    fused_call,
    graph_time_us,
    make_weight,
    make_x,
    parse_format,
    threshold_for,
    weight_bytes_needed,
)
from files import atomic_path
from teal_kernels import sparse_gemv
from teal_kernels.reference import weight_format_name
from teal_kernels.speed_table import SPEED_TABLE_PATH, table_key
from teal_kernels.triton_gemv import get_config, gpu_name

DEFAULT_SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]


@functools.cache
def dense_times(m: int, k: int, n: int, dtype: torch.dtype) -> dict[str, float]:
    """µs of cuBLAS on the same shape: x @ w_t ([K, N]) and F.linear with w [N, K]."""
    nbytes = k * n * torch.finfo(dtype).bits // 8
    copies = copies_for(nbytes)
    x = make_x(m, k, dtype, "cuda", seed=0)
    w_t = [make_weight("bf16" if dtype == torch.bfloat16 else "fp16", k, n, "cuda", seed=i)[0] for i in range(copies)]
    t_matmul = graph_time_us(lambda i: x @ w_t[i], copies)
    w = [t.t().contiguous() for t in w_t]
    w_t.clear()  # free the [K, N] copies before timing the [N, K] ones
    t_linear = graph_time_us(lambda i: F.linear(x, w[i]), copies)
    return {"matmul_us": t_matmul, "linear_us": t_linear}


@functools.cache
def tinygemm_us(m: int, k: int, n: int, group_size: int) -> float | None:
    """µs of torch's tinygemm int4 product (gpt-fast's int4 path) on the same shape and group size,
    the per-matrix baseline of issue 11; None where tinygemm does not take the shape."""
    x = make_x(m, k, torch.bfloat16, "cuda", seed=0)
    torch.manual_seed(0)
    try:
        modules = [TorchInt4Linear(nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16), group_size)
                   for _ in range(copies_for(k * n // 2))]
    except ValueError:
        return None
    return graph_time_us(lambda i: modules[i](x), len(modules))


@functools.cache
def int4_mma_us(m: int, k: int, n: int, group_size: int) -> float | None:
    """µs of teal_kernels/int4_mma.py's tensor-core product (an int4-g128 layer's dense decode calls
    under TEAL_INT4_MMA, on the copy the product packs) on the same shape; None where it does not take the
    shape or Triton has no Gluon."""
    from linear import int4_mma_scale_dtype
    from teal_kernels import int4_mma as im

    if m > im.MAX_ROWS or not im.fits(k, n, group_size, torch.bfloat16) or not im.available():
        return None
    x = make_x(m, k, torch.bfloat16, "cuda", seed=0)
    copies = [im.pack(*make_weight(f"int4-g{group_size}", k, n, "cuda", seed=i)[:3],
                      scale_dtype=int4_mma_scale_dtype()) for i in range(copies_for(k * n // 2))]
    return graph_time_us(lambda i: im.int4_mma(x, *copies[i]), len(copies))


def bench_layer(fmt: str, m: int, k: int, splits: list[int], sparsities: list[float],
                fusion: str = "plain") -> list[dict]:
    kind, group = parse_format(fmt)
    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    n = sum(splits)
    dense = dense_times(m, k, n, dtype)
    if kind == "int4":
        dense = {**dense, "tinygemm_us": tinygemm_us(m, k, n, group), "int4_mma_us": int4_mma_us(m, k, n, group)}
    weights = [make_weight(fmt, k, n, "cuda", seed=1)]
    nbytes = sum(t.numel() * t.element_size() for t in weights[0][:3] if t is not None)
    weights += [make_weight(fmt, k, n, "cuda", seed=1 + i) for i in range(1, copies_for(nbytes))]
    x = make_x(m, k, dtype, "cuda", seed=0)
    config = get_config(gpu_name(x.device), weight_format_name(weights[0][0], weights[0][3]), m, k, n)
    x_in, fused, x_act = fused_call(x, () if fusion == "plain" else tuple(fusion.split("+")), n)
    read = [as_decode_reads(w) for w in weights]  # the scales' form decode's kernels read (TEAL_INT4_BF16_SCALES)
    scales = {"scales": "packed bf16"} if read[0][1] is not weights[0][1] else {}
    rows = []
    for s in sparsities:
        problems = [Problem(x_act, w, threshold_for(x_act, s, len(splits)), splits, sc, z, g, x_in, fused)
                    for w, sc, z, g in read]
        ours = graph_time_us(lambda i: sparse_gemv(*problems[i].args(), **problems[i].fusion), len(problems))
        needed = weight_bytes_needed(problems[0])
        rows.append({
            "sparsity": s, "sparse_us": ours, **dense,
            "needed_bytes": needed, "effective_tbps": needed / ours / 1e6,
            "speedup_vs_linear": dense["linear_us"] / ours, "config": config.to_dict(), "fusion": fusion, **scales,
        })
    return rows


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        f"# Sparse GEMV benchmark ({meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']})",
        "",
        f"`{meta['command']}`",
        "",
        "| model | layer | format | fusion | M | K | N | sparsity | sparse µs | x@w_t µs | F.linear µs | speedup | eff. TB/s "
        "| tinygemm µs | int4_mma µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        copies = " | ".join("" if r.get(c) is None else f"{r[c]:.1f}" for c in ("tinygemm_us", "int4_mma_us"))
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['format']} | {r.get('fusion', 'plain')} | {r['M']} | {r['K']} | {r['N']} | {r['sparsity']:.0%} "
            f"| {r['sparse_us']:.1f} | {r['matmul_us']:.1f} | {r['linear_us']:.1f} "
            f"| {r['speedup_vs_linear']:.2f}x | {r['effective_tbps']:.2f} | {copies} |"
        )
    return "\n".join(lines) + "\n"


def speed_table_entries(results: list[dict], meta: dict) -> dict[str, dict]:
    """teal_kernels/speed_table.json entries (see teal_kernels/speed_table.py) from this benchmark's rows."""
    entries: dict[str, dict] = {}
    for r in results:
        if r.get("fusion", "plain") != "plain":
            continue  # the dispatch's table holds the plain product
        key = table_key(meta["gpu"], r["format"], r["M"], r["K"], r["N"])
        entry = entries.setdefault(key, {"sparse_us": {}, "source": f"{meta['command']} ({meta['date']})"})
        entry["sparse_us"][f"{r['sparsity']:g}"] = round(r["sparse_us"], 2)
        if "scales" in r:  # timed on packed int4 scales (TEAL_INT4_BF16_SCALES=1)
            entry["scales"] = r["scales"]
        if r["format"] in ("bf16", "fp16"):
            entry["dense_us"] = round(r["matmul_us"], 2)  # PackedLinear's dense path: x @ W^T
        for copy in ("tinygemm_us", "int4_mma_us"):  # an int4 layer's dense path with a dense copy
            if r.get(copy) is not None:
                entry[copy] = round(r[copy], 2)
    for entry in entries.values():  # int8/int4 have no other path than the kernel at 0%
        entry.setdefault("dense_us", entry["sparse_us"].get("0"))
    return {k: v for k, v in entries.items() if v["dense_us"] is not None}


def update_speed_table(results: list[dict], meta: dict) -> None:
    table = json.loads(SPEED_TABLE_PATH.read_text()) if SPEED_TABLE_PATH.exists() else {}
    table.update(speed_table_entries(results, meta))
    with atomic_path(SPEED_TABLE_PATH) as tmp:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"updated {SPEED_TABLE_PATH} ({len(table)} shapes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--formats", nargs="+", default=["bf16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsities", nargs="+", type=float, default=DEFAULT_SPARSITIES)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels"),
                        help="output path without extension; writes OUT.json and OUT.md")
    parser.add_argument("--fusions", action="store_true",
                        help="also time each layer as decode.py calls it (benchmarks/timing.py DECODE_FUSIONS: "
                             "q|k|v and gate|up with the RMSNorm in the prologue where PackedLinear puts it there, "
                             "o with the residual, down with SiLU(gate) * up and the residual)")
    parser.add_argument("--table", action="store_true",
                        help="also merge the results into teal_kernels/speed_table.json (the dispatch's data)")
    parser.add_argument("--table_from", type=Path, default=None, metavar="RESULTS_JSON",
                        help="no GPU run: merge an earlier run's OUT.json into teal_kernels/speed_table.json")
    args = parser.parse_args()
    if args.table_from is not None:
        saved = json.loads(args.table_from.read_text())
        update_speed_table(saved["results"], saved["meta"])
        return

    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    results = []
    for model in args.models:
        for layer, k, splits in MODEL_SHAPES[model]:
            for fmt in args.formats:
                fused = decode_fusions(layer, fmt, args.batch)
                fusions = ["plain"] + (["+".join(fused)] if args.fusions and fused else [])
                for fusion in fusions:
                    for row in bench_layer(fmt, args.batch, k, splits, args.sparsities, fusion):
                        row = {"model": model, "layer": layer, "format": fmt, "M": args.batch, "K": k,
                               "N": sum(splits), **row}
                        results.append(row)
                        print(f"{model:10s} {layer:8s} {fmt:10s} {fusion:8s} s={row['sparsity']:.2f} "
                              f"sparse {row['sparse_us']:7.1f} µs  F.linear {row['linear_us']:7.1f} µs  "
                              f"x@w_t {row['matmul_us']:7.1f} µs  {row['effective_tbps']:.2f} TB/s")
                    torch.cuda.empty_cache()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, meta))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    if args.table:
        update_speed_table(results, meta)


if __name__ == "__main__":
    main()
