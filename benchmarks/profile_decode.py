"""Where one decode step's time goes: the GPU kernels of CUDA-graph decode replays, by role.

Setup imported from bench_decode.py: random weights of a named shape, optional quantization,
thresholds from the dense model's activation histograms. Per (weights, sparsity): prefill
`--context` tokens, compile decode_one_token with CUDA graphs, warm up, time `--steps` replays with
CUDA events (median of 3), profile `--steps` more; each run restarts at position `--context`.
Kernels come from the exported Chrome trace (cat kernel/gpu_memcpy/gpu_memset, graph replays
included), which sidesteps key_averages' cuda_time -> device_time renames.
Steps: a step is bench_decode's loop body (graph-input copies, replay, token clone, pos += 1) and
launches the same kernels every time, so split_steps cuts the time-ordered list into `--steps`
equal parts and fails unless the names repeat. Roles come from names (classify); the lm_head is
each step's last matrix kernel plus any right before it (split-K parts; memsets skipped): the
final RMSNorm always separates it from the last down projection.
Byte floor: generate.weight_bytes_per_token at the realized sparsity + K/V of the filled context,
at 4.28 TB/s. SDPA reads the whole (masked) KV cache of `kv_len` = context + steps + 16 positions.

    python -m benchmarks.profile_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.5 --label before
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from files import atomic_path

Kernel = tuple[str, float]  # (name, duration µs), in start order
ROLES = ("projection GEMV", "lm_head", "attention", "elementwise/norm", "memset/memcpy")
READ_BW = 4.28e12  # bytes/s, the H200's measured read bandwidth (shared/BACKGROUND.md)
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
WARMUP, KV_MARGIN, CALIB_TOKENS = 10, 16, 2048  # CALIB_TOKENS: bench_decode's default
_ATTENTION = re.compile(r"attention|attn|flash|fmha|sdpa|cudnn", re.I)
_MATRIX = re.compile(r"gemv|gemm|nvjet|cutlass|xmma|splitkreduce|cublas", re.I)
_INDUCTOR_MM = re.compile(r"_(mm|addmm|bmm)(_|$)")  # in an Inductor template name
# our kernels whose names say nothing about their role: teal_kernels/attention.py's, and the Gluon tensor-core
# GEMVs (int4_mma.py, bf16_mma.py), which "mma" alone would not tell from cuDNN's attention kernels
OWN_KERNELS = {"_split_kernel": "attention", "_combine_kernel": "attention",
               "_int4_mma_kernel": "projection GEMV", "_bf16_mma_kernel": "projection GEMV"}


def classify(name: str) -> str:
    """Role of one kernel from its name (the lm_head is positional: see step_roles)."""
    if name.startswith(("Memset", "Memcpy")):
        return "memset/memcpy"
    if name in OWN_KERNELS:
        return OWN_KERNELS[name]
    if name.startswith("triton_"):  # Inductor's: named after the ops of its graph nodes, so
        # "triton_poi_fused_mul_silu_sparse_gemv_..." is the SiLU; only templates do matmul/attention
        if name.startswith("triton_tem_"):
            return "attention" if _ATTENTION.search(name) else "projection GEMV" if _INDUCTOR_MM.search(name) \
                else "elementwise/norm"
        return "elementwise/norm"
    if _ATTENTION.search(name):  # before _MATRIX: fmha_cutlass..., cuDNN's sdpa kernels
        return "attention"  # then cuBLAS/cutlass matmuls and our Triton GEMVs (_sparse_gemv_kernel)
    return "projection GEMV" if _MATRIX.search(name) else "elementwise/norm"


def split_steps(kernels: list[Kernel], steps: int) -> list[list[Kernel]]:
    """Cut the kernels of `steps` identical decode steps into steps (see the module docstring)."""
    n = len(kernels)
    if steps < 1 or n == 0 or n % steps:
        raise ValueError(f"{n} profiled kernels do not split into {steps} equal decode steps")
    per = n // steps
    for i in range(per, n):
        if kernels[i][0] != kernels[i - per][0]:
            raise ValueError(f"profiled step {i // per + 1} differs from step 1 at kernel {i % per}: "
                             f"{kernels[i][0]!r} vs {kernels[i % per][0]!r}")
    return [kernels[i:i + per] for i in range(0, n, per)]


def step_roles(step: list[Kernel]) -> list[str]:
    """Roles of one step's kernels; the trailing run of matrix kernels becomes the lm_head."""
    roles = [classify(name) for name, _ in step]
    i = max((j for j, r in enumerate(roles) if r == "projection GEMV"), default=-1)
    while i >= 0 and roles[i] in ("projection GEMV", "memset/memcpy"):
        if roles[i] == "projection GEMV":
            roles[i] = "lm_head"
        i -= 1
    return roles


def summarize(kernels: list[Kernel], steps: int, top: int = 5) -> dict:
    """Per decode step: µs and kernel count per role, total kernel µs, each role's top kernels."""
    parts = split_steps(kernels, steps)
    by_name: dict[str, dict[str, list[float]]] = {r: defaultdict(lambda: [0.0, 0.0]) for r in ROLES}
    for part in parts:
        for (name, dur), role in zip(part, step_roles(part)):
            acc = by_name[role][name.removeprefix("void ")]
            acc[0], acc[1] = acc[0] + dur / steps, acc[1] + 1 / steps
    us = {r: sum(v[0] for v in d.values()) for r, d in by_name.items()}
    # Kernel by kernel, mean µs over the steps: tells apart calls that share a name (e.g. the
    # GEMV of gate|up and of down)
    sequence = [[name.removeprefix("void ")[:60], role, round(sum(p[i][1] for p in parts) / steps, 2)]
                for i, ((name, _), role) in enumerate(zip(parts[0], step_roles(parts[0])))]
    tops = {r: [dict(name=k, us=v[0], calls=round(v[1], 3))
                for k, v in sorted(d.items(), key=lambda kv: -kv[1][0])[:top]] for r, d in by_name.items()}
    return dict(kernels_per_step=len(parts[0]), kernel_us=sum(us.values()), role_us=us,
                role_kernels={r: round(sum(v[1] for v in d.values())) for r, d in by_name.items()}, top=tops,
                sequence=sequence)


def kernels_from_trace(trace: dict) -> list[Kernel]:
    """GPU work in a torch.profiler Chrome trace (kernels, memcpys, memsets), in start order."""
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in GPU_CATS]
    return [(e["name"], float(e.get("dur", 0.0))) for e in sorted(evs, key=lambda e: float(e["ts"]))]


def kv_bytes(cfg, batch: int, context: int, elem: int) -> float:
    """K and V of the filled context, all layers: what an ideal attention kernel reads per step."""
    return 2.0 * cfg.n_layer * batch * cfg.n_local_heads * cfg.head_dim * context * elem


def markdown(meta: dict, rows: list[dict]) -> str:
    """Top kernels per setting, then the summary table (last, so it ends the printed output)."""
    out = [f"# Decode step profile, {meta['model']} shape, random weights — {meta['gpu']}, torch "
           f"{meta['torch']}, triton {meta['triton']}, {meta['date']}", "", f"`{meta['command']}`", "",
           f"label: {meta['label'] or '-'}; batch {meta['batch']}, context {meta['context']} (KV cache "
           f"{meta['kv_len']} positions), {meta['steps']} profiled steps. µs per decode step; floor = "
           f"weight + KV bytes at {READ_BW / 1e12:.2f} TB/s; gaps = step − summed kernel time.", ""]
    for r in rows:
        out.append(f"## {r['weights']}, sparsity {r['sparsity']:.2f}: top kernels, µs/step (calls/step)")
        out += [f"- {role}: " + ", ".join(f"`{t['name'][:80]}` {t['us']:.1f} ({t['calls']:g})" for t in r["top"][role])
                for role in ROLES if r["top"][role]]
        out.append("")
    out += ["| weights | path | sparsity | realized | step µs | tok/s | floor µs (tok/s) | kernels | kernel µs"
            " | gaps µs | " + " | ".join(f"{role} µs (n)" for role in ROLES) + " |", "|---" * (10 + len(ROLES)) + "|"]
    out += [f"| {r['weights']} | {r['path']} | {r['sparsity']:.2f} | {r['realized']:.3f} | {r['step_us']:.0f} | "
            f"{r['tok_s']:.1f} | {r['floor_us']:.0f} ({r['floor_tok_s']:.0f}) | {r['kernels_per_step']} | "
            f"{r['kernel_us']:.0f} | {r['gaps_us']:.0f} | "
            + " | ".join(f"{r['role_us'][role]:.0f} ({r['role_kernels'][role]})" for role in ROLES) + " |"
            for r in rows]
    return "\n".join(out) + "\n"


@torch.no_grad()
def profile_setting(model, step, context: int, batch: int, steps: int) -> tuple[float, list[Kernel], int]:
    """(wall µs per step, profiled kernels of `steps` replays, KV cache length) for one setting."""
    from generate import Sampling
    from torch.profiler import ProfilerActivity, profile
    device = model.norm.weight.device
    kv_len = context + max(steps, WARMUP) + KV_MARGIN
    model.setup_caches(batch, kv_len)
    prompt = torch.randint(model.config.vocab_size, (batch, context), device=device)
    first = model(prompt, torch.arange(context, device=device))[:, -1:].argmax(-1)

    def decode(n: int, around=contextlib.nullcontext()) -> float:
        """bench_decode's loop body n times; wall µs per step from CUDA events."""
        token, pos = first.clone(), torch.tensor([context], device=device)  # outside what is measured
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        with around:
            t0.record()
            for _ in range(n):
                token = step(model, token, pos, Sampling()).clone()  # the next replay overwrites it
                pos += 1
            t1.record()
            torch.cuda.synchronize()
        return t0.elapsed_time(t1) * 1000 / n

    decode(WARMUP)  # compilation, CUDA-graph warm-up and capture
    step_us = statistics.median(decode(steps) for _ in range(3))
    decode(steps, prof := profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(str(Path(tmp) / "trace.json"))
        trace = json.loads((Path(tmp) / "trace.json").read_text())
    return step_us, kernels_from_trace(trace), kv_len


def run(args: argparse.Namespace) -> tuple[list[dict], int]:
    """Profile every (weights, sparsity); sparsity 0 first, so dense bf16 is nn.Linear (cuBLAS)
    like bench_decode's baseline (calibrating a sparse level packs the projections)."""
    from benchmarks.bench_decode import apply_weights, realized_on, set_level
    from decode import install_fused_decode
    from generate import decode_one_token, random_model, weight_bytes_per_token
    from linear import packed_projections
    from torch._dynamo.utils import counters
    torch._dynamo.config.cache_size_limit = 64  # one graph per setting
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    rows, kv_len = [], 0
    for weights in args.weights:
        model = random_model(args.model, torch.bfloat16, torch.device("cuda"))
        apply_weights(model, weights)
        if args.decode_path == "fused":
            install_fused_decode(model)
        for level in sorted(set(args.sparsity)):
            set_level(model, level, CALIB_TOKENS)  # histogram calibration on the model's own activations
            realized = realized_on(model, level)
            skips_before = counters["inductor"]["cudagraph_skips"]
            step_us, kernels, kv_len = profile_setting(model, step, args.context, args.batch, args.steps)
            cudagraph_skips = counters["inductor"]["cudagraph_skips"] - skips_before  # must be 0
            s = summarize(kernels, args.steps)
            w_bytes = weight_bytes_per_token(model, realized)
            kv = kv_bytes(model.config, args.batch, args.context, model.tok_embeddings.weight.element_size())
            floor_us = (w_bytes + kv) / READ_BW * 1e6
            rows.append(dict(weights=weights, sparsity=level, realized=realized, step_us=step_us,
                             path="PackedLinear" if packed_projections(model) else "nn.Linear (cuBLAS)",
                             tok_s=1e6 / step_us, floor_us=floor_us, floor_tok_s=1e6 / floor_us,
                             weight_bytes=w_bytes, kv_bytes=kv, gaps_us=step_us - s["kernel_us"],
                             cudagraph_skips=cudagraph_skips, **s))
            print(f"{weights} sparsity {level:.2f}: {step_us:.0f} µs/step ({1e6 / step_us:.1f} tok/s), "
                  f"kernels {s['kernel_us']:.0f} µs in {s['kernels_per_step']}, floor {floor_us:.0f} µs, "
                  f"cudagraph skips {cudagraph_skips}", flush=True)
        del model
        torch.cuda.empty_cache()
    return rows, kv_len


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3-8B", help="shape from model.MODEL_CONFIGS")
    p.add_argument("--weights", nargs="+", default=["bf16"],
                   help="bf16, int8, int4-g128 ...; +lm_head after int8 / int4 quantizes the head too")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5], help="TEAL levels; 0 = dense")
    p.add_argument("--context", type=int, default=128, help="tokens in the KV cache before the profiled steps")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--steps", type=int, default=20, help="profiled (and timed) decode steps")
    default_out = Path(os.environ["OUT"]) / "profile_decode" if os.environ.get("OUT") else \
        Path("benchmarks/results/profile_decode")
    p.add_argument("--out", type=Path, default=default_out, help="output prefix: <out>.json, <out>.md")
    p.add_argument("--label", default="", help="free text recorded in the output, e.g. 'before'")
    p.add_argument("--decode_path", choices=["reference", "fused"], default="reference",
                   help="model.py's decode step or decode.py's fused one")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked without a GPU; raises ValueError."""
    from model import ModelArgs
    cfg = ModelArgs.from_name(args.model)
    for w in args.weights:
        if not re.fullmatch(r"bf16|(int8|int4(-g\d+)?)(\+lm_head)?|int4(-g\d+)?\+lm_head_int4", w):
            raise ValueError(f"unknown --weights {w!r}: use bf16, int8 or int4-g<group>, +lm_head after int8/int4, "
                             "+lm_head_int4 after int4")
    if not all(0 <= s < 1 for s in args.sparsity):
        raise ValueError("--sparsity levels must be in [0, 1)")
    if min(args.context, args.batch, args.steps) < 1:
        raise ValueError("--context, --batch and --steps must be at least 1")
    if args.context + max(args.steps, WARMUP) + KV_MARGIN > cfg.block_size:
        raise ValueError(f"--context {args.context} + steps exceeds {args.model}'s {cfg.block_size} positions")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        if not torch.cuda.is_available():
            raise ValueError("profile_decode.py needs a CUDA GPU")
        rows, kv_len = run(args)
    except ValueError as e:  # bad input, no GPU, unsplittable trace; anything else keeps its traceback
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    import triton
    meta = dict(command=shlex.join([Path(sys.executable).name, *sys.argv]), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__, date=datetime.date.today().isoformat(),
                model=args.model, weights=args.weights, sparsity=args.sparsity, context=args.context,
                batch=args.batch, steps=args.steps, kv_len=kv_len, label=args.label, decode_path=args.decode_path)
    md = markdown(meta, rows)
    write_atomic(Path(f"{args.out}.json"), json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    write_atomic(Path(f"{args.out}.md"), md)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
