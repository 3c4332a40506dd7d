"""Tensor parallelism: one model split over the processes `torchrun` starts (torch.distributed).

Each decoder block is split Megatron-style, so that a block costs two all-reduces:
- q|k|v and gate|up are column-parallel: rank r keeps whole heads (n_head / N query heads and
  n_local_heads / N KV heads, so its KV cache holds only those) and a 1/N slice of the
  intermediate dimension. Their input is the full (replicated) activation, thresholded exactly as
  on one device.
- o and down are row-parallel: rank r keeps the input rows of its heads / its slice, so each rank
  thresholds only its slice of the input and computes a partial sum; one all-reduce sums them.
  The fused decode path's residual is added after that all-reduce, once, not once per rank.
Every shard keeps the module's threshold segments (q, k, v; gate, up; o; down) with the calibrated
values of the unsharded model, so a rank drops exactly the entries one device drops: the same
realized sparsity and, up to the order of float sums, the same logits and tokens.

Embeddings, the final norm and lm_head stay replicated: every rank then computes the same logits
and samples the same token with the same seed, with no gather or broadcast per step, and a head
tied to the embedding stays one table. The price is that every rank reads the whole head: on
Llama-3-8B in bf16, 1 GB against 14 GB of decoder projections, so about a third of a rank's bytes
per token at N = 8 (a vocabulary-parallel head would read 1/N of it for one all-gather per step).

Order: quantize first (quantize.py, or a quantized checkpoint), then shard; TEAL thresholds may be
set before or after sharding (teal.sparsify finds the same module names and segments). Calibration
needs the whole model: a rank sees only its slice of the o and down inputs.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from linear import PackedLinear, pack_model, packed_projections
from model import ModelArgs, Transformer
from teal.sparsify import SparsityMeter, every_token_sparse
from teal.sparsify import realized_sparsity as realized_sparsity_one_device


def env_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Started by torchrun (it sets WORLD_SIZE), even with one process: the tensor-parallel code
    path (process group, shards, all-reduces) then runs over a group of one, which is how it is
    checked on a machine with a single GPU."""
    return "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank under torchrun (its RANK); 0 without torchrun."""
    return int(os.environ.get("RANK", "0"))


def check_layout(cfg: ModelArgs, world_size: int, int4_group_size: int = 0) -> None:
    """Refuse, in one line, a model that `world_size` ranks cannot split into equal whole shards."""
    n = world_size
    if cfg.n_head % n or cfg.n_local_heads % n:
        raise ValueError(f"tensor parallelism over {n} processes needs the query heads ({cfg.n_head}) and "
                         f"KV heads ({cfg.n_local_heads}) to be divisible by {n}")
    if cfg.intermediate_size % n:
        raise ValueError(f"tensor parallelism over {n} processes needs the intermediate size "
                         f"({cfg.intermediate_size}) to be divisible by {n}")
    if int4_group_size:
        for name, k in (("o", cfg.n_head * cfg.head_dim), ("down", cfg.intermediate_size)):
            if (k // n) % int4_group_size:
                raise ValueError(f"int4 group size {int4_group_size} does not divide the {k // n} input rows per "
                                 f"process of the {name} projection (K={k} over {n} processes)")
        if (cfg.intermediate_size // n) % 2:
            raise ValueError(f"int4 packs two columns per byte: the gate and up slices of "
                             f"{cfg.intermediate_size // n} columns per process must be even")


def all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum over the group, as a functional collective: torch.compile traces it (CUDA graphs too)."""
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group_name))


class RowParallelLinear(PackedLinear):
    """A row-parallel shard (o, down): this rank's input rows. Its product is a partial sum; one
    all-reduce adds the ranks' parts, and the fused path's residual is added after it (inside each
    rank's kernel epilogue it would be counted N times)."""

    group_name: str = ""

    def takes_attention(self, qkv: Tensor, k_cache: Tensor, n_head: int) -> bool:
        """Never: the ranks' parts are summed before the residual, which teal::attention_o adds."""
        return False

    def takes_norm_stats(self, x: Tensor) -> bool:
        """Never: the next norm's statistics are of the sum over the ranks, after the all-reduce."""
        return False

    def forward(self, x: Tensor, gated: bool = False, residual: Tensor | None = None) -> Tensor:
        out = all_reduce(super().forward(x, gated), self.group_name)
        return out if residual is None else out + residual


def _span(start: int, width: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s slice of `width` columns of a segment that starts at column `start`."""
    return start + rank * width, start + (rank + 1) * width


def _shard(m: PackedLinear, cols: list[tuple[int, int]], rows: tuple[int, int] | None = None,
           cls: type[PackedLinear] = PackedLinear) -> PackedLinear:
    """The part of `m` made of the output column spans `cols` (one per threshold segment) and the
    input rows `rows`, in any weight format, with m's TEAL state (the same thresholds)."""
    k0, k1 = rows or (0, m.in_features)
    widths = [b - a for a, b in cols]
    new = cls(k1 - k0, sum(widths), widths, m.fmt, m.group_size, dtype=m.weight.dtype, device=m.weight.device)
    per_byte = 2 if m.fmt == "int4" else 1  # int4: columns 2j and 2j + 1 share byte j
    new.weight = torch.cat([m.weight[k0:k1, a // per_byte:b // per_byte] for a, b in cols], 1).contiguous()
    if m.fmt == "int8":  # per output column
        new.scales = torch.cat([m.scales[a:b] for a, b in cols])
    elif m.fmt == "int4":  # per group of group_size input rows and output column
        g0, g1 = k0 // m.group_size, k1 // m.group_size
        new.scales = torch.cat([m.scales[g0:g1, a:b] for a, b in cols], 1).contiguous()
        new.zeros = torch.cat([m.zeros[g0:g1, a:b] for a, b in cols], 1).contiguous()
    new.thresholds.copy_(m.thresholds)
    new.sparse, new.sparse_prefill, new.target_sparsity = m.sparse, m.sparse_prefill, m.target_sparsity
    return new


def _row_parallel(m: PackedLinear, rows: tuple[int, int], group_name: str) -> RowParallelLinear:
    new = _shard(m, [(0, m.out_features)], rows, RowParallelLinear)
    new.group_name = group_name
    return new


def int4_group_size(model: nn.Module) -> int:
    """The group size of the model's int4 projections (0: none is int4)."""
    return next((m.group_size for m in packed_projections(model).values() if m.fmt == "int4"), 0)


def shard_model(model: Transformer, group: dist.ProcessGroup | None = None) -> Transformer:
    """Keep this rank's shard of every decoder projection, in place (weights stay where they are:
    shard on the CPU, then move the model to the rank's device). `model.config` stays the
    unsharded one, so thresholds files and module names are those of one device."""
    group = group or dist.group.WORLD
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    if getattr(model, "tp_group", None) is not None:
        raise ValueError("the model is already sharded")
    cfg = model.config
    check_layout(cfg, n, int4_group_size(model))
    pack_model(model)
    d, hq, hkv, hidden = cfg.head_dim, cfg.n_head // n, cfg.n_local_heads // n, cfg.intermediate_size // n
    q, kv = cfg.n_head * d, cfg.n_local_heads * d
    for layer in model.layers:
        att, ff = layer.attention, layer.feed_forward
        att.wqkv = _shard(att.wqkv, [_span(0, hq * d, rank), _span(q, hkv * d, rank), _span(q + kv, hkv * d, rank)])
        att.wo = _row_parallel(att.wo, _span(0, hq * d, rank), group.group_name)
        att.n_head, att.n_kv, att.qkv_sizes = hq, hkv, [hq * d, hkv * d, hkv * d]
        att.kv_cache = None  # a cache of this rank's KV heads is made by the next setup_caches
        ff.w13 = _shard(ff.w13, [_span(0, hidden, rank), _span(cfg.intermediate_size, hidden, rank)])
        ff.w2 = _row_parallel(ff.w2, _span(0, hidden, rank), group.group_name)
        ff.hidden = hidden
    model.max_batch_size = model.max_seq_length = -1
    model.tp_group = group
    return model


def world_size(model: nn.Module) -> int:
    """Over how many processes the model is sharded (1: not sharded)."""
    group = getattr(model, "tp_group", None)
    return 1 if group is None else dist.get_world_size(group)


@torch.no_grad()
def realized_sparsity(model: Transformer, idx: Tensor) -> dict:
    """teal.realized_sparsity, for a sharded model too (every rank calls it: it runs the model):
    skipped and seen inputs are summed over the ranks and weighed by the unsharded shapes, so the
    result is the one device's."""
    group = getattr(model, "tp_group", None)
    if group is None:
        return realized_sparsity_one_device(model, idx)
    seq = idx.shape[1]
    if model.max_seq_length < seq or model.max_batch_size != idx.shape[0]:
        model.setup_caches(idx.shape[0], seq)
    with every_token_sparse(model), SparsityMeter(model) as meter:
        model(idx, torch.arange(seq, device=idx.device))
    for counts in (meter.skipped, meter.seen):
        total = counts.to(idx.device)  # NCCL reduces device tensors only
        dist.all_reduce(total, group=group)
        counts.copy_(total.cpu())
    with torch.device("meta"):  # the segments' weight counts of one device
        meter.model = Transformer(model.config)
    return meter.result()


@contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """Under torchrun: join its group (NCCL on CUDA, each rank on GPU
    LOCAL_RANK; gloo on the CPU), yield this rank's device, leave the group at the end. Without
    torchrun: yield `device` and do nothing."""
    if not launched():
        yield device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def print_from_rank_zero() -> None:
    """Under torchrun, ranks > 0 compute what rank 0 does and would print the same text and table:
    their stdout goes to /dev/null. stderr stays, so an error is seen whichever rank meets it first
    (torchrun stops the other ranks at once, maybe before rank 0 has printed)."""
    if env_rank() > 0:
        sys.stdout = open(os.devnull, "w")
