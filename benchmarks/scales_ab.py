"""int4 scales and zeros as float32 pairs against packed bf16 pairs (linear.INT4_BF16_SCALES_ENV), per call.

Per Llama-3-8B shape: the stored config at 50% sparsity, one row, graph-timed over rotating weights
(benchmarks/timing.py), float32 then packed (reference.pack_scales_zeros), twice, in one process. The
packed words halve the bytes a call reads for its scales and zeros (gate|up: 7.3 -> 3.7 MB).

    python -m benchmarks.scales_ab --out benchmarks/results/scales_ab/h100
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import triton

from benchmarks.timing import MODEL_SHAPES, Problem, graph_time_us, make_weight, make_x, threshold_for
from files import write_report
from teal_kernels.reference import pack_scales_zeros
from teal_kernels.triton_gemv import get_config, gpu_name, sparse_gemv_triton

FORMAT = "int4-g128"


def measure(rounds: int = 2) -> list[dict]:
    rows = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        weights = [make_weight(FORMAT, k, n, "cuda", seed=1 + i) for i in range(4)]
        x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
        cfg = get_config(gpu_name(x.device), FORMAT, 1, k, n)
        thresholds = threshold_for(x, 0.5, len(splits))
        variants = {
            "float32": [Problem(x, w, thresholds, splits, s, z, g) for w, s, z, g in weights],
            "packed": [Problem(x, w, thresholds, splits, (words := pack_scales_zeros(s, z)), words, g)
                       for w, s, z, g in weights],
        }
        row = {"layer": layer, "design": cfg.design, "config": cfg.to_dict()}
        for r in range(rounds):
            for name, problems in variants.items():
                row[f"{name}_{r + 1}"] = round(graph_time_us(
                    lambda i, problems=problems: sparse_gemv_triton(*problems[i].args(), config=cfg),
                    len(problems)), 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="passes over the two variants (default 2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scales_ab/scales_ab"),
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if not torch.cuda.is_available():
        raise SystemExit("error: scales_ab.py needs a CUDA GPU")
    rows = measure(args.rounds)
    name = torch.cuda.get_device_name()
    timed = [f"{v}_{r + 1}" for r in range(args.rounds) for v in ("float32", "packed")]
    lines = [f"# int4-g128 scales and zeros: float32 against packed bf16 pairs, µs a call at 50% ({name}, "
             f"torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today().isoformat()})", "",
             "| layer | design | " + " | ".join(timed) + " |", "|---|---|" + "---|" * len(timed)]
    lines += [f"| {r['layer']} | {r['design']} | " + " | ".join(str(r[t]) for t in timed) + " |" for r in rows]
    write_report(args.out, {"device": name, "format": FORMAT, "sparsity": 0.5, "rows": rows}, lines)


if __name__ == "__main__":
    main()
