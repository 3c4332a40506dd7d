"""teal::attention_o: the decode step's attention computed inside o's sparse GEMV (the ATTENTION
prologue of teal_kernels/triton_gemv.py), against float64 math; and the fused decode block that
calls it (TEAL_ATTENTION_O=1), against the plain model. Without CUDA the kernel runs in Triton's
interpreter (tiny shapes)."""
from __future__ import annotations

import copy

import pytest
import torch
from fixtures import DEVICE, HAS_CUDA, TINY, tiny_model

from decode import install_fused_decode
from linear import ATTENTION_O_ENV, ATTENTION_O_MAX_CACHE, PackedLinear
from teal_kernels.ops import CPU_KERNELS_ENV, attention_o
from teal_kernels.triton_gemv import KernelConfig, attention_o_triton

pytestmark = pytest.mark.usefixtures("interpreted_kernels")

N_HEAD, N_KV, D, S_MAX, N = 8, 2, 16, 130, 48  # GQA group 4: 64 rows of o's input a KV group


def rope64(t: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i+1) rotated by cs [D/2, 2] in float32, rounded to bf16 (the model's RoPE)."""
    t = t.float()
    return torch.stack([t[..., 0::2] * cs[:, 0] - t[..., 1::2] * cs[:, 1],
                        t[..., 1::2] * cs[:, 0] + t[..., 0::2] * cs[:, 1]], -1).flatten(-2).bfloat16()


def attention64(qkv, cs, k_cache, v_cache, p):
    """The new token's attention over 0..p in float64, keys and values at p from the row: [H * D]."""
    q = rope64(qkv[0, : N_HEAD * D].view(N_HEAD, D), cs).double()
    k = k_cache[0, :, : p + 1].double().clone()
    v = v_cache[0, :, : p + 1].double().clone()
    k[:, p] = rope64(qkv[0, N_HEAD * D: (N_HEAD + N_KV) * D].view(N_KV, D), cs).double()
    v[:, p] = qkv[0, (N_HEAD + N_KV) * D:].view(N_KV, D).double()
    group = N_HEAD // N_KV
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    probs = torch.softmax(torch.einsum("hd,hsd->hs", q, k) / D ** 0.5, -1)
    return torch.einsum("hs,hsd->hd", probs, v).reshape(-1)


def problem(fmt: str, p: int, seed: int):
    """A q|k|v row, caches holding NaN past p (never to be read), o's weight (+ int8 scales) and a
    residual, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, (N_HEAD + 2 * N_KV) * D, generator=g).bfloat16()
    angles = torch.rand(D // 2, generator=g) * 6.0
    cs = torch.stack([angles.cos(), angles.sin()], -1)
    k_cache = torch.randn(1, N_KV, S_MAX, D, generator=g).bfloat16()
    v_cache = torch.randn(1, N_KV, S_MAX, D, generator=g).bfloat16()
    k_cache[:, :, p:] = float("nan")  # p itself is written by the op
    v_cache[:, :, p:] = float("nan")
    if fmt == "int8":
        w = torch.randint(-127, 128, (N_HEAD * D, N), generator=g, dtype=torch.int8)
        scales = torch.rand(N, generator=g) / 64 + 1e-3
    else:
        w, scales = (torch.randn(N_HEAD * D, N, generator=g) / 8).bfloat16(), None
    residual = torch.randn(1, N, generator=g).bfloat16()
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return tuple(map(move, (qkv, cs, k_cache, v_cache, w, scales, residual)))


def gap_threshold(att: torch.Tensor, level: str) -> float:
    """0 (keep all), past the largest |value| (keep none), or the middle of the widest gap between
    sorted |values| near the median, so that a last-bit difference cannot flip an input."""
    mags = att.abs().sort().values
    if level == "none":
        return 0.0
    if level == "all":
        return float(mags[-1]) * 2 + 1
    mid = len(mags) // 2
    lo, hi = mid - len(mags) // 4, mid + len(mags) // 4
    gaps = mags[lo + 1: hi] - mags[lo: hi - 1]
    i = lo + int(gaps.argmax())
    return float(mags[i] + mags[i + 1]) / 2


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("p", [1, 64, 129])
def test_attention_o_when_the_new_key_dominates(fmt, p):
    """The new token's key aligned with its group's queries, so that position p holds every head's
    largest score: the kernel's last online-softmax step (position p, from registers) must rescale
    what the cache's tiles gave. Keep-all thresholds; against float64."""
    qkv, cs, k_cache, v_cache, w, scales, residual = problem(fmt, p, seed=p)
    q = qkv[0, : N_HEAD * D].view(N_KV, N_HEAD // N_KV, D).float()
    qkv[0, N_HEAD * D: (N_HEAD + N_KV) * D] = (q.sum(1) * 6).flatten().bfloat16()
    att = attention64(qkv.cpu(), cs.cpu(), k_cache.cpu(), v_cache.cpu(), p).bfloat16().double()
    q64 = rope64(qkv[0, : N_HEAD * D].cpu().view(N_HEAD, D), cs.cpu()).double()
    k_new = rope64(qkv[0, N_HEAD * D: (N_HEAD + N_KV) * D].cpu().view(N_KV, D), cs.cpu()).double()
    scores = torch.einsum("hd,hsd->hs", q64, k_cache[0, :, :p].cpu().double().repeat_interleave(N_HEAD // N_KV, 0))
    new_scores = (q64 * k_new.repeat_interleave(N_HEAD // N_KV, 0)).sum(-1)
    assert (new_scores > scores.max(-1).values + 4).all()  # the new key dominates every head
    cfg = KernelConfig(block_n=16, block_k=64, sub_k=16, compact=True, num_stages=1)
    out = attention_o_triton(qkv, cs, k_cache, v_cache, torch.tensor([p], device=DEVICE), N_HEAD, w,
                             torch.tensor([0.0], device=DEVICE), [N], scales, residual, config=cfg)
    weight = w.cpu().double() * (1.0 if scales is None else scales.cpu().double()[None, :])
    want = (att @ weight).bfloat16().double() + residual.cpu().double()
    scale = att.abs() @ weight.abs() + residual.cpu().double().abs()
    err = (out.cpu().double()[0] - want).abs()
    assert (err <= 2**-6 * want.abs() + 2**-8 * scale).all(), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("p", [0, 63, 64, 129])  # tile edges (64 positions a tile at D = 16)
@pytest.mark.parametrize("block_k", [16, 64])  # one head a K block; a whole KV group
@pytest.mark.parametrize("level", ["none", "typical", "all"])
def test_attention_o_matches_float64(fmt, p, block_k, level):
    """Output = o's thresholded product of the float64 attention (rounded to bf16) + residual;
    the caches get the new key (RoPE) and value at p, keep every other row, and NaN past p is
    never read."""
    qkv, cs, k_cache, v_cache, w, scales, residual = problem(fmt, p, seed=p + block_k)
    att = attention64(qkv.cpu(), cs.cpu(), k_cache.cpu(), v_cache.cpu(), p).bfloat16().double()
    threshold = gap_threshold(att, level)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    cfg = KernelConfig(block_n=16, block_k=block_k, sub_k=16, compact=True, num_stages=1)
    out = attention_o_triton(qkv, cs, k_cache, v_cache, torch.tensor([p], device=DEVICE), N_HEAD, w,
                             torch.tensor([threshold], device=DEVICE), [N], scales, residual, config=cfg)
    weight = w.cpu().double() * (1.0 if scales is None else scales.cpu().double()[None, :])
    kept = torch.where(att.abs() > threshold, att, 0.0)
    product = (kept @ weight).bfloat16().double()  # the unfused path rounds the product, then adds
    want = product + residual.cpu().double()
    scale = att.abs() @ weight.abs() + residual.cpu().double().abs()
    assert torch.isfinite(out).all() and out.shape == (1, N) and out.dtype == torch.bfloat16
    err = (out.cpu().double()[0] - want).abs()
    assert (err <= 2**-6 * want.abs() + 2**-8 * scale).all(), f"max error {err.max().item():.3g}"
    if level == "all":  # nothing kept: the residual alone, rounded once
        assert torch.equal(out.cpu(), residual.cpu())
    new_k = rope64(qkv[0, N_HEAD * D: (N_HEAD + N_KV) * D].cpu().view(N_KV, D), cs.cpu())
    torch.testing.assert_close(k_cache[0, :, p].cpu(), new_k, rtol=2**-7, atol=0)  # the interpreter truncates
    assert torch.equal(v_cache[0, :, p].cpu(), qkv[0, (N_HEAD + N_KV) * D:].cpu().view(N_KV, D))
    others = torch.ones(S_MAX, dtype=torch.bool)
    others[p] = False
    for got, before in ((k_cache, k_before), (v_cache, v_before)):
        assert torch.equal(got.cpu()[:, :, others].nan_to_num(7.0), before.cpu()[:, :, others].nan_to_num(7.0))


@pytest.mark.parametrize("bad", ["two rows", "int4", "head across groups", "strides"])
def test_attention_o_rejects_what_it_cannot_take(bad):
    """One-line ValueErrors, before any launch."""
    qkv, cs, k_cache, v_cache, w, scales, residual = problem("bf16", 5, seed=0)
    cfg = KernelConfig(block_n=16, block_k=64, sub_k=16, compact=True, num_stages=1)
    pos, thr = torch.tensor([5], device=DEVICE), torch.zeros(1, device=DEVICE)
    if bad == "two rows":
        qkv, k_cache, v_cache = qkv.expand(2, -1).contiguous(), k_cache.expand(2, -1, -1, -1).contiguous(), \
            v_cache.expand(2, -1, -1, -1).contiguous()
        residual = residual.expand(2, -1).contiguous()
    elif bad == "int4":
        w = torch.zeros(N_HEAD * D, N // 2, dtype=torch.uint8, device=DEVICE)
    elif bad == "head across groups":
        cfg = KernelConfig(block_n=16, block_k=128, sub_k=16, compact=True, num_stages=1)  # two KV groups a block
    else:
        v_cache = v_cache.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError) as e:
        attention_o_triton(qkv, cs, k_cache, v_cache, pos, N_HEAD, w, thr, [N], scales, residual, config=cfg)
    assert "\n" not in str(e.value)


def test_the_op_on_the_cpu_is_the_composed_reference(monkeypatch):
    """teal::attention_o's plain-torch implementation (the op's CPU implementation outside the
    interpreter): the attention step, then o's product, then the residual."""
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    qkv, cs, k_cache, v_cache, w, scales, residual = (t.cpu() if t is not None else None
                                                      for t in problem("int8", 40, seed=3))
    att = attention64(qkv, cs, k_cache, v_cache, 40)
    out = attention_o(qkv, cs, k_cache, v_cache, torch.tensor([40]), N_HEAD, w, torch.zeros(1), [N], scales, residual)
    want = att @ (w.double() * scales.double()) + residual[0].double()
    torch.testing.assert_close(out[0].double(), want, rtol=2**-6, atol=0.05)


@torch.no_grad()
def greedy_tokens(model, prompt: torch.Tensor, steps: int, cache: int) -> tuple[list[int], torch.Tensor]:
    model.setup_caches(1, cache)
    logits = model(prompt, torch.arange(prompt.shape[1], device=prompt.device))[:, -1:]
    tokens, outs = [], []
    for i in range(steps):
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits = model(token, torch.tensor([prompt.shape[1] + i], device=prompt.device))
        outs.append(logits.float())
    return tokens, torch.cat(outs, 1)


def test_the_switch_defaults_on_for_int8_only(monkeypatch):
    """Unset, o computes its attention for int8 weights (faster end to end on the H200) and not for
    bf16 (slower on the H100); TEAL_ATTENTION_O=1 / 0 sets it for every format."""
    monkeypatch.delenv(ATTENTION_O_ENV, raising=False)
    assert PackedLinear(64, 64, fmt="int8").attention_allowed
    assert not PackedLinear(64, 64).attention_allowed
    monkeypatch.setenv(ATTENTION_O_ENV, "1")
    assert PackedLinear(64, 64).attention_allowed
    monkeypatch.setenv(ATTENTION_O_ENV, "0")
    assert not PackedLinear(64, 64, fmt="int8").attention_allowed


@pytest.mark.skipif(HAS_CUDA, reason="CPU interpreter test")
def test_fused_block_with_attention_o_decodes_as_without(monkeypatch):
    """TEAL_ATTENTION_O=1, bf16, the Triton kernels in the interpreter: every o call takes the op
    (counted), and 12 greedy steps give the tokens of the same fused model without it, with close
    logits; a cache past ATTENTION_O_MAX_CACHE positions keeps the attention op. (12 steps, positions
    5-16 inside one key block either way: 32 took 4 minutes of the suite on a 2-core machine.)"""
    ref = tiny_model(4, n_head=8, n_local_heads=2, dim=128, block_size=ATTENTION_O_MAX_CACHE + 8).bfloat16()
    monkeypatch.setenv(ATTENTION_O_ENV, "0")
    plain = install_fused_decode(copy.deepcopy(ref))
    monkeypatch.setenv(ATTENTION_O_ENV, "1")
    fused = install_fused_decode(copy.deepcopy(ref))
    calls = []
    original = PackedLinear.attention_product
    monkeypatch.setattr(PackedLinear, "attention_product", lambda self, *a: calls.append(1) or original(self, *a))
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    want_tokens, want = greedy_tokens(plain, prompt, 12, 48)
    got_tokens, got = greedy_tokens(fused, prompt, 12, 48)
    assert len(calls) == 12 * len(fused.layers)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    calls.clear()
    greedy_tokens(fused, prompt, 2, ATTENTION_O_MAX_CACHE + 1)
    assert not calls


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_gpu_compiled_step_with_attention_o(mode, monkeypatch):
    """On the GPU, compiled into CUDA graphs with TEAL on: every o call takes the op, and 48
    greedy steps give the tokens of the same model without it, with close logits."""
    from quantize import quantize_model
    from teal import sparsify
    from linear import packed_projections

    def run(switch: str) -> tuple[list[int], torch.Tensor, int]:
        monkeypatch.setenv(ATTENTION_O_ENV, switch)
        model = tiny_model(6, n_head=8, n_local_heads=2, dim=512, intermediate_size=1536).to("cuda", torch.bfloat16)
        if mode == "int8":
            quantize_model(model, "int8")
        install_fused_decode(model)
        sparsify(model, {n: [0.02] * len(p.split_sizes) for n, p in packed_projections(model).items()})
        taken = sum(layer.attention.wo.takes_attention(torch.empty(1, 768, device="cuda", dtype=torch.bfloat16),
                                                       torch.empty(1, 2, 64, 64, device="cuda"), 8)
                    for layer in model.layers)
        prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2)).cuda()
        torch._dynamo.reset()
        step = torch.compile(lambda tok, pos: model(tok, pos), mode="reduce-overhead", fullgraph=True)
        model.setup_caches(1, 9 + 48)
        tokens, outs = [], []
        with torch.no_grad():
            logits = model(prompt, torch.arange(9, device="cuda"))[:, -1:]
            pos = torch.tensor([9], device="cuda")
            for _ in range(48):
                tokens.append(int(logits.argmax(-1)))
                logits = step(logits.argmax(-1), pos).clone()
                outs.append(logits.float())
                pos += 1
        return tokens, torch.cat(outs, 1), taken

    want_tokens, want, none = run("0")
    got_tokens, got, every = run("1")
    assert none == 0 and every == TINY["n_layer"]
    assert got_tokens == want_tokens
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())


def test_the_cpu_reference_rejects_before_writing_the_caches(monkeypatch):
    """A bad o weight is one ValueError, and the caches keep what they held."""
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    qkv, cs, k_cache, v_cache, w, scales, residual = (t.cpu() if t is not None else None
                                                      for t in problem("bf16", 40, seed=3))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError):
        attention_o(qkv, cs, k_cache, v_cache, torch.tensor([40]), N_HEAD, w[:-1], torch.zeros(1), [N], scales,
                    residual)
    assert torch.equal(k_cache.nan_to_num(7.0), k_before.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), v_before.nan_to_num(7.0))
