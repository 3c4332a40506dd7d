"""Plot decode tok/s against realized sparsity from bench_decode.py JSON files (one line per
weight format), so the committed plot is drawn from exactly the committed numbers.

    python benchmarks/plot_decode.py benchmarks/results/decode_llama3_8b_*.json --out benchmarks/results/decode_llama3_8b.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="JSON files written by bench_decode.py")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    baseline, meta = None, {}
    for path in args.results:
        data = json.loads(path.read_text())
        meta = data["meta"]
        for row in data["rows"]:
            if row["path"].startswith("nn.Linear"):
                baseline = row["tok_s"]
                continue
            series.setdefault(row["weights"], []).append((row["realized"], row["tok_s"]))
    for weights, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=f"TEAL, {weights} weights")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="dense bf16 (cuBLAS)")
    ax.set_xlabel("realized parameter-weighted sparsity")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{meta.get('model')} shape, random weights, {meta.get('gpu')}, {meta.get('date')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
