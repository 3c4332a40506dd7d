"""Dense int4-g128 products of 1-8 rows on tensor cores (a Gluon kernel), for dense int4 decode calls.

Why: tinygemm (teal_kernels/tinygemm.py), which dense int4 decode calls ran through, reads a Llama-3-8B
layer at ~2 TB/s. On an H100 (2026-12-05, benchmarks/int4_mma_lab.py, results/int4_mma_2026_12_05b/)
this kernel took 62.4 µs a layer at one row against tinygemm's 68.2, 78.0 against 93.0 at 4 rows; end
to end (Llama-3-8B int4-g128 + int8 head) 382.9 / 383.0 tok/s against tinygemm's 346.8. With the sums
below and config_for's present rule (results/int4_mma_2026_12_05c/): 60.3 µs a layer against
tinygemm's 67.8 in one call, and 393.1 tok/s against gpt-fast's int4 335.5 in one run.
A CUDA-core GEMV on a copy laid out for it lost to tinygemm on every matrix (int4_kpacked_lab.py):
converting and multiplying on CUDA cores takes 5-7 instructions a weight.

How:
- out^T = W x^T as mma.m16n8k16 (bf16 in, float32 sums): A = 16 output rows x 16 K of weights, in
  registers; B = x, one row of x a column (up to 8 rows); C's column m is row m of the product.
- Gluon (Triton's explicit-layout dialect) loads the weights straight into A's register layout, so
  nothing passes through shared memory: plain Triton staged the converted tile there (128 STS.U16 a
  thread a group, local SASS).
- The copy (`pack`) stores each 16-row tile's words in the order its 32 lanes hold them: a lane reads
  32 contiguous bytes a group of 128 K.
- A word holds four K pairs: bits 4p..4p+3 and 16+4p..19+4p hold the codes of K = 32p + 2j and 32p +
  2j + 1 of the group. One shift, one LOP3 (to 0x4300 | q, the bf16 128 + q) and one bf16x2
  subtraction of 136 make a register of A, exactly q - 8: 1.4 instructions a weight.
  - Local sm_90 SASS (triton 3.6), one row: 2.3-3.3 instructions a weight in the loop (2.3 at four
    tiles a warp; 3.2-3.3 at one), no shared memory, no barriers; 2-8 rows: 2.7-4.4.
- Each group's float32 partial is scaled once: acc += s * part + z * sum(x over the group).
  - sum(x) over the group from CUDA cores: 16 values a lane and three shuffles, laid out so that the
    sums land in C's columns. The one-row path (ONE_ROW) and the 2-8-row path add a row's values in the
    same order, and config_for keeps one row's K warps at any M: a row's output has the same bits alone
    or among others, which self-speculation's verify needs. An mma of B with an A of ones (the first
    version) put 2-8 rows' sums on the tensor cores but rounded apart from the one-row sums; with it
    o and down ran 9.0 / 17.0 µs at one row against 6.6 / 15.4 with CUDA-core sums of 4 values a lane
    (H100). This layout (16 a lane) took the loop from 180 to 212 instructions at one tile a warp
    (local SASS), 196-208 with scales a group ahead; on the H100 each matrix's best config went from
    58.5 to 59.9 µs a layer, and the row property held on every 8B shape (results/int4_mma_2026_12_05c/).
  - So the product is the reference's (W = (q - 8) s + z, teal_kernels/reference.py) up to float32
    summation order, as in every kernel of ours.
- A program's warps form a [K warps, row warps] grid. The K warps take consecutive runs of the
  program's groups, and their sums meet once in shared memory. So a program has warps enough
  without partial sums in global memory, and one launch is the whole product.
- Launch configs (`config_for`): a rule that picks the measured one-row winner on every Llama-3-8B
  matrix.
- No RMSNorm prologue: two were built and removed. Normalizing B and the sums of x in every group
  took q|k|v from 10.7 to 12.1 µs and gate|up from 29.6 to 38.4 (H100), 351 -> 318 tok/s end to end;
  each program writing the normed row once into its own scratch row (two passes over x and a barrier
  before the loop) took q|k|v from 8.7 to 10.3 µs and gate|up from 29.4 to 35.0, 371.3 -> 357.8 tok/s
  dense (H100, results/int4_mma_2026_12_05b/ and _05c/). Torch runs the norm, or none runs (below).
- SiLU(gate) * up in the epilogue of a gate|up matrix (GATE; TEAL_INT4_MMA_GATE): its paired copy
  (`paired_order`: 16 gate rows, then the same outputs' 16 up rows) puts a gate and its up in the same
  registers of one thread, so the kernel writes the down projection's input, [M, N / 2], and the
  SiLU * up kernel before down goes. End to end 385.7 against 371.3 tok/s dense (H100,
  results/int4_mma_2026_12_05c/): on by default.
- The RMSNorms without a kernel of their own (TEAL_INT4_MMA_NORM_STATS, on by default): o's epilogue
  (STATS, int4_mma_with_stats), and down's for the next block, also writes h * the norm's weight and
  the sums of h^2 over each 16-row tile; gate|up and q|k|v (PRENORMED) multiply that and scale their
  product by the row's 1 / sqrt(sum / K + eps), the sums requested right after the PDL wait and added
  after the loop. No instruction added to either loop (local SASS). A 16-row tile's squares are added
  in one thread's registers in order and a row's tile sums in one layout, so a row's bits are the same at
  any M (GPU tests). End to end 396.5 -> 420.1 tok/s dense, and with bf16 scales (pack's scale_dtype, on
  by default) and short attention tiles 445.5 (H100, results/int4_defaults_2026_12_05/).
- A warp requests a group's words, scales and zeros `lookahead` groups before it multiplies them
  (MmaConfig; config_for gives 2, with two tiles a warp, to the long matrices: gate|up 29.4 against the
  previous rule's (4, 1, 4, 1) 32.2 µs, down 15.0 against (16, 1, 1, 1) 16.6, one row, one call, H100,
  results/int4_mma_2026_12_05c/ run 4).
- Programmatic dependent launch (TEAL_PDL, as the GEMVs): the first groups' weights are requested
  before the kernel waits for the previous one, and the next may launch once the loop is done.

Only group 128 and bf16 activations. PackedLinear attaches this copy in place of tinygemm's where the
shape fits unless TEAL_INT4_MMA=0 (linear.py decides).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from teal_kernels.reference import check_norm_statistics, norm_statistics

GROUP = 128  # one loop step: four planes of 32 K (two A tiles' K) and one scale a row
TILE_ROWS = 16  # mma.m16n8k16's M
WORDS_A_LANE = 8  # a lane's words of one 16-row tile and group
MAX_ROWS = 8  # rows of x: B's 8 columns


class MmaConfig(NamedTuple):
    """A launch: warps along K and along the outputs, 16-row tiles a warp holds, groups of weights
    (with their scales and zeros) a warp has requested ahead of the one it multiplies (1 or 2)."""
    k_warps: int
    row_warps: int
    tiles_a_warp: int
    lookahead: int = 1

    @property
    def rows(self) -> int:
        """Outputs a program."""
        return TILE_ROWS * self.row_warps * self.tiles_a_warp


TARGET_WARPS = 4096  # warps a launch aims at (~31 an SM of an H100 / H200): the measured winners run 1536-4096
WIDE_ONE_ROW = 16384  # outputs from which a warp holds two 16-row tiles at one row (four at 2-8 rows)
LONG_K = 8192  # inputs from which a warp holds two tiles at one row and requests two groups ahead


def fits(k: int, n: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes a [K, N] int4 matrix of this group size for `dtype` activations."""
    return dtype == torch.bfloat16 and group_size == GROUP and k % GROUP == 0 and n % TILE_ROWS == 0


def config_for(k: int, n: int, m: int = 1) -> MmaConfig:
    """The launch for a [K, N] matrix and m rows of x, by a rule that gives the fastest config on each
    Llama-3-8B matrix at one row among those with one row's K warps (H100, 2026-12-05,
    results/int4_mma_2026_12_05c/): q|k|v (8, 1, 1, 1), o (16, 1, 1, 1), gate|up (4, 1, 2, 2), down
    (16, 1, 2, 2). Long matrices (WIDE_ONE_ROW outputs or LONG_K inputs) take two 16-row tiles a warp
    and two groups requested ahead, the others one tile and one group; then the most K warps (up to 16,
    dividing the groups) that leave each at least two groups a tile it holds and keep the launch within
    TARGET_WARPS warps. At 2-8 rows the same K warps, so that a row's output adds its groups in the same
    order at any M (self-speculation's verify rounds as the one-row step), and two tiles a warp (four
    from WIDE_ONE_ROW outputs): x's loads and sums shared by more outputs."""
    long = n >= WIDE_ONE_ROW or k >= LONG_K
    tiles_a_warp = 2 if long and n % (2 * TILE_ROWS) == 0 else 1
    groups, programs = k // GROUP, n // (TILE_ROWS * tiles_a_warp)
    k_warps = 1
    while (k_warps < 16 and groups % (2 * k_warps) == 0 and groups // (2 * k_warps) >= 2 * tiles_a_warp
           and programs * 2 * k_warps <= TARGET_WARPS):
        k_warps *= 2
    if m > 1:
        tiles_a_warp = next((t for t in (4 if n >= WIDE_ONE_ROW else 2, 1) if n % (t * TILE_ROWS) == 0))
    return MmaConfig(k_warps, 1, tiles_a_warp, 2 if long else 1)


def _lane_slot_to_row_pair(lane: Tensor, slot: Tensor) -> tuple[Tensor, Tensor]:
    """Where word `slot` of `lane` sits in its 16-row tile: (row, K pair j of each plane). mma.m16n8k16's
    A fragment with two 16-wide K blocks (Gluon's DotOperandLayout(0, mma v2, k_width 2) at [16, 32]:
    registers K + 1, row + 8, K + 8, K + 16; lanes K + 2, K + 4, row + 1, row + 2, row + 4), with the
    register of K + 1 folded into one word's two halves."""
    row = (slot & 1) * 8 + (lane >> 2)
    pair = ((slot >> 2) & 1) * 8 + ((slot >> 1) & 1) * 4 + (lane & 3)
    return row, pair


def _lanes_and_slots() -> tuple[Tensor, Tensor]:
    return torch.arange(32).repeat_interleave(WORDS_A_LANE), torch.arange(WORDS_A_LANE).repeat(32)


def pairs(k: int, n: int) -> bool:
    """Whether a gate|up matrix [K, N] takes the paired copy (pack(paired=True), the kernel's GATE
    epilogue): every config_for launch of it, at 1-8 rows, holds an even number of tiles a warp."""
    return n % (2 * TILE_ROWS) == 0 and all(config_for(k, n, m).tiles_a_warp % 2 == 0 for m in range(1, MAX_ROWS + 1))


def paired_order(n: int) -> Tensor:
    """The paired copy's output order of a gate|up matrix: 16 gate rows, the 16 up rows of the same
    outputs, and so on, so that a warp's tiles 2t and 2t + 1 hold a gate and its up in the same
    registers of the same threads."""
    half = n // 2
    gate = torch.arange(half).view(-1, 1, TILE_ROWS)
    return torch.cat((gate, gate + half), dim=1).flatten()


def pack(w: Tensor, scales: Tensor, zeros: Tensor, paired: bool = False,
         scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Our int4-g128 layout (uint8 [K, N / 2], column 2c in the low nibble; float32 scales and zeros
    [K / 128, N]) -> (words int32 [N / 16, K / 128, 32, 8], scales [N, K / 128], zeros [N, K / 128]) on
    w's device. Word (t, g, lane, slot) with (r, j) = the fragment position of (lane, slot): bits
    4p..4p+3 the code of output 16t + r at K = 128g + 32p + 2j, bits 16+4p..19+4p that of K + 1.
    `paired` (a gate|up matrix): outputs in paired_order, for the kernel's GATE epilogue. `scale_dtype`
    bfloat16 (TEAL_INT4_MMA_BF16_SCALES): scales and zeros rounded to bf16, 4 bytes a group and output
    instead of 8 (a copy with other weights than the reference's, as tinygemm's bf16 copy is)."""
    k, n = w.shape[0], w.shape[1] * 2
    if (k % GROUP or n % (2 * TILE_ROWS if paired else TILE_ROWS) or scales.shape != (k // GROUP, n)
            or zeros.shape != scales.shape or scale_dtype not in (torch.float32, torch.bfloat16)):
        raise ValueError(f"int4_mma.pack needs K a multiple of {GROUP}, N of {TILE_ROWS} ({2 * TILE_ROWS} paired) "
                         f"and scales / zeros [K / {GROUP}, N] kept in float32 or bfloat16; got w {tuple(w.shape)}, "
                         f"scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, {scale_dtype}")
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n).t()  # [N, K] codes, uint8
    if paired:
        order = paired_order(n).to(w.device)
        q, scales, zeros = q[order], scales[:, order], zeros[:, order]
    q = q.reshape(n // TILE_ROWS, TILE_ROWS, k // GROUP, 4, 16, 2)  # tile, row, group, plane, pair, K parity
    row, pair = (i.to(w.device) for i in _lane_slot_to_row_pair(*_lanes_and_slots()))
    picked = q[:, row, :, :, pair, :]  # [lane * slot, tile, group, plane, parity]
    words = torch.zeros(picked.shape[:3], dtype=torch.int32, device=w.device)
    for plane in range(4):
        for parity in range(2):  # int32 shifts wrap into the sign bit: the word's bits as they are
            words |= picked[..., plane, parity].to(torch.int32) << (4 * plane + 16 * parity)
    words = words.permute(1, 2, 0)  # [tile, group, lane * slot]
    return (words.reshape(n // TILE_ROWS, k // GROUP, 32, WORDS_A_LANE).contiguous(),
            scales.t().to(scale_dtype).contiguous(), zeros.t().to(scale_dtype).contiguous())


def unpack_codes(words: Tensor) -> Tensor:
    """pack's words -> the int4 codes [N, K] (int64): the inverse of its layout (the CPU reference
    reads the copy through it; tests check pack with it)."""
    tiles, groups = words.shape[:2]
    n, k = tiles * TILE_ROWS, groups * GROUP
    flat = (words.to(torch.int64) & 0xFFFFFFFF).reshape(tiles, groups, 32 * WORDS_A_LANE).cpu()
    row, pair = _lane_slot_to_row_pair(*_lanes_and_slots())
    codes = torch.empty(tiles, TILE_ROWS, groups, 4, 16, 2, dtype=torch.int64)
    for p in range(4):
        for parity in range(2):
            codes[:, row, :, p, pair, parity] = ((flat >> (4 * p + 16 * parity)) & 0xF).permute(2, 0, 1)
    return codes.reshape(n, k)


def int4_mma_reference(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None = None,
                       gate: bool = False, sumsq: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """What int4_mma computes, in float32 from the packed copy (the CPU's implementation of the op):
    W[n, k] = (q - 8) * scales[n, k // 128] + zeros[n, k // 128]; out = x @ W^T (with `sumsq`, times
    1 / sqrt(sum(sumsq[m]) / K + eps)) rounded to x's dtype, then + residual (rounded again). `gate` (a
    paired copy): SiLU(gate) * up of the product in the natural order, as reference.gated_input."""
    from teal_kernels.reference import dequantize_weight, gated_input

    codes = unpack_codes(words).t().to(x.device)  # [K, N]
    ours = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8)  # back to our layout, the format's one definition
    weight = dequantize_weight(ours, scales.t().float(), zeros.t().float(), GROUP)  # [K, N] float32
    product = x.float() @ weight
    if sumsq is not None:
        product = product * torch.rsqrt(sumsq.sum(dim=1, keepdim=True) / x.shape[1] + eps)
    out = product.to(x.dtype)
    if gate:
        natural = torch.empty_like(out)
        natural[:, paired_order(out.shape[1]).to(out.device)] = out
        return gated_input(natural)
    return out if residual is None else out + residual


def int4_mma_stats_reference(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None,
                             stats_weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What int4_mma_with_stats computes (the CPU's implementation): the product out as
    int4_mma_reference's, out * stats_weight rounded, and out's squares summed over each 16-row tile."""
    out = int4_mma_reference(x, words, scales, zeros, residual)
    return out, *norm_statistics(out, stats_weight)


@functools.cache
def grid_dependency():
    """A Gluon function for griddepcontrol (PDL): WAIT until the previous grid's writes are visible,
    else let the next grid start launching (it waits for this one in turn before reading anything).
    Built on first use, as the kernels that call it (benchmarks/bf16_mma_lab.py's too)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def _grid_dependency(WAIT: gl.constexpr):
        if WAIT:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

    return _grid_dependency


@functools.cache
def _kernel():
    """The Gluon kernel, built on first use: Gluon needs a CUDA build of Triton (no interpreter)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.jit
    def _to_bf16_pair(words, P: gl.constexpr):
        """Plane P of each word as the exact bf16 pair (q_lo - 8, q_hi - 8): (w >> 4P) & 0x000F000F |
        0x43004300 is 128 + q in both halves, then one bf16x2 subtraction of 136."""
        return gl.inline_asm_elementwise(
            f"{{ .reg .b32 t, c; shr.b32 t, $2, {4 * P}; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA; "
            "mov.b32 c, 0x43084308; sub.rn.bf16x2 t, t, c; mov.b32 {$0, $1}, t; }",
            "=h,=h,r", [words], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)

    _grid_dependency = grid_dependency()

    @gluon.jit
    def _word_pointers(w_ptr, tile0, g, NG, KW: gl.constexpr, TILES: gl.constexpr, LOAD: gl.constexpr):
        """The addresses of group g[i] of the program's tiles for each K warp i, 32 contiguous bytes a
        lane ([KW, TILES, 32, 8]; the next group's are 256 words on)."""
        kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LOAD))))
        t = gl.arange(0, TILES, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LOAD))))
        lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LOAD))))
        slot = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LOAD))))
        g = gl.convert_layout(g, kw.type.layout)
        tile_group = (tile0 + t)[None, :] * NG + g[:, None]  # [KW, TILES]
        offs = (tile_group[:, :, None, None] * 32 + lane[None, None, :, None]) * 8 + slot[None, None, None, :]
        return w_ptr + offs

    @gluon.jit
    def _words(pointers, KW: gl.constexpr, ROWS: gl.constexpr, WORDS: gl.constexpr):
        """One group's words (_word_pointers), viewed as [KW, ROWS, 16] (K warp, row, K pair) in the
        layout that becomes A's registers."""
        w = gl.load(pointers)  # [KW, TILES, 32, 8]: lane = 4 * (row % 8) + pair % 4
        w = gl.reshape(w, [KW, ROWS // 16, 8, 4, 2, 2, 2])  # row % 8, pair % 4, pair // 8, (pair // 4) % 2, row // 8
        w = gl.reshape(gl.permute(w, [0, 1, 6, 2, 4, 5, 3]), [KW, ROWS, 16])
        return gl.convert_layout(w, WORDS, assert_trivial=True)

    @gluon.jit
    def _gated(gate, up):
        """SiLU(gate) * up in float32 (the sparse GEMV's formula), rounded once."""
        return (gate * (1.0 / (1.0 + gl.exp(-gate))) * up).to(gl.bfloat16)

    @gluon.jit
    def _store_gated_row(out_ptr, gate, up):
        """One row: gate and up [pairs, 16] (output 16 pair + r) -> SiLU(gate) * up at out_ptr."""
        pair = gl.arange(0, gate.shape[0], layout=gl.SliceLayout(1, gate.type.layout))
        r = gl.arange(0, 16, layout=gl.SliceLayout(0, gate.type.layout))
        gl.store(out_ptr + pair[:, None] * 16 + r[None, :], _gated(gate, up))

    @gluon.jit
    def _store_gated_rows(out_ptr, gate, up, row_stride, M):
        """Rows of x: gate and up [pairs, 16, 8], column m (< M) at out_ptr + m * row_stride."""
        pair = gl.arange(0, gate.shape[0], layout=gl.SliceLayout(1, gl.SliceLayout(2, gate.type.layout)))
        r = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, gate.type.layout)))
        m = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gate.type.layout)))
        offs = (pair[:, None] * 16 + r[None, :])[:, :, None] + (m * row_stride)[None, None, :]
        gl.store(out_ptr + offs, _gated(gate, up), mask=(m < M)[None, None, :])

    @gluon.jit
    def _int4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, sw_ptr, sc_ptr, sq_ptr, eps,
                         M, K, N,
                         KW: gl.constexpr, ROWS: gl.constexpr, LOOKAHEAD: gl.constexpr, PDL: gl.constexpr,
                         RESIDUAL: gl.constexpr, ONE_ROW: gl.constexpr, GATE: gl.constexpr,
                         STATS: gl.constexpr, PRENORMED: gl.constexpr, SQ_P: gl.constexpr,
                         MMA: gl.constexpr,
                         A: gl.constexpr, B: gl.constexpr, LOAD: gl.constexpr, WORDS: gl.constexpr,
                         XS: gl.constexpr, XS8: gl.constexpr,
                         ROW16: gl.constexpr, ROWS16: gl.constexpr, T16: gl.constexpr, T16M: gl.constexpr,
                         SQ: gl.constexpr):
        """out[m, n] = sum_k x[m, k] W[k, n] (+ res[m, n] with RESIDUAL) for ROWS outputs n of this
        program and every m < M. ONE_ROW (M == 1): x in all of B's columns (unmasked loads), column 0's
        epilogue. GATE (a paired copy): out[m, j] = SiLU(gate_j) * up_j instead,
        [M, N / 2]. STATS (the producer of the next norm's input): also sc[m, n] = out[m, n] * sw[n]
        rounded, and sq[m, t] = the sum of out[m, n]^2 over the outputs n of 16-row tile t, in one
        thread's registers in order (the same at any M and config). PRENORMED (that norm's consumer): x
        is sc, and the product is scaled by 1 / sqrt(sum_t sq[m, t] / K + eps) before it is rounded."""
        pid = gl.program_id(0)
        NG = K // 128
        g_per = NG // KW  # groups a K warp
        L2: gl.constexpr = gl.SliceLayout(2, MMA)
        kw = gl.arange(0, KW, layout=gl.SliceLayout(1, L2))
        g_first = kw * g_per  # [KW]
        rows = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(0, L2))
        bkw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, B)))
        bk = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, B)))
        bm = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, B)))
        b_ok = (bm < M)[None, None, :]
        acc = gl.zeros([KW, ROWS, 8], gl.float32, MMA)
        # loop-invariant addresses, offset by the group each step (the compiler folds the planes' constant
        # offsets into the loads): 15-20% fewer instructions in the loop than addresses rebuilt a group
        w_first = _word_pointers(w_ptr, pid * (ROWS // 16), g_first, NG, KW, ROWS // 16, LOAD)
        gb_first = gl.convert_layout(g_first, bkw.type.layout)
        # [KW, 32, 8]: column m = row m of x; at one row every column is row 0
        x_rows = bm * (0 if ONE_ROW else K)
        x_first = x_ptr + (gb_first * 128)[:, None, None] + bk[None, :, None] + x_rows[None, None, :]
        # one row: each K warp's group of x whole ([KW, 128], 16 values a lane), for its sum
        xs_kw = gl.arange(0, KW, layout=gl.SliceLayout(1, XS))
        xs_k = gl.arange(0, 128, layout=gl.SliceLayout(0, XS))
        xs_offs = (gl.convert_layout(g_first, xs_kw.type.layout) * 128)[:, None] + xs_k[None, :]
        # more rows: the same [KW, 8, 128], each row of x laid out as one row's (so its sums are ONE_ROW's)
        x8_kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, XS8)))
        x8_m = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, XS8)))
        x8_k = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, XS8)))
        x8_offs = ((gl.convert_layout(g_first, x8_kw.type.layout) * 128)[:, None, None] + x8_k[None, None, :]
                   + (x8_m * K)[None, :, None])
        x8_ok = (x8_m < M)[None, :, None]
        s_first = s_ptr + rows[None, :] * NG + g_first[:, None]  # [KW, ROWS]
        z_first = z_ptr + rows[None, :] * NG + g_first[:, None]
        # the first LOOKAHEAD groups' weights, scales and zeros (none of them the previous kernel's output)
        nxt = _words(w_first, KW, ROWS, WORDS)
        s_nxt = gl.load(s_first)  # [KW, ROWS]
        z_nxt = gl.load(z_first)
        if LOOKAHEAD == 2:
            g1 = gl.minimum(1, g_per - 1)
            nxt2 = _words(w_first + g1 * 256, KW, ROWS, WORDS)
            s_nxt2 = gl.load(s_first + g1)
            z_nxt2 = gl.load(z_first + g1)
        if PDL:  # the first groups' weights are on their way while the previous kernel finishes
            _grid_dependency(True)
        if PRENORMED:  # a row's tile sums of squares (the previous kernel's), requested now, added after the loop
            sq_i = gl.arange(0, SQ_P, layout=SQ)
            sq_ok = sq_i < K // 16
            if ONE_ROW:
                sq_row0 = gl.load(sq_ptr + sq_i, mask=sq_ok, other=0.0)
        for i in range(g_per):
            words = nxt  # this group's; the load of the group LOOKAHEAD on goes out before the math
            s = s_nxt.to(gl.float32)  # the copy's float32 or bfloat16 scales and zeros, used in float32
            z = z_nxt.to(gl.float32)
            if LOOKAHEAD == 2:
                nxt = nxt2
                s_nxt = s_nxt2
                z_nxt = z_nxt2
                g_next = gl.minimum(i + 2, g_per - 1)
                nxt2 = _words(w_first + g_next * 256, KW, ROWS, WORDS)
                s_nxt2 = gl.load(s_first + g_next)
                z_nxt2 = gl.load(z_first + g_next)
            else:
                g_next = gl.minimum(i + 1, g_per - 1)
                nxt = _words(w_first + g_next * 256, KW, ROWS, WORDS)
                s_nxt = gl.load(s_first + g_next)
                z_nxt = gl.load(z_first + g_next)
            x_group = x_first + i * 128
            part = gl.zeros([KW, ROWS, 8], gl.float32, MMA)
            for p in gl.static_range(4):
                lo, hi = _to_bf16_pair(words, p)
                a = gl.convert_layout(gl.reshape(gl.join(lo, hi), [KW, ROWS, 32]), A, assert_trivial=True)
                if ONE_ROW:
                    b = gl.load(x_group + p * 32)
                else:
                    b = gl.load(x_group + p * 32, mask=b_ok, other=0.0)
                part = mma_v2(a, b, part)
            # the group's sum of x: 16 values a lane and three shuffles, the same order at any M
            if ONE_ROW:
                xv = gl.load(x_ptr + xs_offs + i * 128).to(gl.float32)
                x_sums = gl.convert_layout(gl.sum(xv, axis=1), gl.SliceLayout(1, L2))[:, None, None]  # [KW, 1, 1]
            else:
                xv8 = gl.load(x_ptr + x8_offs + i * 128, mask=x8_ok, other=0.0).to(gl.float32)  # [KW, 8, 128]
                # [KW, 1, 8]: a column a row of x
                x_sums = gl.convert_layout(gl.sum(xv8, axis=2), gl.SliceLayout(1, MMA))[:, None, :]
            acc += part * s[:, :, None] + z[:, :, None] * x_sums  # one expression at any M: the same roundings
        if PDL:
            _grid_dependency(False)
        if ONE_ROW:  # column 0 only, then the K warps meet (a row of ROWS values through shared memory)
            o_cols1 = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
            out1 = gl.sum(gl.sum(gl.where(o_cols1[None, None, :] == 0, acc, 0.0), axis=2), axis=0)
            if PRENORMED:
                out1 = out1 * (1.0 / gl.sqrt_rn(gl.sum(sq_row0, axis=0) / K + eps))
            out1 = out1.to(gl.bfloat16)
            if RESIDUAL:
                out1 = (out1.to(gl.float32) + gl.load(res_ptr + rows).to(gl.float32)).to(gl.bfloat16)
            if STATS:
                h = out1.to(gl.float32)
                gl.store(sc_ptr + rows, (h * gl.load(sw_ptr + rows).to(gl.float32)).to(gl.bfloat16))
                squares = gl.reshape(gl.convert_layout(h * h, ROW16), [ROWS // 16, 16])
                tile = pid * (ROWS // 16) + gl.arange(0, ROWS // 16, layout=gl.SliceLayout(1, T16))
                gl.store(sq_ptr + tile, gl.sum(gl.convert_layout(squares, T16), axis=1))
            if GATE:  # rows 32 t .. 32 t + 15 the gates of outputs 16 t .., the next 16 their ups
                gate, up = gl.split(gl.permute(gl.reshape(out1.to(gl.float32), [ROWS // 32, 2, 16]), [0, 2, 1]))
                _store_gated_row(out_ptr + pid * (ROWS // 2), gate, up)
            else:
                gl.store(out_ptr + rows, out1)
        else:
            out = gl.sum(acc, axis=0)  # [ROWS, 8]: the K warps meet
            o_rows = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, MMA)))
            o_cols = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, MMA)))
            o_offs = o_cols[None, :] * N + o_rows[:, None]
            o_ok = (o_cols < M)[None, :]
            if PRENORMED:  # each row's scale from its sums as one row's: the same code, layout and order
                inv_rms = gl.full([8], 1.0, gl.float32, o_cols.type.layout)
                for m in gl.static_range(8):
                    sq_m = gl.load(sq_ptr + m * (K // 16) + sq_i, mask=sq_ok & (m < M), other=0.0)
                    inv_rms = gl.where(o_cols == m, 1.0 / gl.sqrt_rn(gl.sum(sq_m, axis=0) / K + eps), inv_rms)
                out = out * inv_rms[None, :]
            out = out.to(gl.bfloat16)
            if RESIDUAL:  # the product rounded first, then the sum (the unfused model's order)
                res = gl.load(res_ptr + o_offs, mask=o_ok, other=0.0)
                out = (out.to(gl.float32) + res.to(gl.float32)).to(gl.bfloat16)
            if STATS:  # [ROWS / 16, 16, 8]: a column's 16 squares of a tile in one thread, as at one row
                h = out.to(gl.float32)
                gl.store(sc_ptr + o_offs, (h * gl.load(sw_ptr + o_rows).to(gl.float32)[:, None]).to(gl.bfloat16),
                         mask=o_ok)
                squares = gl.reshape(gl.convert_layout(h * h, ROWS16), [ROWS // 16, 16, 8])
                squares = gl.sum(gl.convert_layout(squares, T16M), axis=1)
                t_i = pid * (ROWS // 16) + gl.arange(0, ROWS // 16, layout=gl.SliceLayout(1, squares.type.layout))
                m_i = gl.arange(0, 8, layout=gl.SliceLayout(0, squares.type.layout))
                gl.store(sq_ptr + m_i[None, :] * (N // 16) + t_i[:, None], squares, mask=(m_i < M)[None, :])
            if GATE:  # [ROWS / 32, 16, 8] gates and ups, a column a row of x, stored at N / 2 a row
                gated = gl.permute(gl.reshape(out.to(gl.float32), [ROWS // 32, 2, 16, 8]), [0, 2, 3, 1])
                gate, up = gl.split(gated)
                _store_gated_rows(out_ptr + pid * (ROWS // 2), gate, up, N // 2, M)
            else:
                gl.store(out_ptr + o_offs, out, mask=o_ok)

    return _int4_mma_kernel, gl


@functools.cache
def _layouts(cfg: MmaConfig) -> dict:
    """The kernel's layout arguments for a config."""
    _, gl = _kernel()
    bits = lambda v: v.bit_length() - 1  # noqa: E731 (log2 of a power of two)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[cfg.k_warps, cfg.row_warps, 1],
                                    instr_shape=[1, 16, 8])
    load = gl.BlockedLayout(size_per_thread=[1, 1, 1, 8], threads_per_warp=[1, 1, 32, 1],
                            warps_per_cta=[cfg.k_warps, cfg.row_warps, 1, 1], order=[3, 2, 1, 0])
    # A at [KW, rows, 32] (Gluon's linear layout of it: registers K + 1, row + 8, K + 8, K + 16, then
    # the row tiles; warps: row warps, then K warps) without its K + 1 register and with K halved
    warps = [[0, 16 << i, 0] for i in range(bits(cfg.row_warps))] + [[1 << i, 0, 0] for i in range(bits(cfg.k_warps))]
    tiles = [[0, 16 * cfg.row_warps << i, 0] for i in range(bits(cfg.tiles_a_warp))]
    words = gl.DistributedLinearLayout(reg_bases=[[0, 8, 0], [0, 0, 4], [0, 0, 8]] + tiles,
                                       lane_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
                                       warp_bases=warps, block_bases=[], shape=[cfg.k_warps, cfg.rows, 16])
    # a group's sums of x: 8 rows (column m of C = row m of x: a register and lane bits 0-1, as C's
    # columns, so the sums land where C's columns are) x 128 K a K warp (16 a lane, lane bits 2-4);
    # one row: the same without the rows (lane bits 0-1 repeat), so a row's sum adds its values in the
    # same order at any M (self-speculation's verify rounds as the one-row step)
    kw_warps = [[1 << i, 0] for i in range(bits(cfg.k_warps))]
    xs = gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8]],
                                    lane_bases=[[0, 0], [0, 0], [0, 16], [0, 32], [0, 64]],
                                    warp_bases=[[0, 0]] * bits(cfg.row_warps) + kw_warps,
                                    block_bases=[], shape=[cfg.k_warps, 128])
    xs8 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 1, 0]],
                                     lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 16], [0, 0, 32], [0, 0, 64]],
                                     warp_bases=[[0, 0, 0]] * bits(cfg.row_warps) + [[w, 0, 0] for w, _ in kw_warps],
                                     block_bases=[], shape=[cfg.k_warps, 8, 128])
    # STATS: a 16-row tile's squares in one thread's registers ([tiles, 16]; [tiles, 16, rows of x]),
    # added in order, the same at any M; PRENORMED: a row's tile sums, one a thread
    warps_n = cfg.k_warps * cfg.row_warps
    stats = dict(ROW16=gl.BlockedLayout([16], [32], [warps_n], [0]),
                 ROWS16=gl.BlockedLayout([16, 1], [4, 8], [warps_n, 1], [0, 1]),
                 T16=gl.BlockedLayout([1, 16], [32, 1], [warps_n, 1], [1, 0]),
                 T16M=gl.BlockedLayout([1, 16, 1], [4, 1, 8], [warps_n, 1, 1], [1, 2, 0]),
                 SQ=gl.BlockedLayout([1], [32], [warps_n], [0]))
    return dict(MMA=mma, A=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                B=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2), LOAD=load, WORDS=words,
                XS=xs, XS8=xs8, **stats)


def available() -> bool:
    """Whether this Triton has Gluon's mma_v2 (the kernel's one dependency beyond Triton itself)."""
    try:
        _kernel()
    except ImportError:
        return False
    return True


def int4_mma(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None = None,
             gate: bool = False, sumsq: Tensor | None = None, eps: float = 0.0, *,
             config: MmaConfig | None = None) -> Tensor:
    """x [M, K] bf16 (M <= 8) @ a packed int4-g128 matrix (pack's three tensors) -> [M, N] bf16, on
    CUDA (int4_mma_reference says exactly what); with `residual` [M, N] added to the product; with
    `gate` (pack(paired=True)'s copy of a gate|up matrix) SiLU(gate) * up [M, N / 2]; with `sumsq`
    [M, K / 16] float32 (int4_mma_with_stats' tile sums of squares, eps the norm's), x is the residual
    stream times the norm's weight and the product is scaled by the row's 1 / rms.
    Rejects, one line, what the kernel does not take."""
    return _launch(x, words, scales, zeros, residual, gate, sumsq, eps, None, config)


def int4_mma_with_stats(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None,
                        stats_weight: Tensor, scaled: Tensor, sumsq: Tensor, *,
                        config: MmaConfig | None = None) -> Tensor:
    """int4_mma's product `out` (+ residual), returned, and what the next RMSNorm's consumer takes
    instead of a norm kernel, written into `scaled` (out * stats_weight rounded, [M, N] bf16) and `sumsq`
    (the sums of out^2 over each 16-row tile, [M, N / 16] float32), both contiguous; stats_weight [N]
    the norm's weight."""
    check_norm_statistics((x.shape[0], scales.shape[0]), x.dtype, stats_weight, scaled, sumsq)
    return _launch(x, words, scales, zeros, residual, False, None, 0.0, (stats_weight, scaled, sumsq), config)


def _launch(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None,
            gate: bool, sumsq: Tensor | None, eps: float, stats: tuple[Tensor, Tensor, Tensor] | None,
            config: MmaConfig | None) -> Tensor:
    tiles, groups = words.shape[:2]
    n, k = tiles * TILE_ROWS, groups * GROUP
    m = x.shape[0]
    if (x.dim() != 2 or x.dtype != torch.bfloat16 or x.shape[1] != k or not 1 <= m <= MAX_ROWS
            or scales.shape != (n, groups) or zeros.shape != scales.shape or words.dtype != torch.int32
            or scales.dtype not in (torch.float32, torch.bfloat16) or zeros.dtype != scales.dtype):
        raise ValueError(f"int4_mma needs bf16 x [1-{MAX_ROWS}, {k}], int32 words and float32 or bfloat16 scales / "
                         f"zeros [{n}, {groups}]; got x {x.dtype} {tuple(x.shape)}, words {words.dtype}, scales "
                         f"{scales.dtype} {tuple(scales.shape)}, zeros {zeros.dtype} {tuple(zeros.shape)}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype):
        raise ValueError(f"int4_mma's residual must be bf16 [{m}, {n}], got {residual.dtype} {tuple(residual.shape)}")
    cfg = config or config_for(k, n, m)
    if n % cfg.rows or groups % cfg.k_warps or cfg.lookahead not in (1, 2):
        raise ValueError(f"int4_mma config {tuple(cfg)} needs N ({n}) a multiple of {cfg.rows}, {groups} groups "
                         f"a multiple of {cfg.k_warps} and a lookahead of 1 or 2")
    if gate and (residual is not None or cfg.tiles_a_warp % 2 or cfg.row_warps != 1):
        # with row warps a gate and its up no longer sit in one thread: the epilogue's split does not compile
        raise ValueError(f"int4_mma's gate epilogue takes no residual, an even number of tiles a warp and one row "
                         f"warp; got config {tuple(cfg)}, residual {residual is not None}")
    if sumsq is not None and (sumsq.shape != (m, k // TILE_ROWS) or sumsq.dtype != torch.float32):
        raise ValueError(f"int4_mma's sumsq must be float32 [{m}, {k // TILE_ROWS}]; got {sumsq.dtype} "
                         f"{tuple(sumsq.shape)}")
    if stats is not None and (stats[0].shape != (n,) or stats[0].dtype != x.dtype or gate):
        raise ValueError(f"int4_mma's statistics need the norm's weight bf16 [{n}] and no gate; got "
                         f"{stats[0].dtype} {tuple(stats[0].shape)}, gate {gate}")
    from teal_kernels.triton_gemv import launch_options  # the one place PDL is decided (TEAL_PDL)

    kernel, _ = _kernel()
    pdl = launch_options(x.device)
    out = torch.empty(m, n // 2 if gate else n, dtype=x.dtype, device=x.device)
    res = out if residual is None else residual.contiguous()  # an unread stand-in where there is none
    # without STATS: unread stand-ins (x, out; scales for the sums unless PRENORMED reads sumsq)
    stats_weight, scaled, sums = stats or (x, out, scales if sumsq is None else sumsq.contiguous())
    kernel[(n // cfg.rows,)](x.contiguous(), words, scales, zeros, out, res, stats_weight, scaled, sums,
                             eps, m, k, n,
                             KW=cfg.k_warps, ROWS=cfg.rows, LOOKAHEAD=cfg.lookahead, PDL=bool(pdl),
                             RESIDUAL=residual is not None, ONE_ROW=m == 1, GATE=gate,
                             STATS=stats is not None, PRENORMED=sumsq is not None,
                             SQ_P=1 << (k // TILE_ROWS - 1).bit_length(),
                             num_warps=cfg.k_warps * cfg.row_warps, **_layouts(cfg), **pdl)
    return out
