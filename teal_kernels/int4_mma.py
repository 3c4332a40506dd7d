"""Dense int4-g128 products of 1-8 rows on tensor cores (a Gluon kernel), for dense int4 decode calls.

Why: tinygemm (teal_kernels/tinygemm.py), which dense int4 decode calls ran through, reads a Llama-3-8B
layer at ~2 TB/s. This kernel took 59.6 µs a layer against tinygemm's 68.8 on an H100 (q|k|v 9.4 /
10.2, o 7.2 / 7.0, gate|up 27.4 / 33.0, down 15.6 / 18.6; benchmarks/int4_mma_lab.py,
results/int4_mma_2026_12_05/). A CUDA-core GEMV on a copy laid out for it lost to tinygemm on every
matrix (int4_kpacked_lab.py): converting and multiplying on CUDA cores takes 5-7 instructions a weight.

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
  - Local sm_90 SASS (triton 3.6): 2.7-3.0 instructions a weight in the loop (3.6-5.0 with the norm),
    no shared memory, no barriers.
- Each group's float32 partial is scaled once: acc += s * part + z * sum(x over the group).
  - sum(x) comes from the tensor cores too: one more mma of B with an A of ones (CUDA-core sums of
    B's registers took 44 FADDs and their conversions a group: 5.1 instructions a weight instead
    of 3.7 at the time, local SASS).
  - So the product is the reference's (W = (q - 8) s + z, teal_kernels/reference.py) up to float32
    summation order, as in every kernel of ours.
- A program's warps form a [K warps, row warps] grid. The K warps take consecutive runs of the
  program's groups, and their sums meet once in shared memory. So a program has warps enough
  without partial sums in global memory, and one launch is the whole product.
- Launch configs (`config_for`): a rule that picks the measured winner on every Llama-3-8B matrix.
- Programmatic dependent launch (TEAL_PDL, as the GEMVs): the first group's weights are requested
  before the kernel waits for the previous one, and the next may launch once the loop is done.

Only group 128 and bf16 activations. PackedLinear attaches this copy in place of tinygemm's where the
shape fits and TEAL_INT4_MMA is on (linear.py decides).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

GROUP = 128  # one loop step: four planes of 32 K (two A tiles' K) and one scale a row
TILE_ROWS = 16  # mma.m16n8k16's M
WORDS_A_LANE = 8  # a lane's words of one 16-row tile and group
MAX_ROWS = 8  # rows of x: B's 8 columns


class MmaConfig(NamedTuple):
    """A launch: warps along K and along the outputs, 16-row tiles a warp holds."""
    k_warps: int
    row_warps: int
    tiles_a_warp: int

    @property
    def rows(self) -> int:
        """Outputs a program."""
        return TILE_ROWS * self.row_warps * self.tiles_a_warp


TARGET_WARPS = 4096  # warps a launch aims at (~31 an SM of an H100 / H200): the measured winners run 1536-4096
WIDE = 6144  # outputs from which a warp holds two 16-row tiles (x's loads and sums shared by both)


def fits(k: int, n: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes a [K, N] int4 matrix of this group size for `dtype` activations."""
    return dtype == torch.bfloat16 and group_size == GROUP and k % GROUP == 0 and n % TILE_ROWS == 0


def config_for(k: int, n: int) -> MmaConfig:
    """The launch for a [K, N] matrix, by a rule that gives the fastest of 16 configs on each
    Llama-3-8B matrix (H100, 2026-12-05, results/int4_mma_2026_12_05/ run 3: q|k|v (8, 1, 2), o
    (16, 1, 1), gate|up (4, 1, 2), down (16, 1, 1)): two 16-row tiles a warp from WIDE outputs, one
    below; then the most K warps (up to 16, dividing the groups) that leave each at least two groups
    a tile it holds and keep the launch within TARGET_WARPS warps."""
    tiles_a_warp = 2 if n >= WIDE and n % (2 * TILE_ROWS) == 0 else 1
    groups, programs = k // GROUP, n // (TILE_ROWS * tiles_a_warp)
    k_warps = 1
    while (k_warps < 16 and groups % (2 * k_warps) == 0 and groups // (2 * k_warps) >= 2 * tiles_a_warp
           and programs * 2 * k_warps <= TARGET_WARPS):
        k_warps *= 2
    return MmaConfig(k_warps, 1, tiles_a_warp)


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


def pack(w: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Our int4-g128 layout (uint8 [K, N / 2], column 2c in the low nibble; float32 scales and zeros
    [K / 128, N]) -> (words int32 [N / 16, K / 128, 32, 8], scales [N, K / 128], zeros [N, K / 128]) on
    w's device. Word (t, g, lane, slot) with (r, j) = the fragment position of (lane, slot): bits
    4p..4p+3 the code of output 16t + r at K = 128g + 32p + 2j, bits 16+4p..19+4p that of K + 1."""
    k, n = w.shape[0], w.shape[1] * 2
    if k % GROUP or n % TILE_ROWS or scales.shape != (k // GROUP, n) or zeros.shape != scales.shape:
        raise ValueError(f"int4_mma.pack needs K a multiple of {GROUP}, N of {TILE_ROWS} and scales / zeros "
                         f"[K / {GROUP}, N]; got w {tuple(w.shape)}, scales {tuple(scales.shape)}, "
                         f"zeros {tuple(zeros.shape)}")
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n).t()  # [N, K] codes, uint8
    q = q.reshape(n // TILE_ROWS, TILE_ROWS, k // GROUP, 4, 16, 2)  # tile, row, group, plane, pair, K parity
    row, pair = (i.to(w.device) for i in _lane_slot_to_row_pair(*_lanes_and_slots()))
    picked = q[:, row, :, :, pair, :]  # [lane * slot, tile, group, plane, parity]
    words = torch.zeros(picked.shape[:3], dtype=torch.int32, device=w.device)
    for plane in range(4):
        for parity in range(2):  # int32 shifts wrap into the sign bit: the word's bits as they are
            words |= picked[..., plane, parity].to(torch.int32) << (4 * plane + 16 * parity)
    words = words.permute(1, 2, 0)  # [tile, group, lane * slot]
    return (words.reshape(n // TILE_ROWS, k // GROUP, 32, WORDS_A_LANE).contiguous(),
            scales.t().contiguous(), zeros.t().contiguous())


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
                       norm_weight: Tensor | None = None, eps: float = 0.0) -> Tensor:
    """What int4_mma computes, in float32 from the packed copy (the CPU's implementation of the op):
    W[n, k] = (q - 8) * scales[n, k // 128] + zeros[n, k // 128]; the input rms_normed(x) with a norm
    weight, else x; out = input @ W^T rounded to x's dtype, then + residual (rounded again)."""
    from teal_kernels.reference import dequantize_weight, rms_normed

    codes = unpack_codes(words).t().to(x.device)  # [K, N]
    ours = (codes[:, 0::2] | codes[:, 1::2] << 4).to(torch.uint8)  # back to our layout, the format's one definition
    weight = dequantize_weight(ours, scales.t(), zeros.t(), GROUP)  # [K, N] float32
    inputs = x if norm_weight is None else rms_normed(x, norm_weight, eps)
    out = (inputs.float() @ weight).to(x.dtype)
    return out if residual is None else out + residual


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

    @gluon.jit
    def _grid_dependency(WAIT: gl.constexpr):
        """griddepcontrol (PDL): WAIT until the previous grid's writes are visible, else let the next
        grid start launching (it waits for this one in turn before reading anything)."""
        if WAIT:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        else:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)

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
    def _int4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, res_ptr, nw_ptr, eps, M, K, N,
                         KW: gl.constexpr, ROWS: gl.constexpr, PDL: gl.constexpr, RESIDUAL: gl.constexpr,
                         NORM: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr,
                         LOAD: gl.constexpr, WORDS: gl.constexpr, XN: gl.constexpr, XCHUNK: gl.constexpr):
        """out[m, n] = sum_k x[m, k] W[k, n] (+ res[m, n] with RESIDUAL) for ROWS outputs n of this
        program and every m < M; with NORM, x is the residual stream and the input is model.RMSNorm's
        output (nw the norm's weight), rounded as the unfused model rounds it."""
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
        ones = gl.full([KW, ROWS, 32], 1.0, gl.bfloat16, A)
        # loop-invariant addresses, offset by the group each step (the compiler folds the planes' constant
        # offsets into the loads): 15-20% fewer instructions in the loop than addresses rebuilt a group
        w_first = _word_pointers(w_ptr, pid * (ROWS // 16), g_first, NG, KW, ROWS // 16, LOAD)
        gb_first = gl.convert_layout(g_first, bkw.type.layout)
        x_first = x_ptr + (gb_first * 128)[:, None, None] + bk[None, :, None] + bm[None, None, :] * K  # [KW, 32, 8]
        nw_first = nw_ptr + (gb_first * 128)[:, None] + bk[None, :]  # [KW, 32]
        s_first = s_ptr + rows[None, :] * NG + g_first[:, None]  # [KW, ROWS]
        z_first = z_ptr + rows[None, :] * NG + g_first[:, None]
        nxt = _words(w_first, KW, ROWS, WORDS)
        if PDL:  # the first group's weights are on their way while the previous kernel finishes
            _grid_dependency(True)
        if NORM:  # each row's 1 / rms over all of K: every program reads x once (K x M bf16, from L2)
            rm = gl.arange(0, 8, layout=gl.SliceLayout(1, XN))
            rk = gl.arange(0, XCHUNK, layout=gl.SliceLayout(0, XN))
            squares = gl.zeros([8, XCHUNK], gl.float32, XN)
            for k0 in range(0, K, XCHUNK):
                xv = gl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :],
                             mask=(rm < M)[:, None] & (k0 + rk < K)[None, :], other=0.0).to(gl.float32)
                squares += xv * xv
            inv_rms = 1.0 / gl.sqrt_rn(gl.sum(squares, axis=1) / K + eps)
            inv_rms = gl.convert_layout(inv_rms, gl.SliceLayout(0, gl.SliceLayout(1, B)))
        for i in range(g_per):
            words = nxt  # this group's words; the next group's load goes out before the math
            nxt = _words(w_first + gl.minimum(i + 1, g_per - 1) * 256, KW, ROWS, WORDS)
            x_group = x_first + i * 128
            part = gl.zeros([KW, ROWS, 8], gl.float32, MMA)
            x_sum = gl.zeros([KW, ROWS, 8], gl.float32, MMA)  # every row: the group's sum of x, a column a row of x
            for p in gl.static_range(4):
                lo, hi = _to_bf16_pair(words, p)
                a = gl.convert_layout(gl.reshape(gl.join(lo, hi), [KW, ROWS, 32]), A, assert_trivial=True)
                b = gl.load(x_group + p * 32, mask=b_ok, other=0.0)  # [KW, 32, 8]: column m = row m of x
                if NORM:  # weight * (x / rms rounded to bf16), rounded: model.RMSNorm's bf16 output
                    nw = gl.load(nw_first + (i * 128 + p * 32)).to(gl.float32)
                    normed = (b.to(gl.float32) * inv_rms[None, None, :]).to(gl.bfloat16).to(gl.float32)
                    b = (nw[:, :, None] * normed).to(gl.bfloat16)
                part = mma_v2(a, b, part)
                x_sum = mma_v2(ones, b, x_sum)  # on tensor cores: fewer instructions than sums on CUDA cores
            s = gl.load(s_first + i)  # [KW, ROWS]
            z = gl.load(z_first + i)
            acc += part * s[:, :, None] + z[:, :, None] * x_sum
        if PDL:
            _grid_dependency(False)
        out = gl.sum(acc, axis=0).to(gl.bfloat16)  # [ROWS, 8]: the K warps meet
        o_rows = pid * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, gl.SliceLayout(0, MMA)))
        o_cols = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, MMA)))
        o_offs = o_cols[None, :] * N + o_rows[:, None]
        o_ok = (o_cols < M)[None, :]
        if RESIDUAL:  # the product rounded first, then the sum (the unfused model's order)
            res = gl.load(res_ptr + o_offs, mask=o_ok, other=0.0)
            out = (out.to(gl.float32) + res.to(gl.float32)).to(gl.bfloat16)
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
    # the norm's statistics: 8 rows (M of them real) x 128 K a warp, 4 contiguous values a lane
    xn = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[1, 32],
                          warps_per_cta=[1, cfg.k_warps * cfg.row_warps], order=[1, 0])
    return dict(MMA=mma, A=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                B=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2), LOAD=load, WORDS=words, XN=xn,
                XCHUNK=128 * cfg.k_warps * cfg.row_warps)


def available() -> bool:
    """Whether this Triton has Gluon's mma_v2 (the kernel's one dependency beyond Triton itself)."""
    try:
        _kernel()
    except ImportError:
        return False
    return True


def int4_mma(x: Tensor, words: Tensor, scales: Tensor, zeros: Tensor, residual: Tensor | None = None,
             norm_weight: Tensor | None = None, eps: float = 0.0, *, config: MmaConfig | None = None) -> Tensor:
    """x [M, K] bf16 (M <= 8) @ a packed int4-g128 matrix (pack's three tensors) -> [M, N] bf16, on
    CUDA; with `residual` [M, N] added to the product, with `norm_weight` [K] (and eps) x taken as the
    residual stream and model.RMSNorm's output as the input (int4_mma_reference says exactly how).
    Rejects, one line, what the kernel does not take."""
    tiles, groups = words.shape[:2]
    n, k = tiles * TILE_ROWS, groups * GROUP
    m = x.shape[0]
    if (x.dim() != 2 or x.dtype != torch.bfloat16 or x.shape[1] != k or not 1 <= m <= MAX_ROWS
            or scales.shape != (n, groups) or zeros.shape != scales.shape or words.dtype != torch.int32):
        raise ValueError(f"int4_mma needs bf16 x [1-{MAX_ROWS}, {k}], int32 words and scales / zeros [{n}, {groups}]; "
                         f"got x {x.dtype} {tuple(x.shape)}, words {words.dtype}, scales {tuple(scales.shape)}, "
                         f"zeros {tuple(zeros.shape)}")
    if residual is not None and (residual.shape != (m, n) or residual.dtype != x.dtype):
        raise ValueError(f"int4_mma's residual must be bf16 [{m}, {n}], got {residual.dtype} {tuple(residual.shape)}")
    if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"int4_mma's norm weight must be bf16 [{k}], got {norm_weight.dtype} "
                         f"{tuple(norm_weight.shape)}")
    cfg = config or config_for(k, n)
    if n % cfg.rows or groups % cfg.k_warps:
        raise ValueError(f"int4_mma config {tuple(cfg)} needs N ({n}) a multiple of {cfg.rows} and {groups} groups "
                         f"a multiple of {cfg.k_warps}")
    from teal_kernels.triton_gemv import launch_options  # the one place PDL is decided (TEAL_PDL)

    kernel, _ = _kernel()
    pdl = launch_options(x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = out if residual is None else residual.contiguous()  # an unread stand-in where there is none
    nw = x if norm_weight is None else norm_weight
    kernel[(n // cfg.rows,)](x.contiguous(), words, scales, zeros, out, res, nw, eps, m, k, n, KW=cfg.k_warps,
                             ROWS=cfg.rows, PDL=bool(pdl), RESIDUAL=residual is not None, NORM=norm_weight is not None,
                             num_warps=cfg.k_warps * cfg.row_warps, **_layouts(cfg), **pdl)
    return out
