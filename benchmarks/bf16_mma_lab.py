"""Can a dense bf16 GEMV of one row on tensor cores, reading the [K, N] weights the sparse kernel
reads, beat cuBLAS at decode? A lab (Gluon; written without a GPU, its first run is phase bf16_mma_lab).

Why: issue 10 asks 240 tok/s dense (Llama-3-8B, H200); the fused step decodes 220.2 through cuBLAS,
which reads a layer at ~80% of the bandwidth (H100: 163.7 µs a layer against a 130 µs floor,
results/gather_heuristic_2026_12_06/), and the norms and SiLU * up run as ~218 µs a step of separate
kernels besides. teal_kernels/int4_mma.py's design beat tinygemm for int4: no split-K in global
memory (a program's K warps meet in shared memory), weights requested before the PDL wait, and the
norm, gate and residual in its epilogues. Its copy is lane-ordered; a bf16 copy of that kind would
double a model's weight memory, since TEAL's sparse calls need the [K, N] rows. So here the weights
are mma's B operand, read in place.

How (one row of x, mma.m16n8k16, bf16 in, float32 sums):
- D [16, 8] = A [16, 16] B [16, 8] with A = x (all 16 rows the same row of x, so loads need no mask;
  row 0 of D is kept) and B = a [16 K, 8 outputs] tile of W^T's rows, as stored ([K, N], N contiguous).
- A lane (g, q) = (lane // 4, lane % 4) of B holds K rows 2q, 2q + 1, 2q + 8, 2q + 9 of output column
  g of each 8-column tile. The program's logical columns are permuted so that a lane's T tiles are T
  physically adjacent outputs: logical n' = 8T c + 8t + g is output 8T c + T g + t. A lane then loads
  T contiguous bf16 (16 bytes at T = 8) from each of its K rows, as int32 words carried untouched to
  the step that multiplies them; there one PRMT a register pairs two rows' halves into B's K pairs
  (local sm_90 SASS, triton 3.6: no shared memory in the loop, 32 PRMT and 16 HMMA a 32-row step at
  T = 8). Converted right after the load instead, the PRMTs read the registers that the same step's
  lookahead loads had just been sent to fill (local SASS), so every step would wait for its own loads.
- A program holds COLS = 8 T CG outputs and KW warps; the K warps take consecutive K ranges, KS rows
  a step, and request the weights of the step LOOKAHEAD steps on before multiplying; their sums meet
  once in shared memory at the end, and one launch is the whole product (no partials, no ticket).
- PDL: the first steps' weights are requested before the kernel waits for the previous one.

Rows of the table, µs a call, CUDA graphs over rotating weight copies (benchmarks/timing.py), per
Llama-3-8B matrix at one row:
  lab      this kernel at each of CONFIGS, checked against float64 first
  cuBLAS   F.linear on nn.Linear's [N, K] layout (what dense bf16 decode runs)
  floor    the matrix's bytes at 3.35 TB/s (H100) and at 4.28 TB/s (H200), both printed

    python -m benchmarks.bf16_mma_lab --out benchmarks/results/bf16_mma_lab/lab
    python -m benchmarks.bf16_mma_lab --selftest     # GPU: small shapes against float64
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from benchmarks.timing import MODEL_SHAPES, copies_for, graph_time_us
from files import write_report
from teal_kernels.int4_mma import grid_dependency

FLOORS_TB_S = {"H100": 3.35, "H200": 4.28}


class Bf16MmaConfig(NamedTuple):
    """A launch: warps along K, 8-column tiles a lane group's vector spans (4: 8-byte loads, 8: 16-byte),
    column groups a warp holds, K rows a step (16 or 32: one or two mma k-steps), steps requested ahead."""
    k_warps: int
    tiles: int = 8
    col_groups: int = 1
    k_step: int = 32
    lookahead: int = 2

    @property
    def cols(self) -> int:
        """Outputs a program."""
        return 8 * self.tiles * self.col_groups


CONFIGS = [Bf16MmaConfig(kw, t, cg, ks, la) for kw, t, cg, ks, la in (
    (4, 8, 1, 32, 2), (8, 8, 1, 32, 2), (16, 8, 1, 16, 2), (8, 4, 1, 32, 2), (16, 4, 1, 32, 2),
    (8, 8, 2, 32, 1), (8, 8, 1, 16, 2), (16, 4, 1, 16, 2), (4, 4, 1, 32, 2))]


def fits(k: int, n: int, cfg: Bf16MmaConfig) -> bool:
    """Whether a [K, N] matrix splits into the config's programs and K warps' whole steps."""
    return n % cfg.cols == 0 and k % (cfg.k_warps * cfg.k_step) == 0


def emulate(x: Tensor, w: Tensor, cfg: Bf16MmaConfig) -> Tensor:
    """The kernel's index arithmetic in torch, float64 sums (CPU tests check it without a GPU): each
    program's int32 words at the kernel's addresses, split into K rows 2p and 2p + 1, halves paired as
    its PRMTs pair them, permuted to the logical columns, multiplied by x's K range of each K warp and
    step, and stored at the epilogue's destinations. -> [1, N] float64."""
    k, n = w.shape
    words = w.contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
    t, cg, ks = cfg.tiles, cfg.col_groups, cfg.k_step
    k_per = k // cfg.k_warps
    kk, cc, gg, uu = torch.arange(ks), torch.arange(cg), torch.arange(8), torch.arange(t // 2)
    half = lambda v: ((v & 0xFFFF).to(torch.int32) << 16).view(torch.float32).double()  # noqa: E731 (bf16 bits)
    n_logical = torch.arange(cfg.cols)
    out = torch.empty(1, n, dtype=torch.float64)
    for pid in range(n // cfg.cols):
        col0 = pid * cfg.cols
        acc = torch.zeros(cfg.cols, dtype=torch.float64)
        for kw in range(cfg.k_warps):
            for i in range(k_per // ks):
                row0 = kw * k_per + i * ks
                addr = ((row0 + kk) * (n // 2))[:, None, None, None] + col0 // 2 + (cc * 4 * t)[None, :, None, None] \
                    + (gg * (t // 2))[None, None, :, None] + uu[None, None, None, :]
                wd = words[addr].reshape(ks // 2, 2, cg, 8, t // 2)
                wa, wb = wd[:, 0], wd[:, 1]  # K rows 2p, 2p + 1: [p, CG, g, u]
                pairs = torch.stack((torch.stack((half(wa), half(wa >> 16)), -1),
                                     torch.stack((half(wb), half(wb >> 16)), -1)), -1)  # [p, CG, g, u, h, parity]
                b = pairs.permute(0, 5, 1, 3, 4, 2).reshape(ks, cfg.cols)  # K = 2p + parity, n' = 8T c + 8(2u + h) + g
                acc += x[0, row0:row0 + ks].double() @ b
        dest = col0 + (n_logical // (8 * t)) * (8 * t) + t * (n_logical % 8) + (n_logical // 8) % t
        out[0, dest] = acc
    return out


@functools.cache
def _kernel():
    """The Gluon kernel, built on first use: Gluon needs a CUDA build of Triton (no interpreter)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    _grid_dependency = grid_dependency()  # PDL, as int4_mma's

    @gluon.jit
    def _pairs_along_k(wa, wb):
        """Words of K rows 2p and 2p + 1 (two outputs' bf16 each) -> the four halves as B pairs:
        (output 0's row 2p, output 1's row 2p, output 0's row 2p + 1, output 1's row 2p + 1), each
        PRMT's result the register of one output's K pair."""
        return gl.inline_asm_elementwise(
            "{ .reg .b32 t; prmt.b32 t, $4, $5, 0x5410; mov.b32 {$0, $2}, t; "
            "prmt.b32 t, $4, $5, 0x7632; mov.b32 {$1, $3}, t; }",
            "=h,=h,=h,=h,r,r", [wa, wb], dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
            is_pure=True, pack=1)

    @gluon.jit
    def _as_b(w, KW: gl.constexpr, KS: gl.constexpr, CG: gl.constexpr, T: gl.constexpr, B: gl.constexpr):
        """One step's weights as loaded (int32 words [KW, KS, CG, 8 lane groups, T / 2], a lane's T
        outputs contiguous) as B [KW, KS, 8 T CG] bf16, logical column 8T c + 8t + g: one PRMT a register,
        done where the step is multiplied, so that the loads of the steps ahead are not waited for."""
        w = gl.reshape(w, [KW, KS // 2, 2, CG, 8, T // 2])  # K = 2p + parity
        wa, wb = gl.split(gl.permute(w, [0, 1, 3, 4, 5, 2]))  # rows 2p, 2p + 1
        n0_even, n1_even, n0_odd, n1_odd = _pairs_along_k(wa, wb)
        b = gl.join(gl.join(n0_even, n1_even), gl.join(n0_odd, n1_odd))  # [KW, p, CG, g, u, h, parity]
        b = gl.permute(b, [0, 1, 6, 2, 4, 5, 3])  # [KW, p, parity, CG, u, h, g]: t = 2u + h
        return gl.convert_layout(gl.reshape(b, [KW, KS, 8 * T * CG]), B)

    @gluon.jit
    def kernel(x_ptr, w_ptr, out_ptr, res_ptr, K, N,
               KW: gl.constexpr, T: gl.constexpr, CG: gl.constexpr, KS: gl.constexpr, LOOKAHEAD: gl.constexpr,
               PDL: gl.constexpr, RESIDUAL: gl.constexpr,
               MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr, LOAD: gl.constexpr):
        """out[n] = sum_k x[k] W[k, n] (+ res[n]) for the program's 8 T CG outputs."""
        COLS: gl.constexpr = 8 * T * CG
        pid = gl.program_id(0)
        col0 = pid * COLS
        k_per = K // KW  # K rows a K warp
        steps = k_per // KS
        # the loaded words' addresses: [KW, KS, CG, 8, T / 2], row (K warp's first + k), outputs col0 + 8T c + T g + 2u
        # and the next
        # (each 1-D range in the nested slices its expansions, left to right, undo)
        R2: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, LOAD)))  # [KW, KS]
        C2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(4, LOAD)))  # [CG, 8]
        kw = gl.arange(0, KW, layout=gl.SliceLayout(1, R2))
        kk = gl.arange(0, KS, layout=gl.SliceLayout(0, R2))
        cc = gl.arange(0, CG, layout=gl.SliceLayout(1, C2))
        gg = gl.arange(0, 8, layout=gl.SliceLayout(0, C2))
        tt = gl.arange(0, T // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LOAD)))))
        rows = (kw * k_per)[:, None] + kk[None, :]  # [KW, KS]
        cols = (cc * (4 * T))[:, None] + (gg * (T // 2))[None, :]  # [CG, 8], in words
        w_offs = (rows * (N // 2))[:, :, None, None, None] + cols[None, None, :, :, None] + tt[None, None, None, None, :]
        w_first = w_ptr + col0 // 2 + w_offs  # int32 words: two outputs' bf16 each
        # x as A [KW, 16, KS]: every row of A the row of x (unmasked), K warp kw's range
        akw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, A)))
        arow = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, A)))
        ak = gl.arange(0, KS, layout=gl.SliceLayout(0, gl.SliceLayout(1, A)))
        x_first = x_ptr + (akw * k_per)[:, None, None] + (arow * 0)[None, :, None] + ak[None, None, :]
        step_words = KS * (N // 2)
        nxt = gl.load(w_first)  # requested before the wait: nothing writes weights
        if LOOKAHEAD == 2:
            nxt2 = gl.load(w_first + gl.minimum(1, steps - 1) * step_words)
        if PDL:
            _grid_dependency(True)
        acc = gl.zeros([KW, 16, COLS], gl.float32, MMA)
        for i in range(steps):
            w = nxt  # this step's; the load of the step LOOKAHEAD on goes out before the math
            if LOOKAHEAD == 2:
                nxt = nxt2
                nxt2 = gl.load(w_first + gl.minimum(i + 2, steps - 1) * step_words)
            else:
                nxt = gl.load(w_first + gl.minimum(i + 1, steps - 1) * step_words)
            a = gl.load(x_first + i * KS)
            acc = mma_v2(a, _as_b(w, KW, KS, CG, T, B), acc)
        if PDL:
            _grid_dependency(False)
        # row 0 of D, the K warps' sums met in shared memory
        orow = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
        out = gl.sum(gl.sum(gl.where(orow[None, :, None] == 0, acc, 0.0), axis=1), axis=0)  # [COLS]
        n = gl.arange(0, COLS, layout=out.type.layout)
        dest = col0 + (n // (8 * T)) * (8 * T) + T * (n % 8) + (n // 8) % T
        out = out.to(gl.bfloat16)
        if RESIDUAL:  # the product rounded first, then the sum (the unfused model's order)
            out = (out.to(gl.float32) + gl.load(res_ptr + dest).to(gl.float32)).to(gl.bfloat16)
        gl.store(out_ptr + dest, out)

    return kernel, gl


@functools.cache
def layouts(cfg: Bf16MmaConfig) -> dict:
    """The kernel's layout arguments for a config."""
    _, gl = _kernel()
    bits = lambda v: v.bit_length() - 1  # noqa: E731 (log2 of a power of two)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[cfg.k_warps, 1, 1], instr_shape=[1, 16, 8])
    # words [KW, KS, CG, 8, T / 2]: registers the T / 2 words of contiguous outputs, then K + 1, K + 8 (K + 16),
    # the column groups;
    # lanes K + 2, K + 4 (lane % 4), then the lane group (lane // 4); warps along K: B's layout up to the
    # order of a thread's registers
    reg = ([[0, 0, 0, 0, 1 << i] for i in range(bits(cfg.tiles // 2))] + [[0, 1, 0, 0, 0], [0, 8, 0, 0, 0]]
           + ([[0, 16, 0, 0, 0]] if cfg.k_step == 32 else []) + [[0, 0, 1 << i, 0, 0] for i in range(bits(cfg.col_groups))])
    load = gl.DistributedLinearLayout(reg_bases=reg,
                                      lane_bases=[[0, 2, 0, 0, 0], [0, 4, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0],
                                                  [0, 0, 0, 4, 0]],
                                      warp_bases=[[1 << i, 0, 0, 0, 0] for i in range(bits(cfg.k_warps))],
                                      block_bases=[], shape=[cfg.k_warps, cfg.k_step, cfg.col_groups, 8, cfg.tiles // 2])
    return dict(MMA=mma, A=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                B=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2), LOAD=load)


def bf16_mma(x: Tensor, w: Tensor, residual: Tensor | None = None, *, config: Bf16MmaConfig,
             pdl: bool = False) -> Tensor:
    """x [1, K] bf16 @ w [K, N] bf16 (W^T, as the sparse kernel reads it) -> [1, N] bf16 (+ residual [1, N])."""
    k, n = w.shape
    if (x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.shape != (1, k) or not fits(k, n, config)
            or (residual is not None and (residual.shape != (1, n) or residual.dtype != x.dtype))):
        raise ValueError(f"bf16_mma needs bf16 x [1, K], w [K, N] with N a multiple of {config.cols} and K of "
                         f"{config.k_warps * config.k_step}; got x {x.dtype} {tuple(x.shape)}, w {w.dtype} "
                         f"{tuple(w.shape)}")
    kernel, _ = _kernel()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    res = out if residual is None else residual  # an unread stand-in where there is none
    kernel[(n // config.cols,)](x.contiguous(), w.contiguous().view(torch.int32), out, res, k, n,
                                KW=config.k_warps, T=config.tiles, CG=config.col_groups, KS=config.k_step,
                                LOOKAHEAD=config.lookahead, PDL=pdl, RESIDUAL=residual is not None,
                                num_warps=config.k_warps, launch_pdl=pdl, **layouts(config))
    return out


def _check(x: Tensor, w: Tensor, res: Tensor | None, cfg: Bf16MmaConfig) -> float:
    """bf16_mma's error against float64 in units of its bound (the output's bf16 rounding, twice with a
    residual, plus 1e-5 of sum |x| |W| for float32 summation)."""
    exact = x.double() @ w.double()
    bound = 2.0 ** -8 * exact.abs() + 1e-5 * (x.double().abs() @ w.double().abs()) + 1e-30
    if res is not None:
        exact = exact + res.double()
        bound = bound + 2.0 ** -8 * exact.abs()
    return ((bf16_mma(x, w, res, config=cfg).double() - exact).abs() / bound).max().item()


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
            row["lab"][str(tuple(cfg))] = {"us": graph_time_us(lambda i, c=cfg: bf16_mma(x, ws[i], config=c),
                                                               len(ws))}
            print(layer, tuple(cfg), round(row["lab"][str(tuple(cfg))]["us"], 2), flush=True)
        linear = [w.t().contiguous() for w in ws]
        del ws
        row["cublas_us"] = graph_time_us(lambda i: torch.nn.functional.linear(x, linear[i]), len(linear))
        del linear
        row.update({f"floor_{card}_us": k * n * 2 / (tb * 1e6) for card, tb in FLOORS_TB_S.items()})
        rows.append(row)
    return rows


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
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}
    lines = [f"# bf16 mma GEMV lab, one row, Llama-3-8B shapes ({meta['gpu']}, torch {meta['torch']}, triton "
             f"{meta['triton']}, {meta['date']})", "",
             "| layer | K | N | cuBLAS µs | best lab µs (config) | floor µs at 3.35 / 4.28 TB/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        timed = {c: v["us"] for c, v in r["lab"].items() if "us" in v}
        best = min(timed, key=timed.get) if timed else None
        lines.append(f"| {r['layer']} | {r['k']} | {r['n']} | {r['cublas_us']:.2f} | "
                     + (f"{timed[best]:.2f} {best}" if best else "none ran") + " | "
                     + f"{r['floor_H100_us']:.2f} / {r['floor_H200_us']:.2f} |")
    lines += ["", "Every config timed (µs): " + "; ".join(
        f"{r['layer']} {c} {v.get('us', float('nan')):.2f}" for r in rows for c, v in r["lab"].items())]
    write_report(args.out, {"meta": meta, "rows": rows}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
