"""The fused decode path: module swaps that run a decoder block's decode step in fewer kernels.

model.py stays the plain reference, and prefill always runs it. `install_fused_decode` swaps each
block's Attention for a DecodeAttention whose single-position steps run RoPE, the KV-cache write
and split-KV attention over the filled prefix as one op (``teal::decode_attention_step``: Triton
on CUDA, the plain-torch reference on the CPU); its q|k|v and o projections stay the block's
PackedLinear / nn.Linear modules, so TEAL and quantization apply unchanged and module names (and
so thresholds files) do not change.
"""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from kernels.ops import decode_attention_step
from linear import swap_module
from model import Attention


class DecodeAttention(Attention):
    """Attention whose decode steps (one position per sequence) take the fused op."""

    def __init__(self, reference: Attention) -> None:
        nn.Module.__init__(self)  # the reference's submodules and sizes, not new ones
        self.n_head, self.n_kv, self.head_dim = reference.n_head, reference.n_kv, reference.head_dim
        self.qkv_sizes = reference.qkv_sizes
        self.wqkv, self.wo, self.kv_cache = reference.wqkv, reference.wo, reference.kv_cache

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        if seqlen != 1 or self.kv_cache is None:
            return super().forward(x, freqs_cis, mask, input_pos)
        qkv = self.wqkv(x).view(bsz, -1)
        y = decode_attention_step(qkv, freqs_cis.reshape(-1, 2), self.kv_cache.k_cache, self.kv_cache.v_cache,
                                  input_pos, self.n_head)
        return self.wo(y.view(bsz, 1, self.n_head * self.head_dim))


def install_fused_decode(model: nn.Module) -> nn.Module:
    """Swap every block's Attention for DecodeAttention (idempotent)."""
    for i, layer in enumerate(model.layers):
        if type(layer.attention) is Attention:
            swap_module(model, f"layers.{i}.attention", DecodeAttention(layer.attention))
    return model
