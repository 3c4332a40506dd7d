"""Tests of the dense int4 GEMM for prefill-sized batches (teal_kernels/triton_gemv.py's
`int4_gemm_triton`, the `teal::int4_gemm` op) against float64 math on the dequantized weights, its
bad inputs, and PackedLinear's use of it (TEAL_INT4_GEMM=1, CUDA only).

Without CUDA the kernel runs under TRITON_INTERPRET=1 (conftest.py) on small shapes.
"""
import pytest
import torch
from fixtures import DEVICE, HAS_CUDA, needs_cuda

from quantize import quantize_projection
from teal_kernels.ops import int4_gemm
from teal_kernels.triton_gemv import int4_gemm_fits, int4_gemm_triton

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


def problem(m: int, k: int, n: int, group_size: int, dtype=torch.bfloat16, seed: int = 0):
    """x [M, K] and random packed int4 codes with positive scales and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randint(0, 256, (k, n // 2), generator=g, dtype=torch.uint8).to(DEVICE)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.1 + 0.01).to(DEVICE)
    zeros = (torch.randn(k // group_size, n, generator=g) * 0.05).to(DEVICE)
    return x, w, scales, zeros


def weight64(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The format's definition in float64: low nibble = even column, W = s * (q - 8) + z per group."""
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1).double() - 8.0
    rep = lambda t: t.double().repeat_interleave(group_size, dim=0)  # noqa: E731
    return q * rep(scales) + rep(zeros)


def assert_close64(got: torch.Tensor, x: torch.Tensor, w64: torch.Tensor) -> None:
    """Within one rounding of the result to x's dtype plus fp32 accumulation error."""
    want = x.double() @ w64
    scale = x.double().abs() @ w64.abs()
    eps = 2.0**-7 if got.dtype == torch.bfloat16 else 2.0**-10
    assert got.shape == want.shape and got.dtype == x.dtype and torch.isfinite(got).all()
    err = (got.double() - want).abs()
    tol = 1.01 * eps * want.abs() + 1e-5 * scale + 1e-30
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("m,k,n,group_size,dtype", [
    (20, 256, 256, 128, torch.bfloat16),  # M not a multiple of the row block
    (70, 128, 128, 32, torch.float16),  # two row blocks, a group shorter than the K tile
    (3, 128, 384, 64, torch.bfloat16),  # decode-sized M works too, three column blocks
])
def test_matches_float64(m, k, n, group_size, dtype):
    x, w, scales, zeros = problem(m, k, n, group_size, dtype)
    w64 = weight64(w, scales, zeros, group_size)
    assert_close64(int4_gemm_triton(x, w, scales, zeros, group_size), x, w64)
    assert_close64(int4_gemm(x, w, scales, zeros, group_size), x, w64)  # the op


def test_fits_and_bad_inputs():
    """Whole 128-column blocks only; wrong dtypes, shapes and layouts are one-line errors."""
    assert int4_gemm_fits(4096, 28672, 128) and not int4_gemm_fits(576, 960, 64)
    x, w, scales, zeros = problem(4, 128, 128, 64)
    with pytest.raises(TypeError, match="bf16/fp16 x and packed int4"):
        int4_gemm_triton(x.float(), w, scales, zeros, 64)
    with pytest.raises(ValueError, match="N a multiple of 128"):
        int4_gemm_triton(x, w[:, :32].contiguous(), scales[:, :64].contiguous(), zeros[:, :64].contiguous(), 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        int4_gemm_triton(x, w, scales, zeros, 48)
    with pytest.raises(ValueError, match="contiguous"):
        int4_gemm_triton(x.t().contiguous().t(), w, scales, zeros, 64)


@needs_cuda
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])  # Llama-3-8B's q|k|v and down
def test_gpu_llama_shapes(k, n):
    x, w, scales, zeros = problem(200, k, n, 128)
    want = x.float() @ weight64(w, scales, zeros, 128).float()
    got = int4_gemm_triton(x, w, scales, zeros, 128)
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def gemm_calls(monkeypatch) -> list:
    """Record PackedLinear's calls of the int4 GEMM op (they still run)."""
    import linear
    calls, real = [], linear.int4_gemm
    monkeypatch.setattr(linear, "int4_gemm", lambda *args: calls.append(args[0].shape) or real(*args))
    return calls


def int4_layers(w_t: torch.Tensor, split_sizes: list[int], monkeypatch):
    """The same int4 projection built with TEAL_INT4_GEMM off and on (read at construction)."""
    layers = []
    for switch in ("0", "1"):
        monkeypatch.setenv("TEAL_INT4_GEMM", switch)
        layers.append(quantize_projection(w_t, split_sizes, "int4", 128))
    assert not layers[0].int4_gemm_allowed and layers[1].int4_gemm_allowed
    return layers


@needs_cuda
def test_gpu_packed_linear_prefill_takes_it(monkeypatch):
    """With TEAL_INT4_GEMM=1 an int4 PackedLinear's dense prefill on CUDA runs the int4 GEMM and
    agrees with the default path (dequantize and multiply), with gate|up's prologue and a residual
    too; with the switch off it does not run."""
    g = torch.Generator().manual_seed(1)
    w_t = (torch.randn(1024, 2048, generator=g) / 32).to(torch.bfloat16).cuda()
    x = torch.randn(2, 40, 2048, generator=g).to(torch.bfloat16).cuda()
    res = torch.randn(2, 40, 1024, generator=g).to(torch.bfloat16).cuda()
    calls = gemm_calls(monkeypatch)
    off, on = int4_layers(w_t, [1024, 1024], monkeypatch)
    want = off(x[..., :1024])
    assert not calls
    torch.testing.assert_close(on(x[..., :1024]).float(), want.float(), rtol=1e-2, atol=1e-2 * want.abs().max().item())
    down_off, down_on = int4_layers(w_t[:, :1024].contiguous(), [1024], monkeypatch)
    want = down_off(x, gated=True, residual=res)
    torch.testing.assert_close(down_on(x, gated=True, residual=res).float(), want.float(), rtol=1e-2,
                               atol=1e-2 * want.abs().max().item())
    assert len(calls) == 2  # both "on" layers, neither "off" one


def test_packed_linear_off_cuda_keeps_the_reference(monkeypatch):
    """Off CUDA the switch changes nothing: prefill stays dequantize-and-multiply, bit for bit."""
    calls = gemm_calls(monkeypatch)
    w_t = torch.randn(256, 256).to(torch.bfloat16)
    off, on = int4_layers(w_t, [256], monkeypatch)
    x = torch.randn(1, 20, 256).to(torch.bfloat16)
    assert torch.equal(on(x), off(x))
    assert not calls


@pytest.mark.parametrize("args,code,message", [
    (["--model", "Llama-9"], 2, "error: unknown model name 'Llama-9'"),
    (["--tokens", "0"], 2, "error: --tokens must be positive, got [0]"),
])
def test_bench_prefill_bad_arguments(args, code, message, capsys):
    """Checked before any timing (or the GPU check): one line, exit 2."""
    from benchmarks.bench_prefill import main
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


@pytest.mark.skipif(HAS_CUDA, reason="the message of a machine without a GPU")
def test_bench_prefill_needs_a_gpu(capsys):
    from benchmarks.bench_prefill import main
    assert main([]) == 1
    assert capsys.readouterr().err.strip() == "error: bench_prefill needs a CUDA GPU"
