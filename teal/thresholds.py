"""TEAL thresholds files: what calibrate.py writes and generate.py / perplexity.py read.

One safetensors file. For every allocation A in it (e.g. "uniform", "greedy", "uniform-dense"),
three float32 tensors:
  "A.levels"      [P]              parameter-weighted sparsity of each path point, ascending from 0
  "A.sparsity"    [P, n_segments]  target sparsity of every segment at that point
  "A.thresholds"  [P, n_segments]  |x| threshold of every segment at that point
Segments are in the order of linear.segments: layer by layer q, k, v, o, gate, up, down.
The header's metadata has one key, "teal": a JSON object
  {"format": 1, "model_fingerprint": ..., "model_config": {...},
   "segments": ["layers.0.attention.wqkv:q", ...],
   "calibration": {"text", "text_sha256", "text_tokens", "tokens", "window_len", "batch", ...},
   "allocations": {A: {"description": ..., "levels": [...]}}}
A level between two path points gets thresholds interpolated linearly between them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from torch import Tensor

from checkpoint import save_state_dict
from linear import segments
from teal.calibration import Allocation
from teal.sparsify import Thresholds, thresholds_from_vector

FORMAT_VERSION = 1


def segment_names(model: nn.Module) -> list[str]:
    return [f"{name}:{label}" for name, _, label in segments(model)]


def save_thresholds(path: str | Path, model: nn.Module, allocations: dict[str, Allocation],
                    calibration: dict) -> None:
    tensors = {}
    for name, a in allocations.items():
        tensors[f"{name}.levels"] = a.levels.float()
        tensors[f"{name}.sparsity"] = a.sparsity.float()
        tensors[f"{name}.thresholds"] = a.thresholds.float()
    meta = {"format": FORMAT_VERSION, "model_fingerprint": model.config.fingerprint(),
            "model_config": model.config.to_dict(), "segments": segment_names(model),
            "calibration": calibration,
            "allocations": {name: {"description": a.description,
                                   "levels": [round(v, 6) for v in a.levels.tolist()]}
                            for name, a in allocations.items()}}
    save_state_dict(tensors, path, metadata={"teal": json.dumps(meta)})


def read_thresholds(path: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of a thresholds file; ValueError with one line if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"thresholds file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["teal"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a TEAL thresholds file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: thresholds format {meta.get('format')}, expected {FORMAT_VERSION}")
    return meta, tensors


def check_model(meta: dict, model: nn.Module, path: str | Path) -> None:
    mine = model.config.fingerprint()
    if meta["model_fingerprint"] != mine or meta["segments"] != segment_names(model):
        raise ValueError(f"{path} was calibrated for another model (fingerprint "
                         f"{meta['model_fingerprint']}, this model {mine}); run calibrate.py for it")


def check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")


def path_thresholds(levels: Tensor, thresholds: Tensor, sparsity: float) -> Tensor:
    """Thresholds at `sparsity` on a path, linear between the two points around it."""
    k = int(torch.searchsorted(levels, torch.tensor(sparsity, dtype=levels.dtype)))
    if k < len(levels) and abs(float(levels[k]) - sparsity) < 1e-6:
        return thresholds[k]
    lo, hi = float(levels[k - 1]), float(levels[k])
    a = (sparsity - lo) / (hi - lo)
    return (1 - a) * thresholds[k - 1] + a * thresholds[k]


def _path_at(path: str | Path, model: nn.Module, sparsity: float, allocation: str, what: str) -> Thresholds:
    """Per-module values of tensor `what` ("thresholds" or "sparsity") of `allocation`, read at
    parameter-weighted `sparsity` (linear between the two path points around it)."""
    check_sparsity(sparsity)
    meta, tensors = read_thresholds(path)
    check_model(meta, model, path)
    if allocation not in meta["allocations"]:
        raise ValueError(f"{path} has no {allocation!r} allocation (calibrated: "
                         f"{', '.join(meta['allocations'])})")
    levels = tensors[f"{allocation}.levels"].double()
    if sparsity > float(levels[-1]) + 1e-6:
        raise ValueError(f"sparsity {sparsity} is above the highest level calibrated for "
                         f"{allocation!r} ({float(levels[-1]):g}) in {path}")
    values = path_thresholds(levels, tensors[f"{allocation}.{what}"].double(), min(sparsity, float(levels[-1])))
    return thresholds_from_vector(model, values.float())


def load_thresholds(path: str | Path, model: nn.Module, sparsity: float,
                    allocation: str = "uniform") -> Thresholds:
    """Per-module thresholds of `allocation` at parameter-weighted `sparsity`, for `sparsify`."""
    return _path_at(path, model, sparsity, allocation, "thresholds")


def load_targets(path: str | Path, model: nn.Module, sparsity: float, allocation: str = "uniform") -> Thresholds:
    """Per-module target sparsity of every segment at the same point (`sparsify`'s `targets`)."""
    return _path_at(path, model, sparsity, allocation, "sparsity")
