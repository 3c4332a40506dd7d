"""generate(): the decode loop that reads tokens behind the GPU gives exactly the tokens of a plain
token-by-token loop, stops at EOS and at max_new_tokens."""
from __future__ import annotations

import pytest
import torch
from fixtures import tiny_model

from generate import Sampling, TokenReader, generate


@torch.no_grad()
def plain_greedy(model, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    """The reference: argmax, one step at a time, the host reads every token at once."""
    model.setup_caches(1, len(prompt) + max_new)
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)))
    out = list(prompt)
    while True:
        out.append(int(logits[0, -1].argmax()))
        if len(out) == len(prompt) + max_new or out[-1] in eos:
            return out
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([len(out) - 1]))


@pytest.mark.parametrize("max_new", [1, 2, TokenReader.DEPTH, 17])
def test_same_tokens_as_a_plain_loop(max_new):
    model = tiny_model(seed=5)
    prompt = [3, 14, 15, 92, 65]
    got = generate(model, prompt, max_new, Sampling())
    assert got.tokens == plain_greedy(model, prompt, max_new, set())
    assert got.new_tokens == max_new


def test_stops_at_eos_even_with_steps_in_flight():
    model = tiny_model(seed=5)
    prompt = [3, 14, 15, 92, 65]
    free = plain_greedy(model, prompt, 24, set())
    eos = {free[len(prompt) + 6]}  # the 7th generated token (or an earlier repeat of it)
    seen: list[list[int]] = []
    got = generate(model, prompt, 24, Sampling(), eos_ids=eos, on_token=lambda ids: seen.append(list(ids)))
    want = plain_greedy(model, prompt, 24, eos)
    assert got.tokens == want and got.tokens[-1] in eos and len(want) <= len(prompt) + 7
    assert seen[-1] == want and [len(s) for s in seen] == list(range(len(prompt) + 1, len(want) + 1))


def test_cli_fused_decode_path_gives_the_reference_text(tiny_ckpt):
    """generate.py --decode_path fused on the CPU (the ops' references): the same greedy text."""
    import subprocess
    import sys

    from fixtures import ROOT
    outs = []
    for path in ("reference", "fused"):
        proc = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(tiny_ckpt), "--prompt",
                               "hello", "--max_new_tokens", "12", "--temperature", "0", "--dtype", "float32",
                               "--device", "cpu", "--decode_path", path],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout.split("\n-- ")[0])
    assert outs[0] == outs[1] and len(outs[0]) > len("hello")


def test_auto_decode_path_is_fused():
    """--decode_path auto: the fused step (GPU and CPU, dense and sparse, speculation's drafts
    too); explicit choices stand."""
    from generate import decode_path, parse_args

    assert parse_args([]).decode_path == "auto"
    assert decode_path(parse_args(["--sparsity", "0", "0.4"])) == "fused"
    assert decode_path(parse_args(["--speculate_k", "2"])) == "fused"
    assert decode_path(parse_args(["--speculate_k", "2", "--decode_path", "reference"])) == "reference"
    assert decode_path(parse_args(["--decode_path", "reference"])) == "reference"



@pytest.mark.parametrize("vocab", [1000, 1024, 49152, 128256])
def test_argmax_last_matches_torch_argmax_ties_included(vocab):
    """Two-stage argmax: torch.argmax's index on random logits, on ties (the first maximum wins,
    within a chunk and across chunks), on a vocabulary that is not a multiple of the chunk, eager
    and compiled."""
    from generate import argmax_last
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g)
    logits[1, vocab // 3] = logits[1, vocab - 1] = logits[1].max() + 1  # tie across chunks
    logits[2, 5] = logits[2, 6] = logits[2].max() + 1  # tie inside a chunk
    logits = torch.cat([logits, torch.zeros(1, vocab)])  # all equal: index 0
    want = logits.argmax(-1, keepdim=True)
    assert torch.equal(argmax_last(logits), want)
    assert torch.equal(torch.compile(argmax_last, fullgraph=True)(logits), want)
    assert torch.equal(argmax_last(logits.bfloat16()), logits.bfloat16().argmax(-1, keepdim=True))


def test_cpp_wrapper_decodes_what_the_python_wrapper_decodes():
    """generate.py --compile --cpp_wrapper (CPU): the compiled step's glue in C++ calls the same
    kernels, our C++ GEMV and attention ops included, so a sparse greedy run gives the same
    tokens and leaves the same KV cache, bit for bit, as the default Python glue."""
    from decode import install_fused_decode
    from generate import compile_steps, prefill
    from linear import pack_model, packed_projections
    from teal import sparsify

    model = install_fused_decode(tiny_model(3))
    sparsify(model, {n: [0.4] * len(p.split_sizes) for n, p in packed_projections(pack_model(model)).items()})
    runs = []
    for cpp in (False, True):
        torch._dynamo.reset()
        decode, _ = compile_steps(torch.device("cpu"), False, cpp)
        res = generate(model, [5, 17, 99, 3], 20, Sampling(temperature=0.0), decode, prefill)
        runs.append((res.tokens, model.layers[-1].attention.kv_cache.k_cache.clone()))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


def test_ab_generate_reads_back_generate_py_s_table(capsys):
    """benchmarks/ab_generate.py parses generate.py's closing table (print_table) into the values
    it printed."""
    import generate as generate_py
    from benchmarks import ab_generate
    rows = [{"sparsity": s, "realized_sparsity": r, "decode_tok_s": t, "gb_s": 9.9, "ttft_s": f, "new_tokens": n}
            for s, r, t, f, n in [(0.0, 0.0, 42.4, 0.338, 91), (0.4, 0.38, 49.8, 0.301, 61)]]
    generate_py.print_table(rows)
    got = ab_generate.table_rows(capsys.readouterr().out)
    assert got == [{"sparsity": 0.0, "realized": 0.0, "tok_s": 42.4, "ttft_ms": 338, "new_tokens": 91},
                   {"sparsity": 0.4, "realized": 0.38, "tok_s": 49.8, "ttft_ms": 301, "new_tokens": 61}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_captured_decode_gives_the_plain_loops_tokens(monkeypatch):
    """On CUDA compile_steps' decode step replays a graph of CapturedSteps (TEAL_CAPTURED_DECODE=1,
    the default) instead of torch.compile's CUDA graphs: both give the eager loop's greedy tokens
    (fp32 fused step), also on a longer second run whose caches were reallocated; a second Sampling
    captures its own graph."""
    from decode import install_fused_decode
    from generate import CAPTURED_DECODE_ENV, CapturedSteps, compile_steps
    model = install_fused_decode(tiny_model(seed=5, block_size=512)).to("cuda")
    prompt = [3, 14, 15, 92, 65]
    for new_tokens in (20, 300):  # caches of 256, then 512 positions (generate.ensure_caches)
        want = generate(model, prompt, new_tokens, Sampling()).tokens
        for captured in ("1", "0"):
            monkeypatch.setenv(CAPTURED_DECODE_ENV, captured)
            torch._dynamo.reset()
            decode, _ = compile_steps(torch.device("cuda"), compile_prefill=False)
            assert isinstance(decode, CapturedSteps) == (captured == "1")
            assert generate(model, prompt, new_tokens, Sampling(), decode).tokens == want
    monkeypatch.setenv(CAPTURED_DECODE_ENV, "1")
    decode, _ = compile_steps(torch.device("cuda"), compile_prefill=False)
    generate(model, prompt, 8, Sampling(), decode)
    sampled = generate(model, prompt, 8, Sampling(temperature=0.8, top_k=20), decode).tokens
    assert len(decode.graphs) == 2 and all(0 <= t < model.config.vocab_size for t in sampled)
