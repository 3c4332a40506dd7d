"""Decode attention per layer call: Triton split-KV kernel vs SDPA, on a CUDA GPU.

    python benchmarks/bench_attention.py [--contexts 128 1024 4096] [--s_max 8192] [--layers 32]
                                         [--extra_num_splits 8 16 64] [--fused_tiles 32:4 16:4:16]

For each model shape (B=1, bf16) and context c (position p = c - 1) it first checks every
method against a float64 reference, then times, in µs per call:
  * triton        ``decode_attention`` (torch.ops.teal.decode_attention, default split count);
  * triton nN     the same kernels with N splits per (batch, KV head) (tuning aid);
  * sdpa_masked   F.scaled_dot_product_attention over the full static cache with a boolean
                  mask, enable_gqa=True: what model.py does today;
  * sdpa_prefix   SDPA over only the filled prefix k_cache[:, :, :c] (no mask);
  * fused_step, cublas_bytes: see ``unchecked_methods`` (timed, not checked here);
  * fused_step sS wW [nN]  the fused step's kernels with S positions a tile, W warps (and N splits)
                  (--fused_tiles), checked against fused_step's output.
Each time is one CUDA graph of ``--layers`` calls on different caches (so every call reads
cold memory; L2 is flushed between replays), divided by the number of calls.  ``floor`` is
the HBM time of the filled K and V of one layer at 4.28 TB/s.  Prints the table last;
writes $OUT/bench_attention.json when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from teal_kernels.attention import (MAX_SPLITS, decode_attention_step_triton, decode_attention_triton, default_block_s,
                                    default_num_splits)
from teal_kernels.ops import decode_attention, decode_attention_step

# name -> (H, Hkv, D)
MODELS: dict[str, tuple[int, int, int]] = {"Llama-3-8B": (32, 8, 128), "SmolLM2-135M": (9, 3, 64)}
HBM_TB_S = 4.28  # H200 HBM3e peak


def kv_floor_us(batch: int, n_kv: int, head_dim: int, context: int, elem_bytes: int = 2) -> float:
    """µs to read the filled K and V of one layer at HBM peak: the floor of any decode kernel."""
    return 2 * batch * n_kv * context * head_dim * elem_bytes / (HBM_TB_S * 1e12) * 1e6


def make_layers(n_layers: int, batch: int, n_head: int, n_kv: int, head_dim: int, s_max: int,
                dtype: torch.dtype, device: str, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """(q [B, H, D], k_cache, v_cache [B, Hkv, S_max, D]) per layer, all distinct memory."""
    g = torch.Generator(device=device).manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        q = (torch.randn(batch, n_head, head_dim, generator=g, device=device) * 2).to(dtype)
        k = torch.randn(batch, n_kv, s_max, head_dim, generator=g, device=device).to(dtype)
        v = torch.randn(batch, n_kv, s_max, head_dim, generator=g, device=device).to(dtype)
        layers.append((q, k, v))
    return layers


def default_splits(layers: list[tuple[torch.Tensor, ...]]) -> int:
    """The split count decode_attention picks for these shapes on this device."""
    q, k, _ = layers[0]
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    return default_num_splits(q.shape[0], k.shape[1], k.shape[2], default_block_s(q.shape[2], q.element_size()), sms)


def methods(layers: list[tuple[torch.Tensor, ...]], context: int, num_splits: list[int]
            ) -> dict[str, Callable[[int], torch.Tensor]]:
    """name -> step(i) computing layer i's attention, [B, H, D]; position p = context - 1."""
    device = layers[0][0].device
    s_max = layers[0][1].shape[2]
    pos = torch.tensor([context - 1], dtype=torch.int64, device=device)
    mask = (torch.arange(s_max, device=device) <= context - 1)[None, None, None, :]  # [1, 1, 1, S]
    gqa = layers[0][0].shape[1] != layers[0][1].shape[1]

    def triton_default(i: int) -> torch.Tensor:
        q, k, v = layers[i]
        return decode_attention(q, k, v, pos)

    def triton_splits(n: int) -> Callable[[int], torch.Tensor]:
        def step(i: int) -> torch.Tensor:
            q, k, v = layers[i]
            return decode_attention_triton(q, k, v, pos, num_splits=n)
        return step

    def sdpa_masked(i: int) -> torch.Tensor:
        q, k, v = layers[i]
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=gqa)[:, :, 0]

    def sdpa_prefix(i: int) -> torch.Tensor:
        q, k, v = layers[i]
        return F.scaled_dot_product_attention(q[:, :, None], k[:, :, :context], v[:, :, :context],
                                              enable_gqa=gqa)[:, :, 0]

    out = {"triton": triton_default}
    out.update({f"triton n{n}": triton_splits(n) for n in num_splits
                if n != default_splits(layers) and 1 <= n <= MAX_SPLITS})
    out.update({"sdpa_masked": sdpa_masked, "sdpa_prefix": sdpa_prefix})
    return out


def unchecked_methods(layers: list[tuple[torch.Tensor, ...]], context: int, fused_tiles: list[tuple[int, int]]
                      ) -> dict[str, Callable[[int], torch.Tensor]]:
    """Timed beside ``methods`` but not compared with its float64 reference:
      * fused_step   ``decode_attention_step`` (the fused decode step's op: RoPE, the cache write at p
                     and attention; under PDL its first K/V tile loads before its wait) on a random
                     q|k|v row per layer: it writes position p of the caches (the same values every
                     call); ``fused_step sS wW`` runs it with S positions a tile and W warps;
      * cublas_bytes cuBLAS reading the same bytes as a [1, context] x [context, 2 Hkv D B] product
                     per layer (no attention): what streaming the filled K and V costs at best."""
    q0, k0, _ = layers[0]
    batch, n_head, head_dim = q0.shape
    n_kv, device = k0.shape[1], q0.device
    g = torch.Generator(device=device).manual_seed(1)
    rows = [torch.randn(batch, (n_head + 2 * n_kv) * head_dim, generator=g, device=device).to(q0.dtype)
            for _ in layers]
    freqs = torch.randn(head_dim // 2, 2, generator=g, device=device)
    pos = torch.tensor([context - 1], dtype=torch.int64, device=device)
    x = torch.randn(1, context, generator=g, device=device).to(q0.dtype)
    weights = [torch.randn(context, 2 * n_kv * head_dim * batch, generator=g, device=device).to(q0.dtype)
               for _ in layers]

    def fused_step(i: int) -> torch.Tensor:
        _, k, v = layers[i]
        return decode_attention_step(rows[i], freqs, k, v, pos, n_head)

    def fused_tile(block_s: int, warps: int, splits: int | None) -> Callable[[int], torch.Tensor]:
        def step(i: int) -> torch.Tensor:
            _, k, v = layers[i]
            return decode_attention_step_triton(rows[i], freqs, k, v, pos, n_head, block_s=block_s, num_warps=warps,
                                                num_splits=splits)
        return step

    out = {"fused_step": fused_step}
    for block_s, warps, splits in fused_tiles:
        out[f"fused_step s{block_s} w{warps}" + (f" n{splits}" if splits else "")] = fused_tile(block_s, warps, splits)
    return out | {"cublas_bytes": lambda i: x @ weights[i]}


def check_fused_tiles(steps: dict[str, Callable[[int], torch.Tensor]]) -> None:
    """Each ``fused_step sS wW`` against ``fused_step`` on layer 0: within bf16 rounding (2^-6 of the
    largest output: two roundings of the probabilities in different orders); raises otherwise."""
    variants = {name: step for name, step in steps.items() if name.startswith("fused_step ")}
    if not variants:
        return
    want = steps["fused_step"](0).float()
    for name, step in variants.items():
        err = (step(0).float() - want).abs().max().item()
        if err > 2.0**-6 * want.abs().max().item():
            raise AssertionError(f"{name}: max difference {err:.3g} from fused_step")


def parse_tile(text: str) -> tuple[int, int, int | None]:
    """'S:W[:N]' -> (positions a tile, warps, splits or None for the default) for --fused_tiles."""
    try:
        block_s, warps, *rest = (int(v) for v in text.split(":"))
        (splits,) = rest or (None,)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected POSITIONS:WARPS[:SPLITS] such as 32:4 or 16:4:16, "
                                         f"got {text!r}") from None
    if (block_s < 16 or block_s & (block_s - 1) or warps not in (1, 2, 4, 8, 16)
            or (splits is not None and not 1 <= splits <= MAX_SPLITS)):
        raise argparse.ArgumentTypeError(f"positions must be a power of two >= 16, warps 1-16 (a power of two) "
                                         f"and splits 1-{MAX_SPLITS}, got {text!r}")
    return block_s, warps, splits


def reference64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, sum_s prob_s * |v_s|) in float64 over positions 0..context-1, GQA by h // G."""
    group = q.shape[1] // k.shape[1]
    kk = k[:, :, :context].double().repeat_interleave(group, dim=1)
    vv = v[:, :, :context].double().repeat_interleave(group, dim=1)
    probs = torch.softmax(torch.einsum("bhd,bhsd->bhs", q.double(), kk) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs, vv), torch.einsum("bhs,bhsd->bhd", probs, vv.abs())


def check_correctness(steps: dict[str, Callable[[int], torch.Tensor]], layers: list[tuple[torch.Tensor, ...]],
                      context: int) -> dict[str, float]:
    """Max |error| against float64 per method, plus triton against sdpa_prefix.

    Raises if a Triton method is off by more than bf16 rounding allows: output rounding
    (2^-7 relative, covers truncation) plus one bf16 rounding of the probabilities
    (2^-7 * sum p|v|); SDPA's own errors are only recorded.  Also checks that NaN in the
    cache beyond p does not change the Triton output.
    """
    q, k, v = layers[0]
    ref, mag = reference64(q, k, v, context)
    outs = {name: step(0) for name, step in steps.items()}
    errors = {}
    for name, out in outs.items():
        err = (out.double() - ref).abs()
        errors[name] = err.max().item()
        bad = ~(err <= 2.0**-7 * (ref.abs() + mag) + 1e-6)
        if name.startswith("triton") and bad.any():
            raise AssertionError(f"{name} at context {context}: max error {errors[name]:.3g}, "
                                 f"{int(bad.sum())} elements out of bounds")
    errors["triton_vs_sdpa_prefix"] = (outs["triton"].float() - outs["sdpa_prefix"].float()).abs().max().item()
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:, :, context:] = float("nan")
    v_nan[:, :, context:] = float("nan")
    pos = torch.tensor([context - 1], device=q.device)
    if not torch.equal(decode_attention(q, k_nan, v_nan, pos), outs["triton"]):
        raise AssertionError(f"triton at context {context}: NaN beyond the position changed the output")
    return errors


def graph_time_us(step: Callable[[int], object], n_calls: int) -> float:
    """Median µs per call of step(0..n_calls-1) replayed as one CUDA graph (L2 flushed between replays)."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: JIT compilation, cuDNN plans
        for i in range(n_calls):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_calls):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    del graph
    return ms * 1e3 / n_calls


def format_table(rows: list[dict]) -> str:
    """Markdown table: one line per (model, context), µs per call for each method."""
    names = list(dict.fromkeys(n for r in rows for n in r["us"]))
    head = ["model", "context", "floor µs", *[f"{n} µs" for n in names], "masked / triton"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["context"]), f"{r['floor_us']:.2f}"]
        cells += [f"{r['us'][n]:.2f}" if n in r["us"] else "-" for n in names]
        ratio = r["us"].get("sdpa_masked", math.nan) / r["us"].get("triton", math.nan)
        cells.append(f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 1024, 4096])
    ap.add_argument("--s_max", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32, help="calls per CUDA graph, each on its own cache")
    ap.add_argument("--extra_num_splits", nargs="*", type=int, default=[8, 16, 64],
                    help="also time the kernel with these split counts (the default one is always timed)")
    ap.add_argument("--fused_tiles", nargs="*", type=parse_tile, default=[], metavar="S:W[:N]",
                    help="also time the fused step's kernels with S positions a K/V tile, W warps and N splits "
                         "(the defaults: 16 positions where the cache holds at most 1024, else 16 KB of K a tile, "
                         "64 positions at D = 128; 4 warps; default_num_splits)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bad = [c for c in args.contexts if not 1 <= c <= args.s_max]
    if bad:
        print(f"error: contexts must lie in 1..{args.s_max}, got {bad}", file=sys.stderr)
        return 2

    import triton

    rows = []
    for model in args.models:
        n_head, n_kv, head_dim = MODELS[model]
        layers = make_layers(args.layers, args.batch, n_head, n_kv, head_dim, args.s_max, torch.bfloat16, "cuda")
        for context in args.contexts:
            steps = methods(layers, context, args.extra_num_splits)
            errors = check_correctness(steps, layers, context)
            steps.update(unchecked_methods(layers, context, args.fused_tiles))
            check_fused_tiles(steps)
            us = {name: graph_time_us(step, args.layers) for name, step in steps.items()}
            row = {"model": model, "H": n_head, "Hkv": n_kv, "D": head_dim, "batch": args.batch,
                   "s_max": args.s_max, "context": context, "num_splits": default_splits(layers),
                   "floor_us": kv_floor_us(args.batch, n_kv, head_dim, context), "us": us, "max_abs_error": errors}
            rows.append(row)
            print(f"{model} context {context}: " + ", ".join(f"{n} {t:.2f} µs" for n, t in us.items()), flush=True)
        del layers
        torch.cuda.empty_cache()

    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "bench_attention.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "date": datetime.date.today().isoformat(),
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                "hbm_tb_s": HBM_TB_S, "dtype": "bf16", "layers_per_graph": args.layers}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {out}")
    print()
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
