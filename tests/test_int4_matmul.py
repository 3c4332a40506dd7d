"""Tests of the int4 matmul for short prefills (teal_kernels/int4_matmul.py's `int4_matmul_triton`,
the `teal::int4_matmul` op) against float64 math on the dequantize pass's bf16/fp16 weights, its
bad inputs, and PackedLinear's use of it (TEAL_INT4_MATMUL=1, CUDA only).

Without CUDA the kernel runs under TRITON_INTERPRET=1 (conftest.py) on small shapes.
"""
import pytest
import torch
from fixtures import DEVICE, needs_cuda, random_int4, recorded_calls

from quantize import quantize_projection
from teal_kernels.int4_matmul import int4_matmul_triton
from teal_kernels.ops import int4_matmul
from teal_kernels.reference import dequantize_weight

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


def problem(m: int, k: int, n: int, group_size: int, dtype=torch.bfloat16, seed: int = 0):
    """x [M, K] and random packed int4 codes with positive scales and signed zeros."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return (x.to(DEVICE), *random_int4(k, n, group_size, seed))


def assert_matches(got: torch.Tensor, x: torch.Tensor, w, scales, zeros, group_size: int) -> None:
    """Against float64 math on the weights rounded to x's dtype (what the kernel multiplies): within
    one rounding of the output plus float32 accumulation error."""
    w64 = dequantize_weight(w, scales, zeros, group_size).to(x.dtype).double()
    want = x.double() @ w64
    scale = x.double().abs() @ w64.abs()
    eps = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-11
    assert got.shape == want.shape and got.dtype == x.dtype
    err = (got.double() - want).abs()
    tol = 1.01 * eps * want.abs() + 1e-5 * scale + 1e-30
    assert (err <= tol).all(), f"max excess {(err - tol).max().item():.3g}"


@pytest.mark.parametrize("m,k,n,group_size,dtype,block_m", [
    (20, 256, 256, 128, torch.bfloat16, 16),  # M not whole row blocks, two column blocks, two K tiles a group
    (70, 128, 200, 32, torch.float16, 64),  # N not whole column blocks, a group shorter than the K tile
    (3, 192, 128, 64, torch.bfloat16, 16),  # decode-sized M, three groups
])
def test_matches_float64(m, k, n, group_size, dtype, block_m):
    x, w, scales, zeros = problem(m, k, n, group_size, dtype)
    assert_matches(int4_matmul_triton(x, w, scales, zeros, group_size, block_m=block_m), x, w, scales, zeros,
                   group_size)
    assert_matches(int4_matmul(x, w, scales, zeros, group_size), x, w, scales, zeros, group_size)  # the op


def test_bad_inputs():
    """Wrong dtypes, shapes and layouts are one-line errors."""
    x, w, scales, zeros = problem(4, 128, 128, 64)
    with pytest.raises(TypeError, match="bf16/fp16 x and packed int4"):
        int4_matmul_triton(x.float(), w, scales, zeros, 64)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N/2\]"):
        int4_matmul_triton(x[:, :64].contiguous(), w, scales, zeros, 64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        int4_matmul_triton(x, w, scales, zeros, 48)
    with pytest.raises(ValueError, match="zeros must be float32"):
        int4_matmul_triton(x, w, scales, zeros[:, :64], 64)
    with pytest.raises(ValueError, match="contiguous"):
        int4_matmul_triton(x.t().contiguous().t(), w, scales, zeros, 64)


@needs_cuda
@pytest.mark.parametrize("m,k,n", [(128, 4096, 6144), (300, 14336, 4096)])  # Llama-3-8B's q|k|v and down
def test_gpu_llama_shapes(m, k, n):
    x, w, scales, zeros = problem(m, k, n, 128)
    want = x.float() @ dequantize_weight(w, scales, zeros, 128).to(x.dtype).float()
    for block_m in (16, 64, 128):
        got = int4_matmul_triton(x, w, scales, zeros, 128, block_m=block_m)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def matmul_calls(monkeypatch) -> list:
    """Record PackedLinear's calls of the int4 matmul op (they still run)."""
    import linear
    return recorded_calls(monkeypatch, linear, "int4_matmul")


def int4_layers(w_t: torch.Tensor, split_sizes: list[int], monkeypatch):
    """The same int4 projection built with TEAL_INT4_MATMUL off and on (read at construction)."""
    layers = []
    for switch in ("0", "1"):
        monkeypatch.setenv("TEAL_INT4_MATMUL", switch)
        layers.append(quantize_projection(w_t, split_sizes, "int4", 128))
    assert not layers[0].int4_matmul_allowed and layers[1].int4_matmul_allowed
    return layers


@needs_cuda
def test_gpu_packed_linear_prefill_takes_it(monkeypatch):
    """With TEAL_INT4_MATMUL=1 an int4 PackedLinear's dense prefill on CUDA runs the int4 matmul and
    agrees with the default path (dequantize once, cuBLAS), gate|up's prologue and a residual too."""
    g = torch.Generator().manual_seed(1)
    w_t = (torch.randn(2048, 1024, generator=g) / 32).to(torch.bfloat16).cuda()
    x = torch.randn(2, 40, 2048, generator=g).to(torch.bfloat16).cuda()
    res = torch.randn(2, 40, 1024, generator=g).to(torch.bfloat16).cuda()
    calls = matmul_calls(monkeypatch)
    off, on = int4_layers(w_t, [1024], monkeypatch)
    for args, kwargs in (((x,), {}), ((torch.cat((x, x), -1),), {"gated": True, "residual": res})):
        want = off(*args, **kwargs)
        torch.testing.assert_close(on(*args, **kwargs).float(), want.float(), rtol=1e-2,
                                   atol=1e-2 * want.float().abs().max().item())
    assert len(calls) == 2  # the "on" layer's two calls


def test_packed_linear_off_cuda_keeps_the_reference(monkeypatch):
    """Off CUDA the switch changes nothing: prefill stays the float32 reference, bit for bit."""
    calls = matmul_calls(monkeypatch)
    off, on = int4_layers(torch.randn(256, 256).to(torch.bfloat16), [256], monkeypatch)
    x = torch.randn(1, 20, 256).to(torch.bfloat16)
    assert torch.equal(on(x), off(x))
    assert not calls
