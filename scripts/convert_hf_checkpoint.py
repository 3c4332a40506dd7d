"""Convert a Hugging Face Llama/Mistral folder (safetensors shards or .bin) to our checkpoint:
model.safetensors with fused q|k|v and gate|up, Q/K rows in interleaved-RoPE order, config.json."""
from __future__ import annotations

from pathlib import Path

from cli import ArgumentParser, run_main


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="folder downloaded from the Hub")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: convert in place)")
    args = p.parse_args()
    from checkpoint import convert_hf_checkpoint
    out = convert_hf_checkpoint(args.checkpoint_dir, args.out)
    print(f"converted -> {out}")


if __name__ == "__main__":
    run_main(main)
