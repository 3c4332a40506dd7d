"""Weight-only quantization: error bounds, the int4 byte layout, checkpoint round trips, bad inputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

import fixtures

from checkpoint import CheckpointError, load_model
from teal_kernels import dequantize_weight
from teal_kernels.reference import INT4_GROUP_SIZES as GROUP_SIZES
from linear import QUANT_METADATA_KEY as METADATA_KEY
from linear import PackedLinear, QuantConfig, QuantizationError, pack_model, packed_projections
from model import Transformer
from quantize import pack_int4, quantize_int4, quantize_int8, quantize_model, save_quantized
from teal import sparsify

REPO = fixtures.ROOT
# K is 64 for q|k|v, o, gate|up and lm_head and 96 for down: group size 32 fits, 64 does not.
QUANT_TINY = dict(intermediate_size=96, block_size=32)


def tiny_model(tie: bool = True, seed: int = 0) -> Transformer:
    return fixtures.tiny_model(seed, tie_embeddings=tie, **QUANT_TINY)


def tiny_checkpoint(folder: Path, tie: bool = True) -> Path:
    return fixtures.tiny_checkpoint(folder, tie_embeddings=tie, **QUANT_TINY)


@torch.no_grad()
def logits(model: Transformer, ids: Tensor) -> Tensor:
    model.setup_caches(1, ids.shape[1])
    return model(ids, torch.arange(ids.shape[1]))


IDS = torch.randint(0, fixtures.TINY["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------

def test_int8_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(96, 40) * torch.rand(40) * 3  # channels of different ranges
    w[:, 0] = 0  # an all-zero channel must not divide by zero
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (40,)
    assert q[:, 1:].abs().amax(dim=0).eq(127).all()  # the full range is used
    err = (dequantize_weight(q, scales, None, 0) - w).abs()
    assert (err <= scales / 2 + 1e-6 * w.abs()).all()
    assert err[:, 0].eq(0).all()


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_error_is_at_most_half_a_step_of_its_group(group_size):
    torch.manual_seed(0)
    k, n = 256, 48
    w = torch.randn(k, n) * torch.rand(n) + torch.linspace(-2, 2, n)  # asymmetric ranges
    w[:group_size, 1] = 0.5  # a constant group
    packed, scales, zeros = quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (k, n // 2)
    assert scales.shape == zeros.shape == (k // group_size, n) and scales.dtype == zeros.dtype == torch.float32
    err = (dequantize_weight(packed, scales, zeros, group_size) - w).abs()
    assert (err <= scales.repeat_interleave(group_size, 0) / 2 + 1e-6 * (1 + w.abs())).all()
    assert err[:group_size, 1].max() < 1e-6


def test_pack_int4_nibble_order():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x43], [0x0F, 0xF0]]


def test_int4_bytes_decode_independently_to_the_weights():
    """Decode the bytes with plain Python ints and float64, following the documented layout."""
    torch.manual_seed(0)
    k, n, g = 64, 6, 32
    w = torch.randn(k, n, dtype=torch.float64)
    packed, scales, zeros = quantize_int4(w, g)
    s, z = scales.double().tolist(), zeros.double().tolist()
    ref = torch.zeros(k, n, dtype=torch.float64)
    for row, data in enumerate(packed.tolist()):
        for j, byte in enumerate(data):
            for col, q in ((2 * j, byte & 0xF), (2 * j + 1, byte >> 4)):
                ref[row, col] = (q - 8) * s[row // g][col] + z[row // g][col]
    assert ((ref - w).abs() <= scales.double().repeat_interleave(g, 0) / 2 + 1e-6).all()
    torch.testing.assert_close(dequantize_weight(packed, scales, zeros, g).double(), ref, rtol=0, atol=1e-6)


def test_int4_rejects_k_not_divisible_by_group():
    with pytest.raises(QuantizationError, match="divisible"):
        quantize_int4(torch.randn(96, 8), 64)


# ---------------------------------------------------------------------------------------------
# Models and checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, group_size, tie, head", [("int8", 0, False, True), ("int4", 32, False, True),
                                                         ("int4", 32, True, True), ("int4", 32, True, "int4")])
def test_quantized_logits_match_float64_with_dequantized_weights(mode, group_size, tie, head):
    """The projections in `mode`, lm_head in int8 (True) or in their int4 format ("int4"; a tied head
    too: its own copy, the embedding table untouched)."""
    model, ref = tiny_model(tie=tie), tiny_model(tie=False)
    ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # same weights, untied
    embedding = model.tok_embeddings.weight.detach().clone()
    quantize_model(model, mode, group_size, lm_head=head)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert set(quantized) == set(packed_projections(model)) | {"output"}
    head_format = ("int4", group_size) if head == "int4" else ("int8", 0)
    assert (model.output.fmt, model.output.group_size) == head_format
    for name, layer in quantized.items():
        assert layer.fmt == (head_format[0] if name == "output" else mode) and layer.weight.is_contiguous()
        ref.get_submodule(name).weight.data = layer.dense_weight_t(torch.float32).t()
    assert torch.equal(model.tok_embeddings.weight, embedding)
    got = logits(model, IDS)
    want = logits(ref.double(), IDS)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode, group_size, tie, lm_head",
                         [("int8", 0, True, False), ("int4", 32, True, False), ("int4", 32, False, "int8"),
                          ("int4", 32, True, "int8"), ("int4", 32, True, "int4")])
def test_saved_checkpoint_loads_to_identical_logits(tmp_path, mode, group_size, tie, lm_head):
    folder = tiny_checkpoint(tmp_path, tie)
    model = load_model(folder, "cpu", torch.float32)
    cfg = quantize_model(model, mode, group_size, lm_head)
    path = folder / f"model_{cfg.label}.safetensors"
    save_quantized(model, cfg, path)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == {"mode": mode, "group_size": group_size,
                                                          "lm_head": lm_head}
    loaded = load_model(path, "cpu", torch.float32)
    assert {n: (m.fmt, m.group_size) for n, m in packed_projections(loaded).items()} == \
           {n: (m.fmt, m.group_size) for n, m in packed_projections(model).items()}
    assert all(m.scales.dtype == torch.float32 for m in packed_projections(loaded).values())
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == (tie and not lm_head)
    assert isinstance(loaded.output, PackedLinear) == bool(lm_head)
    if lm_head:
        assert loaded.output.fmt == lm_head and loaded.output.group_size == (group_size if lm_head == "int4" else 0)
    assert torch.equal(logits(model, IDS), logits(loaded, IDS))


def test_heads_recorded_before_int8_heads_load_in_the_recorded_mode():
    """Files written before 2026-12-02 record lm_head: true for a head in the projections' mode."""
    assert QuantConfig("int4", 32, True).head_format == ("int4", 32)
    assert QuantConfig("int4", 32, "int8").head_format == ("int8", 0)
    assert QuantConfig("int8", 0, False).head_format is None
    with pytest.raises(QuantizationError, match="lm_head"):
        QuantConfig("int8", 0, "int4")


def test_teal_state_survives_quantization():
    model = pack_model(tiny_model())
    layer = model.layers[0].attention.wqkv
    layer.thresholds.fill_(0.25)
    layer.sparse = True
    quantize_model(model, "int8", 0)
    quantized = model.layers[0].attention.wqkv
    assert quantized.fmt == "int8" and quantized.sparse and quantized.thresholds.eq(0.25).all()


def test_model_errors_leave_the_model_untouched():
    model = tiny_model()
    with pytest.raises(QuantizationError, match=r"K=96 .* fit this model: \[32\]"):
        quantize_model(model, "int4", 64)
    assert not packed_projections(model)
    quantize_model(model, "int4", 32)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_model(model, "int8", 0)


@pytest.mark.parametrize("record", ['{"mode": "int3", "group_size": 0, "lm_head": false}',
                                    '{"mode": "int4", "group_size": 64, "lm_head": false}', "nonsense"])
def test_bad_quantization_metadata_is_a_checkpoint_error(tmp_path, record):
    folder = tiny_checkpoint(tmp_path)
    path = folder / "model_bad.safetensors"
    save_file(load_file(str(folder / "model.safetensors")), str(path), metadata={METADATA_KEY: record})
    with pytest.raises(CheckpointError):
        load_model(path, "cpu", torch.float32)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "quantize.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_writes_default_name_and_loads(tmp_path):
    folder = tiny_checkpoint(tmp_path)
    res = run_cli("--checkpoint_path", str(folder), "--mode", "int4", "--groupsize", "32")
    assert res.returncode == 0, res.stderr
    path = folder / "model_int4-g32.safetensors"
    model = load_model(path, "cpu", torch.float32)
    assert model.layers[1].feed_forward.w2.fmt == "int4"
    assert model.tok_embeddings.weight.dtype == torch.float32  # the stored dtype, not bf16


@pytest.mark.parametrize("flag, head", [(["--lm_head"], ("int8", 0)), (["--lm_head", "int8"], ("int8", 0)),
                                        (["--lm_head", "int4"], ("int4", 32))])
def test_cli_quantizes_the_head_as_asked(tmp_path, flag, head):
    """--lm_head alone or int8: an int8 head; int4: the head in the projections' int4 format."""
    folder = tiny_checkpoint(tmp_path)
    out = tmp_path / "q" / "model.safetensors"
    res = run_cli("--checkpoint_path", str(folder), "--mode", "int4", "--groupsize", "32", *flag, "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert f"lm_head in {head[0]}" in res.stdout
    model = load_model(out, "cpu", torch.float32)
    assert (model.output.fmt, model.output.group_size) == head


@pytest.mark.parametrize("args, message", [
    (["--mode", "int4", "--groupsize", "48"], "unsupported group size 48"),
    (["--mode", "int4", "--groupsize", "64"], "not divisible by group size 64"),
    (["--mode", "int3"], "invalid choice"),
    (["--mode", "int8", "--lm_head", "int4"], "an int4 lm_head takes the projections' int4 format"),
    (["--mode", "int8", "--output", "{folder}/model.safetensors"], "overwrite"),
    (["--mode", "int8", "--checkpoint_path", "{folder}/model_int4-g32.safetensors"], "already quantized (int4-g32)"),
    (["--checkpoint_path", "{folder}/missing"], "checkpoint not found"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    folder = tiny_checkpoint(tmp_path)
    model = tiny_model()
    save_quantized(model, quantize_model(model, "int4", 32), folder / "model_int4-g32.safetensors")
    before = sorted(p.name for p in folder.iterdir())
    args = [a.format(folder=folder) for a in args]
    if "--checkpoint_path" not in args:
        args += ["--checkpoint_path", str(folder)]
    res = run_cli(*args)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("mode, group_size", [("int8", 0), ("int4", 32)])
def test_quantized_checkpoint_serves_sparse_decode_in_bf16(tmp_path, mode, group_size):
    """The serving setup: quantized file loaded in bf16 (on the GPU when there is one), TEAL on,
    dense prefill then one sparse decode step, against the float32 in-memory model on the CPU."""
    folder = tiny_checkpoint(tmp_path)
    ref = load_model(folder, "cpu", torch.float32)
    save_quantized(ref, quantize_model(ref, mode, group_size), folder / "q.safetensors")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(folder / "q.safetensors", device, torch.bfloat16)
    thresholds = {name: [0.3] * len(m.split_sizes) for name, m in packed_projections(ref).items()}
    n = IDS.shape[1] - 1
    outs = []
    for m, dev in ((ref, "cpu"), (model, device)):
        sparsify(m, thresholds)
        m.setup_caches(1, n + 1)
        with torch.no_grad():
            m(IDS[:, :n].to(dev), torch.arange(n, device=dev))
            outs.append(m(IDS[:, n:].to(dev), torch.tensor([n], device=dev)).float().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0.01 * outs[0].abs().max().item())


def test_bytes_per_token_count_a_quantized_tied_head_once():
    """generate.py's GB/s: the tied float head is the embedding table read in full; once the head
    is quantized, its int8 copy is read instead and the table is not."""
    from generate import weight_bytes_per_token
    model = tiny_model(tie=True)
    embed = model.tok_embeddings.weight
    before = weight_bytes_per_token(model)
    linears = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2 and p is not embed)
    assert before == linears + embed.numel() * embed.element_size()  # the tied head reads the table
    quantize_model(model, "int8", 0, lm_head=True)
    head = model.output
    head_bytes = head.weight.numel() * head.weight.element_size()  # int8 scales are 1-D: not counted
    proj = sum(m.weight.numel() * m.weight.element_size() for m in packed_projections(model).values())
    assert weight_bytes_per_token(model) == proj + head_bytes
    assert weight_bytes_per_token(model) < before
