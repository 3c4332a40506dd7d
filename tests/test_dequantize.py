"""Tests of quantized prefill's kernels (teal_kernels/dequantize.py): the one-pass dequantization
(`dequantize_triton`, the `teal::dequantize` op) against the reference dequantization and float64
math, the GEMM that dequantizes tiles (`quant_gemm_triton`, `teal::quant_gemm`) against float64
products, their bad inputs, and PackedLinear's use of them (a dense int8/int4 prefill on CUDA past
the rows the GEMV kernel takes).

Every value must be within one unit in the last place of the exact (float64) value (compiled, the
GPU may fuse int4's multiply-add). Without CUDA the kernel runs under TRITON_INTERPRET=1
(conftest.py) on small shapes, where it must also give the reference's bits exactly.
"""
import pytest
import torch
from fixtures import DEVICE, HAS_CUDA, needs_cuda, random_int4, recorded_calls

from linear import QUANTIZED_KERNEL_ROWS, PackedLinear
from quantize import quantize_projection
from teal_kernels.dequantize import (INT4_SCALES, GemmConfig, dequantize_triton, quant_gemm_config, quant_gemm_splits,
                                    quant_gemm_triton)
from teal_kernels.ops import dequantize, quant_gemm
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


@pytest.mark.skipif(HAS_CUDA, reason="runs the GPU's branch in the interpreter")
def test_the_gpus_int4_conversion():
    """The compiled kernels turn int4 codes into floats by the 2^23 mantissa trick, which the
    interpreter's branch does not take: run that branch here (fp16, which the interpreter rounds
    as the GPU does) and get the reference's bits. (int8's compiled branch is PTX, which the
    interpreter cannot run: the GPU tests cover it.)"""
    from teal_kernels.dequantize import BLOCK_K, BLOCK_N, _dequantize_kernel
    from teal_kernels.triton_gemv import cdiv
    w, scales, zeros = random_int4(64, 300, 32)
    k, n = w.shape[0], scales.shape[-1]
    out = torch.empty(k, n, dtype=torch.float16)
    _dequantize_kernel[(cdiv(k, BLOCK_K), cdiv(n, BLOCK_N))](
        w, scales, zeros, out, k, n, w.shape[1], INT4=True, GROUP_SIZE=32, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
        INTERPRET=False)
    assert torch.equal(out, dequantize_weight(w, scales, zeros, 32).to(torch.float16))


def test_bad_inputs():
    """Wrong dtypes, format shapes and layouts are one-line errors."""
    w, scales, zeros = random_int4(64, 128, 32)
    with pytest.raises(TypeError, match="takes int8 or packed int4"):
        dequantize_triton(w, scales, zeros, 32, torch.float32)
    with pytest.raises(TypeError, match="takes int8 or packed int4"):
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


def assert_product(got: torch.Tensor | list[torch.Tensor], x: torch.Tensor, w, scales, zeros, group_size: int) -> None:
    """got (or each of a list, against one float64 product) = x @ W within one unit in the last place of
    x's dtype (the output's rounding) plus a float32 accumulation's error (2**-20 of sum |x| |W|),
    where W is what dequantize_triton writes on x's device and the product is taken in float64. The
    pass's weights are checked against the formats' definition by the tests above (the reference's
    bits in the interpreter, within one ulp on the GPU, where the int4 multiply-add may round once:
    on an H100, 81-387 weights in 16-117 M differed from the CPU reference's by one ulp, which moved
    small outputs by up to 0.02 at K = 4096 and failed this check against the CPU's weights). The
    GEMM computes the same expression, so it is held to the pass's weights: against them its largest
    error at 8B shapes was half an ulp plus 2e-7 of sum |x| |W| (cuBLAS on the pass's output alike)."""
    w_rounded = dequantize_triton(w, scales, zeros, group_size, x.dtype).cpu().double()
    exact = x.cpu().double() @ w_rounded
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - PRECISION[x.dtype]).clamp(min=2.0**-24)
    accumulation = 2.0**-20 * (x.cpu().double().abs() @ w_rounded.abs())
    for i, one in enumerate(got if isinstance(got, list) else [got]):
        assert one.shape == exact.shape and one.dtype == x.dtype
        err = (one.cpu().double() - exact).abs()
        assert (err <= ulp + accumulation).all(), \
            f"result {i}: max error {err.max().item():.3g} (ulps: {(err / ulp).max().item():.2f})"


@pytest.mark.parametrize("m,k,n,group_size,dtype", [
    (1, 64, 200, 32, torch.bfloat16),  # one row, N not whole column blocks, two groups
    (70, 128, 130, 64, torch.float16),  # 128-row blocks, a 2-column last block
    (130, 256, 64, 128, torch.bfloat16),  # 256-row blocks, K two blocks of one group
])
def test_quant_gemm_int4_matches_float64(m, k, n, group_size, dtype):
    w, scales, zeros = random_int4(k, n, group_size, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    assert_product(quant_gemm_triton(x, w, scales, zeros, group_size), x, w, scales, zeros, group_size)
    assert_product(quant_gemm(x, w, scales, zeros, group_size), x, w, scales, zeros, group_size)  # the op


@pytest.mark.parametrize("m,k,n,dtype", [(5, 45, 300, torch.float16), (66, 192, 128, torch.bfloat16)])  # K not whole blocks
def test_quant_gemm_int8_matches_float64(m, k, n, dtype):
    w, scales = int8_matrix(k, n, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype).to(DEVICE)
    assert_product(quant_gemm_triton(x, w, scales, None, 0), x, w, scales, None, 0)
    assert_product(quant_gemm(x, w, scales, None, 0), x, w, scales, None, 0)


@pytest.mark.skipif(HAS_CUDA, reason="runs the GPU's branch in the interpreter")
@pytest.mark.parametrize("int4_vec,int4_scales", [(16, "step"), (4, "step"), (4, "group"), (4, "ahead")])
def test_quant_gemm_gpu_branch(int4_vec, int4_scales):
    """The GEMM's compiled int4 branch (the mantissa trick, tl.dot on x's dtype) run in the
    interpreter, in fp16 (whose dot the interpreter gets right), matches the float64 product; the
    layout hint int4_vec and where the scales are loaded change no value."""
    from teal_kernels.dequantize import _quant_gemm_kernel
    from teal_kernels.triton_gemv import cdiv
    group = 64
    w, scales, zeros = random_int4(128, 256, group)
    m, k, n = 20, w.shape[0], scales.shape[-1]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    cfg = quant_gemm_config(m, group)
    out = torch.empty(m, n, dtype=torch.float16)
    _quant_gemm_kernel[(cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), 1)](
        x, w, scales, zeros, out, m, n, k, w.shape[1], k, INT4=True,
        GROUP_SIZE=max(group, 1), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0, INT4_VEC=int4_vec, INT4_SCALES=int4_scales, INTERPRET=False)
    assert_product(out, x, w, scales, zeros, group)


@pytest.mark.parametrize("fmt,k,splits", [("int4", 512, 3), ("int8", 200, 2)])  # 3: uneven, int8: K not whole blocks
def test_quant_gemm_split_k_matches_float64(fmt, k, splits):
    """K cut into splits whose float32 partials are summed afterwards gives the same product."""
    m, n = 9, 136
    if fmt == "int4":
        w, scales, zeros = random_int4(k, n, 64, seed=k)
        group = 64
    else:
        (w, scales), zeros, group = int8_matrix(k, n, seed=k), None, 0
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16).to(DEVICE)
    got = quant_gemm_triton(x, w, scales, zeros, group, GemmConfig(16, 64, 64, 4, 2, None, splits))
    assert_product(got, x, w, scales, zeros, group)


@pytest.mark.parametrize("int4_scales", INT4_SCALES)
def test_quant_gemm_int4_scales_across_groups(int4_scales):
    """Each int4 group's own scales and zeros, however they are loaded ("step" with the tile, "group"
    once a group, "ahead" a group early), also where a split starts inside a group (K 512, group 128,
    64-row steps, 3 splits of 192 rows) and where the last group's early load would pass K."""
    w, scales, zeros = random_int4(512, 136, 128, seed=5)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(DEVICE)
    for splits in (1, 3):
        config = GemmConfig(16, 64, 64, 4, 2, None, splits, 4, int4_scales)
        assert_product(quant_gemm_triton(x, w, scales, zeros, 128, config), x, w, scales, zeros, 128)


def test_quant_gemm_splits():
    """Splits fill the SMs only where the tiles do not, and never run shorter than MIN_SPLIT_STEPS."""
    assert [quant_gemm_splits(t, 4096, 64, 132) for t in (48, 32, 224, 132)] == [4, 8, 1, 1]
    assert quant_gemm_splits(32, 14336, 64, 132) == 8
    assert quant_gemm_splits(1, 1024, 64, 132) == 2  # 512 rows a split at least
    assert quant_gemm_splits(1, 1023, 64, 132) == 1


def test_quant_gemm_op_reference_on_the_cpu(monkeypatch):
    """Without the interpreter the CPU op is the reference: x times the weights dequantized and rounded
    to x's dtype, in float32."""
    from teal_kernels.ops import CPU_KERNELS_ENV
    monkeypatch.setenv(CPU_KERNELS_ENV, "reference")
    w, scales, zeros = random_int4(64, 96, 32)
    x = torch.randn(7, 64).to(torch.bfloat16)
    want = (x.float() @ dequantize_weight(w.cpu(), scales.cpu(), zeros.cpu(), 32).to(torch.bfloat16).float())
    assert torch.equal(torch.ops.teal.quant_gemm(x, w.cpu(), scales.cpu(), zeros.cpu(), 32), want.to(torch.bfloat16))


def test_quant_gemm_op_traces_in_one_graph():
    """teal::quant_gemm's fake agrees with the op (opcheck), and torch.compile(fullgraph=True) traces
    through it, as a compiled prefill (generate.py --compile_prefill) would call it."""
    w, scales, zeros = random_int4(64, 96, 32)
    x = torch.randn(5, 64).to(torch.bfloat16).to(DEVICE)
    torch.library.opcheck(torch.ops.teal.quant_gemm.default, (x, w, scales, zeros, 32))
    compiled = torch.compile(lambda t: quant_gemm(t, w, scales, zeros, 32) + 1, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    assert torch.equal(compiled(x), quant_gemm(x, w, scales, zeros, 32) + 1)


def test_quant_gemm_config_blocks():
    """int4 tiles never span two groups; the row block holds M up to 128 rows."""
    for m, group_size in ((1, 32), (64, 64), (100, 128), (3000, 128), (50, 0)):
        cfg = quant_gemm_config(m, group_size)
        assert group_size == 0 or group_size % cfg.block_k == 0
        assert cfg.block_m >= min(m, 128)


def test_quant_gemm_bad_inputs():
    """x of the wrong shape, dtype, layout or device, and the weights' own errors: one line each."""
    w, scales, zeros = random_int4(64, 128, 32)
    x = torch.randn(4, 64).to(torch.bfloat16).to(DEVICE)
    with pytest.raises(ValueError, match=r"needs x \[M, 64\], got shape \(4, 32\)"):
        quant_gemm_triton(x[:, :32].contiguous(), w, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"needs x \[M, 64\]"):
        quant_gemm_triton(x[None], w, scales, zeros, 32)
    with pytest.raises(TypeError, match="takes int8 or packed int4"):
        quant_gemm_triton(x.float(), w, scales, zeros, 32)
    with pytest.raises(ValueError, match="contiguous x"):
        quant_gemm_triton(torch.randn(64, 4).to(torch.bfloat16).to(DEVICE).t(), w, scales, zeros, 32)
    with pytest.raises(ValueError, match="contiguous x on w's device"):
        quant_gemm_triton(x.to("meta"), w, scales, zeros, 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant_gemm_triton(x, w, scales, zeros, 48)
    with pytest.raises(ValueError, match="BLOCK_K must divide its group, got 64 for 32"):
        quant_gemm_triton(x, w, scales, zeros, 32, GemmConfig(64, 128, 64, 4, 3))
    with pytest.raises(ValueError, match="int4_vec must be 1, 2, 4, 8 or 16 bytes, got 3"):
        quant_gemm_triton(x, w, scales, zeros, 32, GemmConfig(64, 128, 32, 4, 3, int4_vec=3))
    with pytest.raises(ValueError, match="int4_scales must be one of .*, got 'once'"):
        quant_gemm_triton(x, w, scales, zeros, 32, GemmConfig(64, 128, 32, 4, 3, int4_scales="once"))


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
    with the float32 reference product (gate|up's prologue and a residual too). (TEAL_QUANT_GEMM=0: int8's
    default GEMM past those rows is the next test's.)"""
    import linear
    from teal_kernels import sparse_gemv_reference
    monkeypatch.setenv(linear.QUANT_GEMM_ENV, "0")
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


@needs_cuda
@pytest.mark.parametrize("m", [17, 64, 200])
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])  # Llama-3-8B's q|k|v and down
def test_gpu_quant_gemm_llama_shapes(m, k, n):
    w, scales, zeros = random_int4(k, n, 128)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16).to(DEVICE)
    configs = [quant_gemm_config(m, 128)._replace(int4_vec=vec, int4_scales=where)  # bench_prefill's int4 options
               for vec, where in ((16, "step"), (4, "step"), (2, "step"), (16, "group"), (4, "group"), (4, "ahead"))]
    assert_product([quant_gemm_triton(x, w, scales, zeros, 128, c) for c in configs], x, w, scales, zeros, 128)
    w8, s8 = int8_matrix(k, n)
    assert_product(quant_gemm_triton(x, w8, s8, None, 0), x, w8, s8, None, 0)


@needs_cuda
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_gpu_packed_linear_quant_gemm_switch(mode, monkeypatch):
    """A quantized PackedLinear's dense prefill past QUANTIZED_KERNEL_ROWS runs teal::quant_gemm instead
    of dequantize + cuBLAS (by default up to QUANT_GEMM_ROWS rows), with gate|up's prologue and a
    residual too; past QUANT_GEMM_ROWS it dequantizes."""
    import linear
    monkeypatch.delenv(linear.QUANT_GEMM_ENV, raising=False)
    g = torch.Generator().manual_seed(2)
    w_t = (torch.randn(2048, 1024, generator=g) / 32).to(torch.bfloat16).cuda()
    layer = quantize_projection(w_t, [1024], mode, 128 if mode == "int4" else 0)
    real = layer.dense_weight_t(torch.bfloat16).cpu().double()  # before the recorders: it dequantizes
    gemm_calls = recorded_calls(monkeypatch, linear, "quant_gemm")
    calls = dequantize_calls(monkeypatch)
    x = torch.randn(3, 40, 2048, generator=g).to(torch.bfloat16).cuda()
    res = torch.randn(3, 40, 1024, generator=g).to(torch.bfloat16).cuda()
    for args in ((x,), (torch.cat((x, x), -1), True, res)):
        got = layer(*args).reshape(120, -1)
        want = (linear.gated_input(args[0].reshape(120, -1)) if len(args) > 1 else x.reshape(120, -1)).cpu()
        want = want.double() @ real
        want = want if len(args) < 3 else want + res.reshape(120, -1).cpu().double()
        torch.testing.assert_close(got.cpu().double(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert gemm_calls == [(120, 2048), (120, 2048)] and not calls
    layer(torch.randn(1, linear.QUANT_GEMM_ROWS[mode] + 1, 2048).to(torch.bfloat16).cuda())
    assert len(gemm_calls) == 2 and len(calls) == 1


def test_quant_gemm_switch(monkeypatch):
    """TEAL_QUANT_GEMM: unset, int8 and int4 layers take the GEMM up to QUANT_GEMM_ROWS rows; 1, every
    quantized prefill; 0, none; float layers never; a bad value fails at build."""
    import linear
    monkeypatch.delenv(linear.QUANT_GEMM_ENV, raising=False)
    w_t = torch.randn(256, 128).to(torch.bfloat16)
    assert quantize_projection(w_t, [128], "int8", 0).quant_gemm_rows == linear.QUANT_GEMM_ROWS["int8"] == 128
    assert quantize_projection(w_t, [128], "int4", 64).quant_gemm_rows == linear.QUANT_GEMM_ROWS["int4"] == 128
    monkeypatch.setenv(linear.QUANT_GEMM_ENV, "1")
    assert quantize_projection(w_t, [128], "int4", 64).quant_gemm_rows >= 2**31
    assert PackedLinear(256, 128).quant_gemm_rows == 0
    monkeypatch.setenv(linear.QUANT_GEMM_ENV, "0")
    assert quantize_projection(w_t, [128], "int8", 0).quant_gemm_rows == 0
    monkeypatch.setenv(linear.QUANT_GEMM_ENV, "yes")
    for fmt in ("int8", "fp"):  # every layer reads it: a bad value fails at build, bf16 models too
        with pytest.raises(ValueError, match="TEAL_QUANT_GEMM must be 0 or 1"):
            PackedLinear(256, 128, fmt=fmt)
