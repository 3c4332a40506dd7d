"""The core model against independent references: Hugging Face transformers' Llama, its own
full forward, known token ids, and the real SmolLM2 checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from checkpoint import convert_hf_checkpoint, hf_model_args, load_model
from model import ModelArgs, Transformer

TINY_HF = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama31_rope": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def make_hf_model(tmp_path: Path, **kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, **kw)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; perturb them so their weights are tested
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    return hf


@pytest.mark.parametrize("variant", list(TINY_HF))
def test_logits_match_transformers(tmp_path: Path, variant: str) -> None:
    hf = make_hf_model(tmp_path, **TINY_HF[variant])
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours", dtype=torch.float32)
    assert ours.config.tie_embeddings == hf.config.tie_word_embeddings
    idx = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    ours.setup_caches(2, 128)
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx, torch.arange(idx.shape[1]))
    assert (got - expected).abs().max().item() <= 1e-4


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(**{**dict(dim=64, n_layer=2, n_head=4, n_local_heads=2, intermediate_size=96,
                               vocab_size=128, block_size=64), **kw})
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


def test_kv_cache_decode_equals_full_forward() -> None:
    model = tiny_model()
    idx = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    model.setup_caches(1, 32)
    with torch.no_grad():
        full = model(idx, torch.arange(24))
        steps = [model(idx[:, :10], torch.arange(10))]
        for t in range(10, 24):
            steps.append(model(idx[:, t:t + 1], torch.tensor([t])))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_is_the_last_position_of_the_full_logits() -> None:
    """Prefill's `last_only` (generate.prefill): the same logits as the full forward's last row."""
    model = tiny_model()
    idx = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    model.setup_caches(2, 16)
    with torch.no_grad():
        full = model(idx, torch.arange(9))
        last = model(idx, torch.arange(9), last_only=True)
    assert last.shape == (2, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


def test_compiled_decode_matches_eager() -> None:
    from generate import Sampling, decode_one_token, generate
    model = tiny_model()
    prompt = [3, 17, 42, 9]
    eager = generate(model, prompt, 12, Sampling())
    compiled_step = torch.compile(decode_one_token, fullgraph=True)
    compiled = generate(model, prompt, 12, Sampling(), decode_fn=compiled_step)
    assert compiled.tokens == eager.tokens


def test_rope_scaling_changes_only_low_frequencies() -> None:
    from model import precompute_freqs_cis
    plain = precompute_freqs_cis(64, 64, 500000.0)
    scaled = precompute_freqs_cis(64, 64, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 32.0})
    # highest frequency (first pair) untouched, lowest slowed down by the factor
    torch.testing.assert_close(scaled[:, 0], plain[:, 0])
    angle = lambda f: torch.atan2(f[1, -1, 1], f[1, -1, 0]).item()
    assert math.isclose(angle(scaled), angle(plain) / 8, rel_tol=1e-4)


def test_config_table_and_hf_config() -> None:
    assert ModelArgs.from_name("llama-3-8b").n_local_heads == 8
    with pytest.raises(ValueError, match="unknown model name"):
        ModelArgs.from_name("llama-3-8b-instruct-typo")
    with pytest.raises(ValueError, match="unsupported architecture"):
        hf_model_args({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


# --- the real default model -------------------------------------------------------------------

def test_smollm2_tokenizer_ids(smollm2_tokenizer) -> None:
    ids = smollm2_tokenizer.encode("Hello world, the quick brown fox.")
    assert ids == [19556, 905, 28, 260, 2365, 6354, 16438, 30]
    assert smollm2_tokenizer.encode("2024") == [34, 32, 34, 36]  # digits split one by one


def test_smollm2_knows_paris(smollm2_fp32, smollm2_tokenizer) -> None:
    from generate import Sampling, generate
    prompt = smollm2_tokenizer.encode("The capital of France is")
    out = generate(smollm2_fp32, prompt, 8, Sampling())
    assert "Paris" in smollm2_tokenizer.decode(out.tokens[len(prompt):])


def test_smollm2_perplexity(smollm2_fp32, smollm2_tokenizer, eval_text) -> None:
    """First 8 windows of 512 tokens of wikitext2-eval (the BACKGROUND protocol, no BOS).
    Measured 2026-11-29: 35.89 on these 8 windows (the 64-window reference is 30.34)."""
    ids = torch.tensor(smollm2_tokenizer.encode(eval_text)[: 8 * 512]).view(8, 512)
    model = smollm2_fp32
    model.setup_caches(8, 512)
    with torch.no_grad():
        logits = model(ids, torch.arange(512))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    ppl = nll.exp().item()
    print(f"SmolLM2-135M perplexity, 8 windows: {ppl:.2f}")
    assert 15 < ppl < 45
