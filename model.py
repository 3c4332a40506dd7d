"""The Llama family in one file: Llama-2/3/3.1/3.2, Mistral, SmolLM2, TinyLlama.

gpt-fast style: plain modules, a static KV cache so decode has fixed shapes (compilable with CUDA
graphs), fused q|k|v and gate|up weights so prefill and decode read the same tensors. RoPE is the
interleaved (complex-pair) form; Hugging Face checkpoints are permuted into it at conversion time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ModelArgs:
    """Architecture hyper-parameters; everything the forward pass needs and nothing else."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_local_heads: int = -1  # key/value heads (GQA); -1 means = n_head
    intermediate_size: int = 11008
    vocab_size: int = 32000
    block_size: int = 4096  # longest context the KV cache and RoPE tables are built for
    head_dim: int = -1  # -1 means dim // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    # Llama-3.1 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or None.
    rope_scaling: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_local_heads:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_local_heads={self.n_local_heads}")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """Exact (case-insensitive) lookup in the config table; no fuzzy matching on folder names."""
        for key, cfg in MODEL_CONFIGS.items():
            if key.lower() == name.lower():
                return cls(**cfg)
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(MODEL_CONFIGS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Short hash of the architecture; calibration files record it to refuse a foreign model."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192.0}
_LLAMA32_SCALING = {**_LLAMA31_SCALING, "factor": 32.0}

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": dict(dim=4096, n_layer=32, n_head=32, intermediate_size=11008),
    "Llama-2-13B": dict(dim=5120, n_layer=40, n_head=40, intermediate_size=13824),
    "Llama-2-70B": dict(dim=8192, n_layer=80, n_head=64, n_local_heads=8, intermediate_size=28672),
    "Llama-3-8B": dict(dim=4096, n_layer=32, n_head=32, n_local_heads=8, intermediate_size=14336,
                       vocab_size=128256, block_size=8192, rope_base=500000.0),
    "Llama-3-70B": dict(dim=8192, n_layer=80, n_head=64, n_local_heads=8, intermediate_size=28672,
                        vocab_size=128256, block_size=8192, rope_base=500000.0),
    "Llama-3.1-8B": dict(dim=4096, n_layer=32, n_head=32, n_local_heads=8, intermediate_size=14336,
                         vocab_size=128256, block_size=131072, rope_base=500000.0,
                         rope_scaling=_LLAMA31_SCALING),
    "Llama-3.1-70B": dict(dim=8192, n_layer=80, n_head=64, n_local_heads=8, intermediate_size=28672,
                          vocab_size=128256, block_size=131072, rope_base=500000.0,
                          rope_scaling=_LLAMA31_SCALING),
    "Llama-3.1-405B": dict(dim=16384, n_layer=126, n_head=128, n_local_heads=8,
                           intermediate_size=53248, vocab_size=128256, block_size=131072,
                           rope_base=500000.0, rope_scaling=_LLAMA31_SCALING),
    "Llama-3.2-1B": dict(dim=2048, n_layer=16, n_head=32, n_local_heads=8, intermediate_size=8192,
                         vocab_size=128256, block_size=131072, rope_base=500000.0,
                         tie_embeddings=True, rope_scaling=_LLAMA32_SCALING),
    "Llama-3.2-3B": dict(dim=3072, n_layer=28, n_head=24, n_local_heads=8, intermediate_size=8192,
                         vocab_size=128256, block_size=131072, rope_base=500000.0,
                         tie_embeddings=True, rope_scaling=_LLAMA32_SCALING),
    "Mistral-7B": dict(dim=4096, n_layer=32, n_head=32, n_local_heads=8, intermediate_size=14336,
                       vocab_size=32768, block_size=32768, rope_base=1000000.0),
    "SmolLM2-135M": dict(dim=576, n_layer=30, n_head=9, n_local_heads=3, intermediate_size=1536,
                         vocab_size=49152, block_size=8192, rope_base=100000.0,
                         tie_embeddings=True),
    "SmolLM2-360M": dict(dim=960, n_layer=32, n_head=15, n_local_heads=5, intermediate_size=2560,
                         vocab_size=49152, block_size=8192, rope_base=100000.0,
                         tie_embeddings=True),
    "SmolLM2-1.7B": dict(dim=2048, n_layer=24, n_head=32, n_local_heads=32, intermediate_size=8192,
                         vocab_size=49152, block_size=8192, rope_base=130000.0,
                         tie_embeddings=True),
    "TinyLlama-1.1B": dict(dim=2048, n_layer=22, n_head=32, n_local_heads=4, intermediate_size=5632,
                           vocab_size=32000, block_size=2048),
}


class KVCache(nn.Module):
    """Preallocated keys/values [batch, kv_heads, max_seq, head_dim], written in place at input_pos."""

    def __init__(self, batch: int, max_seq: int, n_kv: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch, n_kv, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the weight dtype (bf16 squares lose too much)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = args.n_head, args.n_local_heads, args.head_dim
        self.qkv_sizes = [args.n_head * args.head_dim, args.n_local_heads * args.head_dim,
                          args.n_local_heads * args.head_dim]
        self.wqkv = nn.Linear(args.dim, sum(self.qkv_sizes), bias=False)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        q = apply_rotary_emb(q.view(bsz, seqlen, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(bsz, seqlen, self.n_kv, self.head_dim), freqs_cis)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(bsz, seqlen, self.n_kv, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.wo(y.transpose(1, 2).reshape(bsz, seqlen, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP with gate and up fused into one weight [gate; up]."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.config = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.freqs_cis: Tensor | None = None
        self.causal_mask: Tensor | None = None

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate KV caches and RoPE tables for a batch size and total (prompt + new) length."""
        if max_seq_length > self.config.block_size:
            raise ValueError(f"sequence length {max_seq_length} exceeds the model's context "
                             f"of {self.config.block_size} tokens")
        if (self.max_batch_size, self.max_seq_length) == (max_batch_size, max_seq_length):
            return
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        cfg = self.config
        ref = self.norm.weight
        dtype = self.tok_embeddings.weight.dtype
        for layer in self.layers:  # the attention's own KV heads: a tensor-parallel shard holds a share (tp.py)
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, layer.attention.n_kv,
                                               cfg.head_dim, dtype).to(ref.device)
        self.freqs_cis = precompute_freqs_cis(max_seq_length, cfg.head_dim, cfg.rope_base,
                                              cfg.rope_scaling).to(ref.device)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool,
                                                 device=ref.device))

    def forward(self, idx: Tensor, input_pos: Tensor, last_only: bool = False) -> Tensor:
        """idx [batch, seq] token ids at absolute positions input_pos [seq] -> logits [batch, seq, vocab];
        with `last_only`, the last position's alone [batch, 1, vocab]: prefill samples from it, so the
        head over the other prompt positions would be wasted work (a CPU's float32 prefill head)."""
        assert self.freqs_cis is not None and self.causal_mask is not None, "call setup_caches first"
        mask = self.causal_mask[None, None, input_pos]
        freqs_cis = self.freqs_cis[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs_cis, mask, input_pos)
        return self.output(self.norm(x[:, -1:] if last_only else x))


def _llama3_scale_freqs(freqs: Tensor, scaling: dict[str, float]) -> Tensor:
    """Llama-3.1 long-context RoPE: slow down low frequencies, keep high ones, blend in between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = ((old_len / wavelen) - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_len / low, freqs / factor, blended)
    return torch.where(wavelen < old_len / high, freqs, out)


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float,
                         scaling: dict[str, float] | None = None) -> Tensor:
    """[seq_len, head_dim/2, 2] cos/sin table, computed in float64 then stored in float32."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        freqs = _llama3_scale_freqs(freqs, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rotary_emb(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head; x [b, s, h, d], freqs [s, d/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                       xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)
