"""Tests of teal_kernels/preload_gemv.py (the dense decode GEMV of small float matrices, weights loaded
before the kernel waits on its input) against float64 math, and of PackedLinear's choice of it.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (conftest.py) on tiny shapes; the GPU tests
use SmolLM2-135M's and Llama-3.2-1B's shapes.
"""
import pytest
import torch
from fixtures import DEVICE, HAS_CUDA, needs_cuda

import linear
from linear import PRELOAD_ENV, PackedLinear
from teal_kernels.ops import dense_gemv
from teal_kernels.preload_gemv import MAX_K, dense_gemv_preload, preload_config, preload_fits
from teal_kernels.reference import masked_product

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


def problem(m: int, k: int, n: int, gated: bool = False, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, 2 * k if gated else k, generator=g) * 2).to(dtype).to(DEVICE)
    w = (torch.randn(k, n, generator=g) / k**0.5).to(dtype).to(DEVICE)
    return x, w


def want64(x: torch.Tensor, w: torch.Tensor, gated: bool, residual, norm_weight, eps: float):
    """float64 math on the kernel's input as the unfused model rounds it (SiLU(gate) * up and
    RMSNorm's two roundings to x's dtype), and the bound of the sum's rounding error."""
    if gated:
        gate, up = x.double().chunk(2, dim=-1)
        xin = (gate * torch.sigmoid(gate) * up).to(x.dtype).double()
    elif norm_weight is not None:
        h = x.double()
        normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
        xin = (normed * norm_weight.double()).to(x.dtype).double()
    else:
        xin = x.double()
    out = xin @ w.double()
    scale = xin.abs() @ w.double().abs()
    rounded = torch.zeros_like(out)  # what was rounded to x's dtype before the end: its ulp may differ
    if residual is not None:
        rounded = out.abs()
        out = out.to(x.dtype).double() + residual.double()  # the product rounds before the add
    return out, scale, rounded


def assert_close64(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rounded: torch.Tensor,
                   rounded_input: bool = False) -> None:
    """Within a rounding to bf16/fp16 of the result and of what was rounded on the way (the product
    before a residual add), plus fp32 accumulation error; with `rounded_input` (SiLU(gate) * up, the norm) also one ulp of every input
    term, as the kernel's rounding of an input may differ from torch's by one (the interpreter
    truncates)."""
    eps = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-10
    assert torch.isfinite(got).all()
    tol = 1.01 * eps * (want.abs() + rounded) + (eps if rounded_input else 2.0**-16) * scale + 1e-6
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


CASES = [  # (m, k, n, gated, residual, norm)
    (1, 40, 16, False, False, False),
    (1, 100, 70, False, True, False),  # K and N off every power of two: masked rows and columns
    (3, 64, 48, True, True, False),  # down's prologue and epilogue, three batch rows
    (2, 96, 40, False, False, True),  # RMSNorm prologue
    (8, 33, 17, True, False, False),
]


@pytest.mark.parametrize("m,k,n,gated,residual,norm", CASES)
def test_kernel_matches_float64(m, k, n, gated, residual, norm):
    x, w = problem(m, k, n, gated)
    g = torch.Generator().manual_seed(1)
    res = (torch.randn(m, n, generator=g)).to(x.dtype).to(DEVICE) if residual else None
    nw = (torch.rand(k, generator=g) + 0.5).to(x.dtype).to(DEVICE) if norm else None
    got = dense_gemv_preload(x, w, gated, res, nw, 1e-5)
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert_close64(got, *want64(x, w, gated, res, nw, 1e-5), rounded_input=gated or norm)


def test_fp16_and_the_op_match_the_reference():
    x, w = problem(2, 48, 32, dtype=torch.float16, seed=3)
    got = dense_gemv(x, w)
    assert got.dtype == torch.float16
    assert_close64(got, *want64(x, w, False, None, None, 0.0))
    ref = masked_product(x, w, torch.zeros(1, device=DEVICE), [32], None, None, 0)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3)


def test_a_row_does_not_depend_on_the_rows_beside_it():
    """Speculation's verify multiplies K + 1 rows where plain decoding multiplies one: each row of
    a batch must come out with the bits it has alone."""
    x, w = problem(5, 72, 40, gated=True, seed=4)
    res = torch.randn(5, 40, generator=torch.Generator().manual_seed(5)).to(x.dtype).to(DEVICE)
    batch = dense_gemv_preload(x, w, True, res)
    for i in range(5):
        assert torch.equal(dense_gemv_preload(x[i:i + 1], w, True, res[i:i + 1]), batch[i:i + 1])


@pytest.mark.parametrize("call,match", [
    (lambda x, w: dense_gemv_preload(x.float(), w.float()), "bf16/fp16"),
    (lambda x, w: dense_gemv_preload(x[:, :-1], w), "needs 64"),
    (lambda x, w: dense_gemv_preload(x.repeat(5, 1), w), "1 <= M <= 8"),
    (lambda x, w: dense_gemv_preload(x, w, residual=torch.zeros(3, dtype=x.dtype, device=x.device)), "residual"),
    (lambda x, w: dense_gemv_preload(x.repeat(1, 2), w, norm_weight=torch.ones(64, dtype=x.dtype, device=x.device),
                                     gated=True), "exclude"),
    (lambda x, w: dense_gemv_preload(torch.zeros(1, MAX_K + 1, dtype=x.dtype, device=x.device),
                                     torch.zeros(MAX_K + 1, 16, dtype=x.dtype, device=x.device)), "MAX_K"),
])
def test_bad_inputs_are_refused_in_one_line(call, match):
    x, w = problem(2, 64, 32)
    with pytest.raises(ValueError, match=match) as e:
        call(x, w)
    assert "\n" not in str(e.value)


def test_config_and_fit_rules():
    """The tile holds the whole K at least 16 columns wide; a grid of more than two programs an SM
    (the later waves would preload nothing) or K above MAX_K is refused."""
    assert preload_config(576) == (1024, 16, 4)
    assert preload_config(200) == (256, 64, 4)
    assert preload_config(2048) == (2048, 16, 8)
    assert preload_fits(576, 3072, 132) and preload_fits(1536, 576, 132)
    assert not preload_fits(2049, 64, 132)
    assert not preload_fits(2048, 16 * 265, 132) and preload_fits(2048, 16 * 264, 132)


def test_packed_linear_takes_the_kernel_only_on_cuda_for_dense_small_float(monkeypatch):
    """The one decision: dense float calls of up to MAX_BATCH rows on a CUDA device where the
    matrix fits; TEAL_PRELOAD_GEMV=0, read when the module is built, keeps cuBLAS (a bad value
    fails there); CPU calls never take it."""
    assert not linear.preload_gemv_fits(torch.device("cpu"), 576, 960)
    if HAS_CUDA:
        cuda = torch.device("cuda")
        assert linear.preload_gemv_fits(cuda, 576, 960)
        assert not linear.preload_gemv_fits(cuda, 4096, 6144)
    assert PackedLinear(576, 960).preload_allowed
    monkeypatch.setenv(PRELOAD_ENV, "0")
    assert not PackedLinear(576, 960).preload_allowed
    monkeypatch.setenv(PRELOAD_ENV, "2")
    with pytest.raises(ValueError, match=f"{PRELOAD_ENV} must be 0 or 1"):
        PackedLinear(576, 960)


@needs_cuda
@pytest.mark.parametrize("k,n,gated,residual,norm", [
    (576, 960, False, False, True),  # SmolLM2-135M q|k|v with the norm
    (576, 576, False, True, False),  # o + residual
    (576, 3072, False, False, True),  # gate|up with the norm
    (1536, 576, True, True, False),  # down, gated, + residual
    (2048, 3072, False, False, True),  # Llama-3.2-1B q|k|v
])
@pytest.mark.parametrize("m", [1, 4])
def test_gpu_small_model_shapes(k, n, gated, residual, norm, m):
    x, w = problem(m, k, n, gated, seed=k + n)
    g = torch.Generator().manual_seed(7)
    res = torch.randn(m, n, generator=g).to(x.dtype).cuda() if residual else None
    nw = (torch.rand(k, generator=g) + 0.5).to(x.dtype).cuda() if norm else None
    assert_close64(dense_gemv_preload(x, w, gated, res, nw, 1e-5), *want64(x, w, gated, res, nw, 1e-5),
                   rounded_input=gated or norm)


@needs_cuda
def test_gpu_packed_linear_dense_call_runs_the_kernel_and_matches_cublas():
    """SmolLM2's gate|up as PackedLinear: the dense one-row call (preload kernel) equals cuBLAS's
    product within bf16 rounding; with the kernel not allowed (TEAL_PRELOAD_GEMV=0) it is cuBLAS's
    product itself."""
    lin = torch.nn.Linear(576, 3072, bias=False).to("cuda", torch.bfloat16)
    packed = PackedLinear.from_linear(lin, [1536, 1536])
    x = torch.randn(1, 1, 576, device="cuda", dtype=torch.bfloat16)
    got = packed(x)
    torch.testing.assert_close(got.float(), lin(x).float(), rtol=2e-2, atol=2e-2)
    assert_close64(got[0], *want64(x[0], packed.weight, False, None, None, 0.0))
    packed.preload_allowed = False
    assert torch.equal(packed(x)[0], x[0] @ packed.weight)
