"""Launch configs of teal_kernels/int4_mma.py (dense int4-g128 on tensor cores, Gluon) against
tinygemm, per Llama-3-8B matrix, at 1-8 rows: how its config rule (config_for) was chosen.

History (results/int4_mma_2026_12_05/, H100): a CUDA-core GEMV on a copy laid out for it lost to
tinygemm on every matrix (int4_kpacked_lab.py); this kernel's first version (warps along the outputs,
splits across programs summed by torch) beat tinygemm only without the sum; warps along K too made it
one launch, 59.6 against 68.8 µs a layer.

The kernel launches as the product launches it (programmatic dependent launch unless TEAL_PDL=0), so
back-to-back calls in the timing graph overlap a little; tinygemm's launches do not.

Rows of the table, µs a call, CUDA graphs over rotating weight copies (benchmarks/timing.py); every
column but the last on copies with float32 scales and zeros (TEAL_INT4_MMA_BF16_SCALES=0; the product's
default copy is the last column's):
  config_for      the kernel at the config its rule picks
  best            the fastest of CONFIGS, each checked against float64 first
  tinygemm        torch's _weight_int4pack_mm on its own copy (what dense int4 decode ran before)
  floor           the packed bytes (codes + fp32 scales and zeros) at 4.28 TB/s
  + fusion        config_for's launch as decode.py calls it by default: the residual in o's and down's
                  epilogue, SiLU(gate) * up in gate|up's (its paired copy); q|k|v plain
  + statistics    ... with the norms' statistics (TEAL_INT4_MMA_NORM_STATS=1): o and down also write
                  h * the norm's weight and h's tile sums of squares, q|k|v and gate|up scale by 1 / rms
  bf16 scales     config_for's launch on a copy with bf16 scales and zeros (the default copy:
                  4 bytes a group and output instead of 8), checked against float64 of the rounded weights

    python -m benchmarks.int4_mma_lab --out benchmarks/results/int4_mma_lab/lab [--rows 1 4]
    python -m benchmarks.int4_mma_lab --selftest     # GPU: small shapes against float64
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton

from benchmarks.int4_kpacked_lab import FLOOR_TB_S, max_error, reference
from benchmarks.timing import MODEL_SHAPES, copies_for, graph_time_us, make_weight, make_x
from files import write_report
from teal_kernels.int4_mma import GROUP, MmaConfig, config_for, int4_mma, int4_mma_with_stats, pack, pairs

# (K warps, row warps, 16-row tiles a warp, lookahead): the first H100 runs (results/int4_mma_2026_12_05/) tried
# warps along the outputs with splits across programs too (float32 partials summed by torch); warps
# along K won without partials, and the kernel now has only those.
CONFIGS = [MmaConfig(kw, mw, r) for kw, mw, r in ((4, 1, 1), (8, 1, 1), (16, 1, 1), (4, 1, 2), (8, 1, 2), (16, 1, 2),
                                                  (4, 2, 1), (8, 2, 1), (2, 2, 2), (4, 2, 2), (2, 4, 1), (4, 4, 1),
                                                  (2, 1, 2), (2, 1, 4), (4, 1, 4), (8, 1, 4))]
# two groups requested ahead (lookahead 2) where a warp's loop is short: 2-8 groups on the 8B matrices
CONFIGS += [c._replace(lookahead=2) for c in CONFIGS if c.row_warps == 1 and c.k_warps >= 4]


def fits(k: int, n: int, config: MmaConfig) -> bool:
    """Whether the kernel takes a [K, N] int4-g128 matrix with this config."""
    return n % config.rows == 0 and (k // GROUP) % config.k_warps == 0


def selftest() -> None:
    """Small shapes at 1-8 rows against float64 on the GPU, every config that fits; raises on a mismatch."""
    for k, n in ((256, 64), (2048, 128), (4096, 256)):
        w, scales, zeros, _ = make_weight("int4-g128", k, n, "cuda", seed=k + n)
        packed = pack(w, scales, zeros)
        for m in (1, 3, 8):
            x = make_x(m, k, torch.bfloat16, "cuda", seed=n + m)
            want = reference(x, w, scales, zeros, GROUP)
            for config in CONFIGS:
                if fits(k, n, config):
                    err = max_error(int4_mma(x, *packed, config=config), want)
                    if err > 1.0:
                        raise AssertionError(f"K={k} N={n} M={m} {tuple(config)}: error {err:.3g} of its bound")
    print("selftest passed")


def bench(m: int) -> list[dict]:
    """Per 8B matrix at m rows: every config (checked first), config_for's, tinygemm, the floor; µs a call."""
    from teal_kernels.tinygemm import int4pack, int4pack_mm

    rows = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        copies = [make_weight("int4-g128", k, n, "cuda", seed=i) for i in range(2)]
        nbytes = sum(t.numel() * t.element_size() for t in copies[0][:3])
        copies += [make_weight("int4-g128", k, n, "cuda", seed=i) for i in range(2, copies_for(nbytes))]
        x = make_x(m, k, torch.bfloat16, "cuda", seed=0)
        packed = [pack(*c[:3]) for c in copies]
        tiny = [int4pack(*c[:3], GROUP) for c in copies]
        row = {"layer": layer, "M": m, "K": k, "N": n, "floor_us": nbytes / (FLOOR_TB_S * 1e6),
               "tinygemm_us": graph_time_us(lambda i: int4pack_mm(x, *tiny[i], GROUP), len(tiny)), "config_us": {},
               "config_for": str(tuple(config_for(k, n, m)))}
        want = reference(x, *copies[0][:3], GROUP)
        for config in dict.fromkeys([config_for(k, n, m), *CONFIGS]):
            if not fits(k, n, config):
                continue
            err = max_error(int4_mma(x, *packed[0], config=config), want)
            if err > 1.0:
                raise AssertionError(f"{layer} M={m} {tuple(config)}: error {err:.3g} of its bound")
            row["config_us"][str(tuple(config))] = graph_time_us(
                lambda i, c=config: int4_mma(x, *packed[i], config=c), len(packed))
        halved = [pack(*c[:3], scale_dtype=torch.bfloat16) for c in copies]
        rounded = reference(x, copies[0][0], copies[0][1].to(torch.bfloat16).float(),
                            copies[0][2].to(torch.bfloat16).float(), GROUP)
        if max_error(int4_mma(x, *halved[0]), rounded) > 1.0:
            raise AssertionError(f"{layer} M={m}: bf16 scales off the rounded weights' product")
        row["bf16_scales_us"] = graph_time_us(lambda i: int4_mma(x, *halved[i]), len(halved))
        del halved
        # config_for's launch as decode.py calls it: the residual in o's and down's epilogue, SiLU(gate) * up
        # in gate|up's (its paired copy); q|k|v plain (torch runs the norm before it)
        residual = make_x(m, n, torch.bfloat16, "cuda", seed=2)
        gated = layer == "gate_up" and pairs(k, n)
        source = [pack(*c[:3], paired=True) for c in copies] if gated else packed
        if layer == "qkv":
            row["fused_us"] = row["config_us"][row["config_for"]]
        else:
            row["fused_us"] = graph_time_us(lambda i: int4_mma(x, *source[i], None if gated else residual, gated),
                                            len(source))
        # with the norms' statistics: q|k|v and gate|up scale by 1 / rms from the sums, o and down write them
        if layer in ("qkv", "gate_up"):
            sumsq = torch.rand(m, k // 16, device="cuda") + 0.5
            row["stats_us"] = graph_time_us(lambda i: int4_mma(x, *source[i], None, gated, sumsq, 1e-5), len(source))
        else:
            stats_weight = make_x(1, n, torch.bfloat16, "cuda", seed=3)[0]
            scaled, sums = torch.empty_like(residual), torch.empty(m, n // 16, device="cuda")
            row["stats_us"] = graph_time_us(lambda i: int4_mma_with_stats(x, *packed[i], residual, stats_weight,
                                                                          scaled, sums), len(packed))
        rows.append(row)
        best = min(row["config_us"].items(), key=lambda kv: kv[1])
        print(f"{layer} M={m}: tinygemm {row['tinygemm_us']:.1f} µs, config_for {row['config_for']} "
              f"{row['config_us'][row['config_for']]:.1f}, best {best[1]:.1f} {best[0]}, floor {row['floor_us']:.1f}",
              flush=True)
        del copies, packed, tiny, source
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selftest", action="store_true", help="small shapes against float64 (needs a GPU)")
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (1-8; default 1)")
    p.add_argument("--out", default="benchmarks/results/int4_mma_lab/lab",
                   help="OUT.json and OUT.md (default benchmarks/results/int4_mma_lab/lab)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: int4_mma_lab needs a CUDA GPU (Gluon kernels do not run in the interpreter)", file=sys.stderr)
        return 1
    if any(not 1 <= m <= 8 for m in args.rows):
        print(f"error: --rows takes 1-8, got {args.rows}", file=sys.stderr)
        return 1
    if args.selftest:
        selftest()
        return 0
    rows = [r for m in args.rows for r in bench(m)]
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    lines = [f"# int4-g128 on tensor cores (teal_kernels/int4_mma.py) against tinygemm ({meta['gpu']}, {meta['date']})",
             "", f"`{meta['command']}`; µs a call, CUDA graphs over rotating weights; configs (K warps, row warps, "
             "16-row tiles a warp)", "",
             "| M | matrix | floor | tinygemm | config_for | its config | best | its config | config_for + fusion | "
             "+ statistics | bf16 scales |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(r["config_us"].items(), key=lambda kv: kv[1])
        lines.append(f"| {r['M']} | {r['layer']} | {r['floor_us']:.1f} | {r['tinygemm_us']:.1f} | "
                     f"{r['config_us'][r['config_for']]:.1f} | {r['config_for']} | {best[1]:.1f} | {best[0]} | "
                     f"{r['fused_us']:.1f} | {r['stats_us']:.1f} | {r['bf16_scales_us']:.1f} |")
    for m in args.rows:
        of_m = [r for r in rows if r["M"] == m]
        lines.append(f"| {m} | a layer | {sum(r['floor_us'] for r in of_m):.1f} | "
                     f"{sum(r['tinygemm_us'] for r in of_m):.1f} | "
                     f"{sum(r['config_us'][r['config_for']] for r in of_m):.1f} | | "
                     f"{sum(min(r['config_us'].values()) for r in of_m):.1f} | | "
                     f"{sum(r['fused_us'] for r in of_m):.1f} | {sum(r['stats_us'] for r in of_m):.1f} | "
                     f"{sum(r['bf16_scales_us'] for r in of_m):.1f} |")
    write_report(args.out, {"meta": meta, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
