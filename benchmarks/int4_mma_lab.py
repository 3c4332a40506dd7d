"""Would a dense int4 GEMV on tensor cores, with the weights as the MMA's register operand, beat
tinygemm at batch 1? A lab measurement (Gluon, sm_80+; written without a GPU).

int4_kpacked_lab.py kept a GEMV's multiply-adds on CUDA cores and lost to tinygemm on every 8B matrix
(results/h100_2026_12_05c/): at 5-7 instructions a weight its loop issues slower than the bytes
arrive. tinygemm converts codes with packed bf16x2 operations and multiplies on tensor cores. This
lab does the same from Triton's Gluon dialect, where a tensor's register layout is explicit, so that
the converted weights land in mma.sync's A fragments without a trip through shared memory (plain
Triton put them there: local SASS, 128 STS.U16 a thread a group):
- out^T = W x^T as mma.m16n8k16: A = 16 output rows x 16 K of weights (registers), B = x in all 8
  columns (registers, a load of x), C = fp32; C's column 0 is the product.
- The copy (pack_for_mma) orders each 16-row tile's words as its 32 lanes hold them, 8 words a lane
  a group of 128 K: a lane reads 32 contiguous bytes, a warp 1 KB.
- A word holds four K pairs: bits 4p..4p+3 and 16+4p..19+4p the codes of K = 32p + 2j and 32p + 2j + 1
  of the group. So one shift, one LOP3 ((w >> 4p) & 0x000F000F | 0x43004300 = bf16x2 128 + q) and
  one bf16x2 subtraction of 136 give a register of A exactly (q - 8 in bf16): 1.4 instructions a weight.
- Each group's float32 partial is scaled once: acc += s * part + z * sum(x of the group).

Rows of the table, µs a call, CUDA graphs over rotating weight copies (benchmarks/timing.py):
  lab             this kernel, each of CONFIGS, checked against float64 first (best shown)
  tinygemm        torch's _weight_int4pack_mm on its own copy (what dense int4 decode runs now)
  floor           the packed bytes (codes + fp32 scales and zeros) at 4.28 TB/s

    python -m benchmarks.int4_mma_lab --out benchmarks/results/int4_mma_lab/lab
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

GROUP = 128  # one loop step: four planes of 32 K (the A tile's K), group 128 only
TILE_ROWS = 16  # mma.m16n8k16's M
WORDS_A_LANE = 8  # a lane's words of one 16-row tile and group
# (K warps, row warps, 16-row tiles a warp, programs along K): a program's warps split its groups
# among KW warp rows, its outputs among row warps; each step loads the next group's words first.
# Splits across programs (float32 partials summed by torch) were the first run's way to more warps.
CONFIGS = ([(kw, mw, r, 1) for kw, mw, r in ((4, 1, 1), (8, 1, 1), (16, 1, 1), (4, 1, 2), (8, 1, 2), (16, 1, 2),
                                             (4, 2, 1), (8, 2, 1), (2, 2, 2), (4, 2, 2), (2, 4, 1), (4, 4, 1))]
           + [(1, 4, 1, 8), (1, 4, 2, 2), (1, 2, 2, 2), (1, 4, 2, 16), (4, 1, 1, 2), (8, 1, 1, 2)])


def lane_slot_to_row_pair(lane: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where word `slot` of `lane` sits in its 16-row tile: (row, K pair j of each plane). The mapping
    of mma.m16n8k16's A fragment with two 16-wide K blocks (PTX ISA; Gluon's DotOperandLayout(0, mma
    v2, k_width 2) at [16, 32]: registers K + 1, row + 8, K + 8, K + 16; lanes K + 2, K + 4, row + 1,
    row + 2, row + 4), with the register of K + 1 folded into one word's two halves."""
    row = (slot & 1) * 8 + (lane >> 2)
    pair = ((slot >> 2) & 1) * 8 + ((slot >> 1) & 1) * 4 + (lane & 3)
    return row, pair


def pack_for_mma(w: torch.Tensor) -> torch.Tensor:
    """Our int4 layout (uint8 [K, N / 2], column 2c in the low nibble) -> int32 words
    [N / 16, K / 128, 32, 8]: tile t, group g, lane, slot. With (r, j) = lane_slot_to_row_pair(lane,
    slot), the word's bits 4p..4p+3 hold the code of output 16t + r at K = 128g + 32p + 2j and bits
    16+4p..19+4p that of K + 1, p = 0..3."""
    k, n = w.shape[0], w.shape[1] * 2
    if k % GROUP or n % TILE_ROWS:
        raise ValueError(f"pack_for_mma needs K a multiple of {GROUP} and N of {TILE_ROWS}, got K={k}, N={n}")
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n).t().to(torch.int64)  # [N, K]
    q = q.reshape(n // TILE_ROWS, TILE_ROWS, k // GROUP, 4, 16, 2)  # tile, row, group, plane, pair, K parity
    lane = torch.arange(32).repeat_interleave(WORDS_A_LANE)
    slot = torch.arange(WORDS_A_LANE).repeat(32)
    row, pair = lane_slot_to_row_pair(lane, slot)
    picked = q[:, row, :, :, pair, :]  # [lane * slot, tile, group, plane, parity]
    shifts = 4 * torch.arange(4).view(1, 1, 1, 4, 1) + 16 * torch.arange(2).view(1, 1, 1, 1, 2)
    words = (picked << shifts).sum(dim=(3, 4))  # [lane * slot, tile, group]
    words = words.permute(1, 2, 0).reshape(n // TILE_ROWS, k // GROUP, 32, WORDS_A_LANE)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def emulate(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64 from the packed words (CPU check of pack_for_mma and the
    index math the kernel's layouts encode): x [1, K], scales / zeros [K / 128, N] -> [1, N]."""
    tiles, groups = words.shape[:2]
    n, k = tiles * TILE_ROWS, groups * GROUP
    w = words.to(torch.int64) & 0xFFFFFFFF
    lane = torch.arange(32).repeat_interleave(WORDS_A_LANE)
    slot = torch.arange(WORDS_A_LANE).repeat(32)
    row, pair = lane_slot_to_row_pair(lane, slot)
    codes = torch.zeros(n, k, dtype=torch.float64)
    flat = w.reshape(tiles, groups, 32 * WORDS_A_LANE)
    for p in range(4):
        for parity in range(2):
            code = ((flat >> (4 * p + 16 * parity)) & 0xF).double()  # [tile, group, lane * slot]
            rows = (torch.arange(tiles).view(-1, 1, 1) * TILE_ROWS + row.view(1, 1, -1)).expand(-1, groups, -1)
            cols = (torch.arange(groups).view(1, -1, 1) * GROUP + 32 * p + 2 * pair.view(1, 1, -1) + parity
                    ).expand(tiles, -1, -1)
            codes[rows.reshape(-1), cols.reshape(-1)] = code.reshape(-1)
    xd = x.double().reshape(groups, GROUP)
    part = ((codes - 8.0).reshape(n, groups, GROUP) * xd).sum(-1)  # [N, groups]
    return ((part * scales.double().t() + zeros.double().t() * xd.sum(-1)).sum(-1)).unsqueeze(0)


def _kernel():
    """The Gluon kernel, built on first use (Gluon needs a CUDA build of Triton; not the interpreter)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.jit
    def _to_bf16_pair(words, P: gl.constexpr):
        """(words >> 4P) & 0x000F000F | 0x43004300 minus 136 in both bf16 halves: codes q of plane P
        as the exact bf16 pair (q_lo - 8, q_hi - 8)."""
        return gl.inline_asm_elementwise(
            f"{{ .reg .b32 t, c; shr.b32 t, $2, {4 * P}; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
            "mov.b32 c, 0x43084308; sub.rn.bf16x2 t, t, c; mov.b32 {$0, $1}, t; }",
            "=h,=h,r", [words], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)

    @gluon.jit
    def _words(w_ptr, tile0, g, NG, KW: gl.constexpr, TILES: gl.constexpr, LOAD: gl.constexpr,
               WORDS: gl.constexpr):
        """One group's words of the program's tiles for each of the KW warp rows (g: [KW], each its own
        group), loaded 32 bytes a lane, then viewed as [KW, 16 TILES, 16] (K warp, row, K pair) in
        the layout that becomes mma's A fragments."""
        kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LOAD))))
        t = gl.arange(0, TILES, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LOAD))))
        lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LOAD))))
        slot = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LOAD))))
        g = gl.convert_layout(g, kw.type.layout)
        tile_group = (tile0 + t)[None, :] * NG + g[:, None]  # [KW, TILES]
        offs = (tile_group[:, :, None, None] * 32 + lane[None, None, :, None]) * 8 + slot[None, None, None, :]
        w = gl.load(w_ptr + offs)  # [KW, TILES, 32, 8]: lane = 4 * (row % 8) + pair % 4
        w = gl.reshape(w, [KW, TILES, 8, 4, 2, 2, 2])  # row % 8, pair % 4, pair // 8, (pair // 4) % 2, row // 8
        w = gl.reshape(gl.permute(w, [0, 1, 6, 2, 4, 5, 3]), [KW, TILES * 16, 16])
        return gl.convert_layout(w, WORDS, assert_trivial=True)

    @gluon.jit
    def kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, N,
               KW: gl.constexpr, ROWS: gl.constexpr, SPLIT: gl.constexpr,
               MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr, LOAD: gl.constexpr, WORDS: gl.constexpr,
               XS: gl.constexpr):
        """out[n] (or float32 partial row `split` of [SPLIT, N]) for ROWS outputs of this program. Its
        warps form a [KW, ROWS / (16 x tiles a warp)] grid: the KW warp rows take consecutive runs of
        the program's groups, and their sums meet once at the end."""
        pid = gl.program_id(0)
        split = gl.program_id(1)
        NG = K // 128
        g_per = NG // (SPLIT * KW)  # groups a warp
        L2: gl.constexpr = gl.SliceLayout(2, MMA)
        kw = gl.arange(0, KW, layout=gl.SliceLayout(1, L2))
        g_first = (split * KW + kw) * g_per  # [KW]
        rows = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, L2))
        cols = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
        bkw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, B)))
        bk = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, B)))
        bn = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, B)))
        xkw = gl.arange(0, KW, layout=gl.SliceLayout(1, XS))
        xk = gl.arange(0, 128, layout=gl.SliceLayout(0, XS))
        acc = gl.zeros([KW, ROWS, 8], gl.float32, MMA)
        nxt = _words(w_ptr, pid * (ROWS // 16), g_first, NG, KW, ROWS // 16, LOAD, WORDS)
        for i in range(g_per):
            words = nxt
            nxt = _words(w_ptr, pid * (ROWS // 16), g_first + gl.minimum(i + 1, g_per - 1), NG, KW, ROWS // 16,
                         LOAD, WORDS)
            g = g_first + i  # [KW]
            gb = gl.convert_layout(g, bkw.type.layout)
            part = gl.zeros([KW, ROWS, 8], gl.float32, MMA)
            for p in gl.static_range(4):
                lo, hi = _to_bf16_pair(words, p)
                a = gl.convert_layout(gl.reshape(gl.join(lo, hi), [KW, ROWS, 32]), A, assert_trivial=True)
                xb = (gb * 128 + p * 32)[:, None, None] + bk[None, :, None] + 0 * bn[None, None, :]
                part = mma_v2(a, gl.load(x_ptr + xb), part)
            gx = gl.convert_layout(g, xkw.type.layout)
            x_sum = gl.sum(gl.load(x_ptr + (gx * 128)[:, None] + xk[None, :]).to(gl.float32), axis=1)  # [KW]
            x_sum = gl.convert_layout(x_sum, kw.type.layout)
            s = gl.load(s_ptr + rows[None, :] * NG + g[:, None])  # [KW, ROWS]
            z = gl.load(z_ptr + rows[None, :] * NG + g[:, None])
            acc += part * s[:, :, None] + (z * x_sum[:, None])[:, :, None]
        out = gl.sum(gl.sum(gl.where(cols[None, None, :] == 0, acc, 0.0), axis=2), axis=0)  # [ROWS]
        gl.store(out_ptr + split * N + rows, out.to(out_ptr.dtype.element_ty))

    _KERNEL = (kernel, gl)
    return _KERNEL


_KERNEL = None


def layouts(k_warps: int, row_warps: int, tiles_a_warp: int) -> dict:
    """The kernel's layouts (constexpr arguments): warps [k_warps, row_warps], each holding
    `tiles_a_warp` 16-row tiles."""
    _, gl = _kernel()
    bits = lambda v: v.bit_length() - 1  # noqa: E731 (log2 of a power of two)
    rows = TILE_ROWS * row_warps * tiles_a_warp
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[k_warps, row_warps, 1], instr_shape=[1, 16, 8])
    a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    load = gl.BlockedLayout(size_per_thread=[1, 1, 1, 8], threads_per_warp=[1, 1, 32, 1],
                            warps_per_cta=[k_warps, row_warps, 1, 1], order=[3, 2, 1, 0])
    # A at [k_warps, rows, 32] (Gluon's linear layout of it) without its K + 1 register (a word's two
    # halves) and with K halved: the words' layout. Warps: row warps first, then K warps.
    warp_bases = ([[0, 16 << i, 0] for i in range(bits(row_warps))] + [[1 << i, 0, 0] for i in range(bits(k_warps))])
    rep_bases = [[0, 16 * row_warps << i, 0] for i in range(bits(tiles_a_warp))]
    words = gl.DistributedLinearLayout(reg_bases=[[0, 8, 0], [0, 0, 4], [0, 0, 8]] + rep_bases,
                                       lane_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
                                       warp_bases=warp_bases, block_bases=[], shape=[k_warps, rows, 16])
    # each K warp's 128 values of x for its group, in every row warp of it (a sum without shared memory)
    xs = gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2]], lane_bases=[[0, 4], [0, 8], [0, 16], [0, 32], [0, 64]],
                                    warp_bases=[[0, 0]] * bits(row_warps) + [[1 << i, 0] for i in range(bits(k_warps))],
                                    block_bases=[], shape=[k_warps, 128])
    return dict(MMA=mma, A=a, B=b, LOAD=load, WORDS=words, XS=xs)


def mma_gemv(x: torch.Tensor, words: torch.Tensor, scales_t: torch.Tensor, zeros_t: torch.Tensor,
             config: tuple[int, int, int, int] = CONFIGS[0], reduce: bool = True) -> torch.Tensor:
    """x [1, K] bf16 @ the packed matrix (pack_for_mma; scales / zeros transposed to [N, K / 128])
    -> [1, N] bf16. Rejects, one line, what the kernel does not take. reduce=False returns a split
    config's float32 partials [SPLIT, N] unsummed (to time the kernel alone)."""
    k_warps, row_warps, tiles_a_warp, split = config
    tiles, groups = words.shape[:2]
    n, k = tiles * TILE_ROWS, groups * GROUP
    rows = TILE_ROWS * row_warps * tiles_a_warp
    if x.dtype != torch.bfloat16 or x.shape != (1, k) or scales_t.shape != (n, groups) or zeros_t.shape != scales_t.shape:
        raise ValueError(f"mma_gemv needs bf16 x [1, {k}] and scales / zeros [{n}, {groups}], got {x.dtype} "
                         f"{tuple(x.shape)}, {tuple(scales_t.shape)}, {tuple(zeros_t.shape)}")
    if not fits(k, n, config):
        raise ValueError(f"mma_gemv needs N ({n}) a multiple of {rows} rows and {groups} groups a multiple of "
                         f"{split} splits times {k_warps} K warps")
    kernel, _ = _kernel()
    out = torch.empty(split, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    kernel[(n // rows, split)](x, words, scales_t, zeros_t, out, k, n, KW=k_warps, ROWS=rows, SPLIT=split,
                               num_warps=k_warps * row_warps, **layouts(k_warps, row_warps, tiles_a_warp))
    if split == 1 or not reduce:
        return out
    return out.sum(0, keepdim=True).to(x.dtype)


def fits(k: int, n: int, config: tuple[int, int, int, int]) -> bool:
    """Whether the kernel takes a [K, N] matrix with this config."""
    k_warps, row_warps, tiles_a_warp, split = config
    return k % (GROUP * split * k_warps) == 0 and n % (TILE_ROWS * row_warps * tiles_a_warp) == 0


def prepare(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(words, scales [N, K / 128], zeros [N, K / 128]) for mma_gemv."""
    return pack_for_mma(w.cpu()).to(w.device), scales.t().contiguous(), zeros.t().contiguous()


def selftest() -> None:
    """Small shapes against float64 on the GPU; raises on a mismatch."""
    for k, n in ((256, 64), (2048, 128), (4096, 256)):
        w, scales, zeros, _ = make_weight("int4-g128", k, n, "cuda", seed=k + n)
        x = make_x(1, k, torch.bfloat16, "cuda", seed=n)
        packed = prepare(w, scales, zeros)
        want = reference(x, w, scales, zeros, GROUP)
        for config in CONFIGS:
            if fits(k, n, config):
                err = max_error(mma_gemv(x, *packed, config), want)
                if err > 1.0:
                    raise AssertionError(f"K={k} N={n} {config}: error {err:.3g} of its bound")
    print("selftest passed")


def bench(configs: list[tuple[int, int, int, int]]) -> list[dict]:
    """Per 8B matrix: every config (checked first), tinygemm, and the byte floor, µs a call."""
    from teal_kernels.tinygemm import int4pack, int4pack_mm

    rows = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        copies = [make_weight("int4-g128", k, n, "cuda", seed=i) for i in range(2)]
        nbytes = sum(t.numel() * t.element_size() for t in copies[0][:3])
        copies += [make_weight("int4-g128", k, n, "cuda", seed=i) for i in range(2, copies_for(nbytes))]
        x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
        packed = [prepare(*c[:3]) for c in copies]
        tiny = [int4pack(*c[:3], GROUP) for c in copies]
        row = {"layer": layer, "K": k, "N": n, "floor_us": nbytes / (FLOOR_TB_S * 1e6),
               "tinygemm_us": graph_time_us(lambda i: int4pack_mm(x, *tiny[i], GROUP), len(tiny)), "lab_us": {},
               "kernel_only_us": {}}
        want = reference(x, *copies[0][:3], GROUP)
        for config in configs:
            if not fits(k, n, config):
                continue
            err = max_error(mma_gemv(x, *packed[0], config), want)
            if err > 1.0:
                raise AssertionError(f"{layer} {config}: error {err:.3g} of its bound")
            row["lab_us"][str(config)] = graph_time_us(lambda i, c=config: mma_gemv(x, *packed[i], c), len(packed))
            note = ""
            if config[2] > 1:
                row["kernel_only_us"][str(config)] = graph_time_us(
                    lambda i, c=config: mma_gemv(x, *packed[i], c, reduce=False), len(packed))
                note = f" (kernel alone {row['kernel_only_us'][str(config)]:.1f})"
            print(f"  {layer} {config}: {row['lab_us'][str(config)]:.1f} µs{note}", flush=True)
        rows.append(row)
        best = min(row["lab_us"].items(), key=lambda kv: kv[1])
        print(f"{layer}: tinygemm {row['tinygemm_us']:.1f} µs, best lab {best[1]:.1f} {best[0]}, "
              f"floor {row['floor_us']:.1f}", flush=True)
        del copies, packed, tiny
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selftest", action="store_true", help="small shapes against float64 (needs a GPU)")
    p.add_argument("--out", default="benchmarks/results/int4_mma_lab/lab",
                   help="OUT.json and OUT.md (default benchmarks/results/int4_mma_lab/lab)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: int4_mma_lab needs a CUDA GPU (Gluon kernels do not run in the interpreter)", file=sys.stderr)
        return 1
    if args.selftest:
        selftest()
        return 0
    rows = bench(CONFIGS)
    layer = {key: sum(r[key] for r in rows) for key in ("tinygemm_us", "floor_us")}
    layer["lab_us"] = sum(min(r["lab_us"].values()) for r in rows)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    lines = [f"# int4 GEMV on tensor cores (Gluon, weights in A's registers) against tinygemm ({meta['gpu']}, "
             f"{meta['date']})", "",
             f"`{meta['command']}`; µs a call, batch 1, int4-g128, CUDA graphs over rotating weights; "
             "(K warps, row warps, 16-row tiles a warp, splits along K); a split's time includes "
             "torch's sum of its partials; 'kernel alone' is the best split kernel without that sum", "",
             "| matrix | floor | tinygemm | best lab | its config | best split kernel alone |", "|---|---|---|---|---|---|"]
    for r in rows:
        best = min(r["lab_us"].items(), key=lambda kv: kv[1])
        alone = min(r["kernel_only_us"].values(), default=float("nan"))
        lines.append(f"| {r['layer']} | {r['floor_us']:.1f} | {r['tinygemm_us']:.1f} | {best[1]:.1f} | {best[0]} "
                     f"| {alone:.1f} |")
    lines.append(f"| a layer | {layer['floor_us']:.1f} | {layer['tinygemm_us']:.1f} | {layer['lab_us']:.1f} | | |")
    write_report(args.out, {"meta": meta, "rows": rows, "layer": layer}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
