"""Tests of the one-pass dequantization for quantized prefill (teal_kernels/dequantize.py's
`dequantize_triton`, the `teal::dequantize` op) against the reference dequantization and float64
math, its bad inputs, and PackedLinear's use of it (a dense int8/int4 prefill on CUDA past the rows the
GEMV kernel takes).

Every value must be within one unit in the last place of the exact (float64) value (compiled, the
GPU may fuse int4's multiply-add). Without CUDA the kernel runs under TRITON_INTERPRET=1
(conftest.py) on small shapes, where it must also give the reference's bits exactly.
"""
import pytest
import torch
from fixtures import DEVICE, HAS_CUDA, needs_cuda, random_int4, recorded_calls

from linear import QUANTIZED_KERNEL_ROWS, PackedLinear
from quantize import quantize_projection
from teal_kernels.dequantize import dequantize_triton
from teal_kernels.ops import dequantize
from teal_kernels.reference import MAX_BATCH, dequantize_weight

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


def int8_matrix(k: int, n: int, seed: int = 0):
    """Random int8 codes [K, N] with positive per-column scales."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    return w.to(DEVICE), (torch.rand(n, generator=g) * 0.02 + 1e-3).to(DEVICE)


def exact64(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The formats' definitions in float64: int8 q * s; int4 low nibble = even column,
    (q - 8) * s + z per group."""
    if zeros is None:
        return w.double() * scales.double()
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(w.shape[0], -1).double() - 8.0
    rep = lambda t: t.double().repeat_interleave(group_size, dim=0)  # noqa: E731
    return q * rep(scales) + rep(zeros)


PRECISION = {torch.bfloat16: 8, torch.float16: 11}  # significand bits


def assert_dequantized(got: torch.Tensor, w, scales, zeros, group_size: int, dtype: torch.dtype) -> None:
    """Within one unit in the last place of the exact (float64) value; in the interpreter also the
    reference's bits exactly."""
    assert got.shape == (w.shape[0], scales.shape[-1]) and got.dtype == dtype
    exact = exact64(w, scales, zeros, group_size)
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - PRECISION[dtype]).clamp(min=2.0**-24)
    err = (got.double() - exact).abs()
    assert (err < ulp).all(), f"max error {err.max().item():.3g} (ulps: {(err / ulp).max().item():.2f})"
    if got.device.type == "cpu":
        assert torch.equal(got, dequantize_weight(w, scales, zeros, group_size).to(dtype))


@pytest.mark.parametrize("k,n,group_size,dtype", [
    (64, 200, 32, torch.bfloat16),  # N not a multiple of the column block, two groups
    (128, 512, 128, torch.float16),  # one group, two column blocks
    (192, 66, 64, torch.bfloat16),  # three groups, a narrow last block
])
def test_int4_matches_reference(k, n, group_size, dtype):
    w, scales, zeros = random_int4(k, n, group_size)
    assert_dequantized(dequantize_triton(w, scales, zeros, group_size, dtype), w, scales, zeros, group_size, dtype)
    assert_dequantized(dequantize(w, scales, zeros, group_size, dtype), w, scales, zeros, group_size, dtype)  # the op


@pytest.mark.parametrize("k,n,dtype", [(45, 300, torch.bfloat16), (64, 256, torch.float16)])  # K not whole row blocks
def test_int8_matches_reference(k, n, dtype):
    w, scales = int8_matrix(k, n)
    assert_dequantized(dequantize_triton(w, scales, None, 0, dtype), w, scales, None, 0, dtype)
    assert_dequantized(dequantize(w, scales, None, 0, dtype), w, scales, None, 0, dtype)


def test_bad_inputs():
    """Wrong dtypes, format shapes and layouts are one-line errors."""
    w, scales, zeros = random_int4(64, 128, 32)
    with pytest.raises(TypeError, match="bf16/fp16 from int8 or packed int4"):
        dequantize_triton(w, scales, zeros, 32, torch.float32)
    with pytest.raises(TypeError, match="bf16/fp16 from int8 or packed int4"):
        dequantize_triton(w.to(torch.bfloat16), scales, zeros, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="group_size must be one of"):
        dequantize_triton(w, scales, zeros, 48, torch.bfloat16)
    with pytest.raises(ValueError, match="scales"):
        dequantize_triton(w, scales[:, :64], zeros, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_triton(w, scales.t().contiguous().t(), zeros, 32, torch.bfloat16)
    with pytest.raises(ValueError, match="on w's device"):
        dequantize_triton(w, scales.to("meta"), zeros, 32, torch.bfloat16)
    w8, s8 = int8_matrix(32, 64)
    with pytest.raises(ValueError, match="per-channel scales only"):
        dequantize_triton(w8, s8, s8, 0, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])  # Llama-3-8B's q|k|v and down
def test_gpu_llama_shapes(k, n):
    w, scales, zeros = random_int4(k, n, 128)
    assert_dequantized(dequantize_triton(w, scales, zeros, 128, torch.bfloat16), w, scales, zeros, 128,
                       torch.bfloat16)
    w8, s8 = int8_matrix(k, n)
    assert_dequantized(dequantize_triton(w8, s8, None, 0, torch.bfloat16), w8, s8, None, 0, torch.bfloat16)


def dequantize_calls(monkeypatch) -> list:
    """Record PackedLinear's calls of the dequantize op (they still run)."""
    import linear
    return recorded_calls(monkeypatch, linear, "dequantize")


@needs_cuda
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_packed_linear_prefill_routes(mode, monkeypatch):
    """A quantized PackedLinear's dense prefill on CUDA: up to QUANTIZED_KERNEL_ROWS rows the kernel reads
    the quantized weights, past them the matrix is dequantized once and multiplied in bf16; both agree
    with the float32 reference product (gate|up's prologue and a residual too)."""
    import linear
    from teal_kernels import sparse_gemv_reference
    g = torch.Generator().manual_seed(1)
    w_t = (torch.randn(2048, 1024, generator=g) / 32).to(torch.bfloat16).cuda()
    layer = quantize_projection(w_t, [1024], mode, 128 if mode == "int4" else 0)
    assert layer.quantized_kernel_rows == QUANTIZED_KERNEL_ROWS
    calls = dequantize_calls(monkeypatch)
    kernel_calls = recorded_calls(monkeypatch, linear, "sparse_gemv")
    half = QUANTIZED_KERNEL_ROWS // 2
    for tokens in (1, half, half + 1):  # batch 2: 2 and QUANTIZED_KERNEL_ROWS rows to the kernel, then 2 more
        x = torch.randn(2, tokens, 2048, generator=g).to(torch.bfloat16).cuda()
        res = torch.randn(2, tokens, 1024, generator=g).to(torch.bfloat16).cuda()
        for args in ((x,), (torch.cat((x, x), -1), True, res)):
            got = layer(*args)
            rows = args[0].reshape(2 * tokens, -1)
            want = sparse_gemv_reference(rows, layer.weight, layer.no_thresholds, layer.split_sizes,
                                         *layer._quant_args(), layer.group_size, *args[1:2],
                                         None if len(args) < 3 else res.reshape(2 * tokens, -1))
            torch.testing.assert_close(got.reshape(2 * tokens, -1).float(), want.float(), rtol=2e-2,
                                       atol=2e-2 * want.float().abs().max().item())
    assert [shape[0] for shape in kernel_calls] == [2, 2, 2 * half, 2 * half]
    assert len(calls) == 2


def test_quantized_kernel_rows_follow_the_shape():
    """Dense quantized calls go to the kernel up to QUANTIZED_KERNEL_ROWS rows where the shape takes its dot
    design (segments of multiples of 128 for int4, 16 for int8), else up to MAX_BATCH; float weights
    keep cuBLAS past MAX_BATCH."""
    w_t = torch.randn(256, 256).to(torch.bfloat16)
    assert quantize_projection(w_t, [128, 128], "int4", 64).quantized_kernel_rows == QUANTIZED_KERNEL_ROWS
    assert quantize_projection(w_t, [64, 192], "int4", 64).quantized_kernel_rows == MAX_BATCH
    assert quantize_projection(w_t, [48, 208], "int8", 0).quantized_kernel_rows == QUANTIZED_KERNEL_ROWS
    assert quantize_projection(w_t, [40, 216], "int8", 0).quantized_kernel_rows == MAX_BATCH
    assert PackedLinear(256, 256).quantized_kernel_rows == MAX_BATCH


def test_packed_linear_off_cuda_keeps_the_reference(monkeypatch):
    """Off CUDA a quantized prefill stays the float32 reference product, bit for bit."""
    from teal_kernels import sparse_gemv_reference
    calls = dequantize_calls(monkeypatch)
    layer = quantize_projection(torch.randn(256, 128).to(torch.bfloat16), [128], "int4", 64)
    x = torch.randn(20, 256).to(torch.bfloat16)
    want = sparse_gemv_reference(x, layer.weight, layer.no_thresholds, layer.split_sizes, *layer._quant_args(),
                                 layer.group_size)
    assert torch.equal(layer(x), want)
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
