"""teal_kernels/tinygemm.py and PackedLinear's tinygemm copy (TEAL_INT4_TINYGEMM): dense int4 decode
calls through torch's int4pack GEMM. On the CPU torch's `_for_cpu` twins run the same math, so the
packing and the dispatch are tested here; the CUDA op's own layout is tested where a GPU is.

Reference: float64 products of the weights our int4 format defines (teal_kernels/reference.py),
with the scales and zeros rounded to bf16 as tinygemm stores them (the one approximation of the
copy). Tolerance: the bf16 rounding of the output, plus the bf16 products tinygemm's CUDA kernel
forms from the codes (two roundings a weight).
"""
from __future__ import annotations

import pytest
import torch
from fixtures import DEVICE, int4_fused_decode_logits, needs_cuda, tiny_model

import teal_kernels.speed_table as st
from linear import (INT4_BF16_SCALES_ENV, TINYGEMM_ENV, PackedLinear, attach_bf16_scales, attach_int4pack, pack_model,
                    packed_projections)
from model import RMSNorm
from quantize import quantize_model
from teal_kernels.reference import dequantize_weight, gated_input
from teal_kernels.tinygemm import int4pack, int4pack_fits, int4pack_mm

BF16_ROUNDING = 2.0 ** -8
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _int4(k: int, n: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (k, n // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(k // group, n, generator=g) * 0.02 + 0.001
    zeros = torch.randn(k // group, n, generator=g) * 0.01
    return w, scales, zeros


def _reference(x: torch.Tensor, w, scales, zeros, group: int) -> torch.Tensor:
    """float64 x @ W with W from the codes and bf16-rounded scales and zeros."""
    bf = [t.to(torch.bfloat16).float() for t in (scales, zeros)]
    return x.double() @ dequantize_weight(w, *bf, group).double()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w_abs: torch.Tensor, device: str) -> None:
    bound = BF16_ROUNDING * ref.abs() + 1e-6 * ref.abs().max()
    if device == "cuda":  # (q - 8) * scale + zero in bf16 on the GPU: two roundings a weight
        bound = bound + x.double().abs() @ (2 * BF16_ROUNDING * w_abs)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k, n, group", [(256, 96, 64), (128, 48, 32), (512, 64, 128)])
def test_the_copy_multiplies_like_the_format_it_copies(device: str, k: int, n: int, group: int) -> None:
    w, scales, zeros = _int4(k, n, group)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    packed, scales_and_zeros = int4pack(w.to(device), scales.to(device), zeros.to(device), group)
    assert scales_and_zeros.shape == (k // group, n, 2) and scales_and_zeros.dtype == torch.bfloat16
    out = int4pack_mm(x.to(device), packed, scales_and_zeros, group)
    assert out.shape == (3, n) and out.dtype == torch.bfloat16
    ref = _reference(x, w, scales, zeros, group)
    _assert_close(out.cpu(), ref, x, dequantize_weight(w, scales, zeros, group).double().abs(), device)


def test_the_copy_keeps_every_code_and_column_in_place() -> None:
    """Unit scales and zero offsets: each output is x . (q - 8) exactly (small integers), so a code
    moved to another row or column, or a nibble swapped, shows."""
    k, n, group = 64, 16, 32
    w, _, _ = _int4(k, n, group, seed=4)
    ones, offsets = torch.ones(k // group, n), torch.zeros(k // group, n)
    eye = torch.eye(k, dtype=torch.bfloat16)  # row i of the product is weight row i
    out = int4pack_mm(eye, *int4pack(w, ones, offsets, group), group)
    assert torch.equal(out.double(), dequantize_weight(w, ones, offsets, group).double())


def test_shapes_tinygemm_does_not_take_are_refused() -> None:
    assert int4pack_fits(4096, 14336, 128, torch.bfloat16)
    assert not int4pack_fits(4096, 14336, 128, torch.float16)  # bf16 activations only
    assert not int4pack_fits(48, 64, 16, torch.bfloat16) and not int4pack_fits(576, 64, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="K % 32 == 0"):
        int4pack(*_int4(48, 64, 16), 16)
    with pytest.raises(ValueError, match="N % 8 == 0"):
        int4pack(torch.zeros(64, 6, dtype=torch.uint8), torch.ones(2, 12), torch.zeros(2, 12), 32)


def _int4_layer(k: int = 128, splits: tuple[int, ...] = (32, 16), group: int = 32) -> PackedLinear:
    layer = PackedLinear(k, sum(splits), list(splits), "int4", group)
    layer.weight, layer.scales, layer.zeros = _int4(k, sum(splits), group, seed=2)
    return layer


@torch.no_grad()
def test_dense_decode_calls_take_the_copy_and_sparse_ones_do_not() -> None:
    layer = _int4_layer()
    assert layer.attach_int4pack()
    assert "int4pack_weight" not in layer.state_dict()  # a derived copy, never saved
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    rows = x.view(2, 128)
    want = int4pack_mm(rows, layer.int4pack_weight, layer.int4pack_scales_zeros, 32)
    assert torch.equal(layer(x).view(2, -1), want)
    # the fusions, left to torch: SiLU(gate) * up in, the norm before, the residual after
    gate_up = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    residual = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    gated = int4pack_mm(gated_input(gate_up.view(1, 256)), layer.int4pack_weight, layer.int4pack_scales_zeros, 32)
    assert torch.equal(layer(gate_up, gated=True, residual=residual).view(1, -1), gated + residual.view(1, -1))
    norm = RMSNorm(128, 1e-5).to(torch.bfloat16)
    assert torch.equal(layer(x, norm=norm), layer(norm(x)))
    # TEAL's sparse calls keep our kernel and its layout: the same output as a layer without the copy
    plain = _int4_layer()
    for m in (layer, plain):
        m.thresholds.fill_(0.8)
        m.sparse = True
    assert torch.equal(layer(x), plain(x))
    assert not torch.equal(layer(x), want.view(2, 1, -1))  # sparsity did change the product


def test_shapes_without_the_copy_stay_on_our_kernel() -> None:
    layer = _int4_layer(k=48, splits=(16,), group=16)
    assert not layer.attach_int4pack() and layer.int4pack_weight is None
    assert not PackedLinear(64, 32, [32], dtype=torch.bfloat16).attach_int4pack()  # float weights: none


def test_the_switch_attaches_on_cuda_only_and_by_default(monkeypatch) -> None:
    model = tiny_model(seed=1).to(torch.bfloat16)
    quantize_model(model, "int4", 32)
    pack_model(model)
    monkeypatch.setenv(TINYGEMM_ENV, "0")
    assert attach_int4pack(model.to(DEVICE)) == []
    monkeypatch.delenv(TINYGEMM_ENV, raising=False)  # on by default
    expected = list(packed_projections(model)) if DEVICE == "cuda" else []
    assert attach_int4pack(model) == expected
    monkeypatch.setenv(TINYGEMM_ENV, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        attach_int4pack(model)


@torch.no_grad()
def test_packed_scales_hold_the_rounded_values_for_every_call() -> None:
    """attach_bf16_scales (TEAL_INT4_BF16_SCALES): the layer's calls read its scales and zeros as packed
    bf16 pairs, never saved, and multiply exactly what a layer whose float32 scales and zeros were
    rounded to bf16 multiplies: dense and sparse decode rows (the op) and a prefill (the reference)."""
    layer, rounded = _int4_layer(), _int4_layer()
    rounded.scales, rounded.zeros = (t.to(torch.bfloat16).float() for t in (rounded.scales, rounded.zeros))
    assert layer.attach_bf16_scales()
    assert "kernel_scales" not in layer.state_dict() and layer.kernel_scales is layer.kernel_zeros
    assert layer.kernel_scales.dtype == torch.int32
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)
    prefill = torch.randn(1, 24, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(DEVICE)
    layer, rounded = layer.to(DEVICE), rounded.to(DEVICE)
    plain = _int4_layer().to(DEVICE)
    for sparse in (False, True):
        for m in (layer, rounded, plain):
            m.thresholds.fill_(0.8 if sparse else 0.0)
            m.sparse = sparse
        assert torch.equal(layer(x), rounded(x))
        assert torch.equal(layer(prefill), rounded(prefill))
    assert not torch.equal(layer(x), plain(x))  # the rounding did change the product
    assert not PackedLinear(64, 32, [32], dtype=torch.bfloat16).attach_bf16_scales()  # float weights: none


def test_the_packed_scales_switch_is_on_by_default_and_cuda_only(monkeypatch) -> None:
    model = tiny_model(seed=1).to(torch.bfloat16)
    quantize_model(model, "int4", 32)
    pack_model(model)
    model = model.to(DEVICE)
    monkeypatch.setenv(INT4_BF16_SCALES_ENV, "0")
    assert attach_bf16_scales(model) == []
    monkeypatch.delenv(INT4_BF16_SCALES_ENV, raising=False)
    assert attach_bf16_scales(model) == (list(packed_projections(model)) if DEVICE == "cuda" else [])


def test_the_speed_table_compares_the_sparse_kernel_with_tinygemm(monkeypatch) -> None:
    """With the copy, a layer's dense path is tinygemm, so TEAL pays only where the kernel at the
    layer's sparsity beats tinygemm's time; an entry without that time is unmeasured."""
    key = st.table_key("Fake GPU", "int4-g32", 1, 128, 48)
    entry = {"dense_us": 12.0, "tinygemm_us": 7.0, "sparse_us": {"0": 12.0, "0.5": 9.0}}
    monkeypatch.setattr(st, "speed_table", lambda: {key: entry})
    assert st.sparse_beats_dense("Fake GPU", "int4-g32", 1, 128, 48, 0.5) is True
    assert st.sparse_beats_dense("Fake GPU", "int4-g32", 1, 128, 48, 0.5, "tinygemm_us") is False
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    layer = _int4_layer()
    layer.set_target_sparsity([0.5, 0.5])
    cuda = torch.device("cuda")
    assert layer.kernel_verdict(cuda) == (True, "Fake GPU")
    layer.attach_int4pack()
    assert layer.kernel_verdict(cuda) == (False, "Fake GPU")
    del entry["tinygemm_us"]
    assert st.sparse_beats_dense("Fake GPU", "int4-g32", 1, 128, 48, 0.5, "tinygemm_us") is None


@needs_cuda
@torch.no_grad()
def test_a_decode_step_with_the_copy_stays_close_to_our_kernel(monkeypatch) -> None:
    """A tiny int4 model's dense decode logits, through tinygemm and through our kernel: the copy's
    bf16 scales move them by about the quantization's own rounding, not more."""

    def logits(switch: str) -> torch.Tensor:
        monkeypatch.setenv(TINYGEMM_ENV, switch)
        model, out = int4_fused_decode_logits(32)
        assert all((m.int4pack_weight is not None) == (switch == "1") for m in packed_projections(model).values())
        return out

    ours, tiny = logits("0"), logits("1")
    assert (tiny - ours).norm() / ours.norm() < 0.02


@torch.no_grad()
def test_a_compiled_fused_decode_step_takes_the_copy() -> None:
    """The fused decode step of a tiny int4 model with the copies attached (by hand: the switch
    attaches on CUDA only), compiled in one graph as bench_decode and generate.py compile it: the
    same logits as eagerly, and different from the model without the copies (the copy ran)."""
    from decode import install_fused_decode

    def fused_model(copies: bool) -> torch.nn.Module:
        model = tiny_model(seed=1).to(torch.bfloat16)
        quantize_model(model, "int4", 32)
        model = install_fused_decode(model)
        if copies:
            assert all(m.attach_int4pack() for m in packed_projections(model).values())
        model.setup_caches(1, 16)
        return model

    idx = torch.randint(272, (1, 6), generator=torch.Generator().manual_seed(0))
    token, pos = idx[:, -1:], torch.tensor([6])

    def step(model: torch.nn.Module) -> torch.Tensor:
        return model(token, pos)

    outs = []
    for copies in (True, False):
        model = fused_model(copies)
        model(idx, torch.arange(6))
        eager = step(model)
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(model)
        assert torch.equal(compiled, eager)
        outs.append(eager)
    assert not torch.equal(outs[0], outs[1])
    assert (outs[0].double() - outs[1].double()).norm() / outs[1].double().norm() < 0.05


def test_the_copy_is_not_counted_as_bytes_read() -> None:
    """generate.weight_bytes_per_token (the GB/s columns): a layer reads either its weights or the
    copy, so attaching the copies leaves the count as it was."""
    from generate import weight_bytes_per_token
    model = tiny_model(seed=1).to(torch.bfloat16)
    quantize_model(model, "int4", 32)
    pack_model(model)
    before = weight_bytes_per_token(model)
    assert all(m.attach_int4pack() for m in packed_projections(model).values())
    assert weight_bytes_per_token(model) == before
