"""How fast can a GPU read the kept rows of a weight matrix, by the width a program reads of each?

Why: TEAL's sparse GEMV reads only the K rows whose input survives the threshold, a row-major gather.
At 50% the int4 kernels read Llama-3-8B's gate|up at ~1.2 TB/s where int4_mma streams the dense matrix
at ~2 TB/s (H100, results/int4_mma_2026_12_05c/), and the tensor-core sparse lab, whose warps read
64-128 B of each kept row, lost more. This measures the access pattern alone, with no arithmetic: each
program sums (int32, wrapping) a segment of SEG bytes of every kept row in its chunk of the sorted kept
list, so the table says which segment width, rows in flight and pipelining a sparse design needs to
read kept rows at the dense rate, before one is written.

Per Llama-3-8B matrix (row bytes = N x the format's bytes a weight) and sparsity (kept rows drawn
uniformly, sorted), µs a call from CUDA graphs over rotating copies (benchmarks/timing.py) and TB/s of
kept bytes; the best config of each segment width, and the dense read (every row) for scale.

    python -m benchmarks.gather_bandwidth --out benchmarks/results/gather_bandwidth/gb [--format int4]
"""
from __future__ import annotations

import argparse
import datetime
import sys
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from benchmarks.timing import MODEL_SHAPES, ROTATION_BYTES, graph_time_us
from files import write_report

BYTES_A_WEIGHT = {"int4": 0.5, "int8": 1, "bf16": 2}


class GatherConfig(NamedTuple):
    """A launch: bytes of each kept row a program reads, kept rows a loop step loads, kept rows a
    program walks, Triton's pipeline stages (1: none)."""
    segment: int
    block_rows: int
    chunk: int
    stages: int = 1


@triton.jit
def _gather_rows_kernel(w_ptr, rows_ptr, out_ptr, n_kept, width, chunk,
                        SEG: tl.constexpr, BLOCK_R: tl.constexpr, STAGES: tl.constexpr):
    """out[c, s * SEG + j] = the int32 sum of w[rows[i], s * SEG + j] over kept entries i of chunk c."""
    seg, c = tl.program_id(0), tl.program_id(1)
    cols = seg * SEG + tl.arange(0, SEG)
    acc = tl.zeros([BLOCK_R, SEG], tl.int32)
    first = c * chunk
    last = tl.minimum(first + chunk, n_kept)
    for r0 in tl.range(first, last, BLOCK_R, num_stages=STAGES):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = r < last
        row = tl.load(rows_ptr + r, mask=ok, other=0).to(tl.int64)
        acc += tl.load(w_ptr + row[:, None] * width + cols[None, :], mask=ok[:, None], other=0)
    tl.store(out_ptr + c.to(tl.int64) * width + cols, tl.sum(acc, axis=0))


def gather_rows(w: Tensor, rows: Tensor, config: GatherConfig, num_warps: int = 4) -> Tensor:
    """Per chunk of `config.chunk` entries of `rows` (int32, each < K), the int32 sum (wrapping) of those
    rows of w (int32 [K, W], contiguous; a segment of 4 * SEG-word bytes a program): [chunks, W]."""
    seg_words = config.segment // 4
    if (w.dtype != torch.int32 or w.dim() != 2 or not w.is_contiguous() or rows.dtype != torch.int32
            or rows.dim() != 1 or seg_words < 1 or seg_words & (seg_words - 1) or w.shape[1] % seg_words
            or config.block_rows & (config.block_rows - 1) or config.chunk < 1):
        raise ValueError(f"gather_rows needs int32 w [K, W] contiguous, int32 rows [R], a power-of-two segment of "
                         f"words dividing W and of rows a step; got w {w.dtype} {tuple(w.shape)}, rows {rows.dtype} "
                         f"{tuple(rows.shape)}, {config}")
    chunks = max(1, triton.cdiv(rows.numel(), config.chunk))
    out = torch.empty(chunks, w.shape[1], dtype=torch.int32, device=w.device)
    _gather_rows_kernel[(w.shape[1] // seg_words, chunks)](
        w, rows, out, rows.numel(), w.shape[1], config.chunk,
        SEG=seg_words, BLOCK_R=config.block_rows, STAGES=config.stages, num_warps=num_warps)
    return out


def gather_rows_reference(w: Tensor, rows: Tensor, chunk: int) -> Tensor:
    """gather_rows in torch: each chunk's rows summed in int64, wrapped to int32."""
    parts = [w[rows[i:i + chunk].long()].long().sum(dim=0) for i in range(0, max(rows.numel(), 1), chunk)]
    wrapped = (torch.stack(parts) + 2**31) % 2**32 - 2**31
    return wrapped.to(torch.int32)


def configs() -> list[GatherConfig]:
    """Segments of 64 B to 2 KB; 8-64 rows a step with 2-16 KB in registers a step; short and long chunks;
    with and without Triton's pipeline."""
    out = []
    for segment in (64, 128, 256, 512, 1024, 2048):
        for block_rows in (8, 16, 32, 64):
            if not 2048 <= block_rows * segment <= 16384:
                continue
            out += [GatherConfig(segment, block_rows, chunk, stages) for chunk in (32, 128, 512) for stages in (1, 3)]
    return out


def bench(fmt: str, sparsities: list[float]) -> list[dict]:
    """Per Llama-3-8B matrix and sparsity: every config's µs and TB/s (each checked against torch first)."""
    results = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        width = int(sum(splits) * BYTES_A_WEIGHT[fmt]) // 4  # int32 words a row
        g = torch.Generator(device="cuda").manual_seed(k)
        copies = [torch.randint(-2**31, 2**31 - 1, (k, width), generator=g, dtype=torch.int32, device="cuda")
                  for _ in range(max(2, min(16, -(-ROTATION_BYTES // (k * width * 4)))))]
        for sparsity in sparsities:
            kept = k - int(round(k * sparsity))
            rows = torch.randperm(k, generator=torch.Generator().manual_seed(1))[:kept].sort().values
            rows = rows.to(torch.int32).cuda()
            nbytes = kept * width * 4
            row = {"layer": layer, "K": k, "row_bytes": width * 4, "sparsity": sparsity, "kept": kept, "configs": []}
            references = {}  # by chunk
            for config in configs():
                if width % (config.segment // 4):
                    continue
                if config.chunk not in references:
                    references[config.chunk] = gather_rows_reference(copies[0].cpu(), rows.cpu(), config.chunk)
                if not torch.equal(gather_rows(copies[0], rows, config).cpu(), references[config.chunk]):
                    raise AssertionError(f"{layer} {sparsity} {config}: wrong sums")
                us = graph_time_us(lambda i, c=config: gather_rows(copies[i], rows, c), len(copies), rep=40)
                row["configs"].append({**config._asdict(), "us": us, "tb_s": nbytes / us / 1e6})
            results.append(row)
            best = max(row["configs"], key=lambda v: v["tb_s"])
            print(f"{layer} {sparsity:.2f}: best {best}", flush=True)
        del copies
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", choices=list(BYTES_A_WEIGHT), default="int4",
                   help="bytes a weight, which sets a row's width (default int4)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5],
                   help="fractions of rows skipped (default 0 0.5)")
    p.add_argument("--out", default="benchmarks/results/gather_bandwidth/gb",
                   help="OUT.json and OUT.md (default benchmarks/results/gather_bandwidth/gb)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gather_bandwidth needs a CUDA GPU", file=sys.stderr)
        return 1
    if any(not 0 <= s < 1 for s in args.sparsities):
        print(f"error: --sparsities take [0, 1), got {args.sparsities}", file=sys.stderr)
        return 1
    results = bench(args.format, args.sparsities)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "format": args.format}
    segments = sorted({c["segment"] for r in results for c in r["configs"]})
    lines = [f"# Kept rows read at each segment width ({meta['gpu']}, {meta['date']})", "",
             f"`{meta['command']}`; {args.format} row widths of the Llama-3-8B matrices; TB/s of kept bytes (µs) "
             "of the best config (rows a step, chunk, stages) at each segment width, CUDA graphs over rotating copies",
             "", "| matrix | row bytes | sparsity | " + " | ".join(f"{s} B" for s in segments) + " | best config |",
             "|---|---|---|" + "---|" * (len(segments) + 1)]
    for r in results:
        cells = []
        for s in segments:
            of_s = [c for c in r["configs"] if c["segment"] == s]
            best = max(of_s, key=lambda c: c["tb_s"]) if of_s else None
            cells.append(f"{best['tb_s']:.2f} ({best['us']:.1f})" if best else "")
        top = max(r["configs"], key=lambda c: c["tb_s"])
        lines.append(f"| {r['layer']} | {r['row_bytes']} | {r['sparsity']:.2f} | " + " | ".join(cells)
                     + f" | {top['segment']} B, {top['block_rows']} rows, chunk {top['chunk']}, "
                       f"stages {top['stages']} |")
    write_report(args.out, {"meta": meta, "rows": results}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
