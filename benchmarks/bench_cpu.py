"""CPU decode speed side by side: bf16 / int8 / int4-g32 x TEAL sparsity, eager and compiled.

One process measures every setting on the same machine in one run, so the rows compare; each
setting is decoded `--runs` times (greedy, EOS ignored so every run decodes the same number of
tokens) and the median reported. Quantized checkpoints are written with quantize.py and thresholds
calibrated with calibrate.py into a temporary folder unless given.

    OMP_NUM_THREADS=2 python benchmarks/bench_cpu.py --out docs/cpu

Writes <out>/bench_cpu.json and <out>/bench_cpu.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as generate.py: spinning OpenMP workers starve the rest

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import generate
from checkpoint import load_model
from cli import DEFAULT_CHECKPOINT
from decode import install_fused_decode
from teal_kernels import cpu
from teal import realized_sparsity
from tokenizer import load_tokenizer

PARALLEL_BYTES_ENV = "TEAL_CPU_PARALLEL_BYTES"  # read by the C++ kernel on every call (teal_kernels/cpu.py)
POOL_ENV = "TEAL_CPU_POOL"  # likewise

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explain in two sentences why the sky is blue."


def prepare(checkpoint: Path, work: Path, thresholds: Path | None) -> tuple[dict[str, Path], Path]:
    """Quantized checkpoints and a thresholds file, made by the project's own tools."""
    py = [sys.executable]
    weights = {"bf16": checkpoint}
    for label, extra in (("int8", ["--mode", "int8"]), ("int4-g32", ["--mode", "int4", "--groupsize", "32"])):
        out = work / f"model_{label}.safetensors"
        if not out.exists():
            subprocess.run(py + [str(ROOT / "quantize.py"), "--checkpoint_path", str(checkpoint), *extra,
                                 "--output", str(out)], check=True)
        weights[label] = out
    if thresholds is None:
        thresholds = work / "teal_thresholds.safetensors"
        if not thresholds.exists():
            text = work / "calibration.txt"
            subprocess.run(py + [str(ROOT / "scripts" / "python_docs_text.py"), str(text)], check=True)
            subprocess.run(py + [str(ROOT / "calibrate.py"), "--checkpoint_path", str(checkpoint), "--text", str(text),
                                 "--methods", "uniform", "--tokens", "2048", "--correction_tokens", "512",
                                 "--max_sparsity", "0.6", "--level_step", "0.1", "--output", str(thresholds)],
                           check=True)
    return weights, thresholds


def kernel_settings(parallel_bytes: list[int] | None, pools: list[str] | None) -> list[dict[str, str]]:
    """The C++ kernel's environment for each setting to compare (every combination of the given
    one-thread limits and thread pools; one empty setting when none is given)."""
    limits = [{PARALLEL_BYTES_ENV: str(b)} for b in parallel_bytes] if parallel_bytes else [{}]
    return [{**limit, **({POOL_ENV: pool} if pool else {})} for limit in limits for pool in pools or [None]]


def setting_label(setting: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def measure(weights: Path, thresholds: Path, levels: list[float], compiled: bool, tokens: int, runs: int,
            ids: list[int], decode_path: str, settings: list[dict[str, str]] | None = None) -> list[dict]:
    """tok/s of every level for one checkpoint, eager or compiled (compilation not timed). With
    several `settings` (environments of the C++ kernel, which reads them on every call), each run
    decodes once per setting, interleaved, so they compare under the same machine load."""
    torch._dynamo.reset()
    model = load_model(weights, "cpu", torch.bfloat16)
    if decode_path == "fused":  # as generate.py --decode_path fused
        install_fused_decode(model)
    s = generate.Sampling(0.0, 1, None)
    decode, pre = generate.compile_steps(torch.device("cpu"), False) if compiled else (generate.decode_one_token,
                                                                                        generate.prefill)
    rows = []
    for level in levels:
        args = generate.parse_args(["--checkpoint_path", str(weights), "--thresholds", str(thresholds),
                                    "--allocation", "uniform", "--device", "cpu"])
        generate.set_sparsity(model, level, args)
        generate.generate(model, ids, 8, s, decode, pre)  # warm-up (compiles)
        settings = settings or [{}]
        samples: list[list] = [[] for _ in settings]
        for _ in range(runs):
            for i, setting in enumerate(settings):
                before = {name: os.environ.get(name) for name in setting}
                os.environ.update(setting)
                samples[i].append(generate.generate(model, ids, tokens, s, decode, pre))
                for name, value in before.items():  # the caller's environment back
                    if value is None:
                        os.environ.pop(name)
                    else:
                        os.environ[name] = value
        seq = torch.tensor([samples[0][0].tokens])
        realized = realized_sparsity(model, seq)["parameter_weighted"] if level > 0 else 0.0
        for setting, runs_of_setting in zip(settings, samples):
            tok_s = [x.decode_tok_s for x in runs_of_setting]
            rows.append({"sparsity": level, "compiled": compiled, "tok_s": statistics.median(tok_s),
                         "tok_s_runs": [round(t, 2) for t in tok_s], "realized": realized,
                         **({"setting": setting_label(setting)} if setting else {})})
            print(f"  {weights.name} compiled={compiled} sparsity={level} {setting_label(setting)}: "
                  f"{rows[-1]['tok_s_runs']} tok/s", flush=True)
    return rows


def cpu_name() -> str:
    """The CPU model and logical CPU count, for the table's caption."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} logical CPUs"


def markdown(result: dict) -> str:
    levels = result["levels"]
    head = "| weights | mode | " + " | ".join(f"sparsity {lv:.1f} tok/s (realized)" for lv in levels) + " |"
    lines = [head, "|" + "---|" * (2 + len(levels))]
    for fmt in result["formats"]:
        for compiled in (False, True):
            for label in dict.fromkeys(r.get("setting") for r in result["rows"]):
                rows = [r for r in result["rows"] if r["format"] == fmt and r["compiled"] == compiled
                        and r.get("setting") == label]
                if not rows:  # a mode not measured (--modes)
                    continue
                cells = [f"{r['tok_s']:.1f} ({r['realized']:.0%})" for r in rows]
                mode = ("compiled" if compiled else "eager") + ("" if label is None else f", {label}")
                lines.append(f"| {fmt} | {mode} | " + " | ".join(cells) + " |")
    return (f"CPU decode, SmolLM2-135M-Instruct, {result['date']}, {result['machine']}; "
            f"{result['threads']} threads, CPU shared with other jobs (timings are noisy); greedy, "
            f"decode path {result.get('decode_path', 'reference')}, {result['tokens']} new tokens, "
            f"median of {result['runs']} runs per setting; "
            f"TEAL kernel: {result['kernel']}.\n`{result['command']}`\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--thresholds", type=Path, default=None, help="thresholds file (default: calibrate one)")
    p.add_argument("--work", type=Path, default=None, help="folder for quantized checkpoints (default: a temp dir)")
    p.add_argument("--formats", nargs="+", default=["bf16", "int8", "int4-g32"])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--decode_path", choices=["reference", "fused"], default="fused",
                   help="generate.py's --decode_path: fused runs the C++ attention step and the GEMV fusions")
    p.add_argument("--parallel_bytes", type=int, nargs="+", default=None,
                   help="compare values of the C++ kernel's one-thread limit (bytes of weight below which "
                        "a call stays on one thread), interleaved run by run")
    p.add_argument("--cpu_pool", nargs="+", choices=["openmp", "spin"], default=None,
                   help="compare the C++ kernel's thread pools (TEAL_CPU_POOL), interleaved run by run")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "cpu")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        weights, thresholds = prepare(args.checkpoint_path, work, args.thresholds)
        tok = load_tokenizer(args.checkpoint_path)
        ids = tok.encode(PROMPT)
        rows = []
        for fmt in args.formats:
            for mode in args.modes:
                for r in measure(weights[fmt], thresholds, args.sparsity, mode == "compiled", args.tokens,
                                 args.runs, ids, args.decode_path,
                                 kernel_settings(args.parallel_bytes, args.cpu_pool)):
                    rows.append({"format": fmt, **r})
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "kernel": "C++ (teal_kernels/cpu.py)" if cpu.available() else "plain-torch reference",
              "command": "OMP_NUM_THREADS=%s python benchmarks/bench_cpu.py %s" % (
                  os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:])),
              "decode_path": args.decode_path, "tokens": args.tokens, "runs": args.runs, "levels": args.sparsity,
              "formats": args.formats, "parallel_bytes": args.parallel_bytes, "cpu_pool": args.cpu_pool,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_cpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "bench_cpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
