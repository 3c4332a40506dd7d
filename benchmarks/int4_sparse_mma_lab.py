"""Could TEAL's int4 product run on tensor cores, reading only the kept K rows? A lab (Gluon; written
without a GPU, its first run is phase int4_sparse_lab).

Why: the dense int4 product on tensor cores (teal_kernels/int4_mma.py) beats tinygemm, and at 50% our
CUDA-core gather kernel is no faster than it (gate|up 28.8 against 27.4 µs, H100,
results/int4_mma_2026_12_05/), so TEAL would bring an int4 model almost nothing. Its copy cannot skip
inputs: one register of it spans 8 K of a row. This kernel's copy is K-row-major, so a zeroed input
skips its row's bytes.

How (one row of x, group 128, one threshold for the matrix):
- Copy (`pack_rows`): for each K row, block of R 16-output tiles and lane group g = lane // 4, R bytes;
  byte t holds the codes of outputs 16t + g (low nibble) and 16t + g + 8 (high): the two rows a lane
  holds in mma.m16n8k16's A fragment. A lane reads R contiguous bytes a kept row (R = 8: 8 bytes).
- Per group of 128 K and warp: keep = |x| > threshold; four ballots make the 128-bit mask; each lane
  finds kept entries l, l + 32, l + 64, l + 96 of the compacted list (fns: the n-th set bit). One
  mma k-step takes 16 kept rows: lane (g, j) needs entries 16s + 2j + {0, 1, 8, 9} (shuffles from the
  lanes holding them), loads their R bytes (masked past the list's end) and the four x.
- A's registers: PRMT puts tile t's byte of rows k and k' into bytes 0 and 2; & 0x000F000F | 0x43004300
  and a bf16x2 subtraction of 136 give rows g (nibble 0) and g + 8 (nibble 4) exactly, q - 8, as in
  int4_mma. B is x at the same four rows (every column alike).
- Each group's float32 partial is scaled once: acc += s * part + z * (sum of the kept x).
- A program's warps split the groups (K warps, as int4_mma); the step loop runs to the most steps any of
  them needs (warps past their list multiply zeros without reading memory).
- Listing in the kernel costs every program a group's ballots, four fns (~30 SASS instructions each)
  and a barrier (the most steps): 520-850 instructions a group by local SASS. The `listed` configs list
  once a call instead (`list_kept`: one small plain-Triton launch; each warp then reads its entries and
  every K warp's count), ~280-480 a group. A k-step is 139 / 188 / 303 instructions at 4 / 8 / 16 tiles.

Rows of the table, µs a call, CUDA graphs over rotating weight copies (benchmarks/timing.py), per
Llama-3-8B matrix and sparsity:
  lab             this kernel at each of CONFIGS (K warps, 16-row tiles a warp, listed once a call;
                  the listing launch timed with it), checked against float64
  int4_mma        the dense tensor-core kernel at its rule's config (what dense int4 decode runs)
  gather          teal::sparse_gemv at the same threshold (what TEAL's int4 calls run now)
  floor           the kept rows' bytes with scales and zeros, at 4.28 TB/s

    python -m benchmarks.int4_sparse_mma_lab --out benchmarks/results/int4_sparse_lab/lab
    python -m benchmarks.int4_sparse_mma_lab --selftest     # GPU: small shapes against float64
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from benchmarks.int4_kpacked_lab import FLOOR_TB_S, max_error
from benchmarks.timing import MODEL_SHAPES, copies_for, graph_time_us, make_weight, make_x, threshold_for
from files import write_report
from teal_kernels.reference import dequantize_weight

GROUP = 128  # one scale a row and group; the kept list is built a group at a time
TILE_ROWS = 16  # mma.m16n8k16's M
STEP = 16  # kept rows a k-step
SPARSITIES = (0.0, 0.5, 0.65)


class SparseConfig(NamedTuple):
    """A launch: K warps a program (each a run of the groups), 16-row tiles a warp (R; the copy's
    block: R contiguous bytes a lane and kept row), and where the kept rows are listed: in the kernel,
    by every program for its groups, or (listed) once per call by `list_kept` before it."""
    k_warps: int
    tiles: int
    listed: bool = False

    @property
    def rows(self) -> int:
        return TILE_ROWS * self.tiles


CONFIGS = [SparseConfig(kw, r, listed) for listed in (False, True) for kw in (2, 4, 8, 16) for r in (4, 8, 16)]


def fits(k: int, n: int, config: SparseConfig) -> bool:
    return n % config.rows == 0 and (k // GROUP) % config.k_warps == 0


def pack_rows(w: Tensor, tiles: int) -> Tensor:
    """Our int4 layout (uint8 [K, N / 2], column 2c in the low nibble) -> int32 words
    [K, N / (16 R), 8, R / 4]: row k, block b, lane group g, then R bytes (little-endian in the words),
    byte t = code(16 R b + 16 t + g) | code(16 R b + 16 t + g + 8) << 4."""
    k, n = w.shape[0], w.shape[1] * 2
    if tiles not in (4, 8, 16) or n % (TILE_ROWS * tiles):
        raise ValueError(f"pack_rows needs R in 4, 8, 16 and N a multiple of 16 R; got R={tiles}, N={n}")
    codes = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n)
    codes = codes.reshape(k, n // (TILE_ROWS * tiles), tiles, 2, 8)  # row, block, tile, row half, g
    byte = codes[..., 0, :] | (codes[..., 1, :] << 4)  # [K, blocks, R, 8]
    return byte.permute(0, 1, 3, 2).contiguous().view(torch.int32)  # [K, blocks, 8, R / 4]


def unpack_rows(words: Tensor) -> Tensor:
    """pack_rows' words -> codes [K, N] (uint8): its inverse, which the CPU test checks pack_rows with."""
    k, blocks = words.shape[:2]
    byte = words.contiguous().view(torch.uint8).reshape(k, blocks, 8, -1).permute(0, 1, 3, 2)  # [K, b, R, g]
    codes = torch.stack((byte & 0xF, byte >> 4), dim=3)  # [K, b, R, half, g]
    return codes.reshape(k, -1)


def _nth_set_bit(mask: int, offset: int) -> int:
    """PTX fns.b32 d, mask, 0, offset (offset >= 1): the offset-th set bit from bit 0, or 0xffffffff."""
    for pos in range(32):
        if mask >> pos & 1:
            offset -= 1
            if offset == 0:
                return pos
    return 0xFFFFFFFF


def emulate(x: Tensor, threshold: float, words: Tensor, scales: Tensor, zeros: Tensor,
            config: SparseConfig) -> Tensor:
    """The kernel's index arithmetic, one program, warp and lane at a time, in float64 on the CPU: the
    list from ballots, popcounts and fns (in-kernel listing; list_kept's lists are the same entries),
    each k-step's rows 16 s + 2 j + {0, 1, 8, 9} for lane 4 g + j, the word and byte a lane reads for
    tile t, the nibbles of rows g and g + 8, x at the same rows. The CPU test holds it to reference(),
    so a slip in those formulas shows without a GPU (Gluon's layouts are checked by its compiler)."""
    k, blocks = words.shape[0], words.shape[1]
    tiles, n = config.tiles, blocks * config.rows
    xs = x[0].double().cpu()
    raw = words.cpu().contiguous().view(torch.uint8).reshape(k, blocks, 8, tiles)  # the bytes as stored
    out = torch.zeros(n, dtype=torch.float64)
    for grp in range(k // GROUP):  # any warp of any program lists its group alike
        xg = xs[GROUP * grp: GROUP * (grp + 1)]
        keep = (xg.abs() > threshold).tolist()
        masks = [sum(1 << lane for lane in range(32) if keep[32 * r + lane]) for r in range(4)]
        counts = [bin(m).count("1") for m in masks]
        starts = [0, counts[0], counts[0] + counts[1], counts[0] + counts[1] + counts[2]]
        total = sum(counts)
        kept = []
        for e in range(128):
            word = sum(e >= p for p in starts[1:])
            kept.append(32 * word + _nth_set_bit(masks[word], e - starts[word] + 1))
        x_sum = float(xg[[kk for kk in range(128) if keep[kk]]].sum()) if total else 0.0
        for block in range(blocks):
            part = torch.zeros(config.rows, dtype=torch.float64)
            for step in range((total + 15) // 16):
                for lane in range(32):
                    g, j = lane // 4, lane % 4
                    for dd in range(4):
                        entry = 16 * step + 2 * j + dd % 2 + 8 * (dd // 2)
                        if entry >= total:
                            continue
                        row_k = GROUP * grp + kept[entry]
                        for t in range(tiles):
                            byte = int(raw[row_k, block, g, t])
                            for half, code in ((0, byte & 0xF), (1, byte >> 4)):
                                part[16 * t + 8 * half + g] += (code - 8) * float(xs[row_k])
            cols = slice(block * config.rows, (block + 1) * config.rows)
            out[cols] += part * scales[grp, cols].double().cpu() + zeros[grp, cols].double().cpu() * x_sum
    return out.unsqueeze(0)


def reference(x: Tensor, threshold: float, w: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """(the product of the kept x in float64, the bound of an output's error), as int4_kpacked_lab's."""
    real = dequantize_weight(w.cpu(), scales.cpu(), zeros.cpu(), GROUP).double()
    kept = torch.where(x.abs().float() > threshold, x, torch.zeros_like(x)).cpu().double()
    exact = kept @ real
    return exact, 2.0**-7 * exact.abs() + 1e-5 * (kept.abs() @ real.abs()) + 1e-30


@triton.jit
def _list_kernel(x_ptr, threshold, list_ptr, count_ptr, sum_ptr):
    """Group g's kept K (|x| > threshold), in order, at list[128 g ..]; their count and the sum of
    their x (float32)."""
    g = tl.program_id(0)
    k = tl.arange(0, 128)
    x = tl.load(x_ptr + g * 128 + k).to(tl.float32)
    keep = tl.abs(x) > threshold
    tl.store(list_ptr + g * 128 + tl.cumsum(keep.to(tl.int32), 0) - 1, k, mask=keep)
    tl.store(count_ptr + g, tl.sum(keep.to(tl.int32), 0))
    tl.store(sum_ptr + g, tl.sum(tl.where(keep, x, 0.0), 0))


def list_kept(x: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """x [1, K] -> (kept K of each group int32 [K / 128, 128], past each count unwritten; counts int32
    [K / 128]; sums of the kept x float32 [K / 128]): one small launch (the Triton interpreter on a CPU)."""
    groups = x.shape[1] // GROUP
    lists = torch.empty(groups, GROUP, dtype=torch.int32, device=x.device)
    counts = torch.empty(groups, dtype=torch.int32, device=x.device)
    sums = torch.empty(groups, dtype=torch.float32, device=x.device)
    _list_kernel[(groups,)](x, float(threshold), lists, counts, sums)
    return lists, counts, sums


@functools.cache
def _kernel():
    """The Gluon kernel, built on first use (Gluon needs a CUDA build of Triton; not the interpreter)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    @gluon.jit
    def _asm1(a, template: gl.constexpr):
        return gl.inline_asm_elementwise(template, "=r,r", [a], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _asm2(a, b, template: gl.constexpr):
        return gl.inline_asm_elementwise(template, "=r,r,r", [a, b], dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _a_pairs(lo, hi, sel):
        """PRMT puts the selected byte of word lo (a kept row k) in byte 0 and of hi (row k') in byte 2;
        nibble 0 then gives row g's pair (k, k') and nibble 4 row g + 8's, each as exact bf16 q - 8."""
        return gl.inline_asm_elementwise(
            "{ .reg .b32 t, u, c; prmt.b32 t, $4, $5, $6; mov.b32 c, 0x43084308; "
            "lop3.b32 u, t, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 u, u, c; mov.b32 {$0, $1}, u; "
            "shr.b32 t, t, 4; lop3.b32 u, t, 0x000F000F, 0x43004300, 0xEA; sub.rn.bf16x2 u, u, c; "
            "mov.b32 {$2, $3}, u; }",
            "=h,=h,=h,=h,r,r,r", [lo, hi, sel], dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
            is_pure=True, pack=1)

    @gluon.jit
    def _per_tile(words, KW: gl.constexpr, R: gl.constexpr, WS: gl.constexpr):
        """[KW, R / 4 words, 8 g, 2 kh, 4 j] -> [KW, R tiles, 8 g, 8 pairs] in WS: each word once for each
        of its four tiles (the PRMT selector picks the tile's byte)."""
        w = gl.reshape(words, [KW, R // 4, 8, 8])  # pair = 4 kh + j
        w = gl.join(gl.join(w, w), gl.join(w, w))  # [KW, R / 4, 8, 8, 2, 2]: four copies
        w = gl.reshape(gl.permute(w, [0, 1, 4, 5, 2, 3]), [KW, R, 8, 8])
        return gl.convert_layout(w, WS)

    @gluon.jit
    def _list_group(x_ptr, grp, threshold, entry, r_id, ix_kw):
        """Each K warp's group (grp [KW]) listed in the kernel: (kept count a warp in ix_kw's layout, the
        k-steps the program runs (the most any warp needs), the sum of the kept x [KW], and the list
        [KW, 4, 32]: entry 32 r + l in register r of lane l, past the count junk)."""
        xv = gl.load(x_ptr + grp[:, None, None] * 128 + entry)
        keep = gl.abs(xv.to(gl.float32)) > threshold
        x_sum = gl.sum(gl.sum(gl.where(keep, xv.to(gl.float32), 0.0), axis=2), axis=1)  # [KW]
        mask = _asm1(keep.to(gl.int32), "{ .reg .pred p; setp.ne.s32 p, $1, 0; vote.sync.ballot.b32 $0, p, -1; }")
        count = _asm1(mask, "popc.b32 $0, $1;")
        m0 = gl.sum(gl.where(r_id == 0, mask, 0), axis=1)[:, None, :]  # [KW, 1, 32], every lane alike
        m1 = gl.sum(gl.where(r_id == 1, mask, 0), axis=1)[:, None, :]
        m2 = gl.sum(gl.where(r_id == 2, mask, 0), axis=1)[:, None, :]
        m3 = gl.sum(gl.where(r_id == 3, mask, 0), axis=1)[:, None, :]
        p1 = gl.sum(gl.where(r_id == 0, count, 0), axis=1)[:, None, :]  # kept rows before word 1
        p2 = p1 + gl.sum(gl.where(r_id == 1, count, 0), axis=1)[:, None, :]
        p3 = p2 + gl.sum(gl.where(r_id == 2, count, 0), axis=1)[:, None, :]
        total = gl.max(gl.sum(count, axis=1), axis=1)  # [KW]
        word = (entry >= p1).to(gl.int32) + (entry >= p2).to(gl.int32) + (entry >= p3).to(gl.int32)
        m_w = gl.where(word == 0, m0, gl.where(word == 1, m1, gl.where(word == 2, m2, m3)))
        p_w = gl.where(word == 0, 0, gl.where(word == 1, p1, gl.where(word == 2, p2, p3)))
        kept = word * 32 + _asm2(m_w, entry - p_w + 1, "fns.b32 $0, $1, 0, $2;")
        steps = (gl.max(total, axis=0) + 15) // 16  # across the warps: one barrier
        return gl.convert_layout(total, ix_kw.type.layout), steps, x_sum, kept

    @gluon.jit
    def kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, list_ptr, count_ptr, sum_ptr, threshold, K, N,
               KW: gl.constexpr, R: gl.constexpr, LISTED: gl.constexpr, XB: gl.constexpr, LD: gl.constexpr,
               WS: gl.constexpr, KWL: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr, B: gl.constexpr):
        """out[n] for the 16R outputs of this program: each K warp a run of groups, per group the kept
        rows 16 at a time (listed here, or read from list_kept's LISTED lists), the K warps' sums
        meeting once at the end."""
        pid = gl.program_id(0)
        NG = K // 128
        NB = N // (16 * R)
        g_per = NG // KW
        WPR: gl.constexpr = R // 4  # words a kept row and lane
        L2: gl.constexpr = gl.SliceLayout(2, MMA)
        IDX: gl.constexpr = gl.SliceLayout(3, LD)  # [KW, 32 lanes, 4 (k-steps' rows 0, 1, 8, 9 of a lane)]
        # listing in the kernel: [KW, 4, 32], element (r, l) is K 32 r + l, r a register, l a lane (ballot words)
        xb_kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, XB)))
        xb_r = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XB)))
        xb_l = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, XB)))
        entry = xb_r[None, :, None] * 32 + xb_l[None, None, :]  # [1, 4, 32]: K in the group / list entry
        r_id = xb_r[None, :, None] + 0 * xb_l[None, None, :]
        # a lane's four rows of a k-step: lane 4 g + j holds k-step rows 2 j + {0, 1, 8, 9}
        ix_kw = gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, IDX)))
        ix_lane = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, IDX)))
        ix_d = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, IDX)))
        step_row = 2 * (ix_lane % 4)[None, :, None] + ((ix_d % 2) + 8 * (ix_d // 2))[None, None, :]  # [1, 32, 4]
        ld_word = gl.arange(0, WPR, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LD))))
        # tile t's byte of a word: PRMT selector (byte t % 4 of the first operand to byte 0, of the second to byte 2)
        ws_t = gl.arange(0, R, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, WS))))
        sel = ((ws_t % 4) | ((4 + ws_t % 4) << 8))[None, :, None, None]  # [1, R, 1, 1]
        rows = pid * 16 * R + gl.arange(0, 16 * R, layout=gl.SliceLayout(0, L2))
        kw_rows = gl.arange(0, KW, layout=gl.SliceLayout(1, L2))
        acc = gl.zeros([KW, 16 * R, 8], gl.float32, MMA)
        kw_all = gl.arange(0, KW, layout=KWL)  # every K warp's index in every thread
        for i in range(g_per):
            grp = xb_kw * g_per + i  # [KW]
            grp_ix = gl.convert_layout(grp, ix_kw.type.layout)
            grp_rows = gl.convert_layout(grp, kw_rows.type.layout)
            if LISTED:  # the counts of all K warps' groups in every thread: the most steps without a barrier
                n_ix = gl.load(count_ptr + grp_ix)
                steps = (gl.max(gl.load(count_ptr + kw_all * g_per + i), axis=0) + 15) // 16
                x_sum = gl.load(sum_ptr + grp_rows)
            else:
                n_ix, steps, x_sum, kept = _list_group(x_ptr, grp, threshold, entry, r_id, ix_kw)
            part = gl.zeros([KW, 16 * R, 8], gl.float32, MMA)
            for s in range(steps):
                ok = (s * 16 + step_row) < n_ix[:, None, None]
                if LISTED:
                    k_row = gl.load(list_ptr + grp_ix[:, None, None] * 128 + s * 16 + step_row, mask=ok, other=0)
                else:
                    # entries 16 s .. 16 s + 15 sit in register s // 2 of lanes 16 (s % 2) ..
                    here = gl.sum(gl.where(r_id == s // 2, kept, 0), axis=1)  # [KW, 32]
                    here = gl.convert_layout(here, gl.SliceLayout(2, IDX))
                    here_b, src_b = gl.broadcast(here[:, :, None], (s % 2) * 16 + step_row)
                    k_row = _asm2(here_b, src_b, "shfl.sync.idx.b32 $0, $1, $2, 0x1f, -1;")  # [KW, 32, 4]
                k_abs = grp_ix[:, None, None] * 128 + gl.where(ok, k_row, 0)
                ptrs = (w_ptr + ((k_abs * NB + pid) * 8 + (ix_lane // 4)[None, :, None]) * WPR)[:, :, :, None] \
                    + ld_word[None, None, None, :]
                words = gl.load(ptrs, mask=ok[:, :, :, None], other=0)  # [KW, 32, 4, WPR]
                xd = gl.load(x_ptr + k_abs, mask=ok, other=0.0)  # [KW, 32, 4] bf16
                # A: words as [KW, R, 8 g, 8 pairs] (pair j + 4 kh: rows 2 j, 2 j + 1 of half kh)
                w6 = gl.reshape(words, [KW, 8, 4, 2, 2, WPR])  # g, j, kh, parity, word
                w6 = gl.permute(w6, [0, 5, 1, 3, 2, 4])  # word, g, kh, j, parity
                lo, hi = gl.split(w6)  # rows k and k' of each pair: [KW, WPR, 8, 2, 4]
                lo = _per_tile(lo, KW, R, WS)
                hi = _per_tile(hi, KW, R, WS)
                e_lo, o_lo, e_hi, o_hi = _a_pairs(lo, hi, gl.broadcast(sel, lo)[0])  # (row g | g + 8) x (k | k')
                a = gl.join(gl.join(e_lo, e_hi), gl.join(o_lo, o_hi))  # [KW, R, 8 g, 8 pairs, 2 half, 2 parity]
                a = gl.reshape(gl.permute(a, [0, 1, 4, 2, 3, 5]), [KW, 16 * R, 16])
                a = gl.convert_layout(a, A, assert_trivial=True)
                # B: x at the same rows, k = 8 kh + 2 j + parity, every column alike
                b = gl.reshape(xd, [KW, 8, 4, 2, 2])  # g (column), j, kh, parity
                b = gl.reshape(gl.permute(b, [0, 3, 2, 4, 1]), [KW, 16, 8])
                b = gl.convert_layout(b, B, assert_trivial=True)
                part = mma_v2(a, b, part)
            s_g = gl.load(s_ptr + grp_rows[:, None] * N + rows[None, :])  # [KW, 16 R]
            z_g = gl.load(z_ptr + grp_rows[:, None] * N + rows[None, :])
            x_sum = gl.convert_layout(x_sum, kw_rows.type.layout)
            acc += part * s_g[:, :, None] + (z_g * x_sum[:, None])[:, :, None]
        cols = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
        out = gl.sum(gl.sum(gl.where(cols[None, None, :] == 0, acc, 0.0), axis=2), axis=0)
        gl.store(out_ptr + rows, out.to(gl.bfloat16))

    return kernel, gl


@functools.cache
def layouts(k_warps: int, tiles: int) -> dict:
    """The kernel's layout arguments."""
    _, gl = _kernel()
    bits = lambda v: v.bit_length() - 1  # noqa: E731 (log2 of a power of two)
    kw, r = k_warps, tiles
    warps3 = [[1 << i, 0, 0] for i in range(bits(kw))]
    xb = gl.DistributedLinearLayout(reg_bases=[[0, 1, 0], [0, 2, 0]],
                                    lane_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 0, 16]],
                                    warp_bases=warps3, block_bases=[], shape=[kw, 4, 32])
    # loads [KW, 32 lanes, 4 rows, R / 4 words]: the words of a row in consecutive registers (one load)
    ld = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1 << i] for i in range(bits(r // 4))]
                                    + [[0, 0, 1, 0], [0, 0, 2, 0]],
                                    lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0], [0, 8, 0, 0], [0, 16, 0, 0]],
                                    warp_bases=[[1 << i, 0, 0, 0] for i in range(bits(kw))], block_bases=[],
                                    shape=[kw, 32, 4, r // 4])
    # A's words [KW, R tiles, 8 g, 8 pairs]: registers pair + 4 (K + 8), then the tiles; lanes pair + 1,
    # pair + 2 (K + 2, K + 4), g (rows + 1, + 2, + 4); joining the row half and the K parity in front
    # gives mma's A fragment (registers K + 1, row + 8, K + 8, tiles)
    ws = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 4]] + [[0, 1 << i, 0, 0] for i in range(bits(r))],
                                    lane_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]],
                                    warp_bases=[[1 << i, 0, 0, 0] for i in range(bits(kw))], block_bases=[],
                                    shape=[kw, r, 8, 8])
    # [KW] whole in every thread (the listed counts' maximum without shared memory)
    kwl = gl.DistributedLinearLayout(reg_bases=[[1 << i] for i in range(bits(kw))], lane_bases=[[0]] * 5,
                                     warp_bases=[[0]] * bits(kw), block_bases=[], shape=[kw])
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[kw, 1, 1], instr_shape=[1, 16, 8])
    return dict(XB=xb, LD=ld, WS=ws, KWL=kwl, MMA=mma, A=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
                B=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2))


def sparse_mma(x: Tensor, threshold: float, words: Tensor, scales: Tensor, zeros: Tensor,
               config: SparseConfig) -> Tensor:
    """x [1, K] bf16, its entries with |x| <= threshold dropped, @ the packed matrix (pack_rows at
    config.tiles; scales / zeros [K / 128, N] as stored) -> [1, N] bf16. Rejects, one line, what the
    kernel does not take."""
    k, blocks = words.shape[0], words.shape[1]
    n = blocks * config.rows
    if (x.dtype != torch.bfloat16 or x.shape != (1, k) or words.shape[2:] != (8, config.tiles // 4)
            or scales.shape != (k // GROUP, n) or zeros.shape != scales.shape or not fits(k, n, config)):
        raise ValueError(f"sparse_mma needs bf16 x [1, {k}], words packed for R={config.tiles}, scales / zeros "
                         f"[{k // GROUP}, {n}] and {k // GROUP} groups a multiple of {config.k_warps} K warps; got "
                         f"x {x.dtype} {tuple(x.shape)}, words {tuple(words.shape)}, scales {tuple(scales.shape)}")
    kernel, _ = _kernel()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    lists = list_kept(x, threshold) if config.listed else (words, words, scales)  # unread stand-ins
    kernel[(blocks,)](x, words, scales, zeros, out, *lists, float(threshold), k, n, KW=config.k_warps,
                      R=config.tiles, LISTED=config.listed, num_warps=config.k_warps,
                      **layouts(config.k_warps, config.tiles))
    return out


def selftest() -> None:
    """Small shapes against float64 on the GPU at 0 / 50 / 65% / all dropped, every config that fits."""
    for k, n in ((256, 256), (2048, 512), (4096, 1024)):
        w, scales, zeros, _ = make_weight("int4-g128", k, n, "cuda", seed=k + n)
        x = make_x(1, k, torch.bfloat16, "cuda", seed=n)
        for sparsity in (0.0, 0.5, 0.65, 1.0):
            threshold = float(threshold_for(x, min(sparsity, 0.999), 1)[0]) if sparsity < 1 else float("inf")
            want = reference(x, threshold, w, scales, zeros)
            for config in CONFIGS:
                if fits(k, n, config):
                    got = sparse_mma(x, threshold, pack_rows(w, config.tiles), scales, zeros, config)
                    err = max_error(got, want)
                    if err > 1.0:
                        raise AssertionError(f"K={k} N={n} {sparsity:.0%} {tuple(config)}: error {err:.3g} "
                                             "of its bound")
    print("selftest passed")


def bench() -> list[dict]:
    """Per 8B matrix and sparsity: every config (checked first), int4_mma's dense time, the gather kernel's."""
    from teal_kernels.int4_mma import config_for, int4_mma, pack
    from teal_kernels.ops import sparse_gemv

    rows = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        first = make_weight("int4-g128", k, n, "cuda", seed=0)
        nbytes = sum(t.numel() * t.element_size() for t in first[:3])
        copies = [first] + [make_weight("int4-g128", k, n, "cuda", seed=i) for i in range(1, copies_for(nbytes))]
        x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
        dense = [pack(*c[:3]) for c in copies]
        dense_us = graph_time_us(lambda i: int4_mma(x, *dense[i]), len(dense))
        by_tiles = {r: [pack_rows(c[0], r) for c in copies] for r in {c.tiles for c in CONFIGS if fits(k, n, c)}}
        for sparsity in SPARSITIES:
            thresholds = threshold_for(x, sparsity, len(splits))
            threshold = float(thresholds[0])
            kept = int((x.abs().float() > threshold).sum())
            row = {"layer": layer, "K": k, "N": n, "sparsity": sparsity, "kept": kept,
                   "floor_us": (kept * n / 2 + 8 * (k // GROUP) * n) / (FLOOR_TB_S * 1e6), "int4_mma_us": dense_us,
                   "gather_us": graph_time_us(lambda i: sparse_gemv(x, copies[i][0], thresholds, splits, copies[i][1],
                                                                    copies[i][2], GROUP), len(copies)),
                   "config_us": {}}
            want = reference(x, threshold, *copies[0][:3])
            for config in CONFIGS:
                if not fits(k, n, config):
                    continue
                packed = by_tiles[config.tiles]
                err = max_error(sparse_mma(x, threshold, packed[0], copies[0][1], copies[0][2], config), want)
                if err > 1.0:
                    raise AssertionError(f"{layer} {sparsity:.0%} {tuple(config)}: error {err:.3g} of its bound")
                row["config_us"][str(tuple(config))] = graph_time_us(
                    lambda i, c=config: sparse_mma(x, threshold, packed[i], copies[i][1], copies[i][2], c), len(copies))
            best = min(row["config_us"].items(), key=lambda kv: kv[1])
            print(f"{layer} {sparsity:.0%}: best {best[1]:.1f} µs {best[0]}, int4_mma {dense_us:.1f}, gather "
                  f"{row['gather_us']:.1f}, floor {row['floor_us']:.1f}", flush=True)
            rows.append(row)
        del copies, dense, by_tiles
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selftest", action="store_true", help="small shapes against float64 (needs a GPU)")
    p.add_argument("--out", default="benchmarks/results/int4_sparse_lab/lab",
                   help="OUT.json and OUT.md (default benchmarks/results/int4_sparse_lab/lab)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: int4_sparse_mma_lab needs a CUDA GPU (Gluon kernels do not run in the interpreter)",
              file=sys.stderr)
        return 1
    if args.selftest:
        selftest()
        return 0
    rows = bench()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    lines = [f"# int4-g128 TEAL-sparse on tensor cores (lab) against int4_mma and gather ({meta['gpu']}, "
             f"{meta['date']})", "", f"`{meta['command']}`; µs a call, CUDA graphs over rotating weights; "
             "configs (K warps, 16-row tiles a warp, listed once a call)", "",
             "| matrix | sparsity | kept K | floor | int4_mma (dense) | gather | best lab | its config |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = min(r["config_us"].items(), key=lambda kv: kv[1])
        lines.append(f"| {r['layer']} | {r['sparsity']:.2f} | {r['kept']} | {r['floor_us']:.1f} | "
                     f"{r['int4_mma_us']:.1f} | {r['gather_us']:.1f} | {best[1]:.1f} | {best[0]} |")
    write_report(args.out, {"meta": meta, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
