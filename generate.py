"""Generate text with a Llama-family checkpoint, dense or TEAL-sparse, and report decode speed.

gpt-fast conventions: static KV cache, prefill then a token-by-token decode that can be compiled
(`--compile`: `torch.compile(fullgraph=True)`, CUDA graphs on GPUs). `--sparsity 0 0.5` runs the same
prompt dense and sparse and prints the two side by side. Under `torchrun --nproc_per_node N` the
model is split over the N processes (tensor parallelism, tp.py; one GPU each, or gloo on the CPU);
rank 0 prints.
"""
from __future__ import annotations

import os

# Compiled CPU decode alternates Inductor's OpenMP kernels with oneDNN matmuls; OpenMP workers
# that spin after each kernel starve the matmul threads (measured on 2 busy cores: 0.7 tok/s
# spinning vs 20.6 passive). Only takes effect if set before torch loads OpenMP. On an idle host
# spinning is faster (bf16 dense 26.6 -> 41.2 tok/s, docs/cpu/README.md): set OMP_WAIT_POLICY=ACTIVE.
# The C++ decode kernel (teal_kernels/cpu.py) has its own briefly spinning threads, which gain most of
# that without the collapse on a busy host; with ACTIVE it uses OpenMP's threads instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

# cli before torch: a Ctrl-C during the slow imports below is then one line too (cli.py)
from cli import (DEFAULT_CHECKPOINT, FRACTION, NON_NEGATIVE, ArgumentParser, UserError, float_in,
                 int_at_least, run_main)

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

import tp
from checkpoint import load_config, load_model, resolve_checkpoint
from decode import install_fused_decode
from linear import QuantConfig, env_switch, packed_projections, segments
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, chat_template, load_tokenizer, render_chat

if TYPE_CHECKING:
    from teal.sparsify import TealState

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Sampling and the decode loop
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None


def probabilities(logits: Tensor, s: Sampling) -> Tensor:
    """The sampling distribution [..., vocab] of logits [..., vocab] (temperature > 0): temperature,
    then top-k, then top-p."""
    logits = logits.float() / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def argmax_last(values: Tensor, chunk: int = 1024) -> Tensor:
    """values.argmax(-1, keepdim=True) for [batch, vocab] values, as two reductions: the maximum of
    each chunk of `chunk` entries, then the best chunk. Inductor runs an argmax over a 128K
    vocabulary as one program (28.9 us of a Llama-3-8B decode step on the H200, 2026-12-02);
    chunks spread it over the GPU. The same index, ties included: each step keeps the first
    maximum, so the best chunk's first maximum is the first overall."""
    rows, n = values.shape
    pad = -n % chunk
    if pad:
        values = torch.nn.functional.pad(values, (0, pad), value=float("-inf"))
    best, where = values.view(rows, -1, chunk).max(-1)
    block = best.argmax(-1, keepdim=True)
    return block * chunk + where.gather(-1, block)


def sample(logits: Tensor, s: Sampling) -> Tensor:
    """Next token ids [batch, 1] from last-position logits [batch, vocab], without a host sync."""
    if s.temperature <= 0:
        return argmax_last(logits)
    probs = probabilities(logits, s)
    # argmax(p / E) with E ~ Exp(1) draws from p (exponential race), with no multinomial sync.
    race = torch.empty_like(probs).exponential_(1)
    return argmax_last(probs / race)


def prefill(model: Transformer, idx: Tensor, input_pos: Tensor, s: Sampling) -> Tensor:
    return sample(model(idx, input_pos, last_only=True)[:, -1], s)


def decode_one_token(model: Transformer, token: Tensor, input_pos: Tensor, s: Sampling) -> Tensor:
    return sample(model(token, input_pos)[:, -1], s)


@dataclass
class Sample:
    tokens: list[int]
    prompt_len: int
    ttft_s: float  # prefill + first token
    decode_s: float  # the remaining tokens

    @property
    def new_tokens(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def decode_tok_s(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ensure_caches(model: Transformer, total: int) -> None:
    """A batch-1 KV cache of at least `total` positions, grown in steps of 256 so that cache shapes
    (and so compiled graphs) stay the same across calls of similar length. Calibration may have
    left caches of another batch size."""
    if model.max_seq_length < total or model.max_batch_size != 1:
        model.setup_caches(1, min(-(-max(total, model.max_seq_length) // 256) * 256, model.config.block_size))


class TokenReader:
    """Brings decoded tokens to the host a few steps behind the GPU.

    Reading a token with int() right after its step would make the host wait for the GPU every
    step, and the GPU then waits for the host to launch the next one (measured: 170 vs 213 tok/s on
    Llama-3-8B). Instead each step's token is copied into pinned memory behind an event, and the
    host reads step i only after it has launched steps up to i + DEPTH - 1. On the CPU there is
    nothing to overlap. After an EOS the DEPTH - 1 steps launched behind it are wasted: the real
    SmolLM2-135M on the H200 decoded a 74-token answer at 2042 tok/s with DEPTH 3 and 2069-2074 with 2,
    a 256-token one at 2110 and 2095 (benchmarks/results/real_generate/).
    """

    DEPTH = 2  # steps launched but not yet read

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: deque[tuple[Tensor, torch.cuda.Event | None]] = deque()
        slots = self.DEPTH + 1 if self.cuda else 0
        self.ring = [(torch.empty(1, dtype=torch.long, pin_memory=True), torch.cuda.Event()) for _ in range(slots)]
        self.next_slot = 0

    def push(self, token: Tensor) -> None:
        if not self.cuda:
            self.pending.append((token, None))
            return
        buf, event = self.ring[self.next_slot]
        self.next_slot = (self.next_slot + 1) % len(self.ring)
        buf.copy_(token.view(-1), non_blocking=True)
        event.record()
        self.pending.append((buf, event))

    def full(self) -> bool:
        return len(self.pending) >= self.DEPTH

    def pop(self) -> int:
        value, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        return int(value.view(-1)[0])


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, s: Sampling,
             decode_fn=decode_one_token, prefill_fn=prefill, eos_ids: set[int] = frozenset(),
             on_token=None) -> Sample:
    """Greedy/sampled continuation of one prompt; stops at EOS or after max_new_tokens.

    The decode loop keeps steps in flight on the GPU (TokenReader), so after an EOS up to
    TokenReader.DEPTH - 1 extra steps may have been computed; they are discarded.
    """
    device = model.norm.weight.device
    total = len(prompt) + max_new_tokens
    ensure_caches(model, total)
    t0 = time.perf_counter()
    idx = torch.tensor([prompt], device=device)
    token = prefill_fn(model, idx, torch.arange(len(prompt), device=device), s).clone()
    out = list(prompt) + [int(token)]
    t1 = time.perf_counter()
    if on_token:
        on_token(out)
    input_pos = torch.tensor([len(prompt)], device=device)
    reader = TokenReader(device)
    while out[-1] not in eos_ids:
        can_launch = len(out) + len(reader.pending) < total
        if can_launch:
            # clone: under CUDA graphs the next replay overwrites the step's output buffer
            token = decode_fn(model, token, input_pos, s).clone()
            input_pos += 1
            reader.push(token)
            if not reader.full():
                continue
        if not reader.pending:
            break
        out.append(reader.pop())
        if on_token:
            on_token(out)
    _sync(device)
    t2 = time.perf_counter()
    return Sample(out, len(prompt), t1 - t0, t2 - t1)


# ---------------------------------------------------------------------------------------------
# Self-speculative decoding: the model's own TEAL-sparse copy drafts, the model verifies
# ---------------------------------------------------------------------------------------------
#
# Each cycle the draft (the same weights and KV cache, thresholds at the draft sparsity) decodes K
# tokens one by one; then the target (the model at its own setting, dense by default) runs the last
# accepted token and the K drafts as one forward of K + 1 positions. The longest prefix of drafts
# the target agrees with is kept, plus one token of the target's own: a cycle yields 1 to K + 1
# tokens for K sparse steps and one verify step.
#
# Lossless: greedy output is the target's greedy output (a draft is kept only if it is the
# target's argmax; the verify step's K + 1-row products may round differently from one-row decode
# steps, as in any batched verification); sampling keeps the target's distribution (speculative
# rejection sampling: keep draft d with probability min(1, p(d) / q(d)), else draw from
# max(0, p - q) renormalised).
#
# The KV cache needs no rollback: the verify forward rewrites positions p..p+K with the target's
# keys and values, so every position before the next token holds what plain decoding writes;
# later positions are stale until the next cycle writes them, and the causal mask hides them.

@dataclass
class SpeculationStats:
    """What a speculative run did: cycles, drafted and accepted tokens, time in each phase."""

    verifies: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_verify(self) -> float:
        """Mean tokens a cycle yields: the accepted drafts plus the target's own token."""
        return (self.accepted + self.verifies) / self.verifies if self.verifies else float("nan")

    def as_dict(self) -> dict:
        return {"verifies": self.verifies, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "tokens_per_verify": self.tokens_per_verify,
                "draft_ms_per_token": 1e3 * self.draft_s / max(self.drafted, 1),
                "verify_ms": 1e3 * self.verify_s / max(self.verifies, 1)}


class PhaseClock:
    """Times the draft and verify phases of each cycle without making the host wait: on a GPU the
    marks are CUDA events on the stream (a phase's time is the GPU's, waits for the host
    included), read once after the run; on the CPU they are wall-clock readings."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.phases: list[tuple] = []  # (start, middle, end) marks of each cycle

    def mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a: torch.cuda.Event | float, b: torch.cuda.Event | float) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def totals(self) -> tuple[float, float]:
        """(draft, verify) seconds summed over the cycles; call after the device has finished."""
        return (sum(self.seconds(a, b) for a, b, _ in self.phases),
                sum(self.seconds(b, c) for _, b, c in self.phases))


def logits_step(model: Transformer, tokens: Tensor, input_pos: Tensor) -> Tensor:
    """Logits [positions, vocab] of one sequence: a draft step (one token) or a verify step."""
    return model(tokens, input_pos)[0]


class CapturedSteps:
    """Decode, draft and verify steps as CUDA graphs of our own: one graph per (model, positions,
    fixed arguments) captured at the first call and replayed, the inputs copied into its fixed
    buffers.

    Speculation syncs with the host once a cycle (the number of accepted drafts decides what comes
    next), and the GPU then idles until the host has launched the next step. Through torch.compile's
    CUDA graphs (mode="reduce-overhead") that launch took long enough to cost drafting 4.1 ms a
    token against 3.2 for a plain step (H200, Llama-3-8B shape, 50%); a replay of a graph captured
    here costs the host ~7 us (SmolLM2 shape: benchmarks/results/host_overhead/), and the 8B shape's
    speculation went from 201.7 to 223.7 tok/s (benchmarks/results/spec_captured.md). A graph is
    captured again when the model's caches were reallocated (setup_caches): it holds their addresses."""

    def __init__(self, step: Callable) -> None:
        self.step = step  # compiled without CUDA graphs
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, model: Transformer, tokens: Tensor, input_pos: Tensor, *fixed) -> Tensor:
        """step(model, tokens, input_pos, *fixed); `fixed` (e.g. the Sampling) is part of the
        graph: another value captures another graph."""
        key = (id(model), tokens.shape[-1], fixed)  # fixed values are hashable (Sampling is frozen)
        entry = self.graphs.get(key)
        if entry is None or entry[0] is not model.freqs_cis:
            entry = self.graphs[key] = self._capture(model, tokens, input_pos, fixed)
        _, graph, static_tokens, static_pos, out = entry
        static_tokens.copy_(tokens)
        static_pos.copy_(input_pos)
        graph.replay()
        return out  # overwritten by the next replay: callers clone what they keep

    def _capture(self, model: Transformer, tokens: Tensor, input_pos: Tensor, fixed: tuple) -> tuple:
        static_tokens, static_pos = tokens.clone(), input_pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up outside the capture (it writes what the replay rewrites)
            self.step(model, static_tokens, static_pos, *fixed)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(model, static_tokens, static_pos, *fixed)
        return model.freqs_cis, graph, static_tokens, static_pos, out


def accept(drafts: Tensor, draft_probs: Tensor | None, target_logits: Tensor, s: Sampling) -> tuple[int, Tensor]:
    """(number of drafts kept, the target's next token [1]) for drafts [K], their draft
    distributions [K, V] (None when greedy) and the target's logits [K + 1, V]."""
    k = drafts.numel()
    if s.temperature <= 0:
        best = target_logits.argmax(-1)
        kept = int((drafts == best[:k]).long().cumprod(0).sum())
        return kept, best[kept:kept + 1]
    p = probabilities(target_logits, s)
    rows = torch.arange(k, device=drafts.device)
    p_d, q_d = p[rows, drafts], draft_probs[rows, drafts]
    keep = torch.rand(k, device=drafts.device) * q_d <= p_d  # u < p/q without dividing by q = 0
    kept = int(keep.long().cumprod(0).sum())
    if kept == k:
        residual = p[k]
    else:
        residual = (p[kept] - draft_probs[kept]).clamp(min=0)
        residual = residual / residual.sum()
    return kept, torch.multinomial(residual, 1)


@torch.no_grad()
def speculative_generate(model: Transformer, prompt: list[int], max_new_tokens: int, s: Sampling, k: int,
                         draft: TealState, target: TealState, eos_ids: set[int] = frozenset(),
                         on_token=None, draft_fn: Callable = logits_step, verify_fn: Callable = logits_step,
                         draft_model: Transformer | None = None) -> tuple[Sample, SpeculationStats]:
    """Continue `prompt` with the target model's output, drafting `k` tokens per cycle.

    `draft` and `target` are TEAL settings (TealState.of): of the one model (self-draft), or of
    `draft_model` and the model when a separate, smaller model drafts (gpt-fast's way: it keeps
    its own KV cache, filled by its own prefill). `draft_fn` and `verify_fn` may be compiled
    versions of logits_step (the draft with one token, the verify with k + 1: fixed shapes, so
    CUDA graphs apply).
    """
    if k < 1:
        raise ValueError(f"speculation needs k >= 1 drafted tokens per cycle, got {k}")
    device = model.norm.weight.device
    drafter = draft_model or model
    total = len(prompt) + max_new_tokens
    for m in {id(model): model, id(drafter): drafter}.values():
        ensure_caches(m, total + k + 1)  # the last cycle may draft past the end
    stats = SpeculationStats()
    t0 = time.perf_counter()
    idx = torch.tensor([prompt], device=device)
    if draft_model is not None:
        draft.restore()
        prefill(draft_model, idx, torch.arange(len(prompt), device=device), s)  # its cache, its token unused
    target.restore()
    token = prefill(model, idx, torch.arange(len(prompt), device=device), s).view(1)
    out = list(prompt) + [int(token)]
    t1 = time.perf_counter()
    if on_token:
        on_token(out)
    pos = len(prompt)  # position of `token`, not yet in the cache
    unseen = None  # a separate draft's last draft when all were kept: never fed to it, so not in its cache
    clock = PhaseClock(device)
    while out[-1] not in eos_ids and len(out) < total:
        start = clock.mark()
        draft.restore()
        # Positions are filled on the device (torch.full, torch.arange): torch.tensor([pos],
        # device=...) is a blocking copy from pageable memory that waits for the GPU to drain, once
        # per draft step (H200: a draft step cost 2.6 ms inside this loop on SmolLM2 against 1.1
        # for a plain step, 4.9 against 3.8 on the Llama-3-8B shape; the fix is not yet timed)
        if unseen is not None:
            draft_fn(drafter, unseen, torch.full((1,), pos - 1, device=device))
        drafts, draft_probs, current = [], [], token.view(1, 1)
        for i in range(k):
            # clone(), as the plain loop does: the next CUDA-graph replay overwrites the output
            logits = draft_fn(drafter, current, torch.full((1,), pos + i, device=device)).clone()
            if s.temperature <= 0:
                current = logits.argmax(-1, keepdim=True)
            else:
                q = probabilities(logits, s)
                draft_probs.append(q[0])
                current = torch.multinomial(q, 1)
            drafts.append(current.view(1))
        drafts_t = torch.cat(drafts)
        middle = clock.mark()  # no host sync here: the verify step queues behind the drafts
        target.restore()
        seq = torch.cat([token.view(1), drafts_t]).view(1, -1)
        target_logits = verify_fn(model, seq, torch.arange(pos, pos + k + 1, device=device)).clone()
        kept, token = accept(drafts_t, torch.stack(draft_probs) if draft_probs else None, target_logits, s)
        clock.phases.append((start, middle, clock.mark()))
        stats.verifies += 1
        stats.drafted += k
        stats.accepted += kept
        for t in drafts_t[:kept].tolist() + [int(token)]:
            if len(out) >= total or out[-1] in eos_ids:
                break
            out.append(t)
        if on_token:
            on_token(out)
        pos += kept + 1
        # self-draft: the verify step wrote every position into the shared cache
        unseen = drafts_t[-1:].view(1, 1) if draft_model is not None and kept == k else None
    _sync(device)
    t2 = time.perf_counter()
    stats.draft_s, stats.verify_s = clock.totals()
    return Sample(out, len(prompt), t1 - t0, t2 - t1), stats


# The plain decode step on CUDA: replayed from CapturedSteps' graph (host ~7 us a step) instead of
# torch.compile's CUDA graphs (mode="reduce-overhead", host ~340 us a step on the SmolLM2 shape,
# benchmarks/results/host_overhead/), which a ~480 us step (SmolLM2 since the preload GEMV) nearly
# reaches; TEAL_CAPTURED_DECODE=0 brings torch.compile's back.
CAPTURED_DECODE_ENV = "TEAL_CAPTURED_DECODE"


def compile_steps(device: torch.device, compile_prefill: bool, cpp_wrapper: bool = False):
    """Compiled decode (and optionally prefill) steps; CUDA graphs on GPUs. `cpp_wrapper` (CPU):
    Inductor also compiles the decode step's glue, which calls its ~300 kernels, into C++ instead
    of Python. SmolLM2 greedy on a 2-core VM, generate()'s loop, both ways alternating in one
    process, two runs: 40% sparse 39.5 -> 45.9 and 41.2 -> 43.6 tok/s, dense unchanged (33.2 /
    33.7, 37.9 / 38.1; docs/cpu/cpp_wrapper/); a first compile (empty Inductor cache) took 118 s
    instead of 60 s.
    Off by default."""
    captured = env_switch(CAPTURED_DECODE_ENV, default="1")  # read on every device: a bad value is an error
    if device.type == "cuda" and captured:
        decode = CapturedSteps(torch.compile(decode_one_token, fullgraph=True))
    elif device.type == "cuda":
        decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
    else:
        decode = torch.compile(decode_one_token, fullgraph=True, options={"cpp_wrapper": True} if cpp_wrapper else None)
    pre = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return decode, pre


def weight_bytes_per_token(model: Transformer, skipped_fraction: float = 0.0) -> float:
    """Bytes read per decode step: every weight but the embedding table (one row is gathered);
    `skipped_fraction` of the decoder projections' bytes are not read under TEAL. A sharded model:
    what all ranks read (each holds an equal shard and a whole copy of the replicated weights)."""
    embed = model.tok_embeddings.weight
    # an int4 layer's dense copy (tinygemm's or int4_mma's) stands in for its own weights on dense calls:
    # count one of the two
    not_weights = {id(t) for m in packed_projections(model).values()
                   for t in (m.int4pack_weight, m.int4pack_scales_zeros, m.int4mma_words, m.int4mma_scales,
                             m.int4mma_zeros)
                   if t is not None}
    # activations, not weights: the fused step's hand-over of a norm's statistics (decode.link_statistics)
    not_weights |= {id(getattr(layer, name)) for layer in model.layers
                    for name in ("attention_norm_scaled", "attention_norm_sumsq") if hasattr(layer, name)}
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if t is not embed and t.dim() >= 2 and not _is_cache(t, model) and id(t) not in not_weights)
    if model.output.weight is embed:  # the tied lm_head is read in full
        total += embed.numel() * embed.element_size()
    proj = sum(m.weight.numel() * m.weight.element_size() for m in packed_projections(model).values())
    return (total - skipped_fraction * proj) * tp.world_size(model)


def _is_cache(t: Tensor, model: Transformer) -> bool:
    return any(t is layer.attention.kv_cache.k_cache or t is layer.attention.kv_cache.v_cache
               for layer in model.layers if layer.attention.kv_cache is not None)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--prompt", default="Hello, my name is",
                   help="text to continue (with --chat: the user message)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's own chat template (instruct models)")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from standard input until an empty line or EOF")
    p.add_argument("--num_samples", type=int_at_least(1), default=1, help="samples to generate per setting")
    p.add_argument("--max_new_tokens", type=int_at_least(1), default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=NON_NEGATIVE, default=0.8, help="sampling temperature; 0 = greedy")
    p.add_argument("--top_k", type=int_at_least(1), default=200, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float_in(0, 1, low_open=True), default=None,
                   help="nucleus sampling mass, in (0, 1] (off by default)")
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    p.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                   help="converted checkpoint folder or its .safetensors file")
    p.add_argument("--random_weights", metavar="MODEL_NAME",
                   help="no checkpoint: random weights at a named shape (e.g. Llama-3-8B), for speed tests; "
                        "--sparsity then calibrates thresholds on the model's own activations")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16", help="compute/weight dtype")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (torch.compile fullgraph; CUDA graphs on GPUs); sparse "
                        "text may then part from eager after some tokens, at threshold ties (README)")
    p.add_argument("--cpp_wrapper", action="store_true",
                   help="with --compile on a CPU: the compiled decode step's glue in C++ too (torch's "
                        "cpp_wrapper; plain decoding, not --speculate_k). SmolLM2 on 2 cores: 6-16%% faster "
                        "at 40%% sparsity, dense unchanged (docs/cpu/cpp_wrapper/); the first compile took 118 s "
                        "instead of 60 s")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill (dynamic shapes)")
    p.add_argument("--decode_path", choices=["auto", "reference", "fused"], default="auto",
                   help="model.py's decode step, or decode.py's fused one (one attention op, GEMV "
                        "prologue/epilogue fusions). auto: fused, dense and sparse, on GPUs and CPUs (faster on "
                        "both: benchmarks/results/decode_llama3_8b_slot_x.md, docs/cpu/), also for "
                        "--speculate_k's drafts and verify (fused: the verify's attention once a position, as "
                        "plain decoding's; docs/speculative/); model.py's under torchrun")
    p.add_argument("--sparsity", type=FRACTION, nargs="+", default=[0.0],
                   help="TEAL sparsity level(s) in [0, 1); several values run the same prompt at each")
    p.add_argument("--thresholds", type=Path, default=None,
                   help="calibrated thresholds file from calibrate.py (default: <checkpoint>/teal_thresholds.safetensors)")
    p.add_argument("--allocation", choices=["uniform", "greedy"], default="uniform",
                   help="how sparsity is split between projections (see calibrate.py)")
    p.add_argument("--sparse_prefill", action="store_true",
                   help="also sparsify the prompt tokens (decode is always sparse when sparsity > 0)")
    p.add_argument("--speculate_k", type=int_at_least(0), default=0,
                   help="speculative decoding: the draft (the model at --draft_sparsity, or "
                        "--draft_checkpoint_path) drafts this many tokens, the model at --sparsity verifies "
                        "them in one step (same output; 0 = off)")
    p.add_argument("--draft_sparsity", type=FRACTION, default=None,
                   help="TEAL sparsity of the self-draft with --speculate_k (the same weights, no second "
                        "model; default 0.5)")
    p.add_argument("--draft_checkpoint_path", type=Path, default=None,
                   help="with --speculate_k: a separate, smaller checkpoint with the same vocabulary drafts "
                        "(dense, its own KV cache) instead of the model's sparse self")
    args = p.parse_args(argv)
    if args.cpp_wrapper and not args.compile:
        p.error("--cpp_wrapper shapes the compiled decode step: add --compile")
    if args.cpp_wrapper and args.speculate_k:
        p.error("--cpp_wrapper applies to plain decoding; speculation's steps are not built with it")
    if args.draft_checkpoint_path is not None:
        if not args.speculate_k:
            p.error("--draft_checkpoint_path drafts for --speculate_k: give K too")
        if args.draft_sparsity is not None:
            p.error("--draft_sparsity sets the self-draft; a --draft_checkpoint_path draft runs dense")
    elif args.draft_sparsity is None:
        args.draft_sparsity = 0.5
    if args.speculate_k and args.draft_checkpoint_path is None and args.draft_sparsity <= max(args.sparsity):
        p.error(f"--draft_sparsity {args.draft_sparsity} must be above the target's --sparsity "
                f"{max(args.sparsity)}: the draft must be cheaper than the model it drafts for")
    return args


def decode_path(args: argparse.Namespace) -> str:
    """The decode path of a run: --decode_path, or for "auto" the one place that picks: the fused
    step, on GPUs and CPUs, dense and sparse (H200, Llama-3-8B shape: 219.8 tok/s dense against
    210.1 for model.py's nn.Linear, 292.2 at 50% against 272.6, results/decode_llama3_8b_slot_x.md;
    2-core CPU, SmolLM2 bf16 compiled, with the C++ kernel on both cores, two runs back to back:
    41.9 dense / 51.7 at 50% against model.py's 30.6 / 40.4, docs/cpu/paths_*). Speculation drafts on
    it too (H200, Llama-3-8B shape, K = 4, draft 50%: 223.7 tok/s against 197.5 drafting on
    model.py's step, docs/speculative/). Tensor parallelism keeps model.py's step (not yet timed
    with the fused one)."""
    if args.decode_path != "auto":
        return args.decode_path
    return "reference" if tp.launched() else "fused"


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available")
    return device


def random_model(name: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0) -> Transformer:
    """A model of a named shape with N(0, 0.02) weights: speed tests where real weights cannot go."""
    cfg = ModelArgs.from_name(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg).to(dtype)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def self_calibrated_thresholds(model: Transformer, level: float, tokens: int = 2048, seed: int = 0) -> dict:
    """Uniform TEAL thresholds for `level` from the model's own activations on random tokens.

    For random-weight models (no calibration text means anything to them): the realized sparsity is
    the one asked for, which is all a speed measurement needs.
    """
    from teal.calibration import input_histograms, thresholds_at
    from teal.sparsify import thresholds_from_vector
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(model.config.vocab_size, (max(1, tokens // 512), 512), generator=g)
    hist = input_histograms(model, windows, batch=4)
    return thresholds_from_vector(model, thresholds_at(model, hist, torch.full((len(segments(model)),), level)))


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[Transformer, Tokenizer | None]:
    dtype = DTYPES[args.dtype]
    if args.random_weights:
        try:
            return random_model(args.random_weights, dtype, device), None
        except ValueError as e:
            raise UserError(str(e)) from None
    # under torchrun every rank reads the whole checkpoint into host memory; only its shard goes to its device
    model = load_model(args.checkpoint_path, device="cpu" if tp.launched() else device, dtype=dtype)
    folder = args.checkpoint_path if args.checkpoint_path.is_dir() else args.checkpoint_path.parent
    return model, load_tokenizer(folder)


def thresholds_path(args: argparse.Namespace) -> Path:
    """The thresholds file --sparsity reads: --thresholds, else the checkpoint folder's."""
    folder = args.checkpoint_path if args.checkpoint_path.is_dir() else args.checkpoint_path.parent
    path = args.thresholds or folder / "teal_thresholds.safetensors"
    if not path.exists():
        raise UserError(f"no thresholds file at {path}: run calibrate.py first (see README)")
    return path


def check_tensor_parallel(args: argparse.Namespace, world: int) -> None:
    """Under torchrun with `world` processes: refuse, before loading any weight, a model they cannot
    split (config.json and the weights file's quantization record say) or a prompt on stdin."""
    if args.interactive:
        raise UserError("--interactive reads prompts from standard input: run it as one process, not under torchrun")
    if args.random_weights:
        cfg, quant = ModelArgs.from_name(args.random_weights), None
    else:
        folder, weights = resolve_checkpoint(args.checkpoint_path)
        try:
            with safe_open(str(weights), framework="pt") as f:
                quant = QuantConfig.from_metadata(f.metadata() or {}, weights)
        except SafetensorError:
            quant = None  # unreadable: load_model says why
        cfg = load_config(folder)
    tp.check_layout(cfg, world, quant.group_size if quant is not None and quant.mode == "int4" else 0)


def sparsity_levels(args: argparse.Namespace) -> list[float]:
    """Every TEAL level the run sets (the draft's included)."""
    self_draft = args.speculate_k and args.draft_checkpoint_path is None
    return sorted(set(args.sparsity) | ({args.draft_sparsity} if self_draft else set()))


def set_sparsity(model: Transformer, level: float, args: argparse.Namespace,
                 self_calibrated: dict[float, dict] | None = None) -> None:
    """Dense for level 0, else the calibrated thresholds for this level swapped in (random weights:
    those `self_calibrated` holds, calibrated on the whole model before sharding, else calibrated now)."""
    from teal import dense_fallbacks, densify, load_targets, load_thresholds, sparsify
    if level == 0.0:
        densify(model)
        return
    if args.random_weights:
        thresholds = self_calibrated[level] if self_calibrated else self_calibrated_thresholds(model, level)
        targets = {name: [level] * len(t) for name, t in thresholds.items()}
    else:
        path = thresholds_path(args)
        thresholds = load_thresholds(path, model, level, args.allocation)
        targets = load_targets(path, model, level, args.allocation)
    sparsify(model, thresholds, sparse_prefill=args.sparse_prefill, targets=targets)
    device = model.norm.weight.device
    slower, unmeasured, borrowed = dense_fallbacks(model, device)
    if slower:
        print(f"[sparsity {level:.2f}: {len(slower)} of {len(thresholds)} projections stay dense, where the "
              f"kernel is slower than dense (teal_kernels/speed_table.json, or the size model for unmeasured shapes)]",
              flush=True)
    if unmeasured:
        print(f"[sparsity {level:.2f}: {len(unmeasured)} projections have shapes the speed table has not "
              f"measured: decided by the size model (teal_kernels/speed_table.py; measure them with "
              f"benchmarks/bench_kernels.py --table)]", flush=True)
    if borrowed:
        print(f"[sparsity {level:.2f}: {len(borrowed)} projections were decided by another GPU's measurements "
              f"(this GPU's stand-in in teal_kernels/speed_table.py; measure them on {torch.cuda.get_device_name(device)} "
              f"with benchmarks/bench_kernels.py --table)]", flush=True)


def read_prompts() -> Iterator[str]:
    """--interactive: prompts typed on standard input, until an empty line or EOF."""
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return
        except UnicodeDecodeError:
            raise UserError("standard input is not UTF-8 text") from None
        if not text:
            return
        yield text


def encode_prompt(text: str, tok: Tokenizer | None, args: argparse.Namespace, vocab: int) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in argv or stdin arrive as lone surrogates
        raise UserError("the prompt is not UTF-8 text") from None
    if tok is None:  # random weights: a fixed pseudo-random prompt of the text's length
        g = torch.Generator().manual_seed(0)
        return torch.randint(vocab, (max(1, len(text.split())),), generator=g).tolist()
    if args.chat:
        template = chat_template(args.checkpoint_path if args.checkpoint_path.is_dir()
                                 else args.checkpoint_path.parent)
        if template is None:
            raise UserError("--chat: this checkpoint has no chat template")
        text = render_chat(template, [{"role": "user", "content": text}])
    ids = tok.encode(text)
    if tok.add_bos and tok.bos_id is not None:
        ids = [tok.bos_id] + ids
    if not ids:
        raise UserError("the prompt is empty: give some text to continue")
    return ids


class Streamer:
    """Prints the decoded continuation as it grows (decoding the whole tail keeps UTF-8 intact),
    without the end-of-sequence token that stops it (`<|im_end|>` ends every chat reply)."""

    def __init__(self, tok: Tokenizer, prompt_len: int) -> None:
        self.tok, self.prompt_len, self.printed = tok, prompt_len, ""

    def __call__(self, ids: list[int]) -> None:
        new = ids[self.prompt_len:]
        text = self.tok.decode(new[:-1] if new and new[-1] in self.tok.eos_ids else new)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def run(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    if tp.launched():
        check_tensor_parallel(args, tp.env_world_size())
    with tp.process_group(device) as device:
        return generate_all(args, device)


def generate_all(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Every prompt at every sparsity level, on this process's device (its shard under torchrun)."""
    torch.manual_seed(args.seed)
    if args.cpp_wrapper and device.type != "cpu":
        raise UserError("--cpp_wrapper is for CPU decoding (on a GPU the compiled step replays a CUDA graph)")
    model, tok = build_model(args, device)
    if decode_path(args) == "fused":  # before sharding
        install_fused_decode(model)
    # random weights: thresholds from the whole model's own activations (a shard sees a slice of o's and down's)
    self_calibrated = {level: self_calibrated_thresholds(model, level)
                       for level in sparsity_levels(args) if level > 0 and args.random_weights}
    if tp.launched():
        tp.shard_model(model).to(device)
    s = Sampling(args.temperature, args.top_k, args.top_p)
    decode, pre = (compile_steps(device, args.compile_prefill, args.cpp_wrapper) if args.compile
                   else (decode_one_token, prefill))
    eos = tok.eos_ids if tok else set()
    if max(args.sparsity) > 0 and not args.random_weights:  # a bad file fails before any generation
        from teal import load_thresholds
        load_thresholds(thresholds_path(args), model, max(args.sparsity), args.allocation)
    prompts = read_prompts() if args.interactive else [args.prompt]
    results = []
    for text in prompts:
        ids = encode_prompt(text, tok, args, model.config.vocab_size)
        if len(ids) + args.max_new_tokens > model.config.block_size:
            raise UserError(f"prompt ({len(ids)} tokens) + --max_new_tokens ({args.max_new_tokens}) "
                            f"exceeds the model's context of {model.config.block_size} tokens")
        ensure_caches(model, len(ids) + args.max_new_tokens)
        for level in args.sparsity:
            if args.speculate_k:
                results += run_speculative(model, ids, text, level, s, eos, tok, args, self_calibrated)
                continue
            set_sparsity(model, level, args, self_calibrated)
            if args.compile:  # warm-up: compilation (and CUDA-graph capture) out of the timing
                start = time.perf_counter()
                print(f"warming up the compiled decode at sparsity {level:.2f} (compiling takes about "
                      f"{'two minutes' if args.cpp_wrapper else 'a minute'} the first time) ...", end=" ",
                      file=sys.stderr, flush=True)
                generate(model, ids, min(args.max_new_tokens, 8), s, decode, pre)
                print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            for i in range(args.num_samples):
                header = f"[sparsity {level:.2f}, sample {i + 1}]"
                print(f"\n{header}\n{text if tok and not args.chat else ''}", end="", flush=True)
                stream = Streamer(tok, len(ids)) if tok else None
                res = generate(model, ids, args.max_new_tokens, s, decode, pre, eos, stream)
                results.append(report(model, res, level))
    if len(results) > 1:
        print_table(results)
    return results


def run_speculative(model: Transformer, ids: list[int], text: str, level: float, s: Sampling, eos: set[int],
                    tok: Tokenizer | None, args: argparse.Namespace,
                    self_calibrated: dict[float, dict] | None = None) -> list[dict]:
    """--speculate_k: the draft and target settings captured once, then each sample decoded
    speculatively, with the acceptance statistics in its report."""
    from teal.sparsify import TealState
    if len(ids) + args.max_new_tokens + args.speculate_k + 1 > model.config.block_size:
        raise UserError(f"prompt ({len(ids)} tokens) + --max_new_tokens ({args.max_new_tokens}) + --speculate_k "
                        f"({args.speculate_k}) + 1 exceeds the model's context of {model.config.block_size} tokens")
    draft_model = load_draft(args, model) if args.draft_checkpoint_path is not None else None
    if draft_model is not None and decode_path(args) == "fused":
        install_fused_decode(draft_model)
    if draft_model is not None and len(ids) + args.max_new_tokens + args.speculate_k + 1 > draft_model.config.block_size:
        raise UserError(f"prompt + --max_new_tokens + --speculate_k + 1 exceeds the draft's context of "
                        f"{draft_model.config.block_size} tokens")
    if draft_model is None:
        set_sparsity(model, args.draft_sparsity, args, self_calibrated)
    draft = TealState.of(draft_model or model)
    set_sparsity(model, level, args, self_calibrated)
    if level > 0:  # the verify step's K + 1 positions are decode tokens: every one sparse
        for m in packed_projections(model).values():
            m.sparse_prefill = True
    target = TealState.of(model)
    step = logits_step
    if args.compile:
        step = torch.compile(logits_step, fullgraph=True, dynamic=False)
        if model.norm.weight.device.type == "cuda":
            step = CapturedSteps(step)
        start = time.perf_counter()
        print(f"warming up the compiled draft and verify steps (K = {args.speculate_k}) ...", end=" ",
              file=sys.stderr, flush=True)
        speculative_generate(model, ids, min(args.max_new_tokens, 2 * args.speculate_k + 2), s, args.speculate_k,
                             draft, target, draft_fn=step, verify_fn=step, draft_model=draft_model)
        print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    drafting = (f"draft {args.draft_checkpoint_path.name}" if draft_model is not None
                else f"self-speculative: draft {args.draft_sparsity:.2f}")
    rows = []
    for i in range(args.num_samples):
        print(f"\n[sparsity {level:.2f}, {drafting}, K = {args.speculate_k}, "
              f"sample {i + 1}]\n{text if tok and not args.chat else ''}", end="", flush=True)
        stream = Streamer(tok, len(ids)) if tok else None
        res, stats = speculative_generate(model, ids, args.max_new_tokens, s, args.speculate_k, draft, target,
                                          eos, stream, draft_fn=step, verify_fn=step, draft_model=draft_model)
        target.restore()
        row = report(model, res, level)
        row["speculation"] = {"k": args.speculate_k, "draft_sparsity": args.draft_sparsity,
                              "draft_checkpoint": str(args.draft_checkpoint_path or ""), **stats.as_dict()}
        print(f"-- speculation: {stats.accepted}/{stats.drafted} drafts accepted ({stats.acceptance_rate:.0%}), "
              f"{stats.tokens_per_verify:.2f} tokens per verify, draft {row['speculation']['draft_ms_per_token']:.1f} "
              f"ms/token, verify {row['speculation']['verify_ms']:.1f} ms")
        rows.append(row)
    return rows


def load_draft(args: argparse.Namespace, model: Transformer) -> Transformer:
    """The --draft_checkpoint_path model on the target's device and dtype; its tokens must mean
    the target's: the same vocabulary size is required (the tokenizer itself is not compared)."""
    weight = model.norm.weight
    draft = load_model(args.draft_checkpoint_path, device=weight.device, dtype=weight.dtype)
    if draft.config.vocab_size != model.config.vocab_size:
        raise UserError(f"--draft_checkpoint_path {args.draft_checkpoint_path}: vocabulary of "
                        f"{draft.config.vocab_size} tokens, the model's has {model.config.vocab_size}: a draft "
                        "must share the model's tokenizer")
    return draft.eval()


def report(model: Transformer, res: Sample, level: float) -> dict:
    row = {"sparsity": level, "prompt_tokens": res.prompt_len, "new_tokens": res.new_tokens,
           "ttft_s": res.ttft_s, "decode_tok_s": res.decode_tok_s, "realized_sparsity": 0.0}
    if level > 0:
        seq = torch.tensor([res.tokens], device=model.norm.weight.device)
        row["realized_sparsity"] = tp.realized_sparsity(model, seq)["parameter_weighted"]
    row["gb_s"] = weight_bytes_per_token(model, row["realized_sparsity"]) * row["decode_tok_s"] / 1e9
    print(f"\n-- {row['new_tokens']} tokens, prompt {row['prompt_tokens']} tokens, time to first token "
          f"{row['ttft_s'] * 1000:.0f} ms, decode {row['decode_tok_s']:.1f} tok/s, "
          f"{row['gb_s']:.1f} GB/s of weights, realized sparsity {row['realized_sparsity']:.1%}")
    return row


def print_table(rows: list[dict]) -> None:
    spec = any("speculation" in r for r in rows)
    print("\n| sparsity | realized | decode tok/s | GB/s | TTFT ms | new tokens |" +
          (" draft | K | accepted | tokens / verify |" if spec else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|---|" if spec else ""))
    for r in rows:
        line = (f"| {r['sparsity']:.2f} | {r['realized_sparsity']:.1%} | {r['decode_tok_s']:.1f} | "
                f"{r['gb_s']:.1f} | {r['ttft_s'] * 1000:.0f} | {r['new_tokens']} |")
        if "speculation" in r:
            sp = r["speculation"]
            line += f" {sp['draft_sparsity']:.2f} | {sp['k']} | {sp['acceptance_rate']:.0%} | {sp['tokens_per_verify']:.2f} |"
        print(line)


if __name__ == "__main__":
    tp.print_from_rank_zero()
    run_main(lambda: run(parse_args()))
