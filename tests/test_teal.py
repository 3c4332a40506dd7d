"""TEAL: module swap, exactness at 0, realized vs target sparsity, greedy, thresholds files, CLIs.

Most tests use a tiny random Transformer; the real SmolLM2 checkpoint only for the overshoot
correction, where a random model's activations would not show it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import ROOT, SHARED_DATA, SMOLLM2, TINY, tiny_checkpoint, tiny_model

from checkpoint import load_model
from linear import PROJECTIONS, pack_model, packed_projections, segments
from model import Transformer
from teal import densify, load_thresholds, realized_sparsity, sparsify
from teal.calibration import (BlockProbe, calibrate, greedy_levels, input_histograms, sequential_thresholds,
                              stream, text_windows, thresholds_at)
from teal.sparsify import SparsityMeter, every_token_sparse, segment_weights, thresholds_from_vector
from teal.thresholds import save_thresholds

REAL = SMOLLM2
CALIB = SHARED_DATA / "wikitext2-calib.txt"
GRID = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)


def tiny_windows(n: int = 8, length: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (n, length), generator=g)


def tiny_allocations(model: Transformer, windows: torch.Tensor) -> dict:
    return calibrate(model, windows, batch=4, grid=GRID, methods=["uniform", "greedy"],
                     correction_windows=len(windows), greedy_windows=windows[:2], greedy_step=0.05,
                     greedy_exact=False, dense_grid=torch.arange(0, 0.96, 0.05, dtype=torch.float64))


@pytest.fixture(scope="module")
def tiny_calibrated(tmp_path_factory) -> tuple[Transformer, torch.Tensor, Path]:
    model, windows = tiny_model(), tiny_windows()
    path = tmp_path_factory.mktemp("thr") / "tiny.safetensors"
    save_thresholds(path, model, tiny_allocations(model, windows), {"text": "random tokens"})
    return model, windows, path


def test_every_projection_input_has_a_threshold():
    model = pack_model(tiny_model())
    # Every nn.Linear inside the decoder blocks was swapped; lm_head was not.
    assert not [n for n, m in model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    assert type(model.output) is torch.nn.Linear
    mods = packed_projections(model)
    assert list(mods) == [f"layers.{i}.{p}" for i in range(TINY["n_layer"]) for p in
                          ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")]
    assert sum(len(m.split_sizes) for m in mods.values()) == len(segments(model)) == 7 * TINY["n_layer"]
    assert [s.label for s in segments(model)][:7] == list(PROJECTIONS) == ["q", "k", "v", "o", "gate", "up", "down"]
    qkv = mods["layers.0.attention.wqkv"]
    hd = TINY["dim"] // TINY["n_head"]
    assert qkv.split_sizes == [TINY["n_head"] * hd, TINY["n_local_heads"] * hd, TINY["n_local_heads"] * hd]


def test_sparsity_zero_is_exactly_dense(tiny_calibrated):
    model, windows, path = tiny_calibrated
    pos = torch.arange(windows.shape[1])
    model.setup_caches(2, windows.shape[1])
    with torch.no_grad():
        want = densify(model)(windows[:2], pos)
        sparsify(model, load_thresholds(path, model, 0.0), sparse_prefill=True)
        got = model(windows[:2], pos)
        with every_token_sparse(model):  # the masked path itself, at thresholds of zeros
            masked = model(windows[:2], pos)
        densify(model)
    assert torch.equal(got, want)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)


def test_masked_projections_match_float64(tiny_calibrated):
    """Every projection of layer 1, on its real inputs, against a float64 masked product."""
    model, windows, path = tiny_calibrated
    linears = {name: m.weight.detach().double()
               for name, m in tiny_model().named_modules() if name.startswith("layers.1.") and
               isinstance(m, torch.nn.Linear)}
    sparsify(model, load_thresholds(path, model, 0.5), sparse_prefill=True)
    seen = {}
    mods = {n: m for n, m in packed_projections(model).items() if n.startswith("layers.1.")}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
               for n, m in mods.items()]
    stream(model, windows[:2], 2, "test")
    for h in handles:
        h.remove()
    densify(model)
    for name, m in mods.items():
        x, out = seen[name]
        x = x.double().reshape(-1, m.in_features)
        w = linears[name]
        parts, start = [], 0
        for t, n in zip(m.thresholds.tolist(), m.split_sizes):
            assert t > 0
            parts.append(torch.where(x.abs() > t, x, 0.0) @ w[start:start + n].T)
            start += n
        torch.testing.assert_close(out.double().reshape(x.shape[0], -1), torch.cat(parts, 1),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_realized_matches_target_on_calibration_windows(tiny_calibrated, allocation):
    model, windows, path = tiny_calibrated
    for s in (0.25, 0.5, 0.75):
        sparsify(model, load_thresholds(path, model, s, allocation), sparse_prefill=True)
        with SparsityMeter(model) as meter:
            stream(model, windows, 4, "test")
        densify(model)
        assert abs(meter.result()["parameter_weighted"] - s) < 0.01, (allocation, s, meter.result())


def test_realized_sparsity_api_restores_model(tiny_calibrated):
    model, windows, path = tiny_calibrated
    sparsify(model, load_thresholds(path, model, 0.5), sparse_prefill=False)
    out = realized_sparsity(model, windows[:1])
    assert set(out) >= {"parameter_weighted", "per_projection"}
    assert set(out["per_projection"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert 0.4 < out["parameter_weighted"] < 0.6
    for m in packed_projections(model).values():
        assert m.sparse and not m.sparse_prefill and not m._forward_pre_hooks
    densify(model)
    assert not any(m.sparse for m in packed_projections(model).values())


def test_greedy_path_is_monotone_and_beats_uniform():
    model, windows = tiny_model(seed=3), tiny_windows(n=2, seed=4)
    pack_model(model)
    dense = input_histograms(model, windows, 2)
    levels = greedy_levels(model, windows, dense, GRID, step=0.05)  # [grid, segments]
    assert torch.all(levels[1:] >= levels[:-1] - 1e-6)
    w = segment_weights(model)
    torch.testing.assert_close(levels.double() @ w / w.sum(), GRID, atol=1e-6, rtol=0)
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
               for layer in model.layers]
    stream(model, windows, 2, "test")
    for h in handles:
        h.remove()
    with every_token_sparse(model), torch.no_grad():
        for g, s in enumerate(GRID.tolist()[1:], start=1):
            greedy_thr = thresholds_at(model, dense, levels[g].float()).view(TINY["n_layer"], 7)
            uniform_thr = thresholds_at(model, dense, torch.full((levels.shape[1],), s)).view(TINY["n_layer"], 7)
            for i in range(TINY["n_layer"]):
                probe = BlockProbe(model, i, inputs[i])
                errors = []
                for thr in (greedy_thr[i], uniform_thr[i]):
                    probe.set(thr)
                    errors.append(probe.error(probe.mlp_half(probe.attention_half())))
                assert errors[0] <= errors[1] * 1.001, (s, i, errors)
    densify(model)


def test_thresholds_file_round_trip_and_refusals(tiny_calibrated, tmp_path):
    model, windows, path = tiny_calibrated
    from teal.thresholds import read_thresholds
    meta, tensors = read_thresholds(path)
    assert meta["model_fingerprint"] == model.config.fingerprint()
    assert set(meta["allocations"]) == {"uniform", "greedy", "uniform-dense"}
    for name in ("uniform", "greedy"):
        thr = tensors[f"{name}.thresholds"]
        assert load_thresholds(path, model, 0.5, name) == thresholds_from_vector(model, thr[2])
        mid = load_thresholds(path, model, 0.375, name)
        assert mid == thresholds_from_vector(model, (thr[1].double() + thr[2].double()).div(2).float())
        sparsity = tensors[f"{name}.sparsity"]
        assert torch.all(sparsity[1:] >= sparsity[:-1] - 1e-6)  # every segment's target only grows
    other = tiny_model(n_layer=3)
    for bad, match in [((other, 0.5, "uniform"), "another model"), ((model, 1.0, "uniform"), r"\[0, 1\)"),
                       ((model, -0.1, "uniform"), r"\[0, 1\)"), ((model, 0.5, "nope"), "no 'nope'"),
                       ((model, 0.8, "greedy"), "above the highest")]:
        with pytest.raises(ValueError, match=match):
            load_thresholds(path, *bad)
    with pytest.raises(ValueError, match="not found"):
        load_thresholds(tmp_path / "missing.safetensors", model, 0.5)


@pytest.mark.skipif(not (REAL / "model.safetensors").exists() or not CALIB.exists(),
                    reason="needs the SmolLM2-135M checkpoint and the calibration text")
def test_real_model_correction_removes_overshoot():
    """Dense-model thresholds overshoot downstream; the sequential correction lands on target."""
    from tokenizer import load_tokenizer
    model = pack_model(load_model(REAL, dtype=torch.float32))
    ids = load_tokenizer(REAL).encode(CALIB.read_text()[:20000])
    windows = text_windows(ids, 2, 256)
    dense = input_histograms(model, windows, 2)
    level = torch.full((len(segments(model)),), 0.5)
    realized = {}
    for name, thr in (("dense", thresholds_at(model, dense, level)),
                      ("corrected", sequential_thresholds(model, windows, level))):
        sparsify(model, thresholds_from_vector(model, thr), sparse_prefill=True)
        with SparsityMeter(model) as meter:
            stream(model, windows, 2, "test")
        realized[name] = meter.result()["parameter_weighted"]
    densify(model)
    assert realized["dense"] > 0.51, realized
    assert abs(realized["corrected"] - 0.5) < 0.01, realized


# --- command lines -----------------------------------------------------------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and match in lines[0], r.stderr


def test_cli_calibrate_then_perplexity_and_bad_inputs(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    other = tiny_checkpoint(tmp_path / "other", n_layer=3)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)  # 1350 tokens
    thr = tmp_path / "thr.safetensors"
    small = ["--tokens", "512", "--window_len", "64", "--greedy_tokens", "64", "--correction_tokens", "128",
             "--max_sparsity", "0.5", "--level_step", "0.25", "--device", "cpu"]
    r = cli("calibrate.py", "--checkpoint_path", str(ckpt), "--text", str(text), "--output", str(thr), *small)
    assert r.returncode == 0 and thr.exists(), r.stderr
    out = tmp_path / "ppl.json"
    r = cli("scripts/perplexity.py", "--checkpoint_path", str(ckpt), "--text", str(text), "--thresholds",
            str(thr), "--sparsity", "0", "0.5", "--windows", "4", "--window_len", "64", "--output", str(out))
    assert r.returncode == 0 and out.exists(), r.stderr

    bad = tmp_path / "bad.safetensors"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    calib_cases = [(["--text", str(text), "--max_sparsity", "1.0"], "outside [0, 1)"),
                   (["--text", str(empty)], "empty"),
                   (["--text", str(short)], "fewer than"),
                   (["--text", str(tmp_path / "missing.txt")], "not found")]
    for extra, match in calib_cases:
        r = cli("calibrate.py", "--checkpoint_path", str(ckpt), "--output", str(bad), *small, *extra)
        assert_one_line_error(r, match)
        assert not bad.exists()
    ppl_cases = [(["--checkpoint_path", str(ckpt), "--sparsity", "1.5"], "outside [0, 1)"),
                 (["--checkpoint_path", str(other), "--sparsity", "0.5"], "another model")]
    for extra, match in ppl_cases:
        r = cli("scripts/perplexity.py", "--text", str(text), "--thresholds", str(thr), "--windows", "4",
                "--window_len", "64", "--output", str(bad), *extra)
        assert_one_line_error(r, match)
        assert not bad.exists()


def test_progress_bar_never_moves_back_and_says_the_current_estimate(monkeypatch):
    """A second pass 10x slower per token-layer than the first raises the time estimate: the
    bar stalls instead of going back, and the time left it prints is the new estimate."""
    from teal import calibration

    clock = [0.0]
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: clock[0])
    shown, lefts, texts = [], [], []
    with calibration.Progress({"fast": 10, "slow": 10}, leave=False) as progress:
        for kind, seconds_per_unit in (("fast", 1.0), ("slow", 10.0)):
            with progress.phase(kind, kind, 10):
                for _ in range(10):
                    clock[0] += seconds_per_unit
                    progress.tick(1)
                    shown.append(progress.bar.n)
                    lefts.append(progress.remaining)
                    texts.append(str(progress.bar))
        assert all(b >= a for a, b in zip(shown, shown[1:]))  # monotone
        assert shown[9] == pytest.approx(0.5)  # the slow kind was assumed as fast as the average
        assert lefts[11] == pytest.approx(8 * 10.0)  # 2 of 10 slow units done: 8 left at 10 s each
        assert shown[11] == pytest.approx(0.5)  # 30 s of an estimated 110: the bar waits at 50%
        assert "01:20 left, slow" in texts[11]
    assert progress.bar.n == progress.bar.total  # complete at the end
