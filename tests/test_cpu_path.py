"""The CPU decode kernel (teal_kernels/cpu.py): bit-level agreement with the formats' definition
(teal_kernels.reference.dequantize_weight, float64), TEAL masking, the fusions, row skipping, and the
model -> PackedLinear -> op path eager and compiled."""
from __future__ import annotations

import time

import pytest
import torch
from fixtures import tiny_model

from teal_kernels import cpu, dequantize_weight, sparse_gemv
from teal_kernels.ops import CPU_KERNELS_ENV
from teal_kernels.reference import masked_product
from linear import pack_model, packed_projections
from quantize import pack_int4, quantize_model
from teal import sparsify

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the C++ CPU kernel did not build here")

FORMATS = [("fp", 0), ("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)]


def dyadic_problem(fmt: str, group: int, m: int = 3, k: int = 256, splits: tuple[int, ...] = (48, 16, 32),
                   seed: int = 0):
    """Weights, scales, zeros and x on coarse binary grids, so that every product and every partial
    sum is exact in float32: the kernel's output must then equal the float64 result rounded to
    bf16, bit for bit, whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    n = sum(splits)
    x = (torch.randint(-16, 17, (m, k), generator=g) / 4).bfloat16()  # multiples of 1/4 in [-4, 4]
    scales = zeros = None
    if fmt == "fp":
        w = (torch.randint(-64, 65, (k, n), generator=g) / 16).bfloat16()
    elif fmt == "int8":
        w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
        scales = 2.0 ** -torch.randint(4, 8, (n,), generator=g).float()
    else:
        w = pack_int4(torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8))
        scales = 2.0 ** -torch.randint(0, 4, (k // group, n), generator=g).float()
        zeros = torch.randint(-16, 17, (k // group, n), generator=g) / 8
    thresholds = torch.tensor([0.0, 1.1, 2.6][: len(splits)])  # never equal to an |x|
    return x, w, thresholds, list(splits), scales, zeros, group


def float64_product(x, w, thresholds, splits, scales, zeros, group):
    """x masked per segment first, then times the float64 dequantized weight."""
    weight = dequantize_weight(w, scales, zeros, group).double()
    xd = x.double()
    return torch.cat([torch.where(xd.abs() > t, xd, 0.0) @ cols
                      for t, cols in zip(thresholds.tolist(), weight.split(splits, dim=1))], dim=1)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_dequantization_matches_the_float64_definition_bit_for_bit(fmt, group):
    """One-hot inputs read single rows of W: the kernel's rows are the definition's, exactly."""
    x, w, _, splits, scales, zeros, g = dyadic_problem(fmt, group)
    k = w.shape[0]
    eye = torch.eye(k, dtype=torch.bfloat16)
    rows = torch.cat([cpu.sparse_gemv_cpu(eye[i:i + 8], w, torch.zeros(len(splits)), splits, scales, zeros, g)
                      for i in range(0, k, 8)])
    want = dequantize_weight(w, scales, zeros, g).double()
    assert torch.equal(rows.double(), want)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_teal_masked_product_is_exact(fmt, group):
    """Thresholds per segment, x masked first: the float64 product, rounded once to bf16."""
    args = dyadic_problem(fmt, group)
    out = cpu.sparse_gemv_cpu(*args)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, float64_product(*args).bfloat16())


@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int8", 0), ("int4", 32)])
def test_fusions_match_the_reference(fmt, group):
    """gated (SiLU(gate) * up as the input) and residual (added after rounding) as the reference."""
    x, w, thresholds, splits, scales, zeros, g = dyadic_problem(fmt, group, m=2)
    gate_up = torch.randn(2, 2 * x.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    residual = torch.randn(2, sum(splits), generator=torch.Generator().manual_seed(2)).bfloat16()
    args = (gate_up, w, thresholds, splits, scales, zeros, g)
    got = cpu.sparse_gemv_cpu(*args, gated=True, residual=residual)
    want = masked_product(*args, gated=True, residual=residual)
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)


def test_skipped_rows_are_never_read():
    """Rows of the weight whose inputs TEAL drops are NaN: a kernel that read them would say so."""
    x, w, thresholds, splits, *_ = dyadic_problem("fp", 0, m=1, splits=(96,))
    thresholds.fill_(1.1)
    w[x[0].float().abs() <= 1.1] = float("nan")
    out = cpu.sparse_gemv_cpu(x, w, thresholds, splits, None, None, 0)
    assert torch.isfinite(out).all()
    assert torch.equal(out, float64_product(x, w.nan_to_num(0.0), thresholds, splits, None, None, 0).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [256, 259])
def test_odd_widths_and_row_counts(dtype, k):
    """Segment widths that are not multiples of the vectors (bf16 reads 32 columns at a time) and
    kept-row counts that are not multiples of a pass (bf16: eight rows)."""
    x, w, thresholds, splits, *_ = dyadic_problem("fp", 0, k=k, splits=(18, 6, 40, 64))
    thresholds = torch.tensor([0.0, 1.1, 2.6, 0.3])
    x, w = x.to(dtype), w.to(dtype)
    assert torch.equal(cpu.sparse_gemv_cpu(x, w, thresholds, splits, None, None, 0),
                       float64_product(x, w, thresholds, splits, None, None, 0).to(dtype))


def test_op_runs_the_kernel_by_default(monkeypatch):
    """teal::sparse_gemv on the CPU: the C++ kernel unless TEAL_CPU_KERNELS says otherwise."""
    args = dyadic_problem("int4", 32)
    calls = []
    real = cpu.sparse_gemv_cpu
    monkeypatch.setattr(cpu, "sparse_gemv_cpu", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.delenv(CPU_KERNELS_ENV, raising=False)
    assert torch.equal(sparse_gemv(*args), float64_product(*args).bfloat16()) and calls == [1]
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    torch.testing.assert_close(sparse_gemv(*args).float(), float64_product(*args).float(), rtol=2**-7, atol=1e-3)
    assert calls == [1]


def sparse_tiny(fmt: str) -> torch.nn.Module:
    model = tiny_model(seed=2).to(torch.bfloat16)
    if fmt != "fp":
        quantize_model(model, fmt, 32)
    pack_model(model)
    sparsify(model, {n: [0.6] * len(m.split_sizes) for n, m in packed_projections(model).items()})
    return model


@torch.no_grad()
def decode_logits(model: torch.nn.Module, step, steps: int = 4) -> torch.Tensor:
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    model.setup_caches(1, 16)
    token = model(prompt, torch.arange(6))[:, -1:].argmax(-1)
    out = []
    for i in range(steps):
        logits = step(model, token, torch.tensor([6 + i]))
        out.append(logits.float())
        token = logits[:, -1:].argmax(-1)
    return torch.cat(out, 1)


def plain_step(model, token, pos):
    return model(token, pos)


@pytest.mark.parametrize("fmt", ["fp", "int8", "int4"])
def test_model_decode_native_matches_reference_eager_and_compiled(monkeypatch, fmt):
    """A sparse (and quantized) tiny model decodes the same through the kernel as through the
    plain-torch reference, eager and under torch.compile(fullgraph=True)."""
    model = sparse_tiny(fmt)
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    ref = decode_logits(model, plain_step)
    monkeypatch.setenv(CPU_KERNELS_ENV, "native")
    tol = dict(rtol=0.02, atol=0.02 * ref.abs().max().item())
    torch.testing.assert_close(decode_logits(model, plain_step), ref, **tol)
    if fmt == "int4":  # one compiled format keeps the suite's time down; the op is the same for all
        torch._dynamo.reset()
        torch.testing.assert_close(decode_logits(model, torch.compile(plain_step, fullgraph=True)), ref, **tol)


def float64_attention_step(qkv, cs, k_cache, v_cache, pos, n_head):
    """RoPE (float32, rounded to the cache dtype, as the model), then attention in float64 over 0..pos."""
    b, h_kv, _, d = k_cache.shape
    rot = lambda t: torch.stack([t[..., 0::2] * cs[:, 0] - t[..., 1::2] * cs[:, 1],
                                 t[..., 1::2] * cs[:, 0] + t[..., 0::2] * cs[:, 1]], -1).flatten(-2)
    q = rot(qkv[:, : n_head * d].float().view(b, n_head, d)).bfloat16()
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[:, :, pos] = rot(qkv[:, n_head * d: (n_head + h_kv) * d].float().view(b, h_kv, d)).bfloat16()
    v_cache[:, :, pos] = qkv[:, (n_head + h_kv) * d:].view(b, h_kv, d)
    k = k_cache[:, :, : pos + 1].double().repeat_interleave(n_head // h_kv, 1)
    v = v_cache[:, :, : pos + 1].double().repeat_interleave(n_head // h_kv, 1)
    probs = torch.softmax(torch.einsum("bhd,bhsd->bhs", q.double(), k) / d ** 0.5, -1)
    return torch.einsum("bhs,bhsd->bhd", probs, v), k_cache, v_cache


@pytest.mark.parametrize("pos", [0, 37, 300])
def test_attention_step_matches_float64(pos):
    """The C++ decode attention step (GQA 3:1, two sequences): cache rows written as the model
    writes them, output the float64 attention over 0..pos, and NaN beyond pos never read."""
    g = torch.Generator().manual_seed(pos)
    b, n_head, h_kv, d, s_max = 2, 6, 2, 64, 320
    qkv = torch.randn(b, (n_head + 2 * h_kv) * d, generator=g).bfloat16()
    angles = torch.rand(d // 2, generator=g) * 6.0
    cs = torch.stack([angles.cos(), angles.sin()], -1)
    k_cache = torch.randn(b, h_kv, s_max, d, generator=g).bfloat16()
    v_cache = torch.randn(b, h_kv, s_max, d, generator=g).bfloat16()
    k_cache[:, :, pos + 1:] = float("nan")
    v_cache[:, :, pos + 1:] = float("nan")
    want, k_want, v_want = float64_attention_step(qkv, cs, k_cache, v_cache, pos, n_head)
    out = cpu.decode_attention_step_cpu(qkv, cs, k_cache, v_cache, torch.tensor([pos]), n_head)
    filled = slice(0, pos + 1)
    assert torch.equal(k_cache[:, :, filled], k_want[:, :, filled])
    assert torch.equal(v_cache[:, :, filled], v_want[:, :, filled])
    torch.testing.assert_close(out.double(), want, rtol=2**-7, atol=2**-8)


@pytest.mark.parametrize("fmt,group", [("fp", 0), ("int4", 32)])
def test_spin_pool_gives_openmps_bits(monkeypatch, fmt, group):
    """TEAL_CPU_POOL=spin (our workers, the calling thread taking whatever block no worker has
    claimed) against at::parallel_for: the same blocks summed in the same order, so equal bit for
    bit; over many calls, some after a pause longer than the workers' spin (they sleep, then must
    be woken), and with the blocks split across the threads (weights over the one-thread limit)."""
    x, w, thresholds, splits, scales, zeros, _ = dyadic_problem(fmt, group, m=2, k=2048, splits=(512, 256))
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).bfloat16()  # inexact sums
    monkeypatch.setenv("TEAL_CPU_PARALLEL_BYTES", "0")  # every call over the threads
    monkeypatch.setenv("TEAL_CPU_POOL", "openmp")
    want = cpu.sparse_gemv_cpu(x, w, thresholds, splits, scales, zeros, group)
    monkeypatch.setenv("TEAL_CPU_POOL", "spin")
    for i in range(300):
        if i % 50 == 49:
            time.sleep(0.005)
        assert torch.equal(cpu.sparse_gemv_cpu(x, w, thresholds, splits, scales, zeros, group), want), f"call {i}"


def test_spin_pool_attention_step_matches_openmp(monkeypatch):
    g = torch.Generator().manual_seed(9)
    b, n_head, h_kv, d, s_max, pos = 2, 8, 4, 64, 600, 555  # long enough to run over the threads
    qkv = torch.randn(b, (n_head + 2 * h_kv) * d, generator=g).bfloat16()
    cs = torch.stack([torch.ones(d // 2), torch.zeros(d // 2)], -1)
    caches = torch.randn(2, b, h_kv, s_max, d, generator=g).bfloat16()
    outs = {}
    for pool in ("openmp", "spin", "spin"):
        monkeypatch.setenv("TEAL_CPU_POOL", pool)
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        outs.setdefault(pool, []).append(
            cpu.decode_attention_step_cpu(qkv, cs, k_cache, v_cache, torch.tensor([pos]), n_head))
    assert all(torch.equal(o, outs["openmp"][0]) for o in outs["spin"])


def test_bad_pool_name_is_one_clear_error(monkeypatch):
    x, w, thresholds, splits, scales, zeros, group = dyadic_problem("fp", 0)
    monkeypatch.setenv("TEAL_CPU_PARALLEL_BYTES", "0")
    monkeypatch.setenv("TEAL_CPU_POOL", "threads")
    with pytest.raises(RuntimeError, match="TEAL_CPU_POOL must be spin or openmp, got 'threads'"):
        cpu.sparse_gemv_cpu(x, w, thresholds, splits, scales, zeros, group)


def test_bench_cpu_interleaves_kernel_settings():
    """benchmarks/bench_cpu.py: every combination of one-thread limits and pools is one setting, and
    the table has one line per setting."""
    from benchmarks import bench_cpu
    assert bench_cpu.kernel_settings(None, None) == [{}]
    settings = bench_cpu.kernel_settings([131072], ["openmp", "spin"])
    assert settings == [{"TEAL_CPU_PARALLEL_BYTES": "131072", "TEAL_CPU_POOL": pool} for pool in ("openmp", "spin")]
    rows = [{"format": "bf16", "compiled": True, "sparsity": s, "tok_s": 10.0 + s, "realized": s,
             "setting": bench_cpu.setting_label(setting)} for setting in settings for s in (0.0, 0.5)]
    table = bench_cpu.markdown({"levels": [0.0, 0.5], "formats": ["bf16"], "rows": rows, "date": "d", "machine": "m",
                                "threads": 2, "tokens": 8, "runs": 1, "kernel": "k", "command": "c"})
    lines = [ln for ln in table.splitlines() if ln.startswith("| bf16")]
    assert lines == ["| bf16 | compiled, TEAL_CPU_PARALLEL_BYTES=131072, TEAL_CPU_POOL=openmp | 10.0 (0%) | 10.5 (50%) |",
                     "| bf16 | compiled, TEAL_CPU_PARALLEL_BYTES=131072, TEAL_CPU_POOL=spin | 10.0 (0%) | 10.5 (50%) |"]
