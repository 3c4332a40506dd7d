"""Convert a Hugging Face Llama/Mistral folder (safetensors shards or .bin) to our checkpoint:
model.safetensors with fused q|k|v and gate|up, Q/K rows in interleaved-RoPE order, config.json.

The conversion goes into a new folder; the downloaded one is never modified.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/hf/meta-llama/Meta-Llama-3-8B-Instruct
"""
from __future__ import annotations

from pathlib import Path

from cli import ArgumentParser, run_main


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_dir", type=Path, required=True, help="folder downloaded from the Hub")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: checkpoints/<name of the downloaded folder>)")
    args = p.parse_args()
    out = args.out or Path("checkpoints") / args.checkpoint_dir.resolve().name
    from checkpoint import WEIGHTS_FILE, convert_hf_checkpoint
    from files import check_writable
    check_writable(out / WEIGHTS_FILE)
    print(f"converted -> {convert_hf_checkpoint(args.checkpoint_dir, out)}")


if __name__ == "__main__":
    run_main(main)
