"""Where a self-speculative run's time goes (issue 13): generate.py's speculative loop under
torch.profiler.

Runs generate.py with the arguments after ``--`` (they must include ``--speculate_k``) and profiles
one speculative_generate call: the one after the warm-up with ``--compile``, else the first. Writes
OUT.trace.json.gz (Chrome trace: CPU ops and GPU kernels, CUDA-graph replays included, for reading
later without a GPU) and OUT.json / OUT.md: the call's wall time, the time the GPU ran kernels
(union of kernel intervals), the idle time between them, the longest idle gaps with the CPU ops
running during each, and the CPU ops by self time. On the H200 a draft step cost 4.0 ms inside the
loop against 3.33 for a plain step, and a verify 7.3 ms (benchmarks/results/spec_fused.md).

    python -m benchmarks.profile_speculative --out benchmarks/results/profile_spec -- \\
        --random_weights Llama-3-8B --compile --decode_path fused --speculate_k 4 \\
        --draft_sparsity 0.5 --max_new_tokens 64 --temperature 0 --prompt "a b c d e f g h"
"""
from __future__ import annotations

import argparse
import gzip
import json
import shlex
import tempfile
import time
from pathlib import Path

import torch

import generate
from files import atomic_path, check_writable, write_json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "cuda_runtime", "python_function")


def merged_intervals(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals, sorted."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def summarize(trace: dict, top_gaps: int = 10, min_gap_us: float = 20.0) -> dict:
    """GPU busy/idle time and the longest idle gaps of a Chrome trace, with the CPU ops in each gap
    (most overlapping first)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = merged_intervals([(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in GPU_CATEGORIES])
    cpu = [e for e in events if e.get("cat") in CPU_CATEGORIES]
    busy = sum(end - start for start, end in gpu)
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(gpu, gpu[1:]) if b[0] - a[1] >= min_gap_us),
                  reverse=True)
    described = []
    for length, start, end in gaps[:top_gaps]:
        overlap: dict[str, float] = {}
        for e in cpu:
            o = min(end, e["ts"] + e["dur"]) - max(start, e["ts"])
            if o > 0:
                overlap[e["name"]] = overlap.get(e["name"], 0.0) + o
        ops = sorted(overlap.items(), key=lambda kv: -kv[1])[:5]
        described.append({"gap_us": round(length, 1), "cpu_ops_us": {name: round(us, 1) for name, us in ops}})
    span = (gpu[-1][1] - gpu[0][0]) if gpu else 0.0
    return {"gpu_busy_us": round(busy, 1), "gpu_span_us": round(span, 1), "gpu_idle_us": round(span - busy, 1),
            "idle_gaps_over_min": len(gaps), "idle_us_in_those_gaps": round(sum(g[0] for g in gaps), 1),
            "min_gap_us": min_gap_us, "longest_gaps": described}


def markdown(meta: dict, summary: dict, cpu_table: str) -> str:
    ms = {key: summary[key] / 1e3 for key in ("gpu_busy_us", "gpu_span_us", "gpu_idle_us", "idle_us_in_those_gaps")}
    command = f"python -m benchmarks.profile_speculative --out {meta['out']} -- {shlex.join(meta['generate_args'])}"
    lines = [f"# Self-speculative run under torch.profiler ({meta['device']}, torch {meta['torch']}, "
             f"{meta['date']})", "", f"`{command}`", "",
             f"Profiled call: {meta['wall_ms']:.1f} ms wall. GPU kernels {ms['gpu_busy_us']:.1f} ms busy of a "
             f"{ms['gpu_span_us']:.1f} ms span, idle {ms['gpu_idle_us']:.1f} ms; {summary['idle_gaps_over_min']} "
             f"gaps of at least {summary['min_gap_us']:.0f} us hold {ms['idle_us_in_those_gaps']:.1f} ms.", "",
             "| idle gap us | CPU ops during it (us of overlap) |", "|---|---|"]
    lines += [f"| {g['gap_us']} | {', '.join(f'{k} {v}' for k, v in g['cpu_ops_us'].items())} |"
              for g in summary["longest_gaps"]]
    lines += ["", "CPU ops by self time:", "", "```", cpu_table, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="writes OUT.json, OUT.md and OUT.trace.json.gz")
    parser.add_argument("generate_args", nargs=argparse.REMAINDER, help="-- then generate.py's arguments")
    args = parser.parse_args(argv)
    gen_argv = args.generate_args[1:] if args.generate_args[:1] == ["--"] else args.generate_args
    gen = generate.parse_args(gen_argv)
    if not gen.speculate_k:
        parser.error("generate.py's arguments must include --speculate_k")
    outputs = [args.out.with_suffix(s) for s in (".json", ".md", ".trace.json.gz")]
    for path in outputs:
        try:
            check_writable(path)
        except OSError as e:
            parser.error(str(e))

    target_call = 2 if gen.compile else 1  # the first call with --compile is run_speculative's warm-up
    calls, captured = 0, {}
    original = generate.speculative_generate
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def profiled(*a, **kw):
        nonlocal calls
        calls += 1
        if calls != target_call:
            return original(*a, **kw)
        with torch.profiler.profile(activities=activities) as prof:
            start = time.perf_counter()
            result = original(*a, **kw)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            captured["wall_ms"] = (time.perf_counter() - start) * 1e3
        captured["prof"] = prof
        return result

    generate.speculative_generate = profiled
    try:
        generate.run(gen)
    finally:
        generate.speculative_generate = original
    if "prof" not in captured:
        parser.error("generate.py made no speculative call to profile")
    prof = captured["prof"]
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace_path))
        raw = trace_path.read_bytes()
    trace = json.loads(raw)
    with atomic_path(outputs[2]) as tmp_path:
        tmp_path.write_bytes(gzip.compress(raw))
    summary = summarize(trace)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "out": str(args.out), "generate_args": gen_argv,
            "wall_ms": round(captured["wall_ms"], 1)}
    write_json(outputs[0], {"meta": meta, "summary": summary})
    with atomic_path(outputs[1]) as tmp_path:
        tmp_path.write_text(markdown(meta, summary, cpu_table))
    print(markdown(meta, summary, cpu_table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
