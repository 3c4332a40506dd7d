"""Dense bf16 products of 1-8 rows on tensor cores (a Gluon kernel) that read the [K, N] weights the sparse
GEMV reads, for dense bf16 decode calls of large matrices (linear.BF16_MMA_ENV).

Why: dense bf16 decode ran cuBLAS, which reads a Llama-3-8B layer at ~80% of the bandwidth, and the
RMSNorms and SiLU(gate) * up ran as kernels of their own. teal_kernels/int4_mma.py's design beat
tinygemm for int4 and carries those fusions: no split-K in global memory (a program's K warps meet in
shared memory), weights requested before the PDL wait, the norm statistics, gate and residual in its
epilogues. Its weights are a lane-ordered copy; a bf16 copy would double a model's memory, since TEAL's
sparse calls need the [K, N] rows. So here the weights are mma's B operand, read in place.
benchmarks/bf16_mma_lab.py measured it (H100, 2026-12-06): a layer's four 8B matrices in sequence in one
graph 156.6 µs with PDL against cuBLAS's 162.0 (168.2 without PDL: its first weights on their way while
the call before finishes are the gain).

How (mma.m16n8k16, bf16 in, float32 sums):
- D [16, 8] = A [16, 16] B [16, 8] with A = x (row r of A is row min(r, M - 1) of x: loads need no mask;
  rows 0..M-1 of D are kept) and B = a [16 K, 8 outputs] tile of the weights as stored ([K, N], N
  contiguous). mma's rows do not see each other, and each row's epilogue is the same code at any M, so a
  row's output has the same bits alone or among others (self-speculation's verify rounds as plain decoding).
- A lane (g, q) = (lane // 4, lane % 4) of B holds K rows 2q, 2q + 1, 2q + 8, 2q + 9 of output column g
  of each 8-column tile. A program's logical columns are permuted so that a lane's T tiles are T
  physically adjacent outputs: logical n' = 8T c + 8t + g is output 8T c + T g + t of the program's
  columns. A lane loads T contiguous bf16 (16 bytes at T = 8) from each of its K rows as int32 words,
  carried untouched to the step that multiplies them; there one PRMT a register pairs two rows' halves
  into B's K pairs (local sm_90 SASS: no shared memory in the loop). Converted right after the load, the
  PRMTs would wait for the registers the same step's lookahead loads fill.
- A program holds 8 T CG outputs (CG column groups of 8T) and KW warps; the K warps take consecutive K
  ranges, KS rows a step, and request the weights LOOKAHEAD steps on before multiplying; their sums meet
  once in shared memory, and one launch is the whole product (no partials, no ticket).
- GATE (a gate|up matrix, [gate | up] along N): column groups c < CG / 2 read gate outputs and the others
  the same outputs' ups, so a gate and its up end in one thread, and the kernel writes SiLU(gate) * up,
  [M, N / 2]: the down projection's input, with no kernel between.
- STATS / PRENORMED (the RMSNorm with no kernel of its own, as int4_mma's): a producer (o; down for the
  next block) also writes h * the norm's weight and h's squares summed a 16-output tile; the consumer
  (gate|up; q|k|v) multiplies that and scales its product by the row's 1 / rms.
- PDL: the first steps' weights are requested before the kernel waits for the previous one.

Only bf16, K a multiple of 16 and N of 32 (config_for says None otherwise; the layer keeps cuBLAS).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

# available: whether this Triton has Gluon's mma_v2, which both tensor-core kernels need
from teal_kernels.int4_mma import available, grid_dependency  # noqa: F401
from teal_kernels.reference import MAX_BATCH, NORM_STATS_TILE, check_norm_statistics, gated_input, norm_statistics

MAX_ROWS = MAX_BATCH  # rows of x a call takes (the decode kernels' batch; the kernel's epilogue loop has 8)


class Bf16MmaConfig(NamedTuple):
    """A launch: warps along K, 8-column tiles a lane group's vector spans (4: 8-byte loads, 8: 16-byte),
    column groups a program holds (even with GATE: half gates, half ups), K rows a step (16 or 32: one or
    two mma k-steps), steps requested ahead (1 or 2)."""
    k_warps: int
    tiles: int = 8
    col_groups: int = 1
    k_step: int = 32
    lookahead: int = 2

    @property
    def cols(self) -> int:
        """Weight columns a program reads (outputs, or gate and up columns with GATE)."""
        return 8 * self.tiles * self.col_groups


WIDE = 16384  # outputs from which a program holds two 64-column groups (128 columns) and 8 K warps (gate|up)
MANY_PROGRAMS = 96  # 64-output programs from which a program holds 64 outputs (8-wide tiles), else 32


def fits(k: int, n: int, cfg: Bf16MmaConfig, gate: bool = False) -> bool:
    """Whether a [K, N] matrix splits into the config's programs and K warps' whole steps (with `gate`,
    each half of N into half a program's columns)."""
    if gate and (cfg.col_groups % 2 or n % 2 or (n // 2) % (cfg.cols // 2)):
        return False
    return (n % cfg.cols == 0 and k % (cfg.k_warps * cfg.k_step) == 0 and cfg.tiles in (4, 8)
            and cfg.k_step in (16, 32) and cfg.lookahead in (1, 2))


def config_for(k: int, n: int, gate: bool = False) -> Bf16MmaConfig | None:
    """The launch for a [K, N] matrix, by a rule that gives each Llama-3-8B matrix its best config with PDL
    in benchmarks/bf16_mma_lab.py (H100, 2026-12-06, results/bf16_mma_2026_12_06/): q|k|v (16, 8, 1, 32, 1),
    o and down (16, 4, 1, 32, 2), gate|up (8, 8, 2, 32, 1). Wide matrices (WIDE outputs) take 8 K warps and
    two 128-column groups; the others 16 K warps and 64 columns where that still makes MANY_PROGRAMS
    programs (8-wide tiles, one step ahead), else 32 (4-wide, two ahead); `gate` needs two column groups.
    Then the most K warps into whose whole steps K splits, 32-row steps before 16-row ones at each count:
    Llama-2-7B's down (K = 11008) on 8 K warps of 32 rows decoded 186.3 -> 165.0 tok/s dense with the
    kernel on (H100, 2026-12-06, results/bf16_mma_2026_12_06/ run 4), and on the 8B down (16, 4, 1, 16, 2)
    took 47.4 µs against (8, 4, 1, 32, 2)'s 58.1 (the lab, with PDL). None where no config fits (the layer
    stays on cuBLAS)."""
    if n >= WIDE:
        k_warps, tiles, col_groups, lookahead = 8, 8, 2, 1
    else:
        wide_tiles = n // 64 >= MANY_PROGRAMS
        k_warps, tiles, lookahead = 16, 8 if wide_tiles else 4, 1 if wide_tiles else 2
        col_groups = 2 if gate else 1
    while k_warps >= 1:
        for k_step in (32, 16):
            cfg = Bf16MmaConfig(k_warps, tiles, col_groups, k_step, lookahead)
            if fits(k, n, cfg, gate):
                return cfg
        k_warps //= 2
    return None


def destinations(cfg: Bf16MmaConfig) -> Tensor:
    """The output, among a program's 8 T CG columns, of each logical column n' = 8T c + 8t + g: 8T c + T g + t."""
    n = torch.arange(cfg.cols)
    t = cfg.tiles
    return (n // (8 * t)) * (8 * t) + t * (n % 8) + (n // 8) % t


def emulate(x: Tensor, w: Tensor, cfg: Bf16MmaConfig) -> Tensor:
    """The kernel's index arithmetic in torch, float64 sums, one row (CPU tests check it without a GPU):
    each program's int32 words at the kernel's addresses, split into K rows 2p and 2p + 1, halves paired
    as its PRMTs pair them, permuted to the logical columns, multiplied by x's K range of each K warp and
    step, and stored at the epilogue's destinations. -> [1, N] float64 (no GATE)."""
    k, n = w.shape
    words = w.contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
    t, cg, ks = cfg.tiles, cfg.col_groups, cfg.k_step
    k_per = k // cfg.k_warps
    kk, cc, gg, uu = torch.arange(ks), torch.arange(cg), torch.arange(8), torch.arange(t // 2)
    half = lambda v: ((v & 0xFFFF).to(torch.int32) << 16).view(torch.float32).double()  # noqa: E731 (bf16 bits)
    dest = destinations(cfg)
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
        out[0, col0 + dest] = acc
    return out


def bf16_mma_reference(x: Tensor, w: Tensor, residual: Tensor | None = None, gate: bool = False,
                       sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """What bf16_mma computes, in float32 (the CPU's implementation of the op): out = x @ w (with `sumsq`,
    times 1 / sqrt(sum(sumsq[m]) / K + eps)) rounded to x's dtype; with `gate`, SiLU(gate) * up of it
    (reference.gated_input), else + residual, rounded again."""
    product = x.float() @ w.float()
    if sumsq is not None:
        product = product * torch.rsqrt(sumsq.sum(dim=1, keepdim=True) / x.shape[1] + eps)
    out = product.to(x.dtype)
    if gate:
        return gated_input(out)
    return out if residual is None else out + residual


def bf16_mma_stats_reference(x: Tensor, w: Tensor, residual: Tensor | None,
                             stats_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What bf16_mma_with_stats computes (the CPU's implementation): bf16_mma_reference's product, out *
    stats_weight rounded, and out's squares summed over each 16-output tile."""
    out = bf16_mma_reference(x, w, residual)
    return out, *norm_statistics(out, stats_weight)


@functools.cache
def _kernel():
    """The Gluon kernel, built on first use: Gluon needs a CUDA build of Triton (no interpreter)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    _grid_dependency = grid_dependency()

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
    def _dest(n, T):
        """A logical column's output among the program's: 8T c + 8t + g -> 8T c + T g + t."""
        return (n // (8 * T)) * (8 * T) + T * (n % 8) + (n // 8) % T

    @gluon.jit
    def _row_epilogue(acc, m, col0, row_scale, out_ptr, res_ptr, sw_ptr, sc_ptr, sq_ptr, N,
                      KW: gl.constexpr, T: gl.constexpr, CG: gl.constexpr, MMA: gl.constexpr,
                      RESIDUAL: gl.constexpr, GATE: gl.constexpr, STATS: gl.constexpr, PRENORMED: gl.constexpr):
        """Row m of the product: row m of D taken (within each warp), the K warps' sums met (shared memory),
        scaled by row_scale (PRENORMED), rounded, then the residual, statistics or gate, stored. The same
        code for every row and M: a row's bits do not depend on the rows beside it."""
        COLS: gl.constexpr = 8 * T * CG
        orow = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
        v = gl.sum(gl.sum(gl.where(orow[None, :, None] == m, acc, 0.0), axis=1), axis=0)  # [COLS], logical order
        if PRENORMED:
            v = v * row_scale
        if GATE:  # column groups c < CG / 2 gates, the others the same outputs' ups
            gate, up = gl.split(gl.permute(gl.reshape(v.to(gl.bfloat16).to(gl.float32), [2, COLS // 2]), [1, 0]))
            n = gl.arange(0, COLS // 2, layout=gate.type.layout)
            gated = (gate * (1.0 / (1.0 + gl.exp(-gate))) * up).to(gl.bfloat16)  # the sparse GEMV's formula
            gl.store(out_ptr + m * (N // 2) + col0 + _dest(n, T), gated)
        else:
            n = gl.arange(0, COLS, layout=v.type.layout)
            dest = col0 + _dest(n, T)
            out = v.to(gl.bfloat16)
            if RESIDUAL:  # the product rounded first, then the sum (the unfused model's order)
                out = (out.to(gl.float32) + gl.load(res_ptr + m * N + dest).to(gl.float32)).to(gl.bfloat16)
            gl.store(out_ptr + m * N + dest, out)
            if STATS:
                h = out.to(gl.float32)
                gl.store(sc_ptr + m * N + dest, (h * gl.load(sw_ptr + dest).to(gl.float32)).to(gl.bfloat16))
                # logical n' = 8T c + 8t + (16 / T) j + g0 lies in the program's 16-output tile c T / 2 + j
                squares = gl.sum(gl.sum(gl.reshape(h * h, [CG, T, T // 2, 16 // T]), axis=3), axis=1)  # [CG, T / 2]
                c = gl.arange(0, CG, layout=gl.SliceLayout(1, squares.type.layout))
                j = gl.arange(0, T // 2, layout=gl.SliceLayout(0, squares.type.layout))
                tile = col0 // 16 + c[:, None] * (T // 2) + j[None, :]
                gl.store(sq_ptr + m * (N // 16) + tile, squares)

    @gluon.jit
    def _row_scale(sq_ptr, m, K, eps, SQ_P: gl.constexpr, SQ: gl.constexpr):
        """Row m's 1 / sqrt(sum of its tile sums of squares / K + eps) (PRENORMED)."""
        i = gl.arange(0, SQ_P, layout=SQ)
        sq = gl.load(sq_ptr + m * (K // 16) + i, mask=i < K // 16, other=0.0)
        return 1.0 / gl.sqrt_rn(gl.sum(sq, axis=0) / K + eps)

    @gluon.jit
    def _bf16_mma_kernel(x_ptr, w_ptr, out_ptr, res_ptr, sw_ptr, sc_ptr, sq_ptr, eps, M, K, N,
                         KW: gl.constexpr, T: gl.constexpr, CG: gl.constexpr, KS: gl.constexpr,
                         LOOKAHEAD: gl.constexpr, PDL: gl.constexpr, ONE_ROW: gl.constexpr, RESIDUAL: gl.constexpr,
                         GATE: gl.constexpr, STATS: gl.constexpr, PRENORMED: gl.constexpr, SQ_P: gl.constexpr,
                         MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr, LOAD: gl.constexpr,
                         SQ: gl.constexpr):
        """out[m, n] = sum_k x[m, k] W[k, n] (+ res[m, n] with RESIDUAL) for the program's outputs n and every
        m < M; GATE: out[m, j] = SiLU(gate_j) * up_j, [M, N / 2]; STATS: also sc[m, n] = out[m, n] * sw[n]
        rounded and sq[m, t] = the sum of out[m, n]^2 over 16-output tile t; PRENORMED: x is sc and the
        product is scaled by 1 / sqrt(sum_t sq[m, t] / K + eps) before it is rounded."""
        COLS: gl.constexpr = 8 * T * CG
        HALVES: gl.constexpr = 2 if GATE else 1
        PER_HALF: gl.constexpr = CG // HALVES  # column groups a half (gate, up) holds
        pid = gl.program_id(0)
        col0 = pid * (COLS // HALVES)  # the program's first output (of each half with GATE)
        k_per = K // KW  # K rows a K warp
        steps = k_per // KS
        # the loaded words' addresses: [KW, KS, CG, 8, T / 2], row (K warp's first + k), outputs col0 + 8T c
        # + T g + 2u and the next (column group c of the up half N / 2 on with GATE); each 1-D range in the
        # nested slices its expansions, left to right, undo
        R2: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, LOAD)))  # [KW, KS]
        C2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(4, LOAD)))  # [CG, 8]
        kw = gl.arange(0, KW, layout=gl.SliceLayout(1, R2))
        kk = gl.arange(0, KS, layout=gl.SliceLayout(0, R2))
        cc = gl.arange(0, CG, layout=gl.SliceLayout(1, C2))
        gg = gl.arange(0, 8, layout=gl.SliceLayout(0, C2))
        tt = gl.arange(0, T // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LOAD)))))
        rows = (kw * k_per)[:, None] + kk[None, :]  # [KW, KS]
        cols = ((cc % PER_HALF) * (4 * T) + (cc // PER_HALF) * (N // 4))[:, None] + (gg * (T // 2))[None, :]  # words
        w_offs = (rows * (N // 2))[:, :, None, None, None] + cols[None, None, :, :, None] + tt[None, None, None, None, :]
        w_first = w_ptr + col0 // 2 + w_offs  # int32 words: two outputs' bf16 each
        # x as A [KW, 16, KS]: row r of A row min(r, M - 1) of x (unmasked), K warp kw's range
        akw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, A)))
        arow = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, A)))
        ak = gl.arange(0, KS, layout=gl.SliceLayout(0, gl.SliceLayout(1, A)))
        if ONE_ROW:
            x_rows = arow * 0
        else:
            x_rows = gl.minimum(arow, M - 1) * K
        x_first = x_ptr + (akw * k_per)[:, None, None] + x_rows[None, :, None] + ak[None, None, :]
        step_words = KS * (N // 2)
        nxt = gl.load(w_first)  # requested before the wait: nothing writes weights
        if LOOKAHEAD == 2:
            nxt2 = gl.load(w_first + gl.minimum(1, steps - 1) * step_words)
        if PDL:
            _grid_dependency(True)
        row0_scale = 1.0
        if PRENORMED and ONE_ROW:  # the previous kernel's sums, requested now, added after the loop
            row0_scale = _row_scale(sq_ptr, 0, K, eps, SQ_P, SQ)
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
        if ONE_ROW:
            _row_epilogue(acc, 0, col0, row0_scale, out_ptr, res_ptr, sw_ptr, sc_ptr, sq_ptr, N,
                          KW, T, CG, MMA, RESIDUAL, GATE, STATS, PRENORMED)
        else:
            for m in gl.static_range(8):  # MAX_ROWS (_launch rejects more)
                if m < M:
                    scale = 1.0
                    if PRENORMED:
                        scale = _row_scale(sq_ptr, m, K, eps, SQ_P, SQ)
                    _row_epilogue(acc, m, col0, scale, out_ptr, res_ptr, sw_ptr, sc_ptr, sq_ptr, N,
                                  KW, T, CG, MMA, RESIDUAL, GATE, STATS, PRENORMED)

    return _bf16_mma_kernel, gl


@functools.cache
def layouts(cfg: Bf16MmaConfig) -> dict:
    """The kernel's layout arguments for a config."""
    _, gl = _kernel()
    bits = lambda v: v.bit_length() - 1  # noqa: E731 (log2 of a power of two)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[cfg.k_warps, 1, 1], instr_shape=[1, 16, 8])
    # words [KW, KS, CG, 8, T / 2]: registers the T / 2 words of contiguous outputs, then K + 1, K + 8 (K + 16),
    # the column groups; lanes K + 2, K + 4 (lane % 4), then the lane group (lane // 4); warps along K: B's
    # layout up to the order of a thread's registers
    reg = ([[0, 0, 0, 0, 1 << i] for i in range(bits(cfg.tiles // 2))] + [[0, 1, 0, 0, 0], [0, 8, 0, 0, 0]]
           + ([[0, 16, 0, 0, 0]] if cfg.k_step == 32 else []) + [[0, 0, 1 << i, 0, 0] for i in range(bits(cfg.col_groups))])
    load = gl.DistributedLinearLayout(reg_bases=reg,
                                      lane_bases=[[0, 2, 0, 0, 0], [0, 4, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 2, 0],
                                                  [0, 0, 0, 4, 0]],
                                      warp_bases=[[1 << i, 0, 0, 0, 0] for i in range(bits(cfg.k_warps))],
                                      block_bases=[], shape=[cfg.k_warps, cfg.k_step, cfg.col_groups, 8, cfg.tiles // 2])
    return dict(MMA=mma, A=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                B=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2), LOAD=load,
                SQ=gl.BlockedLayout([1], [32], [cfg.k_warps], [0]))


def bf16_mma(x: Tensor, w: Tensor, residual: Tensor | None = None, gate: bool = False, sumsq: Tensor | None = None,
             eps: float = 0.0, *, config: Bf16MmaConfig | None = None, pdl: bool | None = None) -> Tensor:
    """x [M, K] bf16 (M <= 8) @ w [K, N] bf16 (the [K, N] weights the sparse GEMV reads) -> [M, N] bf16, on
    CUDA (bf16_mma_reference says exactly what); with `residual` [M, N] added; with `gate` (w a gate|up
    matrix) SiLU(gate) * up [M, N / 2]; with `sumsq` [M, K / 16] float32 (bf16_mma_with_stats' tile sums of
    squares, eps the norm's), x is the residual stream times the norm's weight and the product is scaled by
    the row's 1 / rms. `pdl` None: as the GEMVs (TEAL_PDL). Rejects, one line, what the kernel does not take."""
    return _launch(x, w, residual, gate, sumsq, eps, None, config, pdl)


def bf16_mma_with_stats(x: Tensor, w: Tensor, residual: Tensor | None, stats_weight: Tensor, scaled: Tensor,
                        sumsq: Tensor, *, config: Bf16MmaConfig | None = None) -> Tensor:
    """bf16_mma's product `out` (+ residual), returned, and what the next RMSNorm's consumer takes instead
    of a norm kernel, written into `scaled` (out * stats_weight rounded, [M, N] bf16) and `sumsq` (the sums
    of out^2 over each 16-output tile, [M, N / 16] float32), both contiguous; stats_weight [N] the norm's."""
    check_norm_statistics((x.shape[0], w.shape[1]), x.dtype, stats_weight, scaled, sumsq)
    return _launch(x, w, residual, False, None, 0.0, (stats_weight, scaled, sumsq), config, None)


def _launch(x: Tensor, w: Tensor, residual: Tensor | None, gate: bool, sumsq: Tensor | None, eps: float,
            stats: tuple[Tensor, Tensor, Tensor] | None, config: Bf16MmaConfig | None, pdl: bool | None) -> Tensor:
    k, n = w.shape
    m = x.shape[0]
    if (x.dim() != 2 or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16 or x.shape[1] != k
            or not 1 <= m <= MAX_ROWS or not w.is_contiguous()):
        raise ValueError(f"bf16_mma needs bf16 x [1-{MAX_ROWS}, K] and contiguous bf16 w [K, N]; got x {x.dtype} "
                         f"{tuple(x.shape)}, w {w.dtype} {tuple(w.shape)}")
    cfg = config or config_for(k, n, gate)
    if cfg is None or not fits(k, n, cfg, gate):
        raise ValueError(f"bf16_mma takes no config {None if cfg is None else tuple(cfg)} for w [{k}, {n}]"
                         f"{' with gate' if gate else ''} (K a multiple of 16 and N of 32 at least)")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype or gate):
        raise ValueError(f"bf16_mma's residual must be bf16 [{m}, {n}] without gate, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if sumsq is not None and (sumsq.shape != (m, k // NORM_STATS_TILE) or sumsq.dtype != torch.float32):
        raise ValueError(f"bf16_mma's sumsq must be float32 [{m}, {k // NORM_STATS_TILE}]; got {sumsq.dtype} "
                         f"{tuple(sumsq.shape)}")
    if stats is not None and (stats[0].shape != (n,) or stats[0].dtype != x.dtype):
        raise ValueError(f"bf16_mma's statistics need the norm's weight bf16 [{n}]; got {stats[0].dtype} "
                         f"{tuple(stats[0].shape)}")
    from teal_kernels.triton_gemv import launch_options  # the one place PDL is decided (TEAL_PDL)

    kernel, _ = _kernel()
    options = launch_options(x.device) if pdl is None else ({"launch_pdl": True} if pdl else {})
    out = torch.empty(m, n // 2 if gate else n, dtype=x.dtype, device=x.device)
    res = out if residual is None else residual.contiguous()  # an unread stand-in where there is none
    # without STATS: unread stand-ins (x, out; sumsq where PRENORMED reads it, else out)
    stats_weight, scaled, sums = stats or (x, out, out if sumsq is None else sumsq.contiguous())
    kernel[(n // cfg.cols,)](x.contiguous(), w.view(torch.int32), out, res, stats_weight, scaled, sums, eps, m, k, n,
                             KW=cfg.k_warps, T=cfg.tiles, CG=cfg.col_groups, KS=cfg.k_step, LOOKAHEAD=cfg.lookahead,
                             PDL=bool(options), ONE_ROW=m == 1, RESIDUAL=residual is not None, GATE=gate,
                             STATS=stats is not None, PRENORMED=sumsq is not None,
                             SQ_P=1 << (k // NORM_STATS_TILE - 1).bit_length(),
                             num_warps=cfg.k_warps, **layouts(cfg), **options)
    return out
