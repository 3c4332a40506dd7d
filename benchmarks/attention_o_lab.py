"""Would computing o's attention inside o's GEMV pay? A lab measurement before building it.

In the fused decode step, attention takes two launches a layer (the split kernel and the combine
kernel), and o's GEMV then reads their output. Both ends are mostly fixed cost: in the int8 step at
50%, split + combine span 8.1 µs a layer against ~2 µs of K/V tiles (results/step_tune/). In the
idea, each o program owns one KV group's rows of W_o (GROUP heads x D rows). It computes that
group's attention over positions 0..p itself, rounds it to x's dtype as the unfused path does, and
multiplies it into its columns. The partials over the groups are summed by the last program to
arrive, as the production GEMV does. No attention launch, no combine launch, no x load. Every
column block repeats its group's attention, which reads the K/V from L2 after the first program.
This only pays at short contexts: the tiles are serial within a program.

The lab is the best case of that kernel: dense bf16 W_o (no thresholds, no compaction), q given
(no RoPE, no cache write), one row. It is timed against what the step runs today for the same
work: the attention op (split + combine) followed by o's product, by cuBLAS or by our GEMV kernel
at threshold 0. Each in one CUDA graph over `--layers` copies (distinct caches and weights, so L2
cannot hold them), µs per layer:

  fused            the lab kernel: attention inside the o product
  attention        teal::decode_attention alone (split + combine)
  attention + cuBLAS o / attention + our o
                   the two launches and the product, in one graph
  cuBLAS o, our o  the product alone

    python -m benchmarks.attention_o_lab --contexts 128 256 512 1024 --out benchmarks/results/attention_o_lab/lab
"""
from __future__ import annotations

import argparse
import datetime
import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from benchmarks.timing import graph_time_us
from files import write_report
from teal_kernels.attention_tiles import LOG2E, attend_tile, kv_tile
from teal_kernels.dequantize import _rounded
from teal_kernels.ops import decode_attention, sparse_gemv
from teal_kernels.triton_gemv import INTERPRETED, arrival_counters


@triton.jit
def _attention_o_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, res_ptr, out_ptr, part_ptr, counter_ptr,
    p, N, stride_kh, stride_ks, qk_scale_log2,
    H_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, PRELOAD_W: tl.constexpr,
    KV_STAGES: tl.constexpr,  # K/V tiles in flight (Triton's software pipeline) while one is attended
    DOT_FP32: tl.constexpr,  # the interpreter: fp32 dots, bf16 rounded on the bits
):
    """Program (column block n, KV group g): the group's attention over positions 0..p, then its
    GROUP x D rows of W_o^T times that attention output into columns [n * BLOCK_N, + BLOCK_N); the
    last of the H_KV programs of a column block sums their partials in order and adds the residual."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    rows = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if PRELOAD_W:  # the first head's weights do not depend on the attention: in flight during it
        w0 = tl.load(w_ptr + (g * GROUP * D + d)[:, None] * N + cols[None, :])
    q = tl.load(q_ptr + (g * GROUP + rows)[:, None] * D + d[None, :], mask=(rows < GROUP)[:, None], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + g * stride_kh
    v_base = v_ptr + g * stride_kh
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    for s0 in tl.range(0, p + 1, BLOCK_S, num_stages=KV_STAGES):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s <= p
        k, v = kv_tile(k_base, v_base, s, s_ok, d, stride_ks, 1, stride_ks, 1)
        m_i, l_i, acc = attend_tile(q, k, v, s_ok, m_i, l_i, acc, qk_scale_log2, DOT_FP32)
    o = _rounded(acc / l_i[:, None], w_ptr.dtype.element_ty, DOT_FP32)  # rounded as the unfused path's output
    if DOT_FP32:
        o = o.to(tl.float32)

    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for h in tl.static_range(GROUP):
        if PRELOAD_W and h == 0:
            w = w0
        else:
            w = tl.load(w_ptr + (g * GROUP * D + h * D + d)[:, None] * N + cols[None, :])
        if DOT_FP32:
            t = tl.dot(o, w.to(tl.float32), input_precision="ieee")
        else:
            t = tl.dot(o, w)
        y += tl.sum(tl.where((rows == h)[:, None], t, 0.0), axis=0)  # head h's row of the product

    tl.store(part_ptr + g * N + cols, y)
    tl.debug_barrier()  # every thread's partial precedes the release below
    ticket = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if ticket == H_KV - 1:
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in range(0, H_KV):
            total += tl.load(part_ptr + j * N + cols, cache_modifier=".cg")
        result = _rounded(total, out_ptr.dtype.element_ty, DOT_FP32)
        res = tl.load(res_ptr + cols).to(tl.float32)
        tl.store(out_ptr + cols, _rounded(result.to(tl.float32) + res, out_ptr.dtype.element_ty, DOT_FP32))
        tl.store(counter_ptr + pid_n, 0)  # ready for the next call


def attention_o(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: int, w_t: torch.Tensor,
                residual: torch.Tensor, block_n: int = 64, block_s: int = 64, preload_w: bool = True,
                num_warps: int = 4, kv_stages: int = 1) -> torch.Tensor:
    """out [N] = attention(q [H, D] over k/v_cache [Hkv, S, D] at positions 0..p) flattened, rounded
    to w_t's dtype, @ w_t [H * D, N] (rounded), + residual [N] (in x's dtype, as the unfused path)."""
    h, d = q.shape
    h_kv, s_max, _ = k_cache.shape
    n = w_t.shape[1]
    if w_t.shape[0] != h * d or h % h_kv or n % block_n or not 0 <= p < s_max:
        raise ValueError(f"attention_o: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}, w_t {tuple(w_t.shape)}, "
                         f"p {p}, block_n {block_n} do not fit")
    group = h // h_kv
    grid_n = n // block_n
    counters = arrival_counters(q.device)
    if grid_n > counters.numel():
        raise ValueError(f"attention_o: {grid_n} column blocks need more than {counters.numel()} counters")
    out = torch.empty(n, dtype=w_t.dtype, device=q.device)
    part = torch.empty(h_kv, n, dtype=torch.float32, device=q.device)
    _attention_o_kernel[(grid_n, h_kv)](
        q, k_cache, v_cache, w_t, residual, out, part, counters,
        p, n, k_cache.stride(0), k_cache.stride(1), LOG2E / math.sqrt(d),
        H_KV=h_kv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=d,
        BLOCK_S=block_s, BLOCK_N=block_n, PRELOAD_W=preload_w, KV_STAGES=kv_stages, DOT_FP32=INTERPRETED,
        num_warps=num_warps)
    return out


def unfused_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: int, w_t: torch.Tensor,
                      residual: torch.Tensor) -> torch.Tensor:
    """The same in float64 torch, with the unfused path's roundings to w_t's dtype."""
    h, d = q.shape
    group = h // k_cache.shape[0]
    k = k_cache[:, :p + 1].double().repeat_interleave(group, 0)
    v = v_cache[:, :p + 1].double().repeat_interleave(group, 0)
    att = torch.softmax(torch.einsum("hd,hsd->hs", q.double(), k) / math.sqrt(d), dim=-1)
    o = torch.einsum("hs,hsd->hd", att, v).to(w_t.dtype).double().reshape(-1)
    return ((o @ w_t.double()).to(w_t.dtype).double() + residual.double()).to(w_t.dtype)


class Layer:
    """One layer's random q, caches, W_o^T and residual, all distinct memory."""

    def __init__(self, n_head: int, n_kv: int, d: int, s_max: int, n: int, device: torch.device, seed: int):
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.n_kv = n_kv
        dtype = torch.bfloat16
        self.q = torch.randn(n_head, d, generator=self.g, device=device).to(dtype)
        self.new_caches(s_max)
        self.w_t = (torch.randn(n_head * d, n, generator=self.g, device=device) / math.sqrt(n_head * d)).to(dtype)
        self.res = torch.randn(n, generator=self.g, device=device).to(dtype)
        self.thr = torch.zeros(1, dtype=torch.float32, device=device)  # threshold 0: the dense product

    def new_caches(self, s_max: int) -> None:
        """Random K and V caches of s_max positions (the attention op's split count follows s_max)."""
        shape = (self.n_kv, s_max, self.q.shape[1])
        self.k = torch.randn(shape, generator=self.g, device=self.q.device).to(self.q.dtype)
        self.v = torch.randn(shape, generator=self.g, device=self.q.device).to(self.q.dtype)


def measure(layers: list[Layer], contexts: list[int], s_max: int, block_ns: list[int], warps: list[int],
            kv_stages: list[int], timer: Callable[[Callable[[int], object], int], float]) -> list[dict]:
    """Per context: the lab kernel checked against unfused_reference (every variant), then
    `timer(step, len(layers))` (µs a call of step(i), i over the layers) of every method."""
    rows = []
    n = layers[0].w_t.shape[1]
    for context in contexts:
        p = context - 1
        positions = max(s_max, context + 8)
        for lay in layers:
            lay.new_caches(positions)
        pos = torch.tensor([p], dtype=torch.int64, device=layers[0].q.device)
        variants = {f"fused bn{bn} w{w} s{st}": (bn, w, st) for bn in block_ns for w in warps for st in kv_stages}
        worst = 0.0
        for bn, w, st in variants.values():
            lay = layers[0]
            ref = unfused_reference(lay.q, lay.k, lay.v, p, lay.w_t, lay.res).float()
            got = attention_o(lay.q, lay.k, lay.v, p, lay.w_t, lay.res, block_n=bn, num_warps=w, kv_stages=st).float()
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        if not worst <= 2e-2:
            raise SystemExit(f"error: the lab kernel misses the reference at context {context} ({worst:.2e})")

        def attention(i: int) -> torch.Tensor:
            lay = layers[i]
            return decode_attention(lay.q[None], lay.k[None], lay.v[None], pos)

        def cublas_o(i: int, o: torch.Tensor | None = None) -> torch.Tensor:
            lay = layers[i]
            o = lay.q.reshape(1, -1) if o is None else o.reshape(1, -1)  # stand-in input when timed alone
            return o @ lay.w_t + lay.res

        def our_o(i: int, o: torch.Tensor | None = None) -> torch.Tensor:
            lay = layers[i]
            o = lay.q.reshape(1, -1) if o is None else o.reshape(1, -1)
            return sparse_gemv(o, lay.w_t, lay.thr, [n], None, None, 0, False, lay.res[None])

        def fused(bn: int, w: int, st: int) -> Callable[[int], torch.Tensor]:
            return lambda i: attention_o(layers[i].q, layers[i].k, layers[i].v, p, layers[i].w_t, layers[i].res,
                                         block_n=bn, num_warps=w, kv_stages=st)

        timings = {name: fused(*config) for name, config in variants.items()}
        timings.update({
            "attention": attention,
            "attention + cuBLAS o": lambda i: cublas_o(i, attention(i)),
            "attention + our o": lambda i: our_o(i, attention(i)),
            "cuBLAS o": cublas_o,
            "our o": our_o,
        })
        us = {name: timer(step, len(layers)) for name, step in timings.items()}
        rows.append({"context": context, "s_max": positions, "max_rel_error": worst, "us": us})
        print(context, {k: round(v, 2) for k, v in us.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="positions attended (p + 1)")
    parser.add_argument("--layers", type=int, default=8, help="layer copies per graph (33.5 MB of W_o each)")
    parser.add_argument("--s_max", type=int, default=280,
                        help="cache positions (bench_decode's 256-token runs: 280; the attention op's split count "
                             "follows it), raised to context + 8 where smaller")
    parser.add_argument("--block_n", type=int, nargs="+", default=[64, 128], help="lab kernel columns a program")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="lab kernel warps a program")
    parser.add_argument("--kv_stages", type=int, nargs="+", default=[1, 2],
                        help="lab kernel K/V tiles in flight (1: the plain loop)")
    parser.add_argument("--out", default="benchmarks/results/attention_o_lab/lab")
    args = parser.parse_args()
    if min(args.contexts + args.kv_stages) < 1 or args.layers < 1 or args.s_max < 1:
        parser.error("--contexts, --kv_stages, --layers and --s_max must be at least 1")
    if any(v < 16 or v & (v - 1) or 4096 % v for v in args.block_n) or any(w < 1 or w & (w - 1) for w in args.warps):
        parser.error("--block_n must be powers of two from 16 to 4096, --warps powers of two")
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.attention_o_lab needs a CUDA GPU")
    device = torch.device("cuda")
    n_head, n_kv, d, n = 32, 8, 128, 4096  # Llama-3-8B's attention and o
    layers = [Layer(n_head, n_kv, d, args.s_max, n, device, seed=i) for i in range(args.layers)]
    rows = measure(layers, args.contexts, args.s_max, args.block_n, args.warps, args.kv_stages,
                   lambda step, copies: graph_time_us(step, copies, calls=4 * copies))

    names = list(rows[0]["us"])
    gpu = torch.cuda.get_device_name(device)
    lines = [f"# o's attention inside o's product: a lab, Llama-3-8B shapes, bf16, one row - {gpu}, torch "
             f"{torch.__version__}, triton {triton.__version__}, {datetime.date.today()}", "",
             f"`python -m benchmarks.attention_o_lab --contexts {' '.join(map(str, args.contexts))} "
             f"--layers {args.layers} --s_max {args.s_max}`", "",
             "µs a layer, CUDA graphs over the layer copies (L2 flushed between replays).", "",
             "| context | cache positions | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {r['context']} | {r['s_max']} | " + " | ".join(f"{r['us'][k]:.2f}" for k in names) + " |"
              for r in rows]
    write_report(args.out, {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
                            "date": str(datetime.date.today()), "rows": rows}, lines)


if __name__ == "__main__":
    main()
