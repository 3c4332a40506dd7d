"""A slice of tests/fuzz_gemv.py in CI: random problems (formats, fusions, both kernel designs and
every row-selection mode) under the Triton interpreter against float64 math, and int4_mma's problems
(its CPU implementation here: Gluon runs on a GPU only). The full run (>= 2000 problems) is for the
GPU: `python tests/fuzz_gemv.py --problems 2000 --jobs 14`."""
import fuzz_gemv
import pytest
import torch
from fixtures import DEVICE

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


def test_fuzz_slice_has_no_mismatch():
    results = fuzz_gemv.fuzz(48, seed=1000)
    summary = fuzz_gemv.summary(results)
    assert summary["problems"] == 48
    # the slice reaches every format, fusion and mode, so a regression in any of them shows here
    reached = ({f"fmt={f}" for f in fuzz_gemv.FORMATS} | {f"fusion={f}" for f in fuzz_gemv.FUSIONS}
               | {f"mode={m}" for m in fuzz_gemv.MODES})
    assert reached <= set(summary["by"])
    failures = [(r["seed"], r["fmt"], r["mode"], r["fusion"], r["excess"]) for r in results if not r["ok"]]
    assert not failures


def test_fuzz_flags_a_wrong_product(monkeypatch):
    """The checker itself: an output off by 1% is a mismatch."""
    real = fuzz_gemv.sparse_gemv_triton
    monkeypatch.setattr(fuzz_gemv, "sparse_gemv_triton", lambda *a, **kw: real(*a, **kw) * 1.01)
    case = fuzz_gemv.make_case(1000, tiny=DEVICE == "cpu", mode="auto")
    case["levels"] = ["all"] * len(case["sizes"])  # every row kept: the product is far from zero
    # plain: a gated or normed case's tolerance also allows one ulp of the input per term, which on
    # the GPU's larger K is more than 1% of the product (seed 1000 there is gated)
    case["fusion"] = "plain"
    assert not fuzz_gemv.run_case(case, DEVICE)["ok"]
    monkeypatch.setattr(fuzz_gemv, "sparse_gemv_triton", real)
    assert fuzz_gemv.run_case(case, DEVICE)["ok"]


def test_fuzz_statistics_problems_match_and_a_wrong_sum_is_flagged(monkeypatch):
    """The problems with the epilogue's norm statistics (few in the slice: tiny N is rarely a multiple
    of 16): four of them match, and sums of squares 1% high are a mismatch."""
    cases = [c for c in map(lambda s: fuzz_gemv.make_case(s, tiny=DEVICE == "cpu"), range(1000, 3000))
             if c["stats"]][:4]
    assert len(cases) == 4 and all(fuzz_gemv.run_case(c, DEVICE)["ok"] for c in cases)
    case = cases[0]
    real = fuzz_gemv.sparse_gemv_triton

    def high_sums(*args, stats=None, **kwargs):
        out = real(*args, stats=stats, **kwargs)
        stats[2].mul_(1.01)
        return out
    monkeypatch.setattr(fuzz_gemv, "sparse_gemv_triton", high_sums)
    assert not fuzz_gemv.run_case(case, DEVICE)["ok"]


def test_fuzz_flags_a_wrong_attention(monkeypatch):
    """The checker on the attention prologue: the op told position p - 1 instead of p attends over one
    cached token fewer, a mismatch. At p = 1 that token is half of what each head attends to; at the
    GPU cases' hundreds of positions one token fewer moved the output by less than the checker's
    tolerance (H200, 2026-12-05), so the test sets p = 1."""
    case = next(c for c in map(lambda s: fuzz_gemv.make_case(s, tiny=DEVICE == "cpu"), range(2000, 2400))
                if c["fusion"] == "attention" and c["attention"]["s_max"] >= 2)
    case["attention"]["p"] = 1
    case["levels"] = ["all"] * len(case["sizes"])
    assert fuzz_gemv.run_case(case, DEVICE)["ok"]
    real = fuzz_gemv.attention_o_triton

    def stale(qkv, cs, k_cache, v_cache, pos, *args, **kwargs):  # attends at p - 1 instead of p
        return real(qkv, cs, k_cache, v_cache, pos - 1, *args, **kwargs)
    monkeypatch.setattr(fuzz_gemv, "attention_o_triton", stale)
    assert not fuzz_gemv.run_case(case, DEVICE)["ok"]


def test_int4_mma_slice_has_no_mismatch():
    """int4_mma's problems: every epilogue and the norm's statistics, against float64."""
    results = fuzz_gemv.fuzz(36, seed=3000, mode="int4_mma")
    summary = fuzz_gemv.summary(results)
    assert {f"fusion={f}" for f in fuzz_gemv.MMA_FUSIONS} <= set(summary["by"])
    assert not [(r["seed"], r["fusion"], r["excess"]) for r in results if not r["ok"]]


@pytest.mark.parametrize("fusion", fuzz_gemv.MMA_FUSIONS)
def test_int4_mma_checker_flags_a_wrong_product(monkeypatch, fusion: str):
    """The checker on int4_mma: a product 5% off (before the residual, the gate or the statistics; the
    gate's tolerance allows about three bf16 roundings) is a mismatch, and the gate's halves swapped too.
    On a GPU the kernel itself is checked, so only the CPU implementation can be broken here."""
    if DEVICE != "cpu":
        pytest.skip("breaks the CPU implementation, which a GPU run does not call")
    case = fuzz_gemv.make_case(3000, tiny=True, mode="int4_mma")
    case["fusion"] = fusion
    if fusion.endswith("gate"):  # the paired copy needs an even number of 16-row tiles a warp
        case["config"] = dict(k_warps=1, row_warps=1, tiles_a_warp=2, lookahead=1)
        case["sizes"] = [64]
    assert fuzz_gemv.run_case(case, DEVICE)["ok"]
    real = fuzz_gemv.mma.int4_mma_reference

    def off(x, *args, **kwargs):  # the product 5% off (its input scaled, before any epilogue)
        return real(x * 1.05, *args, **kwargs)
    monkeypatch.setattr(fuzz_gemv.mma, "int4_mma_reference", off)
    assert not fuzz_gemv.run_case(case, DEVICE)["ok"]
    if fusion.endswith("gate"):
        def swapped(x, words, scales, zeros, residual, gate, *rest):  # SiLU(up) * gate: the halves swapped
            paired = real(x, words, scales, zeros, residual, False, *rest)
            natural = torch.empty_like(paired)
            natural[:, fuzz_gemv.mma.paired_order(paired.shape[1])] = paired
            return fuzz_gemv.gated_input(torch.cat(natural.chunk(2, dim=1)[::-1], dim=1))
        monkeypatch.setattr(fuzz_gemv.mma, "int4_mma_reference", swapped)
        assert not fuzz_gemv.run_case(case, DEVICE)["ok"]
