"""benchmarks/tune_step.py without a GPU: the shapes it tunes, its shortlist, how it switches the
op's config and which config it keeps. The step timing itself (CUDA graphs) needs the H200."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from fixtures import DEVICE, tiny_model

from benchmarks import timing, tune_kernels, tune_step
from decode import install_fused_decode
from teal_kernels import triton_gemv
from teal_kernels.reference import FMT_FLOAT
from teal_kernels.triton_gemv import KernelConfig, config_key, sparse_gemv_triton


def test_decode_shapes_are_the_projections_of_a_layer():
    model = install_fused_decode(tiny_model())
    cfg = model.config
    kv = cfg.n_local_heads * cfg.head_dim
    assert tune_step.decode_shapes(model) == [
        ("qkv", cfg.dim, [cfg.n_head * cfg.head_dim, kv, kv]),
        ("o", cfg.n_head * cfg.head_dim, [cfg.dim]),
        ("gate_up", cfg.dim, [cfg.intermediate_size] * 2),
        ("down", cfg.intermediate_size, [cfg.dim]),
    ]
    assert {role for role, _, _ in tune_step.decode_shapes(model)} == set(timing.DECODE_FUSIONS) - {"lm_head"}


def test_table_format_names_the_projections_format():
    assert [tune_step.table_format(w) for w in ("bf16", "int8+lm_head", "int4-g64", "int4-g128+lm_head")] == \
        ["bf16", "int8", "int4-g64", "int4-g128"]


def test_use_config_switches_what_the_op_launches():
    """The op looks its config up per launch: after use_config a call without a config takes the new
    one (and None brings the heuristic back), and the product is still right."""
    k, splits = 64, [32, 32]
    key = config_key(triton_gemv.gpu_name(torch.device(DEVICE)), "bf16", 1, k, sum(splits))
    planned = lambda: triton_gemv._planned_config(triton_gemv.gpu_name(torch.device(DEVICE)), "bf16", FMT_FLOAT, 0,
                                                  1, k, tuple(splits), False)
    heuristic = planned()
    chosen = KernelConfig(block_n=16, block_k=32, sub_k=16, design="dot")
    assert key not in triton_gemv._tuned_table()  # nothing stored for this device: the test leaves nothing
    try:
        tune_step.use_config(key, chosen)
        assert planned() == triton_gemv._fit_config(chosen, FMT_FLOAT, 0, 1, k, splits) != heuristic
        x = torch.randn(1, k, dtype=torch.bfloat16, device=DEVICE)
        w = torch.randn(k, sum(splits), dtype=torch.bfloat16, device=DEVICE)
        thresholds = torch.tensor([0.5, 0.0], device=DEVICE)
        ref = torch.cat([torch.where(x.double().abs() > t, x.double(), 0.0) @ w.double()[:, s:s + 32]
                         for t, s in zip(thresholds.tolist(), (0, 32))], dim=1)
        out = sparse_gemv_triton(x, w, thresholds, splits).double()
        assert torch.allclose(out, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())
    finally:
        tune_step.use_config(key, None)
    assert planned() == heuristic and key not in triton_gemv._tuned_table()


def test_shortlist_keeps_the_fastest_alone_and_the_stored_config(monkeypatch):
    """Each config is checked against the reference as the decode step calls the shape (here q|k|v
    with the norm fused), timed alone, and the `top` fastest kept with the stored one."""
    make_x, make_weight = timing.make_x, timing.make_weight
    monkeypatch.setattr(tune_kernels, "make_x", lambda m, k, dtype, device, seed: make_x(m, k, dtype, DEVICE, seed))
    monkeypatch.setattr(tune_kernels, "make_weight", lambda fmt, k, n, device, seed: make_weight(fmt, k, n, DEVICE, seed))
    monkeypatch.setattr(tune_kernels, "copies_for", lambda nbytes: 1)
    grid = [KernelConfig(block_n=32, block_k=32, sub_k=8), KernelConfig(block_n=16, block_k=64, sub_k=16, design="dot"),
            KernelConfig(block_n=16, block_k=32, sub_k=16)]
    times = dict(zip(grid, (3.0, 1.0, 2.0)))
    monkeypatch.setattr(tune_step, "candidates", lambda *args: grid)
    fusions_seen = []

    def time_alone(config, problems):
        fusions_seen.append(problems[0].fusion)
        return times[config]
    monkeypatch.setattr(tune_step, "time_config", time_alone)
    kept = tune_step.shortlist("int8", "qkv", 64, [32, 16, 16], 0.5, grid[0], 1, None, 0)
    assert kept == {grid[1]: 1.0, grid[0]: 3.0}  # the fastest, then the stored one
    assert all("norm_weight" in f for f in fusions_seen) and len(fusions_seen) == 3
    # `accept` narrows the grid first (o computing its own attention: what the prologue takes)
    kept = tune_step.shortlist("int8", "qkv", 64, [32, 16, 16], 0.5, None, 1, None, 0, lambda c: c.design == "rows")
    assert kept == {grid[2]: 2.0}


def test_o_is_shortlisted_from_what_its_attention_prologue_takes(monkeypatch):
    """With TEAL_ATTENTION_O=1 the step is compiled with o computing its own attention, so o's
    shortlist holds only configs whose K blocks are whole query heads of one KV group; without the
    switch, or for int4 (which never takes the prologue), there is no such filter."""
    from linear import ATTENTION_O_ENV
    monkeypatch.setenv(ATTENTION_O_ENV, "1")
    model = install_fused_decode(tiny_model())
    cfg = model.config
    group_rows = cfg.n_head // cfg.n_local_heads * cfg.head_dim
    accept = tune_step.attention_configs(model, "bf16")
    assert accept(KernelConfig(block_n=16, block_k=group_rows, sub_k=8))
    assert not accept(KernelConfig(block_n=16, block_k=2 * group_rows, sub_k=8))  # two KV groups a block
    assert not accept(KernelConfig(block_n=16, block_k=group_rows, sub_k=16, design="dot"))
    assert tune_step.attention_configs(model, "int4-g32") is None
    monkeypatch.setenv(ATTENTION_O_ENV, "0")
    assert tune_step.attention_configs(install_fused_decode(tiny_model()), "bf16") is None


def test_pick_keeps_the_stored_config_unless_a_candidate_beats_it():
    stored, a, b = (KernelConfig(block_k=bk) for bk in (256, 512, 1024))
    step_us = {stored: {0.0: 3000.0, 0.5: 2500.0}, a: {0.0: 2995.0, 0.5: 2498.0}, b: {0.0: 3100.0, 0.5: 2300.0}}
    assert tune_step.pick(step_us, stored, 0.003) == b  # 5400 against 5500: 1.8% better
    assert tune_step.pick(step_us, stored, 0.02) == stored
    assert tune_step.pick({stored: step_us[stored], a: step_us[a]}, stored, 0.003) == stored  # 0.13%: noise
    assert tune_step.pick({a: step_us[a], b: step_us[b]}, None, 0.5) == b  # nothing stored: the fastest


def test_without_a_gpu_it_says_so():
    run = subprocess.run([sys.executable, "-m", "benchmarks.tune_step", "--dry_run"], capture_output=True, text=True)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1] == "error: tune_step.py needs a CUDA GPU"


A_CONFIG, B_CONFIG = KernelConfig(block_n=32, block_k=32, sub_k=8), KernelConfig(block_n=16, block_k=64, sub_k=16)
LEVELS = [0.4, 0.5]


def tiny_tune(monkeypatch, tmp_path, end_to_end=None, levels=tuple(LEVELS), shapes=("qkv", "gate_up", "down")):
    """tune() on a tiny bf16 model, its Triton kernels in the interpreter: a stand-in for the CUDA
    graphs runs the decode step once per "capture" (an interpreted step: seconds each on a 2-core
    CPU) and records the configs the op launched with; the step's time is a cost per launched
    config. Config A is faster alone everywhere, config B in the step for gate|up only. Returns
    (report, args, the model's gate|up table key)."""
    from generate import Sampling, decode_one_token, self_calibrated_thresholds
    from teal_kernels.ops import CPU_KERNELS_ENV
    monkeypatch.setenv(CPU_KERNELS_ENV, "interpreter")
    make_x, make_weight = timing.make_x, timing.make_weight
    monkeypatch.setattr(tune_kernels, "make_x", lambda m, k, dtype, device, seed: make_x(m, k, dtype, DEVICE, seed))
    monkeypatch.setattr(tune_kernels, "make_weight", lambda fmt, k, n, device, seed: make_weight(fmt, k, n, DEVICE, seed))
    monkeypatch.setattr(tune_kernels, "copies_for", lambda nbytes: 1)
    a, b = A_CONFIG, B_CONFIG
    monkeypatch.setattr(tune_step, "candidates", lambda *args: [a, b])
    monkeypatch.setattr(tune_step, "time_config", lambda config, problems: 1.0 if config == a else 2.0)
    launched = set()
    planned = triton_gemv._planned_config

    def recording(*args):
        config = planned(*args)
        launched.add((args[5], sum(args[6]), config))  # (K, N, config)
        return config
    recording.cache_clear = planned.cache_clear
    monkeypatch.setattr(triton_gemv, "_planned_config", recording)

    model = tiny_model(n_layer=1, block_size=512).to(torch.bfloat16)
    thresholds = {level: self_calibrated_thresholds(model, level, 512) for level in levels}
    install_fused_decode(model)
    cfg = model.config
    gate_up = (cfg.dim, 2 * cfg.intermediate_size)

    def cost(launch):
        k, n, config = launch
        return 10.0 if config == a else 5.0 if (k, n) == gate_up else 20.0

    class RecordedSteps:
        def __init__(self, run_step):
            self.run_step = run_step

        def capture(self):
            launched.clear()
            self.run_step()
            return frozenset(launched)

        def median_us(self, graphs):
            return {name: sum(map(cost, launches)) for name, launches in graphs.items()}

    model.setup_caches(1, 16)
    token, pos = torch.tensor([[5]]), torch.tensor([8])
    args = argparse.Namespace(shapes=list(shapes), jobs=0, top=2, kinds=None, min_block_k=0,
                              calib_tokens=512, min_gain=0.003, dry_run=False)
    with torch.no_grad():
        model(torch.randint(cfg.vocab_size, (1, 8)), torch.arange(8))
        report = tune_step.tune(model, "bf16", list(levels), thresholds,
                                RecordedSteps(lambda: decode_one_token(model, token, pos, Sampling())), args,
                                table_path=tmp_path / "tuned.json", end_to_end=end_to_end)
    for role in report["shapes"]:  # the process's table is the stored one again
        tune_step.use_config(report["shapes"][role]["key"], None)
    return report, args, report["shapes"]["gate_up"]["key"]


def test_tune_picks_by_the_step_and_writes_the_table(monkeypatch, tmp_path):
    """B must win gate|up (so use_config reached the op inside the step), A the other shapes asked
    for (o is not); the table written holds the winners, the check the summed costs."""
    keys_before = set(triton_gemv._tuned_table())
    report, args, _ = tiny_tune(monkeypatch, tmp_path)
    a, b = A_CONFIG, B_CONFIG
    winners = {role: KernelConfig.from_dict(s["winner"]) for role, s in report["shapes"].items()}
    assert winners == {"qkv": a, "gate_up": b, "down": a}  # o was not asked for
    written = json.loads((tmp_path / "tuned.json").read_text())
    for role, shape in report["shapes"].items():
        assert KernelConfig.from_dict(written[shape["key"]]["config"]) == winners[role]
        assert shape["key"].startswith("cpu|bf16|M1|")
    assert not any(key.startswith("cpu|") for key in set(written) - {s["key"] for s in report["shapes"].values()})
    # nothing stored for "cpu": the stored table is the heuristic's configs (20 each, 5 at gate|up); o and
    # the packed CPU head launch their heuristic configs in both (20 each)
    assert report["check"] == {str(lv): {"stored": 20 + 20 + 5 + 20 + 20.0, "step-tuned": 10 + 20 + 5 + 10 + 20.0}
                               for lv in LEVELS}
    assert report["adopted"] and report["end_to_end_tok_s"] == {}
    args.model, args.weights, args.out = "tiny", "bf16", tmp_path / "report"
    tune_step.write_report(args, LEVELS, report, "cpu")
    markdown = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["shapes"] == report["shapes"]
    assert markdown.count("| winner |") == 3 and "| 0.5 | 85.0 (11764.7) | 65.0 (15384.6) |" in markdown
    assert markdown.rstrip().endswith("Table written.")
    assert set(triton_gemv._tuned_table()) == keys_before


@pytest.mark.parametrize("step_tuned_tok_s", [90.0, 110.0])
def test_the_end_to_end_check_decides_whether_the_table_is_written(monkeypatch, tmp_path, step_tuned_tok_s):
    """With an end-to-end measurement (bench_decode's loop on the GPU; here a stand-in that reads
    which table is in force from gate|up's entry), both tables are timed in turns at every level, and
    the winners are written only if that measurement agrees. (gate|up alone at one level: the test
    above covers the rest, and each interpreted step costs seconds.)"""
    in_force = []

    def measured():
        tuned = any(k.startswith("cpu|bf16|M1|") and v["config"] == B_CONFIG.to_dict()  # gate|up's winner in force
                    for k, v in triton_gemv._tuned_table().items())
        in_force.append("step-tuned" if tuned else "stored")
        return step_tuned_tok_s if tuned else 100.0

    report, args, _ = tiny_tune(monkeypatch, tmp_path, end_to_end=measured, levels=(0.5,), shapes=("gate_up",))
    assert in_force == ["stored", "step-tuned"] * 2  # in turns, twice
    assert report["end_to_end_tok_s"] == {"0.5": {"stored": 100.0, "step-tuned": step_tuned_tok_s}}
    assert report["adopted"] == (step_tuned_tok_s > 100.0)
    assert (tmp_path / "tuned.json").exists() == report["adopted"]
    args.model, args.weights, args.out = "tiny", "bf16", tmp_path / "report"
    tune_step.write_report(args, [0.5], report, "cpu")
    markdown = (tmp_path / "report.md").read_text()
    assert f"| 0.5 | 100.0 | {step_tuned_tok_s} |" in markdown
    assert markdown.rstrip().endswith("Table written." if report["adopted"] else
                                      "Table not written: the end-to-end check found no gain.")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_step_graphs_replay_the_compiled_step():
    """StepGraphs on a tiny int8 model (every projection in our kernel): a captured graph of the
    compiled fused step replays the eager step's logits, so does one captured after gate|up's config
    was changed (another kernel, the same product), and both are timed."""
    from quantize import quantize_model
    model = tiny_model(3, n_head=8, n_local_heads=2, dim=512, intermediate_size=1536).to("cuda", torch.bfloat16)
    quantize_model(model, "int8", 0)
    install_fused_decode(model)
    model.setup_caches(1, 32)
    token, pos = torch.tensor([[7]], device="cuda"), torch.tensor([20], device="cuda")
    torch._dynamo.reset()
    step = torch.compile(lambda: model(token, pos), fullgraph=True)
    key = config_key(triton_gemv.gpu_name(torch.device("cuda")), "int8", 1, 512, 2 * 1536)
    assert key not in triton_gemv._tuned_table()  # nothing stored for this shape: the test leaves nothing
    with torch.no_grad():
        model(torch.randint(256, (1, 20), device="cuda"), torch.arange(20, device="cuda"))
        want = model(token, pos).float()  # eager; rewrites position 20 as every replay does
        out = torch.empty_like(want)
        graphs = tune_step.StepGraphs(lambda: out.copy_(step()), rounds=3, steps=5)
        captured = {"stored": graphs.capture()}
        try:
            tune_step.use_config(key, KernelConfig(block_n=64, block_k=64, sub_k=16))
            captured["other"] = graphs.capture()
        finally:
            tune_step.use_config(key, None)
        times = graphs.median_us(captured)
        for graph in captured.values():
            out.zero_()
            graph.replay()
            torch.testing.assert_close(out, want, rtol=0.02, atol=0.02 * want.abs().max().item())
    assert set(times) == {"stored", "other"} and all(t > 0 for t in times.values())
