"""PackedLinear, the one dispatch point: the model -> op -> kernel path on the CPU (the Triton
kernel in the interpreter), the batch limit, and a dense model without Triton."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from fixtures import ROOT, tiny_model

from teal_kernels.ops import CPU_KERNELS_ENV
from teal_kernels.reference import MAX_BATCH
from linear import PackedLinear, pack_model, packed_projections, sparse_kernel_takes_norm
from quantize import quantize_model
from teal import sparsify


def sparse_tiny(fmt: str) -> torch.nn.Module:
    """Tiny bf16 model, projections packed (and quantized), TEAL at thresholds that skip about
    half of every projection's inputs."""
    model = tiny_model(seed=2).to(torch.bfloat16)
    if fmt != "fp":
        quantize_model(model, fmt, 32)
    pack_model(model)
    for m in packed_projections(model).values():
        m.thresholds.fill_(0.6)
    sparsify(model, {n: m.thresholds.tolist() for n, m in packed_projections(model).items()})
    return model


@torch.no_grad()
def greedy_decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    model.setup_caches(1, prompt.shape[1] + steps)
    logits = model(prompt, torch.arange(prompt.shape[1]))
    tokens, all_logits = [], []
    for i in range(steps):
        token = logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        logits = model(token, torch.tensor([prompt.shape[1] + i]))  # a decode step: the op path
        all_logits.append(logits.float())
    return tokens, torch.cat(all_logits, 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU routing test")
@pytest.mark.parametrize("fmt", ["fp", "int8", "int4"])
def test_decode_through_the_interpreted_kernel_matches_the_reference(monkeypatch, fmt):
    """The same model decoded with the op's CPU reference and with the Triton kernel (interpreter):
    the kernel path is what runs on a GPU, so this tests model -> PackedLinear -> op -> kernel."""
    model = sparse_tiny(fmt)
    prompt = torch.randint(0, 256, (1, MAX_BATCH + 4), generator=torch.Generator().manual_seed(3))
    calls = []
    import teal_kernels.triton_gemv as triton_gemv
    real = triton_gemv.sparse_gemv_triton
    monkeypatch.setattr(triton_gemv, "sparse_gemv_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    ref_tokens, ref_logits = greedy_decode(model, prompt, 4)
    assert not calls
    monkeypatch.setenv(CPU_KERNELS_ENV, "interpreter")
    tokens, logits = greedy_decode(model, prompt, 4)
    assert len(calls) == 4 * 4 * 2  # 4 projections x 2 layers x 4 steps
    torch.testing.assert_close(logits, ref_logits, rtol=0.02, atol=0.02 * ref_logits.abs().max().item())
    assert tokens == ref_tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU routing test")
def test_dense_calls_ask_for_the_dense_config(monkeypatch):
    """A decode call without thresholds tells the kernel so (`dense`: the tuned table's config for
    0%, where it has one); a sparse call does not."""
    model = sparse_tiny("int8")
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(3))
    seen = []
    import teal_kernels.triton_gemv as triton_gemv
    real = triton_gemv.sparse_gemv_triton
    monkeypatch.setattr(triton_gemv, "sparse_gemv_triton", lambda *a, **k: seen.append(k["dense"]) or real(*a, **k))
    monkeypatch.setenv(CPU_KERNELS_ENV, "interpreter")
    greedy_decode(model, prompt, 1)
    assert seen == [True] * 8 + [False] * 8  # 4 projections x 2 layers: the prompt (dense), then a decode step
    for module in packed_projections(model).values():
        module.sparse = False
    seen.clear()
    greedy_decode(model, prompt, 1)
    assert seen == [True] * 16


def test_batches_above_the_kernel_limit_use_the_reference(monkeypatch):
    """Nine rows (one prompt of nine tokens) cannot go to the kernel; the result is still exact."""
    layer = PackedLinear(64, 48, [16, 32], dtype=torch.bfloat16)
    layer.weight.copy_(torch.randn(64, 48))
    layer.thresholds.copy_(torch.tensor([0.5, 1.0]))
    layer.sparse = layer.sparse_prefill = True
    x = torch.randn(1, MAX_BATCH + 1, 64).bfloat16()
    monkeypatch.setenv(CPU_KERNELS_ENV, "no such implementation")  # the op must not be called
    out = layer(x).double()
    xd, w = x.double()[0], layer.weight.double()
    want = torch.cat([torch.where(xd.abs() > 0.5, xd, 0) @ w[:, :16], torch.where(xd.abs() > 1.0, xd, 0) @ w[:, 16:]], 1)
    torch.testing.assert_close(out[0], want, rtol=2**-7, atol=1e-2)
    with pytest.raises(ValueError, match="TEAL_CPU_KERNELS"):  # while a decode-sized call does reach it
        layer(x[:, :1])


def test_dense_generation_without_triton(tiny_ckpt):
    """Triton is optional: with it unimportable, generate.py still runs a dense model."""
    code = ("import sys; sys.modules['triton'] = None; import generate; "
            f"sys.argv = ['generate.py', '--checkpoint_path', {str(tiny_ckpt)!r}, '--max_new_tokens', '3', "
            "'--temperature', '0', '--device', 'cpu']; "
            "generate.run(generate.parse_args())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stdout


def test_speed_table_lookup_interpolates_and_falls_back(monkeypatch):
    """The measured table decides per shape and sparsity; unmeasured shapes get no measured verdict."""
    import teal_kernels.speed_table as st
    key = st.table_key("Fake GPU", "bf16", 1, 64, 48)
    monkeypatch.setattr(st, "speed_table", lambda: {key: {"dense_us": 10.0, "sparse_us": {"0": 14.0, "0.5": 8.0}}})
    assert st.sparse_beats_dense("Fake GPU", "bf16", 1, 64, 48, 0.1) is False  # 12.8 µs
    assert st.sparse_beats_dense("Fake GPU", "bf16", 1, 64, 48, 0.4) is True  # 9.2 µs
    assert st.sparse_beats_dense("Fake GPU", "fp16", 1, 64, 48, 0.9) is True  # fp16 -> bf16, clamped
    assert st.sparse_beats_dense("Fake GPU", "bf16", 4, 64, 48, 0.9) is None  # a batch never borrows M1's entry
    assert st.sparse_beats_dense("Fake GPU", "int8", 1, 64, 48, 0.5) is None
    assert st.sparse_beats_dense("Other GPU", "bf16", 1, 64, 48, 0.5) is None
    # an H100 without entries of its own reads the H200's (speed_table.STAND_INS), its own first
    h200 = st.table_key("NVIDIA H200", "bf16", 1, 64, 48)
    h100 = st.table_key("NVIDIA H100 80GB HBM3", "bf16", 1, 64, 48)
    monkeypatch.setattr(st, "speed_table", lambda: {h200: {"dense_us": 10.0, "sparse_us": {"0.5": 8.0}}})
    assert st.sparse_beats_dense("NVIDIA H100 80GB HBM3", "bf16", 1, 64, 48, 0.5) is True
    assert st.measured_on("NVIDIA H100 80GB HBM3", "fp16", 1, 64, 48) == "NVIDIA H200"
    monkeypatch.setattr(st, "speed_table", lambda: {h200: {"dense_us": 10.0, "sparse_us": {"0.5": 8.0}},
                                                    h100: {"dense_us": 10.0, "sparse_us": {"0.5": 12.0}}})
    assert st.sparse_beats_dense("NVIDIA H100 80GB HBM3", "bf16", 1, 64, 48, 0.5) is False
    assert st.measured_on("NVIDIA H100 80GB HBM3", "bf16", 1, 64, 48) == "NVIDIA H100 80GB HBM3"
    assert st.sparse_beats_dense("NVIDIA H200", "bf16", 1, 64, 48, 0.5) is True
    assert st.measured_on("NVIDIA H200", "bf16", 1, 64, 48, "tinygemm_us") is None  # no such time
    monkeypatch.setattr(st, "speed_table", lambda: {h200: {"dense_us": 10.0, "tinygemm_us": 9.0, "sparse_us": {"0.5": 8.0}},
                                                    h100: {"dense_us": 10.0, "sparse_us": {"0.5": 12.0}}})
    assert st.measured_on("NVIDIA H100 80GB HBM3", "bf16", 1, 64, 48, "tinygemm_us") is None  # own entry, key by key
    monkeypatch.setattr(st, "speed_table", lambda: {key: {"dense_us": 10.0, "sparse_us": {"0": 14.0, "0.5": 8.0}}})

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    layer = PackedLinear(64, 48, [16, 32], dtype=torch.bfloat16)
    assert layer.sparse_kernel_pays(torch.device("cuda")) is None  # no target sparsity yet
    layer.set_target_sparsity([0.1, 0.1])
    assert layer.sparse_kernel_pays(torch.device("cuda")) is False
    assert layer.sparse_kernel_pays(torch.device("cpu")) is None
    layer.set_target_sparsity([0.7, 0.25])  # width-weighted: 0.4
    assert layer.target_sparsity == pytest.approx(0.4)
    assert layer.sparse_kernel_pays(torch.device("cuda")) is True


def test_the_verdict_is_a_constant_to_torch_compile(monkeypatch):
    """A compiled decode step whose first call reaches a projection's verdict compiles into one
    graph: Dynamo can trace neither the GPU's name nor the read of the speed table's file (on the
    H200 such a step failed until linear.kernel_verdict_for was a compile-time constant)."""
    import teal_kernels.speed_table as st
    st.speed_table.cache_clear()  # the file is read inside the compiled call
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    layer = PackedLinear(4096, 4096, [4096], dtype=torch.bfloat16)
    layer.set_target_sparsity([0.5])
    cuda = torch.device("cuda")
    want = st.sparse_beats_dense("NVIDIA H200", "bf16", 1, 4096, 4096, 0.5)
    assert want is not None  # the committed table measured this shape

    @torch.compile(backend="eager", fullgraph=True)
    def step(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if layer.sparse_kernel_pays(cuda) else x - 1

    torch._dynamo.reset()
    assert step(torch.zeros(2)).tolist() == ([1.0, 1.0] if want else [-1.0, -1.0])
    assert layer.kernel_verdict(cuda) == (want, "NVIDIA H200")


def test_unmeasured_shapes_follow_the_size_model(monkeypatch):
    """Without a table entry the size model decides: small bf16 matrices stay dense (SmolLM2's
    on the H200: kernel 6.7 us per call, cuBLAS 3.7), large ones go sparse once the skipped bytes
    pay for the kernel's fixed cost; int8/int4 (no other decode path) always skip; the model
    agrees with every bf16 row of the run it was fitted to; dense_fallbacks reports both kinds."""
    import json
    from pathlib import Path

    import teal_kernels.speed_table as st
    from teal import dense_fallbacks
    assert not st.estimated_sparse_beats_dense("bf16", 576, 1536, 0.5)
    assert st.estimated_sparse_beats_dense("bf16", 4096, 28672, 0.5)
    assert not st.estimated_sparse_beats_dense("fp16", 4096, 4096, 0.25)
    assert st.estimated_sparse_beats_dense("int8", 576, 1536, 0.1)
    # a batch reads the union of its rows' kept rows: Llama-3-8B's gate|up at 50% pays for one
    # row, not for 4 (measured 0.91x of dense on the H200, results/context_batch/)
    assert not st.estimated_sparse_beats_dense("bf16", 4096, 28672, 0.5, rows=4)
    assert st.estimated_sparse_beats_dense("bf16", 4096, 28672, 0.95, rows=4)
    assert st.estimated_sparse_beats_dense("int4-g128", 4096, 28672, 0.5, rows=8)
    rows = json.loads((Path(__file__).parents[1] / "benchmarks/results/kernels_llama3_8b_planes.json").read_text())
    for r in rows["results"]:
        if r["format"] == "bf16" and r["sparsity"] >= 0.4:
            assert st.estimated_sparse_beats_dense("bf16", r["K"], r["N"], r["sparsity"]) == \
                (r["sparse_us"] < r["matmul_us"]), r

    monkeypatch.setattr(st, "speed_table", lambda: {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    layer = PackedLinear(64, 48, [16, 32], dtype=torch.bfloat16)
    layer.set_target_sparsity([0.5, 0.5])
    assert layer.kernel_verdict(torch.device("cuda")) == (False, None)
    big = PackedLinear(4096, 28672, [14336, 14336], dtype=torch.bfloat16, device="meta")  # 8B's gate|up
    big.set_target_sparsity([0.5, 0.5])
    assert big.kernel_verdict(torch.device("cuda"), rows=1) == (True, None)
    assert big.kernel_verdict(torch.device("cuda"), rows=4) == (False, None)  # the batch's union
    layer.sparse = True
    projections = {"layers.0.attention.wo": layer}
    monkeypatch.setattr(sys.modules["teal.sparsify"], "packed_projections", lambda model: projections)
    assert dense_fallbacks(None, torch.device("cuda")) == (["layers.0.attention.wo"], ["layers.0.attention.wo"], [])
    assert dense_fallbacks(None, torch.device("cpu")) == ([], [], [])


def test_verdicts_from_a_stand_in_are_reported(monkeypatch):
    """A projection decided by the stand-in GPU's entry (an H100 reading the H200's) is reported as
    borrowed, not as unmeasured; the GPU's own entry is neither."""
    import teal_kernels.speed_table as st
    from teal import dense_fallbacks
    h200 = st.table_key("NVIDIA H200", "bf16", 1, 64, 48)
    monkeypatch.setattr(st, "speed_table", lambda: {h200: {"dense_us": 10.0, "sparse_us": {"0.5": 8.0}}})
    layer = PackedLinear(64, 48, [48], dtype=torch.bfloat16)
    layer.set_target_sparsity([0.5])
    layer.sparse = True
    monkeypatch.setattr(sys.modules["teal.sparsify"], "packed_projections", lambda model: {"layers.0.attention.wo": layer})
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert layer.kernel_verdict(cuda) == (True, "NVIDIA H200")
    assert dense_fallbacks(None, cuda) == ([], [], ["layers.0.attention.wo"])
    layer._kernel_pays.clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert dense_fallbacks(None, cuda) == ([], [], [])


def test_a_projection_the_table_calls_slower_stays_dense(monkeypatch):
    """When the verdict is 'slower', a decode call takes the dense path and skips nothing."""
    layer = PackedLinear(64, 48, [16, 32], dtype=torch.bfloat16)
    layer.weight.copy_(torch.randn(64, 48))
    layer.thresholds.copy_(torch.tensor([0.5, 1.0]))
    layer.sparse = True
    x = torch.randn(1, 1, 64).bfloat16()
    assert layer.applies_sparsity(x)
    monkeypatch.setattr(PackedLinear, "sparse_kernel_pays", lambda self, device, rows=1: False)
    assert not layer.applies_sparsity(x)
    assert layer.applies_sparsity(x.expand(1, MAX_BATCH + 1, 64)) is False  # not a decode step, no prefill
    layer.sparse_prefill = True
    assert layer.applies_sparsity(x.expand(1, MAX_BATCH + 1, 64))  # prefill-sized: quality work, sparse
    torch.testing.assert_close(layer(x).float(), (x.float() @ layer.weight.float()), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("fmt", ["fp", "int8", "int4"])
def test_sparse_kernel_takes_the_norm_where_measured_faster(fmt):
    """By default the sparse GEMV computes a handed RMSNorm at one row only (faster on the H200
    there for every format); TEAL_FUSED_NORM's value overrides it."""
    assert sparse_kernel_takes_norm(fmt, 1, None)
    assert not sparse_kernel_takes_norm(fmt, 4, None)
    assert sparse_kernel_takes_norm(fmt, 4, True) and not sparse_kernel_takes_norm(fmt, 1, False)
    assert not sparse_kernel_takes_norm(fmt, MAX_BATCH + 1, True)  # a short prefill never takes it
