"""Pick a KernelConfig per (GPU, weight format, batch, shape) and store it in kernels/tuned_configs.json.

Run on the target GPU, e.g.::

    python benchmarks/tune_kernels.py                      # Llama-3-8B + Llama-2-7B, bf16/int8/int4-g128
    python benchmarks/tune_kernels.py --quick --formats bf16

Each candidate is first checked against the torch reference, then timed inside a
CUDA graph that rotates over weight copies (benchmarks/timing.py).  Stage 1 times
every candidate at the highest --sparsities value; stage 2 times the best few at
the other values too, and the lowest sum over all sparsities wins.  The file is
rewritten atomically after every shape, so an interrupted run keeps its progress
and a rerun skips shapes already tuned (unless --force).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import multiprocessing
import time
from pathlib import Path

import torch
import triton

from benchmarks.timing import (
    MODEL_SHAPES,
    Problem,
    copies_for,
    graph_time_us,
    make_weight,
    make_x,
    parse_format,
    threshold_for,
)
from files import atomic_path
from kernels.reference import sparse_gemv_reference
from kernels.triton_gemv import TUNED_CONFIGS_PATH, KernelConfig, _heuristic_config, config_key, sparse_gemv_triton

STAGE2_KEEP = 3


def candidates(fmt: str, m: int, k: int, n: int, quick: bool) -> list[KernelConfig]:
    """A grid around the heuristic: weight rows of >= 256 bytes per program, 96 to 1024 programs
    (132 SMs), pipelines that fit shared memory; masked and compacted row selection.  The design
    lab (results/gemv_lab.md) found SUB_K = 32 and three stages best at Llama-3-8B shapes, so
    --quick keeps only those."""
    kind, _ = parse_format(fmt)
    elem_bytes = {"int4": 0.5, "int8": 1.0}.get(kind, 2.0)
    sub_ks = (32,) if quick else (16, 32, 64)
    stage_counts = (3,) if quick else (3, 4)
    grid = {_heuristic_config(fmt, m, k, n)}
    for bn, bk, sub, stages in itertools.product((128, 256, 512, 1024), (128, 256, 512, 1024), sub_ks, stage_counts):
        programs = triton.cdiv(n, bn) * triton.cdiv(k, bk)
        pipeline_bytes = stages * sub * bn * elem_bytes
        if bn * elem_bytes >= 256 and 96 <= programs <= 1024 and pipeline_bytes <= 160 * 1024 and sub <= bk:
            for compact in (False, True):
                grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sub, compact=compact, num_stages=stages))
    return sorted(grid, key=lambda c: dataclasses.astuple(c))


def _compile_worker(job: tuple) -> tuple[KernelConfig, str]:
    """Run one candidate once in a spawned process: compiles it into Triton's on-disk cache, so
    the timing process finds it built.  Returns the config and an error ('' if none)."""
    fmt, m, k, splits, cfg = job
    try:
        problem = build_problems(fmt, m, k, splits, 0.5, copies=1)[0]
        sparse_gemv_triton(*problem.args(), config=cfg)
        torch.cuda.synchronize()
        return cfg, ""
    except Exception as e:  # reported, and the candidate dropped
        return cfg, f"{type(e).__name__}: {e}"


def precompile(fmt: str, m: int, k: int, splits: list[int], grid: list[KernelConfig], jobs: int) -> list[KernelConfig]:
    """Compile every candidate in ``jobs`` processes; return those that built and ran."""
    if jobs <= 1:
        return grid
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs) as pool:
        results = pool.map(_compile_worker, [(fmt, m, k, splits, c) for c in grid])
    for cfg, error in results:
        if error:
            print(f"  dropped {cfg}: {error.splitlines()[0][:200]}")
    return [cfg for cfg, error in results if not error]


def build_problems(fmt: str, m: int, k: int, splits: list[int], sparsity: float, copies: int = 0) -> list[Problem]:
    """Weight copies (different seeds; enough to defeat the L2 unless ``copies`` is given)
    sharing one x and thresholds."""
    kind, _ = parse_format(fmt)
    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    x = make_x(m, k, dtype, "cuda", seed=0)
    thresholds = threshold_for(x, sparsity, len(splits))
    first = make_weight(fmt, k, sum(splits), "cuda", seed=1)
    nbytes = sum(t.numel() * t.element_size() for t in first[:3] if t is not None)
    weights = [first] + [make_weight(fmt, k, sum(splits), "cuda", seed=1 + i) for i in range(1, copies or copies_for(nbytes))]
    return [Problem(x, w, thresholds, splits, s, z, g) for w, s, z, g in weights]


def time_config(cfg: KernelConfig, problems: list[Problem]) -> float:
    return graph_time_us(lambda i: sparse_gemv_triton(*problems[i].args(), config=cfg), len(problems))


def is_correct(cfg: KernelConfig, p: Problem, ref: torch.Tensor) -> bool:
    out = sparse_gemv_triton(*p.args(), config=cfg).float()
    return bool(torch.allclose(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()))


def tune_shape(fmt: str, m: int, k: int, splits: list[int], sparsities: list[float], quick: bool,
               jobs: int) -> dict:
    n = sum(splits)
    main_s = max(sparsities)
    grid = precompile(fmt, m, k, splits, candidates(fmt, m, k, n, quick), jobs)
    problems = build_problems(fmt, m, k, splits, main_s)
    ref = sparse_gemv_reference(*problems[0].args()).float()
    grid = [c for c in grid if is_correct(c, problems[0], ref)]
    if not grid:
        raise RuntimeError(f"No candidate config matched the reference for {fmt} M={m} K={k} N={n}.")
    stage1 = {c: time_config(c, problems) for c in grid}
    finalists = sorted(grid, key=stage1.get)[:STAGE2_KEEP]
    wide = (dataclasses.replace(c, num_warps=8) for c in finalists)
    finalists += [c for c in wide if is_correct(c, problems[0], ref)]
    times: dict[KernelConfig, dict[float, float]] = {c: {} for c in finalists}
    for s in sorted(sparsities, reverse=True):
        if s != main_s:
            del problems  # free the previous weight copies first
            problems = build_problems(fmt, m, k, splits, s)
        for c in finalists:
            times[c][s] = time_config(c, problems)
    best = min(finalists, key=lambda c: sum(times[c].values()))
    heuristic_us = stage1.get(_heuristic_config(fmt, m, k, n))  # None if it failed the check
    return {
        "config": best.to_dict(),
        "us": {str(s): round(t, 2) for s, t in sorted(times[best].items())},
        "heuristic_us_at_max_sparsity": heuristic_us and round(heuristic_us, 2),
        "candidates": len(grid),
    }


def write_atomically(path: Path, table: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4-g128"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes M to tune")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--quick", action="store_true", help="smaller candidate grid")
    parser.add_argument("--force", action="store_true", help="retune shapes already in the file")
    parser.add_argument("--jobs", type=int, default=8, help="processes compiling candidates in parallel (1: none)")
    parser.add_argument("--out", type=Path, default=TUNED_CONFIGS_PATH)
    args = parser.parse_args()

    device = torch.cuda.get_device_name()
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    shapes = sorted({(k, tuple(splits)) for model in args.models for _, k, splits in MODEL_SHAPES[model]})
    for fmt in args.formats:
        for m in args.batch:
            for k, splits in shapes:
                key = config_key(device, fmt, m, k, sum(splits))
                if key in table and not args.force:
                    print(f"{key}: already tuned, skipping")
                    continue
                start = time.time()
                entry = tune_shape(fmt, m, k, list(splits), args.sparsities, args.quick, args.jobs)
                entry["date"] = datetime.date.today().isoformat()
                table[key] = entry
                write_atomically(args.out, table)
                print(f"{key}: {entry['config']} {entry['us']} µs "
                      f"(heuristic {entry['heuristic_us_at_max_sparsity']} µs, {time.time() - start:.0f} s)")
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
