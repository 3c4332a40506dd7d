"""gpt-fast's weight-only int8 / int4 quantization on torch's own kernels: a baseline, not a format of ours.

bench_decode.py (--baselines) times these beside our int8 / int4 PackedLinear formats in the same
run, so "ours vs what gpt-fast does" is measured on the same GPU, torch and day (issue 11). The
method is gpt-fast's (pytorch-labs/gpt-fast, quantize.py), written here for our model.py; nothing
here is used outside benchmarks and tests.

- int8: symmetric per output channel over nn.Linear's [N, K] weight, bf16 scales; the product is
  gpt-fast's `F.linear(x, W_int8.to(x.dtype)) * scales`, which gpt-fast relies on Inductor to fuse
  into one kernel. Without gpt-fast's Inductor settings it was not fused under torch 2.11 on the
  H200 (15.8 tok/s end to end, results/decode_llama3_8b_asm.md), and torch's own
  `_weight_int8pack_mm` is no better at M = 1 (one 4096 x 14336 product, eager, 2026-12-02: 283 us,
  cast + F.linear 190 us, bf16 F.linear 32 us; results/int8_baseline_probe.md). gpt-fast's
  generate.py turns on Inductor's coordinate-descent tuning, which its int8 path needs for the fused
  one-row kernel (gpt-fast issue 114); bench_decode now compiles the baselines under
  GPT_FAST_INDUCTOR: 243.9 tok/s that way (H200, 2026-12-04, results/gptfast_int8/).
- int4: min/max per group of `group_size` inputs of one output channel, W = (q - 8) * scale + zero
  with q in [0, 15]; scales and zeros bf16 in tinygemm's [K / g, N, 2] layout. CUDA: torch's tinygemm
  (`_convert_weight_to_int4pack` + `_weight_int4pack_mm`, bf16 only); the CPU: torch's
  `_for_cpu` twins of both ops, so that the module is testable without a GPU. torchao's int4
  weight-only default (its tensor-core-tiled layout) packs for the same aten kernel.

Every nn.Linear of the model is replaced, lm_head included, as gpt-fast's quantize.py does (its
handlers walk all nn.Linear modules; its model.py reads the output layer's scales). A tied lm_head
gets its own quantized copy; the embedding table stays float. Until 2026-12-05 this module left
lm_head in bf16, so every tinygemm and gpt-fast int8 row measured before then (README's decode
table) read the bf16 head, about 1 GB a token on Llama-3-8B. Quantizing it as gpt-fast does made
tinygemm faster (319.5-324.2 in earlier runs -> 333.7 tok/s) and gpt-fast's int8 slower (243.9 in run K -> 178.7: its
`F.linear(x, W.to(bf16)) * s` on the head is not one fused read), H200, 2026-12-05, README run R.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from linear import projection_splits, swap_module
from model import Transformer
from teal_kernels.tinygemm import int4pack_mm, pack_codes

# --baselines value -> (kind, int4 group size; 0 for int8)
BASELINES: dict[str, tuple[str, int]] = {
    "torch-int8": ("int8", 0),
    "torch-int4-g128": ("int4", 128),
    "torch-int4-g64": ("int4", 64),
    "torch-int4-g32": ("int4", 32),
}
# What runs the product, for the benchmark table's "path" column.
KERNELS: dict[str, str] = {
    "int8": "gpt-fast int8: F.linear on int8 weights x scales (fusion left to Inductor), lm_head too",
    "int4": "torch._weight_int4pack_mm (tinygemm), lm_head too",
}
# gpt-fast's generate.py Inductor settings that change the generated code; bench_decode compiles
# the baselines (only) under them: torch._inductor.config.patch(**GPT_FAST_INDUCTOR)
GPT_FAST_INDUCTOR: dict[str, bool] = {"coordinate_descent_tuning": True}


def quantize_int8_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int8 [N, K], scales [N] in w's dtype); each row's max |w| maps to 127.

    q is rounded against the stored (rounded) scales, so the dequantized weight is q * scales exactly.
    """
    scales = (w.float().abs().amax(dim=1) / 127).clamp(min=torch.finfo(w.dtype).tiny).to(w.dtype)
    q = torch.round(w.float() / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4_groupwise(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int32 q [N, K] in [0, 15], scales_and_zeros [K / g, N, 2] in w's dtype).

    Each group's [min, max] is cut into 15 steps; zero = min + 8 * scale (tinygemm's (q - 8) form).
    q is rounded against the stored (rounded) scale and zero, as gpt-fast does.
    """
    n, k = w.shape
    if k % group_size or n % 8:
        raise ValueError(f"int4 baseline needs K divisible by {group_size} and N by 8; got a [{n}, {k}] weight")
    groups = w.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(w.dtype).tiny).to(w.dtype)
    zeros = (lo + 8 * scales.float()).to(w.dtype)
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]) + 8
    q = q.clamp(0, 15).to(torch.int32).view(n, k)
    return q, torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()


class TorchInt8Linear(nn.Module):
    """gpt-fast's int8 weight-only linear: per-channel int8 [N, K] weight, scales applied after the GEMV."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scales = quantize_int8_per_channel(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


class TorchInt4Linear(nn.Module):
    """gpt-fast's int4 weight-only linear on torch's int4pack ops. The packed layout belongs to the
    device it was built on (tinygemm tiles on CUDA, nibble pairs on the CPU): build it where it runs."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        q, scales_and_zeros = quantize_int4_groupwise(w, group_size)
        if self.in_features % 32:
            raise ValueError(f"tinygemm needs K divisible by 32; got K={self.in_features}")
        self.register_buffer("weight", pack_codes(q))
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, x: Tensor) -> Tensor:
        out = int4pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales_and_zeros, self.group_size)
        return out.view(*x.shape[:-1], self.out_features)


def apply_torch_baseline(model: Transformer, kind: str, group_size: int = 128) -> Transformer:
    """Replace every nn.Linear (each block's wqkv, wo, w13, w2, and lm_head) by the baseline module
    of `kind` ("int8" or "int4"), in place, as gpt-fast quantizes a model; the embedding is left as
    it is."""
    if kind not in KERNELS:
        raise ValueError(f"unknown baseline kind {kind!r}; expected one of {tuple(KERNELS)}")
    for name in [*projection_splits(model), "output"]:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}; the baseline starts from a plain nn.Linear model")
        swap_module(model, name, TorchInt8Linear(linear) if kind == "int8" else TorchInt4Linear(linear, group_size))
    return model
