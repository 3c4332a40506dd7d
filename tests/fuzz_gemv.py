"""Fuzz the sparse GEMV kernels against float64 math: random shapes, batch sizes, weight formats,
segment splits, int4 scales and zeros as float32 or packed bf16 pairs (TEAL_INT4_BF16_SCALES), the next norm's
statistics from the epilogue (a quarter of the problems whose N is a multiple of 16),
thresholds (none kept, all kept, anywhere between), prologue/epilogue fusions and kernel configs of
every design (rows, dot, gather), every row-selection mode; the attention prologue (o's GEMV
computing its own input, teal::attention_o: one row, float or int8 weights, random head layouts,
head dims, cache sizes and positions); and int4_mma, the dense int4-g128 decode kernel (mode "int4_mma":
random K, N, rows and launch configs, with each of its epilogues and the norm's statistics; on a GPU also
a row's bits alone and among the batch, which self-speculation's verify needs).

On a GPU (the issue's bar: >= 2000 problems, 0 mismatches)::

    python tests/fuzz_gemv.py --problems 2000 --jobs 14 --out fuzz.json

Without one it runs under TRITON_INTERPRET=1 at tiny sizes (tests/test_fuzz_gemv.py runs a slice
in CI); int4_mma's cases then check its CPU implementation (the reference over the packed copy),
since Gluon kernels run on a GPU only. A mismatch is an output outside one output rounding plus
fp32 accumulation error of the float64 result (plus one input rounding for the fused SiLU / RMSNorm
prologues, whose thresholds sit in gaps between |x| values so that rounding cannot flip a mask).
Prints one line per mismatch and a summary; exit status 1 if any.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

if __name__ == "__main__" and not os.environ.get("TRITON_INTERPRET"):
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run in Python

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from teal_kernels import int4_mma as mma  # noqa: E402
from teal_kernels.reference import (gated_input, pack_scales_zeros, rms_normed,  # noqa: E402
                                    unpack_scales_zeros)
from teal_kernels.triton_gemv import KernelConfig, attention_o_triton, sparse_gemv_triton  # noqa: E402

FORMATS = ["bf16", "fp16", "int8", "int4-g32", "int4-g64", "int4-g128"]
FUSIONS = ["plain", "gated", "residual", "gated+residual", "norm", "attention"]
# Row selection / design of a config; "auto" is no config at all: the tuned table or the heuristic.
MODES = ["rows-compact", "rows-prefetch", "rows-lanesum", "rows-pipelined", "rows-skip", "dot", "gather", "auto",
         "int4_mma"]
# int4_mma's calls as decode.py makes them: the residual in o's and down's epilogue, SiLU(gate) * up in
# gate|up's (its paired copy), the norms' statistics written by o and down (with the residual) and taken
# by q|k|v and gate|up (TEAL_INT4_MMA_NORM_STATS)
MMA_FUSIONS = ["plain", "residual", "gate", "stats", "prenormed", "prenormed+gate"]


def make_mma_case(r: random.Random, seed: int, tiny: bool) -> dict:
    """An int4_mma problem: int4-g128, bf16, 1-8 rows, every input kept (the kernel is dense)."""
    fusion = r.choice(MMA_FUSIONS)
    gate = fusion.endswith("gate")
    groups = r.randint(1, 2 if tiny else 112)
    m = r.choice([1, 1, 1, 2, 3, 4, 5, 8])
    config = None  # config_for's, where it takes the case
    if r.random() < 0.6 or gate:
        tiles = r.choice([2, 4] if gate else [1, 2, 4])
        # warps x tiles <= 16 keeps a program's registers within an SM's (4 tiles take ~255 a thread)
        row_warps = 1 if gate else r.choice([w for w in (1, 2) if w * tiles <= 16])  # the gate epilogue: one
        k_warps = r.choice([w for w in (1, 2, 4, 8, 16) if groups % w == 0 and w * row_warps * tiles <= 16])
        config = dict(k_warps=k_warps, row_warps=row_warps, tiles_a_warp=tiles, lookahead=r.choice([1, 2]))
    # config_for's programs hold at most 4 tiles of one warp's 16 rows: any multiple of 64 outputs fits it
    rows = (16 * config["row_warps"] * config["tiles_a_warp"]) if config else 4 * mma.TILE_ROWS
    n = rows * r.randint(1, 3 if tiny else 40)
    return dict(seed=seed, fmt="int4-g128", group=mma.GROUP, m=m, k=groups * mma.GROUP, sizes=[n], attention=None,
                dtype="bfloat16", levels=["all"], fusion=fusion, mode="int4_mma", config=config,
                packed=False, stats=False)


def make_case(seed: int, tiny: bool, mode: str | None = None) -> dict:
    """The parameters of problem ``seed`` (plain data, so it prints and travels to workers); `mode`
    fixes the mode (one of MODES), else it is drawn too."""
    r = random.Random(seed)
    mode = mode or r.choice(MODES)
    if mode == "int4_mma":
        return make_mma_case(r, seed, tiny)
    fmt = r.choice(FORMATS)
    group = int(fmt.split("-g")[1]) if fmt.startswith("int4") else 0
    if group:
        k = group * r.randint(1, 2 if tiny else 12)
    else:
        k = r.randint(8, 100) if tiny else r.choice([r.randint(16, 700), r.choice([2048, 4096])])
    n_segments = r.choice([1, 1, 2, 3])
    unit = 2 if group else 1
    sizes = [unit * r.randint(1, 24 if tiny else 900) for _ in range(n_segments)]
    m = r.choice([1, 1, 1, 2, 3, 4, 5, 8])
    config = None
    if mode.startswith("rows"):
        block_n = r.choice([16, 32] if tiny else [32, 64, 128, 256, 512, 1024])
        sub_k = r.choice([2, 4, 8] if tiny else [4, 8, 16, 32])
        lanes = 1 << (m - 1).bit_length()  # the batch padded to a power of two
        while lanes * sub_k * block_n > 16384 and block_n > 32:  # a register tile the GPU can hold
            block_n //= 2
        while lanes * sub_k * block_n > 16384 and sub_k > 2:
            sub_k //= 2
        config = dict(design="rows", block_n=block_n, block_k=r.choice([16, 32, 64] if tiny else [64, 128, 256, 512]),
                      sub_k=sub_k, num_warps=r.choice([2, 4, 8]),
                      compact=mode != "rows-skip", num_stages={"rows-prefetch": 2, "rows-lanesum": 2}.get(mode, 1),
                      lane_sum=mode == "rows-lanesum")
        if mode == "rows-pipelined":  # Triton's software pipeline, with or without the lanes summed as it goes
            config.update(num_stages=r.choice([3, 4]), lane_sum=r.random() < 0.5)
    elif mode.startswith("dot"):
        config = dict(design="dot", block_n=r.choice([16, 32] if tiny else [64, 128, 256, 512]),
                      block_k=r.choice([32, 64] if tiny else [128, 256, 512, 1024]), sub_k=r.choice([16, 32]),
                      num_warps=r.choice([4, 8]), num_stages=r.choice([1, 2, 3]))
    elif mode == "gather":  # one row lists each block's kept rows (a batch runs "dot")
        config = dict(design="gather", block_n=r.choice([16, 32] if tiny else [64, 128, 256, 512]),
                      block_k=r.choice([32, 64] if tiny else [256, 512, 1024, 2048]),
                      sub_k=r.choice([16, 32] if tiny else [16, 32, 64]), num_warps=r.choice([4, 8]),
                      num_stages=r.choice([1, 3, 4]))
    elif mode == "auto" and not tiny and not group and m == 1 and r.random() < 0.5:
        # a one-row matrix of 8M weights or more in multiples of 16: an untuned float shape takes the
        # gather heuristic (triton_gemv._heuristic_config)
        k = r.choice([2048, 4096, 8192])
        least = -(-(1 << 23) // (k * 16 * n_segments))  # 16-column units a segment for k * n >= 8M
        sizes = [16 * r.randint(least, 2 * least) for _ in sizes]
    fusion = r.choice(FUSIONS)
    attention = None
    if fusion == "attention":  # o's shape: whole heads, one row, a K block inside one KV group
        if group or mode in ("rows-skip", "dot", "gather", "auto"):
            fmt, group, mode = r.choice(["bf16", "fp16", "int8"]), 0, r.choice(MODES[:4])
        d = r.choice([16, 32] if tiny else [64, 128])
        n_kv, heads_per_kv = r.randint(1, 2 if tiny else 8), r.choice([1, 2, 4] if tiny else [1, 2, 4, 8])
        k, m = n_kv * heads_per_kv * d, 1
        s_max = r.randint(1, 80 if tiny else 600)
        attention = dict(d=d, n_kv=n_kv, n_head=n_kv * heads_per_kv, s_max=s_max, p=r.randrange(s_max))
        block_k = d * r.choice([h for h in (1, 2, 4, 8) if heads_per_kv % h == 0])
        config = dict(design="rows", block_n=r.choice([16, 32] if tiny else [64, 128, 256]), block_k=block_k,
                      sub_k=r.choice([8, 16] if tiny else [16, 32]), num_warps=r.choice([4, 8]), compact=True,
                      num_stages={"rows-prefetch": 2, "rows-lanesum": 2, "rows-pipelined": r.choice([3, 4])}.get(mode, 1),
                      lane_sum=mode == "rows-lanesum")
    # float weights take activations of their own dtype; int8/int4 either
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(fmt) or r.choice(["bfloat16", "float16"])
    # per segment: all kept (0), none kept (above every |x|), or a quantile of |x|
    levels = [r.choice(["all", "none", r.uniform(0.05, 0.95), r.uniform(0.3, 0.7)]) for _ in sizes]
    # int4 scales and zeros as packed bf16 pairs (TEAL_INT4_BF16_SCALES) in a third of the int4 problems
    packed = bool(group) and r.random() < 1 / 3
    # the next norm's statistics from the epilogue (teal::sparse_gemv_stats) in a quarter of the others
    stats = sum(sizes) % 16 == 0 and fusion != "attention" and r.random() < 0.25
    return dict(seed=seed, fmt=fmt, group=group, m=m, k=k, sizes=sizes, attention=attention, dtype=dtype,
                levels=levels, fusion=fusion, mode=mode, config=config, packed=packed, stats=stats)


def _weights(case: dict, g: torch.Generator, device: str) -> tuple:
    k, n, group = case["k"], sum(case["sizes"]), case["group"]
    dtype = getattr(torch, case["dtype"])
    if case["fmt"] in ("bf16", "fp16"):
        return (torch.randn(k, n, generator=g) * 0.1).to(dtype).to(device), None, None
    if case["fmt"] == "int8":
        return (torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8).to(device),
                (torch.rand(n, generator=g) * 0.01).to(device), None)
    return (torch.randint(0, 256, (k, n // 2), generator=g, dtype=torch.uint8).to(device),
            (torch.rand(k // group, n, generator=g) * 0.02).to(device),
            (torch.randn(k // group, n, generator=g) * 0.01).to(device))


def weight64(w: torch.Tensor, scales, zeros, group: int) -> torch.Tensor:
    """W [K, N] in float64 from the packing definition (teal_kernels/reference.py's layouts)."""
    if w.dtype == torch.uint8:
        q = torch.stack([(w % 16).double(), (w // 16).double()], dim=-1).reshape(w.shape[0], -1)
        rows = torch.arange(w.shape[0], device=w.device) // group
        return (q - 8) * scales.double()[rows] + zeros.double()[rows]
    if w.dtype == torch.int8:
        return w.double() * scales.double()[None, :]
    return w.double()


def _threshold(values: torch.Tensor, level, fused: bool, gap: float) -> float:
    """|x| level of one segment. With a fused prologue the kernel rounds its own input, so the
    threshold goes to the middle of a gap of >= `gap` - 1 between sorted |x| values near the level."""
    v = values.abs().flatten().double().sort().values
    if level == "all":
        return 0.0
    if level == "none":
        return float(v[-1]) * 2 + 1.0
    i = min(len(v) - 2, int(level * (len(v) - 1)))
    if not fused:
        return float(v[i])
    ratio = v[1:] / v[:-1].clamp_min(1e-30)
    gaps = (ratio > gap).nonzero().flatten()
    if len(gaps) == 0:
        return float(v[-1]) * 2 + 1.0
    j = int(gaps[(gaps - i).abs().argmin()])
    return float((v[j] + v[j + 1]) / 2)


def _rope(t: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i+1) of t [..., D] rotated by cs [D/2, 2] in float32, rounded to t's dtype."""
    f = t.float()
    return torch.stack([f[..., 0::2] * cs[:, 0] - f[..., 1::2] * cs[:, 1],
                        f[..., 1::2] * cs[:, 0] + f[..., 0::2] * cs[:, 1]], -1).flatten(-2).to(t.dtype)


def _attention_input(case: dict, dtype: torch.dtype, g: torch.Generator, device: str) -> tuple:
    """(q|k|v row, cos/sin table, K and V caches holding NaN past p, the float64 attention output
    rounded to dtype [1, H * D]) of an attention case."""
    a = case["attention"]
    d, n_kv, n_head, p = a["d"], a["n_kv"], a["n_head"], a["p"]
    qkv = torch.randn(1, (n_head + 2 * n_kv) * d, generator=g).to(dtype)
    angles = torch.rand(d // 2, generator=g) * 6.0
    cs = torch.stack([angles.cos(), angles.sin()], -1)
    caches = [torch.randn(1, n_kv, a["s_max"], d, generator=g).to(dtype) for _ in range(2)]
    for c in caches:
        c[:, :, p:] = float("nan")  # p is the op's own write
    keys, values = (c[0, :, : p + 1].double() for c in caches)
    keys[:, p] = _rope(qkv[0, n_head * d: (n_head + n_kv) * d].view(n_kv, d), cs).double()
    values[:, p] = qkv[0, (n_head + n_kv) * d:].view(n_kv, d).double()
    q = _rope(qkv[0, : n_head * d].view(n_head, d), cs).double()
    group = n_head // n_kv
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    probs = torch.softmax(torch.einsum("hd,hsd->hs", q, keys) / d ** 0.5, -1)
    att = torch.einsum("hs,hsd->hd", probs, values).reshape(1, -1).to(dtype)
    return qkv.to(device), cs.to(device), caches[0].to(device), caches[1].to(device), att.to(device)


def _excess(out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> float:
    """The worst |out - ref| over its tolerance (> 0: a mismatch; inf: a non-finite output)."""
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float(((out.double() - ref).abs() - tol).max())


def run_mma_case(case: dict, device: str) -> dict:
    """One int4_mma problem against float64 (the GPU kernel; its reference on the CPU): the product
    rounded once to bf16, then the residual added and rounded (the unfused model's order), SiLU(gate) * up
    of the rounded products, the statistics (out * the norm's weight rounded: exact; 16-output sums of
    out^2 in float32), or the product scaled by 1 / rms of given sums. On a GPU a random row run alone
    must give the same bits as among the batch."""
    g = torch.Generator().manual_seed(case["seed"])
    m, k, n, fusion = case["m"], case["k"], case["sizes"][0], case["fusion"]
    gate, prenormed = fusion.endswith("gate"), fusion.startswith("prenormed")
    w, scales, zeros = _weights(case, g, "cpu")
    words, s_copy, z_copy = (t.to(device) for t in mma.pack(w, scales, zeros, paired=gate))
    x = (torch.randn(m, k, generator=g) * torch.logspace(-0.5, 0.5, m)[:, None]).to(torch.bfloat16)
    residual = torch.randn(m, n, generator=g).to(torch.bfloat16) if fusion in ("residual", "stats") else None
    sumsq = (torch.rand(m, k // 16, generator=g) * 4 + 0.1) if prenormed else None
    stats_weight = (torch.rand(n, generator=g) + 0.5).to(torch.bfloat16) if fusion == "stats" else None
    eps = 1e-5
    config = mma.MmaConfig(**case["config"]) if case["config"] else None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731

    def run(rows: slice) -> tuple[torch.Tensor, ...]:
        """The kernel (the reference on the CPU) on x[rows]: (out,) or (out, scaled, sums) with the statistics."""
        xs, res = on(x[rows]), on(None if residual is None else residual[rows])
        if stats_weight is not None:
            scaled = torch.empty(xs.shape[0], n, dtype=torch.bfloat16, device=device)
            sums = torch.empty(xs.shape[0], n // 16, device=device)
            if device == "cuda":
                out = mma.int4_mma_with_stats(xs, words, s_copy, z_copy, res, on(stats_weight), scaled, sums,
                                              config=config)
            else:
                out, scaled, sums = mma.int4_mma_stats_reference(xs, words, s_copy, z_copy, res, on(stats_weight))
            return out.cpu(), scaled.cpu(), sums.cpu()
        args = (xs, words, s_copy, z_copy, res, gate, on(None if sumsq is None else sumsq[rows]), eps)
        out = mma.int4_mma(*args, config=config) if device == "cuda" else mma.int4_mma_reference(*args)
        return (out.cpu(),)

    got = run(slice(0, m))
    out = got[0]
    w64, x64 = weight64(w, scales, zeros, mma.GROUP), x.double()
    codes = torch.stack([(w % 16).double(), (w // 16).double()], dim=-1).reshape(k, n)
    rows_of = torch.arange(k) // mma.GROUP
    # what the kernel's float32 sums can lose: each term s (q - 8) x and z x apart
    scale = x64.abs() @ ((codes - 8).abs() * scales.double()[rows_of] + zeros.double().abs()[rows_of])
    prod = x64 @ w64
    ulp = 2.0 ** -7
    if prenormed:
        inv_rms = torch.rsqrt(sumsq.double().sum(dim=1, keepdim=True) / k + eps)
        prod, scale = prod * inv_rms, scale * inv_rms
    err = 1.01 * ulp * prod.abs() + 1e-5 * scale + 1e-6 * prod.abs()  # the product rounded once, float32 sums
    if gate:  # SiLU(gate) * up of the rounded products (|SiLU'| < 1.1)
        half = n // 2
        gate64, up64, d_gate, d_up = prod[:, :half], prod[:, half:], err[:, :half], err[:, half:]
        silu = gate64 * torch.sigmoid(gate64)
        ref = silu * up64
        tol = 1.01 * ulp * ref.abs() + 1.1 * d_gate * (up64.abs() + d_up) + silu.abs() * d_up + 1e-30
    elif residual is not None:
        ref = prod + residual.double()
        tol = err + 1.01 * ulp * ref.abs() + 1e-30
    else:
        ref, tol = prod, err + 1e-30
    excess = _excess(out, ref, tol)
    ok = out.shape == ref.shape and out.dtype == torch.bfloat16 and excess <= 0
    if stats_weight is not None:  # against the kernel's own output: the scaled copy exact, the sums in float32
        h = out.double()
        ok = ok and torch.equal(got[1], (out.float() * stats_weight.float()).to(torch.bfloat16))
        squares = h.square().view(m, -1, 16).sum(dim=2)
        ok = ok and bool(((got[2].double() - squares).abs() <= 2e-6 * squares + 1e-30).all())
    if device == "cuda" and m > 1:  # a row alone: the same bits (the one-row path sums as the batch's)
        i = int(torch.randint(m, (1,), generator=g))
        ok = ok and all(torch.equal(a[i], b[0]) for a, b in zip(got, run(slice(i, i + 1)), strict=True))
    return {**case, "ok": bool(ok), "excess": excess}


def run_case(case: dict, device: str) -> dict:
    """Run one problem; returns the case with ``ok`` and the worst error over its tolerance."""
    if case["mode"] == "int4_mma":
        return run_mma_case(case, device)
    g = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    m, k, sizes = case["m"], case["k"], case["sizes"]
    n = sum(sizes)
    w, scales, zeros = _weights(case, g, device)
    if case["packed"]:  # the kernel reads the words; the reference the values they hold
        words = pack_scales_zeros(scales, zeros)
        scales, zeros = unpack_scales_zeros(words)
    fusion = case["fusion"]
    gated, norm_on, attention = "gated" in fusion, fusion == "norm", fusion == "attention"
    residual_on = "residual" in fusion or attention  # o's epilogue adds the residual stream
    x = (torch.randn(m, 2 * k if gated else k, generator=g) * torch.logspace(-0.5, 0.5, m)[:, None]).to(dtype)
    x = x.to(device)
    norm_weight = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device) if norm_on else None
    eps = 1e-5
    residual = torch.randn(m, n, generator=g).to(dtype).to(device) if residual_on else None
    config = KernelConfig(**case["config"]) if case["config"] else None
    if attention:
        qkv, cs, k_cache, v_cache, x_in = _attention_input(case, dtype, g, device)
    else:  # the input the kernel thresholds, as the reference rounds it
        x_in = gated_input(x) if gated else rms_normed(x, norm_weight, eps) if norm_on else x
    fused = gated or norm_on or attention  # the kernel rounds its own input
    # On the GPU that rounding is to nearest, so a 2% gap holds the kernel's input on the reference's
    # side of the threshold. Triton's interpreter truncates fp32 -> bf16 instead (toward zero), and
    # the norm rounds twice: its input can sit two ulps (up to 1.6%) low, so the gap is 4% there; the
    # attention truncates q, k, the probabilities and its output, which put an output four ulps (2.3%)
    # off (seed 51451), so 8%.
    gap = (1.08 if attention else 1.04) if device == "cpu" else 1.02
    thresholds = torch.tensor([_threshold(x_in, lvl, fused, gap) for lvl in case["levels"]],
                              dtype=torch.float32, device=device)
    stats = None
    if attention:
        pos = torch.tensor([case["attention"]["p"]], device=device)
        out = attention_o_triton(qkv, cs, k_cache, v_cache, pos, case["attention"]["n_head"], w, thresholds, sizes,
                                 scales, residual, config=config)
    else:
        kernel_scales, kernel_zeros = (words, words) if case["packed"] else (scales, zeros)
        if case["stats"]:  # NaN-filled, so an unwritten entry fails
            stats = ((torch.rand(n, generator=g) + 0.5).to(dtype).to(device),
                     torch.full((m, n), float("nan"), dtype=dtype, device=device),
                     torch.full((m, n // 16), float("nan"), device=device))
        out = sparse_gemv_triton(x, w, thresholds, sizes, kernel_scales, kernel_zeros, case["group"], config=config,
                                 gated=gated, residual=residual, norm_weight=norm_weight, eps=eps, stats=stats)
    w64 = weight64(w, scales, zeros, case["group"])
    x64 = x_in.double()
    col_thr = torch.cat([thresholds[j].double().expand(size) for j, size in enumerate(sizes)])
    keep = x64.abs()[:, :, None] > col_thr[None, None, :]
    prod = (x64[:, :, None] * keep * w64[None]).sum(dim=1)
    ref = prod + residual.double() if residual is not None else prod
    scale = x64.abs() @ w64.abs()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    tol = 1.01 * ulp * (prod.abs() + (ref.abs() if residual is not None else 0)) + 1e-5 * scale + 1e-30
    if fused:  # the kernel's own rounding of its input may differ by one ulp per term
        tol = tol + 1.01 * ulp * scale
    if attention:  # and its RoPE'd q and k by one ulp (the interpreter truncates), which the softmax carries
        tol = tol + 1.01 * ulp * scale
    excess = _excess(out, ref, tol)
    ok = out.shape == (m, n) and out.dtype == dtype and excess <= 0
    if stats is not None:
        ok = ok and _statistics_ok(out, *stats, device)
    return {**case, "ok": bool(ok), "excess": excess}


def _statistics_ok(out: torch.Tensor, weight: torch.Tensor, scaled: torch.Tensor, sumsq: torch.Tensor,
                   device: str) -> bool:
    """The epilogue's statistics of `out`: out * weight rounded (exact on the GPU; the interpreter
    truncates, one ulp) and the 16-output sums of out^2 within float32 rounding of float64's."""
    expected = (out.float() * weight.float()).to(out.dtype)
    if device == "cpu":
        scaled_ok = torch.allclose(scaled.float(), expected.float(), rtol=2**-7 if out.dtype == torch.bfloat16
                                   else 2**-10, atol=0)
    else:
        scaled_ok = torch.equal(scaled, expected)
    sums = out.double().square().view(out.shape[0], -1, 16).sum(dim=2)
    return bool(scaled_ok and torch.allclose(sumsq.double(), sums, rtol=1e-5, atol=1e-30))


def _shard(args: tuple[list[int], bool, str, str | None]) -> list[dict]:
    seeds, tiny, device, mode = args
    return [run_case(make_case(s, tiny, mode), device) for s in seeds]


def fuzz(problems: int, seed: int = 0, tiny: bool | None = None, jobs: int = 1, mode: str | None = None,
         seconds: float | None = None) -> list[dict]:
    """Run ``problems`` cases from ``seed`` on (all of `mode` if given); results in seed order.

    Work goes out in chunks of a few seeds, with a progress line per chunk, so that a run cut short by
    ``seconds`` (no chunk starts after it) still returns every problem it finished."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = device == "cpu" if tiny is None else tiny
    seeds = list(range(seed, seed + problems))
    if jobs <= 1 and seconds is None:
        return _shard((seeds, tiny, device, mode))
    chunk = 8
    chunks = [seeds[i:i + chunk] for i in range(0, len(seeds), chunk)]
    start, results = time.time(), []
    import multiprocessing
    # one torch thread a worker: the --jobs processes share the host's cores
    with ProcessPoolExecutor(max(jobs, 1), mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(1,)) as pool:
        pending = set()
        for part in chunks:  # two chunks per worker, then one more each time one finishes
            pending.add(pool.submit(_shard, (part, tiny, device, mode)))
            if len(pending) < 2 * max(jobs, 1):
                continue
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            results += [r for f in done for r in f.result()]
            print(f"fuzz: {len(results)}/{problems} problems, {sum(not r['ok'] for r in results)} mismatches, "
                  f"{time.time() - start:.0f} s", file=sys.stderr, flush=True)
            if seconds is not None and time.time() - start > seconds:
                break
        results += [r for f in pending for r in f.result()]
    return sorted(results, key=lambda r: r["seed"])


def summary(results: list[dict]) -> dict:
    by = {}
    for key in ("fmt", "mode", "fusion", "packed", "stats"):
        for r in results:
            entry = by.setdefault(f"{key}={r[key]}", [0, 0])
            entry[0] += 1
            entry[1] += not r["ok"]
    return {"problems": len(results), "mismatches": sum(not r["ok"] for r in results),
            "by": {k: {"problems": v[0], "mismatches": v[1]} for k, v in sorted(by.items())}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=2000, help="random problems to run")
    parser.add_argument("--seed", type=int, default=0, help="first problem's seed (problem i uses seed + i)")
    parser.add_argument("--jobs", type=int, default=1, help="processes (each compiles its own kernels)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="every problem in this mode (a kernel design, its row selection, or int4_mma); "
                             "default: each problem draws one")
    parser.add_argument("--out", type=Path, default=None, help="write the summary and every failure as JSON")
    parser.add_argument("--seconds", type=float, default=None,
                        help="start no new problems after this many seconds; the summary counts those run")
    args = parser.parse_args()
    if args.problems < 1 or args.jobs < 1:
        print("error: --problems and --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.seconds is not None and args.seconds <= 0:
        print(f"error: --seconds must be above 0, got {args.seconds}", file=sys.stderr)
        return 2
    if args.out:
        from files import check_writable
        try:
            check_writable(args.out)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    start = time.time()
    results = fuzz(args.problems, args.seed, jobs=args.jobs, mode=args.mode, seconds=args.seconds)
    for r in results:
        if not r["ok"]:
            print(f"MISMATCH seed={r['seed']} excess={r['excess']:.3g} " + json.dumps({k: r[k] for k in (
                "fmt", "dtype", "m", "k", "sizes", "levels", "fusion", "mode", "config", "packed", "stats")}))
    s = summary(results)
    s["seconds"] = round(time.time() - start, 1)
    s["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (TRITON_INTERPRET=1)"
    if args.out:
        from files import write_json
        write_json(args.out, {**s, "failures": [r for r in results if not r["ok"]]})
    for key, v in s["by"].items():
        print(f"{key:28s} {v['problems']:5d} problems {v['mismatches']:4d} mismatches")
    print(f"{s['problems']} problems, {s['mismatches']} mismatches, {s['seconds']} s on {s['device']}")
    return 1 if s["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
