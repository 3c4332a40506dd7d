"""PackedLinear: the one projection type behind TEAL sparsity and weight quantization.

The weight is stored transposed, [in_features, out_features], so that the decode kernel can skip
the whole contiguous row of every input entry TEAL zeroes; prefill multiplies by the same tensor
(`x @ W^T` is a plain GEMM for cuBLAS), so nothing is stored twice. Formats: bf16/fp16 ("fp"),
int8 per output channel, int4 groupwise along the input dimension (layouts in kernels/sparse_gemv.py).

`PackedLinear.forward` is the single place that decides which kernel runs for a layer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from kernels import dequantize_weight, sparse_gemv, sparse_gemv_reference
from kernels.sparse_gemv import MAX_BATCH

FORMATS = ("fp", "int8", "int4")


class PackedLinear(nn.Module):
    """y = x W^T over a transposed weight, optionally with TEAL thresholds per output segment.

    `split_sizes` names the output segments that share one input but get their own threshold
    (q|k|v: three, gate|up: two, o and down: one). A threshold of 0 keeps every nonzero input, so
    thresholds of zeros are exactly the dense layer.
    """

    def __init__(self, in_features: int, out_features: int, split_sizes: list[int] | None = None,
                 fmt: str = "fp", group_size: int = 0, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
        self.in_features, self.out_features = in_features, out_features
        self.split_sizes = list(split_sizes or [out_features])
        if sum(self.split_sizes) != out_features:
            raise ValueError(f"split_sizes {self.split_sizes} do not sum to {out_features}")
        self.fmt, self.group_size = fmt, group_size
        k, n = in_features, out_features
        if fmt == "fp":
            weight = torch.empty(k, n, dtype=dtype, device=device)
        elif fmt == "int8":
            weight = torch.empty(k, n, dtype=torch.int8, device=device)
            self.register_buffer("scales", torch.empty(n, dtype=torch.float32, device=device))
        else:
            weight = torch.empty(k, n // 2, dtype=torch.uint8, device=device)
            self.register_buffer("scales", torch.empty(k // group_size, n, dtype=torch.float32, device=device))
            self.register_buffer("zeros", torch.empty(k // group_size, n, dtype=torch.float32, device=device))
        self.register_buffer("weight", weight)
        # TEAL state: off until teal.sparsify() sets thresholds; prefill stays dense unless asked.
        self.register_buffer("thresholds", torch.zeros(len(self.split_sizes), dtype=torch.float32,
                                                       device=device))
        self.sparse = False
        self.sparse_prefill = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, split_sizes: list[int] | None = None) -> "PackedLinear":
        w = linear.weight.detach()
        packed = cls(w.shape[1], w.shape[0], split_sizes, dtype=w.dtype, device=w.device)
        packed.weight = w.t().contiguous()
        return packed

    def _quant_args(self) -> tuple[Tensor | None, Tensor | None]:
        return getattr(self, "scales", None), getattr(self, "zeros", None)

    def dense_weight_t(self, dtype: torch.dtype) -> Tensor:
        """The weight as [in, out] in `dtype` (dequantized for int formats)."""
        if self.fmt == "fp":
            return self.weight.to(dtype)
        scales, zeros = self._quant_args()
        return dequantize_weight(self.weight, scales, zeros, self.group_size).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        decode_step = x.dim() < 3 or x.shape[-2] == 1
        sparsify = self.sparse and (decode_step or self.sparse_prefill)
        scales, zeros = self._quant_args()
        if x.is_cuda and x2.shape[0] <= MAX_BATCH and (sparsify or self.fmt != "fp"):
            # Decode: our Triton kernel, dense (thresholds of zeros) or sparse; rows of zeroed
            # inputs are never read.
            thresholds = self.thresholds if sparsify else torch.zeros_like(self.thresholds)
            out = sparse_gemv(x2, self.weight, thresholds, self.split_sizes, scales, zeros, self.group_size)
        elif sparsify:
            out = sparse_gemv_reference(x2, self.weight, self.thresholds, self.split_sizes,
                                        scales, zeros, self.group_size)
        else:
            out = x2 @ self.dense_weight_t(x.dtype)
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, splits={self.split_sizes}, "
                f"fmt={self.fmt}{f'-g{self.group_size}' if self.fmt == 'int4' else ''}, sparse={self.sparse}")


def packed_projections(model: nn.Module) -> dict[str, "PackedLinear"]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def projection_splits(model: nn.Module) -> dict[str, list[int]]:
    """Output segments of every decoder projection: q|k|v and gate|up get one threshold each."""
    splits = {}
    for i, layer in enumerate(model.layers):
        att, ff = layer.attention, layer.feed_forward
        splits[f"layers.{i}.attention.wqkv"] = list(att.qkv_sizes)
        splits[f"layers.{i}.attention.wo"] = [att.wo.out_features]
        splits[f"layers.{i}.feed_forward.w13"] = [ff.hidden, ff.hidden]
        splits[f"layers.{i}.feed_forward.w2"] = [ff.w2.out_features]
    return splits


def pack_model(model: nn.Module) -> nn.Module:
    """Swap every decoder projection nn.Linear for a PackedLinear (idempotent; lm_head stays)."""
    for name, splits in projection_splits(model).items():
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        child = getattr(parent, attr)
        if isinstance(child, nn.Linear):
            setattr(parent, attr, PackedLinear.from_linear(child, splits))
    return model
