"""Turn TEAL on and off on a model, and measure how much of the weights it really skips.

Sparsification is a module swap: `linear.pack_model` replaces every decoder projection by a
PackedLinear whose `thresholds` buffer holds one value per output segment (q|k|v, o, gate|up,
down: 7 per layer). A segment ignores every input entry with |x| <= its threshold, so that entry's
weight row is never read. Embeddings and lm_head stay dense. Decode steps are sparse whenever
`sparse` is set; prefill only with `sparse_prefill` (prefill is compute-bound, so skipping rows
there buys no speed and costs quality).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from linear import PROJECTIONS, PackedLinear, pack_model, packed_projections, projection_splits, segments

Thresholds = dict[str, list[float]]  # PackedLinear module name -> one threshold per segment


def segment_weights(model: nn.Module) -> Tensor:
    """Weight count of every segment (in_features * segment width): what skipping it saves."""
    splits = projection_splits(model)
    return torch.tensor([model.get_submodule(name).in_features * splits[name][j]
                         for name, j, _ in segments(model)], dtype=torch.float64)


def thresholds_from_vector(model: nn.Module, values: Tensor) -> Thresholds:
    """Canonical flat vector (one value per segment) -> {module name: [per-segment values]}."""
    out: Thresholds = {}
    for (name, _, _), v in zip(segments(model), values.tolist(), strict=True):
        out.setdefault(name, []).append(float(v))
    return out


def sparsify(model: nn.Module, thr: Thresholds, sparse_prefill: bool = False,
             targets: Thresholds | None = None) -> nn.Module:
    """Pack the projections (if not yet) and switch TEAL on with the given thresholds, in place.

    `targets` (same layout: the segments' target sparsity, from the thresholds file) lets a
    projection stay dense on a GPU where the measured speed table says its kernel would be slower
    (PackedLinear.applies_sparsity); without it every projection goes sparse.
    """
    pack_model(model)
    mods = packed_projections(model)
    for given in (thr, targets):
        if given is not None and set(mods) != set(given):
            diff = sorted(set(mods) ^ set(given))
            raise ValueError(f"thresholds do not match the model's projections (e.g. {diff[0]})")
    for name, m in mods.items():
        if len(thr[name]) != len(m.split_sizes):
            raise ValueError(f"{name}: {len(thr[name])} thresholds for {len(m.split_sizes)} segments")
        m.thresholds.copy_(torch.tensor(thr[name], dtype=torch.float32))
        # All-zero thresholds skip only exact zeros: the dense product is the same, and exact.
        m.sparse, m.sparse_prefill = any(t > 0 for t in thr[name]), sparse_prefill
        m.set_target_sparsity(None if targets is None else targets[name])
    return model


def dense_fallbacks(model: nn.Module, device: torch.device) -> tuple[list[str], list[str], list[str]]:
    """(sparse projections that stay dense on `device`: the kernel is slower there, measured or
    estimated; sparse projections whose shape the speed table has not measured; sparse projections
    decided by another GPU's measurements, speed_table.STAND_INS): what to tell the user."""
    slower, unmeasured, borrowed = [], [], []
    for name, m in packed_projections(model).items():
        if not m.sparse:
            continue
        pays, measured_on = m.kernel_verdict(device)
        if pays is False:
            slower.append(name)
        if device.type == "cuda" and measured_on is None:
            unmeasured.append(name)
        elif measured_on is not None and measured_on != torch.cuda.get_device_name(device):
            borrowed.append(name)
    return slower, unmeasured, borrowed


@dataclass(frozen=True)
class TealState:
    """A model's TEAL setting (every projection's thresholds and flags), kept to switch back to it
    by copying in place: self-speculative decoding alternates a draft and a target setting every
    few tokens, and copies keep the buffers' addresses (CUDA graphs stay valid)."""

    entries: tuple[tuple[PackedLinear, Tensor, bool, bool, float | None], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "TealState":
        return cls(tuple((m, m.thresholds.clone(), m.sparse, m.sparse_prefill, m.target_sparsity)
                         for m in packed_projections(model).values()))

    def restore(self) -> None:
        if not self.entries:  # a model that was never packed (e.g. a dense draft model): nothing to set
            return
        # one multi-tensor copy: on a GPU, 7 small copies per layer would be as many launches per switch
        torch._foreach_copy_([m.thresholds for m, *_ in self.entries], [t for _, t, *_ in self.entries])
        for m, _, sparse, sparse_prefill, target in self.entries:
            m.sparse, m.sparse_prefill, m.target_sparsity = sparse, sparse_prefill, target


def densify(model: nn.Module) -> nn.Module:
    """Switch TEAL off; packed weights and thresholds stay, so `sparsify` can switch it back on."""
    for m in packed_projections(model).values():
        m.sparse = m.sparse_prefill = False
    return model


@contextmanager
def every_token_sparse(model: nn.Module) -> Iterator[None]:
    """Temporarily sparsify prefill too (measurements and calibration); restore the flags after."""
    mods = packed_projections(model).values()
    saved = [(m.sparse, m.sparse_prefill) for m in mods]
    for m in mods:
        m.sparse = m.sparse_prefill = True
    try:
        yield
    finally:
        for m, (s, sp) in zip(mods, saved):
            m.sparse, m.sparse_prefill = s, sp


class SparsityMeter:
    """Counts, per segment, the input entries at or below the threshold (= weight rows skipped)
    on the calls where the segment is sparse (dense calls skip nothing).

    Forward pre-hooks on every PackedLinear; used as a context manager so the hooks never outlive
    the measurement.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = [(name, j) for name, j, _ in segments(model)]
        self.labels = [label for _, _, label in segments(model)]
        self.skipped = torch.zeros(len(self.names), dtype=torch.float64)
        self.seen = torch.zeros(len(self.names), dtype=torch.float64)
        self._handles: list = []

    def __enter__(self) -> "SparsityMeter":
        first = {}
        for i, (name, j) in enumerate(self.names):
            first.setdefault(name, i)
        for name, m in packed_projections(self.model).items():
            self._handles.append(m.register_forward_pre_hook(self._hook(first[name])))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, start: int):
        def hook(module: PackedLinear, args: tuple[Tensor, ...]) -> None:
            x = args[0]
            # as a decode step on this device would: layers that stay dense there skip nothing
            active = module.applies_sparsity(x) and module.sparse_kernel_pays(x.device) is not False
            a = x.detach().abs().reshape(-1, module.in_features)
            for j, t in enumerate(module.thresholds.tolist()):
                if active:
                    self.skipped[start + j] += (a <= t).sum().item()
                self.seen[start + j] += a.numel()
        return hook

    def per_segment(self) -> Tensor:
        return self.skipped / self.seen.clamp(min=1)

    def result(self) -> dict:
        frac, w = self.per_segment(), segment_weights(self.model)
        per_projection = {}
        for p in PROJECTIONS:
            idx = [i for i, label in enumerate(self.labels) if label == p]
            per_projection[p] = float((frac[idx] * w[idx]).sum() / w[idx].sum())
        n_layer = len(self.model.layers)
        per_layer = [float(v) for v in ((frac * w).view(n_layer, -1).sum(1) / w.view(n_layer, -1).sum(1))]
        return {"parameter_weighted": float((frac * w).sum() / w.sum()),
                "per_projection": per_projection, "per_layer": per_layer}


@torch.no_grad()
def realized_sparsity(model: nn.Module, idx: Tensor) -> dict:
    """Fraction of decoder weight rows skipped on `idx` [1, S], every token sparsified.

    Runs one eager forward (overwriting the KV cache; caches are re-made if they do not fit) and returns
    {"parameter_weighted", "per_projection" (q..down over all layers), "per_layer"}; each fraction
    is weighted by its segment's weight count, so it is the share of weight bytes not read.
    """
    seq = idx.shape[1]
    if model.max_seq_length < seq or model.max_batch_size != idx.shape[0]:  # caches fit batches exactly
        model.setup_caches(idx.shape[0], seq)
    with every_token_sparse(model), SparsityMeter(model) as meter:
        model(idx, torch.arange(seq, device=idx.device))
    return meter.result()
