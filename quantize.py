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
config.json and tokenizer; written to another folder, it gets copies of them); the metadata key
"quantization" records {"mode", "group_size", "lm_head" (false, "int8" or "int4")}, so
`checkpoint.load_model(<that file>)` rebuilds the right modules from the file alone.

    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --mode int8
    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --mode int4 --groupsize 64
    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct --mode int4 --groupsize 32 --lm_head int4
"""
from __future__ import annotations

import argparse
from pathlib import Path

# cli before torch: a Ctrl-C during the slow imports below is then one line too (cli.py)
from cli import DEFAULT_CHECKPOINT, ArgumentParser, run_main

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm import tqdm

from checkpoint import (check_companions, copy_companions, load_model, model_state_for_saving,
                        resolve_checkpoint, save_state_dict)
from files import check_writable
from teal_kernels.reference import INT4_GROUP_SIZES
from linear import (QUANT_MODES, PackedLinear, QuantConfig, QuantizationError, quantization_targets,
                    swap_module)
from model import Transformer


# ---------------------------------------------------------------------------------------------
# The math, on one transposed weight [K, N]; dequantization is teal_kernels.reference.dequantize_weight.
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


def quantize_projection(w_t: Tensor, split_sizes: list[int], mode: str, group_size: int) -> PackedLinear:
    """A PackedLinear of format `mode` holding the quantized transposed weight `w_t` [K, N]."""
    k, n = w_t.shape
    w_t = w_t.contiguous()  # nn.Linear's weight.t() is a view; the kernels need row-major [K, N]
    layer = PackedLinear(k, n, split_sizes, mode, group_size, device=w_t.device)
    if mode == "int8":
        layer.weight, layer.scales = quantize_int8(w_t)
    else:
        layer.weight, layer.scales, layer.zeros = quantize_int4(w_t, group_size)
    return layer


# ---------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------

def quantize_model(model: Transformer, mode: str, group_size: int = 128,
                   lm_head: bool | str | None = False) -> QuantConfig:
    """Quantize every decoder projection (and lm_head if asked: True or "int8" to int8, "int4" to the
    projections' int4 format) in place; returns what to record.

    Takes nn.Linear or float PackedLinear projections; TEAL state set by teal.sparsify carries over.
    """
    cfg = QuantConfig.request(mode, group_size, lm_head)
    targets = quantization_targets(model, cfg)
    for name, (splits, target_mode, target_group) in tqdm(targets.items(), desc=f"quantizing to {cfg.label}",
                                                           unit="matrix"):
        old = model.get_submodule(name)
        w_t = old.weight if isinstance(old, PackedLinear) else old.weight.t()
        new = quantize_projection(w_t.detach(), splits, target_mode, target_group)
        if isinstance(old, PackedLinear):
            new.thresholds.copy_(old.thresholds)
            new.sparse, new.sparse_prefill = old.sparse, old.sparse_prefill
        swap_module(model, name, new)
    return cfg


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="float checkpoint folder or its .safetensors file")
    p.add_argument("--mode", choices=QUANT_MODES, default="int8", help="weight format")
    p.add_argument("--groupsize", type=int, default=128,
                   help=f"int4 group size, one of {INT4_GROUP_SIZES} (must divide every projection's K)")
    p.add_argument("--lm_head", nargs="?", const="int8", default=None, choices=["int8", "int4"],
                   help="also quantize lm_head: to int8 per channel whatever --mode (--lm_head or --lm_head "
                        "int8), or with --mode int4 to int4 at --groupsize (--lm_head int4, as gpt-fast's int4 "
                        "does); a head tied to the embedding gets its own copy, the embedding lookup stays in "
                        "float")
    p.add_argument("--output", type=Path, default=None,
                   help="file to write (default: <checkpoint dir>/model_int8.safetensors or "
                        "model_int4-g<G>.safetensors); in another folder, config.json and the "
                        "tokenizer files are copied beside it")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    cfg = QuantConfig.request(args.mode, args.groupsize, args.lm_head)
    folder, weights = resolve_checkpoint(args.checkpoint_path)
    output = check_writable(args.output or folder / f"model_{cfg.label}.safetensors", weights)
    check_companions(folder, output.parent)
    model = load_model(weights, "cpu", _stored_dtype(weights))
    quantize_model(model, cfg.mode, cfg.group_size, cfg.lm_head)
    save_quantized(model, cfg, output)
    copy_companions(folder, output.parent)  # a file elsewhere stays loadable
    elsewhere = output.parent.resolve() != folder.resolve()
    print(f"wrote {output} ({cfg.label}{f', lm_head in {cfg.lm_head}' if cfg.lm_head else ''})"
          + (f"; copied {folder}'s config.json and tokenizer beside it" if elsewhere else ""))
    return output


if __name__ == "__main__":
    run_main(lambda: run(parse_args()))
