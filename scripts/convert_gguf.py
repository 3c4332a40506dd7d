"""Convert a llama.cpp GGUF file (architecture 'llama', any quantization the `gguf` package can
dequantize) to our checkpoint folder, tokenizer and chat template included."""
from __future__ import annotations

from pathlib import Path

from cli import ArgumentParser, run_main


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("gguf", type=Path, help="the .gguf file")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    args = p.parse_args()
    if not args.gguf.is_file():
        raise FileNotFoundError(f"no such file: {args.gguf}")
    from checkpoint import WEIGHTS_FILE, convert_gguf
    from files import check_writable
    check_writable(args.out / WEIGHTS_FILE, args.gguf)
    print(f"converted -> {convert_gguf(args.gguf, args.out)}")


if __name__ == "__main__":
    run_main(main)
