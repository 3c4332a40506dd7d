"""Download a Llama-family checkpoint from the Hugging Face Hub (weights, config, tokenizer only).

Gated models (Llama) need a token: `--hf_token` or `huggingface-cli login`. The download goes to
checkpoints/hf/<repo_id>; scripts/convert_hf_checkpoint.py then writes our checkpoint to
checkpoints/<model name> (scripts/prepare.sh does both).
"""
from __future__ import annotations

from pathlib import Path

from cli import ArgumentParser, run_main

ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "pytorch_model*.bin"]


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--repo_id", required=True, help="e.g. meta-llama/Meta-Llama-3-8B-Instruct")
    p.add_argument("--hf_token", default=None, help="access token for gated repos")
    p.add_argument("--out", type=Path, default=None, help="folder (default: checkpoints/hf/<repo_id>)")
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    args = p.parse_args()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    out = args.out or Path("checkpoints") / "hf" / args.repo_id
    try:
        # snapshot_download shows per-file progress bars; prefer safetensors over .bin when both exist
        path = snapshot_download(args.repo_id, revision=args.revision, local_dir=out, token=args.hf_token,
                                 allow_patterns=ALLOW, ignore_patterns=["original/*"])
    except HfHubHTTPError as e:
        raise OSError(f"download of {args.repo_id} failed: {str(e).splitlines()[0]}") from None
    if list(Path(path).glob("*.safetensors")):
        for f in Path(path).glob("pytorch_model*.bin"):
            f.unlink()
    print(f"downloaded to {path}; convert it with\n"
          f"  python scripts/convert_hf_checkpoint.py --checkpoint_dir {path}")


if __name__ == "__main__":
    run_main(main)
