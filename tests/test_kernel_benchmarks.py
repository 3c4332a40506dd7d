"""benchmarks/tune_kernels.py and benchmarks/bench_kernels.py without a GPU: the tuner's candidate
grid, the fused variants' inputs and which rows reach the dispatch's speed table."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from fixtures import DEVICE

from benchmarks import bench_kernels, timing, tune_kernels
from teal_kernels.reference import sparse_gemv_reference
from teal_kernels.triton_gemv import KernelConfig


def test_candidates_hold_both_designs_and_the_stored_config():
    stored = KernelConfig(block_n=128, block_k=1024, sub_k=8, compact=False, num_warps=2)
    for fmt in ("bf16", "int8"):
        grid = tune_kernels.candidates(fmt, 1, 4096, [4096, 1024, 1024], quick=True, stored=stored)
        rows = [c for c in grid if c.design == "rows" and c.compact and c.block_n in (256, 512)]
        assert len(rows) >= 16 and any(c.design == "dot" for c in grid) and stored in grid
        assert {dataclasses.replace(stored, max_registers=cap) for cap in (96, 128)} <= set(grid)
        assert len(set(grid)) == len(grid)
    int4 = tune_kernels.candidates("int4-g128", 1, 4096, [4096, 1024, 1024], quick=False, stored=None)
    assert sum(c.design == "rows" for c in int4) <= 1  # only the rows heuristic: int4 runs the dot design


def test_candidates_of_named_kinds_keep_the_stored_config():
    """--kinds: a partial retune times the named kinds' candidates against the stored winner only."""
    stored = KernelConfig(block_n=256, block_k=512, sub_k=16, max_registers=96)
    kinds = ["rows-compact-prefetch-lane_sum", "dot"]
    grid = tune_kernels.candidates("int8", 1, 4096, [14336, 14336], quick=False, stored=stored, kinds=kinds)
    full = tune_kernels.candidates("int8", 1, 4096, [14336, 14336], quick=False, stored=stored)
    assert stored in grid and {tune_kernels.config_kind(c) for c in grid} == {"rows-compact", *kinds}
    every = tune_kernels.candidates("int8", 1, 4096, [14336, 14336], quick=False, stored=stored,
                                    kinds=["rows-compact-pipelined", "rows-compact-pipelined-lane_sum"]) + full
    assert {tune_kernels.config_kind(c) for c in every} <= set(tune_kernels.KINDS)
    assert set(grid) == {c for c in full if tune_kernels.config_kind(c) in kinds} | {stored}


def test_pipelined_candidates_only_when_named():
    """The pipelined rows loop is opt-in: the default grid has none, --kinds naming it brings long K blocks
    (bf16/int8; int4, which runs the dot design, is never offered it)."""
    full = tune_kernels.candidates("int8", 1, 4096, [14336, 14336], quick=False, stored=None)
    assert not any(tune_kernels.config_kind(c).startswith("rows-compact-pipelined") for c in full)
    piped = tune_kernels.candidates("int8", 1, 4096, [14336, 14336], quick=False, stored=None,
                                    kinds=["rows-compact-pipelined"])
    assert piped and all(tune_kernels.config_kind(c) == "rows-compact-pipelined" for c in piped)
    assert max(c.block_k for c in piped) == 4096 and {c.num_stages for c in piped} == {4, 8}
    for m in (1, 2):
        int4 = tune_kernels.candidates("int4-g128", m, 4096, [14336, 14336], quick=False, stored=None,
                                       kinds=["rows-compact-pipelined", "rows-compact-pipelined-lane_sum"])
        assert not int4


def test_gather_candidates_only_when_named_at_one_row():
    """The "gather" design is offered only under --kinds gather and at one row (a batch would run the
    dot design's masked tiles); int4's candidates keep whole groups, at most 16 a block."""
    full = tune_kernels.candidates("int4-g128", 1, 4096, [14336, 14336], quick=False, stored=None)
    assert not any(c.design == "gather" for c in full)
    stored = KernelConfig(block_n=256, block_k=512, sub_k=128, num_stages=3, design="dot")
    named = tune_kernels.candidates("int4-g128", 1, 4096, [14336, 14336], quick=False, stored=stored,
                                    kinds=["gather"])
    assert stored in named and all(c.design == "gather" for c in named if c != stored)
    assert {c.block_k for c in named if c != stored} == {512, 1024, 2048}
    assert all(c.block_k % 128 == 0 and c.block_k // 128 <= 16 for c in named)
    assert not any(c.design == "gather" for c in tune_kernels.candidates(
        "int4-g128", 2, 4096, [14336, 14336], quick=False, stored=None, kinds=["gather"]))


def test_min_block_k_offers_long_dot_tiles_only():
    """--min_block_k: only K blocks of at least that many rows (and the stored config), with the dot
    design's 2048 / 4096-row blocks 4 and 6 stages deep added; without it, none of those."""
    stored = KernelConfig(block_n=256, block_k=512, sub_k=128, num_stages=3, design="dot")
    full = tune_kernels.candidates("int4-g128", 1, 4096, [14336, 14336], quick=False, stored=stored)
    assert stored in full and max(c.block_k for c in full) <= 1024
    long_k = tune_kernels.candidates("int4-g128", 1, 4096, [14336, 14336], quick=False, stored=stored,
                                     kinds=["dot"], min_block_k=2048)
    assert stored in long_k and all(c.block_k >= 2048 for c in long_k if c != stored)
    assert {c.block_k for c in long_k} == {512, 2048, 4096} and {c.num_stages for c in long_k if c != stored} == {4, 6}
    assert all(c.design == "dot" for c in long_k)


def test_partial_retune_keeps_the_other_kinds_on_record():
    """--kinds: the new entry's winner and timings win; the kinds it did not time and the heuristic's
    time come from the entry it replaces."""
    def runner_up(us):
        return {"us": us, "config": {}, "us_by_sparsity": {"0.5": us}}
    previous = {"config": {"block_k": 512}, "us": {"0.5": 19.4}, "heuristic_us_at_max_sparsity": 28.1,
                "best_of_each_kind_at_max_sparsity": {"dot": runner_up(35.2), "rows-compact": runner_up(19.4)}}
    entry = {"config": {"block_k": 2048}, "us": {"0.5": 17.8}, "heuristic_us_at_max_sparsity": None,
             "best_of_each_kind_at_max_sparsity": {"rows-compact": runner_up(19.5),
                                                   "rows-compact-pipelined": runner_up(17.4)}}
    merged = tune_kernels.merge_partial(previous, entry)
    assert merged["config"] == {"block_k": 2048} and merged["us"] == {"0.5": 17.8}
    assert merged["heuristic_us_at_max_sparsity"] == 28.1
    assert merged["best_of_each_kind_at_max_sparsity"] == {"dot": runner_up(35.2), "rows-compact": runner_up(19.5),
                                                           "rows-compact-pipelined": runner_up(17.4)}
    assert entry["heuristic_us_at_max_sparsity"] is None  # the new entry itself is left as it was
    # an entry copied from another GPU keeps none of its timings
    assert tune_kernels.merge_partial({**previous, "copied_from": "NVIDIA H200"}, entry) == entry


def test_tune_shape_times_the_decode_call(monkeypatch):
    """tune_kernels --decode_fusions: every candidate is checked and timed as decode.py calls the
    layer (here on the CPU interpreter, with a timer that runs each call once instead of a CUDA graph),
    and the entry records the fusions."""
    make_x, make_weight = timing.make_x, timing.make_weight
    monkeypatch.setattr(tune_kernels, "make_x", lambda m, k, dtype, device, seed: make_x(m, k, dtype, DEVICE, seed))
    monkeypatch.setattr(tune_kernels, "make_weight", lambda fmt, k, n, device, seed: make_weight(fmt, k, n, DEVICE, seed))
    calls = []

    def run_once(step, n_variants):
        for i in range(n_variants):
            step(i)
        calls.append(n_variants)
        return float(len(calls))
    monkeypatch.setattr(tune_kernels, "graph_time_us", run_once)
    monkeypatch.setattr(tune_kernels, "copies_for", lambda nbytes: 1)  # one weight, no rotation
    grid = [KernelConfig(block_n=32, block_k=32, sub_k=8), KernelConfig(block_n=16, block_k=64, sub_k=16, design="dot")]
    monkeypatch.setattr(tune_kernels, "candidates", lambda *args: grid)
    for fusions in [("norm",), ("gated", "residual")]:
        entry = tune_kernels.tune_shape("int8", 1, 64, [32, 32], [0.0, 0.5], True, None, None, fusions)
        assert entry["fusions"] == list(fusions) and entry["candidates"] == 2  # both matched the reference
        assert KernelConfig.from_dict(entry["config"]) in grid


@pytest.mark.parametrize("dense_winner", ["dot", "rows"])
def test_tune_shape_keeps_a_faster_dense_config_apart(monkeypatch, dense_winner):
    """The sparse levels pick the config; where another finalist is faster at 0% it is stored as the
    config of dense calls, else no such entry (timed here by a table, on the CPU interpreter)."""
    make_x, make_weight = timing.make_x, timing.make_weight
    monkeypatch.setattr(tune_kernels, "make_x", lambda m, k, dtype, device, seed: make_x(m, k, dtype, DEVICE, seed))
    monkeypatch.setattr(tune_kernels, "make_weight", lambda fmt, k, n, device, seed: make_weight(fmt, k, n, DEVICE, seed))
    rows, dot = KernelConfig(block_n=32, block_k=32, sub_k=8), KernelConfig(block_n=16, block_k=64, sub_k=16, design="dot")
    monkeypatch.setattr(tune_kernels, "candidates", lambda *args: [rows, dot])
    level = []
    build = tune_kernels.build_problems
    monkeypatch.setattr(tune_kernels, "build_problems", lambda fmt, m, k, splits, s, fusions=():
                        level.append(s) or build(fmt, m, k, splits, s, fusions))
    us = {("rows", 0.5): 1.0, ("dot", 0.5): 2.0, ("rows", 0.0): 3.0, ("dot", 0.0): 1.5 if dense_winner == "dot" else 4.0}
    monkeypatch.setattr(tune_kernels, "time_config", lambda c, problems: us[c.design, level[-1]] + (c.num_warps != 4))
    entry = tune_kernels.tune_shape("int8", 1, 64, [32, 32], [0.0, 0.5], True)
    assert entry["config"] == rows.to_dict() and entry["us"] == {"0.0": 3.0, "0.5": 1.0}
    if dense_winner == "dot":
        assert entry["dense_config"] == dot.to_dict() and entry["dense_us"] == 1.5
    else:
        assert "dense_config" not in entry and "dense_us" not in entry


def test_a_config_the_gpu_cannot_hold_is_skipped(monkeypatch):
    """A candidate asking for more shared memory than an SM has (a deep pipeline of wide tiles) is
    not a candidate, and the tune goes on."""
    from triton.runtime.errors import OutOfResources

    def too_big(*args, **kwargs):
        raise OutOfResources(232448, 232448 - 1024, "shared memory")
    monkeypatch.setattr(tune_kernels, "sparse_gemv_triton", too_big)
    p = timing.Problem(torch.ones(1, 16), torch.ones(16, 8), torch.zeros(1), [8], None, None, 0)
    assert not tune_kernels.is_correct(KernelConfig(), p, torch.ones(1, 8))


def test_candidates_are_the_configs_that_run():
    """Each candidate as the kernel runs it, once: an int4 tile of 256 columns runs 4 warps at one
    row (one tl.dot per 16 rows and 64 columns), so "8 warps" is neither timed again nor stored."""
    stored = KernelConfig(block_n=256, block_k=512, sub_k=128, num_warps=8, design="dot")
    for fmt, group in (("int4-g128", 128), ("int4-g32", 32)):
        grid = tune_kernels.candidates(fmt, 1, 4096, [4096, 1024, 1024], quick=False, stored=stored)
        assert len(set(grid)) == len(grid)
        dots = [c for c in grid if c.design == "dot"]
        assert dots and all(c.num_warps <= c.block_n // 64 and c.sub_k <= group for c in dots)
        assert dataclasses.replace(stored, num_warps=4, sub_k=min(128, group)) in grid


def test_fused_calls_compute_the_plain_product_of_their_activation():
    """timing.fused_call: the fused call (SiLU(gate) * up or the RMSNorm in the prologue, the residual
    in the epilogue) gives the plain product of the activation it reports, plus the residual."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=gen).bfloat16()
    w = (torch.randn(64, 48, generator=gen) * 0.1).bfloat16()
    for fusions in [("gated", "residual"), ("norm",), ()]:
        x_in, kwargs, act = timing.fused_call(x, fusions, 48)
        thresholds = timing.threshold_for(act, 0.5, 2)
        fused = sparse_gemv_reference(x_in, w, thresholds, [32, 16], **kwargs).float()
        plain = sparse_gemv_reference(act, w, thresholds, [32, 16]).float()
        plain += kwargs["residual"].float() if "residual" in fusions else 0
        torch.testing.assert_close(fused, plain, rtol=2**-7, atol=2**-7)
        assert x_in.shape == (1, 128 if "gated" in fusions else 64)


def test_decode_fusions_follow_packed_linear():
    assert timing.decode_fusions("qkv", "int8", 1) == ("norm",) and timing.decode_fusions("gate_up", "bf16", 1) == ("norm",)
    assert timing.decode_fusions("qkv", "int4-g128", 1) == ("norm",) and timing.decode_fusions("gate_up", "bf16", 4) == ()
    assert timing.decode_fusions("down", "int4-g32", 8) == ("gated", "residual")
    assert timing.decode_fusions("o", "bf16", 1) == ("residual",) and timing.decode_fusions("lm_head", "int8", 1) == ()


def test_speed_table_takes_plain_rows_only():
    meta = {"gpu": "NVIDIA H200", "command": "bench", "date": "2026-12-02"}
    row = dict(model="llama3-8b", layer="down", format="bf16", M=1, K=14336, N=4096, sparsity=0.5,
               sparse_us=24.0, matmul_us=31.0)
    entries = bench_kernels.speed_table_entries([row, {**row, "fusion": "gated", "sparse_us": 99.0}], meta)
    (entry,) = entries.values()
    assert entry["sparse_us"] == {"0.5": 24.0} and entry["dense_us"] == 31.0
    int4 = dict(row, format="int4-g128", sparsity=0.0, sparse_us=23.9, tinygemm_us=18.6, int4_mma_us=15.61)
    (entry,) = bench_kernels.speed_table_entries([int4, {**int4, "sparsity": 0.5, "sparse_us": 21.5}], meta).values()
    assert entry == {"sparse_us": {"0": 23.9, "0.5": 21.5}, "dense_us": 23.9, "tinygemm_us": 18.6,
                     "int4_mma_us": 15.61, "source": "bench (2026-12-02)"}
    (entry,) = bench_kernels.speed_table_entries([{**int4, "int4_mma_us": None}], meta).values()
    assert "int4_mma_us" not in entry  # a shape int4_mma does not take


def test_persistent_lab_streams_the_kept_rows():
    """benchmarks/persistent_lab.py's layer kernel: each projection's y is x[kept] @ W[kept] (fp32
    reference), and its grid barriers let every program through (one program under the
    interpreter; two an SM on a GPU, where they must all be resident)."""
    from benchmarks import persistent_lab as lab

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [(64, 64), (64, 32), (32, 128), (128, 32)]
    layer = lab.Layer(shapes, 0.5, device, seed=3)
    sync = torch.zeros(3, dtype=torch.int32, device=device)
    grid = 1 if device.type == "cpu" else 2 * torch.cuda.get_device_properties(device).multi_processor_count
    assert lab.check(layer, sync, grid, 32, 16, 3, 1 << 22) < 1e-5
    assert int(sync[2]) == 0 and int(sync[0]) == 0  # nobody gave up; the count is back to zero
    assert int(sync[1]) == 3  # three barriers passed


def test_int4_kpacked_lab_layout_and_products():
    """benchmarks/int4_kpacked_lab.py: its copy puts code (k, n) in nibble (k % g) // (g / 8) of word
    (n, (k // g) * g / 8 + k % (g / 8)), with scales and zeros transposed; its kernel matches float64 in
    both code conversions (selftest: the interpreter on the CPU)."""
    from benchmarks import int4_kpacked_lab as lab

    k, n, group = 64, 6, 32
    w, scales, zeros, _ = timing.make_weight(f"int4-g{group}", k, n, "cpu", seed=5)
    words, s_t, z_t = lab.kpack(w, scales, zeros, group)
    codes = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n)
    per_word = group // 8
    for kk in range(k):
        word = words[:, (kk // group) * per_word + kk % per_word].to(torch.int64) & 0xFFFFFFFF
        nibble = (kk % group) // per_word
        assert torch.equal((word >> (4 * nibble)) & 0xF, codes[kk].to(torch.int64))
    assert torch.equal(s_t, scales.t()) and torch.equal(z_t, zeros.t())
    lab.selftest()


def test_markdown_shows_the_dense_int4_copies_for_int4_rows_only():
    row = dict(model="llama3-8b", layer="o", format="bf16", M=1, K=4096, N=4096, sparsity=0.5, sparse_us=11.0,
               matmul_us=13.4, linear_us=13.5, speedup_vs_linear=1.23, effective_tbps=0.8)
    meta = {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "date": "2026-12-04", "command": "bench"}
    int4 = {**row, "format": "int4-g128", "tinygemm_us": 12.34, "int4_mma_us": 7.16}
    lines = bench_kernels.markdown([row, int4], meta).splitlines()
    header, bf16, int4 = (line.split("|") for line in (lines[4], lines[-2], lines[-1]))
    assert [c.strip() for c in header[-3:-1]] == ["tinygemm µs", "int4_mma µs"]
    assert [c.strip() for c in bf16[-3:-1]] == ["", ""] and [c.strip() for c in int4[-3:-1]] == ["12.3", "7.2"]
    assert len(header) == len(bf16) == len(int4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_tuner_without_a_gpu_says_so():
    run = subprocess.run([sys.executable, "-m", "benchmarks.tune_kernels", "--models", "llama3-8b"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == "error: tune_kernels.py needs a CUDA GPU"


def test_attention_o_bench_times_every_method(monkeypatch):
    """benchmarks/bench_attention_o.py's loop at a tiny shape (the Triton kernels in the interpreter
    off CUDA), timed by calling each method once: the op agrees with the two-op path at every context,
    format and sparsity, every method runs on every layer copy, and the caches follow the context."""
    from benchmarks import bench_attention_o as bench

    monkeypatch.setenv("TEAL_CPU_KERNELS", "interpreter")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layers = [bench.Layer(n_head=4, n_kv=1, d=16, s_max=24, n=32, device=device, seed=i) for i in range(2)]
    ran = []

    def timer(step, copies):
        ran.append([tuple(step(i).shape) for i in range(copies)])
        return 1.0

    rows = bench.measure(layers, [8, 40], [0.0, 0.5], 24, timer)
    assert [(r["context"], r["weights"], r["sparsity"]) for r in rows] == [
        (c, f, s) for c in (8, 40) for f in ("bf16", "int8") for s in (0.0, 0.5)]
    assert [r["s_max"] for r in rows[::4]] == [24, 48] and layers[1].k.shape == (1, 1, 48, 16)
    assert all(r["max_rel_error"] <= 2e-2 for r in rows)
    assert list(rows[0]["us"]) == ["attention_o", "attention step + our o", "our o alone",
                                   "attention step + cuBLAS o", "attention step"]
    assert list(rows[1]["us"]) == ["attention_o", "attention step + our o", "our o alone"]
    assert ran[:5] == [[(1, 32)] * 2] * 4 + [[(1, 64)] * 2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_int4_mma_lab_without_a_gpu_says_so_and_its_configs_fit_the_8b_shapes():
    """benchmarks/int4_mma_lab.py: one line and exit 1 off CUDA (Gluon has no interpreter); every 8B
    matrix has configs to sweep, config_for's among them."""
    from benchmarks import int4_mma_lab as lab
    from teal_kernels.int4_mma import config_for

    run = subprocess.run([sys.executable, "-m", "benchmarks.int4_mma_lab"], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("error: int4_mma_lab needs a CUDA GPU")
    for _, k, splits in timing.MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        assert lab.fits(k, n, config_for(k, n)) and sum(lab.fits(k, n, c) for c in lab.CONFIGS) >= 10


def test_bf16_mma_lab_configs_and_refusal():
    """benchmarks/bf16_mma_lab.py (GPU-only; the kernel's own tests are tests/test_bf16_mma.py): off CUDA it
    says so in one line; every 8B matrix has configs to time, among them config_for's."""
    from benchmarks import bf16_mma_lab as lab
    from teal_kernels.bf16_mma import config_for

    run = subprocess.run([sys.executable, "-m", "benchmarks.bf16_mma_lab"], capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == "error: bf16_mma_lab needs a CUDA GPU"
    for _, k, splits in timing.MODEL_SHAPES["llama3-8b"]:
        assert sum(lab.fits(k, sum(splits), c) for c in lab.CONFIGS) >= 5 and config_for(k, sum(splits)) in lab.CONFIGS


def test_int4_sparse_mma_lab_copy_and_refusals():
    """benchmarks/int4_sparse_mma_lab.py (GPU-only kernel): its copy puts output 16 t + g in the low
    nibble and 16 t + g + 8 in the high nibble of byte t of lane group g, for every K row (checked
    against the codes one by one and through its inverse); the wrapper refuses a copy packed for another
    tile count and a K its K warps do not divide; the table's reference drops |x| <= threshold."""
    from benchmarks import int4_sparse_mma_lab as lab

    k, n, tiles = 256, 128, 4
    w, scales, zeros, _ = timing.make_weight("int4-g128", k, n, "cpu", seed=3)
    codes = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n)
    words = lab.pack_rows(w, tiles)
    assert words.shape == (k, n // (16 * tiles), 8, tiles // 4) and words.dtype == torch.int32
    assert torch.equal(lab.unpack_rows(words), codes)
    byte = words.view(torch.uint8).reshape(k, n // (16 * tiles), 8, tiles)  # row, block, g, tile
    for row, block, g, t in ((0, 0, 0, 0), (5, 1, 7, 3), (255, 0, 3, 2)):
        out = 16 * tiles * block + 16 * t + g
        assert byte[row, block, g, t] == codes[row, out] | codes[row, out + 8] << 4
    with pytest.raises(ValueError, match="R in 4, 8, 16"):
        lab.pack_rows(w, 2)
    x = timing.make_x(1, k, torch.bfloat16, "cpu", seed=4)
    for config in (lab.SparseConfig(2, 8), lab.SparseConfig(4, 4)):  # other R; 2 groups for 4 K warps
        with pytest.raises(ValueError, match="sparse_mma needs"):
            lab.sparse_mma(x, 0.5, words, scales, zeros, config)
    for config, threshold in ((lab.SparseConfig(2, 4), 0.0), (lab.SparseConfig(1, 8), 0.6),
                              (lab.SparseConfig(2, 4), 9.0)):
        packed = lab.pack_rows(w, config.tiles)
        got = lab.emulate(x, threshold, packed, scales, zeros, config)  # the kernel's index arithmetic
        assert lab.max_error(got, lab.reference(x, threshold, w, scales, zeros)) <= 1.0, (config, threshold)
    exact, bound = lab.reference(x, 0.5, w, scales, zeros)
    kept = torch.where(x.abs() > 0.5, x, 0).double() @ lab.dequantize_weight(w, scales, zeros, 128).double()
    assert torch.allclose(exact, kept) and (bound > 0).all()
    assert sum(lab.fits(k8, sum(s), c) for _, k8, s in timing.MODEL_SHAPES["llama3-8b"] for c in lab.CONFIGS) >= 80


@pytest.mark.usefixtures("interpreted_kernels")
@pytest.mark.parametrize("threshold", [0.0, 0.7, 5.0])
def test_int4_sparse_mma_lab_lists_each_groups_kept_rows_in_order(threshold: float):
    """list_kept (the lab's once-a-call listing, plain Triton: the interpreter here): each group's kept K
    in increasing order, their count and the float32 sum of their x, against torch."""
    from benchmarks import int4_sparse_mma_lab as lab

    x = timing.make_x(1, 384, torch.bfloat16, DEVICE, seed=int(threshold * 10))
    x[0, 130] = 0.0  # a zero is never kept, even at threshold 0
    lists, counts, sums = lab.list_kept(x, threshold)
    for g in range(3):
        group = x[0, 128 * g: 128 * (g + 1)].float().cpu()
        kept = torch.nonzero(group.abs() > threshold).flatten()
        assert int(counts[g]) == len(kept)
        assert torch.equal(lists[g, :len(kept)].cpu().long(), kept)
        assert torch.allclose(sums[g].cpu(), group[kept].sum(), rtol=1e-6, atol=1e-6)


def test_gather_bandwidth_sums_each_chunks_kept_rows():
    """benchmarks/gather_bandwidth.py's kernel (Triton; the interpreter here): each program's sums of its
    segment over its chunk of the kept rows are torch's, wrapping as int32, at every width and step of
    its grid that fits the matrix, pipelined or not; the wrapper refuses what it cannot launch."""
    from benchmarks import gather_bandwidth as gb

    device = DEVICE if DEVICE == "cuda" else "cpu"
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2**31, 2**31 - 1, (70, 128), generator=g, dtype=torch.int32)
    rows = torch.randperm(70, generator=g)[:37].sort().values.to(torch.int32)
    for config in (gb.GatherConfig(64, 8, 5), gb.GatherConfig(512, 4, 16, 3), gb.GatherConfig(128, 16, 100)):
        want = gb.gather_rows_reference(w, rows, config.chunk)
        assert want.shape == (-(-37 // config.chunk), 128)
        assert torch.equal(gb.gather_rows(w.to(device), rows.to(device), config).cpu(), want)
    assert all(2048 <= c.block_rows * c.segment <= 16384 for c in gb.configs())
    for bad_w, bad in ((w, gb.GatherConfig(96, 8, 5)), (w.float(), gb.GatherConfig(64, 8, 5)),
                       (w[:, :120], gb.GatherConfig(64, 8, 5)), (w, gb.GatherConfig(64, 6, 5))):
        with pytest.raises(ValueError, match="gather_rows needs"):
            gb.gather_rows(bad_w, rows, bad)
    run = subprocess.run([sys.executable, "-m", "benchmarks.gather_bandwidth"], capture_output=True, text=True)
    if DEVICE == "cpu":
        assert run.returncode == 1 and run.stderr.strip() == "error: gather_bandwidth needs a CUDA GPU"


def test_benchmarks_time_the_scales_decode_reads(monkeypatch):
    """as_decode_reads: int4 scales and zeros as packed words (given as both) unless
    TEAL_INT4_BF16_SCALES=0, other formats untouched; the bytes a call needs count the words once."""
    from linear import INT4_BF16_SCALES_ENV
    from teal_kernels.reference import pack_scales_zeros

    int4, bf16 = timing.make_weight("int4-g32", 64, 32, "cpu", seed=0), timing.make_weight("bf16", 64, 32, "cpu", 0)
    monkeypatch.setenv(INT4_BF16_SCALES_ENV, "0")
    assert timing.as_decode_reads(int4) is int4
    monkeypatch.delenv(INT4_BF16_SCALES_ENV, raising=False)
    w, scales, zeros, group = timing.as_decode_reads(int4)
    assert w is int4[0] and group == 32 and scales is zeros and torch.equal(scales, pack_scales_zeros(*int4[1:3]))
    assert timing.as_decode_reads(bf16) is bf16
    x = torch.randn(1, 64).to(torch.bfloat16)
    thresholds = torch.zeros(1)
    packed = timing.Problem(x, w, thresholds, [32], scales, zeros, group)
    plain = timing.Problem(x, int4[0], thresholds, [32], int4[1], int4[2], group)
    assert timing.weight_bytes_needed(plain) - timing.weight_bytes_needed(packed) == scales.numel() * 4
