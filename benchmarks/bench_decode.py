"""End-to-end decode speed: a model of a named shape with random weights, dense vs TEAL levels.

No checkpoint needed (real 8B weights cannot reach the benchmark GPU). Thresholds are calibrated
on the model's own activations over random tokens (uniform allocation, dense-model quantiles), so
the realized sparsity is the one asked for. Each setting: decode compiled with CUDA graphs
(`torch.compile(mode="reduce-overhead", fullgraph=True)`), `--runs` runs of `--tokens` tokens
after a warm-up, median reported. Writes JSON + Markdown; benchmarks/plot_decode.py draws the PNG.
Under `torchrun --nproc_per_node N` the model is split over N GPUs (tp.py): tok/s are the group's,
GB/s all ranks' bytes, and the dense baseline is PackedLinear's cuBLAS product (nn.Linear is not
sharded); thresholds are calibrated on the whole model before sharding.
`--baselines` adds dense rows of gpt-fast's int8 / int4 weight-only method on torch's own kernels
(benchmarks/baselines.py), timed the same way but compiled under gpt-fast's Inductor setting
(baselines.GPT_FAST_INDUCTOR; rows before 2026-12-04's twentieth session were compiled without it),
so our formats are compared with it in one run.
`--switches` A/Bs decode switches in one process: each entry's TEAL_* variables are set while a fresh
model of each format is built, installed and timed, the entries alternating `--rounds` times (one
bf16 and gpt-fast baseline for all, no process start or baseline between the variants).

    python benchmarks/bench_decode.py --model Llama-3-8B --weights bf16 int8 int4-g128
    python benchmarks/bench_decode.py --model Llama-3-8B --weights int8 int4-g128 --baselines torch-int8 torch-int4-g128
    python benchmarks/bench_decode.py --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused \
        --switches TEAL_INT4_MMA_NORM_STATS=0 TEAL_INT4_MMA_NORM_STATS=1 --rounds 2
    torchrun --nproc_per_node 2 benchmarks/bench_decode.py --model Llama-3-8B --weights bf16
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import tp
from benchmarks.baselines import BASELINES, GPT_FAST_INDUCTOR, KERNELS, apply_torch_baseline
from generate import Sampling, decode_one_token, random_model, self_calibrated_thresholds, weight_bytes_per_token
from decode import install_fused_decode
from model import ModelArgs, Transformer


HEAD_SUFFIXES = {"": None, "lm_head": "int8", "lm_head_int4": "int4"}  # --weights' +suffix -> the head's format


def parse_weights(weights: str) -> tuple[str, int, str | None]:
    """A --weights value (bf16, int8 or int4-gN, optionally +lm_head after int8/int4, +lm_head_int4 after
    int4) -> (format, int4 group size or 0, the head's quantized format or None)."""
    fmt, _, suffix = weights.partition("+")
    mode, _, group = fmt.partition("-g")
    if suffix not in HEAD_SUFFIXES or (mode == "bf16" and suffix) or (suffix == "lm_head_int4" and mode != "int4"):
        sys.exit(f"error: --weights {weights!r}: expected bf16, int8 or int4-g<G>, optionally +lm_head after "
                 "int8/int4 or +lm_head_int4 after int4")
    return mode, int(group or 128) if mode == "int4" else 0, HEAD_SUFFIXES[suffix]


def apply_weights(model: Transformer, weights: str) -> None:
    """bf16 (as built), int8, or int4-gN weight-only quantization of the projections; a "+lm_head"
    suffix (e.g. int4-g128+lm_head) also stores lm_head in int8, "+lm_head_int4" in the projections'
    int4 format (gpt-fast's int4 baseline quantizes its head so)."""
    mode, group, lm_head = parse_weights(weights)
    if mode == "bf16":
        return
    from quantize import quantize_model
    quantize_model(model, mode, group, lm_head=lm_head)


def parse_switches(entry: str) -> dict[str, str]:
    """A --switches entry, "NAME=VALUE[,NAME=VALUE...]" of TEAL_* variables or "-" (none) -> the variables."""
    if entry == "-":
        return {}
    pairs = [item.partition("=") for item in entry.split(",")]
    if any(not name.startswith("TEAL_") or not sep or not value for name, sep, value in pairs):
        sys.exit(f"error: --switches {entry!r}: expected TEAL_NAME=VALUE[,TEAL_NAME=VALUE...] or -")
    return {name: value for name, _, value in pairs}


@contextlib.contextmanager
def switched(variables: dict[str, str]):
    """The environment with `variables` set, restored after (the switches are read as a model is
    installed and its step traced, both inside)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def set_level(model: Transformer, level: float, calib_tokens: int, thresholds: dict | None = None) -> None:
    """Dense at level 0, else TEAL at `level` with `thresholds`, self-calibrated here if not given
    (a sharded model needs them from the whole model: a shard sees a slice of o's and down's inputs)."""
    from teal import densify, sparsify
    if level == 0:
        densify(model)
    else:
        thresholds = thresholds or self_calibrated_thresholds(model, level, calib_tokens)
        sparsify(model, thresholds, targets={name: [level] * len(t) for name, t in thresholds.items()})


@torch.no_grad()
def time_decode(model: Transformer, step, n_tokens: int, runs: int, prompt_len: int = 16) -> list[float]:
    """tok/s of `runs` timed decodes of n_tokens each (greedy, no per-token host sync)."""
    device = model.norm.weight.device
    model.setup_caches(1, prompt_len + n_tokens + 8)
    prompt = torch.randint(model.config.vocab_size, (1, prompt_len), device=device)
    results = []
    for r in range(runs + 1):  # run 0 warms up (compilation, graph capture)
        token = model(prompt, torch.arange(prompt_len, device=device))[:, -1:].argmax(-1)
        pos = torch.tensor([prompt_len], device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_tokens if r else 8):
            token = step(model, token, pos, Sampling()).clone()
            pos += 1
        torch.cuda.synchronize()
        if r:
            results.append(n_tokens / (time.perf_counter() - t0))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3-8B", help="shape from model.MODEL_CONFIGS")
    p.add_argument("--weights", nargs="+", default=["bf16"],
                   help="bf16, int8, int4-g128, int8+lm_head (int8 head too), int4-g128+lm_head_int4 (int4 "
                        "head too) ... (each one run)")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0, 0.25, 0.4, 0.5, 0.65])
    p.add_argument("--tokens", type=int, default=256, help="decoded tokens per timed run")
    p.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--calib_tokens", type=int, default=2048, help="random tokens for calibration")
    p.add_argument("--decode_path", nargs="+", choices=["reference", "fused"], default=["reference"],
                   help="model.py's decode step and/or decode.py's fused one (attention op, GEMV "
                        "prologue/epilogue fusions); each one run per setting")
    p.add_argument("--baselines", nargs="+", choices=list(BASELINES), default=[],
                   help="also time gpt-fast's weight-only int8 / int4-gN on torch's kernels, dense "
                        "(one GPU only)")
    p.add_argument("--switches", nargs="+", default=None, metavar="NAME=V[,NAME=V]",
                   help="decode switches to compare in this process: each entry's TEAL_* variables ('-' for "
                        "none) set for a fresh model of each format, entries alternating")
    p.add_argument("--rounds", type=int, default=1, help="with --switches: passes over its entries (default 1)")
    p.add_argument("--bf16_baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="time the dense bf16 model first, the table's 'vs dense bf16' reference (default on; "
                        "--no-bf16_baseline saves its compile and timing in an A/B that does not need it)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode"),
                   help="output prefix: writes <out>.json, <out>.md (and <out>.png)")
    args = p.parse_args()
    variants = [parse_switches(e) for e in args.switches] if args.switches else [None]
    if args.rounds < 1:
        sys.exit(f"error: --rounds must be at least 1, got {args.rounds}")
    if not torch.cuda.is_available():
        sys.exit("error: bench_decode.py needs a CUDA GPU")
    tp.print_from_rank_zero()
    world = tp.env_world_size()
    if args.baselines and world > 1:
        sys.exit("error: --baselines runs on one GPU (torch's int8 / int4pack modules are not sharded)")
    try:  # before any work: a shape or int4 group size the ranks cannot split
        tp.check_layout(ModelArgs.from_name(args.model), world, max(parse_weights(w)[1] for w in args.weights))
    except ValueError as e:
        sys.exit(f"error: {e}")
    with tp.process_group(torch.device("cuda")) as device:
        rows = measure(args, device, world, variants)
        if tp.env_rank() == 0:
            write_results(args, rows, world)


def measure(args: argparse.Namespace, device: torch.device, world: int,
            variants: list[dict[str, str] | None]) -> list[dict]:
    """Every row of the table: the dense baseline, gpt-fast's baselines if asked, then each weight
    format x (round x switches variant, where --switches is given) x decode path x level."""
    torch._dynamo.config.cache_size_limit = 64  # one graph per model object and setting
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    rows = []
    if args.bf16_baseline:
        model = random_model(args.model, torch.bfloat16, device)
        if tp.launched():
            tp.shard_model(model)  # packs the projections: the baseline is PackedLinear's dense cuBLAS product
        baseline = statistics.median(time_decode(model, step, args.tokens, args.runs))
        path = "PackedLinear dense (cuBLAS)" if tp.launched() else "nn.Linear (cuBLAS)"
        rows.append(dict(weights="bf16", sparsity=0.0, path=path, realized=0.0, tok_s=baseline,
                         gb_s=weight_bytes_per_token(model) * baseline / 1e9))
        print(rows[-1], flush=True)
        del model
    for name in args.baselines:
        kind, group = BASELINES[name]
        model = apply_torch_baseline(random_model(args.model, torch.bfloat16, device), kind, group)
        with torch._inductor.config.patch(**GPT_FAST_INDUCTOR):  # compiled on its first call, in here
            tok_s = statistics.median(time_decode(model, step, args.tokens, args.runs))
        rows.append(dict(weights=f"{name} (gpt-fast style)", sparsity=0.0, path=KERNELS[kind], realized=0.0,
                         tok_s=tok_s, gb_s=weight_bytes_per_token(model) * tok_s / 1e9))
        print(rows[-1], flush=True)
    for weights in args.weights:
        calibrated = None  # the seeded weights are the same in every variant: calibrated once
        for variables in [v for _ in range(args.rounds) for v in variants]:
            with switched(variables or {}):
                if variables is not None:  # traced afresh: a graph of the same structure could pass the guards
                    torch._dynamo.reset()  # of another variant's (switches read while tracing are not guarded)
                model = random_model(args.model, torch.bfloat16, device)
                apply_weights(model, weights)
                calibrated = calibrated or {level: self_calibrated_thresholds(model, level, args.calib_tokens)
                                            for level in args.sparsity if level > 0}
                if tp.launched():
                    tp.shard_model(model)
                for path in sorted(args.decode_path, reverse=True):  # "reference" before "fused"
                    if path == "fused":
                        install_fused_decode(model)
                    for level in args.sparsity:
                        set_level(model, level, args.calib_tokens, calibrated.get(level))
                        realized = realized_on(model, level)
                        tok_s = statistics.median(time_decode(model, step, args.tokens, args.runs))
                        rows.append(dict(weights=weights, sparsity=level, path=f"PackedLinear, {path} decode",
                                         realized=realized, tok_s=tok_s,
                                         gb_s=weight_bytes_per_token(model, realized) * tok_s / 1e9))
                        if variables is not None:
                            rows[-1]["switches"] = ",".join(f"{k}={v}" for k, v in variables.items()) or "-"
                        print(rows[-1], flush=True)
                del model
                gc.collect()  # a model in a reference cycle would keep its weights through the next variant's
                torch.cuda.empty_cache()
    return rows


def realized_on(model: Transformer, level: float) -> float:
    if level == 0:
        return 0.0
    idx = torch.randint(model.config.vocab_size, (1, 256), device=model.norm.weight.device)
    return tp.realized_sparsity(model, idx)["parameter_weighted"]


def write_results(args: argparse.Namespace, rows: list[dict], world: int = 1) -> None:
    import triton
    meta = dict(command=" ".join(sys.argv), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, date=datetime.date.today().isoformat(), model=args.model,
                tokens=args.tokens, runs=args.runs, tensor_parallel=world,
                # the decode switches set for this run (TEAL_PDL, TEAL_ATTENTION_O, ...): which variant ran
                switches={k: v for k, v in sorted(os.environ.items()) if k.startswith("TEAL_")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    base = rows[0]["tok_s"] if rows and rows[0]["weights"] == "bf16" else None  # --no-bf16_baseline: none
    lines = [f"# Decode, {args.model} shape, random weights{f', {world} GPUs (tensor parallel)' if world > 1 else ''}"
             f" — {meta['gpu']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, {meta['date']}", "",
             f"`{' '.join(f'{k}={v}' for k, v in meta['switches'].items())}{' ' if meta['switches'] else ''}"
             f"{meta['command']}`", "",
             "| weights | path | switches | sparsity | realized | tok/s | vs dense bf16 | GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_bf16 = f"{r['tok_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['weights']} | {r['path']} | {r.get('switches', '')} | {r['sparsity']:.2f} | "
                     f"{r['realized']:.3f} | {r['tok_s']:.1f} | {vs_bf16} | {r['gb_s']:.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
