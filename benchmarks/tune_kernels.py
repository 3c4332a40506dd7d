"""Pick a KernelConfig per (GPU, weight format, batch, shape) and store it in teal_kernels/tuned_configs.json.

Run on the target GPU, e.g.::

    python benchmarks/tune_kernels.py                      # Llama-3-8B + Llama-2-7B, bf16/int8/int4-g128
    python benchmarks/tune_kernels.py --quick --formats bf16

Each candidate is first checked against the torch reference, then timed inside a
CUDA graph that rotates over weight copies (benchmarks/timing.py).  Stage 1 times
every candidate at the highest --sparsities value; stage 2 times the best few at
the other values too, and the lowest sum over the sparse levels wins.  Where 0% is
among them (int8/int4) and another finalist is faster there, it is stored too, as
the config of dense calls ("dense_config").  The file is
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
import sys
import time
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from benchmarks.timing import (
    MODEL_SHAPES,
    Problem,
    copies_for,
    decode_fusions,
    fused_call,
    graph_time_us,
    make_weight,
    make_x,
    parse_format,
    threshold_for,
)
from files import atomic_path
from teal_kernels.reference import FMT_FLOAT, FMT_INT4, FMT_INT8, MAX_BATCH, sparse_gemv_reference
from teal_kernels.triton_gemv import (TUNED_CONFIGS_PATH, KernelConfig, _fit_config, _heuristic_config, _rows_heuristic,
                                      config_key, sparse_gemv_triton)

STAGE2_KEEP = 3


def fitted(configs: list[KernelConfig], fmt: str, m: int, k: int, splits: list[int]) -> list[KernelConfig]:
    """The configs as the kernel runs them on this shape (_fit_config: an int4 dot tile's warps capped
    at block_n / 64 per 16 rows, SUB_K at the group, ...), each once, in order. Unfitted, the tuner
    timed an int4 config at 8 warps and at 4 although both ran at 4, and stored the "8"."""
    kind, group = parse_format(fmt)
    code = {"int4": FMT_INT4, "int8": FMT_INT8}.get(kind, FMT_FLOAT)
    return list(dict.fromkeys(_fit_config(c, code, group, m, k, splits) for c in configs))


def candidates(fmt: str, m: int, k: int, splits: list[int], quick: bool,
               stored: KernelConfig | None, kinds: list[str] | None = None, min_block_k: int = 0) -> list[KernelConfig]:
    """The dot design around the lab's winners (results/gemv_lab.md: rows of 256-512 columns,
    SUB_K 32, three stages, 200-400 programs), wider rows for the narrow int8/int4 elements, a
    small grid of the compact rows design (bf16/fp16/int8), plus the rows design's heuristic and
    the config stored before (a retune never picks a config slower than the one it replaces),
    and that config and the heuristic with their registers capped at 96 and 128; fitted to the
    shape, each once. `kinds` keeps only those kinds (and the stored config); `min_block_k` only
    K blocks of at least that many rows (and the stored config), and adds the dot design's K blocks
    of 2048 and 4096 rows, 4 and 6 stages deep (int4_stalls/: a program of 4 tiles leaves a 3-stage
    pipeline no time to get ahead of DRAM's latency)."""
    kind, _ = parse_format(fmt)
    n = sum(splits)
    # int4's dot design runs one tl.dot per nibble plane of block_n / 8 columns: 128 columns is
    # the narrowest it takes (two warps), 256 the narrowest for four.
    block_ns = {"bf16": (256, 512), "fp16": (256, 512), "int8": (256, 512, 1024)}.get(kind, (128, 256, 512, 1024))
    block_ks = (256, 512) if quick else (128, 256, 512, 1024)
    stages = (3,) if quick else (3, 4)
    # int4 applies its group scale once per tile: longer tiles (up to a group) apply it less often.
    sub_ks = (32, 64, 128) if kind == "int4" and not quick else (32,)
    grid = {_heuristic_config(fmt, m, k, n)} | ({stored} if stored else set())
    rows_design = m <= MAX_BATCH  # past the decode batches only the dot design runs
    if rows_design:
        grid.add(_rows_heuristic(fmt, m, k, n))
    # the stored winner and the heuristic under a register cap (more programs an SM, less ILP)
    for base in [c for c in (stored, _heuristic_config(fmt, m, k, n)) if c is not None]:
        grid |= {dataclasses.replace(base, max_registers=cap) for cap in (96, 128)}
    for bn, bk, st, sk in itertools.product(block_ns, block_ks, stages, sub_ks):
        if sk <= bk:
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_stages=st, design="dot"))
    if kind != "int4" and rows_design:  # the compact rows design around its stored winners (16 rows x 512
        # columns, 4 warps), with and without the next chunk's weight rows prefetched (num_stages 2);
        # 1024-row blocks halve the programs, which cuts the per-call fixed cost (results/fixed_cost.md)
        for bn, bk, sk, nw, st in itertools.product((256, 512), (256, 512, 1024), (16, 32), (4, 8), (1, 2)):
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_warps=nw, num_stages=st, compact=True,
                                  design="rows"))
        # and with each chunk's lanes summed as it goes (lane_sum): an accumulator of a few rows
        # (_lane_groups), so 110 registers instead of 249 at 512 bf16 columns (ptxas, local): 4 CTAs
        # per SM instead of 2, or tiles as wide as the warps' 16-byte loads
        wide = (512, 1024, 2048) if kind == "int8" else (256, 512, 1024)
        for bn, bk, sk, nw, st in itertools.product(wide, (128, 256, 512), (16, 32), (4, 8), (1, 2)):
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_warps=nw, num_stages=st, compact=True,
                                  design="rows", lane_sum=True))
    if kind != "int4" and rows_design and kinds and any("pipelined" in name for name in kinds):
        # opt-in (KernelConfig; measured end to end for int8 only, results/long_k/): the loop through
        # Triton's software pipeline, with K blocks up to 4096 rows, where few split-K partials leave a
        # long loop to pipeline
        # (8 warps too: int8 gate|up's 4-warp winner holds 255 registers and runs 2 programs an SM, 2 warps
        # a scheduler with barrier and memory stalls, ncu in results/step_tune/; at 8 warps, 116 registers)
        for bn, bk, sk, st, nw, lane_sum in itertools.product((128, 256, 512), (512, 1024, 2048, 4096), (32, 64),
                                                              (4, 8), (4, 8), (False, True)):
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_warps=nw, num_stages=st, compact=True,
                                  design="rows", lane_sum=lane_sum))
        # and more, smaller programs of 4 or 8 warps for the small matrices: Nsight Compute put int8 o
        # at 50% (128 programs) at one 4-warp program an SM, one warp a scheduler issuing in 29% of
        # the samples, DRAM 18% busy; q|k|v (384 programs) at 2.7 warps a scheduler, DRAM 21%
        # (results/step_tune/ section 5)
        for bn, bk, sk, nw, lane_sum in itertools.product((64, 128, 256), (128, 256, 512), (16, 32), (4, 8),
                                                          (False, True)):
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_warps=nw, num_stages=4, compact=True,
                                  design="rows", lane_sum=lane_sum))
    if m == 1 and kinds and "gather" in kinds:
        # opt-in: the "gather" design (a block's kept rows listed once and read sub_k a tl.dot tile; int4
        # groups as the tile's rows, up to 16 a block), so a tile's work follows the kept rows. int4-g128:
        # on the H200 gate|up faster at 50% alone, slower end to end (results/gather_2026_12_05/); with the
        # later kernel, faster end to end on the H100 (stored for it, results/gather_2026_12_05b/); int8:
        # slower on every 8B matrix (ibid.)
        gather_ns = (128, 256, 512) if kind == "int4" else (256, 512)
        gather_ks = (32, 64, 128) if kind == "int4" else (32, 64)
        # stages: triton 3.6 double-buffers the gathered weight tile at 5-6 and triple-buffers it at 8
        # (at 3-4 it compiles one buffer: one tile in flight while the last is multiplied). 4 warps here;
        # tune_shape's second stage times the finalists at 8 too (int4 takes 8 from 512 columns). 8 in the
        # first stage as well, for every gather candidate, changed nothing on the H100's 8B gate|up and down
        # at 50% (2026-12-06, results/gather_loop_2026_12_06/)
        for bn, bk, sk, st in itertools.product(gather_ns, (512, 1024, 2048), gather_ks, (4, 6, 8)):
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_stages=st, design="gather"))
    if min_block_k:
        for bn, bk, st, sk in itertools.product(block_ns[:2], (2048, 4096), (4, 6), sub_ks):
            grid.add(KernelConfig(block_n=bn, block_k=bk, sub_k=sk, num_stages=st, design="dot"))
        grid = {c for c in grid if c.block_k >= min_block_k or c == stored}
    if kinds:  # a partial retune: the stored winner against the named kinds only
        grid = {c for c in grid if config_kind(c) in kinds or c == stored}
    return fitted(sorted(grid, key=lambda c: dataclasses.astuple(c)), fmt, m, k, splits)


def build_problems(fmt: str, m: int, k: int, splits: list[int], sparsity: float,
                   fusions: tuple[str, ...] = ()) -> list[Problem]:
    """Weight copies (different seeds) sharing one x and thresholds; `fusions` as timing.fused_call."""
    kind, _ = parse_format(fmt)
    dtype = torch.float16 if kind == "fp16" else torch.bfloat16
    x_in, fusion, x = fused_call(make_x(m, k, dtype, "cuda", seed=0), fusions, sum(splits))
    thresholds = threshold_for(x, sparsity, len(splits))
    first = make_weight(fmt, k, sum(splits), "cuda", seed=1)
    nbytes = sum(t.numel() * t.element_size() for t in first[:3] if t is not None)
    weights = [first] + [make_weight(fmt, k, sum(splits), "cuda", seed=1 + i) for i in range(1, copies_for(nbytes))]
    return [Problem(x, w, thresholds, splits, s, z, g, x_in, fusion) for w, s, z, g in weights]


def time_config(cfg: KernelConfig, problems: list[Problem]) -> float:
    return graph_time_us(lambda i: sparse_gemv_triton(*problems[i].args(), config=cfg, **problems[i].fusion),
                         len(problems))


def is_correct(cfg: KernelConfig, p: Problem, ref: torch.Tensor) -> bool:
    """Whether the config runs on this GPU (a deep pipeline of wide tiles can ask for more shared
    memory than an SM has) and matches the reference."""
    try:
        out = sparse_gemv_triton(*p.args(), config=cfg, **p.fusion).float()
    except OutOfResources as e:
        print(f"skipped {cfg}: {e}", flush=True)
        return False
    return bool(torch.allclose(out, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()))


# every value config_kind returns (--kinds takes these)
KINDS = ["dot", "gather", "rows", "rows-lane_sum", "rows-compact", "rows-compact-lane_sum", "rows-compact-prefetch",
         "rows-compact-prefetch-lane_sum", "rows-compact-pipelined", "rows-compact-pipelined-lane_sum"]


def config_kind(c: KernelConfig) -> str:
    """The variant a config selects: design, then the rows design's loop options."""
    if c.design != "rows":
        return c.design
    options = (("compact", c.compact), ("prefetch", c.compact and c.num_stages == 2),
               ("pipelined", c.compact and c.num_stages > 2), ("lane_sum", c.lane_sum))
    return "rows" + "".join(f"-{name}" for name, on in options if on)


def tune_shape(fmt: str, m: int, k: int, splits: list[int], sparsities: list[float], quick: bool,
               stored: KernelConfig | None = None, kinds: list[str] | None = None,
               fusions: tuple[str, ...] = (), min_block_k: int = 0) -> dict:
    n = sum(splits)
    main_s = max(sparsities)
    problems = build_problems(fmt, m, k, splits, main_s, fusions)
    ref = sparse_gemv_reference(*problems[0].args(), **problems[0].fusion).float()
    grid = [c for c in candidates(fmt, m, k, splits, quick, stored, kinds, min_block_k)
            if is_correct(c, problems[0], ref)]
    if not grid:
        raise RuntimeError(f"No candidate config matched the reference for {fmt} M={m} K={k} N={n}.")
    stage1 = {c: time_config(c, problems) for c in grid}
    finalists = sorted(grid, key=stage1.get)[:STAGE2_KEEP]
    wide = fitted([dataclasses.replace(c, num_warps=8) for c in finalists], fmt, m, k, splits)
    finalists += [c for c in wide if c not in finalists and is_correct(c, problems[0], ref)]
    # The fastest candidate of each kind at the max sparsity, so a losing variant's distance from
    # the winner is on record (the 2026-12-03 retune kept no lane_sum config, and said not by how much),
    # timed at every level like the finalists.
    runners_up: dict[str, tuple[float, KernelConfig]] = {}
    for c, t in stage1.items():
        kind = config_kind(c)
        if kind not in runners_up or t < runners_up[kind][0]:
            runners_up[kind] = (t, c)
    timed = list(dict.fromkeys(finalists + [c for _, c in runners_up.values()]))
    times: dict[KernelConfig, dict[float, float]] = {c: {} for c in timed}
    for s in sorted(sparsities, reverse=True):
        if s != main_s:
            del problems  # free the previous weight copies first
            problems = build_problems(fmt, m, k, splits, s, fusions)
        for c in timed:
            times[c][s] = time_config(c, problems)
    # The sparse levels pick "config"; where 0% is timed too and its fastest finalist differs, that one
    # is stored as "dense_config", which calls without thresholds take (get_config's `dense`).
    sparse_levels = [s for s in sparsities if s > 0] or list(sparsities)
    best = min(finalists, key=lambda c: sum(times[c][s] for s in sparse_levels))
    dense_best = min(finalists, key=lambda c: times[c][0.0]) if 0.0 in times[best] else best
    heuristic_us = stage1.get(fitted([_heuristic_config(fmt, m, k, n)], fmt, m, k, splits)[0])  # None: failed the check
    dense_entry = {} if dense_best == best or times[dense_best][0.0] >= times[best][0.0] else {
        "dense_config": dense_best.to_dict(), "dense_us": round(times[dense_best][0.0], 2)}
    return {
        "config": best.to_dict(),
        **dense_entry,
        "us": {str(s): round(t, 2) for s, t in sorted(times[best].items())},
        "heuristic_us_at_max_sparsity": heuristic_us and round(heuristic_us, 2),
        "candidates": len(grid),
        "fusions": list(fusions),
        "best_of_each_kind_at_max_sparsity": {kind: {"us": round(t, 2), "config": c.to_dict(),
                                                     "us_by_sparsity": {str(s): round(v, 2)
                                                                        for s, v in sorted(times[c].items())}}
                                              for kind, (t, c) in sorted(runners_up.items())},
    }


def merge_partial(previous: dict, entry: dict) -> dict:
    """A partial retune's (--kinds, --min_block_k) entry completed from the one it replaces: the runners-up of
    the kinds it did not time and the heuristic's time stay on record (timed by that earlier tune). An
    entry copied from another GPU ("copied_from", as a session phase seeds a GPU without entries of
    its own) has no timings of this GPU to keep: the new entry stands alone."""
    if "copied_from" in previous:
        return dict(entry)
    merged = dict(entry)
    merged["best_of_each_kind_at_max_sparsity"] = {**previous.get("best_of_each_kind_at_max_sparsity", {}),
                                                   **entry["best_of_each_kind_at_max_sparsity"]}
    if entry["heuristic_us_at_max_sparsity"] is None:
        merged["heuristic_us_at_max_sparsity"] = previous.get("heuristic_us_at_max_sparsity")
    return merged


def _compile_one(job: tuple[str, int, int, tuple[int, ...], tuple[str, ...], dict]) -> None:
    """Worker: one call of the kernel at the real shape fills Triton's on-disk cache (failures
    are left to the tuner's own check)."""
    fmt, m, k, splits, fusions, cfg = job
    try:
        kind, _ = parse_format(fmt)
        x_in, fusion, x = fused_call(make_x(m, k, torch.float16 if kind == "fp16" else torch.bfloat16, "cuda", seed=0),
                                     fusions, sum(splits))
        w, scales, zeros, group = make_weight(fmt, k, sum(splits), "cuda", seed=1)
        p = Problem(x, w, threshold_for(x, 0.5, len(splits)), list(splits), scales, zeros, group, x_in, fusion)
        sparse_gemv_triton(*p.args(), config=KernelConfig(**cfg), **p.fusion)
        sparse_gemv_triton(*p.args(), config=dataclasses.replace(KernelConfig(**cfg), num_warps=8), **p.fusion)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported, the tuner decides
        print(f"precompile {fmt} M{m} K{k} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def precompile(jobs: list[tuple[str, int, int, tuple[int, ...], tuple[str, ...], dict]], workers: int) -> None:
    """Compile every candidate in `workers` processes first: compiling dominates a sequential
    tune (a second or two per config), timing does not."""
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_compile_one, jobs, chunksize=1)
    print(f"precompiled {len(jobs)} candidates in {workers} processes: {time.time() - start:.0f} s", flush=True)


def write_atomically(path: Path, table: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_SHAPES), choices=list(MODEL_SHAPES))
    parser.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4-g128"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes M to tune")
    parser.add_argument("--sparsities", nargs="+", type=float, default=None,
                        help="levels to time (default: 0.4 0.5 0.65 for bf16/fp16, whose dense path is cuBLAS, "
                             "not the kernel; 0 0.5 for int8/int4, which have no other path): the sparse ones' "
                             "summed time picks the config, 0's fastest is kept apart for dense calls if it differs")
    parser.add_argument("--quick", action="store_true", help="smaller candidate grid")
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND", choices=KINDS,
                        help="time only candidates of these kinds against the stored config: a quick partial "
                             f"retune ({', '.join(KINDS)}); the pipelined ones (opt-in, KernelConfig) are offered "
                             "only when named here")
    parser.add_argument("--min_block_k", type=int, default=0, metavar="ROWS",
                        help="time only candidates whose K blocks hold at least ROWS rows against the stored "
                             "config (a partial retune), adding the dot design's 2048- and 4096-row blocks")
    parser.add_argument("--decode_fusions", action="store_true",
                        help="time each shape as decode.py calls it (timing.DECODE_FUSIONS: the RMSNorm in q|k|v's "
                             "and gate|up's prologue where PackedLinear puts it, the residual in o's and down's "
                             "epilogue, SiLU(gate) * up in down's prologue) instead of the plain product")
    parser.add_argument("--force", action="store_true", help="retune shapes already in the file")
    parser.add_argument("--out", type=Path, default=TUNED_CONFIGS_PATH)
    parser.add_argument("--jobs", type=int, default=0, help="compile the candidates in this many processes first")
    parser.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                        help="only these projections of the models (e.g. gate_up down); default all")
    args = parser.parse_args()
    if args.min_block_k < 0:
        parser.error(f"--min_block_k must be >= 0, got {args.min_block_k}")
    if not torch.cuda.is_available():
        sys.exit("error: tune_kernels.py needs a CUDA GPU")

    device = torch.cuda.get_device_name()
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    layers: dict[tuple[int, tuple[int, ...]], str] = {}  # shape -> its layer name (one per shape)
    for model in args.models:
        for layer, k, splits in MODEL_SHAPES[model]:
            if args.layers and layer not in args.layers:
                continue
            if layers.setdefault((k, tuple(splits)), layer) != layer:
                raise SystemExit(f"error: K={k} splits={splits} is both {layers[(k, tuple(splits))]} and {layer}")
    shapes = sorted(layers)
    if not shapes:
        parser.error(f"no projection of {args.models} is named {args.layers}")

    def fusions_of(fmt: str, m: int, k: int, splits: tuple[int, ...]) -> tuple[str, ...]:
        return decode_fusions(layers[(k, splits)], fmt, m) if args.decode_fusions else ()

    if args.jobs > 0:
        jobs = []
        for fmt in args.formats:
            for m in args.batch:
                for k, splits in shapes:
                    key = config_key(device, fmt, m, k, sum(splits))
                    if key in table and not args.force:
                        continue
                    stored = KernelConfig.from_dict(table[key]["config"]) if key in table else None
                    jobs += [(fmt, m, k, splits, fusions_of(fmt, m, k, splits), c.to_dict())
                             for c in candidates(fmt, m, k, list(splits), args.quick, stored, args.kinds,
                                                 args.min_block_k)]
        precompile(jobs, args.jobs)
    for fmt in args.formats:
        for m in args.batch:
            for k, splits in shapes:
                key = config_key(device, fmt, m, k, sum(splits))
                if key in table and not args.force:
                    print(f"{key}: already tuned, skipping")
                    continue
                start = time.time()
                stored = KernelConfig.from_dict(table[key]["config"]) if key in table else None
                levels = args.sparsities or ([0.4, 0.5, 0.65] if parse_format(fmt)[0] in ("bf16", "fp16") else [0.0, 0.5])
                entry = tune_shape(fmt, m, k, list(splits), levels, args.quick, stored, args.kinds,
                                   fusions_of(fmt, m, k, splits), args.min_block_k)
                if (args.kinds or args.min_block_k) and key in table:
                    entry = merge_partial(table[key], entry)
                entry["date"] = datetime.date.today().isoformat()
                table[key] = entry
                write_atomically(args.out, table)
                print(f"{key}: {entry['config']} {entry['us']} µs "
                      f"(heuristic {entry['heuristic_us_at_max_sparsity']} µs, {time.time() - start:.0f} s)")
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
