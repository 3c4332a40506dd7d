"""int4 in the "rows" design: weights read as int32 words and converted by bit operations, against
the same kernel reading bytes and converting them with I2F (one call, same configs, same data).

    python -m benchmarks.int4_units [--out benchmarks/results/int4_rows/int4_units]

The launcher reads words wherever every program's columns start on a word and the weight is
16-byte aligned; a copy of the weight one byte into its buffer makes it read bytes instead. Each
shape runs its tuned or heuristic config fitted to the "rows" design (SmolLM2-135M's int4 shapes
take that design anyway: its 576-wide segments are no multiple of 128, the dot design's int4 tile),
timed in CUDA graphs over rotating weight copies. Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import torch
import triton

from benchmarks.timing import MODEL_SHAPES, Problem, copies_for, graph_time_us, make_weight, make_x, threshold_for
from files import atomic_path
from teal_kernels.triton_gemv import _rows_heuristic, sparse_gemv_triton

CASES = (("smollm2-135m", "int4-g64"), ("llama3-8b", "int4-g128"))


def unaligned(w: torch.Tensor) -> torch.Tensor:
    """w's copy starting one byte into its buffer: not readable as int32 words."""
    buf = torch.empty(w.numel() + 16, dtype=w.dtype, device=w.device)
    out = buf[1:1 + w.numel()].view(w.shape)
    out.copy_(w)
    return out


def time_layer(fmt: str, k: int, splits: list[int], sparsity: float) -> dict[str, float]:
    n = sum(splits)
    x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
    thresholds = threshold_for(x, sparsity, len(splits))
    weights = [make_weight(fmt, k, n, "cuda", seed=1 + i) for i in range(copies_for(k * n // 2))]
    cfg = _rows_heuristic(fmt, 1, k, n)
    times, outputs = {}, []
    for unit, prepare in (("words", lambda w: w), ("bytes", unaligned)):
        problems = [Problem(x, prepare(w), thresholds, splits, s, z, g) for w, s, z, g in weights]
        outputs.append(sparse_gemv_triton(*problems[0].args(), config=cfg).float())
        times[f"{unit}_us"] = graph_time_us(lambda i: sparse_gemv_triton(*problems[i].args(), config=cfg),
                                            len(problems))
    if not torch.allclose(*outputs, rtol=1e-2, atol=1e-2 * outputs[0].abs().max().item()):
        raise RuntimeError(f"words and bytes disagree for {fmt} K={k} N={n}")
    return {"config": dataclasses.asdict(cfg), **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_rows/int4_units"))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5])
    args = parser.parse_args()
    rows = []
    for model, fmt in CASES:
        for layer, k, splits in MODEL_SHAPES[model]:
            for s in args.sparsities:
                r = time_layer(fmt, k, list(splits), s)
                rows.append({"model": model, "layer": layer, "format": fmt, "K": k, "N": sum(splits), "sparsity": s, **r})
                print(f"{model} {layer} {fmt} s={s}: words {r['words_us']:.1f} us, bytes {r['bytes_us']:.1f} us",
                      flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": "python -m benchmarks.int4_units"}
    lines = [f"# int4 rows design: int32 words vs bytes ({meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, {meta['date']})", "", f"`{meta['command']}`", "",
             "| model | layer | format | K | N | sparsity | words µs | bytes µs | bytes / words |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['layer']} | {r['format']} | {r['K']} | {r['N']} | {r['sparsity']:.0%} | "
              f"{r['words_us']:.1f} | {r['bytes_us']:.1f} | {r['bytes_us'] / r['words_us']:.2f}x |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
