"""teal_kernels/int4_mma.py (dense int4-g128 products on tensor cores from Gluon) and PackedLinear's copy
for it (TEAL_INT4_MMA).

Gluon kernels do not run in Triton's interpreter, so the CPU tests check what the kernel's layouts
encode without running it: the packed copy against the codes it came from, the CPU implementation of
teal::int4_mma (the float32 product of the unpacked copy) and the dispatch, all against the float64
product of the weights our int4 format defines (teal_kernels/reference.py). The kernel itself runs
where a GPU is (and compiles for sm_90 in tests/sm90_compile.py). Tolerance: the output's bf16
rounding, plus a float32 sum's error, 1e-5 of sum |x| |W| (as the GEMV tests allow).
"""
from __future__ import annotations

import pytest
import torch
from fixtures import int4_fused_decode_logits, random_int4, tiny_model

import linear
from linear import INT4_MMA_ENV, TINYGEMM_ENV, PackedLinear, attach_int4pack, pack_model, packed_projections
from model import RMSNorm
from quantize import quantize_model
from teal_kernels import int4_mma as im
from teal_kernels.ops import int4_mma
from teal_kernels.reference import dequantize_weight, gated_input, rms_normed


def _int4(k: int, n: int, seed: int = 0, group: int = 128) -> tuple[torch.Tensor, ...]:
    """fixtures.random_int4 on the CPU (the kernel's tests move it themselves)."""
    return tuple(t.cpu() for t in random_int4(k, n, group, seed))


def _codes(w: torch.Tensor) -> torch.Tensor:
    """Our layout's codes as [N, K]."""
    return torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1).t().to(torch.int64)


def _assert_product(out: torch.Tensor, x: torch.Tensor, w, scales, zeros) -> None:
    real = dequantize_weight(w.cpu(), scales.cpu(), zeros.cpu(), 128).double()
    exact = x.cpu().double() @ real
    bound = 2.0 ** -8 * exact.abs() + 1e-5 * (x.cpu().double().abs() @ real.abs()) + 1e-30
    err = (out.cpu().double() - exact).abs()
    assert (err <= bound).all(), f"max error {(err / bound).max().item():.3g} of its bound"


def test_the_copy_holds_each_code_where_its_fragment_reads_it() -> None:
    """Word (t, g, lane, slot) holds, in bits 4p and 16 + 4p, the codes of output 16 t + r at K = 128 g +
    32 p + 2 j and K + 1, (r, j) mma.m16n8k16's A fragment position of (lane, slot)."""
    w, scales, zeros = _int4(256, 48, seed=1)
    words, s_t, z_t = im.pack(w, scales, zeros)
    assert words.shape == (3, 2, 32, 8) and words.dtype == torch.int32
    assert torch.equal(s_t, scales.t()) and torch.equal(z_t, zeros.t())
    codes = _codes(w)
    for t, g, lane, slot, p in ((0, 0, 0, 0, 0), (2, 1, 31, 7, 3), (1, 0, 6, 5, 2), (0, 1, 13, 2, 1)):
        r, j = im._lane_slot_to_row_pair(torch.tensor(lane), torch.tensor(slot))
        word = int(words[t, g, lane, slot]) & 0xFFFFFFFF
        k = 128 * g + 32 * p + 2 * int(j)
        assert (word >> 4 * p) & 0xF == codes[16 * t + int(r), k]
        assert (word >> (16 + 4 * p)) & 0xF == codes[16 * t + int(r), k + 1]
    assert torch.equal(im.unpack_codes(words), codes)  # every code, once


def test_a_lane_tile_is_mma_a_fragment() -> None:
    """PTX ISA, mma.m16n8k16 .bf16 A: lane = 4 groupID + threadID_in_group; register a_i holds row groupID
    (+ 8 for a1, a3) and columns 2 threadID_in_group + {0, 1} (+ 8 for a2, a3); a second 16-wide K block
    follows in a4..a7. Slot i is a_i's word, so its K pair is column / 2."""
    lane = torch.arange(32).repeat_interleave(8)
    slot = torch.arange(8).repeat(32)
    row, pair = im._lane_slot_to_row_pair(lane, slot)
    group_id, thread_in_group, reg, k_block = lane // 4, lane % 4, slot % 4, slot // 4
    assert torch.equal(row, group_id + 8 * (reg % 2))
    assert torch.equal(pair, (16 * k_block + 2 * thread_in_group + 8 * (reg // 2)) // 2)
    assert sorted((16 * row + pair).tolist()) == list(range(256))


def test_a_copy_with_bf16_scales_multiplies_the_rounded_weights() -> None:
    """pack(scale_dtype=bfloat16) (TEAL_INT4_MMA_BF16_SCALES): scales and zeros rounded to bf16, the codes
    unchanged; the op (its CPU implementation here) multiplies (q - 8) * s + z with those rounded values,
    and a layer given that copy says so in its dtype; any other dtype is refused in one line."""
    w, scales, zeros = _int4(384, 64, seed=9)
    words, s_t, z_t = im.pack(w, scales, zeros, scale_dtype=torch.bfloat16)
    assert s_t.dtype == z_t.dtype == torch.bfloat16 and torch.equal(words, im.pack(w, scales, zeros)[0])
    rounded = scales.to(torch.bfloat16).float(), zeros.to(torch.bfloat16).float()
    x = torch.randn(3, 384, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    _assert_product(int4_mma(x, words, s_t, z_t), x, w, *rounded)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        im.pack(w, scales, zeros, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16 scales"):
        im.int4_mma(x, words, s_t.half(), z_t.half())
    layer = _layer()
    assert layer.attach_int4pack(use_mma=True, mma_scale_dtype=torch.bfloat16)
    assert layer.int4mma_scales.dtype == torch.bfloat16
    one = x[:1].view(1, 1, 384)[..., :256]
    _assert_product(layer(one).view(1, -1), one.view(1, -1), layer.weight, layer.scales.to(torch.bfloat16).float(),
                    layer.zeros.to(torch.bfloat16).float())


def test_the_copys_scale_dtype_is_read_from_its_switch(monkeypatch) -> None:
    """linear.int4_mma_scale_dtype, the one place the copy's scale dtype is decided (attach_int4pack and
    the benchmarks' timing of the dense path read it): bf16 by default, float32 with =0, a bad value an error."""
    monkeypatch.delenv(linear.INT4_MMA_BF16_SCALES_ENV, raising=False)
    assert linear.int4_mma_scale_dtype() == torch.bfloat16
    monkeypatch.setenv(linear.INT4_MMA_BF16_SCALES_ENV, "0")
    assert linear.int4_mma_scale_dtype() == torch.float32
    monkeypatch.setenv(linear.INT4_MMA_BF16_SCALES_ENV, "yes")
    with pytest.raises(ValueError):
        linear.int4_mma_scale_dtype()


@pytest.mark.parametrize("m", [1, 3, 8])
def test_the_cpu_op_is_the_reference_product(m: int) -> None:
    w, scales, zeros = _int4(384, 64, seed=m)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
    out = int4_mma(x, *im.pack(w, scales, zeros))
    assert out.shape == (m, 64) and out.dtype == torch.bfloat16
    _assert_product(out, x, w, scales, zeros)


def test_pack_and_the_kernel_refuse_what_they_do_not_take() -> None:
    w, scales, zeros = _int4(256, 48)
    with pytest.raises(ValueError, match="K a multiple of 128"):
        im.pack(w[:192], scales[:1], zeros[:1])
    with pytest.raises(ValueError, match="N of 16"):
        im.pack(w[:, :20], scales[:, :40], zeros[:, :40])
    packed = im.pack(w, scales, zeros)
    for x in (torch.zeros(9, 256, dtype=torch.bfloat16), torch.zeros(1, 256, dtype=torch.float16),
              torch.zeros(1, 128, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="int4_mma needs bf16 x"):
            im.int4_mma(x, *packed)
    one = torch.zeros(1, 256, dtype=torch.bfloat16)
    for bad in (im.MmaConfig(4, 1, 1), im.MmaConfig(1, 1, 2), im.MmaConfig(1, 1, 1, 3)):  # 2 groups, 48 outputs
        with pytest.raises(ValueError, match="lookahead of 1 or 2"):
            im.int4_mma(one, *packed, config=bad)
    assert im.fits(4096, 14336, 128, torch.bfloat16)
    assert not im.fits(4096, 14336, 64, torch.bfloat16) and not im.fits(4096, 14336, 128, torch.float16)
    assert not im.fits(4096, 40, 128, torch.bfloat16) and not im.fits(4000, 64, 128, torch.bfloat16)


@pytest.mark.parametrize("k, n", [(4096, 12288), (11008, 4096), (4096, 22016), (2048, 3072), (2048, 2048),
                                  (8192, 2048), (3072, 5120), (128, 16), (5120, 1280), (8192, 7168)])
@pytest.mark.parametrize("m", [1, 4])
def test_every_config_fits_its_shape(k: int, n: int, m: int) -> None:
    """The rule gives a launch the kernel takes on shapes nobody measured (Llama-2-7B, Llama-3.2-1B / 3B,
    70B shards, tiny ones): rows dividing N, K warps dividing the groups, <= 16, within the warp target;
    at any M one row's K warps (a row's groups added in the same order)."""
    cfg = im.config_for(k, n, m)
    assert n % cfg.rows == 0 and (k // 128) % cfg.k_warps == 0 and 1 <= cfg.k_warps <= 16
    assert (n // cfg.rows) * cfg.k_warps <= im.TARGET_WARPS or cfg.k_warps == 1
    assert cfg.k_warps == im.config_for(k, n, 1).k_warps


def test_the_rule_picks_the_measured_winners() -> None:
    """The fastest config per Llama-3-8B matrix at one row among those with one row's K warps (H100,
    results/int4_mma_2026_12_05c/), and at 4 rows the winners with those K warps there: q|k|v's ties
    within 0.5 µs, so any of (8, 1, 2 / 4, 1 / 2)."""
    one_row = {(4096, 6144): (8, 1, 1, 1), (4096, 4096): (16, 1, 1, 1), (4096, 28672): (4, 1, 2, 2),
               (14336, 4096): (16, 1, 2, 2)}
    four_rows = {(4096, 4096): (16, 1, 2, 1), (4096, 28672): (4, 1, 4, 2), (14336, 4096): (16, 1, 2, 2)}
    assert {shape: tuple(im.config_for(*shape)) for shape in one_row} == one_row
    assert {shape: tuple(im.config_for(*shape, 4)) for shape in four_rows} == four_rows
    assert tuple(im.config_for(4096, 6144, 4))[:2] == (8, 1)


def _layer(k: int = 256, splits: tuple[int, ...] = (32, 16), group: int = 128) -> PackedLinear:
    layer = PackedLinear(k, sum(splits), list(splits), "int4", group)
    layer.weight, layer.scales, layer.zeros = _int4(k, sum(splits), seed=2, group=group)
    return layer


@torch.no_grad()
def test_dense_decode_calls_take_the_mma_copy_and_sparse_ones_do_not(monkeypatch) -> None:
    layer = _layer()
    assert layer.attach_int4pack(use_mma=True)
    assert layer.int4mma_words is not None and layer.int4pack_weight is None
    assert not any(name.startswith("int4mma") for name in layer.state_dict())  # derived, never saved
    x = torch.randn(2, 1, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    want = int4_mma(x.view(2, 256), layer.int4mma_words, layer.int4mma_scales, layer.int4mma_zeros)
    assert torch.equal(layer(x).view(2, -1), want)
    _assert_product(want, x.view(2, 256), layer.weight, layer.scales, layer.zeros)
    # the fusions: SiLU(gate) * up and the norm by torch; the residual in the op, with the unfused
    # model's roundings
    gate_up = torch.randn(1, 1, 512, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    residual = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    gated = int4_mma(gated_input(gate_up.view(1, 512)), layer.int4mma_words, layer.int4mma_scales,
                     layer.int4mma_zeros)
    assert torch.equal(layer(gate_up, gated=True, residual=residual).view(1, -1), gated + residual.view(1, -1))
    norm = RMSNorm(256, 1e-5).to(torch.bfloat16)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5, generator=torch.Generator().manual_seed(6))
    one = x[:1]
    assert torch.equal(layer(one, norm=norm), layer(norm(one)))
    assert torch.equal(layer(x, norm=norm), layer(norm(x)))
    assert torch.equal(layer(x, norm=norm, norm_in_sparse_kernel=True), layer(norm(x)))

    calls = []  # what reaches the op: the residual and the normed input, asked to fuse the norm or not
    monkeypatch.setattr(linear, "int4_mma", lambda *args: calls.append(args) or int4_mma(*args))
    layer(one, norm=norm, residual=residual)
    layer(one, norm=norm, residual=residual, norm_in_sparse_kernel=True)
    assert len(calls) == 2
    for call in calls:
        assert torch.equal(call[0], norm(one).view(1, -1)) and torch.equal(call[4], residual.view(1, -1))
    # TEAL's sparse calls keep our kernel and its layout: the same output as a layer without the copy
    plain = _layer()
    for m in (layer, plain):
        m.thresholds.fill_(0.8)
        m.sparse = True
    assert torch.equal(layer(x), plain(x))


def test_other_group_sizes_keep_tinygemms_copy() -> None:
    layer = _layer(group=64)
    assert layer.attach_int4pack(use_mma=True)
    assert layer.int4mma_words is None and layer.int4pack_weight is not None
    assert layer.has_dense_int4_copy


def test_the_switch_is_read_with_tinygemms(monkeypatch) -> None:
    """TEAL_INT4_MMA picks the copy on CUDA only (as TEAL_INT4_TINYGEMM, which must be on); a bad value fails."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(seed=1, dim=128, intermediate_size=256).to(torch.bfloat16)
    quantize_model(model, "int4", 128)
    pack_model(model)
    model.to(device)
    monkeypatch.setenv(INT4_MMA_ENV, "1")
    expected = list(packed_projections(model)) if torch.cuda.is_available() else []
    assert attach_int4pack(model) == expected
    assert [n for n, m in packed_projections(model).items() if m.int4mma_words is not None] == expected
    monkeypatch.setenv(TINYGEMM_ENV, "0")
    assert attach_int4pack(model) == []  # no dense copy at all
    monkeypatch.delenv(TINYGEMM_ENV)
    monkeypatch.setenv(INT4_MMA_ENV, "on")
    with pytest.raises(ValueError, match=f"{INT4_MMA_ENV} must be 0 or 1"):
        attach_int4pack(model)


def test_the_speed_table_judges_the_mma_copy_by_its_own_time_else_tinygemms(monkeypatch) -> None:
    """With int4_mma's copy a layer's dense path is int4_mma: TEAL pays only where the kernel at the
    layer's sparsity beats int4_mma's time; without that time the layer stays dense, measured where the
    kernel lost to tinygemm (the slower copy), else as unmeasured."""
    import teal_kernels.speed_table as st

    key = st.table_key("Fake GPU", "int4-g128", 1, 256, 48)
    entry = {"dense_us": 12.0, "tinygemm_us": 9.5, "int4_mma_us": 8.0, "sparse_us": {"0": 12.0, "0.5": 9.0}}
    monkeypatch.setattr(st, "speed_table", lambda: {key: entry})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    cuda = torch.device("cuda")
    layer = _layer()
    layer.set_target_sparsity([0.5, 0.5])
    assert layer.kernel_verdict(cuda) == (True, "Fake GPU")  # against our kernel at 0%
    layer.attach_int4pack(use_mma=True)
    assert layer.kernel_verdict(cuda) == (False, "Fake GPU")  # 9.0 against int4_mma's 8.0
    layer._kernel_pays.clear()
    del entry["int4_mma_us"]
    assert layer.kernel_verdict(cuda) == (False, None)  # 9.0 beats tinygemm's 9.5: not int4_mma, unmeasured
    layer._kernel_pays.clear()
    entry["tinygemm_us"] = 8.5
    assert layer.kernel_verdict(cuda) == (False, "Fake GPU")  # 9.0 against tinygemm's 8.5: slower, measured
    layer._kernel_pays.clear()
    monkeypatch.setattr(st, "speed_table", lambda: {})
    assert layer.kernel_verdict(cuda) == (False, None)  # no entry: int4_mma, not the size model's sparse


needs_gluon = pytest.mark.skipif(not (torch.cuda.is_available() and im.available()),
                                 reason="needs a CUDA GPU and a Triton with Gluon")


@needs_gluon
@pytest.mark.parametrize("k, n", [(256, 64), (2048, 128), (4096, 256), (1408, 48)])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_the_kernel_matches_float64_at_every_config(k: int, n: int, m: int) -> None:
    w, scales, zeros = (t.cuda() for t in _int4(k, n, seed=k + m))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n + m)).to(torch.bfloat16).cuda()
    packed = im.pack(w, scales, zeros)
    configs = {im.config_for(k, n, m), *(im.MmaConfig(kw, mw, r, ahead) for kw in (1, 2, 4, 8, 16) for mw in (1, 2)
                                      for r in (1, 2) for ahead in (1, 2) if kw * mw <= 16)}  # <= 16 warps, as the lab
    ran = 0
    for cfg in configs:
        if n % cfg.rows == 0 and (k // 128) % cfg.k_warps == 0:
            _assert_product(im.int4_mma(x, *packed, config=cfg), x, w, scales, zeros)
            ran += 1
    assert ran >= 1  # K = 1408 (11 groups), N = 48: one K warp and 16-row programs only


@needs_gluon
@pytest.mark.parametrize("m", [1, 4])
def test_the_kernel_with_bf16_scales_matches_float64(m: int) -> None:
    """The copy's bf16 scales and zeros (TEAL_INT4_MMA_BF16_SCALES) read as the float32 ones are: the
    product of the rounded weights, at the 8B shapes' configs."""
    for k, n in ((4096, 6144), (14336, 4096)):
        w, scales, zeros = (t.cuda() for t in _int4(k, n, seed=k + m))
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).cuda()
        packed = im.pack(w, scales, zeros, scale_dtype=torch.bfloat16)
        _assert_product(im.int4_mma(x, *packed), x, w, scales.to(torch.bfloat16).float(),
                        zeros.to(torch.bfloat16).float())


@needs_gluon
@pytest.mark.parametrize("fusion", ["plain", "residual"])
def test_a_rows_output_is_the_same_alone_and_among_others(fusion: str) -> None:
    """Self-speculation's verify multiplies K + 1 rows where a plain decode step multiplies one, so
    greedy tokens agree only if each row's output has the same bits either way (benchmarks/batch_rows.py).
    The one-row kernel sums x apart from the 2-8-row one: the two must add in the same order."""
    for k, n in ((4096, 6144), (2048, 2048), (1408, 4096)):
        w, scales, zeros = (t.cuda() for t in _int4(k, n, seed=k))
        packed = im.pack(w, scales, zeros)
        g = torch.Generator().manual_seed(n)
        x = (torch.randn(8, k, generator=g) * 2).to(torch.bfloat16).cuda()
        residual = torch.randn(8, n, generator=g).to(torch.bfloat16).cuda()
        for m in (2, 5, 8):
            def run(rows: slice) -> torch.Tensor:
                extra = {"plain": (), "residual": (residual[rows],)}[fusion]
                return im.int4_mma(x[rows], *packed, *extra)
            together = run(slice(0, m))
            for i in range(m):
                assert torch.equal(together[i], run(slice(i, i + 1))[0]), (k, n, m, i)


@needs_gluon
@pytest.mark.parametrize("k, n, m, with_residual", [(2048, 256, 1, True), (1408, 4096, 1, False),
                                                     (4096, 512, 3, True)])
def test_the_kernels_residual_is_the_references(k: int, n: int, m: int, with_residual: bool) -> None:
    """With the residual in the kernel: within the product's tolerance of the reference, which rounds as
    the unfused model does (the product before the sum)."""
    w, scales, zeros = (t.cuda() for t in _int4(k, n, seed=7))
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * 3).to(torch.bfloat16).cuda()
    residual = torch.randn(m, n, generator=g).to(torch.bfloat16).cuda() if with_residual else None
    packed = im.pack(w, scales, zeros)
    got = im.int4_mma(x, *packed, residual)
    want = im.int4_mma_reference(x, *packed, residual)
    real = dequantize_weight(w.cpu(), scales.cpu(), zeros.cpu(), 128).double()
    bound = 2.0 ** -7 * want.double().abs().cpu() + 1e-5 * (x.cpu().double().abs() @ real.abs()) + 1e-30
    assert ((got.double() - want.double()).abs().cpu() <= bound).all()


@needs_gluon
@torch.no_grad()
def test_a_compiled_decode_step_with_the_mma_copy_matches_tinygemms(monkeypatch) -> None:
    """A tiny int4-g128 model's dense decode logits through the fused path (torch.compile, the op),
    with the mma copy and with tinygemm's: the same weights, so about tinygemm's bf16 scales apart."""

    def logits(switch: str) -> torch.Tensor:
        monkeypatch.setenv(INT4_MMA_ENV, switch)
        model, out = int4_fused_decode_logits(128, compiled=True)
        assert all((m.int4mma_words is not None) == (switch == "1") for m in packed_projections(model).values())
        return out

    mma_logits, tiny = logits("1"), logits("0")
    assert (mma_logits - tiny).norm() / tiny.norm() < 0.02


@needs_gluon
@torch.no_grad()
def test_an_int4_head_decodes_through_its_mma_copy(monkeypatch) -> None:
    """quantize.py --lm_head int4: the head gets int4_mma's copy too (never the norms' statistics), and
    the decode logits are those of the same model with tinygemm's copies, about their bf16 scales apart."""
    def logits(switch: str) -> torch.Tensor:
        monkeypatch.setenv(INT4_MMA_ENV, switch)
        monkeypatch.setenv(linear.INT4_MMA_NORM_STATS_ENV, "1")
        model, out = int4_fused_decode_logits(128, compiled=True, lm_head="int4")
        assert (model.output.fmt, model.output.group_size) == ("int4", 128)
        assert (model.output.int4mma_words is not None) == (switch == "1") and model.output.has_dense_int4_copy
        assert not model.output.mma_norm_stats
        return out

    mma_logits, tiny = logits("1"), logits("0")
    assert (mma_logits - tiny).norm() / tiny.norm() < 0.02


# --- the gate epilogue: a gate|up layer's paired copy returns SiLU(gate) * up ---------------------------

def test_the_paired_copy_and_its_reference() -> None:
    """pack(paired=True) orders outputs as paired_order (16 gates, their 16 ups, ...); the op's CPU
    reference with gate is reference.gated_input of the plain copy's product; pairs() takes the 8B and
    Llama-2 gate|up shapes and refuses those whose launches hold an odd number of tiles a warp."""
    k, n = 256, 16384
    w, scales, zeros = _int4(k, n, seed=5)
    plain, paired = im.pack(w, scales, zeros), im.pack(w, scales, zeros, paired=True)
    order = im.paired_order(n)
    assert sorted(order.tolist()) == list(range(n)) and order[16:32].tolist() == list(range(n // 2, n // 2 + 16))
    assert torch.equal(im.unpack_codes(paired[0]), im.unpack_codes(plain[0])[order])
    assert torch.equal(paired[1], plain[1][order]) and torch.equal(paired[2], plain[2][order])
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    want = gated_input(im.int4_mma_reference(x, *plain))
    assert torch.equal(im.int4_mma_reference(x, *paired, gate=True), want)
    assert torch.equal(int4_mma(x, *paired, None, True), want)  # the op, its CPU implementation
    assert im.pairs(4096, 28672) and im.pairs(4096, 22016) and im.pairs(2048, 16384)
    assert not im.pairs(4096, 14336) and not im.pairs(576, 3072)
    # the kernel's gate epilogue needs a gate and its up in one thread: one row warp (its split does not
    # compile with two, the H100 fuzz of 2026-12-05), an even number of tiles, no residual
    for bad in (im.MmaConfig(1, 2, 2), im.MmaConfig(1, 1, 1)):
        with pytest.raises(ValueError, match="gate epilogue takes no residual, an even number of tiles"):
            im.int4_mma(x, *paired, gate=True, config=bad)


@torch.no_grad()
def test_a_paired_gate_up_layer_gates_its_dense_calls_only() -> None:
    """PackedLinear with the paired copy: gates_in_epilogue for a dense one-row bf16 call, not for a
    sparse one; its gated output is gated_input of the same layer without the copy (the product's own
    rounding apart); a call that would run the paired copy without gate_product, or ask gate_product
    where the copy does not run, fails in one line."""
    layer, plain = _layer(splits=(8192, 8192)), _layer(splits=(8192, 8192))
    assert layer.attach_int4pack(use_mma=True, gate_epilogue=True) and layer.mma_gate
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    assert layer.gates_in_epilogue(x)
    got = layer(x, gate_product=True)
    assert got.shape == (1, 1, 8192)
    want = gated_input(plain(x).view(1, -1)).view(1, 1, -1)
    assert torch.allclose(got.float(), want.float(), rtol=2**-6, atol=1e-3)
    with pytest.raises(ValueError, match="gate_product=False"):
        layer(x)
    for m in (layer, plain):
        m.thresholds.fill_(0.8)
        m.sparse = True
    assert not layer.gates_in_epilogue(x)
    with pytest.raises(ValueError, match="gate_product=True"):
        layer(x, gate_product=True)
    assert torch.equal(layer(x), plain(x))  # sparse calls: our kernel, the natural order
    unpaired = _layer(splits=(8192, 8192))
    assert unpaired.attach_int4pack(use_mma=True, gate_epilogue=False) and not unpaired.mma_gate
    assert not unpaired.gates_in_epilogue(x)


@torch.no_grad()
def test_the_decode_block_hands_down_the_gated_input_from_a_paired_gate_up() -> None:
    """decode.DecodeBlock with a paired gate|up: the block's output is the one with the plain copy (down
    takes SiLU(gate) * up instead of computing it), within bf16 roundings."""
    from decode import DecodeBlock

    model = tiny_model(seed=2, dim=128, intermediate_size=8192, n_layer=1).to(torch.bfloat16)
    quantize_model(model, "int4", 128)
    pack_model(model)
    model.setup_caches(1, 16)
    outs = []
    for gate in (False, True):
        for name, m in packed_projections(model).items():
            m.int4mma_words = None
            assert m.attach_int4pack(use_mma=True, gate_epilogue=gate and name.endswith("w13"))
        block = DecodeBlock(model.layers[0])
        assert block.feed_forward.w13.mma_gate == gate
        x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
        freqs = model.freqs_cis[4:5]
        outs.append(block(x, freqs, None, torch.tensor([4])))
    assert torch.allclose(outs[0].float(), outs[1].float(), rtol=2**-6, atol=2e-2)


@needs_gluon
@pytest.mark.parametrize("m", [1, 3, 8])
def test_the_kernels_gate_epilogue_is_the_references(m: int) -> None:
    """The GATE epilogue on the GPU (one row and the 2-8-row path): SiLU(gate) * up of the paired copy's
    product, within a bf16 rounding or two of the reference (the product's own float32 order apart)."""
    k, n = 2048, 16384
    w, scales, zeros = (t.cuda() for t in _int4(k, n, seed=9))
    paired = im.pack(w, scales, zeros, paired=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).cuda()
    got = im.int4_mma(x, *paired, gate=True)
    want = im.int4_mma_reference(x, *paired, gate=True)
    assert got.shape == (m, n // 2)
    assert torch.allclose(got.float(), want.float(), rtol=2**-6, atol=1e-3)


# --- the norm's statistics: o gives ffn_norm's input and tile sums of squares, gate|up takes them -----

def _stats_pair(m: int, device: str = "cpu", seed: int = 10):
    """A producer [256 -> 256] with a residual and the next norm's weight, a consumer [256 -> 48] packed,
    and m rows of x."""
    g = torch.Generator().manual_seed(seed)
    first, second = _int4(256, 256, seed=seed), _int4(256, 48, seed=seed + 1)
    x = (torch.randn(m, 256, generator=g) * 2).to(torch.bfloat16).to(device)
    residual = torch.randn(m, 256, generator=g).to(torch.bfloat16).to(device)
    norm_weight = (torch.rand(256, generator=g) + 0.5).to(torch.bfloat16).to(device)
    return ([t.to(device) for t in first], [t.to(device) for t in second], x, residual, norm_weight)


@pytest.mark.parametrize("m", [1, 3])
def test_the_statistics_references_give_the_norm(m: int) -> None:
    """teal::int4_mma_stats (its CPU implementation): the product with the residual as int4_mma's, that
    times the norm's weight rounded once, and the squares' sums a 16-row tile (against float64); the
    consumer's op with those sums is model.RMSNorm then the product, within two bf16 roundings of the
    input (h * weight rounded, where the model rounds h / rms, then times the weight) and the output's."""
    from teal_kernels.ops import int4_mma_stats

    first, second, x, residual, norm_weight = _stats_pair(m)
    packed1, packed2 = im.pack(*first), im.pack(*second)
    scaled, sumsq = torch.empty(m, 256, dtype=torch.bfloat16), torch.empty(m, 16)
    out = int4_mma_stats(x, *packed1, residual, norm_weight, scaled, sumsq)
    assert torch.equal(out, int4_mma(x, *packed1, residual))
    assert torch.equal(scaled, (out.float() * norm_weight.float()).to(torch.bfloat16))
    exact_sums = out.double().square().view(m, 16, 16).sum(dim=2)
    assert sumsq.dtype == torch.float32 and torch.allclose(sumsq.double(), exact_sums, rtol=1e-6)
    got = int4_mma(scaled, *packed2, None, False, sumsq, 1e-5)
    normed = rms_normed(out, norm_weight, 1e-5)
    real = dequantize_weight(*second, 128).double()
    exact = normed.double() @ real
    bound = 2.0 ** -8 * exact.abs() + 2.0 ** -7 * (normed.double().abs() @ real.abs()) + 1e-30
    assert ((got.double() - exact).abs() <= bound).all()
    with pytest.raises(ValueError, match="sumsq must be float32"):
        im.int4_mma(scaled, *packed2, None, False, sumsq.double(), 1e-5)
    with pytest.raises(ValueError, match="norm statistics of an output"):
        im.int4_mma_with_stats(x, *packed1, residual, norm_weight[:128], scaled, sumsq)
    with pytest.raises(ValueError, match="statistics need the norm's weight"):
        im.int4_mma_with_stats(x, *packed1, residual, norm_weight.float(), scaled, sumsq)
    with pytest.raises(ValueError, match="norm statistics of an output"):
        im.int4_mma_with_stats(x, *packed1, residual, norm_weight, scaled, sumsq[:, :8])


@torch.no_grad()
def test_only_int4_mma_calls_give_and_take_statistics() -> None:
    """takes_norm_stats: a dense decode call of a layer with int4_mma's copy and the switch's flag (not a
    sparse call, not without the flag); norm_stats without its norm, or on a call int4_mma does not
    run, fails in one line; product_with_norm_stats is the layer's output with the residual."""
    from model import RMSNorm as Norm

    layer = _layer(splits=(128, 128))
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert layer.attach_int4pack(use_mma=True) and not layer.takes_norm_stats(x)
    layer.mma_norm_stats = True
    assert layer.takes_norm_stats(x) and layer.takes_norm_stats(x.expand(1, 5, 256))
    norm = Norm(256, 1e-5).to(torch.bfloat16)
    residual = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(12)).to(torch.bfloat16)
    h, scaled, sumsq = layer.product_with_norm_stats(x, residual, norm)
    assert torch.equal(h, layer(x, residual=residual)) and scaled.shape == h.shape and sumsq.shape == (1, 16)
    with pytest.raises(ValueError, match="norm_stats needs its norm"):
        layer(scaled, norm_stats=sumsq)
    layer.thresholds.fill_(0.8)
    layer.sparse = True
    assert not layer.takes_norm_stats(x)
    with pytest.raises(ValueError, match="norm_stats needs its norm"):
        layer(scaled, norm=norm, norm_stats=sumsq)


@pytest.mark.parametrize("gate, seqlen", [(False, 1), (True, 1), (False, 3)])
@torch.no_grad()
def test_the_decode_block_runs_no_ffn_norm_with_statistics(monkeypatch, gate: bool, seqlen: int) -> None:
    """decode.DecodeBlock with every layer on int4_mma and the statistics' flag: o gives ffn_norm's
    statistics (teal::int4_mma_stats runs once), gate|up takes them, and the block's output is the one
    without them within bf16 roundings (a decode step, and a 3-position verify step)."""
    from decode import DecodeBlock

    model = tiny_model(seed=3, dim=128, intermediate_size=8192 if gate else 256, n_layer=1).to(torch.bfloat16)
    quantize_model(model, "int4", 128)
    pack_model(model)
    model.setup_caches(1, 16)
    x = torch.randn(1, seqlen, 128, generator=torch.Generator().manual_seed(13)).to(torch.bfloat16)
    pos = torch.arange(4, 4 + seqlen)
    outs, calls = [], []
    real = linear.int4_mma_stats
    monkeypatch.setattr(linear, "int4_mma_stats", lambda *args: calls.append(args[0].shape) or real(*args))
    for stats in (False, True):
        for name, m in packed_projections(model).items():
            m.int4mma_words = None
            assert m.attach_int4pack(use_mma=True, gate_epilogue=gate and name.endswith("w13"))
            m.mma_norm_stats = stats
        block = DecodeBlock(model.layers[0])
        outs.append(block(x, model.freqs_cis[pos], None, pos))
        assert len(calls) == stats  # o gave them once, in the second block only
    assert calls == [(seqlen, 128)]
    assert torch.allclose(outs[0].float(), outs[1].float(), rtol=2**-6, atol=2e-2)


@torch.no_grad()
def test_a_sparse_down_gives_the_next_blocks_q_k_v_its_statistics(monkeypatch) -> None:
    """TEAL_SPARSE_NORM_STATS (sparse_norm_stats): a sparse down call gives the next block's attention norm
    through teal::sparse_gemv_stats (once, the first block's), the next q|k|v on int4_mma takes them, and
    the second block's output is the one with the norm in torch within bf16 roundings. Only a sparse call
    of bf16 rows with the flag gives them."""
    from decode import DecodeBlock

    model = tiny_model(seed=4, dim=128, intermediate_size=256, n_layer=2).to(torch.bfloat16)
    quantize_model(model, "int4", 128)
    pack_model(model)
    model.setup_caches(1, 16)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(14)).to(torch.bfloat16)
    pos = torch.tensor([4])
    calls = []
    real = linear.sparse_gemv_stats
    monkeypatch.setattr(linear, "sparse_gemv_stats", lambda *args: calls.append(args[0].shape) or real(*args))
    outs = []
    for stats in (False, True):
        for name, m in packed_projections(model).items():
            m.int4mma_words = None
            assert m.attach_int4pack(use_mma=True)
            m.mma_norm_stats = True
            m.sparse_norm_stats = stats
        downs = [layer.feed_forward.w2 for layer in model.layers]
        for down in downs:
            down.thresholds.fill_(0.01)
            down.sparse = True
        assert downs[0].gives_norm_stats(x) == stats and not downs[0].gives_norm_stats(x.float())
        blocks = [DecodeBlock(layer) for layer in model.layers]
        blocks[1].link_statistics(blocks[0])
        assert blocks[1].takes_statistics(x) == stats
        h = x
        for block in blocks:
            h = block(h, model.freqs_cis[pos], None, pos)
        outs.append(h)
        assert len(calls) == stats  # the first block's down, in the second pass only
    assert calls == [(1, 512)]  # gate|up's output: SiLU(gate) * up in the kernel's prologue
    assert torch.allclose(outs[0].float(), outs[1].float(), rtol=2**-6, atol=2e-2)


@needs_gluon
@pytest.mark.parametrize("k, n", [(2048, 4096), (1408, 2048), (4096, 576 + 16 * 4)])
def test_the_kernels_statistics_are_the_references_alone_and_among_rows(k: int, n: int) -> None:
    """STATS on the GPU: the product exactly as without it, out * weight exactly the reference's, the
    tile sums within float32 rounding; PRENORMED (the next projection, K = n) within the product's
    tolerance of the reference; and a row's three outputs and its normed product have the same bits
    alone as among 2-8 rows (self-speculation's verify)."""
    w, scales, zeros = (t.cuda() for t in _int4(k, n, seed=k))
    w2, scales2, zeros2 = (t.cuda() for t in _int4(n, 256, seed=n))
    first, second = im.pack(w, scales, zeros), im.pack(w2, scales2, zeros2)
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(8, k, generator=g) * 2).to(torch.bfloat16).cuda()
    residual = torch.randn(8, n, generator=g).to(torch.bfloat16).cuda()
    norm_weight = (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16).cuda()

    def run(rows: slice) -> tuple[torch.Tensor, ...]:
        m = len(range(8)[rows])
        scaled = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        sumsq = torch.empty(m, n // 16, device="cuda")
        out = im.int4_mma_with_stats(x[rows], *first, residual[rows], norm_weight, scaled, sumsq)
        return out, scaled, sumsq, im.int4_mma(scaled, *second, None, False, sumsq, 1e-5)

    for m in (1, 2, 5, 8):
        out, scaled, sumsq, normed_product = run(slice(0, m))
        assert torch.equal(out, im.int4_mma(x[:m], *first, residual[:m]))
        assert torch.equal(scaled, (out.float() * norm_weight.float()).to(torch.bfloat16))
        assert torch.allclose(sumsq.double(), out.double().square().view(m, -1, 16).sum(dim=2), rtol=1e-5)
        want = im.int4_mma_reference(scaled, *second, None, False, sumsq, 1e-5)
        assert torch.allclose(normed_product.float(), want.float(), rtol=2**-7, atol=2e-3)
        if m > 1:
            for i in range(m):
                alone = run(slice(i, i + 1))
                for a, b in zip(alone, (out, scaled, sumsq, normed_product), strict=True):
                    assert torch.equal(a[0], b[i]), (k, n, m, i)


@needs_gluon
@torch.no_grad()
def test_a_compiled_decode_step_with_statistics_matches_one_without(monkeypatch) -> None:
    """A tiny int4-g128 model's compiled dense decode step with TEAL_INT4_MMA_NORM_STATS=1 and without:
    the same logits within bf16 roundings."""
    def logits(switch: str) -> torch.Tensor:
        monkeypatch.setenv(linear.INT4_MMA_NORM_STATS_ENV, switch)
        model, out = int4_fused_decode_logits(128, compiled=True)
        assert all(m.mma_norm_stats == (switch == "1") for m in packed_projections(model).values())
        return out

    with_stats, without = logits("1"), logits("0")
    assert (with_stats - without).norm() / without.norm() < 0.02


def _three_layers(gate: bool, stats: bool, head: str | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """A 3-layer int4-g128 model (its lm_head quantized as `head` says, an int4 one with its own int4_mma
    copy) on the fused path with int4_mma's copies and, with `stats`, the statistics' flag (made by
    hand: the switch attaches on CUDA only), after an 8-token prefill; and the prompt."""
    from decode import install_fused_decode

    model = tiny_model(seed=4, dim=128, intermediate_size=8192 if gate else 256, n_layer=3).to(torch.bfloat16)
    quantize_model(model, "int4", 128, head)
    install_fused_decode(model)
    for name, m in packed_projections(model).items():
        assert m.attach_int4pack(use_mma=True, gate_epilogue=gate and name.endswith("w13"))
        m.mma_norm_stats = stats
    if head == "int4":
        assert model.output.attach_int4pack(use_mma=True)
    if stats:
        install_fused_decode(model)  # now links the blocks
        assert model.layers[1]._previous is model.layers[0] and model.layers[0]._next is model.layers[1]
        assert not any("norm_scaled" in k or "_previous" in k for k in model.state_dict())
    model.setup_caches(1, 32)
    idx = torch.randint(model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    model(idx, torch.arange(8))
    return model, idx


@pytest.mark.parametrize("gate, seqlen, head", [(True, 1, None), (False, 3, None), (False, 1, "int4")])
@torch.no_grad()
def test_a_decode_step_runs_no_norm_before_a_projection_on_int4_mma(monkeypatch, gate: bool, seqlen: int,
                                                                     head: str | None) -> None:
    """With the statistics' switch o gives each block's ffn_norm, down the next block's attention norm
    (5 calls of teal::int4_mma_stats: 3 o, 2 down), no RMSNorm module runs but the first block's
    attention norm and the final one (an int4 head on its int4_mma copy takes the final norm's output as
    before), and the logits are those without it within bf16 roundings; prefill (8 positions) passes no
    statistics; the buffers are not counted as weights read."""
    calls, norms, real = [], [], linear.int4_mma_stats
    monkeypatch.setattr(linear, "int4_mma_stats", lambda *args: calls.append(args[0].shape) or real(*args))
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x, f=RMSNorm.forward: norms.append(x.shape) or f(self, x))
    from generate import weight_bytes_per_token

    out, bytes_read = [], []
    for stats in (False, True):
        model, idx = _three_layers(gate, stats, head)
        bytes_read.append(weight_bytes_per_token(model))
        calls.clear()
        norms.clear()
        out.append(model(idx[:, :seqlen], torch.arange(8, 8 + seqlen)).double())
        assert (len(calls), len(norms)) == ((5, 2) if stats else (0, 7))  # without: 2 a block and the final one
    assert (out[1] - out[0]).norm() / out[0].norm() < 0.02
    assert bytes_read[0] == bytes_read[1]


@torch.no_grad()
def test_a_compiled_step_writes_the_next_blocks_statistics_in_place() -> None:
    """The linked blocks through torch.compile(fullgraph=True) (aot_eager, as bench_decode compiles on
    the CPU's stand-in): the same logits as eagerly, step after step (the buffers written each step)."""
    model, idx = _three_layers(gate=False, stats=True)
    eager = [model(idx[:, i:i + 1], torch.tensor([8 + i])) for i in range(2)]
    torch._dynamo.reset()
    step = torch.compile(lambda tok, pos: model(tok, pos), backend="aot_eager", fullgraph=True)
    for i in range(2):
        assert torch.equal(step(idx[:, i:i + 1], torch.tensor([8 + i])), eager[i])
