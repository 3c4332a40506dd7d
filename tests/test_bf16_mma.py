"""teal_kernels/bf16_mma.py (dense bf16 products of 1-8 rows on tensor cores from Gluon, reading the
[K, N] weights in place) and PackedLinear's dispatch to it (TEAL_BF16_MMA).

Gluon kernels do not run in Triton's interpreter, so the CPU tests check the kernel's index arithmetic
(emulated in torch), its launch rule and its references against float64; the kernel itself runs where a
GPU is (and compiles for sm_90 in tests/sm90_compile.py). Tolerance: the output's bf16 rounding, plus a
float32 sum's error, 1e-5 of sum |x| |W| (as the GEMV tests allow).
"""
from __future__ import annotations

import pytest
import torch
from fixtures import tiny_model

from teal_kernels import bf16_mma as bm
from teal_kernels.reference import gated_input, norm_statistics

CONFIGS = [bm.Bf16MmaConfig(*c) for c in ((16, 8, 1, 32, 1), (16, 4, 1, 32, 2), (8, 8, 2, 32, 1), (16, 4, 1, 16, 2),
                                          (4, 8, 1, 32, 2), (8, 4, 2, 32, 2), (2, 4, 1, 16, 1))]


def _assert_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    """Within the product's bf16 rounding (and the sum's, with a residual) plus a float32 sum's error."""
    product = x.cpu().double() @ w.cpu().double()
    exact = product if residual is None else product + residual.cpu().double()
    bound = (2.0 ** -8 * (product.abs() + (0 if residual is None else exact.abs()))
             + 1e-5 * (x.cpu().double().abs() @ w.cpu().double().abs()) + 1e-30)
    err = (got.cpu().double() - exact).abs()
    assert (err <= bound).all(), f"max error {(err / bound).max().item():.3g} of its bound"


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_the_emulated_index_arithmetic_is_the_product(cfg: bm.Bf16MmaConfig) -> None:
    """Each lane's words, paired along K as the PRMTs pair them and stored at the epilogue's destinations,
    make x @ W in float64: the kernel's addresses, permutation and destinations together."""
    k, n = cfg.k_warps * cfg.k_step * 2, cfg.cols * 3
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    w = torch.randn(k, n, generator=g).to(torch.bfloat16)
    assert torch.allclose(bm.emulate(x, w, cfg), x.double() @ w.double(), rtol=1e-12, atol=1e-9)


def test_the_destinations_are_a_permutation_of_each_programs_columns() -> None:
    for cfg in CONFIGS:
        dest = bm.destinations(cfg)
        assert torch.equal(dest.sort().values, torch.arange(cfg.cols))
        t = cfg.tiles  # a lane group's T tiles are T adjacent outputs
        assert torch.equal(dest[torch.arange(t) * 8], torch.arange(t))


def test_the_rule_picks_the_measured_winners_and_fits_other_shapes() -> None:
    """config_for gives each Llama-3-8B matrix its best config with PDL (benchmarks/bf16_mma_lab.py, H100,
    2026-12-06), a config that fits on other shapes, and None where none can."""
    assert bm.config_for(4096, 6144) == bm.Bf16MmaConfig(16, 8, 1, 32, 1)
    assert bm.config_for(4096, 4096) == bm.Bf16MmaConfig(16, 4, 1, 32, 2)
    assert bm.config_for(14336, 4096) == bm.Bf16MmaConfig(16, 4, 1, 32, 2)
    assert bm.config_for(4096, 28672, gate=True) == bm.Bf16MmaConfig(8, 8, 2, 32, 1)
    assert bm.config_for(11008, 4096) == bm.Bf16MmaConfig(16, 4, 1, 16, 2)  # 16 K warps of 16 rows, not 8 of 32
    for k, n, gate in ((11008, 4096, False), (4096, 22016, True), (3072, 16384, True), (8192, 1024, False),
                       (2048, 8192, True), (576, 1536, False), (1408, 96, False), (3072, 5120, False)):
        cfg = bm.config_for(k, n, gate)
        assert cfg is not None and bm.fits(k, n, cfg, gate), (k, n, gate)
    assert bm.config_for(4104, 4096) is None  # K not a multiple of 16
    assert bm.config_for(4096, 4112) is None  # N not a multiple of 32
    assert bm.config_for(4096, 96, gate=True) is None  # halves of 48: not whole programs of 32 gates


def test_the_references_are_the_unfused_models_roundings() -> None:
    """bf16_mma_reference: the product rounded, then the residual (rounded again), SiLU(gate) * up of the
    rounded product, or the product of the normed row scaled by 1 / rms; the statistics' reference is
    norm_statistics of the output."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    res = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    product = (x.float() @ w.float()).to(torch.bfloat16)
    assert torch.equal(bm.bf16_mma_reference(x, w), product)
    assert torch.equal(bm.bf16_mma_reference(x, w, res), product + res)
    assert torch.equal(bm.bf16_mma_reference(x, w, gate=True), gated_input(product))
    sumsq = torch.rand(3, 4, generator=g) * 64
    scaled = (x.float() @ w.float()) * torch.rsqrt(sumsq.sum(dim=1, keepdim=True) / 64 + 1e-5)
    assert torch.equal(bm.bf16_mma_reference(x, w, sumsq=sumsq, eps=1e-5), scaled.to(torch.bfloat16))
    weight = torch.rand(96, generator=g).to(torch.bfloat16)
    out, normed, squares = bm.bf16_mma_stats_reference(x, w, res, weight)
    assert torch.equal(out, product + res)
    assert all(torch.equal(a, b) for a, b in zip((normed, squares), norm_statistics(out, weight), strict=True))


def test_the_launcher_refuses_what_the_kernel_does_not_take() -> None:
    """Checked before any kernel is built, so on any machine."""
    x, w = torch.zeros(1, 4096, dtype=torch.bfloat16), torch.zeros(4096, 4096, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16_mma needs"):
        bm.bf16_mma(x.float(), w)
    with pytest.raises(ValueError, match="bf16_mma needs"):
        bm.bf16_mma(torch.zeros(9, 4096, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="bf16_mma needs"):
        bm.bf16_mma(x, w.t())  # not contiguous
    with pytest.raises(ValueError, match="takes no config"):
        bm.bf16_mma(torch.zeros(1, 4104, dtype=torch.bfloat16), torch.zeros(4104, 4096, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="takes no config"):
        bm.bf16_mma(x, w, config=bm.Bf16MmaConfig(16, 8, 1, 32, 1), gate=True)  # one column group: no halves
    with pytest.raises(ValueError, match="residual"):
        bm.bf16_mma(x, w, torch.zeros(1, 2048, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="sumsq"):
        bm.bf16_mma(x, w, sumsq=torch.zeros(1, 4096))
    with pytest.raises(ValueError, match="norm statistics"):
        bm.bf16_mma_with_stats(x, w, None, torch.zeros(4096, dtype=torch.bfloat16),
                               torch.zeros(1, 4096, dtype=torch.bfloat16), torch.zeros(1, 128))


needs_gluon = pytest.mark.skipif(not (torch.cuda.is_available() and bm.available()),
                                 reason="needs a CUDA GPU and a Triton with Gluon")


def _inputs(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 2).to(torch.bfloat16).cuda()
    w = torch.randn(k, n, generator=g).to(torch.bfloat16).cuda()
    res = torch.randn(m, n, generator=g).to(torch.bfloat16).cuda()
    return x, w, res


@needs_gluon
@pytest.mark.parametrize("m", [1, 3, 8])
def test_the_kernel_matches_float64_at_every_config(m: int) -> None:
    ran = 0
    for cfg in CONFIGS:
        for k_mult, n_mult in ((1, 1), (3, 2)):
            k, n = cfg.k_warps * cfg.k_step * k_mult, cfg.cols * n_mult
            x, w, res = _inputs(m, k, n, seed=k + n + m)
            for pdl in (False, True):
                _assert_close(bm.bf16_mma(x, w, config=cfg, pdl=pdl), x, w)
            _assert_close(bm.bf16_mma(x, w, res, config=cfg), x, w, res)
            ran += 1
    assert ran == 2 * len(CONFIGS)


@needs_gluon
@pytest.mark.parametrize("k, n", [(4096, 6144), (4096, 4096), (14336, 4096), (4096, 28672), (11008, 4096),
                                  (576, 1536)])
def test_the_rules_configs_match_float64(k: int, n: int) -> None:
    x, w, res = _inputs(2, k, n, seed=k)
    _assert_close(bm.bf16_mma(x, w), x, w)
    _assert_close(bm.bf16_mma(x[:1], w, res[:1]), x[:1], w, res[:1])


@needs_gluon
@pytest.mark.parametrize("k, n", [(4096, 28672), (512, 256), (2048, 8192)])
@pytest.mark.parametrize("m", [1, 4])
def test_the_kernels_gate_epilogue_is_the_references(k: int, n: int, m: int) -> None:
    """SiLU(gate) * up of the rounded product, [M, N / 2], within one more bf16 rounding of the reference
    (the product's own error passes through SiLU * up); the plain call's product gated in torch agrees to
    one bf16 ulp: the kernel's float32 SiLU (the sparse GEMV's formula, 1 / (1 + exp(-g))) is not
    torch's, and on an H100 2 of 14336 outputs of the 8B gate|up differed, by 2e-12 (2026-12-06)."""
    x, w, _ = _inputs(m, k, n, seed=n + m)
    cfg = bm.config_for(k, n, gate=True)
    got = bm.bf16_mma(x, w, gate=True)
    assert got.shape == (m, n // 2)
    want = bm.bf16_mma_reference(x, w, gate=True)
    plain_gated = gated_input(bm.bf16_mma(x, w, config=cfg))
    assert torch.allclose(got.float(), plain_gated.float(), rtol=2 ** -7, atol=1e-6)  # one bf16 ulp
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -6, atol=0.05 * want.float().abs().max().item())


@needs_gluon
@pytest.mark.parametrize("k, n", [(2048, 4096), (4096, 512), (1408, 96)])
def test_the_kernels_statistics_are_the_references_alone_and_among_rows(k: int, n: int) -> None:
    """STATS: the product exactly as without it, out * weight exactly the reference's, the tile sums within
    float32 rounding; PRENORMED (the next projection, K = n) within the product's tolerance of the
    reference, also with the gate; and every output has the same bits alone as among 2-8 rows
    (self-speculation's verify)."""
    x, w, residual = _inputs(8, k, n, seed=k)
    g = torch.Generator().manual_seed(n)
    w2 = torch.randn(n, 512, generator=g).to(torch.bfloat16).cuda()
    norm_weight = (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16).cuda()

    def run(rows: slice) -> tuple[torch.Tensor, ...]:
        m = len(range(8)[rows])
        scaled = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        sumsq = torch.empty(m, n // 16, device="cuda")
        out = bm.bf16_mma_with_stats(x[rows], w, residual[rows], norm_weight, scaled, sumsq)
        return (out, scaled, sumsq, bm.bf16_mma(scaled, w2, sumsq=sumsq, eps=1e-5),
                bm.bf16_mma(scaled, w2, gate=True, sumsq=sumsq, eps=1e-5), bm.bf16_mma(x[rows], w))

    for m in (1, 2, 5, 8):
        out, scaled, sumsq, normed, normed_gated, plain = run(slice(0, m))
        assert torch.equal(out, bm.bf16_mma(x[:m], w, residual[:m]))
        assert torch.equal(scaled, (out.float() * norm_weight.float()).to(torch.bfloat16))
        assert torch.allclose(sumsq.double(), out.double().square().view(m, -1, 16).sum(dim=2), rtol=1e-5)
        want = bm.bf16_mma_reference(scaled, w2, sumsq=sumsq, eps=1e-5)
        assert torch.allclose(normed.float(), want.float(), rtol=2 ** -7, atol=2e-3)
        assert torch.allclose(normed_gated.float(), gated_input(normed).float(), rtol=2 ** -7, atol=1e-6)
        if m > 1:
            for i in range(m):
                alone = run(slice(i, i + 1))
                for a, b in zip(alone, (out, scaled, sumsq, normed, normed_gated, plain), strict=True):
                    assert torch.equal(a[0], b[i]), (k, n, m, i)


# ---------------------------------------------------------------------------------------------
# PackedLinear and the decode block (TEAL_BF16_MMA): the CPU runs the op's reference
# ---------------------------------------------------------------------------------------------

def _bf16_model(n_layer: int, seed: int = 4) -> torch.nn.Module:
    """A tiny bf16 model on the fused decode path whose four projections all take bf16_mma (q|k|v [128, 384],
    o [128, 128], gate|up [128, 512] gating, down [256, 128]), flagged by hand as attach_bf16_mma does on
    CUDA, the blocks linked for the statistics; after an 8-token prefill."""
    from decode import install_fused_decode
    from linear import packed_projections

    model = tiny_model(seed=seed, dim=128, intermediate_size=256, n_layer=n_layer).to(torch.bfloat16)
    install_fused_decode(model)
    for name, m in packed_projections(model).items():
        assert m.use_bf16_mma(name.endswith("feed_forward.w13"), sparse_stats=True)
        assert m.mma_gate == name.endswith("feed_forward.w13")
    install_fused_decode(model)  # now links the blocks
    model.setup_caches(1, 32)
    return model


def test_only_bf16_layers_of_shapes_it_takes_use_it() -> None:
    from linear import PackedLinear

    layer = PackedLinear(4096, 4096)
    assert layer.use_bf16_mma(gate_up=False, sparse_stats=True) and layer.bf16_mma and layer.mma_norm_stats
    assert not layer.mma_gate and layer.sparse_norm_stats
    gate_up = PackedLinear(4096, 28672, [14336, 14336])
    assert gate_up.use_bf16_mma(gate_up=True, sparse_stats=False) and gate_up.mma_gate and not gate_up.sparse_norm_stats
    for other in (PackedLinear(4104, 4096), PackedLinear(4096, 4096, dtype=torch.float16),
                  PackedLinear(4096, 4096, fmt="int8")):
        assert not other.use_bf16_mma(gate_up=False, sparse_stats=True) and not other.bf16_mma


@torch.no_grad()
def test_dense_decode_calls_run_bf16_mma_and_sparse_ones_do_not(monkeypatch) -> None:
    """A dense decode call of a bf16_mma layer goes to teal::bf16_mma with its residual (the reference's
    product on the CPU); a gating layer returns SiLU(gate) * up when asked; a sparse call, a prefill past
    the decode batch and a call without the flag do not go there."""
    import linear
    from linear import PackedLinear

    calls, real = [], linear.bf16_mma
    monkeypatch.setattr(linear, "bf16_mma", lambda *args: calls.append(tuple(args[0].shape)) or real(*args))
    g = torch.Generator().manual_seed(5)
    layer = PackedLinear(128, 512, [256, 256])
    layer.weight = torch.randn(128, 512, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 1, 128, generator=g).to(torch.bfloat16)
    res = torch.randn(1, 1, 512, generator=g).to(torch.bfloat16)
    plain = layer(x, residual=res)
    assert calls == []
    assert layer.use_bf16_mma(gate_up=True, sparse_stats=False)
    with pytest.raises(ValueError, match="gate_product=False"):
        layer(x)  # a gating layer's dense calls come out gated
    assert torch.equal(layer(x, gate_product=True), bm.bf16_mma_reference(x.view(1, 128), layer.weight, gate=True)
                       .view(1, 1, 256))
    assert calls == [(1, 128)]
    layer.mma_gate = False
    assert torch.equal(layer(x, residual=res), plain)  # the reference rounds as the unfused product + residual
    assert torch.equal(layer(x.expand(1, 5, 128), residual=res.expand(1, 5, 512))[:, 2], plain[:, 0])
    assert calls == [(1, 128), (1, 128), (5, 128)]
    layer(torch.randn(1, 9, 128, generator=g).to(torch.bfloat16))  # past the decode batch: a GEMM
    layer.thresholds.fill_(0.5)
    layer.sparse = True
    layer(x)
    assert calls == [(1, 128), (1, 128), (5, 128)]


@pytest.mark.parametrize("seqlen", [1, 3])
@torch.no_grad()
def test_a_decode_step_on_bf16_mma_runs_no_norm_before_a_projection(monkeypatch, seqlen: int) -> None:
    """o gives each block's ffn_norm, down the next block's attention norm (5 calls of teal::bf16_mma_stats
    in 3 blocks: 3 o, 2 down), gate|up gates (no SiLU * up before down), only the first block's attention
    norm and the final one run as RMSNorm modules, and the logits are those of the same model on cuBLAS's
    path (no flags) within bf16 roundings: a decode step and a 3-position verify step."""
    import linear
    from model import RMSNorm

    stats_calls, gates, norms = [], [], []
    real_stats, real_mma = linear.bf16_mma_stats, linear.bf16_mma
    monkeypatch.setattr(linear, "bf16_mma_stats", lambda *a: stats_calls.append(a[0].shape) or real_stats(*a))
    monkeypatch.setattr(linear, "bf16_mma", lambda *a: gates.append(a[3]) or real_mma(*a))
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x, f=RMSNorm.forward: norms.append(x.shape) or f(self, x))
    idx = torch.randint(256, (1, 8 + seqlen), generator=torch.Generator().manual_seed(0))
    out = []
    for flagged in (False, True):
        model = _bf16_model(3)
        if not flagged:
            from decode import install_fused_decode
            from linear import packed_projections
            model = tiny_model(seed=4, dim=128, intermediate_size=256, n_layer=3).to(torch.bfloat16)
            install_fused_decode(model)
            model.setup_caches(1, 32)
            assert not any(m.bf16_mma for m in packed_projections(model).values())
        model(idx[:, :8], torch.arange(8))
        stats_calls.clear(), gates.clear(), norms.clear()
        out.append(model(idx[:, 8:], torch.arange(8, 8 + seqlen)).double())
        if flagged:
            assert len(stats_calls) == 5 and len(norms) == 2
            assert gates.count(True) == 3 and len(gates) == 7  # 3 q|k|v, 3 gate|up (gated), the last down
        else:
            assert (len(stats_calls), len(gates), len(norms)) == (0, 0, 7)
    assert (out[1] - out[0]).norm() / out[0].norm() < 0.02


@needs_gluon
@torch.no_grad()
def test_a_compiled_cuda_decode_step_on_bf16_mma_matches_cublas(monkeypatch) -> None:
    """A tiny bf16 model on CUDA with TEAL_BF16_MMA=1 (the preload GEMV kept off its small matrices, so that
    attach_bf16_mma takes them) against =0: every projection takes bf16_mma, and the compiled decode steps'
    logits (fullgraph, CUDA graphs' mode) agree within bf16 roundings, step after step with the
    statistics' buffers written in place."""
    import linear
    from decode import install_fused_decode
    from linear import packed_projections

    monkeypatch.setattr(linear, "preload_gemv_fits", lambda *a: False)
    idx = torch.randint(256, (1, 12), generator=torch.Generator().manual_seed(0)).cuda()
    logits = []
    for switch in ("0", "1"):
        monkeypatch.setenv(linear.BF16_MMA_ENV, switch)
        torch._dynamo.reset()
        model = tiny_model(seed=6, dim=128, intermediate_size=256, n_layer=3).to(torch.bfloat16).cuda()
        install_fused_decode(model)
        assert all(m.bf16_mma == (switch == "1") for m in packed_projections(model).values())
        model.setup_caches(1, 16)
        model(idx[:, :8], torch.arange(8, device="cuda"))
        step = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        logits.append(torch.stack([step(idx[:, i:i + 1], torch.tensor([i], device="cuda")).double().clone()
                                   for i in range(8, 12)]))
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 0.02
