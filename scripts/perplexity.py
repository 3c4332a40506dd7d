"""Perplexity under TEAL, with the fixed protocol of the project's quality reference.

Float32; the whole text tokenized without BOS; window k is ids[L*k : L*k+L] with no carried
context; the loss covers the L-1 next-token targets of every window; every token is sparsified,
the prompt included (sparse_prefill), so the number measures what the thresholds do to the model.

    python scripts/perplexity.py --text eval.txt --sparsity 0 0.25 0.5
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

# cli before torch: a Ctrl-C during the slow imports below is then one line too (cli.py)
from cli import DEFAULT_CHECKPOINT, FRACTION, ArgumentParser, int_at_least, run_main

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from checkpoint import load_model, resolve_checkpoint
from files import check_writable, write_json
from teal import densify, load_thresholds, sparsify
from teal.calibration import read_text, text_windows
from teal.sparsify import SparsityMeter
from tokenizer import load_tokenizer


@torch.no_grad()
def perplexity(model: nn.Module, ids: list[int] | Tensor, window_len: int = 512, n_windows: int = 64,
               batch: int = 4) -> float:
    """exp(mean next-token NLL) over windows k < n_windows of ids[L*k : L*k+L], each from scratch."""
    windows = text_windows(ids, n_windows, window_len)
    device = model.norm.weight.device
    pos = torch.arange(window_len, device=device)
    nll = 0.0
    for chunk in tqdm(windows.split(batch), desc="perplexity", leave=False):
        chunk = chunk.to(device)
        model.setup_caches(chunk.shape[0], window_len)
        logits = model(chunk, pos)[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return math.exp(nll / (n_windows * (window_len - 1)))


def evaluate(model: nn.Module, ids: list[int], sparsity: float, thresholds: Path | None,
             allocation: str, window_len: int, n_windows: int, batch: int) -> dict:
    """One row: perplexity and the realized sparsity measured on the same windows."""
    if thresholds is None:
        if sparsity > 0:
            raise ValueError(f"sparsity {sparsity} needs --thresholds (run calibrate.py first)")
        densify(model)
        return {"sparsity": 0.0, "allocation": "dense", "perplexity": perplexity(
            model, ids, window_len, n_windows, batch), "realized": {"parameter_weighted": 0.0}}
    sparsify(model, load_thresholds(thresholds, model, sparsity, allocation), sparse_prefill=True)
    try:
        with SparsityMeter(model) as meter:
            ppl = perplexity(model, ids, window_len, n_windows, batch)
    finally:
        densify(model)
    return {"sparsity": sparsity, "allocation": allocation, "perplexity": ppl, "realized": meter.result()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="converted checkpoint folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--text", type=Path, required=True, help="evaluation text, any UTF-8 file")
    p.add_argument("--sparsity", type=FRACTION, nargs="+", default=[0.0],
                   help="parameter-weighted TEAL sparsity levels to evaluate, each in [0, 1)")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="thresholds file from calibrate.py, read for any sparsity > 0 "
                        "(default: <checkpoint>/teal_thresholds.safetensors)")
    p.add_argument("--allocation", choices=["uniform", "greedy", "uniform-dense"], default="uniform",
                   help="allocation in the thresholds file")
    p.add_argument("--windows", type=int_at_least(1), default=64, help="number of windows to score")
    p.add_argument("--window_len", type=int_at_least(2), default=512, help="tokens per window")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="windows per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on (float32)")
    p.add_argument("--output", type=Path, default=None, help="also write the rows to this JSON file")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    folder = resolve_checkpoint(args.checkpoint_path)[0]
    if args.output is not None:
        check_writable(args.output)
    thresholds = None
    if max(args.sparsity) > 0:
        thresholds = args.thresholds or folder / "teal_thresholds.safetensors"
        if not thresholds.is_file():
            raise FileNotFoundError(f"no thresholds file at {thresholds}: run calibrate.py first, "
                                    "or pass --thresholds")
    ids = load_tokenizer(folder).encode(read_text(args.text))
    text_windows(ids, args.windows, args.window_len)  # fail on a short text before loading the model
    model = load_model(args.checkpoint_path, device=args.device, dtype=torch.float32)
    if thresholds is not None:  # a foreign or broken file fails before any evaluation
        load_thresholds(thresholds, model, max(args.sparsity), args.allocation)
    rows = []
    for s in args.sparsity:
        row = evaluate(model, ids, s, thresholds, args.allocation, args.window_len, args.windows,
                       args.batch)
        print(f"sparsity {s:.2f} ({row['allocation']}): perplexity {row['perplexity']:.3f}, "
              f"realized {row['realized']['parameter_weighted']:.3f}")
        rows.append(row)
    if args.output is not None:
        write_json(args.output, {"text": str(args.text), "windows": args.windows,
                                 "window_len": args.window_len, "rows": rows})
    return rows


if __name__ == "__main__":
    run_main(lambda: run(parse_args()))
