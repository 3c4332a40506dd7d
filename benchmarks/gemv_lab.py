"""Threshold-sparse GEMV lab (TEAL, batch-1 decode): kernel variants, checks, graph timing.

    out[m, n] = sum_k W_t[k, n] * x[m, k] * (|x[m, k]| > thr[seg(n)])      (fp32 accumulation)

Self-contained (torch, triton, stdlib only).  Usage (repo root):

    python3 benchmarks/gemv_lab.py                      # default sweep, M=1, table last
    python3 benchmarks/gemv_lab.py --shapes o --sparsities 0.5 --variants o:m1_512x128
    python3 benchmarks/gemv_lab.py --chain --chain-only  # the qkv->o->gate_up->down chain
    TRITON_INTERPRET=1 python3 benchmarks/gemv_lab.py --selftest   # CPU, tiny shapes

Writes $OUT/gemv_lab.json when $OUT is set.  See benchmarks/results/gemv_lab.md.

One kernel, ``_tgemv``; grid (N blocks, K slices).  Program (pn, pk) owns BN whole columns
(BN divides every segment, so a program has one threshold) and BK rows of W^T.
Row selection (MODE):
  0 masked  : tiles of SUB_K consecutive rows, weight rows of dropped inputs predicated off.
  1 scratch : the kept rows of the K slice are compacted (cumsum) into global scratch,
              re-read after a CTA barrier, and gathered SUB_K full rows at a time.
  2 onehot  : same compaction but in registers: row of slot s = #{r : incl_cumsum[r] <= s}
              (a [SUB_K, BK] compare per tile, no memory round trip; BK <= 256).
Reduction over K slices: fp32 atomics (red) into an fp32 accumulator; with TICKET=1 the
accumulator is a self-cleaning workspace and the last program of each column block (arrival
ticket) writes the bf16 output and zeroes the workspace (no memset needed).
M = 1 accumulates a [SUB_K, BN] fp32 tile with FMAs; M > 1 (padded to 16) uses tl.dot.
PDL: 1 = gdc_wait + launch_dependents at the start, 2 = launch_dependents after the main loop.
ZERO_N > 0: the kernel zeroes zero_ptr[0:ZERO_N] after gdc_wait (the fp32 buffer the NEXT
GEMV of a chain accumulates into), so the fused path needs no memset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# name: (K, segment sizes of N)
SHAPES = {
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}
TINY_SHAPES = {  # interpreter self-test
    "qkv": (256, [128, 64, 64]),
    "o": (256, [128]),
    "gate_up": (256, [128, 128]),
    "down": (512, [64]),
}
TINY_CHAIN_SHAPES = {"qkv": (256, [128, 64, 64]), "o": (256, [128]), "gate_up": (256, [256, 256]), "down": (512, [256])}
DEV = "cpu" if INTERPRET else "cuda"
DRY = False  # --dry: interpreter run of the whole driver on tiny shapes, wall-clock "timing"
READ_TBPS = 4.28  # measured copy bandwidth of this H200 (BACKGROUND.md)
ROTATION_BYTES = 256 << 20


# ---------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------


@triton.jit
def _x_rows(x_ptr, X_STRIDE, M, rows, valid, thr, BM: tl.constexpr):
    """Thresholded x at ``rows`` as fp32: [SUB_K] for BM == 1, [BM, SUB_K] otherwise; and the
    row-kept mask [SUB_K] (union over the batch)."""
    if BM == 1:
        xv = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        xv = tl.where(tl.abs(xv) > thr, xv, 0.0)
        keep = xv != 0.0
    else:
        m = tl.arange(0, BM)
        ok = (m[:, None] < M) & valid[None, :]
        xv = tl.load(x_ptr + m[:, None] * X_STRIDE + rows[None, :], mask=ok, other=0.0).to(tl.float32)
        xv = tl.where(tl.abs(xv) > thr, xv, 0.0)
        keep = tl.max(tl.abs(xv), axis=0) > 0.0
    return xv, keep


@triton.jit
def _slot_rows(t, k_lo, cnt, incl, scr, MODE: tl.constexpr, BK: tl.constexpr, SUB_K: tl.constexpr):
    """Rows of W^T handled by tile ``t`` of this program and their validity."""
    if MODE == 0:
        rows = k_lo + t * SUB_K + tl.arange(0, SUB_K)
        valid = rows >= 0  # BK divides K: always in range
    elif MODE == 1:
        slot = t * SUB_K + tl.arange(0, SUB_K)
        valid = slot < cnt
        rows = tl.load(scr + slot, mask=valid, other=0, cache_modifier=".cg")
    else:
        slot = t * SUB_K + tl.arange(0, SUB_K)
        valid = slot < cnt
        local = tl.sum((incl[None, :] <= slot[:, None]).to(tl.int32), axis=1)
        rows = k_lo + tl.where(valid, local, 0)
    return rows, valid


@triton.jit
def _tile(w_ptr, N, cols, rows, keep):
    return tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=keep[:, None], other=0.0)


@triton.jit
def _fma(acc, xv, wt, BM: tl.constexpr, IEEE_DOT: tl.constexpr):
    if BM == 1:
        acc += xv[:, None] * wt.to(tl.float32)
    elif IEEE_DOT:  # interpreter: bf16 dot is wrong there
        acc += tl.dot(xv, wt.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(xv.to(tl.bfloat16), wt)
    return acc


@triton.jit(do_not_specialize=["TICKET", "ZERO_N"])
def _tgemv(
    x_ptr, w_ptr, thr_ptr, acc_ptr, out_ptr, cnt_ptr, scr_ptr, zero_ptr,
    M, K, N, X_STRIDE, S1, S2, TICKET, ZERO_N,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SUB_K: tl.constexpr,
    MODE: tl.constexpr, PDL: tl.constexpr, IEEE_DOT: tl.constexpr, PIPE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    GN = tl.num_programs(0)
    GK = tl.num_programs(1)
    # BN divides every segment: column blocks tile N contiguously, segment from the bounds.
    col0 = pid_n * BN
    seg = (col0 >= S1).to(tl.int32) + (col0 >= S2).to(tl.int32)
    cols = tl.multiple_of(col0, BN) + tl.arange(0, BN)
    thr = tl.load(thr_ptr + seg)  # static thresholds: may be read before the wait
    k_lo = pid_k * BK
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
        if PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
    if ZERO_N > 0:  # zero the accumulator the next kernel of the chain will add into
        pid = pid_k * GN + pid_n
        for z in range(pid * 256, ZERO_N, GN * GK * 256):
            zo = z + tl.arange(0, 256)
            tl.store(zero_ptr + zo, tl.zeros([256], tl.float32), mask=zo < ZERO_N)

    # ---- row selection for this K slice
    cnt = BK
    incl = tl.zeros([BK], tl.int32)
    scr = scr_ptr
    if MODE != 0:
        all_rows = k_lo + tl.arange(0, BK)
        _, keep_all = _x_rows(x_ptr, X_STRIDE, M, all_rows, all_rows >= 0, thr, BM)
        kept = keep_all.to(tl.int32)
        incl = tl.cumsum(kept, 0)
        cnt = tl.sum(kept, 0)
        if MODE == 1:
            scr = scr_ptr + (pid_k * GN + pid_n) * BK
            tl.store(scr + incl - kept, all_rows, mask=keep_all)
            tl.debug_barrier()  # slot writes of all threads precede the reads
    n_tiles = tl.cdiv(cnt, SUB_K)

    # ---- main loop
    if BM == 1:
        acc = tl.zeros([SUB_K, BN], tl.float32)
    else:
        acc = tl.zeros([BM, BN], tl.float32)
    if PIPE:  # plain loop, software-pipelined by Triton (cp.async into shared memory) with num_stages
        for t in tl.range(0, n_tiles):
            rows, valid = _slot_rows(t, k_lo, cnt, incl, scr, MODE, BK, SUB_K)
            xv, keep = _x_rows(x_ptr, X_STRIDE, M, rows, valid, thr, BM)
            wt = _tile(w_ptr, N, cols, rows, keep)
            acc = _fma(acc, xv, wt, BM, IEEE_DOT)
    else:  # manual prefetch: tile t+1's x and weight loads are issued before tile t's FMAs
        rows, valid = _slot_rows(0, k_lo, cnt, incl, scr, MODE, BK, SUB_K)
        xv, keep = _x_rows(x_ptr, X_STRIDE, M, rows, valid, thr, BM)
        wt = _tile(w_ptr, N, cols, rows, keep)
        for t in range(1, n_tiles):
            rows_n, valid_n = _slot_rows(t, k_lo, cnt, incl, scr, MODE, BK, SUB_K)
            xv_n, keep_n = _x_rows(x_ptr, X_STRIDE, M, rows_n, valid_n, thr, BM)
            wt_n = _tile(w_ptr, N, cols, rows_n, keep_n)
            acc = _fma(acc, xv, wt, BM, IEEE_DOT)
            xv = xv_n
            wt = wt_n
        acc = _fma(acc, xv, wt, BM, IEEE_DOT)
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()

    # ---- reduction over K slices
    if BM == 1:
        part = tl.sum(acc, axis=0)
        offs = cols
        omask = cols < N
    else:
        m = tl.arange(0, BM)
        part = acc
        offs = m[:, None] * N + cols[None, :]
        omask = (m[:, None] < M) & (cols[None, :] < N)
    tl.atomic_add(acc_ptr + offs, part, mask=omask, sem="relaxed")
    if TICKET != 0:
        tl.debug_barrier()  # every thread's atomics precede the release below
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == GK - 1:
            total = tl.load(acc_ptr + offs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=omask)
            tl.store(acc_ptr + offs, tl.zeros_like(total), mask=omask)
            tl.store(cnt_ptr + pid_n, 0)


# ---------------------------------------------------------------------------
# Configs and launcher
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cfg:
    mode: int  # 0 masked, 1 scratch compaction, 2 one-hot compaction
    bn: int
    bk: int
    sub_k: int = 16
    warps: int = 4
    stages: int = 1  # > 1: plain loop pipelined by Triton; 1: manual one-tile prefetch
    dot: bool = False  # M = 1 through tl.dot (batch padded to 16) instead of FMAs

    @property
    def name(self) -> str:
        s = f"m{self.mode}_{self.bn}x{self.bk}_s{self.sub_k}_w{self.warps}"
        return s + (f"_st{self.stages}" if self.stages != 1 else "") + ("_dot" if self.dot else "")

    @staticmethod
    def parse(name: str) -> "Cfg":
        parts = name.split("_")
        mode = int(parts[0][1:])
        bn, bk = (int(v) for v in parts[1].split("x"))
        kw = {"sub_k": 16, "warps": 4, "stages": 1, "dot": False}
        for p in parts[2:]:
            if p == "dot":
                kw["dot"] = True
            elif p.startswith("st"):
                kw["stages"] = int(p[2:])
            elif p.startswith("s"):
                kw["sub_k"] = int(p[1:])
            elif p.startswith("w"):
                kw["warps"] = int(p[1:])
        return Cfg(mode, bn, bk, **kw)


class Buffers:
    """Persistent per-shape scratch: self-cleaning fp32 workspace, arrival counters, row slots."""

    def __init__(self, m: int, k: int, n: int, device) -> None:
        self.ws = torch.zeros(m, n, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(1024, dtype=torch.int32, device=device)
        self.scr = torch.zeros(k * 64 + 4096, dtype=torch.int32, device=device)


_DUMMY: dict = {}


def _dummies(device):
    """Stand-ins for unused pointer arguments, always of the same dtype (one compiled kernel)."""
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = {"bf16": torch.zeros(16, dtype=torch.bfloat16, device=device),
                       "i32": torch.zeros(16, dtype=torch.int32, device=device),
                       "f32": torch.zeros(16, dtype=torch.float32, device=device)}
    return _DUMMY[key]


def launch(cfg: Cfg, x, w, thr, splits, acc, out=None, bufs: Buffers | None = None,
           pdl: int = 0, zero: torch.Tensor | None = None, zero_n: int = 0):
    """acc: fp32 [M, N] accumulator (must be zero before unless out/bufs: ticket mode, acc = bufs.ws).
    out: bf16 [M, N] -> ticket mode (self-cleaning workspace in bufs.ws)."""
    m = x.shape[0]
    k, n = w.shape
    assert all(s % cfg.bn == 0 for s in splits), (cfg, splits)
    assert k % cfg.bk == 0 and cfg.bk % cfg.sub_k == 0
    assert cfg.mode != 2 or cfg.bk <= 256
    assert m <= 16
    bounds = [0]
    for s in splits:
        bounds.append(bounds[-1] + s)
    s1 = bounds[1] if len(splits) > 1 else n
    s2 = bounds[2] if len(splits) > 2 else n
    gn, gk = n // cfg.bn, k // cfg.bk
    ticket = out is not None
    if ticket:
        assert bufs is not None and gn <= bufs.cnt.numel()
        acc = bufs.ws
    if cfg.mode == 1:
        assert bufs is not None and gn * k <= bufs.scr.numel()
    bm = 1 if (m == 1 and not cfg.dot) else 16
    dummy = _dummies(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    _tgemv[(gn, gk)](
        x, w, thr, acc, out if ticket else dummy["bf16"], bufs.cnt if bufs else dummy["i32"],
        bufs.scr if bufs else dummy["i32"], zero if zero is not None else dummy["f32"],
        m, k, n, x.stride(0), s1, s2, 1 if ticket else 0, zero_n,
        BM=bm, BN=cfg.bn, BK=cfg.bk, SUB_K=cfg.sub_k, MODE=cfg.mode, PDL=pdl, IEEE_DOT=INTERPRET, PIPE=cfg.stages > 1,
        num_warps=cfg.warps, num_stages=cfg.stages, **extra,
    )


# Candidate configs per shape (M = 1).  Programs = (N/BN) * (K/BK); H200 has 132 SMs.
CANDIDATES = {  # chosen so that programs <= ~1 wave at the occupancy ptxas gives (see results/gemv_lab.md)
    "qkv": ["m0_512x256_s16_w4", "m1_512x256_s16_w4", "m2_512x256_s16_w4", "m1_256x256_s32_w4",
            "m0_512x256_s32_w4_st3_dot", "m1_512x256_s32_w4_st3_dot", "m2_512x256_s32_w4_st3_dot",
            "m1_256x256_s32_w4_st3_dot", "m0_256x256_s32_w4_st3_dot"],
    "o": ["m0_512x128_s16_w4", "m1_512x128_s16_w4", "m2_512x128_s16_w4", "m1_256x256_s32_w4",
          "m0_512x128_s32_w4_st3_dot", "m1_512x128_s32_w4_st3_dot", "m2_256x256_s32_w4_st3_dot",
          "m1_256x256_s32_w4_st3_dot", "m1_256x128_s32_w4_st3_dot"],
    "gate_up": ["m0_512x1024_s16_w4", "m1_512x1024_s16_w4", "m0_512x1024_s32_w4_st3_dot",
                "m1_512x1024_s32_w4_st3_dot", "m1_512x1024_s32_w4_st4_dot", "m1_256x1024_s32_w4_st3_dot",
                "m0_256x1024_s32_w4_st3_dot", "m1_256x2048_s32_w4_st3_dot", "m1_1024x1024_s32_w8_st3_dot"],
    "down": ["m0_512x512_s16_w4", "m1_512x512_s16_w4", "m0_512x512_s32_w4_st3_dot", "m1_512x512_s32_w4_st3_dot",
             "m1_256x1024_s32_w4_st3_dot", "m1_256x512_s32_w4_st3_dot", "m0_256x512_s32_w4_st3_dot",
             "m1_512x1024_s32_w4_st3_dot", "m2_256x256_s32_w4_st3_dot"],
}
# M > 1 (tl.dot, batch padded to 16)
CANDIDATES_MB = {
    "qkv": ["m0_512x256_s32_w4_st3_dot", "m1_512x256_s32_w4_st3_dot"],
    "o": ["m0_512x128_s32_w4_st3_dot", "m1_512x128_s32_w4_st3_dot"],
    "gate_up": ["m0_512x1024_s32_w4_st3_dot", "m1_512x1024_s32_w4_st3_dot"],
    "down": ["m0_512x512_s32_w4_st3_dot", "m1_512x512_s32_w4_st3_dot"],
}


# ---------------------------------------------------------------------------
# Reference, checks
# ---------------------------------------------------------------------------


def reference(x, w, thr, splits):
    xd = x.double()
    outs, c0 = [], 0
    for j, s in enumerate(splits):
        xm = torch.where(xd.abs() > thr[j].double(), xd, 0.0)
        outs.append(xm @ w[:, c0:c0 + s].double())
        c0 += s
    return torch.cat(outs, dim=1)


def thresholds_for(x, s, nseg):
    t = torch.quantile(x.abs().float().flatten(), s).item() if s > 0 else 0.0
    return torch.full((nseg,), t, dtype=torch.float32, device=x.device)


def rel_err(out, ref):
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(shape: str, cfg: Cfg, m: int, device, shapes=SHAPES, seed: int = 0, pdl: int = 0) -> dict:
    """Fresh random inputs; fp32 path (pre-zeroed acc), ticket path (NaN-poisoned bf16 out, twice:
    the second call checks the workspace cleaned itself), and the ZERO_N side job."""
    k, splits = shapes[shape]
    n = sum(splits)
    g = torch.Generator(device=device).manual_seed(1000 + seed)
    w = (torch.randn(k, n, generator=g, device=device) * 0.02).to(torch.bfloat16)
    bufs = Buffers(m, k, n, device)
    res = {"shape": shape, "cfg": cfg.name, "m": m, "pdl": pdl}
    worst = 0.0
    for s in (0.0, 0.5, 0.65):
        x = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
        x[:, ::7] = 0  # exact zeros are dropped at threshold 0
        thr = thresholds_for(x, s, len(splits))
        if shape == "qkv":  # distinct per-segment thresholds
            thr = thr * torch.tensor([1.0, 0.8, 1.2], device=device)
        ref = reference(x, w, thr, splits)
        acc = torch.zeros(m, n, dtype=torch.float32, device=device)
        zbuf = torch.full((3000,), float("nan"), dtype=torch.float32, device=device)
        launch(cfg, x, w, thr, splits, acc, bufs=bufs, pdl=pdl, zero=zbuf, zero_n=2999)
        e1 = rel_err(acc, ref)
        zero_ok = bool((zbuf[:2999] == 0).all()) and bool(torch.isnan(zbuf[2999]))
        errs = [e1]
        for _ in range(2):
            out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
            launch(cfg, x, w, thr, splits, None, out=out, bufs=bufs, pdl=pdl)
            errs.append(rel_err(out, ref))
        _sync()
        e = max(errs) if all(v == v for v in errs) else float("nan")
        res[f"err_s{s}"] = e
        res["zero_ok"] = res.get("zero_ok", True) and zero_ok
        worst = e if (e != e or worst != worst) else max(worst, e)
    res["ok"] = bool(worst == worst and worst < 1e-2 and res["zero_ok"])
    return res


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def graph_time_us(step, n_variants: int, calls: int = 32, rep: int = 60) -> float:
    """benchmarks.timing's CUDA-graph timer; a plain loop under --dry (the interpreter)."""
    if DRY:
        t0 = time.perf_counter()
        for i in range(n_variants):
            step(i)
        return (time.perf_counter() - t0) * 1e6 / n_variants
    from benchmarks.timing import graph_time_us as timed
    return timed(step, n_variants, calls, rep)


def copies_for(nbytes: int) -> int:
    if DRY:
        return 2
    return max(2, min(16, math.ceil(ROTATION_BYTES / max(nbytes, 1))))


def needed_bytes(x, thr, splits) -> int:
    kept = 0
    for j, s in enumerate(splits):
        kept += int((x.abs().float() > thr[j]).any(dim=0).sum()) * s
    return kept * 2


def bench_shape(shape, m, sparsities, cfg_names, rep, log) -> list[dict]:
    import torch.nn.functional as F

    k, splits = SHAPES[shape]
    n = sum(splits)
    dev = DEV
    ncopy = copies_for(k * n * 2)
    ws = [(torch.randn(k, n, device=dev) * 0.02).to(torch.bfloat16) for _ in range(ncopy)]
    x = torch.randn(m, k, device=dev).to(torch.bfloat16)
    rows = []
    # cuBLAS in the same run: x @ W_t ([K, N], our layout) and F.linear with W [N, K]
    t_mm = graph_time_us(lambda i: x @ ws[i], ncopy, rep=rep)
    wn = [t.t().contiguous() for t in ws[:ncopy]]
    t_lin = graph_time_us(lambda i: F.linear(x, wn[i]), ncopy, rep=rep)
    del wn
    _empty_cache()
    dense_bytes = k * n * 2
    rows.append({"shape": shape, "m": m, "variant": "cublas_xWt", "sparsity": None, "us": t_mm,
                 "tbps": dense_bytes / t_mm / 1e6})
    rows.append({"shape": shape, "m": m, "variant": "cublas_linear", "sparsity": None, "us": t_lin,
                 "tbps": dense_bytes / t_lin / 1e6})
    log(f"{shape} M={m}: cuBLAS x@Wt {t_mm:.1f} us, F.linear {t_lin:.1f} us")
    bufs = Buffers(m, k, n, dev)
    acc = torch.zeros(m, n, dtype=torch.float32, device=dev)
    out = torch.zeros(m, n, dtype=torch.bfloat16, device=dev)
    for s in sparsities:
        thr = thresholds_for(x, s, len(splits))
        need = needed_bytes(x, thr, splits)
        floor = need / READ_TBPS / 1e6
        for name in cfg_names:
            cfg = Cfg.parse(name)
            r = {"shape": shape, "m": m, "variant": name, "sparsity": s, "needed_bytes": need,
                 "floor_us": floor}
            try:
                # (b) fp32 atomics, accumulator zeroed by the consumer (not timed)
                r["us_f32"] = graph_time_us(lambda i: launch(cfg, x, ws[i], thr, splits, acc, bufs=bufs), ncopy, rep=rep)
                # (a) fp32 atomics + memset node before each call
                r["us_f32_memset"] = graph_time_us(
                    lambda i: (acc.zero_(), launch(cfg, x, ws[i], thr, splits, acc, bufs=bufs)), ncopy, rep=rep)
                # bf16 output via self-cleaning workspace + arrival ticket
                r["us_bf16"] = graph_time_us(
                    lambda i: launch(cfg, x, ws[i], thr, splits, None, out=out, bufs=bufs), ncopy, rep=rep)
                r["tbps_f32"] = need / r["us_f32"] / 1e6
                r["tbps_bf16"] = need / r["us_bf16"] / 1e6
            except Exception as e:  # noqa: BLE001 - report and go on
                r["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(r)
            log(f"  {shape} s={s} {name}: " + (r.get("error") or
                f"f32 {r['us_f32']:.2f} memset {r['us_f32_memset']:.2f} bf16 {r['us_bf16']:.2f} "
                f"floor {floor:.2f} ({r['tbps_f32']:.2f} TB/s)"))
    del ws
    _empty_cache()
    return rows


# ---------------------------------------------------------------------------
# Chain: qkv -> o -> gate_up -> down, 32 layers, one CUDA graph
# ---------------------------------------------------------------------------

CHAIN = ["qkv", "o", "gate_up", "down"]


def bench_chain(best: dict[str, str], sparsity: float, layers: int, copies: int, rep: int, log) -> list[dict]:
    dev = DEV
    nmax = max(sum(SHAPES[s][1]) for s in CHAIN)
    weights = [{s: (torch.randn(SHAPES[s][0], sum(SHAPES[s][1]), device=dev) * (1.0 / math.sqrt(SHAPES[s][0])))
                .to(torch.bfloat16) for s in CHAIN} for _ in range(copies)]
    calls = [(layer, s) for layer in range(layers) for s in CHAIN]
    x0 = torch.randn(1, SHAPES["qkv"][0], device=dev).to(torch.bfloat16)
    bufs = {s: Buffers(1, SHAPES[s][0], sum(SHAPES[s][1]), dev) for s in CHAIN}
    thr_tab = torch.zeros(len(calls), 3, dtype=torch.float32, device=dev)
    cfgs = {s: Cfg.parse(best[s]) for s in CHAIN}
    results = []
    for s in CHAIN:  # the PDL builds of the chosen configs: correctness first
        for p in ((1, 2) if not DRY else ()):
            r = check(s, cfgs[s], 1, dev, pdl=p)
            log(f"check {s} {best[s]} pdl={p}: ok={r['ok']} " + " ".join(f"{a}={b:.1e}" for a, b in r.items() if a.startswith("err_")))
            results.append({"check": r})
            if not r["ok"]:
                raise RuntimeError(f"PDL build of {best[s]} failed its check")

    def run_chain(mode: str, pdl: int, calibrate: bool, state: dict):
        """mode: bf16 (ticket), f32_memset, f32_zero (next accumulator zeroed in-kernel)."""
        nb = 4
        if "f32" not in state:  # allocated once, before any capture (no fill kernels inside the graph)
            state["f32"] = [torch.zeros(1, nmax, dtype=torch.float32, device=dev) for _ in range(nb)]
            state["b16"] = [torch.zeros(1, nmax, dtype=torch.bfloat16, device=dev) for _ in range(2)]
        f32, b16 = state["f32"], state["b16"]
        need = 0
        for j, (layer, s) in enumerate(calls):
            k, splits = SHAPES[s]
            n = sum(splits)
            w = weights[layer % copies][s]
            if mode == "bf16":
                x = x0 if j == 0 else b16[(j - 1) % 2][:, :k]
            else:
                x = x0 if j == 0 else f32[(j - 1) % nb][:, :k]
            thr = thr_tab[j, :len(splits)]
            if calibrate:
                thr.fill_(torch.quantile(x.abs().float().flatten(), sparsity).item() if sparsity > 0 else 0.0)
                need += needed_bytes(x, thr, splits)
            if mode == "bf16":
                launch(cfgs[s], x, w, thr, splits, None, out=b16[j % 2][:, :n], bufs=bufs[s], pdl=pdl)
            elif mode == "f32_memset":
                acc = f32[j % nb][:, :n]
                acc.zero_()
                launch(cfgs[s], x, w, thr, splits, acc, bufs=bufs[s], pdl=pdl)
            else:
                launch(cfgs[s], x, w, thr, splits, f32[j % nb][:, :n], bufs=bufs[s], pdl=pdl,
                       zero=f32[(j + 1) % nb], zero_n=nmax)
        return need

    def time_graph(fn) -> float:
        import triton.testing

        if DRY:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median")
        del graph
        return ms * 1e3

    # cuBLAS dense chain (F.linear, W [N, K], bf16 out)
    wn = [{s: weights[c][s].t().contiguous() for s in CHAIN} for c in range(copies)]
    lin_out = [torch.zeros(1, nmax, dtype=torch.bfloat16, device=dev) for _ in range(2)]

    def cublas_chain():
        for j, (layer, s) in enumerate(calls):
            k = SHAPES[s][0]
            x = x0 if j == 0 else lin_out[(j - 1) % 2][:, :k]
            torch.matmul(x, wn[layer % copies][s].t(), out=lin_out[j % 2][:, :sum(SHAPES[s][1])])

    try:
        t = time_graph(cublas_chain)
        results.append({"chain": "cublas_linear", "pdl": 0, "us_per_layer": t / layers})
        log(f"chain cuBLAS F.linear: {t / layers:.1f} us/layer")
    except Exception as e:  # noqa: BLE001
        log(f"chain cuBLAS failed: {e}")
    del wn
    _empty_cache()

    for mode, pdl in [("bf16", 0), ("bf16", 1), ("bf16", 2), ("f32_memset", 0),
                      ("f32_zero", 0), ("f32_zero", 1), ("f32_zero", 2)]:
        state: dict = {}
        try:
            if DRY and pdl:
                continue
            need = run_chain(mode, pdl, True, state)  # calibrate thresholds on this chain's own inputs
            _sync()
            last = len(calls) - 1  # norm of the last output: f32_memset and f32_zero must agree
            k_last = sum(SHAPES[calls[last][1]][1])
            out_norm = float((state["b16"][last % 2] if mode == "bf16" else state["f32"][last % 4])[:, :k_last]
                             .float().norm())
            finite = all(bool(torch.isfinite(b).all()) for b in state.get("f32", []) + state.get("b16", []))
            t = time_graph(lambda: run_chain(mode, pdl, False, state))
            finite2 = all(bool(torch.isfinite(b).all()) for b in state.get("f32", []) + state.get("b16", []))
            floor = need / layers / READ_TBPS / 1e6
            results.append({"chain": mode, "pdl": pdl, "us_per_layer": t / layers, "floor_us_per_layer": floor,
                            "needed_bytes_per_layer": need / layers, "finite": finite and finite2,
                            "out_norm": out_norm})
            log(f"chain {mode} pdl={pdl}: {t / layers:.1f} us/layer (floor {floor:.1f}) finite={finite and finite2}"
                f" |last out| {out_norm:.4g}")
        except Exception as e:  # noqa: BLE001
            results.append({"chain": mode, "pdl": pdl, "error": f"{type(e).__name__}: {e}"[:300]})
            log(f"chain {mode} pdl={pdl} failed: {e}")
    return results


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def _check_task(args):
    shape, name, m, pdl, tiny = args
    dev = DEV
    t0 = time.time()
    try:
        r = check(shape, Cfg.parse(name), m, dev, shapes=TINY_SHAPES if tiny else SHAPES, pdl=pdl)
    except Exception as e:  # noqa: BLE001
        r = {"shape": shape, "cfg": name, "m": m, "pdl": pdl, "ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
    r["check_s"] = time.time() - t0
    return r


def run_checks(tasks, jobs, log):
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_check_task, tasks))
    else:
        results = [_check_task(t) for t in tasks]
    for r in results:
        log(f"check {r['shape']:8s} M={r['m']} pdl={r['pdl']} {r['cfg']:22s} ok={r['ok']} "
            + (r.get("error") or " ".join(f"{k}={v:.1e}" for k, v in r.items() if k.startswith("err_")))
            + f" ({r['check_s']:.1f}s)")
    return results


def selftest(args, log):
    """Interpreter (or GPU) check of every candidate, scaled to tiny shapes."""
    tasks = []
    for shape in args.shapes:
        k, splits = TINY_SHAPES[shape]
        for mode in (0, 1, 2):
            for m in (1, 3):
                for stages, dot in ((1, False), (3, True), (1, True)):
                    if m > 1 and not dot:
                        continue
                    cfg = Cfg(mode, min(splits), 64, 16, 4, stages, dot)  # K / 64 >= 4 K slices
                    tasks.append((shape, cfg.name, m, 0, True))
    res = run_checks(tasks, 1, log)
    bad = [r for r in res if not r["ok"]]
    log(f"selftest: {len(res) - len(bad)}/{len(res)} ok")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.0, 0.5, 0.65])
    ap.add_argument("--variants", nargs="*", default=None,
                    help="shape:cfg names (e.g. o:m1_512x128_s16_w4); default CANDIDATES")
    ap.add_argument("--m", nargs="+", type=int, default=[1])
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    ap.add_argument("--jobs", type=int, default=8, help="processes for the compile+check pass")
    ap.add_argument("--chain", action="store_true")
    ap.add_argument("--chain-only", action="store_true")
    ap.add_argument("--chain-cfg", nargs="*", default=None, help="shape:cfg for the chain; default: fastest f32")
    ap.add_argument("--chain-sparsity", type=float, default=0.5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--dry", action="store_true", help="TRITON_INTERPRET=1 run of the driver on tiny shapes")
    args = ap.parse_args()
    if args.dry:
        global DRY
        assert INTERPRET, "--dry needs TRITON_INTERPRET=1"
        DRY = True
        SHAPES.clear()
        SHAPES.update(TINY_CHAIN_SHAPES)
        for tab in (CANDIDATES, CANDIDATES_MB):
            for k in tab:
                tab[k] = ["m0_64x64_s16_w4", "m1_64x64_s16_w4_st3_dot", "m2_64x64_s16_w4"]
        args.jobs = 1
    t_start = time.time()
    lines = []

    def log(s):
        lines.append(s)
        print(s, flush=True)

    report = {"argv": sys.argv, "torch": torch.__version__, "triton": triton.__version__}
    if args.selftest:
        report["selftest"] = selftest(args, log)
        return finish(report, [], t_start)

    log(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'} torch {torch.__version__} triton {triton.__version__}")
    cfg_sets: dict[tuple[str, int], list[str]] = {}
    if args.variants:
        for v in args.variants:
            shape, name = v.split(":")
            for m in args.m:
                cfg_sets.setdefault((shape, m), []).append(name)
    elif not args.chain_only:
        for shape in args.shapes:
            for m in args.m:
                cfg_sets[(shape, m)] = list(CANDIDATES[shape] if m == 1 else CANDIDATES_MB[shape])
    chain_cfg = dict(v.split(":") for v in (args.chain_cfg or []))

    # compile + check in parallel processes (fills the Triton cache), then time serially
    tasks = [(shape, name, m, 0, False) for (shape, m), names in cfg_sets.items() for name in names]
    if args.chain or args.chain_only:
        tasks += [(s, chain_cfg[s], 1, p, False) for s in chain_cfg for p in (0, 1, 2)]
    checks = []
    if tasks and not args.no_check:
        t0 = time.time()
        checks = run_checks(tasks, args.jobs, log)
        log(f"checks: {sum(r['ok'] for r in checks)}/{len(checks)} ok in {time.time() - t0:.0f}s")
    report["checks"] = checks
    bad = {(r["shape"], r["cfg"], r["m"]) for r in checks if not r["ok"] and r["pdl"] == 0}

    rows = []
    for (shape, m), names in cfg_sets.items():
        names = [nm for nm in names if (shape, nm, m) not in bad]
        if names:
            rows += bench_shape(shape, m, args.sparsities, names, args.rep, log)
    report["rows"] = rows

    if args.chain or args.chain_only:
        best = {}
        for s in CHAIN:
            if s in chain_cfg:
                best[s] = chain_cfg[s]
                continue
            cands = [r for r in rows if r["shape"] == s and r.get("sparsity") == args.chain_sparsity
                     and "us_f32" in r and r["m"] == 1]
            best[s] = min(cands, key=lambda r: r["us_f32"])["variant"] if cands else CANDIDATES[s][0]
        log(f"chain configs: {best}")
        report["chain_cfg"] = best
        report["chain"] = bench_chain(best, args.chain_sparsity, args.layers, args.copies, args.rep * 2, log)
    finish(report, rows, t_start)


def finish(report, rows, t_start):
    report["elapsed_s"] = time.time() - t_start
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gemv_lab.json"), "w") as f:
            json.dump(report, f, indent=1)
    # short table last
    if rows:
        print("\nshape    M  s     variant                  f32    f32+ms bf16   floor  TB/s(f32)  | cuBLAS xWt/linear")
        dense = {(r["shape"], r["m"], r["variant"]): r["us"] for r in rows if r.get("sparsity") is None}
        best = {}
        for r in rows:
            if r.get("sparsity") is None or "us_f32" not in r:
                continue
            key = (r["shape"], r["m"], r["sparsity"])
            if key not in best or r["us_f32"] < best[key]["us_f32"]:
                best[key] = r
        for key, r in best.items():
            shape, m, s = key
            bb = min((q for q in rows if q.get("sparsity") == s and q["shape"] == shape and q["m"] == m
                      and "us_bf16" in q), key=lambda q: q["us_bf16"])
            print(f"{shape:8s} {m}  {s:<5} {r['variant']:24s} {r['us_f32']:6.2f} {r['us_f32_memset']:6.2f} "
                  f"{bb['us_bf16']:6.2f} {r['floor_us']:6.2f} {r['tbps_f32']:5.2f}  bf16best={bb['variant']} | "
                  f"{dense.get((shape, m, 'cublas_xWt'), float('nan')):.1f}/"
                  f"{dense.get((shape, m, 'cublas_linear'), float('nan')):.1f}")
    for c in report.get("chain", []):
        if "chain" not in c:
            continue
        print(f"chain {c['chain']:14s} pdl={c['pdl']} " +
              (f"{c['us_per_layer']:.1f} us/layer" if "us_per_layer" in c else c.get("error", "")) +
              (f" floor {c['floor_us_per_layer']:.1f}" if "floor_us_per_layer" in c else ""))
    print(f"elapsed {report['elapsed_s']:.0f}s")


if __name__ == "__main__":
    main()
