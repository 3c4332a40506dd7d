"""One sparse GEMV problem run many times in one process, every result checked: a race shows as
rare wrong results, which a test that runs a problem once catches now and then (the dot design's
former fp32-atomic K reduction failed one H200 test run in 6-12 and 7 calls of 500 here,
2026-12-04: results/int8_retune/). Prints how many calls went wrong and, for the first, which
column blocks and by how much, and whether the arrival counters were left at zero::

    python -m benchmarks.repeat_gemv --layer gate_up --sparsity 0.9 --repeats 500

The config is the GPU tests' dot variant of the heuristic (tests/test_kernels.py: `variant`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from benchmarks.timing import MODEL_SHAPES, make_weight, make_x, parse_format, threshold_for
from benchmarks.tune_kernels import fitted
from cli import FRACTION, int_at_least
from files import check_writable, write_json
from teal_kernels import sparse_gemv_reference
from teal_kernels import triton_gemv as sg


def main() -> None:
    layers = {layer: (k, splits) for layer, k, splits in MODEL_SHAPES["llama3-8b"]}
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", choices=sorted(layers), default="gate_up", help="Llama-3-8B projection")
    p.add_argument("--format", default="bf16", help="bf16, int8 or int4-g<group> (random weights)")
    p.add_argument("--sparsity", type=FRACTION, default=0.9, help="fraction of x zeroed")
    p.add_argument("--repeats", type=int_at_least(1), default=500, help="calls, each checked")
    p.add_argument("--out", type=Path, default=None, help="write the counts as JSON here")
    args = p.parse_args()
    try:
        parse_format(args.format)
    except ValueError as e:
        p.error(str(e))
    if args.out:
        check_writable(args.out)
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.repeat_gemv needs a CUDA GPU")
    k, splits = layers[args.layer]
    n = sum(splits)
    w, scales, zeros, group = make_weight(args.format, k, n, "cuda", seed=1)
    x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
    thr = threshold_for(x, args.sparsity, len(splits))
    problem = (x, w, thr, splits, scales, zeros, group)
    heuristic = sg._heuristic_config(args.format, 1, k, n)
    sub_k = max(16, heuristic.sub_k)
    (cfg,) = fitted([dataclasses.replace(heuristic, design="dot", sub_k=sub_k, block_k=max(heuristic.block_k, sub_k),
                                         num_stages=2)], args.format, 1, k, splits)  # as the kernel runs it
    ref = sparse_gemv_reference(*problem).float()
    atol = 1e-2 * ref.abs().max().item()
    counters = sg.arrival_counters(x.device)
    bad_calls, dirty_calls, first = 0, 0, None
    for i in range(args.repeats):
        out = sg.sparse_gemv_triton(*problem, config=cfg).float()
        torch.cuda.synchronize()
        wrong = ~torch.isclose(out, ref, rtol=1e-2, atol=atol)  # the GPU tests' tolerance
        if counters.any():
            dirty_calls += 1
            counters.zero_()
        if wrong.any():
            bad_calls += 1
            if first is None:
                cols = wrong.nonzero()[:, 1]
                first = {"call": i, "wrong_columns": int(cols.numel()),
                         "column_blocks": sorted({int(c) // cfg.block_n for c in cols})[:20],
                         "max_abs_error": float((out - ref).abs().max()), "ref_abs_max": float(ref.abs().max()),
                         "config": cfg.to_dict()}
    result = {"layer": args.layer, "format": args.format, "sparsity": args.sparsity, "repeats": args.repeats,
              "wrong_calls": bad_calls, "calls_leaving_counters_dirty": dirty_calls,
              "first_wrong": first}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
