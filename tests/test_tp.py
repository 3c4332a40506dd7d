"""Tensor parallelism (tp.py) on the CPU: gloo, 2 and 4 processes, against the unsharded model.

One spawn per world size runs every scenario (dense, TEAL-sparse, int8, int4, the fused decode
path, thresholds set before or after sharding, compiled decode, bf16 through the C++ CPU kernel)
and saves what each rank got; the parent runs the same scenarios in one process and compares:
logits (float32: tight tolerance), 32 greedy tokens, realized sparsity. Plus the layouts that
cannot be split, refused in one line, and `torchrun generate.py` printing the one-process text.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fixtures import ROOT, tiny_checkpoint, tiny_model
from test_bad_inputs import assert_one_error, call

import tp
from decode import install_fused_decode
from linear import segments
from model import ModelArgs
from quantize import quantize_model
from teal import sparsify
from teal.calibration import input_histograms, thresholds_at
from teal.sparsify import thresholds_from_vector

WORLD_SIZES = (2, 4)
# 8 query heads on 4 KV heads, so that 4 ranks get whole heads; K of o and down per rank (32 / 64 at
# 4 ranks) fits int4 group size 32.
SHAPE = dict(dim=128, n_head=8, n_local_heads=4, intermediate_size=256)
SEED, STEPS = 11, 32  # a seed whose greedy text does not repeat one token
PROMPT = [[5, 17, 99, 3, 250, 42]]


class Scenario(NamedTuple):
    weights: str  # fp, int8 or int4 (group size 32)
    teal: str = "before"  # TEAL thresholds set "before" or "after" sharding, or "no"
    path: str = "reference"  # decode path: model.py's, or decode.py's "fused" one
    dtype: torch.dtype = torch.float32
    compiled: bool = False  # the decode step under torch.compile(fullgraph=True)
    # each all-reduce of 4 processes on 2 cores costs about 10 ms: the variants run on 2 only
    worlds: tuple[int, ...] = WORLD_SIZES


SCENARIOS = {
    "dense": Scenario("fp", "no"),
    "sparse": Scenario("fp"),
    "int8 sparse": Scenario("int8"),
    "int4-g32 sparse": Scenario("int4"),
    "fused int4-g32 sparse": Scenario("int4", path="fused"),
    "int8": Scenario("int8", "no", worlds=(2,)),
    "sparse, thresholds set after sharding": Scenario("fp", "after", worlds=(2,)),
    "fused sparse": Scenario("fp", path="fused", worlds=(2,)),
    "fused sparse, compiled": Scenario("fp", path="fused", compiled=True, worlds=(2,)),
    # the C++ CPU kernel (bf16 only); each rank rounds its partial sum to bf16 before the all-reduce
    "bf16 fused int4-g32 sparse": Scenario("int4", path="fused", dtype=torch.bfloat16, worlds=(2,)),
}


def calibrated_thresholds() -> dict[str, list[float]]:
    """50% uniform thresholds from the unsharded model's own activations (calibration needs the
    whole model)."""
    model = tiny_model(SEED, **SHAPE)
    windows = torch.randint(256, (4, 32), generator=torch.Generator().manual_seed(0))
    levels = torch.full((len(segments(model)),), 0.5)
    return thresholds_from_vector(model, thresholds_at(model, input_histograms(model, windows, 4), levels))


def build(s: Scenario, thresholds: dict, shard: bool) -> torch.nn.Module:
    """The scenario's model, sharded over the default process group if `shard`."""
    model = tiny_model(SEED, **SHAPE).to(s.dtype)
    if s.weights != "fp":
        quantize_model(model, s.weights, 32)
    if s.teal == "before":
        sparsify(model, thresholds)
    if shard:
        tp.shard_model(model)
    if s.teal == "after":
        sparsify(model, thresholds)
    return install_fused_decode(model) if s.path == "fused" else model


def forward(model: torch.nn.Module, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model(token, pos)


@torch.no_grad()
def greedy(model: torch.nn.Module, step=forward, steps: int = STEPS) -> dict:
    """Prefill and `steps` greedy decode steps: tokens, every logit, realized sparsity."""
    prompt = torch.tensor(PROMPT)
    model.setup_caches(1, prompt.shape[1] + steps)
    logits = [model(prompt, torch.arange(prompt.shape[1]))[0]]
    tokens = [int(logits[-1][-1].argmax())]
    for i in range(steps - 1):
        logits.append(step(model, torch.tensor([[tokens[-1]]]), torch.tensor([prompt.shape[1] + i]))[0])
        tokens.append(int(logits[-1][-1].argmax()))
    kv_heads = model.layers[0].attention.kv_cache.k_cache.shape[1]
    realized = tp.realized_sparsity(model, torch.tensor([PROMPT[0] + tokens]))["parameter_weighted"]
    return {"tokens": tokens, "logits": torch.cat(logits).float(), "realized": realized, "kv_heads": kv_heads}


def run_scenarios(world: int, thresholds: dict, shard: bool) -> dict[str, dict]:
    out = {}
    for name, s in SCENARIOS.items():
        if world in s.worlds:
            # aot_eager: traces what Inductor would (the functional all-reduce) in a fraction of the time
            step = torch.compile(forward, backend="aot_eager", fullgraph=True) if s.compiled else forward
            out[name] = greedy(build(s, thresholds, shard), step)
    return out


def worker(rank: int, world: int, store: str, out_dir: str, thresholds: dict) -> None:
    torch.set_num_threads(1)  # 2 to 4 processes on 2 cores: more threads only wait for each other
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = run_scenarios(world, thresholds, shard=True)
        # a shard's K not a multiple of the int4 group size: refused before anything is sliced
        model = tiny_model(SEED, dim=64, n_head=8, n_local_heads=4, intermediate_size=128)
        quantize_model(model, "int4", 64)
        try:
            tp.shard_model(model)
            results["int4 refusal"] = None
        except ValueError as e:
            results["int4 refusal"] = str(e)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def thresholds() -> dict:
    return calibrated_thresholds()


@pytest.fixture(scope="module")
def one_device(thresholds) -> dict[str, dict]:
    return run_scenarios(2, thresholds, shard=False)


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"{n} processes")
def sharded(request, thresholds, tmp_path_factory) -> tuple[int, list[dict]]:
    """(world size, every rank's results)."""
    world, tmp = request.param, tmp_path_factory.mktemp(f"tp{request.param}")
    mp.spawn(worker, args=(world, str(tmp / "store"), str(tmp), thresholds), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


def scenario_names(world: int) -> list[str]:
    return [name for name, s in SCENARIOS.items() if world in s.worlds]


def test_logits_tokens_and_sparsity_match_one_device(sharded, one_device) -> None:
    world, ranks = sharded
    for name in scenario_names(world):
        got, want = ranks[0][name], one_device[name]
        # float32: the order of the sums alone; bf16: each rank's partial sums are rounded to bf16,
        # and an input that moves across its threshold by that rounding flips
        bf16 = SCENARIOS[name].dtype == torch.bfloat16
        tol = dict(rtol=0, atol=0.05) if bf16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["logits"], want["logits"], **tol, msg=name)
        assert got["tokens"] == want["tokens"], name
        assert got["realized"] == pytest.approx(want["realized"], abs=1e-3 if bf16 else 1e-12), name
        if SCENARIOS[name].teal != "no":
            assert 0.4 < got["realized"] < 0.6, (name, got["realized"])  # the thresholds really apply


def test_every_rank_has_the_same_tokens_and_its_share_of_kv_heads(sharded) -> None:
    world, ranks = sharded
    for name in scenario_names(world):
        assert all(r[name]["tokens"] == ranks[0][name]["tokens"] for r in ranks), name
        assert all(r[name]["kv_heads"] == SHAPE["n_local_heads"] // world for r in ranks), name


def test_shard_model_refuses_an_int4_group_larger_than_a_shard(sharded) -> None:
    world, ranks = sharded
    k = 64 // world  # o's K per rank
    assert ranks[0]["int4 refusal"] == (f"int4 group size 64 does not divide the {k} input rows per process of "
                                        f"the o projection (K=64 over {world} processes)")


@pytest.mark.parametrize("overrides, world, group, needle", [
    (dict(n_head=6, n_local_heads=6), 4, 0, "query heads (6) and KV heads (6) to be divisible by 4"),
    (dict(n_head=8, n_local_heads=2), 4, 0, "query heads (8) and KV heads (2) to be divisible by 4"),
    (dict(intermediate_size=250), 4, 0, "intermediate size (250) to be divisible by 4"),
    (dict(dim=128, n_head=8, n_local_heads=8), 8, 32, "does not divide the 16 input rows per process of the o"),
    (dict(dim=128, intermediate_size=192), 4, 32, "does not divide the 48 input rows per process of the down"),
])
def test_layouts_that_cannot_be_split_are_refused_in_one_line(overrides, world, group, needle) -> None:
    cfg = ModelArgs(**{**dict(dim=64, n_head=4, n_local_heads=4, intermediate_size=128), **overrides})
    with pytest.raises(ValueError, match="^[^\n]*$") as e:
        tp.check_layout(cfg, world, group)
    assert needle in str(e.value)


def test_generate_refuses_a_bad_layout_before_any_work(tmp_path, monkeypatch) -> None:
    """torchrun with 3 processes for 4 heads: one error line, before loading or joining a group."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", block_size=64)
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = call("generate", ["--checkpoint_path", str(ckpt), "--device", "cpu"])
    assert_one_error(code, err, 1, "needs the query heads (4) and KV heads (2) to be divisible by 3")
    assert not dist.is_initialized()


@pytest.mark.parametrize("nproc", [1, 2])
def test_torchrun_generate_prints_the_single_process_text(tmp_path, nproc) -> None:
    """`torchrun --nproc_per_node N generate.py`: rank 0 alone prints, the text of one process
    (N = 1 still runs the tensor-parallel path: a group of one, shards, all-reduces)."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=SEED, block_size=64, **SHAPE)
    args = ["generate.py", "--checkpoint_path", str(ckpt), "--prompt", "The", "--max_new_tokens", "16",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--decode_path", "fused"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for cmd in ([sys.executable, *args], [*torchrun, *args]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[1].count("[sparsity 0.00, sample 1]") == 1
    text = [out.split("\n-- ")[0] for out in outs]
    assert text[0] == text[1] and len(text[0]) > len("[sparsity 0.00, sample 1]\nThe") + 8
