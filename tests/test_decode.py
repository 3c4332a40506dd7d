"""The fused decode path (decode.py) against the reference model: the same logits, the same KV
cache and the same greedy tokens; through the CPU reference op and through the Triton kernels in
the interpreter."""
from __future__ import annotations

import copy

import pytest
import torch
from fixtures import COMPILE_BACKENDS, HAS_CUDA, tiny_model

from decode import FUSED_NORM_ENV, POSITIONWISE_ENV, DecodeBlock, install_fused_decode
from teal_kernels.ops import CPU_KERNELS_ENV
from linear import PackedLinear, pack_model, packed_projections
from teal import sparsify



def model_pair(dtype: torch.dtype, seed: int = 4, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(reference, fused) copies of one tiny model."""
    ref = tiny_model(seed, **overrides).to(dtype)
    return ref, install_fused_decode(copy.deepcopy(ref))


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int,
           forced: list[list[int]] | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the stacked decode-step logits (float32); with `forced`, those tokens are
    fed instead of the model's own (so two models' logits compare step by step)."""
    model.setup_caches(prompt.shape[0], prompt.shape[1] + steps)
    logits = model(prompt, torch.arange(prompt.shape[1]))[:, -1:]
    tokens, outs = [], []
    for i in range(steps):
        token = logits.argmax(-1) if forced is None else torch.tensor(forced)[:, i:i + 1]
        tokens.append(token)
        logits = model(token, torch.tensor([prompt.shape[1] + i]))
        outs.append(logits.float())
    return torch.cat(tokens, 1).tolist(), torch.cat(outs, 1)


def test_install_swaps_every_block_and_keeps_module_names():
    ref, fused = model_pair(torch.float32)
    assert all(type(layer) is DecodeBlock for layer in fused.layers)
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in ref.named_modules()]
    assert install_fused_decode(fused) is fused  # idempotent
    assert isinstance(fused.layers[0].feed_forward.w2, PackedLinear)  # packed: the fused calls need it
    torch.testing.assert_close(fused.layers[0].attention.wqkv.weight.t(), ref.layers[0].attention.wqkv.weight)


@pytest.mark.parametrize("dtype,packed", [(torch.bfloat16, True), (torch.float32, False)])
def test_a_cpu_float_head_is_packed_for_the_row_kernel(dtype, packed):
    """On a CPU a bf16/fp16 lm_head runs the decode kernel (its own [K, N] copy: a tied table stays
    the embedding's); its product is the float64 one, rounded once. float32 keeps nn.Linear."""
    ref, fused = model_pair(dtype, tie_embeddings=True)
    assert isinstance(fused.output, PackedLinear) is packed
    assert (fused.output.weight is fused.tok_embeddings.weight) is not packed
    assert torch.equal(fused.tok_embeddings.weight, ref.tok_embeddings.weight)
    assert "output" not in packed_projections(fused)  # TEAL and its meters leave the head alone
    x = torch.randn(1, 1, ref.config.dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = x.double() @ ref.output.weight.double().t()
    torch.testing.assert_close(fused.output(x).double(), want, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("batch", [1, 2])
def test_positionwise_verify_rounds_as_single_steps(batch, monkeypatch):
    """TEAL_POSITIONWISE_VERIFY=1: a step of five positions (speculation's verify) gives the logits
    and KV caches of five one-position steps bit for bit (bf16, the CPU kernels, whose rows do not
    depend on the rows beside them)."""
    monkeypatch.setenv(POSITIONWISE_ENV, "1")
    _, together = model_pair(torch.bfloat16)
    alone = copy.deepcopy(together)
    g = torch.Generator().manual_seed(5)
    prompt, tokens = torch.randint(0, 256, (batch, 11), generator=g), torch.randint(0, 256, (batch, 5), generator=g)
    with torch.no_grad():
        for m in (together, alone):
            m.setup_caches(batch, 24)
            m(prompt, torch.arange(11))
        got = together(tokens, torch.arange(11, 16))
        want = torch.cat([alone(tokens[:, i:i + 1], torch.tensor([11 + i])) for i in range(5)], dim=1)
    assert torch.equal(got, want)
    for a, b in zip(together.layers, alone.layers):
        assert torch.equal(a.attention.kv_cache.k_cache, b.attention.kv_cache.k_cache)
        assert torch.equal(a.attention.kv_cache.v_cache, b.attention.kv_cache.v_cache)


@pytest.mark.parametrize("batch", [1, 3])
def test_reference_op_matches_the_model_for_64_steps(batch):
    """The op's CPU reference: logits, KV caches and 64 greedy tokens equal the plain model's."""
    ref, fused = model_pair(torch.float32)
    prompt = torch.randint(0, 256, (batch, 7), generator=torch.Generator().manual_seed(1))
    want_tokens, want = greedy(ref, prompt, 64)
    got_tokens, got = greedy(fused, prompt, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_tokens == want_tokens
    for a, b in zip(fused.layers, ref.layers):
        torch.testing.assert_close(a.attention.kv_cache.k_cache, b.attention.kv_cache.k_cache, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.attention.kv_cache.v_cache, b.attention.kv_cache.v_cache, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused_norms", ["0", "1", None])
def test_sparse_fused_block_matches_the_sparse_model(fused_norms, monkeypatch):
    """TEAL on (float32: the masked reference product with the gate|up prologue and the residual
    epilogue): the fused block computes what the plain sparse model computes; with
    TEAL_FUSED_NORM=1 too (the norms handed to the projections, which run them first off CUDA),
    and unset (PackedLinear decides)."""
    if fused_norms is None:
        monkeypatch.delenv(FUSED_NORM_ENV, raising=False)
    else:
        monkeypatch.setenv(FUSED_NORM_ENV, fused_norms)
    ref, fused = model_pair(torch.float32)
    assert all(layer.fuse_norms == (None if fused_norms is None else fused_norms == "1") for layer in fused.layers)
    for m in (ref, fused):
        sparsify(m, {n: [0.3] * len(p.split_sizes) for n, p in packed_projections(pack_model(m)).items()})
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(6))
    want_tokens, want = greedy(ref, prompt, 16)
    got_tokens, got = greedy(fused, prompt, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got_tokens == want_tokens


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter test")
def test_interpreted_kernels_match_the_model(monkeypatch):
    """bf16, the Triton attention-step kernel and GEMV (with its fusions) in the interpreter,
    against the plain model: the path a GPU runs, tested on the CPU. Fed the reference's tokens:
    the two round differently (the GEMV accumulates in float32), so a near tie between the top two
    logits may pick another token and the free-running texts part. (With TEAL on, rounding also
    flips inputs near a threshold; test_linear covers that kernel.)"""
    monkeypatch.setenv(CPU_KERNELS_ENV, "interpreter")
    ref, fused = model_pair(torch.bfloat16, n_head=6, n_local_heads=2, dim=96)  # GQA group of 3
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    want_tokens, want = greedy(ref, prompt, 12)
    got_tokens, got = greedy(fused, prompt, 12, forced=want_tokens)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_fused_decode_matches_eager(backend):
    """The decode step under torch.compile(fullgraph=True): the op's in-place cache write survives
    functionalization, and the cache is not copied."""
    ref, fused = model_pair(torch.float32)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    want_tokens, _ = greedy(ref, prompt, 8)
    torch._dynamo.reset()
    step = torch.compile(fused, fullgraph=True, backend=backend)
    fused.setup_caches(1, 13)
    with torch.no_grad():
        logits = fused(prompt, torch.arange(5))[:, -1:]
        tokens = []
        for i in range(8):
            token = logits.argmax(-1)
            tokens.append(token)
            logits = step(token, torch.tensor([5 + i]))
    assert torch.cat(tokens, 1).tolist() == want_tokens
    for a, b in zip(fused.layers, ref.layers):
        torch.testing.assert_close(a.attention.kv_cache.k_cache, b.attention.kv_cache.k_cache, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_fused_decode_under_cuda_graphs():
    """On the GPU, compiled with CUDA graphs (generate.py's setting), fed the reference's tokens
    for 32 steps: every layer's KV cache (which depends on the attention outputs of the layers
    below) matches the reference model's."""
    from generate import Sampling, decode_one_token
    ref = tiny_model(4, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536).to("cuda", torch.bfloat16)
    fused = install_fused_decode(copy.deepcopy(ref))
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5)).cuda()
    want_tokens, _ = greedy(ref, prompt, 32)
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    fused.setup_caches(1, 9 + 32)
    with torch.no_grad():
        fused(prompt, torch.arange(9, device="cuda"))
        pos = torch.tensor([9], device="cuda")
        for i in range(32):
            token = torch.tensor([[want_tokens[0][i]]], device="cuda")
            step(fused, token, pos, Sampling())
            pos += 1
    for a, b in zip(fused.layers, ref.layers):
        torch.testing.assert_close(a.attention.kv_cache.k_cache.float(), b.attention.kv_cache.k_cache.float(),
                                   rtol=0.02, atol=0.02)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_compiled_sparse_step_may_be_the_first_call():
    """A sparse projection asks the speed table (keyed by the GPU's name, read from a file) on its
    first decode call. When that first call is already a compiled one (no eager step before it),
    torch.compile must take the verdict as a constant (it cannot trace torch.cuda.get_device_name
    nor the file's read: both failed on the H200 under fullgraph); the compiled step then computes
    what the eager one does."""
    model = install_fused_decode(tiny_model(7).to("cuda", torch.bfloat16))
    sparsify(model, {n: [0.1] * len(p.split_sizes) for n, p in packed_projections(pack_model(model)).items()},
             targets={n: [0.5] * len(p.split_sizes) for n, p in packed_projections(model).items()})
    model.setup_caches(1, 8)
    token, pos = torch.tensor([[3]], device="cuda"), torch.tensor([0], device="cuda")
    torch._dynamo.reset()
    step = torch.compile(lambda t, p: model(t, p), fullgraph=True)
    with torch.no_grad():
        got = step(token, pos)
        want = model(token, pos)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_programmatic_dependent_launch_changes_no_bit(mode):
    """TEAL_PDL=1 lets each GEMV / attention kernel launch while the previous one finishes (it
    waits before touching memory). Inside CUDA graphs (compiled, quantized so every projection runs
    our kernels: int8 the "rows" design, int4 mostly "dot") the logits of 24 steps equal the
    ordinary launches' bit for bit."""
    from quantize import quantize_model

    def run(pdl: str) -> torch.Tensor:
        model = tiny_model(6, n_head=8, n_local_heads=2, dim=512, intermediate_size=1536).to("cuda", torch.bfloat16)
        quantize_model(model, mode, group_size=32)
        install_fused_decode(model)
        prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2)).cuda()
        torch._dynamo.reset()
        step = torch.compile(lambda tok, pos: model(tok, pos), mode="reduce-overhead", fullgraph=True)
        model.setup_caches(1, 9 + 24)
        outs = []
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setenv("TEAL_PDL", pdl)
            logits = model(prompt, torch.arange(9, device="cuda"))[:, -1:]
            pos = torch.tensor([9], device="cuda")
            for _ in range(24):
                logits = step(logits.argmax(-1), pos).clone()
                outs.append(logits.float())
                pos += 1
        return torch.cat(outs, 1)

    assert torch.equal(run("1"), run("0"))
