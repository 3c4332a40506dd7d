"""Does a row's product depend on how many rows are multiplied with it?

Greedy self-speculation gives plain greedy's tokens only if the verify step's K + 1 rows round as
the plain step's single row does (issue 13). For each projection shape in bf16 this multiplies
x [M, K] by W [K, N] at once and each row alone, with the dense path's product (`x @ W`: cuBLAS on
a GPU, the CPU's BLAS), with nn.Linear's F.linear over W [N, K] (the GPU's lm_head), and with our
kernel (teal::sparse_gemv, zero thresholds), and with torch's tinygemm over random int4 weights (an
int4 model's dense decode calls under TEAL_INT4_TINYGEMM) and through int4_mma's copy of the same
weights on CUDA (TEAL_INT4_MMA), and reports the share of output elements whose bits
differ and the largest difference relative to the value (in bf16's epsilon, 2^-7).

    python -m benchmarks.batch_rows --out benchmarks/results/batch_rows/llama3_8b
"""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from files import write_report
from linear import int4_mma_scale_dtype
from teal_kernels import sparse_gemv
from teal_kernels import int4_mma as mma
from teal_kernels.tinygemm import int4pack, int4pack_fits, int4pack_mm

SHAPES = {  # [K, N] of the decode products
    "Llama-3-8B": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
                   "lm_head": (4096, 128256)},
    "SmolLM2-135M": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
                     "lm_head": (576, 49152)},
}


def row_by_row_difference(product: Callable[[Tensor], Tensor], x: Tensor) -> tuple[float, float]:
    """(share of elements that differ, largest difference in bf16 epsilons of the value) between
    product(x) and the rows of product(x[i:i + 1]) stacked."""
    together = product(x)
    alone = torch.cat([product(x[i:i + 1]) for i in range(x.shape[0])])
    differ = together != alone
    ulp = torch.finfo(torch.bfloat16).eps * alone.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    worst = ((together.float() - alone.float()).abs() / ulp).max().item()
    return differ.float().mean().item(), worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(SHAPES), default="Llama-3-8B")
    p.add_argument("--rows", type=int, default=5, help="M: the verify step's K + 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/batch_rows/llama3_8b"),
                   help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if not 2 <= args.rows <= 8:
        p.error("--rows must be in 2..8 (the decode kernel takes up to 8 rows)")
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for name, (k, n) in SHAPES[args.model].items():
        w = (torch.randn(k, n, generator=gen, device=args.device) / k ** 0.5).bfloat16()
        x = torch.randn(args.rows, k, generator=gen, device=args.device).bfloat16()
        no_thresholds = torch.zeros(1, device=args.device)
        w_nk = w.t().contiguous()  # nn.Linear's layout (the GPU's lm_head)
        ways = {"x @ W (dense path)": lambda v: v @ w,
                "F.linear, W [N, K] (nn.Linear)": lambda v: torch.nn.functional.linear(v, w_nk),
                "teal::sparse_gemv, thresholds 0": lambda v: sparse_gemv(v, w, no_thresholds, [n])}
        if int4pack_fits(k, n, 128, torch.bfloat16):  # random int4 weights through the tinygemm copy
            codes = torch.randint(0, 256, (k, n // 2), generator=gen, device=args.device, dtype=torch.uint8)
            scales = torch.rand(k // 128, n, generator=gen, device=args.device) * 0.02 / k ** 0.5
            pack = int4pack(codes, scales, torch.zeros_like(scales), 128)
            ways["tinygemm int4-g128 (TEAL_INT4_TINYGEMM)"] = lambda v: int4pack_mm(v, *pack, 128)
            if args.device == "cuda" and mma.fits(k, n, 128, torch.bfloat16) and mma.available():
                # the same weights, the copy the product packs
                copy = mma.pack(codes, scales, torch.zeros_like(scales), scale_dtype=int4_mma_scale_dtype())
                ways["int4_mma int4-g128 (TEAL_INT4_MMA)"] = lambda v: mma.int4_mma(v, *copy)
        for way, product in ways.items():
            share, worst = row_by_row_difference(product, x)
            rows.append({"shape": name, "k": k, "n": n, "way": way, "differ": share, "max_eps": worst})
            print(rows[-1], flush=True)
        del w, w_nk
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "device": device,
            "torch": torch.__version__, "rows": args.rows, "model": args.model}
    lines = [f"# One row alone against {args.rows} rows at once, bf16, {args.model} shapes ({device}, "
             f"torch {meta['torch']}, {meta['date']})", "",
             f"`python -m benchmarks.batch_rows --model {args.model} --rows {args.rows}`", "",
             "| shape [K, N] | product | elements that differ | largest difference (bf16 eps of the value) |", "|---|---|---|---|"]
    lines += [f"| {r['shape']} [{r['k']}, {r['n']}] | {r['way']} | {r['differ']:.2%} | {r['max_eps']:.1f} |"
              for r in rows]
    write_report(args.out, {"meta": meta, "rows": rows}, lines)


if __name__ == "__main__":
    main()
