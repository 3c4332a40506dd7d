"""Weight-only int8 / int4 quantization of the decoder projections (gpt-fast's quantize.py, our layout).

Why weight-only: batch-1 decode is bound by reading weights, so int8 halves and int4 quarters the
bytes per token, and TEAL's zeroed inputs skip rows of those smaller weights. Activations stay in
the compute dtype, so TEAL's thresholds keep their meaning.

Formats (linear.PackedLinear's buffers; the weight is transposed, [K = in, N = out]):
- int8: symmetric per output channel, W[k, n] = q[k, n] * scales[n], q in [-127, 127].
- int4: min/max per group of `group_size` consecutive inputs of one output channel,
  W[k, n] = (q[k, n] - 8) * scales[k // g, n] + zeros[k // g, n], q in [0, 15], two q per byte
  (column 2j in the low nibble, 2j + 1 in the high one).
A quantized checkpoint is one safetensors file in the float checkpoint's folder (it shares its
config.json and tokenizer); the metadata key "quantization" records {"mode", "group_size",
"lm_head"}, so `checkpoint.load_model(<that file>)` rebuilds the right modules from the file alone.

    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --mode int8
    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --mode int4 --groupsize 64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from checkpoint import CheckpointError, load_model, model_state_for_saving, resolve_checkpoint, save_state_dict
from kernels.sparse_gemv import INT4_GROUP_SIZES as GROUP_SIZES  # what the decode kernel takes
from linear import PackedLinear, projection_splits
from model import Transformer

MODES = ("int8", "int4")
METADATA_KEY = "quantization"


class QuantizationError(ValueError):
    """A quantization request this model cannot take; the message is one line meant for the user."""


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized checkpoint records, so that loading it needs no flags."""

    mode: str
    group_size: int = 0  # int4 only; int8 scales are per output channel
    lm_head: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantizationError(f"unknown quantization mode {self.mode!r}; expected one of {MODES}")
        expected = GROUP_SIZES if self.mode == "int4" else (0,)
        if self.group_size not in expected:
            raise QuantizationError(f"unsupported group size {self.group_size} for {self.mode}; "
                                    f"expected one of {', '.join(map(str, expected))}")

    @classmethod
    def request(cls, mode: str, group_size: int, lm_head: bool) -> "QuantConfig":
        """From user options: the group size only applies to int4."""
        return cls(mode, group_size if mode == "int4" else 0, lm_head)

    @property
    def label(self) -> str:
        return f"int4-g{self.group_size}" if self.mode == "int4" else self.mode

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(dataclasses.asdict(self))}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str | Path) -> "QuantConfig":
        try:
            return cls(**json.loads(meta[METADATA_KEY]))
        except (KeyError, TypeError, ValueError) as e:  # QuantizationError is a ValueError
            raise CheckpointError(f"{source}: bad {METADATA_KEY!r} metadata: {e}") from None


# ---------------------------------------------------------------------------------------------
# The math, on one transposed weight [K, N]; dequantization is kernels.dequantize_weight.
# ---------------------------------------------------------------------------------------------

_TINY = torch.finfo(torch.float32).tiny  # floor for the scale of an all-equal column or group


def quantize_int8(w_t: Tensor) -> tuple[Tensor, Tensor]:
    """[K, N] -> (int8 [K, N], float32 scales [N]); each column's max |W| maps to 127."""
    w = w_t.float()
    scales = (w.abs().amax(dim=0) / 127).clamp(min=_TINY)
    return torch.round(w / scales).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w_t: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """[K, N] -> (packed uint8 [K, N // 2], scales, zeros float32 [K // group_size, N]).

    Each group's [min, max] is cut into 15 steps. The (q - 8) * scale + zero form is the one of
    torch's int4pack matmuls and makes q - 8 a signed int4 in the kernels; zero = min + 8 * scale.
    """
    k, n = w_t.shape
    if k % group_size or n % 2:
        raise QuantizationError(f"int4 needs K divisible by the group size {group_size} and an even N; "
                                f"got a [{k}, {n}] weight")
    groups = w_t.float().view(k // group_size, group_size, n)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((hi - lo) / 15).clamp(min=_TINY)
    q = torch.round((groups - lo[:, None]) / scales[:, None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(k, n)), scales, lo + 8 * scales


def pack_int4(q: Tensor) -> Tensor:
    """uint8 [K, N] of values in [0, 15] -> [K, N // 2]: column 2j low nibble, 2j + 1 high nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_projection(w_t: Tensor, split_sizes: list[int], cfg: QuantConfig) -> PackedLinear:
    """A PackedLinear of cfg's format holding the quantized transposed weight `w_t` [K, N]."""
    k, n = w_t.shape
    w_t = w_t.contiguous()  # nn.Linear's weight.t() is a view; the kernels need row-major [K, N]
    layer = PackedLinear(k, n, split_sizes, cfg.mode, cfg.group_size, device=w_t.device)
    if cfg.mode == "int8":
        layer.weight, layer.scales = quantize_int8(w_t)
    else:
        layer.weight, layer.scales, layer.zeros = quantize_int4(w_t, cfg.group_size)
    return layer


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

def _targets(model: Transformer, cfg: QuantConfig) -> dict[str, list[int]]:
    """Module names to quantize -> output splits; every check runs before anything is swapped."""
    targets = projection_splits(model)
    if cfg.lm_head:
        if model.config.tie_embeddings:
            raise QuantizationError("lm_head is tied to the token embedding (tie_embeddings) and "
                                    "quantizing it would quantize the embedding lookup too; "
                                    "drop --include_lm_head")
        targets["output"] = [model.config.vocab_size]
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, PackedLinear) and module.fmt != "fp":
            current = QuantConfig(module.fmt, module.group_size).label
            raise QuantizationError(f"model is already quantized ({current}); requantizing as "
                                    f"{cfg.label} would compound the error: start from the float checkpoint")
        k = module.in_features
        if cfg.mode == "int4" and k % cfg.group_size:
            fits = [g for g in GROUP_SIZES if all(model.get_submodule(t).in_features % g == 0 for t in targets)]
            raise QuantizationError(f"{name}: K={k} is not divisible by group size {cfg.group_size} "
                                    f"(group sizes that fit this model: {fits or 'none'})")
    return targets


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, module)


def quantize_model(model: Transformer, mode: str, group_size: int = 128,
                   include_lm_head: bool = False) -> QuantConfig:
    """Quantize every decoder projection (and lm_head if asked) in place; returns what to record.

    Takes nn.Linear or float PackedLinear projections; TEAL state set by teal.sparsify carries over.
    """
    cfg = QuantConfig.request(mode, group_size, include_lm_head)
    targets = _targets(model, cfg)
    for name, splits in tqdm(targets.items(), desc=f"quantizing to {cfg.label}", unit="matrix"):
        old = model.get_submodule(name)
        w_t = old.weight if isinstance(old, PackedLinear) else old.weight.t()
        new = quantize_projection(w_t.detach(), splits, cfg)
        if isinstance(old, PackedLinear):
            new.thresholds.copy_(old.thresholds)
            new.sparse, new.sparse_prefill = old.sparse, old.sparse_prefill
        _swap(model, name, new)
    return cfg


def apply_quantized_state(model: Transformer, weights_path: str | Path) -> None:
    """Swap the (meta-device) model's projections for empty ones of the format `weights_path`
    records, so that checkpoint.load_model's load_state_dict(assign=True) fills them."""
    with safe_open(str(weights_path), framework="pt") as f:
        cfg = QuantConfig.from_metadata(f.metadata() or {}, weights_path)
    try:
        targets = _targets(model, cfg)
    except QuantizationError as e:
        raise CheckpointError(f"{weights_path}: {e}") from None
    for name, splits in targets.items():
        old = model.get_submodule(name)
        _swap(model, name, PackedLinear(old.in_features, old.out_features, splits, cfg.mode,
                                        cfg.group_size, device=old.weight.device))


def save_quantized(model: Transformer, cfg: QuantConfig, path: str | Path) -> None:
    """Atomic write; the quantization lives in the metadata, not only in the file name."""
    save_state_dict(model_state_for_saving(model), path, cfg.to_metadata())


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _stored_dtype(weights: Path) -> torch.dtype:
    """The checkpoint's own float dtype: unquantized tensors are written back in it, unrounded."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return f.get_tensor("norm.weight").dtype
    except SafetensorError:
        return torch.float32  # unreadable: load_model says why


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line, without the usage block


def main(argv: list[str] | None = None) -> None:
    p = _Parser(description="Weight-only int8 / int4 quantization of a converted checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, default=Path("checkpoints/SmolLM2-135M-Instruct"),
                   help="float checkpoint folder or its .safetensors file")
    p.add_argument("--mode", choices=MODES, default="int8")
    p.add_argument("--groupsize", type=int, default=128, help=f"int4 group size, one of {GROUP_SIZES}")
    p.add_argument("--include_lm_head", action="store_true",
                   help="also quantize lm_head (refused when it is tied to the embedding)")
    p.add_argument("--output", type=Path, default=None,
                   help="default: <checkpoint dir>/model_int8.safetensors or model_int4-g<G>.safetensors")
    args = p.parse_args(argv)
    try:
        cfg = QuantConfig.request(args.mode, args.groupsize, args.include_lm_head)
        folder, weights = resolve_checkpoint(args.checkpoint_path)
        output = args.output or folder / f"model_{cfg.label}.safetensors"
        if output.resolve() == weights.resolve():
            raise QuantizationError(f"--output {output} would overwrite the checkpoint being quantized")
        model = load_model(weights, "cpu", _stored_dtype(weights))
        quantize_model(model, cfg.mode, cfg.group_size, cfg.lm_head)
        save_quantized(model, cfg, output)
    except (CheckpointError, QuantizationError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {output} ({cfg.label}{', lm_head too' if cfg.lm_head else ''})")


if __name__ == "__main__":
    main()
