"""Host time per compiled decode step, and what two ways of launching it save.

A compiled decode step costs the CPU Dynamo's guard evaluation, the CUDA-graph tree's checks and
the graph launch. The GPU hides that while the host runs ahead (the plain decode loop), but not
after a host sync (speculation syncs once a cycle) nor when a step is shorter than the host's
cost (small models). For each model shape (random weights, bf16, the fused decode path) and
sparsity level, three ways to run the same step, each timed over `--tokens` steps:

- ``compiled``: ``torch.compile(decode_one_token, mode="reduce-overhead")``, as bench_decode.py
  and generate.py run it, with the loop's ``clone()`` and ``pos += 1``;
- ``guards skipped``: the same under ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``
  (only the guards that told the warmed-up graphs apart run);
- ``hand graph``: ``torch.compile(mode="default")`` captured once into a ``torch.cuda.CUDAGraph``
  together with the token copy and the position increment, replayed: one launch a step.

Columns: host µs a step (the loop's CPU time, the GPU never waited on), tok/s (the same loop
ended by a sync). Usage::

    python -m benchmarks.host_overhead --models SmolLM2-135M Llama-3-8B --sparsity 0 0.5 --out OUT
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import torch

from benchmarks.bench_decode import set_level
from decode import install_fused_decode
from files import write_report
from generate import Sampling, decode_one_token, random_model


def loop_times(run_step, n: int) -> tuple[float, float]:
    """(host µs a step, tok/s) of n calls of run_step: CPU time before the final sync, wall after it."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        run_step()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return 1e6 * host / n, n / (time.perf_counter() - t0)


def measure(model, n: int, compiled, plain) -> dict[str, tuple[float, float]]:
    device = model.norm.weight.device
    s = Sampling()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([32], device=device)

    def compiled_step() -> None:
        nonlocal token
        token = compiled(model, token, pos, s).clone()
        pos.add_(1)

    results = {}
    for _ in range(3):  # compile and record the CUDA graph
        compiled_step()
    pos.fill_(32)
    results["compiled"] = loop_times(compiled_step, n)
    pos.fill_(32)
    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
        results["guards skipped"] = loop_times(compiled_step, n)

    static_token = torch.zeros(1, 1, dtype=torch.long, device=device)
    static_pos = torch.tensor([32], device=device)

    def body() -> None:
        static_token.copy_(plain(model, static_token, static_pos, s))
        static_pos.add_(1)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the capture
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    static_pos.fill_(32)
    results["hand graph"] = loop_times(graph.replay, n)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["SmolLM2-135M", "Llama-3-8B"], help="shapes of model.MODEL_CONFIGS")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--tokens", type=int, default=256, help="steps per timed loop")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/host_overhead"),
                   help="writes OUT.json and OUT.md")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.host_overhead needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 64
    compiled = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    plain = torch.compile(decode_one_token, fullgraph=True)
    rows = []
    with torch.no_grad():
        for name in args.models:
            model = random_model(name, torch.bfloat16, "cuda")
            install_fused_decode(model)
            model.setup_caches(1, 64 + 4 * args.tokens + 64)
            for level in args.sparsity:
                set_level(model, level, 2048)
                for way, (host_us, tok_s) in measure(model, args.tokens, compiled, plain).items():
                    rows.append(dict(model=name, sparsity=level, way=way, host_us=host_us, tok_s=tok_s))
                    print(rows[-1], flush=True)
            del model
            torch.cuda.empty_cache()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                tokens=args.tokens)
    lines = [f"# Host time per decode step ({meta['gpu']}, torch {meta['torch']}, {meta['date']}; random weights, "
             "bf16, fused decode path)", "",
             "| model | sparsity | way | host µs a step | tok/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sparsity']:.2f} | {r['way']} | {r['host_us']:.0f} | {r['tok_s']:.1f} |"
              for r in rows]
    write_report(args.out, {"meta": meta, "rows": rows}, lines)


if __name__ == "__main__":
    main()
