"""generate.py at two git revisions, alternating in one run: before/after figures for a change
that cannot be switched inside one process (a C++ kernel, a module swap).

Each revision is checked out in its own worktree under --work (with its own torch extension
directory, so the two C++ builds do not replace each other), and `python generate.py ARGS` runs
there --rounds times per revision, the order swapped every round (the VM's speed drifts). The
summary is the median decode tok/s of each (revision, sparsity) from generate.py's table.

    python -m benchmarks.ab_generate --revs 860b053 HEAD --rounds 4 --out docs/cpu/row_kernel/ab -- \\
        --checkpoint_path checkpoints/SmolLM2-135M-Instruct --compile --sparsity 0 0.5 --temperature 0 ...
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from files import write_report

ROW = re.compile(r"^\| (\d\.\d\d) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \|")
REPO = Path(__file__).resolve().parents[1]


def last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: git {' '.join(args)}: {last_line(done.stderr)}")
    return done.stdout.strip()


def table_rows(stdout: str) -> list[dict]:
    """generate.py's closing table: one dict per sparsity level."""
    return [{"sparsity": float(m[1]), "realized": float(m[2]) / 100, "tok_s": float(m[3]), "ttft_ms": int(m[5]),
             "new_tokens": int(m[6])} for m in map(ROW.match, stdout.splitlines()) if m]


def run_rounds(shas: list[str], work: Path, rounds: int, gen_args: list[str]) -> list[dict]:
    """generate.py in each revision's worktree under `work`, `rounds` times, the order swapped every
    round; one dict per (run, sparsity level)."""
    for sha in shas:
        if not (work / sha).exists():
            git("worktree", "add", "--detach", str(work / sha), sha)
    runs: list[dict] = []
    for rnd in range(rounds):
        for sha in (shas if rnd % 2 == 0 else shas[::-1]):
            env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(work / f"extensions_{sha}"))
            done = subprocess.run([sys.executable, "generate.py", *gen_args], cwd=work / sha, env=env,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"error: generate.py at {sha} failed: {last_line(done.stderr)}")
            for row in table_rows(done.stdout):
                runs.append({"rev": sha, "round": rnd, **row})
                print(runs[-1], flush=True)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to generate.py unchanged.")
    p.add_argument("--revs", nargs=2, required=True, metavar=("A", "B"), help="git revisions to compare")
    p.add_argument("--rounds", type=int, default=4, help="runs of generate.py per revision")
    p.add_argument("--work", type=Path, default=None, help="where the worktrees go (default: a temp folder)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args, gen_args = p.parse_known_args()
    gen_args = [a for a in gen_args if a != "--"]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    shas = [git("rev-parse", "--short", rev) for rev in args.revs]
    work = args.work or Path(tempfile.mkdtemp(prefix="ab_generate_"))
    try:
        runs = run_rounds(shas, work, args.rounds, gen_args)
    finally:
        if args.work is None:  # a temporary folder: its worktrees go too (a given --work keeps them and their builds)
            for sha in shas:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(work / sha)],
                               capture_output=True)
            shutil.rmtree(work, ignore_errors=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "cpu": platform.processor() or platform.machine(), "revs": dict(zip(args.revs, shas)),
            "rounds": args.rounds, "generate_args": gen_args}
    levels = sorted({r["sparsity"] for r in runs})
    lines = [f"# generate.py at two revisions, alternating ({meta['date']}, {os.cpu_count()} CPUs)", "",
             f"`python -m benchmarks.ab_generate --revs {' '.join(args.revs)} --rounds {args.rounds} -- "
             f"{shlex.join(gen_args)}`", "",
             "| revision | sparsity | median decode tok/s | runs | median TTFT ms | realized |",
             "|---|---|---|---|---|---|"]
    for sha in shas:
        for level in levels:
            mine = [r for r in runs if r["rev"] == sha and r["sparsity"] == level]
            speeds = [r["tok_s"] for r in mine]
            lines.append(f"| {sha} | {level:.2f} | {statistics.median(speeds):.1f} | "
                         f"{' '.join(f'{v:.1f}' for v in speeds)} | "
                         f"{statistics.median(r['ttft_ms'] for r in mine):.0f} | {mine[0]['realized']:.1%} |")
    write_report(args.out, {"meta": meta, "runs": runs}, lines)


if __name__ == "__main__":
    main()
