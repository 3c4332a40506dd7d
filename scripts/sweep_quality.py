"""Quality sweep: perplexity and realized sparsity of TEAL (uniform, greedy) against CATS.

Calibrates once on the calibration text (calibrate.py), then scores the evaluation text with the
protocol of scripts/perplexity.py for: dense; TEAL "uniform" and "greedy" (thresholds corrected
for upstream sparsity); "uniform-dense" (the reference protocol, dense-model quantiles); and CATS.
Writes quality.json, quality.md and quality.png to --out_dir.

CATS (Lee et al. 2024) sparsifies only the MLP: it zeroes the intermediate entries whose
|SiLU(gate)| is at most a per-layer threshold, so up's and down's weights for them are not read.
PackedLinear thresholds |x| of its own input, so CATS is realized here by a forward hook on w13
that zeroes those gate entries (SiLU(0) = 0 zeroes the product); its model-wide sparsity counts
the skipped up and down weights over all seven projections, as in BACKGROUND.md.

    python scripts/sweep_quality.py   # about 30-60 min on 2 CPU cores; log with `2>&1 | tee`
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import calibrate
from checkpoint import load_model
from cli import DEFAULT_CHECKPOINT, ArgumentParser, run_main
from files import atomic_path, write_json
from linear import PROJECTIONS
from scripts.perplexity import evaluate, perplexity
from teal.calibration import LogHistogram, read_text, stream, text_windows
from teal.sparsify import segment_weights
from teal.thresholds import read_thresholds
from tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# BACKGROUND.md: independent HF-transformers implementation, uniform-dense protocol.
REFERENCE = {0.0: 30.34, 0.25: 30.74, 0.40: 36.60, 0.50: 52.38, 0.65: 405.0}
REFERENCE_CATS_025 = 39.90
METHODS = ("uniform-dense", "uniform", "greedy", "CATS")


def cats_share(model: nn.Module) -> float:
    """Share of the decoder projection weights that CATS can skip (up and down)."""
    w = segment_weights(model).view(len(model.layers), -1)
    cols = [PROJECTIONS.index("up"), PROJECTIONS.index("down")]
    return float(w[:, cols].sum() / w.sum())


def _gate(module: nn.Module, out: Tensor) -> Tensor:
    return out[..., : out.shape[-1] // 2]


@torch.no_grad()
def cats_histogram(model: nn.Module, windows: Tensor, batch: int) -> LogHistogram:
    """Per layer, the histogram of |SiLU(gate)| on the calibration windows (dense model)."""
    hist = LogHistogram(len(model.layers), device=model.norm.weight.device)
    handles = [layer.feed_forward.w13.register_forward_hook(
        lambda mod, args, out, i=i: hist.add(i, F.silu(_gate(mod, out))))
        for i, layer in enumerate(model.layers)]
    try:
        stream(model, windows, batch, "CATS histograms")
    finally:
        for h in handles:
            h.remove()
    return hist


@torch.no_grad()
def cats_perplexity(model: nn.Module, ids: list[int], thresholds: list[float], window_len: int,
                    n_windows: int, batch: int) -> tuple[float, float]:
    """(perplexity, fraction of MLP intermediate entries zeroed) with CATS on every token."""
    counts = torch.zeros(2, dtype=torch.float64)

    def hook(i: int):
        def zero_small_gates(mod: nn.Module, args: tuple, out: Tensor) -> Tensor:
            gate = _gate(mod, out)
            small = F.silu(gate).abs() <= thresholds[i]
            counts[0] += small.sum().item()
            counts[1] += small.numel()
            return torch.cat([gate.masked_fill(small, 0.0), out[..., gate.shape[-1]:]], dim=-1)
        return zero_small_gates

    handles = [layer.feed_forward.w13.register_forward_hook(hook(i)) for i, layer in enumerate(model.layers)]
    try:
        ppl = perplexity(model, ids, window_len, n_windows, batch)
    finally:
        for h in handles:
            h.remove()
    return ppl, float(counts[0] / counts[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="converted checkpoint folder")
    p.add_argument("--calib_text", type=Path, default=DATA / "wikitext2-calib.txt",
                   help="calibration text (never the evaluation text)")
    p.add_argument("--eval_text", type=Path, default=DATA / "wikitext2-eval.txt", help="evaluation text")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="thresholds file to write (default: CHECKPOINT/teal_thresholds_sweep.safetensors, "
                        "so generate.py's default file is left alone)")
    p.add_argument("--reuse", action="store_true",
                   help="skip calibration and use the existing --thresholds file (its recorded "
                        "calibration time is reported)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to score (dense is scored unless --update keeps its row)")
    p.add_argument("--update", action="store_true",
                   help="keep the rows of the methods not scored now from OUT_DIR/quality.json (re-score "
                        "one method after changing it; the thresholds file must be the same calibration)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.40, 0.50, 0.65],
                   help="parameter-weighted sparsity levels to score (0 = dense is always scored)")
    p.add_argument("--windows", type=int, default=64, help="evaluation windows (protocol: 64)")
    p.add_argument("--window_len", type=int, default=512, help="tokens per window (protocol: 512)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--calib_tokens", type=int, default=8192, help="calibration tokens (protocol: 8192)")
    p.add_argument("--out_dir", type=Path, default=Path("docs/quality"), help="where results go")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    thr_path = args.thresholds or args.checkpoint_path / "teal_thresholds_sweep.safetensors"
    if not args.reuse:
        calibrate.run(calibrate.parse_args([
            "--checkpoint_path", str(args.checkpoint_path), "--text", str(args.calib_text),
            "--output", str(thr_path), "--tokens", str(args.calib_tokens), "--window_len", str(args.window_len),
            "--batch", str(args.batch), "--device", "cpu"]))
    meta, _ = read_thresholds(thr_path)
    model = load_model(args.checkpoint_path, device="cpu", dtype=torch.float32)
    tokenizer = load_tokenizer(args.checkpoint_path)
    ids = tokenizer.encode(read_text(args.eval_text))
    calib_ids = tokenizer.encode(read_text(args.calib_text))
    share = cats_share(model)
    result = {"model": str(args.checkpoint_path), "eval_text": str(args.eval_text),
              "windows": args.windows, "window_len": args.window_len, "calibration": meta["calibration"],
              "allocations": meta["allocations"], "cats_share": share,
              "reference": {str(k): v for k, v in REFERENCE.items()}, "rows": []}
    if args.update:
        old = json.loads((args.out_dir / "quality.json").read_text())
        result["rows"] = [r for r in old["rows"] if r["method"] not in args.methods]

    def record(row: dict, method: str, seconds: float) -> None:
        """Keep the row and rewrite the outputs, so an interrupted sweep still leaves its results."""
        row.update(method=method, seconds=round(seconds, 1))
        result["rows"].append(row)
        print(f"{method:>14} s={row['sparsity']:.2f}: ppl {row['perplexity']:.3f}, realized "
              f"{row['realized']['parameter_weighted']:.3f} ({seconds:.0f} s)", flush=True)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(args.out_dir / "quality.json", result)
        write_markdown(args.out_dir / "quality.md", result)
        plot(args.out_dir / "quality.png", result)

    if not any(r["method"] == "dense" for r in result["rows"]):
        t = time.perf_counter()
        record(evaluate(model, ids, 0.0, None, "dense", args.window_len, args.windows, args.batch), "dense",
               time.perf_counter() - t)
    for method in [m for m in METHODS if m != "CATS" and m in args.methods]:
        for s in args.levels:
            t = time.perf_counter()
            row = evaluate(model, ids, s, thr_path, method, args.window_len, args.windows, args.batch)
            record(row, method, time.perf_counter() - t)
    if "CATS" not in args.methods:
        return result
    calib_windows = text_windows(calib_ids, args.calib_tokens // args.window_len, args.window_len)
    cats_hist = cats_histogram(model, calib_windows, args.batch)
    for s in args.levels:
        mlp = s / share
        if mlp >= 1.0:
            print(f"{'CATS':>14} s={s:.2f}: unreachable (MLP sparsity {mlp:.2f} >= 1)")
            continue
        t = time.perf_counter()
        thresholds = [float(cats_hist.quantiles(i, torch.tensor([mlp]))[0]) for i in range(len(model.layers))]
        ppl, zeroed = cats_perplexity(model, ids, thresholds, args.window_len, args.windows, args.batch)
        record({"sparsity": s, "allocation": f"CATS (MLP {mlp:.2f})", "perplexity": ppl,
                "realized": {"parameter_weighted": zeroed * share, "mlp_intermediate": zeroed}},
               "CATS", time.perf_counter() - t)
    return result


def write_markdown(path: Path, result: dict) -> None:
    """One row per level; each cell is perplexity (realized parameter-weighted sparsity on eval)."""
    cal = result["calibration"]
    rows = {(r["method"], round(r["sparsity"], 4)): r for r in result["rows"]}
    levels = sorted({round(r["sparsity"], 4) for r in result["rows"]})
    lines = [
        "# TEAL quality on SmolLM2-135M-Instruct",
        "",
        f"Perplexity on `{Path(result['eval_text']).name}`: {result['windows']} windows of "
        f"{result['window_len']} tokens, float32, every token sparsified (prompt included). Calibration: "
        f"{cal['tokens']} tokens of `{Path(cal['text']).name}` (sha256 {cal['text_sha256'][:12]}), "
        f"{cal['seconds']:.0f} s on {cal['device']} (dense histograms, greedy on {cal['greedy_tokens']} "
        f"tokens per block, sequential thresholds on {cal['correction_tokens']} tokens per level). "
        "Each cell: perplexity (realized parameter-weighted sparsity on the evaluation windows).",
        "",
        "| target s | " + " | ".join(METHODS) + " | reference uniform-dense (BACKGROUND.md) |",
        "|---" * (len(METHODS) + 2) + "|",
    ]
    for s in levels:
        cells = []
        for m in METHODS:
            r = rows.get(("dense", s)) if s == 0 else rows.get((m, s))
            cells.append(f"{r['perplexity']:.2f} ({r['realized']['parameter_weighted']:.3f})" if r else "-")
        ref = REFERENCE.get(round(s, 2))
        lines.append(f"| {s:.2f} | " + " | ".join(cells) + f" | {ref if ref is not None else '-'} |")
    lines += [
        "",
        "- `uniform-dense`: the reference protocol, every segment at the s-quantile of the dense model's "
        "activations; upstream sparsity shrinks downstream activations, so it overshoots its target.",
        "- `uniform` / `greedy`: thresholds set layer by layer with the upstream layers already "
        "sparsified, so the realized sparsity lands on the target; `greedy` is TEAL's block-wise "
        "allocation.",
        f"- CATS: zeroes MLP intermediate entries whose |SiLU(gate)| is small; its level counts the "
        f"skipped up+down weights ({100 * result['cats_share']:.0f}% of the projection weights), so it "
        f"stays below {100 * result['cats_share']:.0f}% on this model. Reference at 0.25: "
        f"{REFERENCE_CATS_025}.",
        "",
    ]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def plot(path: Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = next(r for r in result["rows"] if r["method"] == "dense")
    for method, marker in zip(METHODS, "^osx"):
        rows = [dense] + [r for r in result["rows"] if r["method"] == method]
        ax.plot([r["realized"]["parameter_weighted"] for r in rows], [r["perplexity"] for r in rows],
                marker=marker, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("realized parameter-weighted sparsity (eval text)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("TEAL on SmolLM2-135M-Instruct, WikiText-2 eval")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(lambda: run(parse_args()))
