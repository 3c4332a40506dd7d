"""Calibration cost against calibration quality: how long calibrate.py takes with a set of
settings, and what its thresholds do on text it has not seen.

For each named setting it runs calibrate.py (a subprocess, wall-clock timed, model loading
included), then, on the first --eval_windows windows of --eval_text, for each allocation and
level: the realized parameter-weighted sparsity (every token sparsified) and the perplexity.
The target is met when every realized level is within --tolerance of what was asked.

    python benchmarks/bench_calibration.py --calib_text calib.txt --eval_text eval.txt \\
        --settings default fast --out docs/calibration/calibration_cpu

Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli import DEFAULT_CHECKPOINT, FRACTION, ArgumentParser, int_at_least, run_main

import torch

from checkpoint import load_model, resolve_checkpoint
from files import atomic_path, check_writable, write_json
from scripts.perplexity import evaluate
from teal.calibration import read_text
from tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
# calibrate.py arguments of each setting ("default": its own defaults; "previous": the defaults
# before 2026-12-02, 3.5x slower for the same realized sparsity: docs/calibration/)
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "previous": ["--tokens", "8192", "--level_step", "0.05", "--correction_tokens", "2048",
                 "--greedy_tokens", "256", "--greedy_step", "0.05"],
}


def run_calibration(checkpoint: Path, text: Path, extra: list[str], output: Path, device: str) -> float:
    """Wall-clock seconds of one calibrate.py run (a fresh process, as a user runs it)."""
    cmd = [sys.executable, str(REPO / "calibrate.py"), "--checkpoint_path", str(checkpoint), "--text", str(text),
           "--output", str(output), "--device", device, *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT, help="converted checkpoint folder")
    p.add_argument("--calib_text", type=Path, required=True, help="text calibrate.py reads")
    p.add_argument("--eval_text", type=Path, required=True, help="unseen text the thresholds are checked on")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["default"],
                   help="named calibrate.py settings to compare (see SETTINGS in this file)")
    p.add_argument("--levels", type=FRACTION, nargs="+", default=[0.25, 0.4, 0.5, 0.65],
                   help="parameter-weighted sparsity levels to check")
    p.add_argument("--allocations", nargs="+", choices=["uniform", "greedy"], default=["uniform", "greedy"])
    p.add_argument("--eval_windows", type=int_at_least(1), default=8, help="512-token windows of eval text")
    p.add_argument("--tolerance", type=float, default=0.02, help="allowed |realized - asked| sparsity")
    p.add_argument("--device", default="cpu", help="device for calibration and evaluation")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.json and OUT.md")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    check_writable(json_path)
    folder = resolve_checkpoint(args.checkpoint_path)[0]
    ids = load_tokenizer(folder).encode(read_text(args.eval_text))
    model = load_model(args.checkpoint_path, device=args.device, dtype=torch.float32)
    dense = evaluate(model, ids, 0.0, None, "uniform", 512, args.eval_windows, 4)["perplexity"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            thresholds = Path(tmp) / f"{name}.safetensors"
            seconds = run_calibration(args.checkpoint_path, args.calib_text, SETTINGS[name], thresholds, args.device)
            for allocation in args.allocations:
                for level in args.levels:
                    row = evaluate(model, ids, level, thresholds, allocation, 512, args.eval_windows, 4)
                    realized = row["realized"]["parameter_weighted"]
                    results.append({"setting": name, "arguments": SETTINGS[name], "seconds": round(seconds, 1),
                                    "allocation": allocation, "level": level, "realized": round(realized, 4),
                                    "perplexity": round(row["perplexity"], 3),
                                    "within_tolerance": abs(realized - level) <= args.tolerance})
                    print(f"{name}: {seconds:.0f} s, {allocation} {level:.2f} -> realized {realized:.3f}, "
                          f"ppl {row['perplexity']:.2f}")
    meta = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "device": args.device, "eval_text": str(args.eval_text),
            "eval_windows": args.eval_windows, "dense_perplexity": round(dense, 3), "tolerance": args.tolerance}
    write_json(json_path, {**meta, "rows": results})
    lines = [f"# Calibration time vs realized sparsity on unseen text ({meta['date']})", "",
             f"`{meta['command']}`", "",
             f"{meta['machine']}, torch {meta['torch']}, device {args.device}. Evaluation: the first "
             f"{args.eval_windows} windows of 512 tokens of `{args.eval_text.name}`, every token sparsified; "
             f"dense perplexity {dense:.3f}.", "",
             "| setting | calibrate.py s | allocation | asked | realized | perplexity | within ±"
             f"{args.tolerance:g} |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['seconds']:.0f} | {r['allocation']} | {r['level']:.2f} | {r['realized']:.3f} | "
              f"{r['perplexity']:.3f} | {'yes' if r['within_tolerance'] else 'NO'} |" for r in results]
    lines += ["", "Settings (calibrate.py arguments):", ""]
    lines += [f"- {name}: `{' '.join(SETTINGS[name]) or '(defaults)'}`" for name in args.settings]
    with atomic_path(md_path) as tmp_md:
        tmp_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    run_main(main)
