"""Pick each decode projection's kernel config by the time of the whole decode step.

tune_kernels.py times one kernel alone, in a CUDA graph over rotating weights. In the decode step
the same kernel runs right after another one, overlapping it under PDL, and the two rankings
disagree by a few percent: a table faster alone lost 10% end to end under PDL (results/long_k/);
int4 gate|up's long-K tile tied alone and won 1-8% end to end (results/int4_long_k/). This script
ranks the best few configs of each one-row projection shape by the fused decode step itself:

1. Shortlist. Per shape, tune_kernels' grid (or the --kinds / --min_block_k part of it) is timed
   alone at the highest level. The --top fastest are kept, and the stored config.
2. Step graphs. A model of the named shape with random weights is built as bench_decode.py builds
   it, and its fused decode step is compiled once per level. Then, for each candidate, one CUDA graph
   of the step is captured. The kernel op reads its config when it is launched, so a graph keeps the
   config in force when it was captured.
3. Timing. The graphs of one shape are replayed in turns: --rounds rounds of --steps steps each.
   Each candidate gets its median step time per level. Every other shape keeps its stored config.
4. Choice. Per shape, the candidate with the lowest summed step time wins if it beats the stored
   config by --min_gain; else the stored config stays.
5. Check and write. All winners together are timed against the stored table, interleaved, per level.
   With --e2e_check TOKENS the two tables are also timed as bench_decode.py times a decode
   (torch.compile's CUDA graphs, recompiled for each table; TOKENS tokens from a 16-token prompt,
   twice each, in turns), and the winners are kept only if that run agrees by --min_gain.
   The winners are written into teal_kernels/tuned_configs.json (atomically; not with --dry_run)
   with their step times ("step_us"). A report goes to --out (JSON + Markdown).

The step decodes at a fixed position (--context tokens of cache): the next token's cache slot is
rewritten by every replay, so the attention's length stays the same for every candidate.

The check is not the last word. On the H200 (2026-12-04, results/step_tune/) it agreed with
bench_decode for int8: +0.3-1.1% per shape here, +1.6% there. For int4's gate|up it disagreed: a
tie / +1.2% here, -7% / -6% in bench_decode. The cause is not known. So keep the table this writes
only after bench_decode agrees: --e2e_check asks it in the same process, or run an A/B of the two
tables (h200_session.sh step_small runs both).

    python -m benchmarks.tune_step --model Llama-3-8B --weights int8+lm_head --jobs 16
    python -m benchmarks.tune_step --model Llama-3-8B --weights int4-g128 --kinds dot --min_block_k 2048
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from benchmarks.bench_decode import apply_weights, parse_weights, set_level, time_decode
from benchmarks.timing import decode_fusions
from benchmarks.tune_kernels import KINDS, build_problems, candidates, fitted, is_correct, precompile, time_config, \
    write_atomically
from files import atomic_path, check_writable
from generate import Sampling, decode_one_token, random_model, self_calibrated_thresholds
from decode import install_fused_decode
from linear import PROJECTION_TABLE, projection_splits
from model import ModelArgs, Transformer
from teal_kernels import triton_gemv
from teal_kernels.reference import FMT_FLOAT, FMT_INT8, sparse_gemv_reference
from teal_kernels.triton_gemv import TUNED_CONFIGS_PATH, KernelConfig, config_key

# a decoder projection's module path -> its role in benchmarks.timing (DECODE_FUSIONS, MODEL_SHAPES)
ROLES = {"attention.wqkv": "qkv", "attention.wo": "o", "feed_forward.w13": "gate_up", "feed_forward.w2": "down"}


def decode_shapes(model: Transformer) -> list[tuple[str, int, list[int]]]:
    """(role, K, output segment widths) of each decoder projection; every layer has layer 0's."""
    splits = projection_splits(model)
    return [(ROLES[path], model.get_submodule(f"layers.0.{path}").in_features, splits[f"layers.0.{path}"])
            for path in PROJECTION_TABLE]


def table_format(weights: str) -> str:
    """The config table's name of a --weights value's projection format: bf16, int8 or int4-gN."""
    mode, group, _ = parse_weights(weights)
    return f"int4-g{group}" if mode == "int4" else mode


def shortlist(fmt: str, role: str, k: int, splits: list[int], level: float, stored: KernelConfig | None,
              top: int, kinds: list[str] | None, min_block_k: int,
              accept: Callable[[KernelConfig], bool] | None = None) -> dict[KernelConfig, float]:
    """The `top` configs of the tuner's grid fastest alone at `level` (called as the decode step calls
    the shape), and the stored one (fitted): config -> µs alone. `accept` narrows the grid (o
    computing its own attention: the configs its prologue takes)."""
    fusions = decode_fusions(role, fmt, 1)
    problems = build_problems(fmt, 1, k, splits, level, fusions)
    ref = sparse_gemv_reference(*problems[0].args(), **problems[0].fusion).float()
    grid = [c for c in candidates(fmt, 1, k, splits, False, stored, kinds, min_block_k)
            if (accept is None or accept(c)) and is_correct(c, problems[0], ref)]
    alone = {c: time_config(c, problems) for c in grid}
    keep = sorted(grid, key=alone.get)[:top]
    if stored in alone and stored not in keep:
        keep.append(stored)
    return {c: alone[c] for c in keep}


def attention_configs(model: Transformer, fmt: str) -> Callable[[KernelConfig], bool] | None:
    """With TEAL_ATTENTION_O=1 (read when the model's projections were built), o's step computes its
    attention in o's GEMV, and the step is compiled once with that decision in it: only the configs
    whose K blocks the prologue takes can run there. None when o runs without it."""
    o = model.get_submodule("layers.0.attention.wo")
    if not o.attention_allowed or fmt.startswith("int4"):  # int4's o never takes the prologue
        return None
    cfg = model.config
    code = FMT_INT8 if fmt == "int8" else FMT_FLOAT
    return lambda c: triton_gemv.attention_prologue_fits(c, code, 1, cfg.n_head, cfg.n_local_heads, cfg.head_dim)


def use_config(key: str, config: KernelConfig | None) -> None:
    """Make `config` (None: the heuristic's) the one the kernel op takes for table key `key` from its
    next launch on, at every level (a dense call's own config, "dense_config", is dropped): the op
    looks its config up at each launch, through a per-shape cache cleared here."""
    table = triton_gemv._tuned_table()
    if config is None:
        table.pop(key, None)
    else:
        entry = {k: v for k, v in table.get(key, {}).items() if k not in ("dense_config", "dense_us")}
        table[key] = {**entry, "config": config.to_dict()}
    triton_gemv._planned_config.cache_clear()


class StepGraphs:
    """The decode step as CUDA graphs: `capture` records one with the configs in force, `median_us`
    replays several in turns (so that drift reaches every one alike) and gives each one's median
    µs per step."""

    def __init__(self, run_step: Callable[[], object], rounds: int, steps: int) -> None:
        self.run_step, self.rounds, self.steps = run_step, rounds, steps

    def capture(self) -> torch.cuda.CUDAGraph:
        """After two warm-up steps on a side stream (kernel compilation, cuBLAS workspaces)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.run_step()
        return graph

    @staticmethod
    def replay_us(graph: torch.cuda.CUDAGraph, steps: int) -> float:
        """µs per step of `steps` back-to-back replays."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / steps

    def median_us(self, graphs: dict) -> dict:
        for graph in graphs.values():  # warm
            self.replay_us(graph, 8)
        samples: dict = {name: [] for name in graphs}
        for _ in range(self.rounds):
            for name, graph in graphs.items():
                samples[name].append(self.replay_us(graph, self.steps))
        return {name: statistics.median(v) for name, v in samples.items()}


def pick(step_us: dict[KernelConfig, dict[float, float]], stored: KernelConfig | None,
         min_gain: float) -> KernelConfig:
    """The candidate with the lowest step time summed over the levels, if it beats the stored
    config by more than `min_gain` (a fraction); else the stored one (when it was timed)."""
    total = {c: sum(v.values()) for c, v in step_us.items()}
    best = min(total, key=total.get)
    if stored in total and total[best] > total[stored] * (1 - min_gain):
        return stored
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-3-8B", help="shape from model.MODEL_CONFIGS (random weights)")
    p.add_argument("--weights", default="bf16", help="bf16, int8, int4-gN, optionally +lm_head (as bench_decode.py)")
    p.add_argument("--sparsity", type=float, nargs="+", default=None,
                   help="levels whose summed step time picks a config (default: 0.4 0.5 0.65 for bf16, whose dense "
                        "calls run in cuBLAS; 0 0.5 for int8 / int4, as tune_kernels.py)")
    p.add_argument("--shapes", nargs="+", default=list(ROLES.values()), choices=list(ROLES.values()),
                   help="projections to tune (the others keep their stored configs): split a long run")
    p.add_argument("--top", type=int, default=4, help="configs per shape, fastest alone, timed in the step")
    p.add_argument("--kinds", nargs="+", default=None, metavar="KIND", choices=KINDS,
                   help="shortlist only from these kinds (and the stored config), as tune_kernels.py --kinds")
    p.add_argument("--min_block_k", type=int, default=0, metavar="ROWS",
                   help="shortlist only from K blocks of at least ROWS rows, as tune_kernels.py --min_block_k")
    p.add_argument("--rounds", type=int, default=5, help="turns over a shape's graphs (median reported)")
    p.add_argument("--steps", type=int, default=100, help="decode steps replayed per turn")
    p.add_argument("--context", type=int, default=128, help="tokens in the KV cache at the timed step")
    p.add_argument("--calib_tokens", type=int, default=2048, help="random tokens for the thresholds")
    p.add_argument("--min_gain", type=float, default=0.003,
                   help="a fraction of the step: the stored config stays unless a candidate beats it by more")
    p.add_argument("--jobs", type=int, default=0, help="compile the shortlist's grid in this many processes first")
    p.add_argument("--e2e_check", type=int, default=0, metavar="TOKENS",
                   help="also time both tables as bench_decode.py does (TOKENS decoded tokens, recompiled per "
                        "table; ~30 s a run) and keep the winners only if that agrees (default 0: off)")
    p.add_argument("--dry_run", action="store_true", help="report only; leave tuned_configs.json as it is")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_step"),
                   help="report prefix: writes <out>.json and <out>.md")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: tune_step.py needs a CUDA GPU")
    if args.e2e_check < 0:
        p.error(f"--e2e_check must be >= 0, got {args.e2e_check}")
    for name in ("top", "rounds", "steps", "context"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.min_block_k < 0 or not 0 <= args.min_gain < 1:
        p.error("--min_block_k must be >= 0 and --min_gain in [0, 1)")
    fmt = table_format(args.weights)
    try:
        ModelArgs.from_name(args.model)
    except ValueError as e:
        sys.exit(f"error: {e}")
    levels = args.sparsity or ([0.4, 0.5, 0.65] if fmt == "bf16" else [0.0, 0.5])
    try:
        for suffix in (".json", ".md"):
            check_writable(args.out.with_suffix(suffix))
        if not args.dry_run:
            check_writable(TUNED_CONFIGS_PATH)
    except OSError as e:
        sys.exit(f"error: {e}")
    device = torch.device("cuda")
    model = random_model(args.model, torch.bfloat16, device)
    apply_weights(model, args.weights)
    thresholds = {level: self_calibrated_thresholds(model, level, args.calib_tokens) for level in levels if level > 0}
    install_fused_decode(model)
    step = torch.compile(decode_one_token, fullgraph=True)  # graphs captured here, not by Inductor
    torch._dynamo.config.cache_size_limit = 64  # one graph per level
    model.setup_caches(1, args.context + 8)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.tensor([args.context], device=device)
    with torch.no_grad():
        model(torch.randint(model.config.vocab_size, (1, args.context), device=device),
              torch.arange(args.context, device=device))
        graphs = StepGraphs(lambda: step(model, token, pos, Sampling()), args.rounds, args.steps)

        def end_to_end() -> float:
            """bench_decode's tok/s with the configs in force (a fresh compile: its graphs keep them)."""
            torch._dynamo.reset()
            compiled = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
            return statistics.median(time_decode(model, compiled, args.e2e_check, runs=2))

        report = tune(model, fmt, levels, thresholds, graphs, args, end_to_end=end_to_end if args.e2e_check else None)
    write_report(args, levels, report, torch.cuda.get_device_name())


def tune(model: Transformer, fmt: str, levels: list[float], thresholds: dict[float, dict], graphs: StepGraphs,
         args: argparse.Namespace, table_path: Path = TUNED_CONFIGS_PATH,
         end_to_end: Callable[[], float] | None = None) -> dict:
    """Shortlist each shape alone, time the shortlist in the step level by level (`graphs`), pick,
    check the winners together against the stored table (and, given `end_to_end`, the decode's
    tok/s with the configs in force, as bench_decode measures it), write the table unless
    args.dry_run or the end-to-end check finds no gain."""
    device_name = triton_gemv.gpu_name(model.norm.weight.device)
    stored_table = copy.deepcopy(triton_gemv._tuned_table())  # as read, before use_config changes it
    shapes = [shape for shape in decode_shapes(model) if shape[0] in args.shapes]
    keys = {role: config_key(device_name, fmt, 1, k, sum(splits)) for role, k, splits in shapes}
    # as the op runs them (an entry stored before fitting existed may differ from its fitted form)
    stored = {role: fitted([KernelConfig.from_dict(stored_table[keys[role]]["config"])], fmt, 1, k, splits)[0]
              if keys[role] in stored_table else None for role, k, splits in shapes}

    if args.jobs > 0:
        precompile([(fmt, 1, k, tuple(splits), decode_fusions(role, fmt, 1), c.to_dict())
                    for role, k, splits in shapes
                    for c in candidates(fmt, 1, k, splits, False, stored[role], args.kinds, args.min_block_k)],
                   args.jobs)
    alone = {}
    for role, k, splits in shapes:
        alone[role] = shortlist(fmt, role, k, splits, max(levels), stored[role], args.top, args.kinds,
                                args.min_block_k, attention_configs(model, fmt) if role == "o" else None)
        print(f"{role}: shortlist {[round(t, 2) for t in alone[role].values()]} µs alone", flush=True)

    def use_table(configs: dict[str, KernelConfig | None]) -> None:
        for role, config in configs.items():
            use_config(keys[role], config)

    def graph_of(configs: dict[str, KernelConfig | None]):
        use_table(configs)
        return graphs.capture()

    step_us: dict[str, dict[KernelConfig, dict[float, float]]] = {role: {} for role in keys}
    for level in levels:  # one shape at a time, the others at their stored configs
        set_level(model, level, args.calib_tokens, thresholds.get(level))
        for role in keys:
            timed = graphs.median_us({config: graph_of({**stored, role: config}) for config in alone[role]})
            for config, us in timed.items():
                step_us[role].setdefault(config, {})[level] = us
            print(f"level {level} {role}: step µs {[round(v[level], 1) for v in step_us[role].values()]}", flush=True)
    winners = {role: pick(step_us[role], stored[role], args.min_gain) for role in keys}
    check = {}  # all winners together against the stored table, per level
    for level in levels:
        set_level(model, level, args.calib_tokens, thresholds.get(level))
        check[level] = graphs.median_us({"stored": graph_of(stored), "step-tuned": graph_of(winners)})
    e2e = {}  # tok/s per level, the two tables in turns (int4's gate|up: the step graphs tied, bench_decode -7%)
    if end_to_end is not None:
        for level in levels:
            set_level(model, level, args.calib_tokens, thresholds.get(level))
            samples: dict[str, list[float]] = {"stored": [], "step-tuned": []}
            for _ in range(2):
                for name, configs in (("stored", stored), ("step-tuned", winners)):
                    use_table(configs)
                    samples[name].append(end_to_end())
            e2e[level] = {name: statistics.median(v) for name, v in samples.items()}
    summed = {name: sum(v[name] for v in e2e.values()) for name in ("stored", "step-tuned")}
    adopted = not e2e or summed["step-tuned"] > summed["stored"] * (1 + args.min_gain)

    table = copy.deepcopy(stored_table)
    for role in keys:
        table[keys[role]] = {**table.get(keys[role], {}), "config": winners[role].to_dict(),
                             "step_us": {str(lv): round(us, 1) for lv, us in step_us[role][winners[role]].items()},
                             "step_tuned": datetime.date.today().isoformat()}
    if adopted and not args.dry_run:
        write_atomically(table_path, table)
    return {
        "shapes": {role: {"key": keys[role],
                          "stored": stored[role] and stored[role].to_dict(),
                          "winner": winners[role].to_dict(),
                          "candidates": [{"config": c.to_dict(), "us_alone": round(alone[role][c], 2),
                                          "step_us": {str(lv): round(us, 1) for lv, us in step_us[role][c].items()}}
                                         for c in alone[role]]}
                   for role in keys},
        "check": {str(level): {name: round(us, 1) for name, us in v.items()} for level, v in check.items()},
        "end_to_end_tok_s": {str(level): {name: round(t, 1) for name, t in v.items()} for level, v in e2e.items()},
        "adopted": adopted,
    }


def write_report(args: argparse.Namespace, levels: list[float], report: dict, gpu: str) -> None:
    """<out>.json (the report and the run's setting) and <out>.md (a table per candidate, then the check);
    prints the check."""
    meta = {"gpu": gpu, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv), "model": args.model, "weights": args.weights, "levels": levels}
    with atomic_path(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**meta, **report}, indent=1) + "\n")
    lines = [f"# Step-tuned configs, {args.model} {args.weights} — {meta['gpu']}, torch {meta['torch']}, "
             f"{meta['date']}",
             "", f"`{meta['command']}`", "",
             "| shape | config | alone µs | " + " | ".join(f"step µs at {lv}" for lv in levels) + " | |",
             "|---|---|---|" + "---|" * len(levels) + "---|"]
    for role, shape in report["shapes"].items():
        for c in shape["candidates"]:
            mark = ("winner" if c["config"] == shape["winner"] else "") + \
                   (" stored" if c["config"] == shape["stored"] else "")
            cfg = ", ".join(f"{k}={v}" for k, v in c["config"].items())
            lines.append(f"| {role} | {cfg} | {c['us_alone']} | "
                         + " | ".join(str(c["step_us"].get(str(lv), "")) for lv in levels) + f" | {mark.strip()} |")
    lines += ["", "All winners together against the stored table (µs per step, tok/s):", "",
              "| level | stored | step-tuned |", "|---|---|---|"]
    for level, v in report["check"].items():
        lines.append(f"| {level} | {v['stored']} ({1e6 / v['stored']:.1f}) | {v['step-tuned']} "
                     f"({1e6 / v['step-tuned']:.1f}) |")
    if report["end_to_end_tok_s"]:
        lines += ["", "The same two tables as bench_decode times a decode (tok/s, median of two runs each, in turns):", "",
                  "| level | stored | step-tuned |", "|---|---|---|"]
        lines += [f"| {level} | {v['stored']} | {v['step-tuned']} |" for level, v in report["end_to_end_tok_s"].items()]
    lines += ["", "Table written." if report["adopted"] and not args.dry_run else
              "Table not written: " + ("--dry_run." if report["adopted"] else "the end-to-end check found no gain.")]
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    start = lines.index("All winners together against the stored table (µs per step, tok/s):")
    print("\n".join(lines[start:]))


if __name__ == "__main__":
    main()
