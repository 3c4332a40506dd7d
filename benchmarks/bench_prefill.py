"""Dense int4 prefill: the Triton int4 GEMM against the default dequantize-and-multiply path and the
bf16 model's cuBLAS GEMM, per Llama layer shape and prompt length (issue: an int4 prefill not
slower than bf16's).

    python -m benchmarks.bench_prefill [--models llama3-8b] [--tokens 128 512 2048] [--model Llama-3-8B] [--out OUT]

Times one call each (triton.testing.do_bench, median, L2 flushed): `x @ w_t` in bf16, the int4
default path (teal_kernels.reference.masked_product: a float32 copy of W, a float32 GEMM) and
`int4_gemm_triton` at a few tile configs, each checked against the default path first. With
`--model`, also a whole prefill of a random-weight model of that shape at each prompt length: bf16,
int4-g<group> on the default path, int4 with the int4 GEMM (what TEAL_INT4_GEMM=1 selects). Writes
OUT.json (GPU, versions, date, command) and OUT.md, and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.testing

from benchmarks.timing import MODEL_SHAPES, make_weight, make_x
from files import check_writable, write_report
from model import ModelArgs
from teal_kernels.reference import masked_product
from teal_kernels.triton_gemv import int4_gemm_fits, int4_gemm_triton

# (block_m, block_k, num_warps, num_stages): the default first
CONFIGS = [(64, 64, 8, 3), (64, 32, 4, 3), (32, 64, 4, 3), (128, 64, 8, 3), (64, 64, 8, 4)]


def time_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") * 1e3


def bench_shape(k: int, n: int, m: int, group: int) -> dict:
    """µs of the bf16 GEMM, the int4 default path and each int4 GEMM config for one [M, K] x [K, N]."""
    x = make_x(m, k, torch.bfloat16, "cuda", seed=0)
    w_bf16 = make_weight("bf16", k, n, "cuda", seed=1)[0]
    w, scales, zeros, _ = make_weight(f"int4-g{group}", k, n, "cuda", seed=2)
    none = torch.zeros(1, dtype=torch.float32, device="cuda")
    want = masked_product(x, w, none, [n], scales, zeros, group).float()
    row = {"bf16_us": time_us(lambda: x @ w_bf16),
           "int4_default_us": time_us(lambda: masked_product(x, w, none, [n], scales, zeros, group))}
    for bm, bk, nw, st in CONFIGS:
        run = lambda: int4_gemm_triton(x, w, scales, zeros, group, bm, bk, nw, st)  # noqa: E731
        err = ((run().float() - want).abs().max() / want.abs().max()).item()
        if err > 1e-2:
            raise RuntimeError(f"int4_gemm_triton {bm}x{bk} w{nw} s{st} differs from the reference by {err:.3g} (K={k} N={n} M={m})")
        row[f"int4_gemm_{bm}x{bk}_w{nw}_s{st}_us"] = time_us(run)
    return row


@torch.no_grad()
def bench_model_prefill(name: str, tokens: list[int], group: int) -> list[dict]:
    """ms of one prefill (model forward over the prompt into the KV cache) per prompt length: the bf16
    model, then the same weights in int4 without and with the int4 GEMM."""
    from benchmarks.bench_decode import apply_weights
    from generate import random_model
    from linear import packed_projections
    model = random_model(name, torch.bfloat16, "cuda")
    model.setup_caches(1, max(tokens) + 8)
    prompts = {m: torch.randint(model.config.vocab_size, (1, m), device="cuda") for m in tokens}
    rows = [{"M": m, "bf16_ms": time_us(lambda: model(prompts[m], torch.arange(m, device="cuda"))) / 1e3}
            for m in tokens]
    apply_weights(model, f"int4-g{group}")
    layers = packed_projections(model).values()
    for use in (False, True):
        for layer in layers:
            layer.int4_gemm_allowed = use
        for row in rows:
            m = row["M"]
            key = "int4_gemm_ms" if use else "int4_default_ms"
            row[key] = time_us(lambda: model(prompts[m], torch.arange(m, device="cuda"))) / 1e3
    del model
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(MODEL_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048], help="prompt lengths (M)")
    p.add_argument("--group_size", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--model", default=None, help="also time whole prefills of this shape (model.MODEL_CONFIGS)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefill/int4_gemm"),
                   help="output prefix: OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:  # bad arguments fail now, not after minutes of timing
        if min(args.tokens) < 1:
            raise ValueError(f"--tokens must be positive, got {args.tokens}")
        if args.model:
            ModelArgs.from_name(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_prefill needs a CUDA GPU", file=sys.stderr)
        return 1
    for suffix in (".json", ".md"):
        check_writable(args.out.with_suffix(suffix))
    rows = []
    for model in args.models:
        for layer, k, splits in MODEL_SHAPES[model]:
            n = sum(splits)
            if not int4_gemm_fits(k, n, args.group_size):
                continue
            for m in args.tokens:
                rows.append({"model": model, "layer": layer, "K": k, "N": n, "M": m,
                             **bench_shape(k, n, m, args.group_size)})
                print(rows[-1], flush=True)
    best = lambda r: min(v for key, v in r.items() if key.startswith("int4_gemm_"))  # noqa: E731
    lines = [f"# int4-g{args.group_size} prefill GEMM vs bf16 ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, triton {triton.__version__}, {datetime.date.today()})", "",
             f"`{' '.join(sys.argv)}`; µs per call, median; int4 GEMM: the default config / the best of "
             f"{len(CONFIGS)}", "",
             "| model | layer | M | bf16 cuBLAS | int4 default (dequantize, fp32 GEMM) | int4 GEMM default | best | best / bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    first = "int4_gemm_{}x{}_w{}_s{}_us".format(*CONFIGS[0])
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['bf16_us']:.1f} | {r['int4_default_us']:.1f} | "
                     f"{r[first]:.1f} | {best(r):.1f} | {best(r) / r['bf16_us']:.2f}x |")
    model_rows = bench_model_prefill(args.model, args.tokens, args.group_size) if args.model else []
    if model_rows:
        lines += ["", f"Whole prefill, {args.model} shape, random weights, ms:", "",
                  "| prompt tokens | bf16 | int4 default | int4 GEMM | int4 GEMM / bf16 |", "|---|---|---|---|---|"]
        lines += [f"| {r['M']} | {r['bf16_ms']:.2f} | {r['int4_default_ms']:.2f} | {r['int4_gemm_ms']:.2f} | "
                  f"{r['int4_gemm_ms'] / r['bf16_ms']:.2f}x |" for r in model_rows]
    data = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "configs": CONFIGS, "results": rows, "model_prefill": model_rows}
    write_report(args.out, data, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
