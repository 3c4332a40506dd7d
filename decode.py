"""The fused decode path: a decoder block's decode step in fewer kernels.

model.py stays the plain reference, and prefill always runs it. `install_fused_decode` packs the
projections and swaps each TransformerBlock for a DecodeBlock whose single-position steps run:
  qkv GEMV -> one attention op (RoPE, KV-cache write at p, split-KV attention over 0..p:
  ``teal::decode_attention_step``) -> o GEMV + residual (epilogue) -> gate|up GEMV ->
  down GEMV with SiLU(gate) * up in its prologue + residual (epilogue),
plus the two RMSNorms. On a CPU the float lm_head is packed too, so its decode call runs the same
C++ row kernel: oneDNN's bf16 product at one row read SmolLM2's 57 MB head at 12.6 GB/s, the row
kernel at 23.7 (benchmarks/bench_cpu_gemv.py); on CUDA cuBLAS reads it at the bandwidth and a
transposed copy would cost a GB on 8B models. The projections stay the block's PackedLinear
modules, so TEAL, the speed table's dense fallback and quantization apply unchanged, and module
names (so thresholds files) do not change. Where a projection runs dense in float through cuBLAS
(large matrices; small ones on CUDA take the preload GEMV, linear.py), the fusions are left to
torch/Inductor.

The two RMSNorms are handed to the q|k|v and gate|up projections. Where those run dense on CUDA
through the preload GEMV (small float matrices: SmolLM2), its prologue computes them: two kernels
fewer a layer (H200, SmolLM2-135M shape: 1501 -> 2080 tok/s, benchmarks/results/preload/).
The sparse GEMV's prologue computes them too where PackedLinear measured that faster (one row,
every format: int4-g128 + int8 head on the Llama-3-8B shape 316.0 -> 321.4 tok/s dense);
TEAL_FUSED_NORM=1 / 0 (read when the blocks are installed) forces it on / off for every format
(int4_mma, which has no norm prologue, excepted); elsewhere torch runs the norm first. Where the
projections on both sides of a norm run int4_mma (TEAL_INT4_MMA_NORM_STATS, on by default) or bf16_mma
(TEAL_BF16_MMA=1, off by default: a bf16 model's dense calls), the norm runs in no kernel: the
projection before it (o; the previous block's down, through this block's buffers) writes its input
times the norm's weight and the sums of squares, and the one after (gate|up; q|k|v) scales its
product by 1 / rms. A sparse call of our kernel before it gives them too (linear.SPARSE_NORM_STATS_ENV,
on by default: at 50% down is sparse).

A step of 2..MAX_BATCH positions (speculation's verify, a short prefill) runs the attention op
once a position, in order, instead of model.py's attention over all of them: each position's
attention is then the decode step's own, and with projections whose rows do not depend on the rows
beside them (cuBLAS on the H200 and the CPU kernel, benchmarks/batch_rows.py; our Triton kernel's
do) a greedy verify rounds as plain decoding does. On the CPU that made self-speculation's text
plain greedy's again (model.py's verify parted from it after ~25 tokens, compiled, SmolLM2) and
faster (30.7 vs 25.1 tok/s); on the H200 too its text is plain greedy's, and its verify step costs
what model.py's does (5.3 ms, Llama-3-8B shape, K = 4: benchmarks/results/verify_h200/).
TEAL_POSITIONWISE_VERIFY=0 brings back model.py's verify.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch import Tensor

from teal_kernels import MAX_BATCH
from teal_kernels.ops import decode_attention_step
from teal_kernels.reference import KERNEL_DTYPES, SHORT_TILES_ENV
from linear import (PackedLinear, attach_bf16_mma, attach_bf16_scales, attach_int4pack, env_switch, pack_model,
                    packed_projections, swap_module)
from model import TransformerBlock

FUSED_NORM_ENV = "TEAL_FUSED_NORM"
POSITIONWISE_ENV = "TEAL_POSITIONWISE_VERIFY"


class DecodeBlock(TransformerBlock):
    """TransformerBlock whose decode steps (one position per sequence) take the fused ops."""

    _previous: DecodeBlock | None = None  # link_statistics' neighbours (instance attributes once linked)
    _next: DecodeBlock | None = None

    def __init__(self, reference: TransformerBlock) -> None:
        nn.Module.__init__(self)  # the reference's submodules, not new ones
        self.attention, self.feed_forward = reference.attention, reference.feed_forward
        self.attention_norm, self.ffn_norm = reference.attention_norm, reference.ffn_norm
        # None: PackedLinear decides per format; a bad value fails here, not mid-decode
        self.fuse_norms = env_switch(FUSED_NORM_ENV) if FUSED_NORM_ENV in os.environ else None
        self.positionwise = env_switch(POSITIONWISE_ENV, default="1")
        env_switch(SHORT_TILES_ENV)  # read by the attention launcher at capture; a bad value fails here too

    def _project(self, linear: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
        """linear(norm(x)), the norm handed to the projection, which decides where it runs."""
        return linear(x, norm=norm, norm_in_sparse_kernel=self.fuse_norms)

    def link_statistics(self, previous: DecodeBlock) -> None:
        """Let the previous block's down projection hand this block's q|k|v the attention norm's input
        and statistics (PackedLinear.product_with_norm_stats) through two buffers of this block, where
        q|k|v runs int4_mma with the statistics' switch and down gives them (takes_statistics). The blocks
        know each other as plain attributes, not submodules (module names, so thresholds files, stay as
        they are)."""
        dim, weight = self.attention_norm.weight.shape[0], self.attention_norm.weight
        self.register_buffer("attention_norm_scaled", weight.new_zeros(MAX_BATCH, dim), persistent=False)
        self.register_buffer("attention_norm_sumsq", weight.new_zeros(MAX_BATCH, dim // 16, dtype=torch.float32),
                             persistent=False)
        self.__dict__["_previous"], previous.__dict__["_next"] = previous, self

    def takes_statistics(self, x: Tensor) -> bool:
        """Whether this decode step's q|k|v takes its norm from the previous block's down projection
        (link_statistics): q|k|v runs int4_mma for x's rows with the statistics' switch, and the previous
        down gives them (int4_mma's epilogue, or a sparse call's: TEAL_SPARSE_NORM_STATS)."""
        previous = self._previous
        return (previous is not None and previous.feed_forward.w2.gives_norm_stats(x)
                and self.attention.wqkv.takes_norm_stats(x))

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor, input_pos: Tensor) -> Tensor:
        att = self.attention
        bsz, seqlen, _ = x.shape
        if att.kv_cache is None or not (seqlen == 1 or (self.positionwise and seqlen <= MAX_BATCH)):
            return super().forward(x, freqs_cis, mask, input_pos)
        if self.takes_statistics(x):  # the previous block's down wrote them
            rows = bsz * seqlen
            qkv = att.wqkv(self.attention_norm_scaled[:rows].view(x.shape), norm=self.attention_norm,
                           norm_stats=self.attention_norm_sumsq[:rows])
        else:
            qkv = self._project(att.wqkv, self.attention_norm, x)
        caches = (att.kv_cache.k_cache, att.kv_cache.v_cache)
        if seqlen == 1 and att.wo.takes_attention(qkv.view(bsz, -1), caches[0], att.n_head):
            # o's GEMV computes the attention itself: no attention launches (short caches)
            h = att.wo.attention_product(qkv.view(bsz, -1), freqs_cis[0].reshape(-1, 2), *caches, input_pos,
                                         att.n_head, x.view(bsz, -1)).view(x.shape)
            return self._feed_forward(h, h, None)
        # one attention step a position, in order: each position's attention is the decode step's
        steps = [decode_attention_step(qkv[:, i].contiguous(), freqs_cis[i].reshape(-1, 2), *caches,
                                       input_pos[i:i + 1], att.n_head) for i in range(seqlen)]
        y = steps[0] if seqlen == 1 else torch.stack(steps, dim=1)  # a decode step: no copy
        y = y.view(bsz, seqlen, att.n_head * att.head_dim)
        if att.wo.gives_norm_stats(y) and self.feed_forward.w13.takes_norm_stats(x):
            # gate|up on int4_mma: o's epilogue gives ffn_norm's input and statistics, no norm kernel
            h, scaled, sumsq = att.wo.product_with_norm_stats(y, x, self.ffn_norm)
            return self._feed_forward(h, scaled, sumsq)
        h = att.wo(y, residual=x)
        return self._feed_forward(h, h, None)

    def _feed_forward(self, h: Tensor, ff_in: Tensor, sumsq: Tensor | None) -> Tensor:
        """h + w2(SiLU(gate) * up) of w13(ffn_norm(h)); ff_in is h, or with sumsq (product_with_norm_stats)
        h * ffn_norm.weight and h's statistics, which w13's int4_mma turns into the norm. Where the next
        block takes_statistics, w2 writes its attention norm's into that block's buffers."""
        ff = self.feed_forward
        kw = dict(norm=self.ffn_norm, norm_in_sparse_kernel=self.fuse_norms, norm_stats=sumsq)
        gates = ff.w13.gates_in_epilogue(h)  # int4_mma's paired copy: SiLU(gate) * up from gate|up's kernel
        down_in = ff.w13(ff_in, gate_product=True, **kw) if gates else ff.w13(ff_in, **kw)
        following = self._next
        if following is not None and following.takes_statistics(h):
            rows = h.numel() // h.shape[-1]
            into = (following.attention_norm_scaled[:rows], following.attention_norm_sumsq[:rows])
            return ff.w2.product_with_norm_stats(down_in, h, following.attention_norm, not gates, into)[0]
        return ff.w2(down_in, gated=not gates, residual=h)


def install_fused_decode(model: nn.Module) -> nn.Module:
    """Pack the projections (and a CPU model's float lm_head), give int4 ones on CUDA their dense copy
    (linear.attach_int4pack) and, unless TEAL_INT4_BF16_SCALES=0, packed bf16 scales (linear.attach_bf16_scales),
    let bf16 ones on CUDA run dense calls on tensor cores with TEAL_BF16_MMA=1 (linear.attach_bf16_mma), and
    swap every block for a DecodeBlock (idempotent)."""
    pack_model(model)
    attach_int4pack(model)
    attach_bf16_scales(model)
    attach_bf16_mma(model)
    for i, layer in enumerate(model.layers):
        if type(layer) is TransformerBlock:
            swap_module(model, f"layers.{i}", DecodeBlock(layer))
    if any(m.mma_norm_stats for m in packed_projections(model).values()):
        for previous, block in zip(model.layers, model.layers[1:]):
            if "_previous" not in block.__dict__:
                block.link_statistics(previous)
    head = model.output
    if type(head) is nn.Linear and head.weight.device.type == "cpu" and head.weight.dtype in KERNEL_DTYPES:
        swap_module(model, "output", PackedLinear.from_linear(head))  # a copy: a tied table stays the embedding's
    return model
