"""CPU decode with torch.compile's Python glue against its C++ glue (`generate.py --cpp_wrapper`).

A compiled decode step of SmolLM2 calls ~300 small Inductor kernels and our C++ GEMV; with the
default wrapper each call goes through Python. This times generate.py's own loop with the step
compiled both ways, alternating `--reps` times in one process (the VM's speed drifts between
runs), greedy, EOS ignored, and reports the median tok/s of each. Dynamo is reset at each switch
(the compiled code comes back from Inductor's cache), so every timed run uses its own compile.

    python -m benchmarks.bench_cpu_wrapper --sparsity 0 0.4 --out docs/cpu/cpp_wrapper/run2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as generate.py

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

import generate
from cli import DEFAULT_CHECKPOINT
from decode import install_fused_decode
from files import write_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.4],
                   help="levels (greedy allocation from the checkpoint's thresholds file)")
    p.add_argument("--tokens", type=int, default=100, help="decoded tokens per timed run")
    p.add_argument("--reps", type=int, default=6, help="timed runs per way and level, alternating")
    p.add_argument("--out", type=Path, default=Path("docs/cpu/cpp_wrapper/run"), help="writes OUT.json and OUT.md")
    args = p.parse_args()
    gen_args = generate.parse_args(["--checkpoint_path", str(args.checkpoint_path), "--device", "cpu", "--compile",
                                    "--allocation", "greedy"])
    cpu = torch.device("cpu")
    model, tok = generate.build_model(gen_args, cpu)
    install_fused_decode(model)
    prompt = tok.encode("Explain in two sentences why the sky is blue.")
    s = generate.Sampling(temperature=0.0)
    rows = []
    for level in args.sparsity:
        generate.set_sparsity(model, level, gen_args)
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for rep in range(args.reps + 1):  # rep 0 compiles each way (not timed)
            for cpp in (False, True):
                torch._dynamo.reset()
                decode, pre = generate.compile_steps(cpu, False, cpp)
                start = time.perf_counter()
                generate.generate(model, prompt, 4, s, decode, pre)  # compile / load from the cache
                warm_s = time.perf_counter() - start
                if rep == 0:
                    print(f"sparsity {level}: cpp_wrapper={cpp} compiled in {warm_s:.0f} s", flush=True)
                    continue
                res = generate.generate(model, prompt, args.tokens, s, decode, pre)
                speeds[cpp].append(res.decode_tok_s)
        for cpp, values in speeds.items():
            rows.append({"sparsity": level, "cpp_wrapper": cpp, "tok_s": statistics.median(values), "runs": values})
            print(rows[-1], flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "tokens": args.tokens, "reps": args.reps, "checkpoint": str(args.checkpoint_path)}
    lines = [f"# CPU decode, compiled step's glue in Python vs C++ ({meta['date']}, torch {meta['torch']}, "
             f"{meta['threads']} threads)", "", "`python -m benchmarks.bench_cpu_wrapper "
             f"--sparsity {' '.join(str(x) for x in args.sparsity)} --tokens {args.tokens} --reps {args.reps}`", "",
             "| sparsity | wrapper | median tok/s | runs |", "|---|---|---|---|"]
    lines += [f"| {r['sparsity']:.2f} | {'C++' if r['cpp_wrapper'] else 'Python'} | {r['tok_s']:.1f} | "
              f"{' '.join(f'{v:.1f}' for v in r['runs'])} |" for r in rows]
    write_report(args.out, {"meta": meta, "rows": rows}, lines)


if __name__ == "__main__":
    main()
