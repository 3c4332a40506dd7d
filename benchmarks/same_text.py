"""Are the greedy texts of several generate.py runs the same? (the H200 speculation check)

Each file is one run's stdout. The text of a sample lies between its header line ("[sparsity
0.00, sample 1]" or "[sparsity 0.00, self-speculative: ...]") and its "-- N tokens" report. The
first file's first sample is the reference (plain dense decoding); every speculative sample of
the other files must equal it.

    python benchmarks/same_text.py plain.txt spec_a.txt spec_b.txt
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SAMPLE = re.compile(r"^\[sparsity [0-9.]+, (?P<kind>[^\]]*)\]\n(?P<text>.*?)\n-- \d+ tokens", re.S | re.M)


def samples(path: Path) -> list[tuple[str, str]]:
    """(header, text) of every sample in a generate.py stdout file."""
    return [(m["kind"], m["text"]) for m in SAMPLE.finditer(path.read_text(errors="replace"))]


def main(paths: list[Path]) -> int:
    found = samples(paths[0])
    if not found:
        sys.exit(f"error: no sample in {paths[0]}")
    reference = found[0][1]
    same = True
    for path in paths[1:]:
        for kind, text in samples(path):
            equal = text == reference
            same &= equal
            print(f"{path.name} [{kind}]: {'identical to' if equal else 'DIFFERS from'} plain dense ({len(text)} chars)")
    return 0 if same else 1


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: same_text.py PLAIN_STDOUT SPEC_STDOUT [SPEC_STDOUT ...]")
    sys.exit(main([Path(a) for a in sys.argv[1:]]))
