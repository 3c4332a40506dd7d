"""Tests of teal_kernels/ (the Triton sparse GEMV, the reference, the op) against an independent
float64 reference.

Without CUDA the Triton kernel runs under TRITON_INTERPRET=1 (set in conftest.py), and this
module routes the op's CPU implementation through it too (TEAL_CPU_KERNELS=interpreter), so CPU
shapes are tiny; the GPU-only tests at the bottom use real Llama shapes.
"""

import dataclasses

import pytest
import torch
import triton
from fixtures import COMPILE_BACKENDS, DEVICE, HAS_CUDA, needs_cuda

import teal_kernels.triton_gemv as sg
from teal_kernels import dequantize_weight, sparse_gemv, sparse_gemv_reference
from teal_kernels.dequantize import dequantize_triton
from teal_kernels.ops import CPU_KERNELS_ENV, sparse_gemv_stats
from teal_kernels.reference import (FMT_FLOAT, FMT_INT4, FMT_INT8, pack_scales_zeros, unpack_scales_zeros,
                                    weight_format_name)
from teal_kernels.triton_gemv import KernelConfig, get_config, sparse_gemv_triton

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


# --- independent float64 reference -------------------------------------------------


def real_weight64(w, scales, zeros, group_size):
    """W [K, N] in float64, straight from the packing definition."""
    if w.dtype == torch.uint8:
        k, half = w.shape
        q = torch.empty(k, 2 * half, dtype=torch.float64, device=w.device)
        q[:, 0::2] = (w % 16).double()
        q[:, 1::2] = (w // 16).double()
        group = torch.arange(k, device=w.device) // group_size
        return (q - 8) * scales.double()[group] + zeros.double()[group]
    if w.dtype == torch.int8:
        return w.double() * scales.double()[None, :]
    return w.double()


def ref64(x, w, thresholds, split_sizes, scales=None, zeros=None, group_size=0):
    weight = real_weight64(w, scales, zeros, group_size)
    col_threshold = torch.cat([thresholds[j].double().expand(size) for j, size in enumerate(split_sizes)])
    xd = x.double()
    keep = xd.abs()[:, :, None] > col_threshold[None, None, :]  # [M, K, N]
    return (xd[:, :, None] * keep * weight[None]).sum(dim=1)


def assert_close_to_ref(out, x, w, thresholds, split_sizes, scales=None, zeros=None, group_size=0):
    """Within one output rounding (the interpreter truncates) plus fp32 accumulation error."""
    ref = ref64(x, w, thresholds, split_sizes, scales, zeros, group_size)
    scale = x.double().abs() @ real_weight64(w, scales, zeros, group_size).abs()
    eps = 2.0**-7 if out.dtype == torch.bfloat16 else 2.0**-10
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    tol = 1.01 * eps * ref.abs() + 1e-5 * scale + 1e-30
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


# --- problem construction ----------------------------------------------------------


def make_problem(fmt, dtype, m, k, split_sizes, group_size=0, quantiles=None, seed=0):
    """Random inputs; batch rows get different scales so their masks differ."""
    g = torch.Generator().manual_seed(seed)
    n = sum(split_sizes)
    x = torch.randn(m, k, generator=g) * torch.logspace(-0.3, 0.3, m)[:, None]
    scales = zeros = None
    if fmt == "fp":
        w = torch.randn(k, n, generator=g).to(dtype)
    elif fmt == "int8":
        w = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
        scales = torch.rand(n, generator=g) * 0.05
    else:
        w = torch.randint(0, 256, (k, n // 2), generator=g, dtype=torch.uint8)
        scales = torch.rand(k // group_size, n, generator=g) * 0.1
        zeros = torch.randn(k // group_size, n, generator=g) * 0.1
    x = x.to(dtype)
    qs = quantiles if quantiles is not None else [0.3, 0.5, 0.7, 0.4][: len(split_sizes)]
    thresholds = torch.quantile(x.abs().float().flatten(), torch.tensor(qs, dtype=torch.float32))
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(thresholds.float()), list(split_sizes), to(scales), to(zeros), group_size


# (format, dtype, M, K, split sizes, group size, config).  Shapes are not multiples of
# the blocks; segment boundaries fall inside column blocks; configs cover several
# K blocks, several sub-chunks per block and int4 groups smaller than a block.
CASES = [
    ("fp", torch.bfloat16, 1, 40, [24], 0, KernelConfig(block_n=16, block_k=16, sub_k=4)),
    ("fp", torch.bfloat16, 3, 40, [8, 16], 0, KernelConfig(block_n=16, block_k=32, sub_k=8)),
    ("fp", torch.float16, 1, 200, [40, 32], 0, KernelConfig(block_n=32, block_k=64, sub_k=16)),
    ("fp", torch.float16, 3, 128, [50], 0, KernelConfig(block_n=32, block_k=64, sub_k=8)),
    ("fp", torch.bfloat16, 2, 96, [16, 16, 16], 0, KernelConfig(block_n=16, block_k=32, sub_k=8)),
    ("int8", torch.bfloat16, 1, 200, [72], 0, KernelConfig(block_n=32, block_k=64, sub_k=8)),
    ("int8", torch.float16, 3, 64, [24, 16], 0, KernelConfig(block_n=16, block_k=32, sub_k=16)),
    ("int4", torch.bfloat16, 1, 128, [16, 32], 32, KernelConfig(block_n=16, block_k=32, sub_k=8)),
    ("int4", torch.float16, 3, 192, [32, 16, 16], 64, KernelConfig(block_n=32, block_k=128, sub_k=16)),
    ("int4", torch.bfloat16, 2, 96, [10, 10], 32, KernelConfig(block_n=16, block_k=64, sub_k=8)),
    # Wide int4 tiles (the H200 configs): one or several groups per block, columns past N masked.
    ("int4", torch.bfloat16, 1, 384, [1024, 512], 128, KernelConfig(block_n=1024, block_k=128, sub_k=8)),
    ("int4", torch.float16, 3, 256, [512, 1024], 64, KernelConfig(block_n=1024, block_k=256, sub_k=4, num_warps=8)),
]


def case_id(case):
    fmt, dtype, m, k, splits, group, cfg = case
    return f"{fmt}{group or ''}-{str(dtype)[6:]}-M{m}-K{k}-N{'+'.join(map(str, splits))}-bk{cfg.block_k}"


# The kernel designs and row-selection modes every correctness test runs: "rows" with compaction
# (plain; with the next chunk's weight rows prefetched; prefetched with each chunk's lanes summed
# as it goes; through Triton's software pipeline, 3 stages) or chunk skipping, "dot" (masked tiles
# through tl.dot).
VARIANTS = ["compact", "prefetch", "lanesum", "pipelined", "skip", "dot"]
ROWS_STAGES = {"compact": 1, "prefetch": 2, "lanesum": 2, "pipelined": 3, "skip": 1}


def variant(cfg: KernelConfig, name: str) -> KernelConfig:
    """`cfg` as the named variant; "dot" raises sub_k to a tl.dot tile (shapes it cannot take fall
    back to "rows")."""
    if name in ROWS_STAGES:
        return KernelConfig(**{**cfg.to_dict(), "design": "rows", "compact": name != "skip",
                               "num_stages": ROWS_STAGES[name], "lane_sum": name == "lanesum"})
    sub_k = max(16, cfg.sub_k)
    return KernelConfig(**{**cfg.to_dict(), "design": "dot", "sub_k": sub_k, "block_k": max(cfg.block_k, sub_k),
                           "num_stages": 2})


# Shapes the dot design takes (segments and K multiples of 16, int4 segments of 128): several K
# blocks and tiles per block, int4 groups holding one or several tiles, several groups per block.
DOT_CASES = [
    ("fp", torch.bfloat16, 1, 128, [64, 32, 32], 0, KernelConfig(block_n=32, block_k=64, sub_k=16)),
    ("fp", torch.float16, 3, 96, [48, 16], 0, KernelConfig(block_n=16, block_k=32, sub_k=16)),
    ("fp", torch.bfloat16, 8, 64, [32], 0, KernelConfig(block_n=32, block_k=64, sub_k=32)),
    ("int8", torch.bfloat16, 1, 128, [32, 32], 0, KernelConfig(block_n=32, block_k=64, sub_k=16)),
    ("int8", torch.float16, 5, 64, [48], 0, KernelConfig(block_n=16, block_k=64, sub_k=32)),
    ("int4", torch.bfloat16, 1, 128, [128, 256], 32, KernelConfig(block_n=128, block_k=128, sub_k=32)),
    ("int4", torch.float16, 3, 192, [256, 128], 64, KernelConfig(block_n=256, block_k=64, sub_k=32)),
    ("int4", torch.bfloat16, 2, 256, [128], 128, KernelConfig(block_n=256, block_k=256, sub_k=32)),
    # past the decode batches (short quantized prefills): tl.dot tiles of 16, 32 and 64 rows
    ("int4", torch.bfloat16, 13, 128, [128, 128], 32, KernelConfig(block_n=128, block_k=64, sub_k=32, num_warps=8)),
    ("int8", torch.float16, 40, 64, [32, 16], 0, KernelConfig(block_n=16, block_k=32, sub_k=16)),
    ("fp", torch.bfloat16, 64, 64, [32], 0, KernelConfig(block_n=32, block_k=64, sub_k=32)),
    ("int4", torch.float16, 33, 128, [128], 64, KernelConfig(block_n=128, block_k=64, sub_k=32, num_warps=8)),
]


@pytest.mark.parametrize("compact,stages,lane_sum", [(True, 1, False), (True, 2, False), (True, 2, True),
                                                     (True, 3, False), (True, 4, True),
                                                     (False, 1, False), (False, 1, True)],
                         ids=["compact", "prefetch", "lanesum", "pipelined", "pipelined-lanesum", "skip",
                              "skip-lanesum"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_float64_reference(case, compact, stages, lane_sum):
    fmt, dtype, m, k, splits, group, cfg = case
    args = make_problem(fmt, dtype, m, k, splits, group)
    out = sparse_gemv_triton(*args, config=KernelConfig(**{**cfg.to_dict(), "compact": compact, "num_stages": stages,
                                                           "lane_sum": lane_sum}))
    assert_close_to_ref(out, *args)


# int4 at one row through the software pipeline (num_stages >= 3) runs one pipelined loop a group:
# several groups a block, several chunks a group, a block past K, any number of kept rows a group
INT4_PIPELINED_CASES = [
    (torch.bfloat16, 256, [64, 32], 32, KernelConfig(block_n=32, block_k=128, sub_k=8)),
    (torch.float16, 384, [128], 64, KernelConfig(block_n=64, block_k=256, sub_k=16)),
    (torch.bfloat16, 512, [32, 96], 128, KernelConfig(block_n=32, block_k=512, sub_k=32, num_warps=2)),
]


@pytest.mark.parametrize("quantiles", [[0.5, 0.5], [0.0, 0.9], [0.97, 0.2]], ids=["half", "all-most", "few-some"])
@pytest.mark.parametrize("case", INT4_PIPELINED_CASES, ids=lambda c: f"K{c[1]}-g{c[3]}-bk{c[4].block_k}")
def test_int4_pipelined_rows_match_float64(case, quantiles):
    """int4's software-pipelined rows loop at one row (a loop a group, each group's scale and zero
    applied at its end) against float64, with several groups a block."""
    dtype, k, splits, group, cfg = case
    args = make_problem("int4", dtype, 1, k, splits, group, quantiles=quantiles[: len(splits)])
    out = sparse_gemv_triton(*args, config=KernelConfig(**{**cfg.to_dict(), "num_stages": 3}))
    assert_close_to_ref(out, *args)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[6], CASES[8]], ids=case_id)
def test_lane_sum_matches_float64_reference_for_any_lane_groups(case, groups, monkeypatch):
    """lane_sum keeps LANE_GROUPS accumulator rows per batch row (the launcher picks them from the
    tile's layout, _lane_groups): every power of two up to sub_k gives the same sums in another
    order, whatever the layout, so each one is checked, for one and several batch rows."""
    fmt, dtype, m, k, splits, group, cfg = case
    monkeypatch.setattr(sg, "_lane_groups", lambda *_: groups)
    args = make_problem(fmt, dtype, m, k, splits, group)
    for stages in (1, 2):
        out = sparse_gemv_triton(*args, config=KernelConfig(**{**cfg.to_dict(), "num_stages": stages,
                                                               "lane_sum": True}))
        assert_close_to_ref(out, *args)


@pytest.mark.parametrize("case", DOT_CASES, ids=case_id)
def test_dot_design_matches_float64_reference(case):
    fmt, dtype, m, k, splits, group, cfg = case
    args = make_problem(fmt, dtype, m, k, splits, group)
    for stages in (1, 3):
        out = sparse_gemv_triton(*args, config=KernelConfig(**{**cfg.to_dict(), "design": "dot", "num_stages": stages}))
        assert_close_to_ref(out, *args)
    assert not sg.arrival_counters(torch.device(DEVICE)).any()  # every call leaves them at zero


@pytest.mark.parametrize("design", ["rows", "dot"])
def test_register_cap_reaches_the_launch(design, monkeypatch):
    """KernelConfig.max_registers is Triton's maxnreg launch option (0: none); out of range: an error."""
    kernel = sg._dot_gemv_kernel if design == "dot" else sg._sparse_gemv_kernel
    seen = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs.get("maxnreg"))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(sg, "_dot_gemv_kernel" if design == "dot" else "_sparse_gemv_kernel", Recorder())
    args = make_problem("int4", torch.bfloat16, 1, 128, [128], 32)
    for cap in (96, 0):
        cfg = KernelConfig(block_n=128, block_k=64, sub_k=32, design=design, max_registers=cap)
        assert_close_to_ref(sparse_gemv_triton(*args, config=cfg), *args)
    assert seen == [96, None]
    with pytest.raises(ValueError, match="max_registers"):
        sparse_gemv_triton(*args, config=KernelConfig(block_n=128, block_k=64, sub_k=32, max_registers=300))


def test_pipelined_rows_kernel_launches_without_pdl(monkeypatch):
    """launch_options holds the PDL decision: on a (pretend) Hopper GPU PDL is on, except for the
    software-pipelined rows loop unless TEAL_PDL_PIPELINED=1 (it lost 10% end to end with PDL); TEAL_PDL=0
    turns it off everywhere; and the launcher asks with pipelined=True exactly for num_stages >= 3."""
    monkeypatch.setattr(sg, "INTERPRETED", False)
    monkeypatch.setattr(sg, "_compute_capability", lambda device: (9, 0))
    gpu = torch.device("cuda", 0)
    monkeypatch.delenv(sg.PDL_ENV, raising=False)
    monkeypatch.delenv(sg.PDL_PIPELINED_ENV, raising=False)
    assert sg.launch_options(gpu) == {"launch_pdl": True} and sg.launch_options(gpu, pipelined=True) == {}
    monkeypatch.setenv(sg.PDL_PIPELINED_ENV, "1")
    assert sg.launch_options(gpu, pipelined=True) == {"launch_pdl": True}
    monkeypatch.setenv(sg.PDL_ENV, "0")
    assert sg.launch_options(gpu) == {} and sg.launch_options(gpu, pipelined=True) == {}
    monkeypatch.setenv(sg.PDL_PIPELINED_ENV, "yes")
    with pytest.raises(ValueError, match=sg.PDL_PIPELINED_ENV):
        sg.launch_options(gpu)
    monkeypatch.undo()

    asked = []
    launch_options = sg.launch_options
    monkeypatch.setattr(sg, "launch_options", lambda device, pipelined=False: asked.append(pipelined)
                        or launch_options(device, pipelined))
    args = make_problem("fp", torch.bfloat16, 1, 256, [128])
    for stages in (4, 2, 1):
        cfg = KernelConfig(block_n=128, block_k=128, sub_k=16, num_stages=stages)
        assert_close_to_ref(sparse_gemv_triton(*args, config=cfg), *args)
    assert asked == [True, False, False]


def test_host_integer_helpers_match_triton():
    """The launchers' cdiv / next_power_of_2 (plain ints, cheaper than Triton's wrappers) give Triton's values."""
    for a in range(1, 300):
        assert sg.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 3, 16, 128):
            assert sg.cdiv(a, b) == triton.cdiv(a, b)
    assert sg.cdiv(28672, 256) == 112 and sg.next_power_of_2(4097) == 8192


def test_dot_design_falls_back_to_rows_where_it_cannot_tile():
    """Segments that are not multiples of 16 (or K not one) cannot be tiled by tl.dot: the
    config becomes a "rows" one, and the result is still right."""
    dot = KernelConfig(block_n=32, block_k=64, sub_k=16, design="dot")
    assert sg._fit_config(dot, FMT_FLOAT, 0, 1, 64, [24, 40]).design == "rows"
    assert sg._fit_config(dot, FMT_FLOAT, 0, 1, 40, [32]).design == "rows"
    fitted = sg._fit_config(dot, FMT_FLOAT, 0, 1, 96, [16, 48])
    assert (fitted.design, fitted.block_n, fitted.block_k) == ("dot", 16, 48)  # divides 16 and 48, and 96
    # the tuner stores fitted configs: one refits unchanged and runs (int4_long_k/: 3584-row blocks at K 14336)
    assert sg._fit_config(fitted, FMT_FLOAT, 0, 1, 96, [16, 48]) == fitted
    args96 = make_problem("fp", torch.bfloat16, 1, 96, [16, 48], 0)
    assert_close_to_ref(sparse_gemv_triton(*args96, config=fitted), *args96)
    with pytest.raises(ValueError, match="power of two"):
        sg._fit_config(dataclasses.replace(dot, block_k=40), FMT_FLOAT, 0, 1, 96, [16, 48])  # not whole tiles
    args = make_problem("fp", torch.bfloat16, 2, 64, [24, 40], 0)
    assert_close_to_ref(sparse_gemv_triton(*args, config=dot), *args)


@pytest.mark.parametrize("fmt,group,k", [("fp", 0, 31 * 16), ("int8", 0, 31 * 16), ("int4", 32, 31 * 32)])
def test_dot_design_cuts_the_last_k_block_where_no_divisor_fits(fmt, group, k):
    """K of 31 tiles asked in blocks of 4: no divisor keeps half a block, and cutting the last one
    at K drops one tile of 32, so the blocks stay 4 tiles and the last one reads past K only
    masked x (int4: the last group's scale); Llama-2-7B's int4 down (86 tiles of 128 rows) so keeps
    1024-row blocks. A cut that would drop more than an eighth of the tiles takes a divisor."""
    sub_k = 32 if fmt == "int4" else 16
    dot = KernelConfig(block_n=128, block_k=4 * sub_k, sub_k=sub_k, design="dot")
    kind = {"fp": FMT_FLOAT, "int8": FMT_INT8, "int4": FMT_INT4}[fmt]
    assert sg._fit_config(dot, kind, group, 1, k, [128]).block_k == 4 * sub_k
    assert sg._fit_config(dot, kind, group, 1, 9 * sub_k, [128]).block_k == 3 * sub_k  # a cut would drop 7 of 16
    llama2_down = sg._fit_config(sg._heuristic_config("int4-g128", 1, 11008, 4096), FMT_INT4, 128, 1, 11008, [4096])
    assert llama2_down.block_k == 1024
    for m in (1, 3):
        args = make_problem(fmt, torch.bfloat16, m, k, [128], group)
        for stages in (1, 3):
            out = sparse_gemv_triton(*args, config=KernelConfig(**{**dot.to_dict(), "num_stages": stages}))
            assert_close_to_ref(out, *args)
    # the fused prologues read x past K masked too: the cut blocks against blocks of one tile (K even)
    x, w, thresholds, splits, scales, zeros, g = make_problem(fmt, torch.bfloat16, 2, k, [128], group)
    gate_up = torch.cat([x, x.flip(1)], dim=1).to(DEVICE)
    one_tile = KernelConfig(**{**dot.to_dict(), "block_k": sub_k})
    for fusion in (dict(gated=True), dict(norm_weight=(torch.rand(k) + 0.5).to(torch.bfloat16).to(DEVICE), eps=1e-5)):
        inp = gate_up if "gated" in fusion else x
        cut = sparse_gemv_triton(inp, w, thresholds, splits, scales, zeros, g, config=dot, **fusion).double()
        even = sparse_gemv_triton(inp, w, thresholds, splits, scales, zeros, g, config=one_tile, **fusion).double()
        assert torch.allclose(cut, even, rtol=2**-6, atol=2**-6 * even.abs().max().item())


def test_int4_dot_design_needs_planes_of_16_columns_and_word_aligned_weights():
    """int4 reads int32 words of 8 columns and runs one tl.dot per nibble plane (block_n / 8
    columns, at least 16): a segment not a multiple of 128 or weights that do not start on a
    word run the "rows" design; warps are capped at block_n / 64 (more would repeat a plane)."""
    dot = KernelConfig(block_n=512, block_k=64, sub_k=32, num_warps=8, design="dot")
    assert sg._fit_config(dot, FMT_INT4, 32, 1, 64, [64, 128]).design == "rows"
    assert sg._fit_config(dot, FMT_INT4, 32, 1, 64, [128], words_aligned=False).design == "rows"
    fitted = sg._fit_config(dot, FMT_INT4, 32, 1, 64, [256, 128])
    assert (fitted.design, fitted.block_n, fitted.num_warps) == ("dot", 128, 2)
    x, w, *rest = make_problem("int4", torch.bfloat16, 1, 64, [128], 32)
    shifted = torch.empty(w.numel() + 1, dtype=torch.uint8, device=w.device)[1:].view(w.shape)
    shifted.copy_(w)  # same values, one byte off a word boundary
    assert_close_to_ref(sparse_gemv_triton(x, shifted, *rest, config=dot), x, shifted, *rest)


# The "gather" design (one row): each K block's kept rows listed once, read sub_k a tl.dot tile
# across int4 group boundaries (row g of the tile holds group g's x; scales once a block). Blocks of
# 1-4 groups (K not a multiple of the block for g32: the last block cut at K), chunks of 16-32 rows.
GATHER_CASES = [
    ("fp", torch.bfloat16, 96, [32, 16], 0, KernelConfig(block_n=16, block_k=32, sub_k=16, design="gather")),
    ("int8", torch.float16, 160, [48], 0, KernelConfig(block_n=16, block_k=64, sub_k=32, design="gather")),
    ("int4", torch.bfloat16, 7 * 32, [128, 256], 32,
     KernelConfig(block_n=128, block_k=128, sub_k=16, num_stages=3, design="gather")),
    ("int4", torch.float16, 4 * 64, [256], 64, KernelConfig(block_n=256, block_k=128, sub_k=32, design="gather")),
    ("int4", torch.bfloat16, 128, [128], 128, KernelConfig(block_n=128, block_k=128, sub_k=16, design="gather")),
]


@pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: f"{c[0]}-g{c[4]}-K{c[2]}")
@pytest.mark.parametrize("quantiles", [[0.0], [1.0], [0.5], [0.93]], ids=["all", "none", "half", "few"])
def test_gather_design_matches_float64(case, quantiles):
    """Against float64 at every level: all rows kept, none, half, a few (a block may keep none; an
    int4 group may keep none while its neighbours do); with each fused prologue against the dot
    design's masked tiles, which compute the fused input the same way (_dot_x_tile; the interpreter
    truncates it, so an input at a threshold may fall on the other side than float64's)."""
    fmt, dtype, k, splits, group, cfg = case
    fitted = sg._fit_config(cfg, {"fp": FMT_FLOAT, "int8": FMT_INT8, "int4": FMT_INT4}[fmt], group, 1, k, splits)
    assert fitted.design == "gather"
    args = make_problem(fmt, dtype, 1, k, splits, group, quantiles=quantiles * len(splits), seed=k)
    assert_close_to_ref(sparse_gemv_triton(*args, config=cfg), *args)
    x, w, thresholds, _, scales, zeros, g = args
    gate_up = torch.cat([x, x.flip(1)], dim=1)
    norm_weight = (torch.rand(k, generator=torch.Generator().manual_seed(1)) + 0.5).to(dtype).to(DEVICE)
    masked_tiles = dataclasses.replace(cfg, design="dot", block_k=fitted.block_k)
    for fusion in (dict(gated=True), dict(norm_weight=norm_weight, eps=1e-5)):
        inp = gate_up if "gated" in fusion else x
        gathered = sparse_gemv_triton(inp, w, thresholds, splits, scales, zeros, g, config=cfg, **fusion).double()
        masked = sparse_gemv_triton(inp, w, thresholds, splits, scales, zeros, g, config=masked_tiles, **fusion)
        assert torch.allclose(gathered, masked.double(), rtol=2**-6, atol=2**-8 * max(1.0, masked.abs().max().item()))


@pytest.mark.parametrize("design", ["rows", "dot", "gather"])
def test_int4_packed_scales_match_float64(design):
    """int4 scales and zeros rounded to bf16 and packed in int32 pairs (reference.pack_scales_zeros, given
    as both; linear.INT4_BF16_SCALES_ENV) through every design, the op (the C++ kernel on the CPU) and
    the dequantize pass, against float64 over the rounded values."""
    x, w, thresholds, splits, scales, zeros, g = make_problem("int4", torch.bfloat16, 1, 4 * 64, [64, 32], 64,
                                                              quantiles=[0.5, 0.2], seed=11)
    zeros = zeros - 0.1 * scales  # zeros of both signs
    words = pack_scales_zeros(scales, zeros)
    rounded = (scales.to(torch.bfloat16).float(), zeros.to(torch.bfloat16).float())
    assert all(torch.equal(a, b) for a, b in zip(unpack_scales_zeros(words), rounded, strict=True))
    cfg = KernelConfig(block_n=32, block_k=128, sub_k=16, design=design, num_stages=3 if design == "gather" else 1)
    ref_args = (x, w, thresholds, splits, *rounded, g)
    assert_close_to_ref(sparse_gemv_triton(x, w, thresholds, splits, words, words, g, config=cfg), *ref_args)
    assert_close_to_ref(sparse_gemv(x, w, thresholds, splits, words, words, g), *ref_args)
    assert torch.equal(dequantize_weight(w, words, words, g), dequantize_weight(w, *rounded, g))
    assert torch.equal(dequantize_triton(w, words, words, g, torch.bfloat16),
                       dequantize_triton(w, *rounded, g, torch.bfloat16))


@pytest.mark.parametrize("fmt", ["fp", "int8"])
@pytest.mark.parametrize("stages", [1, 4], ids=["compact", "pipelined"])
def test_rows_long_blocks_list_their_kept_rows(fmt, stages):
    """One row through the rows design's blocks of 1024 rows, whose kept-row list is numbered by
    _exclusive_prefix (runs of 8, then the runs' totals; shorter blocks keep tl.cumsum): two whole
    blocks and a short third, against float64."""
    args = make_problem(fmt, torch.bfloat16, 1, 2600, [32, 16], 0, quantiles=[0.5, 0.8], seed=3)
    cfg = KernelConfig(block_n=16, block_k=1024, sub_k=32, design="rows", compact=True, num_stages=stages)
    assert sg._fit_config(cfg, {"fp": FMT_FLOAT, "int8": FMT_INT8}[fmt], 0, 1, 2600, [32, 16]).block_k == 1024
    assert_close_to_ref(sparse_gemv_triton(*args, config=cfg), *args)


# (format, group, K, segments, config): the gather / dot designs' epilogue writes the statistics (two
# column blocks; the dot design's block of 16 columns, one tile a block), the rows design leaves them to torch
NORM_STATS_CASES = [
    ("int4", 32, 4 * 32, [128, 128], KernelConfig(block_n=128, block_k=64, sub_k=16, design="gather")),
    ("fp", 0, 96, [32, 16], KernelConfig(block_n=16, block_k=32, sub_k=16, design="dot")),
    ("int8", 0, 64, [32, 16], KernelConfig(block_n=16, block_k=32, sub_k=16, design="rows")),
]


@pytest.mark.parametrize("case", NORM_STATS_CASES, ids=lambda c: f"{c[0]}-{c[4].design}")
@pytest.mark.parametrize("m", [1, 3])
def test_sparse_gemv_gives_the_next_norms_statistics(case, m):
    """stats: the output unchanged (gated prologue, residual epilogue), and what the next RMSNorm's consumer
    takes: out * the norm's weight rounded, and out's squares summed a 16-column tile against float64 (the
    sums of one 16-column tile straddle a block only in the dot case's 16-wide blocks: never). The op's CPU
    implementation gives the same; a wrong buffer fails in one line."""
    fmt, group, k, splits, cfg = case
    x, w, thresholds, _, scales, zeros, g = make_problem(fmt, torch.bfloat16, m, k, splits, group, seed=k + m)
    n = sum(splits)
    gen = torch.Generator().manual_seed(4)
    gate_up = torch.cat([x, x.flip(1)], dim=1)
    residual = torch.randn(m, n, generator=gen).to(torch.bfloat16).to(DEVICE)
    weight = (torch.rand(n, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    scaled = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    sumsq = torch.full((m, n // 16), float("nan"), device=DEVICE)
    call = (gate_up, w, thresholds, splits, scales, zeros, g)
    out = sparse_gemv_triton(*call, config=cfg, gated=True, residual=residual, stats=(weight, scaled, sumsq))
    assert torch.equal(out, sparse_gemv_triton(*call, config=cfg, gated=True, residual=residual))
    def assert_statistics_of(out, scaled, sumsq):
        expected = (out.float() * weight.float()).to(torch.bfloat16)
        if HAS_CUDA:
            assert torch.equal(scaled, expected)
        else:  # the interpreter truncates where the GPU rounds: one bf16 ulp
            assert torch.allclose(scaled.float(), expected.float(), rtol=2**-7, atol=0)
        exact = out.double().square().view(m, n // 16, 16).sum(dim=2)
        assert sumsq.dtype == torch.float32 and torch.allclose(sumsq.double(), exact, rtol=1e-6)

    assert_statistics_of(out, scaled, sumsq)
    op_scaled, op_sumsq = torch.empty_like(scaled), torch.empty_like(sumsq)
    op_out = sparse_gemv_stats(*call, True, residual, weight, op_scaled, op_sumsq)
    assert torch.allclose(op_out.float(), out.float(), rtol=2**-7, atol=1e-3)  # the CPU kernel's own sum order
    assert_statistics_of(op_out, op_scaled, op_sumsq)
    with pytest.raises(ValueError, match="norm statistics of an output"):
        sparse_gemv_triton(*call, config=cfg, gated=True, stats=(weight, scaled, sumsq[:, 1:]))


@pytest.mark.parametrize("design", ["rows", "dot", "gather"])
def test_partials_summed_a_few_at_a_time(design, monkeypatch):
    """The last program of a column block requests its partials RED_K at a time
    (_column_block_output): with the register budget cut to two partials a step, a K of 5 blocks is
    summed in three steps, the last one half masked, and still matches float64 (int8 with its column
    scale and the residual on top)."""
    cfg = KernelConfig(block_n=32, block_k=64, sub_k=16, design=design)
    monkeypatch.setattr(sg, "_REDUCTION_FLOATS", 2 * 32)
    assert sg._reduction_step(5, 1, 32) == 2
    x, w, thresholds, splits, scales, zeros, g = make_problem("int8", torch.float16, 1, 5 * 64, [64], 0,
                                                              quantiles=[0.5], seed=5)
    residual = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).to(torch.float16).to(DEVICE)
    out = sparse_gemv_triton(x, w, thresholds, splits, scales, zeros, g, config=cfg, residual=residual)
    product = sparse_gemv_triton(x, w, thresholds, splits, scales, zeros, g, config=cfg)
    assert_close_to_ref(product, x, w, thresholds, splits, scales, zeros, g)
    assert torch.equal(out, (product.float() + residual.float()).to(out.dtype))


def test_gather_design_fits_whole_int4_groups_and_one_row():
    """"gather" takes one row (a batch runs the dot design's masked tiles) and int4 blocks of whole
    groups, at most 16 (the tl.dot tile's rows), a power of two of them (the kernel lists a block's
    rows with one tl.arange; the last block is cut at K); a fitted config refits unchanged."""
    cfg = KernelConfig(block_n=128, block_k=512, sub_k=32, design="gather")
    fitted = sg._fit_config(cfg, FMT_INT4, 32, 1, 1024, [256])
    assert (fitted.design, fitted.block_k) == ("gather", 512)  # 16 groups a block
    assert sg._fit_config(fitted, FMT_INT4, 32, 1, 1024, [256]) == fitted
    assert sg._fit_config(cfg, FMT_INT4, 32, 2, 1024, [256]).design == "dot"  # two rows
    assert sg._fit_config(dataclasses.replace(cfg, block_k=1024), FMT_INT4, 32, 1, 2048, [256]).block_k == 512
    assert sg._fit_config(dataclasses.replace(cfg, block_k=64), FMT_INT4, 128, 1, 1024, [256]).block_k == 128
    assert sg._fit_config(cfg, FMT_INT4, 32, 1, 7 * 32, [256]).block_k == 4 * 32  # a power of two, cut at K
    assert sg._fit_config(cfg, FMT_INT8, 0, 1, 1024, [256]).block_k == 512
    args = make_problem("int4", torch.bfloat16, 2, 256, [128], 32)
    assert_close_to_ref(sparse_gemv_triton(*args, config=cfg), *args)


def random_case(seed):
    """A random small problem and config (block sizes rarely divide the shape)."""
    rng = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=rng))]  # noqa: E731
    fmt = pick(["fp", "int8", "int4"])
    group = pick([32, 64]) if fmt == "int4" else 0
    k = group * pick([1, 2, 3]) if group else pick([8, 24, 40, 72, 130, 200])
    n_segments = pick([1, 2, 3])
    splits = [(2 if fmt == "int4" else 1) * pick([3, 5, 8, 12, 17, 32]) for _ in range(n_segments)]
    cfg = KernelConfig(
        block_n=pick([16, 32]), block_k=pick([16, 32, 64]), sub_k=pick([2, 4, 8]), compact=pick([True, False]),
        num_stages=pick([1, 2]), lane_sum=pick([True, False]),
    )
    if pick([True, False]):  # the dot design (falls back to rows where the shape does not tile)
        cfg = KernelConfig(block_n=cfg.block_n, block_k=max(16, cfg.block_k), sub_k=16, design="dot")
    return fmt, pick([torch.bfloat16, torch.float16]), pick([1, 2, 3, 5, 8]), k, splits, group, cfg


@pytest.mark.parametrize("seed", range(24))
def test_random_shapes(seed):
    fmt, dtype, m, k, splits, group, cfg = random_case(seed)
    quantiles = [0.1 * (seed % 9) + 0.05 * j for j in range(len(splits))]
    args = make_problem(fmt, dtype, m, k, splits, group, quantiles=quantiles, seed=seed)
    assert_close_to_ref(sparse_gemv_triton(*args, config=cfg), *args)


@pytest.mark.parametrize("name", VARIANTS)
def test_dropped_rows_are_never_used(name):
    """Weight rows dropped by every batch row are NaN: any use would poison the output."""
    x, w, thresholds, splits, *_ = make_problem("fp", torch.float16, 2, 96, [16, 16], 0, quantiles=[0.6, 0.6])
    dropped = ~(x.abs() > thresholds[0]).any(dim=0)
    assert dropped.any()
    w_nan = w.clone()
    w_nan[dropped] = float("nan")
    out = sparse_gemv_triton(x, w_nan, thresholds, splits, config=variant(KernelConfig(16, 32, 4), name))
    assert_close_to_ref(out, x, w, thresholds, splits)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 32)])
def test_keep_all_keep_none_and_mixed_segments(fmt, group, name):
    cfg = variant(KernelConfig(block_n=16, block_k=32, sub_k=8), name)
    x, w, _, splits, scales, zeros, g = make_problem(fmt, torch.bfloat16, 3, 64, [16, 16, 16], group)

    none = torch.full((3,), float("inf"), device=DEVICE)
    out = sparse_gemv_triton(x, w, none, splits, scales, zeros, g, config=cfg)
    assert torch.equal(out, torch.zeros_like(out))  # exact zeros, not just small

    keep_all = torch.zeros(3, device=DEVICE)
    out = sparse_gemv_triton(x, w, keep_all, splits, scales, zeros, g, config=cfg)
    assert_close_to_ref(out, x, w, keep_all, splits, scales, zeros, g)  # == dense x @ W

    mixed = torch.tensor([0.0, float("inf"), 0.8], device=DEVICE)
    out = sparse_gemv_triton(x, w, mixed, splits, scales, zeros, g, config=cfg)
    assert torch.equal(out[:, 16:32], torch.zeros_like(out[:, 16:32]))
    assert_close_to_ref(out, x, w, mixed, splits, scales, zeros, g)


@pytest.mark.parametrize("name", VARIANTS)
def test_batch_rows_use_their_own_masks(name):
    """Row 0 keeps nothing, row 1 everything, row 2 a few entries: must match row-wise."""
    cfg = variant(KernelConfig(block_n=16, block_k=32, sub_k=8), name)
    x, w, _, splits, *_ = make_problem("fp", torch.bfloat16, 3, 64, [32], 0)
    x = x.clone()
    x[0] = 0.25
    x[1] = 3.0
    x[2] = 0.0
    x[2, [3, 17, 40]] = torch.tensor([2.0, -5.0, 1.5], dtype=x.dtype, device=DEVICE)
    thresholds = torch.tensor([1.0], device=DEVICE)
    out = sparse_gemv_triton(x, w, thresholds, splits, config=cfg)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close_to_ref(out, x, w, thresholds, splits)
    for row in range(3):  # and each row equals the same call with that row alone
        alone = sparse_gemv_triton(x[row : row + 1].contiguous(), w, thresholds, splits, config=cfg)
        assert_close_to_ref(alone, x[row : row + 1], w, thresholds, splits)


def test_uninitialised_buffers_and_counters(monkeypatch):
    """Poison every buffer the launcher allocates: no NaN/garbage may reach the output."""

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 2**30
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(sg, "_alloc", poisoned)
    for name in VARIANTS:
        args = make_problem("int4", torch.bfloat16, 2, 96, [16, 32], 32)
        out = sparse_gemv_triton(*args, config=variant(KernelConfig(block_n=16, block_k=32, sub_k=8), name))
        assert_close_to_ref(out, *args)
    assert not sg.arrival_counters(torch.device(DEVICE)).any()  # every call leaves them at zero


@pytest.mark.parametrize("cfg", [KernelConfig(block_n=32, block_k=32, sub_k=8),
                                 KernelConfig(block_n=16, block_k=32, sub_k=16, design="dot")], ids=["rows", "dot"])
def test_deterministic(cfg):
    args = make_problem("fp", torch.bfloat16, 2, 192, [48, 32], 0)
    assert torch.equal(sparse_gemv_triton(*args, config=cfg), sparse_gemv_triton(*args, config=cfg))


def test_heuristic_config_at_the_largest_batch():
    args = make_problem("fp", torch.bfloat16, 8, 64, [32], 0)
    assert_close_to_ref(sparse_gemv_triton(*args), *args)  # heuristic config, M = MAX_BATCH = 8


@pytest.mark.parametrize("fmt,m,group", [("int4", 1, 128), ("int4", 16, 64), ("int4", 5, 128), ("int8", 16, 0)])
def test_heuristic_config_of_short_prefills(fmt, m, group):
    """Untuned int4 shapes and short prefills take the heuristic's dot config (int4: a whole group
    of 128 rows a step at one row, 64-row steps at 2-16 rows)."""
    args = make_problem(fmt, torch.bfloat16, m, 256, [128, 128], group)
    cfg = sg._fit_config(get_config("no such gpu", f"int4-g{group}" if group else fmt, m, 256, 256),
                         FMT_INT4 if group else sg.FMT_INT8, group, m, 256, [128, 128])
    assert cfg.design == "dot" and cfg.sub_k == (32 if not group else 128 if m == 1 else 64)
    assert_close_to_ref(sparse_gemv_triton(*args), *args)


@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 32)])
def test_op_cpu_reference_matches_the_kernel(monkeypatch, fmt, group):
    """The op's default CPU implementation (plain torch) computes what the kernel computes."""
    args = make_problem(fmt, torch.bfloat16, 3, 64, [16, 16], group)
    kernel = sparse_gemv(*args)
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    if not HAS_CUDA:
        assert_close_to_ref(sparse_gemv(*args), *args)
        torch.testing.assert_close(sparse_gemv(*args).float(), kernel.float(), rtol=2**-7, atol=1e-3)
    monkeypatch.setenv(CPU_KERNELS_ENV, "nonsense")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="reference' or 'interpreter"):
            sparse_gemv(*args)


@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_reference_and_dequantize(fmt, group):
    args = make_problem(fmt, torch.float16, 5, 256, [48, 16], group)
    x, w, thresholds, splits, scales, zeros, g = args
    assert torch.allclose(dequantize_weight(w, scales, zeros, g).double(), real_weight64(w, scales, zeros, g))
    assert_close_to_ref(sparse_gemv_reference(*args), *args)
    big_x = x.repeat(4, 1)  # the reference has no batch limit
    assert_close_to_ref(sparse_gemv_reference(big_x, *args[1:]), big_x, *args[1:])


# --- validation --------------------------------------------------------------------


def _bad(**changes):
    x, w, t, splits, s, z, g = make_problem("int4", torch.bfloat16, 1, 64, [16, 16], 32)
    args = dict(x=x, w=w, thresholds=t, split_sizes=splits, scales=s, zeros=z, group_size=g)
    args.update({k: (v(args) if callable(v) else v) for k, v in changes.items()})
    return args


BAD_INPUTS = [
    ("x-dtype", dict(x=lambda a: a["x"].float()), TypeError, "x must be bf16 or fp16"),
    ("x-3d", dict(x=lambda a: a["x"][None]), ValueError, "x must be 2-D"),
    ("k-mismatch", dict(x=lambda a: a["x"][:, :32].contiguous()), ValueError, "K=32 rows"),
    ("w-dtype", dict(w=lambda a: a["w"].float()), TypeError, "w dtype must be"),
    ("fp-w-dtype", dict(w=lambda a: torch.zeros(64, 32, dtype=torch.float16, device=DEVICE), scales=None,
                        zeros=None, group_size=0), TypeError, "x's dtype"),
    ("fp-scales", dict(w=lambda a: torch.zeros(64, 32, dtype=torch.bfloat16, device=DEVICE)), ValueError,
     "takes no scales"),
    ("int8-scales", dict(w=lambda a: torch.zeros(64, 32, dtype=torch.int8, device=DEVICE),
                         scales=lambda a: torch.ones(31, device=DEVICE), zeros=None, group_size=0), ValueError,
     r"scales must be float32 of shape \[32\]"),
    ("int4-group", dict(group_size=48), ValueError, "group_size must be one of"),
    ("int4-k-div", dict(x=lambda a: a["x"][:, :32].contiguous(), w=lambda a: a["w"][:32].contiguous(),
                        group_size=64, scales=lambda a: a["scales"][:0], zeros=lambda a: a["zeros"][:0]),
     ValueError, "K divisible by group_size"),
    ("int4-zeros", dict(zeros=None), ValueError, "zeros must be float32"),
    ("int4-scales-bf16", dict(scales=lambda a: a["scales"].to(torch.bfloat16)), ValueError,
     r"scales must be float32 of shape \[2, 32\], got torch.bfloat16"),
    ("int4-packed-apart", dict(scales=lambda a: pack_scales_zeros(a["scales"], a["zeros"])), ValueError,
     "go as both scales and zeros"),
    ("int4-odd-split", dict(split_sizes=[15, 17]), ValueError, "even"),
    ("split-sum", dict(split_sizes=[16, 8]), ValueError, "sum to N=32"),
    ("split-count", dict(split_sizes=[2] * 16, thresholds=lambda a: torch.zeros(16, device=DEVICE)), ValueError,
     "1..8 entries"),
    ("thr-shape", dict(thresholds=lambda a: a["thresholds"][:1]), ValueError, r"thresholds must be float32 of shape"),
    ("thr-dtype", dict(thresholds=lambda a: a["thresholds"].double()), ValueError, "thresholds must be float32"),
    ("batch", dict(x=lambda a: a["x"].repeat(65, 1)), ValueError, "use the dense path"),
    ("batch-no-dot", dict(x=lambda a: a["x"].repeat(9, 1)), ValueError, "need the dot design"),
    ("contiguous", dict(x=lambda a: a["x"].repeat(1, 2)[:, ::2]), ValueError, "x must be contiguous"),
    ("device", dict(thresholds=lambda a: a["thresholds"].to("meta")), ValueError, "must be on x's device"),
]


@pytest.mark.parametrize("changes,exc,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_validation_errors(changes, exc, match):
    with pytest.raises(exc, match=match):
        sparse_gemv(**_bad(**changes))


def test_launcher_rejects_non_int_splits_and_bad_config():
    with pytest.raises(ValueError, match="positive ints"):  # the op's schema already refuses floats
        sparse_gemv_triton(**_bad(split_sizes=[16.0, 16.0]))
    with pytest.raises(ValueError, match="power of two"):
        sparse_gemv_triton(**_bad(), config=KernelConfig(block_n=24))


# --- configs -----------------------------------------------------------------------


def test_get_config_lookup(monkeypatch):
    tuned = KernelConfig(block_n=64, block_k=512, sub_k=16, compact=False, num_warps=8)
    key = sg.config_key("NVIDIA H200", "bf16", 1, 4096, 6144)
    assert key == "NVIDIA H200|bf16|M1|K4096|N6144"
    monkeypatch.setattr(sg, "_tuned_table", lambda: {key: {"config": tuned.to_dict(), "us": {}}})
    assert get_config("NVIDIA H200", "bf16", 1, 4096, 6144) == tuned
    assert get_config("NVIDIA H200", "fp16", 1, 4096, 6144) == tuned  # fp16 reuses bf16
    assert get_config("NVIDIA H200", "int8", 1, 4096, 6144) == sg._heuristic_config("int8", 1, 4096, 6144)
    assert get_config("Other GPU", "bf16", 1, 4096, 6144) == sg._heuristic_config("bf16", 1, 4096, 6144)
    # an untuned H100 takes the H200's entry (same chip, speed_table.STAND_INS); its own comes first
    assert get_config("NVIDIA H100 80GB HBM3", "fp16", 1, 4096, 6144) == tuned
    own = KernelConfig(block_n=128, block_k=256, sub_k=32, compact=True, design="rows")
    h100_key = sg.config_key("NVIDIA H100 80GB HBM3", "bf16", 1, 4096, 6144)
    monkeypatch.setattr(sg, "_tuned_table",
                        lambda: {key: {"config": tuned.to_dict()}, h100_key: {"config": own.to_dict()}})
    assert get_config("NVIDIA H100 80GB HBM3", "bf16", 1, 4096, 6144) == own
    assert get_config("NVIDIA H200", "bf16", 1, 4096, 6144) == tuned
    # an entry with a config of its own for dense calls (tune_kernels: 0%'s fastest differed)
    for_dense = KernelConfig(block_n=256, block_k=512, sub_k=128, num_stages=3, design="dot")
    monkeypatch.setattr(sg, "_tuned_table", lambda: {key: {"config": tuned.to_dict(), "dense_config": for_dense.to_dict()}})
    assert get_config("NVIDIA H200", "bf16", 1, 4096, 6144, dense=True) == for_dense
    assert get_config("NVIDIA H200", "bf16", 1, 4096, 6144) == tuned


def test_tuned_config_file_is_valid():
    sg._tuned_table.cache_clear()
    for key, entry in sg._tuned_table().items():
        device, fmt, m, k, n = key.split("|")
        assert fmt in ("bf16", "fp16", "int8") or fmt.startswith("int4-g"), key
        assert m[0] == "M" and k[0] == "K" and n[0] == "N", key
        KernelConfig.from_dict(entry["config"])
        if "dense_config" in entry:
            KernelConfig.from_dict(entry["dense_config"])


def test_stored_config_with_unknown_or_missing_fields_is_refused():
    good = KernelConfig().to_dict()
    assert KernelConfig.from_dict(good) == KernelConfig()
    with pytest.raises(ValueError, match="do not match"):
        KernelConfig.from_dict({**good, "block_q": 8})
    with pytest.raises(ValueError, match="do not match"):
        KernelConfig.from_dict({k: v for k, v in good.items() if k != "sub_k"})
    # a field added after configs were stored may be missing: it takes what ran when they were tuned
    assert KernelConfig.from_dict({k: v for k, v in good.items() if k != "lane_sum"}) == KernelConfig()


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-g128"])
@pytest.mark.parametrize("m", [1, 2, 8, 16, 64])
def test_heuristic_configs_are_legal(fmt, m):
    """Fitted to real shapes: one bf16 row of a matrix of 8M weights or more runs the gather design
    over 128-256 programs; other float or int8 rows run the compact rows design with at least
    128 programs where the shape has that many 32-row chunks; int4 and batches run the dot design
    with tiles that divide the shape (K blocks too, or a last one cut at K that drops at most an
    eighth of the tiles), and a shape it cannot tile gets a "rows" config within that design's
    register budget."""
    group = 128 if fmt.startswith("int4") else 0
    for k, splits in [(4096, [4096, 1024, 1024]), (4096, [14336] * 2), (14336, [4096]), (11008, [4096]),
                      (2048, [8192] * 2), (8192, [2048]), (576, [576, 192, 192]), (1536, [576]), (40, [24])]:
        n = sum(splits)
        cfg = sg._fit_config(get_config("no such gpu", fmt, m, k, n), FMT_INT4 if group else FMT_FLOAT, group,
                             m, k, splits)
        if m == 1 and fmt == "bf16" and k * n >= 1 << 23:
            assert cfg.design == "gather" and cfg.block_n == 256 and cfg.sub_k == 32 and cfg.compact
            assert 128 <= triton.cdiv(n, cfg.block_n) * triton.cdiv(k, cfg.block_k) <= 256
        elif m == 1 and not group:
            assert cfg.design == "rows" and cfg.compact and cfg.block_k >= 2 * cfg.sub_k
            programs = sum(triton.cdiv(s, cfg.block_n) for s in splits) * triton.cdiv(k, cfg.block_k)
            assert programs >= 128 or cfg.block_k == 2 * cfg.sub_k
            assert cfg.sub_k * cfg.block_n <= 16384  # the tuned winners' 16 x 512 / 32 x 256 (32 x 512 at 4 warps)
        elif k % 16 == 0 and (not group or min(s & -s for s in splits) >= 128):
            assert cfg.design == "dot"
            cut_off = triton.cdiv(k, cfg.block_k) * cfg.block_k - k
            assert all(s % cfg.block_n == 0 for s in splits) and 8 * cut_off <= k
            assert k % cfg.sub_k == 0 and cfg.block_k % cfg.sub_k == 0 and cfg.sub_k >= 16 and (not group or group % cfg.sub_k == 0)
        else:
            assert cfg.design == "rows"
            assert triton.next_power_of_2(m) * cfg.sub_k * cfg.block_n <= 4096


# --- custom op / torch.compile -----------------------------------------------------


def test_custom_op_matches_launcher():
    args = make_problem("int8", torch.bfloat16, 2, 64, [16, 16], 0)
    assert torch.equal(torch.ops.teal.sparse_gemv(*args), sparse_gemv_triton(*args))
    assert torch.equal(sparse_gemv(*args), sparse_gemv_triton(*args))


def test_opcheck():
    args = make_problem("int4", torch.bfloat16, 1, 64, [16, 16], 32)
    torch.library.opcheck(torch.ops.teal.sparse_gemv.default, args)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = make_problem("fp", torch.float16, 3, 64, [8, 24], 0)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.teal.sparse_gemv(*fake)
    assert out.shape == (3, 32) and out.dtype == torch.float16


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_fullgraph(backend):
    x, w, t, splits, s, z, g = make_problem("int4", torch.bfloat16, 1, 64, [16, 16], 32)

    def layer(x, w, t, s, z):
        return sparse_gemv(x * 2, w, t, splits, s, z, g).float().relu()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x, w, t, s, z), layer(x, w, t, s, z))


# --- GPU only ----------------------------------------------------------------------

# Llama-3-8B q|k|v, down, gate|up, and Llama-2-7B down (K = 86 int4 groups: only 256-row blocks divide it)
LLAMA_SHAPES = [(4096, [4096, 1024, 1024]), (14336, [4096]), (4096, [14336, 14336]), (11008, [4096])]


def gpu_problem(fmt, m, k, splits, group, sparsity, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = sum(splits)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    scales = zeros = None
    if fmt == "fp":
        w = (torch.randn(k, n, generator=g, device="cuda") * 0.02).bfloat16()
    elif fmt == "int8":
        w = torch.randint(-128, 128, (k, n), generator=g, device="cuda", dtype=torch.int8)
        scales = torch.rand(n, generator=g, device="cuda") * 1e-3
    else:
        w = torch.randint(0, 256, (k, n // 2), generator=g, device="cuda", dtype=torch.uint8)
        scales = torch.rand(k // group, n, generator=g, device="cuda") * 1e-2
        zeros = torch.randn(k // group, n, generator=g, device="cuda") * 1e-3
    t = torch.quantile(x.abs().float().flatten(), sparsity).item()
    thresholds = torch.tensor([t * (1 + 0.1 * j) for j in range(len(splits))], device="cuda")
    return x, w, thresholds, list(splits), scales, zeros, group


def assert_close_gpu(out, args):
    ref = sparse_gemv_reference(*args).float()  # fp32 on the GPU; fp64 is too slow at these sizes
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 128), ("int4", 32)])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gpu_llama_shapes(fmt, group, m, name):
    for k, splits in LLAMA_SHAPES:
        for sparsity in (0.0, 0.5, 0.9):
            args = gpu_problem(fmt, m, k, splits, group, sparsity)
            if name.startswith("dot"):
                cfg = sg._heuristic_config(weight_format_name(args[1], group), m, k, sum(splits))
            else:
                cfg = sg._rows_heuristic(weight_format_name(args[1], group), m, k, sum(splits))
            out = sparse_gemv_triton(*args, config=variant(cfg, name))
            assert_close_gpu(out, args)
            assert_close_gpu(sparse_gemv(*args), args)  # tuned/default config
    torch.cuda.synchronize()
    assert not sg.arrival_counters(torch.device("cuda", torch.cuda.current_device())).any()


@needs_cuda
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("int8", 0), ("int4", 128), ("int4", 32)])
def test_gpu_fp16_activations(fmt, group, name):
    """fp16 activations take their own integer-to-float conversions (the int4 tiles become fp16
    for the dot design)."""
    for k, splits in LLAMA_SHAPES[:2]:
        args = gpu_problem(fmt, 2, k, splits, group, 0.5, dtype=torch.float16)
        pick = sg._heuristic_config if name.startswith("dot") else sg._rows_heuristic
        cfg = pick(weight_format_name(args[1], group), 2, k, sum(splits))
        out = sparse_gemv_triton(*args, config=variant(cfg, name))
        assert out.dtype == torch.float16
        assert_close_gpu(out, args)


@needs_cuda
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_gated_residual(fmt, group, m, name):
    """decode.py's down projection at the Llama-3-8B shape: SiLU(gate) * up in the prologue (the
    compact "rows" design takes it from its compaction scratch) and the residual in the epilogue."""
    k, splits = LLAMA_SHAPES[1]
    x, w, thresholds, splits, scales, zeros, g = gpu_problem(fmt, m, k, splits, group, 0.5)
    gen = torch.Generator(device="cuda").manual_seed(1)
    gate_up = torch.cat([x, torch.randn(m, k, generator=gen, device="cuda").to(x.dtype)], dim=1)
    residual = torch.randn(m, sum(splits), generator=gen, device="cuda").to(x.dtype)
    pick = sg._heuristic_config if name.startswith("dot") else sg._rows_heuristic
    cfg = variant(pick(weight_format_name(w, group), m, k, sum(splits)), name)
    args = (gate_up, w, thresholds, splits, scales, zeros, g)
    out = sparse_gemv_triton(*args, config=cfg, gated=True, residual=residual)
    ref = sparse_gemv_reference(*args, gated=True, residual=residual).float()
    assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 128)])
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_rmsnorm_prologue(fmt, group, m, name):
    """decode.py's q|k|v and gate|up projections under TEAL_FUSED_NORM=1 at the Llama-3-8B shapes:
    RMSNorm of the residual stream in the kernel's prologue, against the reference."""
    for k, splits in (LLAMA_SHAPES[0], LLAMA_SHAPES[2]):
        x, w, thresholds, splits, scales, zeros, g = gpu_problem(fmt, m, k, splits, group, 0.5)
        norm_weight = (torch.rand(k, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
                       + 0.5).to(x.dtype)
        pick = sg._heuristic_config if name.startswith("dot") else sg._rows_heuristic
        cfg = variant(pick(weight_format_name(w, group), m, k, sum(splits)), name)
        args = (x * 3, w, thresholds, splits, scales, zeros, g)
        out = sparse_gemv_triton(*args, config=cfg, norm_weight=norm_weight, eps=1e-5)
        ref = sparse_gemv_reference(*args, norm_weight=norm_weight, eps=1e-5).float()
        assert torch.allclose(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@needs_cuda
def test_gpu_deterministic_and_counters_reset():
    args = gpu_problem("fp", 1, 14336, [4096], 0, 0.5)
    first = sparse_gemv(*args)
    for _ in range(50):
        assert torch.equal(sparse_gemv(*args), first)
    torch.cuda.synchronize()
    assert not sg.arrival_counters(torch.device("cuda", torch.cuda.current_device())).any()


@needs_cuda
def test_gpu_cuda_graph_replay():
    problems = [gpu_problem("int4", 1, 4096, [4096, 1024, 1024], 128, s, seed=i) for i, s in enumerate((0.3, 0.6))]
    for p in problems:
        sparse_gemv(*p)  # warm up: compile and allocate the counters outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [sparse_gemv(*p) for p in problems]
    for _ in range(3):
        for o in outs:
            o.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for o, p in zip(outs, problems):
            assert_close_gpu(o, p)


@needs_cuda
def test_gpu_torch_compile_reduce_overhead():
    x, w, t, splits, s, z, g = gpu_problem("fp", 1, 4096, [14336, 14336], 0, 0.5)

    def mlp_in(x, w, t):
        gate, up = sparse_gemv(x, w, t, splits).split(splits, dim=1)
        return gate * 2, up.float().relu()  # exact ops, so eager and compiled must agree bitwise

    torch._dynamo.reset()
    compiled = torch.compile(mlp_in, mode="reduce-overhead", fullgraph=True)
    expected = mlp_in(x, w, t)
    for _ in range(4):  # warm-up runs, then CUDA-graph replays
        got = compiled(x.clone(), w, t)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


# --- fusions: SiLU(gate) * up prologue, residual epilogue ----------------------------------


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 32)])
def test_gated_prologue_and_residual_epilogue(fmt, group, name):
    """x given as gate|up [M, 2K] (the kernel computes SiLU(gate) * up, rounded to bf16), plus a
    residual added to the output, against float64 math. Thresholds sit halfway between two |x|
    values, so the one-ulp rounding of the gated input (the interpreter truncates) cannot flip a
    mask; the tolerance allows that ulp on every term."""
    _, w, _, splits, scales, zeros, g = make_problem(fmt, torch.bfloat16, 3, 64, [16, 32], group)
    gen = torch.Generator().manual_seed(11)
    gate_up = (torch.randn(3, 128, generator=gen) * 2).to(torch.bfloat16).to(DEVICE)
    residual = torch.randn(3, 48, generator=gen).to(torch.bfloat16).to(DEVICE)
    x64 = torch.nn.functional.silu(gate_up[:, :64].double()) * gate_up[:, 64:].double()
    levels = x64.abs().flatten().sort().values
    ratio = levels[1:] / levels[:-1]  # a wide gap near the 30% and 60% quantiles: no value within an ulp
    gaps = [int(window.argmax()) + lo for lo, window in ((48, ratio[48:68]), (106, ratio[106:126]))]
    assert all(ratio[i] > 1.02 for i in gaps)
    thresholds = torch.stack([(levels[i] + levels[i + 1]) / 2 for i in gaps]).float().to(DEVICE)
    cfg = variant(KernelConfig(block_n=16, block_k=32, sub_k=8), name)
    fused = sparse_gemv_triton(gate_up, w, thresholds, splits, scales, zeros, g, config=cfg, gated=True,
                               residual=residual)
    weight = real_weight64(w, scales, zeros, g)
    keep = torch.cat([(x64.abs() > thresholds[j].double())[:, :, None].expand(-1, -1, n)
                      for j, n in enumerate(splits)], dim=2)
    want = (x64[:, :, None] * keep * weight[None]).sum(1) + residual.double()
    scale = x64.abs() @ weight.abs()
    assert fused.dtype == torch.bfloat16 and torch.isfinite(fused).all()
    # bf16 ulps (2^-7 relative when the interpreter truncates): the gated input's on every term,
    # the product's and the sum's on the output
    tol = 2**-6 * want.abs() + 2**-7 * (scale + residual.double().abs()) + 1e-6
    assert ((fused.double() - want).abs() <= tol).all()
    ref = sparse_gemv_reference(gate_up, w, thresholds, splits, scales, zeros, g, gated=True, residual=residual)
    assert ((ref.double() - want).abs() <= tol).all()
    plain = sparse_gemv_triton(gate_up, w, thresholds, splits, scales, zeros, g, config=cfg, gated=True)
    assert ((fused.double() - plain.double() - residual.double()).abs() <= 2**-6 * fused.double().abs() + 1e-6).all()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 32)])
@pytest.mark.parametrize("block_k", [32, 64])
def test_rmsnorm_prologue(fmt, group, name, block_k):
    """x given as the residual stream h [M, K] with the norm's weight: the kernel computes
    model.RMSNorm's output (two roundings to bf16) before thresholding, against float64 math.
    Thresholds sit between two |x| values a few percent apart, so the roundings (the interpreter
    truncates) cannot flip a mask; the tolerance allows two ulps on every term. K blocks of 64 rows
    are the whole row (one K block: the compact designs take the statistics from the block's load);
    with 32-row blocks the statistics are read apart (_rms_scale)."""
    _, w, _, splits, scales, zeros, g = make_problem(fmt, torch.bfloat16, 3, 64, [16, 32], group)
    gen = torch.Generator().manual_seed(12)
    h = (torch.randn(3, 64, generator=gen) * 4).to(torch.bfloat16).to(DEVICE)
    norm_weight = (torch.rand(64, generator=gen) + 0.5).to(torch.bfloat16).to(DEVICE)
    eps = 1e-5
    h64 = h.double()
    x64 = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    levels = x64.abs().flatten().sort().values
    ratio = levels[1:] / levels[:-1]
    gaps = [int(window.argmax()) + lo for lo, window in ((48, ratio[48:68]), (106, ratio[106:126]))]
    assert all(ratio[i] > 1.03 for i in gaps)
    thresholds = torch.stack([(levels[i] + levels[i + 1]) / 2 for i in gaps]).float().to(DEVICE)
    cfg = variant(KernelConfig(block_n=16, block_k=block_k, sub_k=8), name)
    fused = sparse_gemv_triton(h, w, thresholds, splits, scales, zeros, g, config=cfg, norm_weight=norm_weight, eps=eps)
    weight = real_weight64(w, scales, zeros, g)
    keep = torch.cat([(x64.abs() > thresholds[j].double())[:, :, None].expand(-1, -1, n)
                      for j, n in enumerate(splits)], dim=2)
    want = (x64[:, :, None] * keep * weight[None]).sum(1)
    scale = x64.abs() @ weight.abs()
    tol = 2**-6 * want.abs() + 2**-5 * scale + 1e-6
    assert fused.dtype == torch.bfloat16 and ((fused.double() - want).abs() <= tol).all()
    ref = sparse_gemv_reference(h, w, thresholds, splits, scales, zeros, g, norm_weight=norm_weight, eps=eps)
    assert ((ref.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int4", 32)])
def test_op_with_norm_matches_the_reference(fmt, group):
    """teal::sparse_gemv with norm_weight on this device (CPU: the op normalizes in torch, then its
    kernel) against the reference of the same call."""
    x, w, t, splits, s, z, g = make_problem(fmt, torch.bfloat16, 2, 64, [16, 32], group)
    norm_weight = (torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5).to(torch.bfloat16).to(DEVICE)
    got = sparse_gemv(x * 3, w, t, splits, s, z, g, norm_weight=norm_weight, eps=1e-5).float()
    want = sparse_gemv_reference(x * 3, w, t, splits, s, z, g, norm_weight=norm_weight, eps=1e-5).float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_fusion_arguments_are_checked():
    x, w, t, splits, s, z, g = make_problem("fp", torch.bfloat16, 2, 64, [32], 0)
    with pytest.raises(ValueError, match=r"x \[M, 2K\]"):
        sparse_gemv(x, w, t, splits, gated=True)  # x is [M, K], not gate|up
    with pytest.raises(ValueError, match="residual must be"):
        sparse_gemv(x, w, t, splits, residual=torch.zeros(2, 31, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):
        sparse_gemv(x, w, t, splits, residual=torch.zeros(2, 32, device=DEVICE))
    with pytest.raises(ValueError, match="norm_weight must be"):
        sparse_gemv(x, w, t, splits, norm_weight=torch.ones(63, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="norm_weight must be"):
        sparse_gemv(torch.cat([x, x], 1), w, t, splits, gated=True,
                    norm_weight=torch.ones(64, dtype=torch.bfloat16, device=DEVICE))
