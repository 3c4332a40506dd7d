"""What the tests build themselves: a tiny random model, an offline tokenizer, a checkpoint folder.

Plain functions (pytest fixtures wrapping them are in conftest.py), so a test module can also call
them with its own overrides. Nothing here needs the downloaded model or the network.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from checkpoint import model_state_for_saving, save_checkpoint
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / "checkpoints" / "SmolLM2-135M-Instruct"
SHARED_DATA = ROOT.parent / "shared" / "data"
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
# torch.compile backends the ops are tested under (Inductor on the CPU needs a C++ compiler)
COMPILE_BACKENDS = ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    HAS_CUDA or not shutil.which("g++"), reason="CPU inductor needs g++"))]

# GQA (4 query heads on 2 KV heads), two layers; the vocabulary holds the 256 byte tokens of
# `write_byte_tokenizer` plus its special tokens.
TINY = dict(dim=64, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=128, vocab_size=272,
            block_size=128)
def random_int4(k: int, n: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random packed int4 codes [K, N/2] with positive scales and signed zeros [K/group_size, N], on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (k, n // 2), generator=g, dtype=torch.uint8)
    scales = torch.rand(k // group_size, n, generator=g) * 0.1 + 0.01
    zeros = torch.randn(k // group_size, n, generator=g) * 0.05
    return w.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)


@torch.no_grad()
def int4_fused_decode_logits(group_size: int, compiled: bool = False,
                             lm_head: str | None = None) -> tuple[Transformer, torch.Tensor]:
    """A tiny int4 model (seed 1, bf16; its head quantized as `lm_head` says) on CUDA with the fused decode
    path installed (so the decode switches in the environment are read now): the model and its float64
    logits for one decode step after an 8-token prefill, the step through torch.compile(fullgraph=True)
    if `compiled`."""
    from decode import install_fused_decode
    from quantize import quantize_model

    model = tiny_model(seed=1, dim=128, intermediate_size=256).to(torch.bfloat16)
    quantize_model(model, "int4", group_size, lm_head)
    model = install_fused_decode(model.cuda())
    model.setup_caches(1, 16)
    idx = torch.randint(model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).cuda()
    model(idx, torch.arange(8, device="cuda"))
    step = torch.compile(model, fullgraph=True) if compiled else model
    return model, step(idx[:, -1:], torch.tensor([8], device="cuda")).double()


def recorded_calls(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records the shape of each call's first argument and still
    calls the original; returns the record."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(args[0].shape) or real(*args, **kwargs))
    return calls


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A random tiny Transformer in eval mode (float32)."""
    torch.manual_seed(seed)
    return Transformer(tiny_args(**overrides)).eval()


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no merges (one token per byte, ids 0..255) and three special tokens,
    with a ChatML template; the files a converted checkpoint carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[2], "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE}))


def tiny_checkpoint(folder: Path, seed: int = 0, **overrides) -> Path:
    """A converted checkpoint folder of `tiny_model(seed, **overrides)` with the byte tokenizer."""
    model = tiny_model(seed, **overrides)
    save_checkpoint(folder, model.config, model_state_for_saving(model))
    write_byte_tokenizer(folder)
    return folder
