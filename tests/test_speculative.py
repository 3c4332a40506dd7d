"""Self-speculative decoding (generate.speculative_generate): the same output as plain decoding,
the same KV cache, and the target's distribution when sampling."""
from __future__ import annotations

import pytest
import torch

from fixtures import tiny_model
from generate import Sampling, accept, generate, probabilities, speculative_generate
from linear import packed_projections
from teal import densify, sparsify
from teal.sparsify import TealState, thresholds_from_vector

GREEDY = Sampling(temperature=0.0)
PROMPT = [5, 17, 99, 3, 42, 8]


def sparse_setting(model, quantile: float, seed: int = 0) -> dict:
    """Thresholds at the `quantile` of |x| ~ N(0, 1) entries, jittered per segment: a draft that
    disagrees with the dense model often enough to exercise rejections."""
    from linear import pack_model, segments
    pack_model(model)
    g = torch.Generator().manual_seed(seed)
    base = torch.distributions.Normal(0, 1).icdf(torch.tensor(0.5 + quantile / 2)).item()
    values = base * (0.5 + torch.rand(len(segments(model)), generator=g))
    return thresholds_from_vector(model, values)


def states(model, draft_quantile: float, target_quantile: float | None):
    sparsify(model, sparse_setting(model, draft_quantile, seed=1))
    draft = TealState.of(model)
    if target_quantile is None:
        densify(model)
    else:
        sparsify(model, sparse_setting(model, target_quantile, seed=2), sparse_prefill=True)
    return draft, TealState.of(model)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_quantile,target_quantile", [(0.5, None), (0.8, None), (0.8, 0.3)],
                         ids=["draft50-dense", "draft80-dense", "draft80-target30"])
def test_greedy_output_equals_plain_decoding(k, draft_quantile, target_quantile):
    model = tiny_model()
    draft, target = states(model, draft_quantile, target_quantile)
    target.restore()
    plain = generate(model, PROMPT, 40, GREEDY).tokens
    spec, stats = speculative_generate(model, PROMPT, 40, GREEDY, k, draft, target)
    assert spec.tokens == plain
    assert stats.verifies > 0 and 0 <= stats.accepted <= stats.drafted == k * stats.verifies
    assert stats.accepted < stats.drafted  # the draft is wrong sometimes: rejections were exercised


def test_stops_at_eos_inside_a_cycle():
    model = tiny_model()
    draft, target = states(model, 0.3, None)
    target.restore()
    plain = generate(model, PROMPT, 40, GREEDY).tokens
    eos = plain[len(PROMPT) + 7]  # a token the target emits mid-stream
    want = generate(model, PROMPT, 40, GREEDY, eos_ids={eos}).tokens
    got, _ = speculative_generate(model, PROMPT, 40, GREEDY, 4, draft, target, eos_ids={eos})
    assert got.tokens == want and got.tokens[-1] == eos


def test_kv_cache_equals_plain_decoding():
    model = tiny_model()
    draft, target = states(model, 0.6, None)
    target.restore()
    plain = generate(model, PROMPT, 30, GREEDY).tokens
    filled = len(plain) - 1  # the last token is never run through the model
    caches = [(b.attention.kv_cache.k_cache[..., :filled, :].clone(), b.attention.kv_cache.v_cache[..., :filled, :].clone())
              for b in model.layers]
    speculative_generate(model, PROMPT, 30, GREEDY, 3, draft, target)
    for block, (k_plain, v_plain) in zip(model.layers, caches):
        torch.testing.assert_close(block.attention.kv_cache.k_cache[..., :filled, :], k_plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(block.attention.kv_cache.v_cache[..., :filled, :], v_plain, rtol=1e-5, atol=1e-5)


def test_states_switch_thresholds_in_place():
    model = tiny_model()
    draft, target = states(model, 0.5, 0.2)
    buffers = [m.thresholds.data_ptr() for m in packed_projections(model).values()]
    draft.restore()
    assert all(m.sparse and not m.sparse_prefill for m in packed_projections(model).values())
    target.restore()
    assert all(m.sparse and m.sparse_prefill for m in packed_projections(model).values())
    assert [m.thresholds.data_ptr() for m in packed_projections(model).values()] == buffers
    for m, thr, *_ in target.entries:
        assert torch.equal(m.thresholds, thr)


def test_rejection_sampling_keeps_the_target_distribution():
    """One draft per cycle over a 6-token vocabulary: the token a cycle emits first must follow the
    target's p whatever the draft's q (chi-square, 40000 cycles, fixed seed)."""
    torch.manual_seed(0)
    s = Sampling(temperature=1.0)
    target_logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]] * 2)  # [K + 1, V], K = 1
    draft_logits = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.5, -2.0]])
    p, q = probabilities(target_logits[0], s), probabilities(draft_logits, s)
    n = 40000
    drafts = torch.multinomial(q[0], n, replacement=True)
    counts = torch.zeros(6)
    for d in drafts:
        kept, nxt = accept(d.view(1), q, target_logits, s)
        counts[int(d) if kept else int(nxt)] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001
    assert (counts / n - q[0]).abs().max() > 0.05  # and the draft's own distribution is rejected


def test_sampled_speculation_runs_and_reports():
    model = tiny_model()
    draft, target = states(model, 0.5, None)
    torch.manual_seed(3)
    res, stats = speculative_generate(model, PROMPT, 20, Sampling(temperature=0.8, top_k=50), 3, draft, target)
    assert res.new_tokens == 20 and all(0 <= t < model.config.vocab_size for t in res.tokens)
    assert stats.as_dict()["tokens_per_verify"] >= 1.0


def test_k_must_be_positive():
    model = tiny_model()
    draft, target = states(model, 0.5, None)
    with pytest.raises(ValueError, match="k >= 1"):
        speculative_generate(model, PROMPT, 5, GREEDY, 0, draft, target)


def test_cli_speculative_text_equals_plain_text(tiny_ckpt, tmp_path):
    """generate.py --speculate_k on a calibrated tiny checkpoint: the dense greedy text, plus a
    speculation report."""
    import subprocess
    import sys

    import calibrate
    from fixtures import ROOT
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    thr = tmp_path / "thr.safetensors"
    calibrate.run(calibrate.parse_args(["--checkpoint_path", str(tiny_ckpt), "--text", str(text), "--tokens", "512",
                                        "--window_len", "64", "--correction_tokens", "64", "--greedy_tokens", "64",
                                        "--max_sparsity", "0.6", "--level_step", "0.3", "--output", str(thr),
                                        "--device", "cpu"]))
    common = [sys.executable, "generate.py", "--checkpoint_path", str(tiny_ckpt), "--prompt", "hello",
              "--max_new_tokens", "24", "--temperature", "0", "--dtype", "float32", "--device", "cpu",
              "--thresholds", str(thr)]
    outs = []
    for extra in ([], ["--speculate_k", "3", "--draft_sparsity", "0.6", "--allocation", "greedy"]):
        proc = subprocess.run(common + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[0].split("\n-- ")[0] == outs[1].split("\n-- ")[0].replace(
        "self-speculative: draft 0.60, K = 3, ", "")
    assert "-- speculation: " in outs[1] and "tokens per verify" in outs[1]
