"""Calibrate TEAL thresholds for a checkpoint on a text file and write one thresholds file.

    python calibrate.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --text my_text.txt

The file (format in teal/thresholds.py) holds three allocations, each a path of levels that
`teal.load_thresholds` can be asked any level of: "uniform" and "greedy" (corrected so that the
realized sparsity matches the target) and "uniform-dense" (the reference protocol's thresholds).
How each is computed: teal/calibration.py.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

# cli before torch: a Ctrl-C during the slow imports below is then one line too (cli.py)
from cli import DEFAULT_CHECKPOINT, FRACTION, ArgumentParser, UserError, float_in, int_at_least, run_main

import torch

from checkpoint import load_model, resolve_checkpoint
from files import check_writable
from teal.calibration import calibrate, read_text, text_windows
from teal.thresholds import save_thresholds
from tokenizer import load_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="converted checkpoint folder (config.json, model.safetensors, tokenizer)")
    p.add_argument("--text", type=Path, default=None,
                   help="calibration text, any UTF-8 file; tokenized whole, without BOS (required unless "
                        "--random_weights)")
    p.add_argument("--output", type=Path, default=None,
                   help="thresholds file to write (default: CHECKPOINT/teal_thresholds.safetensors)")
    p.add_argument("--tokens", type=int_at_least(2), default=4096,
                   help="calibration tokens: the first TOKENS // WINDOW_LEN windows of the text")
    p.add_argument("--window_len", type=int_at_least(2), default=512,
                   help="tokens per window; every window starts from an empty context")
    p.add_argument("--batch", type=int_at_least(1), default=4, help="windows per forward pass (memory vs speed)")
    p.add_argument("--methods", nargs="+", choices=["uniform", "greedy"], default=["uniform", "greedy"],
                   help="allocations to calibrate ('uniform-dense' is always written: it costs nothing)")
    p.add_argument("--max_sparsity", type=FRACTION, default=0.9,
                   help="highest parameter-weighted sparsity on the uniform/greedy paths, in [0, 1)")
    p.add_argument("--level_step", type=float_in(0, 1, low_open=True, high_open=True), default=0.1,
                   help="spacing of the path points; levels in between are interpolated at load time")
    p.add_argument("--correction_tokens", type=int_at_least(1), default=1024,
                   help="tokens (the first calibration windows, run as one batch) on which uniform and "
                        "greedy thresholds are set layer by layer with upstream layers sparsified")
    p.add_argument("--greedy_tokens", type=int_at_least(1), default=128,
                   help="tokens per block on which greedy measures the block-output error")
    p.add_argument("--greedy_step", type=float_in(0, 1, low_open=True, high_open=True), default=0.1,
                   help="sparsity increment of one projection per greedy step")
    p.add_argument("--greedy_exact", action="store_true",
                   help="re-score every projection at every greedy step instead of lazily (~4x slower)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to calibrate on (float32 throughout)")
    p.add_argument("--random_weights", metavar="MODEL_NAME",
                   help="no checkpoint, no text: random weights at a named shape (e.g. Llama-3-8B) on random "
                        "tokens, to time calibration where real weights cannot go; needs --output")
    args = p.parse_args(argv)
    if args.text is None and not args.random_weights:
        p.error("--text is required (or --random_weights for a timing run)")
    if args.random_weights and args.output is None:
        p.error("--random_weights needs --output (there is no checkpoint folder to write into)")
    return args


def random_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, list[int]]:
    """A float32 model of the named shape with random weights, and random token ids: what a
    timing run of calibration needs (its thresholds only fit that random model)."""
    from generate import random_model  # the speed-test model generate.py and the benchmarks use

    try:
        model = random_model(args.random_weights, torch.float32, args.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    ids = torch.randint(model.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    return model, ids.tolist()


def run(args: argparse.Namespace) -> Path:
    if args.random_weights:
        output = check_writable(args.output)
        model, ids = random_inputs(args)
    else:
        folder, weights = resolve_checkpoint(args.checkpoint_path)  # a folder, or a (quantized) file in one
        output = check_writable(args.output or folder / "teal_thresholds.safetensors", weights, args.text)
        ids = load_tokenizer(folder).encode(read_text(args.text))
        model = load_model(args.checkpoint_path, device=args.device, dtype=torch.float32)
    windows = text_windows(ids, args.tokens // args.window_len, args.window_len)
    n_win = windows.shape[0]
    greedy_windows = (windows[: max(1, min(n_win, args.greedy_tokens // args.window_len))]
                      if args.greedy_tokens >= args.window_len else windows[:1, : args.greedy_tokens])
    grid = torch.arange(0, args.max_sparsity + 1e-9, args.level_step, dtype=torch.float64)
    start = time.perf_counter()
    allocations = calibrate(
        model, windows, args.batch, grid, args.methods,
        correction_windows=max(1, args.correction_tokens // args.window_len),
        greedy_windows=greedy_windows, greedy_step=args.greedy_step, greedy_exact=args.greedy_exact,
        dense_grid=torch.arange(0, 0.99 + 1e-9, 0.01, dtype=torch.float64))
    seconds = time.perf_counter() - start
    save_thresholds(output, model, allocations, {
        "text": str(args.text) if args.text else f"random tokens (--random_weights {args.random_weights})",
        "text_sha256": hashlib.sha256(args.text.read_bytes()).hexdigest() if args.text else "",
        "text_tokens": len(ids), "tokens": windows.numel(), "window_len": args.window_len,
        "batch": args.batch, "methods": args.methods,
        "correction_tokens": min(n_win, max(1, args.correction_tokens // args.window_len)) * args.window_len,
        "greedy_tokens": greedy_windows.numel(), "greedy_step": args.greedy_step,
        "greedy_exact": args.greedy_exact,
        "device": str(args.device), "dtype": "float32", "seconds": round(seconds, 1)})
    print(f"wrote {output} ({', '.join(allocations)}; {seconds:.0f} s)")
    return output


if __name__ == "__main__":
    run_main(lambda: run(parse_args()))
