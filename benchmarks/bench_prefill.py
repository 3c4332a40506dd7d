"""Dense quantized prefill: int8 and int4 matrices dequantized once into bf16 (teal::dequantize), then
cuBLAS; the GEMM that dequantizes tiles in registers (teal::quant_gemm, TEAL_QUANT_GEMM=1); and (up to
MAX_DOT_ROWS tokens) the Triton GEMV kernel reading the quantized weights, against the bf16 model's
cuBLAS GEMM and the float32 path, per Llama layer shape and prompt length (issue: an int4 prefill not
slower than bf16's).

    python -m benchmarks.bench_prefill [--models llama3-8b] [--tokens 128 512 2048] [--model Llama-3-8B] [--out OUT]

Times one call each (CUDA graphs over rotating weight copies, median; the float32 path by
triton.testing.do_bench, L2 flushed): `x @ w` in bf16; for int4-g<group> and int8, the dequantization
alone, dequantize + `x @ w` (what PackedLinear runs on CUDA past the kernel's rows), the dequantizing
GEMM (quant_gemm_triton at its heuristic config), the float32 path
(teal_kernels.reference.masked_product: a float32 copy of W, a float32 GEMM), and up to MAX_DOT_ROWS
tokens the kernel (sparse_gemv_triton at threshold 0, its tuned or heuristic config), and for int4
torch's tinygemm over a copy in its layout (teal_kernels/tinygemm.py: at which prompt lengths does it
beat dequantize + GEMM?);
each checked against the float32 path first. With `--model`, also a whole (eager) prefill of a
random-weight model of that shape at each prompt length: bf16, int4-g<group> and int8 as PackedLinear
routes them, int4-g<group> dequantized at every length, int4-g<group> through the dequantizing GEMM past
the kernel's rows, and the host's time to enqueue each. Writes
OUT.json (GPU, versions, date, command) and OUT.md, and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

from benchmarks.timing import MODEL_SHAPES, copies_for, graph_time_us, make_weight, make_x
from files import check_writable, write_report
from model import ModelArgs
from teal_kernels import ops
from teal_kernels.dequantize import GemmConfig, dequantize_triton, quant_gemm_triton
from teal_kernels.reference import MAX_BATCH, MAX_DOT_ROWS, masked_product
from teal_kernels.tinygemm import int4pack, int4pack_mm
from teal_kernels.triton_gemv import sparse_gemv_triton


# launches of the dequantizing GEMM that --gemm_configs times per shape: tiles, pipeline depth and
# register caps that let 2-3 programs share an SM (each waits for its own wgmma every step); K split
# as the heuristic splits it (quant_gemm_splits), two not split, to see what splitting buys, 64-column
# tiles (twice the tiles of q|k|v and o, which lose to dequantize + cuBLAS at 128 columns: fewer K
# splits; unmeasured), and (int4 only) the heuristic's three tiles with other int4 layouts than
# GemmConfig's default (4 bytes of a packed row a thread, a group's scales held in registers): 16 and
# 2 bytes a thread, scales loaded with every tile ("step") or a group ahead ("ahead");
# benchmarks/results/int4_vec_2026_12_05/
GEMM_CONFIGS = [GemmConfig(64, 128, 64, 4, 3), GemmConfig(64, 128, 64, 4, 3, 168), GemmConfig(64, 128, 64, 4, 4, 168),
                GemmConfig(64, 256, 64, 8, 3), GemmConfig(128, 128, 64, 8, 3), GemmConfig(128, 128, 64, 8, 3, 128),
                GemmConfig(128, 256, 64, 8, 3), GemmConfig(256, 128, 64, 8, 3), GemmConfig(256, 128, 64, 8, 4),
                GemmConfig(64, 128, 64, 4, 3, 168, 1), GemmConfig(128, 128, 64, 8, 3, 128, 1),
                GemmConfig(64, 64, 64, 4, 3, 168), GemmConfig(128, 64, 64, 8, 3, 128), GemmConfig(128, 64, 64, 4, 3)] + [
                GemmConfig(*tile, int4_vec=vec, int4_scales=where)
                for vec, where in ((16, "step"), (4, "step"), (2, "step"), (16, "group"), (4, "ahead"))
                for tile in ((64, 128, 64, 4, 3, 168), (128, 128, 64, 8, 3, 128), (256, 128, 64, 8, 3))]
_DEFAULT_INT4 = (GemmConfig._field_defaults["int4_vec"], GemmConfig._field_defaults["int4_scales"])


def gemm_configs_for(group: int) -> list[GemmConfig]:
    """The GEMM_CONFIGS entries a format runs: int4 those whose BLOCK_K divides its group, int8 (group
    0) those with int4's default layout and scale loads (the only ones that differ for it)."""
    if group:
        return [c for c in GEMM_CONFIGS if group % c.block_k == 0]
    return [c for c in GEMM_CONFIGS if (c.int4_vec, c.int4_scales) == _DEFAULT_INT4]


def time_us(fn, rep_ms: int = 50) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median") * 1e3


def bench_shape(k: int, n: int, m: int, formats: list[str], gemm_configs: bool = False) -> dict:
    """µs of the bf16 GEMM and, per quantized format, of its dequantization, dequantize + GEMM, the
    kernel (up to MAX_DOT_ROWS rows), the dequantizing GEMM (with `gemm_configs`, every GEMM_CONFIGS
    entry too) and the float32 path, for one [M, K] x [K, N]. All but the
    float32 path are replayed in CUDA graphs over rotating weight copies (benchmarks/timing.py): GPU
    time without the host's launch cost, weights read from memory, not L2."""
    x = make_x(m, k, torch.bfloat16, "cuda", seed=0)
    none = torch.zeros(1, dtype=torch.float32, device="cuda")
    bf16 = [make_weight("bf16", k, n, "cuda", seed=1 + i)[0] for i in range(copies_for(2 * k * n))]
    row = {"bf16_us": graph_time_us(lambda i: x @ bf16[i], len(bf16)),
           "bf16_host_us": host_us_per_call(lambda: x @ bf16[0])}
    del bf16
    for fmt in formats:
        copies = [make_weight(fmt, k, n, "cuda", seed=2)]
        nbytes = sum(t.numel() * t.element_size() for t in copies[0][:3] if t is not None)
        copies += [make_weight(fmt, k, n, "cuda", seed=2 + i) for i in range(1, copies_for(nbytes))]
        w, scales, zeros, group = copies[0]
        float32 = lambda: masked_product(x, w, none, [n], scales, zeros, group)  # noqa: E731
        dequantized = lambda i: dequantize_triton(*copies[i], torch.bfloat16)  # noqa: E731
        kernel = lambda i: sparse_gemv_triton(x, copies[i][0], none, [n], *copies[i][1:])  # noqa: E731
        gemm = lambda i: quant_gemm_triton(x, *copies[i])  # noqa: E731
        # int4: torch's tinygemm over a copy in its own layout (teal_kernels/tinygemm.py), bf16 scales
        packs = [int4pack(*c) for c in copies] if fmt.startswith("int4") else []
        tinygemm = lambda i: int4pack_mm(x, *packs[i], group)  # noqa: E731
        want = float32().float()
        configs = gemm_configs_for(group) if gemm_configs else []
        checks = ([("dequantize + GEMM", x @ dequantized(0)), ("dequantizing GEMM", gemm(0))]
                  + [(f"dequantizing GEMM {tuple(c)}", quant_gemm_triton(x, *copies[0], config=c)) for c in configs]
                  + ([("kernel", kernel(0))] if m <= MAX_DOT_ROWS else [])
                  + ([("tinygemm", tinygemm(0))] if packs else []))
        for name, got in checks:
            err = ((got.float() - want).abs().max() / want.abs().max()).item()
            if err > 1e-2:
                raise RuntimeError(f"{fmt} {name} differs from the float32 path by {err:.3g} (K={k} N={n} M={m})")
        row |= {f"{fmt}_dequantize_us": graph_time_us(dequantized, len(copies)),
                f"{fmt}_us": graph_time_us(lambda i: x @ dequantized(i), len(copies)),
                f"{fmt}_gemm_us": graph_time_us(gemm, len(copies)),
                f"{fmt}_float32_us": time_us(float32),
                # the host's side of an eager call: PackedLinear's route (ops.*, no custom-op dispatch
                # in eager) and the same through the custom op
                f"{fmt}_host_us": host_us_per_call(lambda: x @ ops.dequantize(w, scales, zeros, group, x.dtype)),
                f"{fmt}_op_host_us": host_us_per_call(
                    lambda: x @ torch.ops.teal.dequantize(w, scales, zeros, group, x.dtype))}
        if packs:
            row[f"{fmt}_tinygemm_us"] = graph_time_us(tinygemm, len(packs))
        if configs:
            row[f"{fmt}_gemm_configs_us"] = {
                str(tuple(c)): graph_time_us(lambda i, c=c: quant_gemm_triton(x, *copies[i], config=c), len(copies))
                for c in configs}
        if m <= MAX_DOT_ROWS:
            row |= {f"{fmt}_kernel_us": graph_time_us(kernel, len(copies)),
                    f"{fmt}_kernel_host_us": host_us_per_call(
                        lambda: ops.sparse_gemv(x, w, none, [n], scales, zeros, group)),
                    f"{fmt}_kernel_op_host_us": host_us_per_call(
                        lambda: torch.ops.teal.sparse_gemv(x, w, none, [n], scales, zeros, group, False, None, None,
                                                           0.0))}
        del copies, packs
    return row


def host_us_per_call(fn, calls: int = 100) -> float:
    """Median µs the host takes to enqueue one call of fn (host_ms over `calls` calls in a row)."""
    return host_ms(lambda: [fn() for _ in range(calls)]) * 1e3 / calls


def host_ms(fn, runs: int = 7) -> float:
    """Median ms the host takes to enqueue fn's kernels (the GPU idle before each call): where this
    is close to the call's time, the call is bound by the host, not the GPU."""
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[runs // 2]


@torch.no_grad()
def bench_model_prefill(name: str, tokens: list[int], formats: list[str]) -> list[dict]:
    """ms of one prefill (model forward over the prompt into the KV cache) per prompt length: the bf16
    model, then a model of each quantized format (random weights, quantized)."""
    from benchmarks.bench_decode import apply_weights
    from generate import random_model
    rows = [{"M": m} for m in tokens]
    from linear import packed_projections
    for fmt in ["bf16", *formats, f"{formats[0]} dequantize", f"{formats[0]} gemm"]:
        model = random_model(name, torch.bfloat16, "cuda")
        apply_weights(model, fmt.split()[0])
        for layer in packed_projections(model).values():
            if fmt.endswith("dequantize"):  # dequantize + cuBLAS past the decode batches
                layer.quantized_kernel_rows = MAX_BATCH
            # "gemm": teal::quant_gemm at every length (TEAL_QUANT_GEMM=1); "dequantize": never
            layer.quant_gemm_rows = sys.maxsize if fmt.endswith("gemm") else 0 if fmt.endswith("dequantize") \
                else layer.quant_gemm_rows
        model.setup_caches(1, max(tokens) + 8)
        for row in rows:
            prompt = torch.randint(model.config.vocab_size, (1, row["M"]), device="cuda")
            positions = torch.arange(row["M"], device="cuda")
            # eager: host-bound at short prompts and noisy, so a second of calls per median
            row[f"{fmt}_ms"] = time_us(lambda: model(prompt, positions), rep_ms=1000) / 1e3
            row[f"{fmt}_host_ms"] = host_ms(lambda: model(prompt, positions))
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama3-8b"], choices=list(MODEL_SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048], help="prompt lengths (M)")
    p.add_argument("--group_size", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--model", default=None, help="also time whole prefills of this shape (model.MODEL_CONFIGS)")
    p.add_argument("--gemm_configs", action="store_true",
                   help="also time the dequantizing GEMM at every GEMM_CONFIGS entry (the table gives the best)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/int4_prefill/dequantize"),
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
    formats = [f"int4-g{args.group_size}", "int8"]
    rows = []
    for model in args.models:
        for layer, k, splits in MODEL_SHAPES[model]:
            for m in args.tokens:
                rows.append({"model": model, "layer": layer, "K": k, "N": sum(splits), "M": m,
                             **bench_shape(k, sum(splits), m, formats, args.gemm_configs)})
                print(rows[-1], flush=True)
    lines = [f"# Quantized prefill: dequantize once + cuBLAS vs bf16 ({torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, triton {triton.__version__}, {datetime.date.today()})", "",
             f"`{' '.join(sys.argv)}`; µs per call, median, CUDA-graph replays (the float32 path: eager). Per "
             f"format: the dequantization alone / dequantize + GEMM (what a quantized prefill runs past the kernel's "
             f"rows) / the float32 path it replaced / the Triton kernel reading the quantized weights (up to "
             f"{MAX_DOT_ROWS} rows).", "",
             "| model | layer | M | bf16 | " + " | ".join(f"{f} dequantize | {f} | {f} / bf16 | {f} float32 | "
                                                        f"{f} kernel | its / bf16" for f in formats)
             + f" | {formats[0]} tinygemm | its / bf16 |",
             "|---|---|---|---|" + "---|---|---|---|---|---|" * len(formats) + "---|---|"]
    for r in rows:
        tinygemm = r[formats[0] + "_tinygemm_us"]
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['bf16_us']:.1f} | " + " | ".join(
            f"{r[f + '_dequantize_us']:.1f} | {r[f + '_us']:.1f} | {r[f + '_us'] / r['bf16_us']:.2f}x | "
            f"{r[f + '_float32_us']:.1f} | " + (f"{r[f + '_kernel_us']:.1f} | {r[f + '_kernel_us'] / r['bf16_us']:.2f}x"
                                               if f + "_kernel_us" in r else "- | -") for f in formats)
            + f" | {tinygemm:.1f} | {tinygemm / r['bf16_us']:.2f}x |")
    lines += ["", "The dequantizing GEMM (teal::quant_gemm, TEAL_QUANT_GEMM=1, its heuristic config) against "
              "dequantize + GEMM, µs:", "",
              "| model | layer | M | bf16 | " + " | ".join(f"{f} dequantize + GEMM | {f} GEMM | its / bf16 | "
                                                        f"{f} best config (µs)" for f in formats) + " |",
              "|---|---|---|---|" + "---|---|---|---|" * len(formats)]
    best = lambda times: min(times.items(), key=lambda kv: kv[1]) if times else None  # noqa: E731
    lines += [f"| {r['model']} | {r['layer']} | {r['M']} | {r['bf16_us']:.1f} | " + " | ".join(
        f"{r[f + '_us']:.1f} | {r[f + '_gemm_us']:.1f} | {r[f + '_gemm_us'] / r['bf16_us']:.2f}x | "
        + ("-" if not (b := best(r.get(f + "_gemm_configs_us"))) else f"{b[0]} {b[1]:.1f}") for f in formats)
        + " |" for r in rows]
    lines += ["", "Host time to enqueue one eager call, µs (100 calls in a row, median of 7): bf16 `x @ w`; per "
              "format dequantize + GEMM and the kernel, each as PackedLinear calls it (teal_kernels.ops, no "
              "custom-op dispatch in eager) / through the custom op:", "",
              "| layer | M | bf16 | " + " | ".join(f"{f} dequantize + GEMM | {f} kernel" for f in formats) + " |",
              "|---|---|---|" + "---|---|" * len(formats)]
    for r in rows:
        kernel_host = lambda f: (f"{r[f + '_kernel_host_us']:.1f} / {r[f + '_kernel_op_host_us']:.1f}"  # noqa: E731
                                 if f + "_kernel_host_us" in r else "-")
        lines.append(f"| {r['layer']} | {r['M']} | {r['bf16_host_us']:.1f} | " + " | ".join(
            f"{r[f + '_host_us']:.1f} / {r[f + '_op_host_us']:.1f} | {kernel_host(f)}" for f in formats) + " |")
    model_formats = [*formats, f"{formats[0]} dequantize", f"{formats[0]} gemm"]
    model_rows = bench_model_prefill(args.model, args.tokens, formats) if args.model else []
    if model_rows:
        lines += ["", f"Whole prefill (eager), {args.model} shape, random weights, ms; in brackets the host's time "
                  "to enqueue it:", "",
                  "| prompt tokens | bf16 | " + " | ".join(f"{f} | {f} / bf16" for f in model_formats) + " |",
                  "|---|---|" + "---|---|" * len(model_formats)]
        lines += [f"| {r['M']} | {r['bf16_ms']:.2f} ({r['bf16_host_ms']:.1f}) | " + " | ".join(
            f"{r[f + '_ms']:.2f} ({r[f + '_host_ms']:.1f}) | {r[f + '_ms'] / r['bf16_ms']:.2f}x" for f in model_formats)
                  + " |" for r in model_rows]
    data = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "results": rows,
            "model_prefill": model_rows}
    write_report(args.out, data, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
