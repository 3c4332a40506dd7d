"""benchmarks/baselines.py: gpt-fast's int8 / int4 weight-only modules on torch's kernels.

On the CPU the int4 module runs torch's `_for_cpu` ops; the tinygemm (CUDA) packing runs where a
GPU is, in the same tests. Tolerances: the module against a float64 product with the dequantized
weight it stores differs by its bf16 output roundings only; against the original weight, by the
quantization error too (half a step per weight, plus the shift of the grid from storing the
scales and zeros in bf16).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from benchmarks.baselines import (BASELINES, KERNELS, TorchInt4Linear, TorchInt8Linear, apply_torch_baseline,
                                  quantize_int4_groupwise)
from fixtures import needs_cuda, tiny_model
from linear import pack_model, projection_splits

DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
BF16_ROUNDING = 2.0 ** -8  # relative error of one round-to-nearest to bf16 (8 significant bits)
K, N = 256, 96  # K: a multiple of every group size and of tinygemm's 16 * inner_k_tiles


def _linear(device: str) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(K, N, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)


def _x(device: str, rows: int = 5) -> Tensor:
    return torch.randn(rows, K, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)


def _assert_within(out: Tensor, ref: Tensor, bound: Tensor) -> None:
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g} (max error {err.max().item():.3g})"


def _int4_dequantized(q: Tensor, scales_and_zeros: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """float64 (W [N, K], scale and zero per weight [N, K]) from q [N, K] and [K / g, N, 2]."""
    per_weight = scales_and_zeros.double().repeat_interleave(group_size, dim=0).transpose(0, 1)  # [N, K, 2]
    scale, zero = per_weight[..., 0], per_weight[..., 1]
    return (q.double() - 8) * scale + zero, scale, zero


@pytest.mark.parametrize("device", DEVICES)
def test_int8_matches_its_dequantized_weight_and_the_original(device: str) -> None:
    linear, x = _linear(device), _x(device)
    layer = TorchInt8Linear(linear)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (N, K) and layer.scales.shape == (N,)
    w_dq = layer.weight.double() * layer.scales.double()[:, None]
    out, ref = layer(x), x.double() @ w_dq.T
    # two bf16 roundings: F.linear's output, then the product with the scales
    _assert_within(out, ref, 2 * BF16_ROUNDING * ref.abs() + 1e-5 * ref.abs().max())
    # half a step per weight; a scale rounded down to bf16 clamps the row's largest |w| up to 127 * 2^-8 steps more
    step_err = ((0.5 + 127 * BF16_ROUNDING) * layer.scales.double()[:, None]).expand(N, K)
    w = linear.weight.double()
    assert ((w_dq - w).abs() <= step_err).all()
    ref_orig = x.double() @ w.T
    _assert_within(out, ref_orig, x.double().abs() @ step_err.T + 2 * BF16_ROUNDING * ref_orig.abs()
                   + 1e-5 * ref_orig.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matches_its_dequantized_weight_and_the_original(device: str, group_size: int) -> None:
    linear, x = _linear(device), _x(device)
    layer = TorchInt4Linear(linear, group_size)
    q, scales_and_zeros = quantize_int4_groupwise(linear.weight, group_size)
    assert layer.scales_and_zeros.shape == (K // group_size, N, 2)
    assert torch.equal(layer.scales_and_zeros, scales_and_zeros)
    assert q.min() >= 0 and q.max() <= 15
    w_dq, scale, zero = _int4_dequantized(q, scales_and_zeros, group_size)
    out, ref = layer(x), x.double() @ w_dq.T
    bound = BF16_ROUNDING * ref.abs() + 1e-5 * ref.abs().max()  # one bf16 rounding of the output
    if device == "cuda":  # tinygemm computes (q - 8) * scale + zero in bf16: two roundings per weight
        bound = bound + x.double().abs() @ (2 * BF16_ROUNDING * w_dq.abs()).T
    _assert_within(out, ref, bound)
    # half a step; the grid zero - 8 * scale .. zero + 7 * scale moved by the bf16 rounding of both
    step_err = 0.5 * scale + BF16_ROUNDING * (zero.abs() + 15 * scale)
    w = linear.weight.double()
    assert ((w_dq - w).abs() <= step_err).all()
    ref_orig = x.double() @ w.T
    _assert_within(out, ref_orig, x.double().abs() @ step_err.T + BF16_ROUNDING * ref_orig.abs()
                   + 1e-5 * ref_orig.abs().max())


def test_int4_batches_and_keeps_leading_dims() -> None:
    layer = TorchInt4Linear(_linear("cpu"), 64)
    x = _x("cpu", rows=6)
    assert torch.equal(layer(x.view(2, 3, K)), layer(x).view(2, 3, N))


def test_int4_refuses_a_group_size_that_does_not_divide_k() -> None:
    with pytest.raises(ValueError, match="K divisible by 128"):
        TorchInt4Linear(nn.Linear(96, 64, bias=False).to(torch.bfloat16), 128)


@pytest.mark.parametrize("kind, group_size", [("int8", 0), ("int4", 64), ("int4", 32)])
@pytest.mark.parametrize("tied", [False, True])
def test_apply_replaces_every_linear_as_gpt_fast_does(kind: str, group_size: int, tied: bool) -> None:
    """gpt-fast quantizes every nn.Linear, lm_head included; a tied head gets its own copy."""
    model = tiny_model(tie_embeddings=tied).to(torch.bfloat16)
    embedding = model.tok_embeddings.weight.clone()
    head_weight = model.output.weight.detach().clone()
    apply_torch_baseline(model, kind, group_size)
    cls = TorchInt8Linear if kind == "int8" else TorchInt4Linear
    replaced = {name for name, m in model.named_modules() if isinstance(m, cls)}
    assert replaced == {*projection_splits(model), "output"} and len(replaced) == 4 * model.config.n_layer + 1
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert type(model.tok_embeddings) is nn.Embedding and torch.equal(model.tok_embeddings.weight, embedding)
    x = torch.randn(3, model.config.dim, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ref = x.double() @ head_weight.double().T  # the head quantized from the (tied) float weight
    assert (model.output(x).double() - ref).norm() / ref.norm() < 0.1


@torch.no_grad()
@pytest.mark.parametrize("kind, group_size, max_rel_err", [("int8", 0, 0.02), ("int4", 64, 0.08), ("int4", 32, 0.08)])
def test_tiny_model_logits_stay_close(kind: str, group_size: int, max_rel_err: float) -> None:
    """Measured on this model: int8 0.5%, int4 2.5% (our own int4 formats: the same)."""
    idx = torch.randint(tiny_model().config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))

    def logits(model: nn.Module) -> Tensor:
        model.setup_caches(1, 32)
        return model(idx, torch.arange(idx.shape[1])).double()

    ref = logits(tiny_model().to(torch.bfloat16))
    out = logits(apply_torch_baseline(tiny_model().to(torch.bfloat16), kind, group_size))
    assert (out - ref).norm() / ref.norm() < max_rel_err


def test_compiles_without_graph_breaks() -> None:
    """bench_decode compiles the decode step with fullgraph=True: the op chosen in __init__ must trace."""
    x = _x("cpu", rows=1)
    for layer in (TorchInt8Linear(_linear("cpu")), TorchInt4Linear(_linear("cpu"), 128)):
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), layer(x))


def test_apply_refuses_a_packed_model_and_unknown_kinds() -> None:
    with pytest.raises(TypeError, match="plain nn.Linear"):
        apply_torch_baseline(pack_model(tiny_model()), "int8")
    with pytest.raises(ValueError, match="unknown baseline kind"):
        apply_torch_baseline(tiny_model(), "int2")


def test_every_bench_choice_names_a_kind() -> None:
    assert all(kind in KERNELS and (group_size > 0) == (kind == "int4") for kind, group_size in BASELINES.values())
