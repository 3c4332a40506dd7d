"""Write the topic pages of Python's own documentation (module pydoc_data, part of every CPython
install) to a text file: an English calibration text that a fresh clone can always get offline."""
from __future__ import annotations

from pathlib import Path

from cli import ArgumentParser, run_main


def main() -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path, help="text file to write")
    args = p.parse_args()
    from pydoc_data.topics import topics
    from files import atomic_path, check_writable
    check_writable(args.out)
    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    with atomic_path(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {len(text):,} characters of Python documentation to {args.out}")


if __name__ == "__main__":
    run_main(main)
