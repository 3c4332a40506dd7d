"""Tests of teal_kernels/attention.py (split-KV decode attention) against an independent float64 reference.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py), so CPU
shapes are tiny and a 16-position tile with 3 splits stands in for the GPU defaults to put
many chunk boundaries into a small cache; the GPU-only tests at the bottom use real Llama
shapes.  Chunk length for the prefix 0..p: ceil(ceil((p + 1) / splits) / tile) * tile.
"""

import argparse
import math

import pytest
import torch
from fixtures import COMPILE_BACKENDS, DEVICE, HAS_CUDA, needs_cuda

import benchmarks.bench_attention as bench_attention
import teal_kernels.attention as attention
from teal_kernels.attention import (MAX_SPLITS, SHORT_CACHE, SHORT_TILES_ENV, block_s_for, decode_attention_triton,
                                    default_block_s, default_num_splits)
from teal_kernels.ops import decode_attention
from teal_kernels.reference import attention_reference as decode_attention_reference

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


# --- independent float64 reference -------------------------------------------------


def ref64(q, k, v, p, scale=None):
    """(output, sum_s prob_s |v_s|) in float64: softmax over positions 0..p, head h uses KV head h // G."""
    group = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk = k[:, :, : p + 1].double().repeat_interleave(group, dim=1)
    vv = v[:, :, : p + 1].double().repeat_interleave(group, dim=1)
    probs = torch.softmax(torch.einsum("bhd,bhsd->bhs", q.double(), kk) * scale, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs, vv), torch.einsum("bhs,bhsd->bhd", probs, vv.abs())


def assert_close_to_ref(out, q, k, v, p, scale=None):
    """Within one output rounding (the interpreter truncates bf16) plus fp32 math error; on a GPU
    bf16/fp16 probabilities enter the P @ V dot rounded once more (2^-8 relative)."""
    ref, mag = ref64(q, k, v, p, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    eps = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 0.0}[q.dtype]
    math_eps = 2.0**-7 if (HAS_CUDA and q.dtype != torch.float32) else 1e-5
    err = (out.double() - ref).abs()
    tol = 1.01 * eps * ref.abs() + math_eps * mag + 1e-6
    assert (err <= tol).all(), f"p={p}: max excess {(err - tol).max().item():.3g}"


def make_problem(b, h, h_kv, s_max, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, d, generator=g) * 2  # peaky softmax: a wrong position shows
    k = torch.randn(b, h_kv, s_max, d, generator=g)
    v = torch.randn(b, h_kv, s_max, d, generator=g)
    return q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE)


def pos_tensor(p, dtype=torch.int64):
    return torch.tensor([p], dtype=dtype, device=DEVICE)


# --- correctness at the edges ---------------------------------------------------------

SPLITS, TILE = 3, 16
# With 3 splits of 16-position tiles: p = 0; one split ending at a tile edge (15), a second one
# starting (16, 17); three full chunks of 16 (47) and the chunk growing to 32 (48, 49); the last
# chunk partial or empty (63..65, 70); and the last position of the cache.
ALL_EDGES = [0, 1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 70]
SOME_EDGES = [0, 16, 48, 65]

# (B, H, Hkv, D, S_max, dtype, positions): GQA groups 1, 3, 4; B 1..4; S_max = 72 and 40 are not
# multiples of a chunk.  The interpreter runs programs one by one, so most cases take a few edges.
CASES = [
    (1, 4, 4, 64, 72, torch.bfloat16, ALL_EDGES),
    (2, 6, 2, 64, 72, torch.float32, ALL_EDGES),
    (2, 8, 2, 128, 72, torch.bfloat16, SOME_EDGES),
    (4, 3, 1, 128, 40, torch.float32, SOME_EDGES),
    (1, 12, 3, 128, 72, torch.float32, SOME_EDGES),
    (3, 3, 3, 64, 72, torch.bfloat16, SOME_EDGES),
]


@pytest.mark.parametrize("b,h,h_kv,d,s_max,dtype,positions", CASES)
def test_matches_reference_at_edges(b, h, h_kv, d, s_max, dtype, positions):
    q, k, v = make_problem(b, h, h_kv, s_max, d, dtype)
    for p in sorted({x for x in positions if x < s_max} | {s_max - 1}):
        out = decode_attention_triton(q, k, v, pos_tensor(p), num_splits=SPLITS, block_s=TILE)
        assert_close_to_ref(out, q, k, v, p)


@pytest.mark.parametrize("p", [0, 63, 64, 255, 256, 299])
def test_defaults_through_op(p):
    """S_max = 300, D = 64 bf16: tiles of 64 positions, 4 splits (capped by the 5 tiles of the cache)."""
    assert default_block_s(64, 2) == 64
    assert default_num_splits(1, 2, 300, 64, 132) == 4
    q, k, v = make_problem(1, 4, 2, 300, 64, torch.bfloat16, seed=p)
    assert_close_to_ref(decode_attention(q, k, v, pos_tensor(p)), q, k, v, p)


@pytest.mark.parametrize("p", [0, 15, 16, 150, 299])
def test_short_cache_tiles_through_op(p, monkeypatch):
    """TEAL_ATTENTION_SHORT_TILES (on by default): a cache of at most SHORT_CACHE positions takes
    16-position tiles (and so up to one split a tile), a longer one the long tile; the output stays the
    reference's. =0 gives every cache the long tile."""
    monkeypatch.delenv(SHORT_TILES_ENV, raising=False)
    assert block_s_for(128, 2, SHORT_CACHE) == 16 and block_s_for(128, 2, SHORT_CACHE + 1) == default_block_s(128, 2)
    chosen = []  # what the launcher picked
    monkeypatch.setattr(attention, "block_s_for", lambda *args: chosen.append(block_s_for(*args)) or chosen[-1])
    q, k, v = make_problem(1, 4, 2, 300, 64, torch.bfloat16, seed=p)
    assert_close_to_ref(decode_attention(q, k, v, pos_tensor(p)), q, k, v, p)
    assert chosen == [16]
    monkeypatch.setenv(SHORT_TILES_ENV, "0")
    assert block_s_for(128, 2, 300) == default_block_s(128, 2)


@pytest.mark.parametrize("s_max,p,splits", [(200, 0, 1), (200, 133, 1), (200, 199, 1), (40, 9, None), (40, 39, None)])
def test_single_split_writes_output_directly(s_max, p, splits):
    """One split (explicit, or a cache within one tile): stage 1 writes the output, no combine."""
    q, k, v = make_problem(2, 3, 3, s_max, 64, torch.float32, seed=s_max)
    assert_close_to_ref(decode_attention_triton(q, k, v, pos_tensor(p), num_splits=splits), q, k, v, p)


def test_default_rules():
    # Llama-3-8B / SmolLM2 / MHA Llama-2 at S_max 8192 on 132 SMs: ~264 programs at most.
    assert default_num_splits(1, 8, 8192, 64, 132) == 32
    assert default_num_splits(1, 3, 8192, 64, 132) == 64
    assert default_num_splits(1, 32, 8192, 64, 132) == 8
    assert default_num_splits(4, 8, 8192, 64, 132) == 8
    assert default_num_splits(1, 8, 100, 64, 132) == 2  # no more splits than tiles
    assert default_num_splits(1, 8, 40, 64, 132) == 1
    assert default_num_splits(64, 8, 8192, 64, 132) == 1
    for args in [(1, 1, 10**6, 16, 1000), (3, 5, 777, 32, 78)]:
        n = default_num_splits(*args)
        assert 1 <= n <= MAX_SPLITS and n & (n - 1) == 0
    assert [default_block_s(d, 2) for d in (16, 64, 128, 256)] == [64, 64, 64, 32]
    assert [default_block_s(d, 4) for d in (16, 64, 128, 256)] == [64, 64, 32, 16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fill", [1e30, float("inf"), float("nan")])
@pytest.mark.parametrize("splits", [SPLITS, None])
def test_garbage_beyond_position_does_not_leak(dtype, fill, splits):
    q, k, v = make_problem(1, 6, 2, 72, 64, dtype, seed=1)
    for p in (0, 16, 40):
        kg, vg = k.clone(), v.clone()
        kg[:, :, p + 1 :] = fill
        vg[:, :, p + 1 :] = -fill
        out = decode_attention_triton(q, kg, vg, pos_tensor(p), num_splits=splits, block_s=TILE)
        assert torch.isfinite(out).all()
        assert_close_to_ref(out, q, k, v, p)


@pytest.mark.parametrize("d", [16, 32, 256])
def test_other_head_dims(d):
    q, k, v = make_problem(1, 4, 2, 40, d, torch.float32, seed=d)
    for p in (0, 17, 39):
        assert_close_to_ref(decode_attention_triton(q, k, v, pos_tensor(p), num_splits=SPLITS), q, k, v, p)


def test_fp16_and_int32_position():
    q, k, v = make_problem(2, 8, 2, 48, 64, torch.float16, seed=3)
    for p in (0, 16, 47):
        out = decode_attention_triton(q, k, v, pos_tensor(p, torch.int32), num_splits=SPLITS, block_s=TILE)
        assert_close_to_ref(out, q, k, v, p)
        assert torch.equal(out, decode_attention_triton(q, k, v, pos_tensor(p), num_splits=SPLITS, block_s=TILE))


def test_explicit_scale():
    q, k, v = make_problem(1, 6, 3, 40, 64, torch.float32, seed=4)
    out = decode_attention(q, k, v, pos_tensor(30), scale=0.3)
    assert_close_to_ref(out, q, k, v, 30, scale=0.3)


def test_strided_inputs():
    """q as a slice of a fused q|k|v output, caches as transposed / sliced views."""
    b, h, h_kv, d, s_max = 2, 6, 2, 64, 48
    g = torch.Generator().manual_seed(5)
    q = torch.randn(b, (h + 2 * h_kv) * d, generator=g).to(DEVICE)[:, : h * d].view(b, h, d)
    big_k = torch.randn(b, s_max, h_kv, d, generator=g).to(DEVICE)
    big_v = torch.randn(b, h_kv, s_max, 2 * d, generator=g).to(DEVICE)
    k, v = big_k.transpose(1, 2), big_v[..., :d]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for p in (0, 20, 47):
        assert_close_to_ref(decode_attention_triton(q, k, v, pos_tensor(p), num_splits=SPLITS, block_s=TILE),
                            q, k, v, p)


def test_position_is_read_from_the_device_tensor():
    """The same position tensor, updated in place between calls (what a CUDA graph replay sees)."""
    q, k, v = make_problem(1, 4, 2, 64, 64, torch.float32, seed=6)
    pos = pos_tensor(0)
    for p in (5, 16, 63, 2):
        pos.fill_(p)
        assert_close_to_ref(decode_attention(q, k, v, pos), q, k, v, p)


def test_torch_reference_path():
    """The CPU fallback of the op (no interpreter): same math, also ignores garbage beyond p."""
    q, k, v = make_problem(2, 6, 2, 40, 64, torch.float32, seed=7)
    kg, vg = k.clone(), v.clone()
    kg[:, :, 21:] = float("nan")
    vg[:, :, 21:] = float("inf")
    assert_close_to_ref(decode_attention_reference(q, kg, vg, pos_tensor(20)), q, k, v, 20)


# --- what the wrapper rejects ---------------------------------------------------------


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda q, k, v, pos: (q[:, :, :48], k[..., :48], v[..., :48], pos), ValueError, "power of two"),
        (lambda q, k, v, pos: (q[..., :8], k[..., :8], v[..., :8], pos), ValueError, "power of two"),
        (lambda q, k, v, pos: (q[:, :3], k, v, pos), ValueError, "multiple"),
        (lambda q, k, v, pos: (q[:, None], k, v, pos), ValueError, "3-D"),
        (lambda q, k, v, pos: (q, k[0], v[0], pos), ValueError, "4-D"),
        (lambda q, k, v, pos: (q, k, v[:, :, :8], pos), ValueError, "v_cache"),
        (lambda q, k, v, pos: (q[:1], k, v, pos), ValueError, "does not match"),
        (lambda q, k, v, pos: (q, k.half(), v.half(), pos), TypeError, "q's dtype"),
        (lambda q, k, v, pos: (q.double(), k.double(), v.double(), pos), TypeError, "bf16, fp16 or fp32"),
        (lambda q, k, v, pos: (q, k, v, pos.float()), ValueError, "input_pos"),
        (lambda q, k, v, pos: (q, k, v, pos.repeat(2)), ValueError, "input_pos"),
    ],
)
def test_rejects_bad_input(change, exc, match):
    args = change(*make_problem(2, 4, 2, 32, 64, torch.float32), pos_tensor(3))
    with pytest.raises(exc, match=match):
        decode_attention_triton(*args)
    with pytest.raises(exc, match=match):
        decode_attention(*args)


@pytest.mark.parametrize("kwargs,match", [({"num_splits": 0}, "num_splits"), ({"num_splits": MAX_SPLITS + 1}, "num_splits"),
                                          ({"block_s": 8}, "block_s"), ({"block_s": 48}, "block_s")])
def test_rejects_bad_launch_parameters(kwargs, match):
    q, k, v = make_problem(1, 2, 1, 200, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        decode_attention_triton(q, k, v, pos_tensor(3), **kwargs)


# --- custom op / torch.compile -----------------------------------------------------


def test_custom_op_matches_launcher_and_opcheck():
    q, k, v = make_problem(2, 6, 2, 130, 64, torch.bfloat16, seed=8)  # 2 splits of 64-position tiles
    pos = pos_tensor(100)
    assert torch.equal(torch.ops.teal.decode_attention(q, k, v, pos), decode_attention_triton(q, k, v, pos))
    torch.library.opcheck(torch.ops.teal.decode_attention.default, (q, k, v, pos, None))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = make_problem(3, 6, 2, 32, 64, torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = torch.ops.teal.decode_attention(*(mode.from_tensor(t) for t in (q, k, v, pos_tensor(3))))
    assert out.shape == (3, 6, 64) and out.dtype == torch.float16


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The op inside a compiled graph, the position changing between calls without a recompile."""
    q, k, v = make_problem(1, 6, 2, 40, 64, torch.float32, seed=9)

    def step(q, k, v, pos):
        return decode_attention(q, k, v, pos)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    pos = pos_tensor(0)
    for p in (3, 17, 39):
        pos.fill_(p)
        assert torch.equal(compiled(q, k, v, pos), step(q, k, v, pos))


# --- benchmark helpers (the timing itself needs a GPU) --------------------------------


def _bench_module():
    return bench_attention


def test_bench_helpers_on_tiny_shapes():
    bench = _bench_module()
    # Llama-3-8B, 4096 positions: 8 heads * 4096 * 128 * 2 bytes * 2 (K, V) = 16.8 MB at 4.28 TB/s.
    assert bench.kv_floor_us(1, 8, 128, 4096) == pytest.approx(16_777_216 / 4.28e6)
    layers = bench.make_layers(2, 1, 6, 2, 16, 128, torch.bfloat16, DEVICE)  # default: 2 splits of 64-tiles
    steps = bench.methods(layers, context=37, num_splits=[1, 2, 100])
    assert list(steps) == ["triton", "triton n1", "sdpa_masked", "sdpa_prefix"]  # 2 is the default, 100 too many
    errors = bench.check_correctness(steps, layers, context=37)
    assert set(errors) == set(steps) | {"triton_vs_sdpa_prefix"}
    assert max(errors.values()) < 0.05
    extra = bench.unchecked_methods(layers, context=37, fused_tiles=[(16, 2, None), (16, 2, 4)])
    assert list(extra) == ["fused_step", "fused_step s16 w2", "fused_step s16 w2 n4", "cublas_bytes"]
    assert extra["fused_step"](0).shape == (1, 6, 16)
    bench.check_fused_tiles(extra)  # 16-position tiles: three of them over 37 positions (4 splits: one each)
    with pytest.raises(AssertionError, match="fused_step s16 w2: max difference"):
        bench.check_fused_tiles(extra | {"fused_step s16 w2": lambda i: extra["fused_step"](i) * 1.1})
    assert bench.parse_tile("32:8") == (32, 8, None) and bench.parse_tile("16:4:16") == (16, 4, 16)
    for bad in ("32", "24:4", "32:3", "8:4", "a:b", "16:4:0", f"16:4:{MAX_SPLITS + 1}", "16:4:2:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_tile(bad)
    assert extra["cublas_bytes"](1).shape == (1, 2 * 2 * 16)  # [1, 2 Hkv D]: the K and V bytes of 37 positions
    rows = [{"model": "tiny", "context": 37, "floor_us": 0.01,
             "us": {"triton": 1.0, "sdpa_masked": 3.0, "sdpa_prefix": 2.0}}]
    table = bench.format_table(rows)
    assert table.splitlines()[0].startswith("| model | context | floor µs | triton µs")
    assert table.splitlines()[-1].endswith("| 3.00x |")


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU exit")
def test_bench_without_gpu_exits_cleanly(capsys):
    assert _bench_module().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# --- GPU only ----------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("h,h_kv,d", [(32, 8, 128), (9, 3, 64), (32, 32, 128)])
@pytest.mark.parametrize("p", [0, 127, 255, 256, 4095, 8191])
def test_gpu_llama_shapes(h, h_kv, d, p):
    q, k, v = make_problem(1, h, h_kv, 8192, d, torch.bfloat16, seed=p)
    assert_close_to_ref(decode_attention(q, k, v, pos_tensor(p)), q, k, v, p)


@needs_cuda
def test_gpu_cuda_graph_replay_with_changing_position():
    q, k, v = make_problem(2, 32, 8, 4096, 128, torch.bfloat16)
    pos = pos_tensor(0)
    decode_attention(q, k, v, pos)  # warm up: JIT compilation outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, pos)
    for p in (5, 300, 4095, 17):
        pos.fill_(p)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_to_ref(out, q, k, v, p)


@needs_cuda
def test_gpu_compile_reduce_overhead():
    q, k, v = make_problem(1, 32, 8, 2048, 128, torch.bfloat16)

    def step(q, k, v, pos):
        return decode_attention(q, k, v, pos) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    pos = pos_tensor(0)
    for p in (10, 11, 700, 2047, 3):
        pos.fill_(p)
        out = compiled(q, k, v, pos).clone()
        torch.cuda.synchronize()
        assert torch.equal(out, step(q, k, v, pos))
