"""teal_kernels/bf16_mma.py's configs per Llama-3-8B matrix against cuBLAS, with plain launches and with
PDL, and a layer's four matrices in sequence (issue 10's dense target): where its launch rule
(bf16_mma.config_for) came from. The kernel began here (first run H100, 2026-12-06,
results/bf16_mma_2026_12_06/) and moved to teal_kernels/ when a layer's chain beat cuBLAS's with PDL.

Rows of the table, µs a call, CUDA graphs over rotating weight copies (benchmarks/timing.py), per
Llama-3-8B matrix at one row:
  lab      the kernel at each of CONFIGS, checked against float64 first, plain and with PDL (in a graph of
           repeated calls a call's first weights are requested while the call before finishes)
  cuBLAS   F.linear on nn.Linear's [N, K] layout (what dense bf16 decode runs without TEAL_BF16_MMA)
  floor    the matrix's bytes at 3.35 TB/s (H100) and at 4.28 TB/s (H200), both printed
then a layer's four matrices one after another in one graph: cuBLAS, and the kernel at each matrix's best
PDL config, plain and with PDL.

    python -m benchmarks.bf16_mma_lab --out benchmarks/results/bf16_mma_lab/lab
    python -m benchmarks.bf16_mma_lab --selftest     # GPU: small shapes against float64
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
from torch import Tensor

from benchmarks.timing import MODEL_SHAPES, copies_for, graph_time_us
from files import write_report
from teal_kernels.bf16_mma import Bf16MmaConfig, bf16_mma, fits

FLOORS_TB_S = {"H100": 3.35, "H200": 4.28}

CONFIGS = [Bf16MmaConfig(kw, t, cg, ks, la) for kw, t, cg, ks, la in (
    (4, 8, 1, 32, 2), (8, 8, 1, 32, 2), (16, 8, 1, 16, 2), (8, 4, 1, 32, 2), (16, 4, 1, 32, 2),
    (8, 8, 2, 32, 1), (8, 8, 1, 16, 2), (16, 4, 1, 16, 2), (4, 4, 1, 32, 2),
    # around the first run's winners (H100, 2026-12-06: q|k|v (16, 4, 1, 16, 2), o and down (16, 4, 1, 32, 2),
    # gate|up (8, 8, 2, 32, 1))
    (8, 8, 2, 16, 2), (16, 8, 2, 16, 1), (16, 4, 2, 16, 2), (16, 4, 2, 32, 1), (8, 4, 2, 32, 2), (16, 8, 1, 32, 1))]


def _check(x: Tensor, w: Tensor, res: Tensor | None, cfg: Bf16MmaConfig) -> float:
    """bf16_mma's error against float64 in units of its bound (the output's bf16 rounding, twice with a
    residual, plus 1e-5 of sum |x| |W| for float32 summation)."""
    exact = x.double() @ w.double()
    bound = 2.0 ** -8 * exact.abs() + 1e-5 * (x.double().abs() @ w.double().abs()) + 1e-30
    if res is not None:
        exact = exact + res.double()
        bound = bound + 2.0 ** -8 * exact.abs()
    return ((bf16_mma(x, w, res, config=cfg, pdl=False).double() - exact).abs() / bound).max().item()


def selftest() -> None:
    """Small shapes against float64 on the GPU; raises on a mismatch."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for cfg in CONFIGS:
        for k_mult, n_mult, residual in ((1, 1, False), (3, 2, True), (2, 5, False)):
            k, n = cfg.k_warps * cfg.k_step * k_mult * 2, cfg.cols * n_mult
            x = torch.randn(1, k, generator=g, device="cuda").to(torch.bfloat16)
            w = torch.randn(k, n, generator=g, device="cuda").to(torch.bfloat16)
            res = torch.randn(1, n, generator=g, device="cuda").to(torch.bfloat16) if residual else None
            err = _check(x, w, res, cfg)
            if not err <= 1.0:
                raise AssertionError(f"bf16_mma {tuple(cfg)} K={k} N={n} residual={residual}: error {err:.2f} of its bound")
    print(f"selftest: {len(CONFIGS) * 3} problems within bound", flush=True)


def bench() -> list[dict]:
    """Each config per 8B matrix, timed with plain launches and with PDL (graphs of repeated calls:
    with PDL a call's first weights are requested while the call before finishes), and cuBLAS."""
    rows = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        copies = copies_for(k * n * 2)
        ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        row = {"layer": layer, "k": k, "n": n, "lab": {}}
        for cfg in CONFIGS:
            if not fits(k, n, cfg):
                continue
            err = _check(x, ws[0], None, cfg)
            if not err <= 1.0:
                row["lab"][str(tuple(cfg))] = {"error": err}
                continue
            row["lab"][str(tuple(cfg))] = {
                "us": graph_time_us(lambda i, c=cfg: bf16_mma(x, ws[i], config=c, pdl=False), len(ws)),
                "pdl_us": graph_time_us(lambda i, c=cfg: bf16_mma(x, ws[i], config=c, pdl=True), len(ws))}
            print(layer, tuple(cfg), {key: round(v, 2) for key, v in row["lab"][str(tuple(cfg))].items()}, flush=True)
        linear = [w.t().contiguous() for w in ws]
        del ws
        row["cublas_us"] = graph_time_us(lambda i: torch.nn.functional.linear(x, linear[i]), len(linear))
        del linear
        row.update({f"floor_{card}_us": k * n * 2 / (tb * 1e6) for card, tb in FLOORS_TB_S.items()})
        rows.append(row)
    return rows


def best_config(row: dict, key: str = "pdl_us") -> Bf16MmaConfig | None:
    """The config of a bench row with the least `key` time."""
    timed = {c: v[key] for c, v in row["lab"].items() if key in v}
    if not timed:
        return None
    return Bf16MmaConfig(*(int(v) for v in min(timed, key=timed.get).strip("()").split(",")))


CHAIN_COPIES = 4  # a layer's four matrices in 4 copies: 1.7 GB, far past L2


def chain(rows: list[dict]) -> dict:
    """µs a layer of the four 8B matrices one after another in a graph (each layer copy's q|k|v, o,
    gate|up, down; copies rotated), as a decode step runs them: cuBLAS, and this kernel with each
    matrix's best PDL config, plain and with PDL (where a call's weights are requested while the call
    before still runs, which cuBLAS cannot do)."""
    shapes = [(r["k"], r["n"], best_config(r)) for r in rows]
    if any(cfg is None for _, _, cfg in shapes):
        return {}
    weights = [[torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02 for k, n, _ in shapes]
               for _ in range(CHAIN_COPIES)]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k, _, _ in shapes]

    def lab_layer(i: int, pdl: bool) -> None:
        for x, w, (_, _, cfg) in zip(xs, weights[i], shapes):
            bf16_mma(x, w, config=cfg, pdl=pdl)

    out = {"configs": [tuple(cfg) for _, _, cfg in shapes],
           "lab_us": graph_time_us(lambda i: lab_layer(i, False), CHAIN_COPIES, calls=8),
           "lab_pdl_us": graph_time_us(lambda i: lab_layer(i, True), CHAIN_COPIES, calls=8)}
    linear = [[w.t().contiguous() for w in layer] for layer in weights]
    del weights
    out["cublas_us"] = graph_time_us(
        lambda i: [torch.nn.functional.linear(x, w) for x, w in zip(xs, linear[i])], CHAIN_COPIES, calls=8)
    out["floor_us"] = {card: sum(k * n * 2 for k, n, _ in shapes) / (tb * 1e6) for card, tb in FLOORS_TB_S.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selftest", action="store_true", help="check the kernel on small shapes and stop")
    parser.add_argument("--out", default="benchmarks/results/bf16_mma_lab/lab", help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bf16_mma_lab needs a CUDA GPU", file=sys.stderr)
        return 1
    selftest()
    if args.selftest:
        return 0
    rows = bench()
    layer_chain = chain(rows)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}
    lines = [f"# bf16 mma GEMV lab, one row, Llama-3-8B shapes ({meta['gpu']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, {meta['date']})", "",
             "| layer | K | N | cuBLAS µs | best lab µs (config) | best lab µs with PDL (config) | floor µs at 3.35 / "
             "4.28 TB/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for key in ("us", "pdl_us"):
            best = best_config(r, key)
            cells.append(f"{r['lab'][str(tuple(best))][key]:.2f} {tuple(best)}" if best else "none ran")
        lines.append(f"| {r['layer']} | {r['k']} | {r['n']} | {r['cublas_us']:.2f} | {' | '.join(cells)} | "
                     f"{r['floor_H100_us']:.2f} / {r['floor_H200_us']:.2f} |")
    if layer_chain:
        lines += ["", "A layer's four matrices in sequence in one graph (µs a layer): cuBLAS "
                  f"{layer_chain['cublas_us']:.2f}, lab {layer_chain['lab_us']:.2f}, lab with PDL "
                  f"{layer_chain['lab_pdl_us']:.2f} (configs {layer_chain['configs']}); floor "
                  f"{layer_chain['floor_us']['H100']:.2f} / {layer_chain['floor_us']['H200']:.2f} at 3.35 / 4.28 TB/s."]
    lines += ["", "Every config timed (µs, plain / PDL): " + "; ".join(
        f"{r['layer']} {c} {v.get('us', float('nan')):.2f} / {v.get('pdl_us', float('nan')):.2f}"
        for r in rows for c, v in r["lab"].items())]
    write_report(args.out, {"meta": meta, "rows": rows, "chain": layer_chain}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
