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
    speculation report; with the draft on decode.py's fused step (auto) and on model.py's
    (--decode_path reference)."""
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
    speculate = ["--speculate_k", "3", "--draft_sparsity", "0.6", "--allocation", "greedy"]
    for extra in ([], speculate, speculate + ["--decode_path", "reference"]):
        proc = subprocess.run(common + extra, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    for spec in outs[1:]:
        assert outs[0].split("\n-- ")[0] == spec.split("\n-- ")[0].replace("self-speculative: draft 0.60, K = 3, ", "")
        assert "-- speculation: " in spec and "tokens per verify" in spec


# --- a separate draft model (--draft_checkpoint_path) ---------------------------------------


def fresh_caches(model, tokens: list[int]):
    """The KV cache a model holds after plain decoding of `tokens` (one batched forward)."""
    model.setup_caches(1, model.max_seq_length)  # the shape speculation left
    model(torch.tensor([tokens]), torch.arange(len(tokens)))
    return [(b.attention.kv_cache.k_cache.clone(), b.attention.kv_cache.v_cache.clone()) for b in model.layers]


@pytest.mark.parametrize("draft_seed,n_layer", [(0, 2), (7, 1)], ids=["same-weights", "other-model"])
def test_separate_draft_model_greedy_equals_plain_decoding(draft_seed, n_layer):
    """A second model drafts with its own cache. The same weights in a copy: every draft is
    accepted, so each cycle ends with a draft the copy never ran (caught up at the next cycle);
    another, smaller model: rejections. Either way the target's greedy tokens, and the draft's cache
    holds what plain decoding of those tokens leaves in it."""
    model = tiny_model()
    draft_model = tiny_model(draft_seed, n_layer=n_layer)
    plain = generate(model, PROMPT, 40, GREEDY).tokens
    draft, target = TealState.of(draft_model), TealState.of(model)
    for k in (1, 3, 4):
        spec, stats = speculative_generate(model, PROMPT, 40, GREEDY, k, draft, target, draft_model=draft_model)
        assert spec.tokens == plain
        if draft_seed == 0:
            assert stats.accepted >= 0.95 * stats.drafted
        else:
            assert stats.accepted < stats.drafted
        checked = len(PROMPT) + 24  # positions every cycle has run through the draft by now
        got = [(b.attention.kv_cache.k_cache[..., :checked, :].clone(), b.attention.kv_cache.v_cache[..., :checked, :].clone())
               for b in draft_model.layers]
        for (k_got, v_got), (k_ref, v_ref) in zip(got, fresh_caches(draft_model, spec.tokens[:checked])):
            torch.testing.assert_close(k_got, k_ref[..., :checked, :], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v_got, v_ref[..., :checked, :], rtol=1e-5, atol=1e-5)


def test_cli_draft_checkpoint_text_equals_plain_text(tmp_path):
    """generate.py --speculate_k --draft_checkpoint_path: the target's greedy text; a draft with
    another vocabulary, or --draft_sparsity beside a draft checkpoint, is refused in one line."""
    import subprocess
    import sys

    from fixtures import ROOT, tiny_checkpoint
    target = tiny_checkpoint(tmp_path / "target", block_size=128)
    small = tiny_checkpoint(tmp_path / "draft", seed=3, n_layer=1, block_size=128)
    other_vocab = tiny_checkpoint(tmp_path / "other", vocab_size=300, block_size=128)
    common = [sys.executable, "generate.py", "--checkpoint_path", str(target), "--prompt", "hello",
              "--max_new_tokens", "24", "--temperature", "0", "--dtype", "float32", "--device", "cpu"]

    def run(*extra):
        return subprocess.run(common + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=300)

    plain, spec = run(), run("--speculate_k", "3", "--draft_checkpoint_path", str(small))
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert plain.stdout.split("\n-- ")[0] == spec.stdout.split("\n-- ")[0].replace("draft draft, K = 3, ", "")
    assert "-- speculation: " in spec.stdout
    bad = run("--speculate_k", "3", "--draft_checkpoint_path", str(other_vocab))
    assert bad.returncode == 1 and bad.stderr.count("error:") == 1 and "vocabulary of 300 tokens" in bad.stderr
    both = run("--speculate_k", "3", "--draft_checkpoint_path", str(small), "--draft_sparsity", "0.5")
    assert both.returncode == 2 and "a --draft_checkpoint_path draft runs dense" in both.stderr
    alone = run("--draft_checkpoint_path", str(small))
    assert alone.returncode == 2 and "give K too" in alone.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 4])
def test_greedy_output_equals_plain_decoding_on_the_fused_step(k, dtype):
    """`--decode_path fused --speculate_k`: the draft's one-token steps take decode.py's fused
    blocks, and so does the verify step (K + 1 positions, the attention op once a position); the
    output is plain greedy's on the same (fused) model, in bf16 too."""
    from decode import install_fused_decode
    model = tiny_model().to(dtype)
    draft, target = states(model, 0.5, None)
    install_fused_decode(model)
    target.restore()
    plain = generate(model, PROMPT, 40, GREEDY).tokens
    spec, stats = speculative_generate(model, PROMPT, 40, GREEDY, k, draft, target)
    assert spec.tokens == plain
    assert 0 < stats.accepted < stats.drafted


def test_real_model_bf16_speculation_is_plain_greedy(smollm2_dir, smollm2_tokenizer):
    """SmolLM2 in bf16 on the fused path, CPU: 64 speculative tokens are plain greedy's. model.py's
    verify (TEAL_POSITIONWISE_VERIFY=0) parted from them after ~25 tokens of a chat reply."""
    from checkpoint import load_model
    from decode import install_fused_decode
    model = install_fused_decode(load_model(smollm2_dir, dtype=torch.bfloat16))
    draft, target = states(model, 0.5, None)
    target.restore()
    prompt = smollm2_tokenizer.encode("The three primary colors are")
    plain = generate(model, prompt, 64, GREEDY).tokens
    spec, stats = speculative_generate(model, prompt, 64, GREEDY, 4, draft, target)
    assert spec.tokens == plain
    assert 0 < stats.accepted < stats.drafted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_captured_steps_change_nothing():
    """generate.CapturedSteps (draft and verify replayed from CUDA graphs of our own) gives the
    tokens and statistics of the same compiled step called directly, also on a second, longer run
    whose caches were reallocated (the graphs must be captured again: they hold the old addresses),
    and each run ends with the same KV cache."""
    from generate import CapturedSteps, logits_step
    model = tiny_model(block_size=512).to("cuda")
    draft, target = states(model, 0.6, None)
    compiled = torch.compile(logits_step, fullgraph=True, dynamic=False)
    captured = CapturedSteps(compiled)
    for new_tokens in (20, 300):  # caches of 256, then 512 positions (generate.ensure_caches)
        runs = []
        for step in (compiled, captured):
            res, stats = speculative_generate(model, PROMPT, new_tokens, GREEDY, 3, draft, target,
                                              draft_fn=step, verify_fn=step)
            cache = model.layers[-1].attention.kv_cache.k_cache[..., :len(res.tokens) - 1, :].clone()
            runs.append((res.tokens, stats.accepted, stats.verifies, cache))
        assert runs[0][:3] == runs[1][:3]
        assert torch.equal(runs[0][3], runs[1][3])
    assert len(captured.graphs) == 2  # one draft and one verify graph, the first pair replaced
