"""The GPU's read bandwidth: the denominator of "share of the bandwidth" in the issues' targets.

BACKGROUND.md's 4.28 TB/s is the H200's. Other cards (the H100 lent most sessions) need their own, measured
the same way as the kernels: CUDA graphs over copies larger than L2 (benchmarks/timing.py). Three reads of
a buffer of `--gib` GiB, the fastest of which is the card's read bandwidth:

- ``triton_sum``: a Triton kernel that streams the buffer as int32 words, 16 bytes a load, and keeps one
  int32 sum a program (no arithmetic worth the name, one store a program);
- ``torch_sum``: torch's own reduction over the buffer viewed as float32;
- ``copy_half``: a copy of half the buffer into the other half, counted as read bytes only (what a
  copy's read side reaches while it writes as much).

    python -m benchmarks.read_bandwidth --out benchmarks/results/read_bandwidth/h100
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch
import triton
import triton.language as tl

from benchmarks.timing import graph_time_us
from files import write_report


@triton.jit
def _stream_sum_kernel(src_ptr, out_ptr, n_words, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Program p sums words [p * BLOCK * STEPS, (p + 1) * BLOCK * STEPS) of src (int32, wrapping)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for s in tl.range(0, STEPS, num_stages=3):
        offs = base + s * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n_words, other=0, cache_modifier=".cg")
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def measure(gib: float) -> list[dict]:
    n_words = int(gib * (1 << 30)) // 4
    buf = torch.randint(-(1 << 30), 1 << 30, (n_words,), dtype=torch.int32, device="cuda")
    block, steps = 2048, 16
    programs = triton.cdiv(n_words, block * steps)
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    half = n_words // 2
    reads = {
        "triton_sum": (lambda i: _stream_sum_kernel[(programs,)](buf, out, n_words, BLOCK=block, STEPS=steps,
                                                                  num_warps=8), 4 * n_words),
        "torch_sum": (lambda i: buf.view(torch.float32).sum(), 4 * n_words),
        "copy_half": (lambda i: buf[half:2 * half].copy_(buf[:half]), 4 * half),
    }
    rows = []
    for name, (fn, nbytes) in reads.items():
        us = graph_time_us(fn, 1)
        rows.append({"read": name, "gib": round(nbytes / (1 << 30), 3), "us": round(us, 1),
                     "tb_s": round(nbytes / us / 1e6, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="buffer size in GiB (far above L2; default 2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/read_bandwidth/read_bandwidth"),
                        help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if args.gib <= 0.1:
        parser.error(f"--gib must be above 0.1 (the buffer must dwarf L2), got {args.gib}")
    if not torch.cuda.is_available():
        raise SystemExit("error: read_bandwidth.py needs a CUDA GPU")
    rows = measure(args.gib)
    best = max(rows, key=lambda r: r["tb_s"])
    name = torch.cuda.get_device_name()
    lines = [f"# Read bandwidth ({name}, torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.date.today().isoformat()})", "",
             "| read | GiB read | µs | TB/s |", "|---|---|---|---|"]
    lines += [f"| {r['read']} | {r['gib']} | {r['us']} | {r['tb_s']} |" for r in rows]
    lines += ["", f"Read bandwidth: **{best['tb_s']} TB/s** ({best['read']})."]
    write_report(args.out, {"device": name, "gib": args.gib, "rows": rows, "read_tb_s": best["tb_s"]}, lines)


if __name__ == "__main__":
    main()
