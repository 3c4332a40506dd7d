"""Compile the project's Triton kernels for an H100/H200 (sm_90) without a GPU: Triton's own
ptxas runs, so type errors and unsupported constructs that the interpreter lets through (it does
not type-check: a variable reused with another type compiled nowhere but ran there) fail here.

Run by tests/test_sm90_compile.py in a fresh process without TRITON_INTERPRET (the interpreter
replaces the kernels with Python functions). Prints one line per variant; exit 1 on the first
failure, with Triton's message.

For kernel work without a GPU: `--resources` adds each variant's registers a thread, spills and shared
memory (cuobjdump of the cubin; the local Triton gave the 168 registers and 36.9 KB that Nsight
Compute measured on the H200 under triton 3.6), `--only TEXT` keeps the variants whose line
contains TEXT, `--sass DIR` writes their SASS there, and `--loop` counts the longest loop's
instructions and shared-memory bytes a thread (static counts, to compare variants).

The H200's own compiler: Triton versions differ in what they emit (triton 3.9 here read o's weights
behind the attention prologue a byte at a time; 3.6, the H200's, by 16-byte cp.async), so compile
with the H200's version for SASS questions:
    pip download --no-deps triton==3.6.0 -d /tmp/t36 && pip install --no-deps --target /tmp/t36lib /tmp/t36/*.whl
    PYTHONPATH=/tmp/t36lib python tests/sm90_compile.py --resources --sass DIR
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from teal_kernels import attention as at
from teal_kernels import dequantize as dq
from teal_kernels import preload_gemv as pg
from teal_kernels import triton_gemv as sg
from teal_kernels.reference import MAX_SEGMENTS

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"eps", "qk_scale_log2"}
INT_POINTERS = {"counter_ptr", "idx_ptr"}
FP32_POINTERS = {"scale_ptr", "zero_ptr", "thr_ptr", "part_ptr", "xs_ptr", "o_part_ptr", "lse_part_ptr",
                 "cs_ptr"}


def signature(kernel, pointers: dict[str, str]) -> dict[str, str]:
    """Triton types of a kernel's runtime arguments, from their names (`pointers` overrides)."""
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            sig[p.name] = pointers[p.name]
        elif p.name == "SPLITS":
            sig[p.name] = tuple(["i32"] * (MAX_SEGMENTS + 1))
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*i32" if p.name in INT_POINTERS else "*fp32" if p.name in FP32_POINTERS else "*bf16"
        else:
            sig[p.name] = "fp32" if p.name in FLOATS else "i32"
    return sig


def compile_one(kernel, pointers: dict[str, str], constexprs: dict, num_warps: int, num_stages: int):
    sig = signature(kernel, pointers)
    divisible = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params)
                 if not p.is_constexpr and sig[p.name] != "fp32" and p.name != "SPLITS"}
    options = dict(num_warps=num_warps, num_stages=num_stages, launch_pdl=constexprs.get("PDL", False))
    # constexprs a variant leaves out take their defaults, as a launch does
    constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **constexprs}
    if "maxnreg" in constexprs:  # a launch option (KernelConfig.max_registers), not a kernel argument
        options["maxnreg"] = constexprs.pop("maxnreg")
    return triton.compile(ASTSource(kernel, sig, constexprs, attrs=divisible), target=TARGET, options=options)


def cuobjdump(compiled, flag: str) -> str:
    """Triton's own cuobjdump run on a compiled kernel's cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"sm90_{os.getpid()}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    try:
        return subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True, check=True).stdout
    finally:
        cubin.unlink()


def resources(compiled) -> str:
    """Registers a thread, spilled bytes (ptxas puts spills on the stack, counted apart from local
    arrays) and shared memory a block of a compiled kernel."""
    usage = cuobjdump(compiled, "--dump-resource-usage")
    regs, stack, local = (re.search(rf"{name}:(\d+)", usage).group(1) for name in ("REG", "STACK", "LOCAL"))
    return f"registers {regs}, stack {stack} B, local {local} B, shared {compiled.metadata.shared} B"


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SMEM_OPS = re.compile(r"^(LDS|LDSM|STS|LDGSTS)\b")  # shared memory: loads, stores, async copies into it


def smem_bytes(op: str) -> int:
    """Bytes a thread moves through shared memory by one SASS instruction (0: not such an instruction)."""
    if not SMEM_OPS.match(op):
        return 0
    if op.startswith("LDSM"):  # ldmatrix (LDSM.16.M88.2, .MT88.4 transposed): 1, 2 or 4 8x8 matrices, 4 B a thread each
        count = re.search(r"\.MT?88(?:\.(\d))?", op)
        return 4 * int(count.group(1) or 1) if count else 4
    width = re.search(r"\.(128|64|U8|S8|U16|S16)\b", op)
    return {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[width.group(1)] if width else 4


def loop_profile(sass: str) -> str:
    """The longest loop of a kernel's SASS (a backward branch): its instructions and the shared-memory
    bytes a thread reads (LDS, LDSM) and writes (STS, cp.async) an iteration, besides what wgmma
    reads. Static counts, for comparing variants without a GPU, not a timing."""
    code = [(int(a, 16), text) for a, text in SASS_LINE.findall(sass)]
    loops = [(int(m.group(1), 16), at) for at, text in code
             if (m := re.search(r"\bBRA\s+0x([0-9a-f]+)", text)) and int(m.group(1), 16) < at]
    if not loops:
        return "no loop"
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    ops = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for at, text in code if start <= at <= end]
    read = sum(smem_bytes(op) for op in ops if op.startswith(("LDS", "LDSM")))
    written = sum(smem_bytes(op) for op in ops if op.startswith(("STS", "LDGSTS")))
    return f"loop {len(ops)} instructions, shared memory a thread: {read} B read, {written} B written"


def gemv_variants():
    """(kernel, pointer types, constexprs, warps, stages) of the GEMV designs the launcher runs."""
    weight = {0: "*bf16", 1: "*i8", 2: "*i32"}  # the dot design reads int4 as int32 words
    for fmt, m, (gated, residual, norm) in itertools.product(
            (0, 1, 2), (1, 4), ((False, False, False), (True, True, False), (False, False, True))):
        fusions = dict(GATED=gated, RESIDUAL=residual, NORM=norm)
        yield (sg._dot_gemv_kernel, {"w_ptr": weight[fmt]},
               dict(FORMAT=fmt, GROUP_SIZE=128, BLOCK_M=m, DOT_M=16, BLOCK_N=256, BLOCK_K=512,
                    SUB_K=128 if fmt == 2 else 32, **fusions, EVEN_K=not gated, INTERPRET=False, PDL=gated), 4, 3)
        for compact, prefetch, pipeline, lane_sum in (
                (True, False, 1, False), (True, True, 1, False), (True, True, 1, True), (True, False, 3, False),
                (True, False, 4, True), (False, False, 1, False), (False, False, 1, True)):
            yield (sg._sparse_gemv_kernel, {"w_ptr": "*u8" if fmt == 2 else weight[fmt]},
                   dict(FORMAT=fmt, GROUP_SIZE=128, COL_ALIGN=32, BLOCK_M=m, BLOCK_N=512 if m == 1 else 128,
                        BLOCK_K=256, SUB_K=16, WINDOW=128 if fmt == 2 else 256, COMPACT=compact,
                        PREFETCH=prefetch, PIPELINE=pipeline, LANE_SUM=lane_sum, LANE_GROUPS=2 if lane_sum else 1, RED_K=8,
                        **fusions, WHOLE_ROW=compact and norm, INTERPRET=False, PDL=compact and not lane_sum), 4, 1)
    # o's GEMV computing its own attention (teal::attention_o): int8 o's tile (a KV group a block,
    # pipelined) and bf16 o's (half a group, one chunk prefetched)
    for fmt, block_n, block_k, prefetch, pipeline in ((1, 256, 512, False, 4), (0, 256, 256, True, 1)):
        yield (sg._sparse_gemv_kernel, {"w_ptr": weight[fmt], "pos_ptr": "*i64"},
               dict(FORMAT=fmt, GROUP_SIZE=1, COL_ALIGN=32, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, SUB_K=32,
                    WINDOW=block_k, COMPACT=True, PREFETCH=prefetch, PIPELINE=pipeline, LANE_SUM=False,
                    LANE_GROUPS=1, RED_K=8, GATED=False, RESIDUAL=True, NORM=False, WHOLE_ROW=False,
                    INTERPRET=False, PDL=False, ATTENTION=True, ATT_GROUP=4, ATT_HEADS_PAD=16, ATT_D=128,
                    ATT_BLOCK_S=64), 4, 1)
    # int8 q|k|v's pipelined tile with the norm's statistics read apart (_rms_scale: K blocks shorter than the row)
    yield (sg._sparse_gemv_kernel, {"w_ptr": "*i8"},
           dict(FORMAT=1, GROUP_SIZE=1, COL_ALIGN=32, BLOCK_M=1, BLOCK_N=128, BLOCK_K=512, SUB_K=32, WINDOW=512,
                COMPACT=True, PREFETCH=False, PIPELINE=4, LANE_SUM=False, LANE_GROUPS=1, RED_K=8, GATED=False,
                RESIDUAL=False, NORM=True, WHOLE_ROW=False, INTERPRET=False, PDL=False), 4, 1)
    # int8's pipelined tiles of the stored Llama-3-8B configs (gate|up with its norm, down gated with the
    # residual, o with the residual)
    for block_n, block_k, sub_k, gated, residual, norm in (
            (128, 4096, 64, False, False, True), (256, 1024, 32, True, True, False), (256, 512, 32, False, True, False)):
        yield (sg._sparse_gemv_kernel, {"w_ptr": "*i8"},
               dict(FORMAT=1, GROUP_SIZE=1, COL_ALIGN=32, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, SUB_K=sub_k,
                    WINDOW=block_k, COMPACT=True, PREFETCH=False, PIPELINE=4, LANE_SUM=False, LANE_GROUPS=1,
                    RED_K=8, GATED=gated, RESIDUAL=residual, NORM=norm, WHOLE_ROW=norm, INTERPRET=False, PDL=False),
               4, 1)
    # the int4 tile under a register cap (KernelConfig.max_registers; at 96 it spills 288 B a thread)
    yield (sg._dot_gemv_kernel, {"w_ptr": "*i32"},
           dict(FORMAT=2, GROUP_SIZE=128, BLOCK_M=1, DOT_M=16, BLOCK_N=256, BLOCK_K=512, SUB_K=128, GATED=False,
                RESIDUAL=False, NORM=False, EVEN_K=True, INTERPRET=False, PDL=True, maxnreg=96), 4, 3)
    yield (sg._dot_gemv_kernel, {}, dict(FORMAT=0, GROUP_SIZE=1, BLOCK_M=1, DOT_M=16, BLOCK_N=256, BLOCK_K=512,
                                         SUB_K=32, GATED=False, RESIDUAL=False, NORM=False,
                                         EVEN_K=True, INTERPRET=False, PDL=False), 8, 3)
    # the "gather" design (one row: a block's kept rows listed once, int4 groups as the tile's rows) at
    # the 8B int4 winners' tiles (gate|up 2048 rows with its norm; the H200's stored gate|up, 512 columns;
    # down 1024 gated with the residual), int8, bf16
    for fmt, block_n, block_k, sub_k, (gated, residual, norm) in (
            (2, 256, 2048, 128, (False, False, True)), (2, 512, 1024, 64, (False, False, True)),
            (2, 256, 1024, 64, (True, True, False)), (1, 256, 1024, 64, (False, False, True)),
            (0, 256, 512, 32, (False, True, False))):
        yield (sg._dot_gemv_kernel, {"w_ptr": weight[fmt]},
               dict(FORMAT=fmt, GROUP_SIZE=128 if fmt == 2 else 1, BLOCK_M=1, DOT_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                    SUB_K=sub_k, GATED=gated, RESIDUAL=residual, NORM=norm, EVEN_K=True, INTERPRET=False, PDL=True,
                    GATHER=True, GROUPS=block_k // 128 if fmt == 2 else 1, RED_K=16 if gated else 4), 4, 4)
    # gate|up's gather tile reading its scales and zeros as packed bf16 pairs (int32 words:
    # linear.INT4_BF16_SCALES_ENV)
    yield (sg._dot_gemv_kernel, {"w_ptr": "*i32", "scale_ptr": "*i32", "zero_ptr": "*i32"},
           dict(FORMAT=2, GROUP_SIZE=128, BLOCK_M=1, DOT_M=16, BLOCK_N=512, BLOCK_K=1024, SUB_K=64, GATED=False,
                RESIDUAL=False, NORM=True, EVEN_K=True, INTERPRET=False, PDL=True, GATHER=True, GROUPS=8, RED_K=4),
           4, 4)
    # down's gather tile on the H100 (gated, the residual) giving the next norm's statistics (STATS:
    # linear.SPARSE_NORM_STATS_ENV), packed scales
    yield (sg._dot_gemv_kernel, {"w_ptr": "*i32", "scale_ptr": "*i32", "zero_ptr": "*i32", "sumsq_ptr": "*fp32"},
           dict(FORMAT=2, GROUP_SIZE=128, BLOCK_M=1, DOT_M=16, BLOCK_N=512, BLOCK_K=512, SUB_K=32, GATED=True,
                RESIDUAL=True, NORM=False, EVEN_K=True, INTERPRET=False, PDL=True, GATHER=True, GROUPS=4, RED_K=16,
                STATS=True), 4, 6)
    for fmt, m, block_n in ((2, 16, 512), (2, 32, 256), (2, 64, 128), (2, 64, 256), (1, 64, 256)):  # short prefills
        yield (sg._dot_gemv_kernel, {"w_ptr": weight[fmt]},
               dict(FORMAT=fmt, GROUP_SIZE=128, BLOCK_M=m, DOT_M=m, BLOCK_N=block_n, BLOCK_K=512,
                    SUB_K=32, GATED=False, RESIDUAL=False, NORM=False, EVEN_K=True, INTERPRET=False,
                    PDL=True), 4, 3)


def dequantize_variants():
    for int4, dtype in ((True, "*bf16"), (False, "*fp16")):
        yield (dq._dequantize_kernel, {"w_ptr": "*u8" if int4 else "*i8", "out_ptr": dtype},
               dict(INT4=int4, GROUP_SIZE=128 if int4 else 1, BLOCK_K=dq.BLOCK_K, BLOCK_N=dq.BLOCK_N,
                    INTERPRET=False), 4, 1)


def quant_gemm_variants():
    """The prefill GEMM at the heuristic's configs: int4-g128 (bf16; also bench_prefill's other int4
    layouts and scale loads: int4_vec, int4_scales) and int8 (fp16, K not whole blocks); at 64 rows
    into float32 partials (split K), as q|k|v, o and down run there."""
    formats = ([(True, "*bf16", True, vec, "step") for vec in (16, 4, 2)]
               + [(True, "*bf16", True, vec, scales) for vec in (16, 4) for scales in ("group", "ahead")]
               + [(False, "*fp16", False, None, None)])  # int8: the heuristic's (unused) int4 fields
    for (int4, dtype, even_k, vec, scales), m in itertools.product(formats, (64, 128, 512)):
        cfg = dq.quant_gemm_config(m, 128 if int4 else 0)
        out = "*fp32" if m == 64 else dtype
        yield (dq._quant_gemm_kernel, {"x_ptr": dtype, "w_ptr": "*u8" if int4 else "*i8", "out_ptr": out},
               dict(INT4=int4, GROUP_SIZE=128 if int4 else 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k, EVEN_K=even_k, INT4_VEC=vec or cfg.int4_vec,
                    INT4_SCALES=scales or cfg.int4_scales, INTERPRET=False,
                    **({"maxnreg": cfg.max_registers} if cfg.max_registers else {})), cfg.warps, cfg.stages)


def preload_variants():
    for (k_pad, block_n, warps), (gated, residual, norm), pdl in itertools.product(
            (pg.preload_config(576), pg.preload_config(2048)),
            ((False, False, False), (True, True, False), (False, False, True)), (False, True)):
        yield (pg._preload_gemv_kernel, {}, dict(K_PAD=k_pad, BLOCK_N=block_n, GATED=gated, RESIDUAL=residual,
                                                 NORM=norm, PDL=pdl), warps, 1)


def attention_variants():
    for fused, single, pdl in itertools.product((False, True), (False, True), (False, True)):
        yield (at._split_kernel, {"pos_ptr": "*i64", "out_ptr": "*bf16", "cs_ptr": "*fp32"},
               dict(GROUP=4, GROUP_PAD=16, D=128, BLOCK_S=64, SINGLE=single, DOT_FP32=False, FUSED=fused,
                    PDL=pdl), 4, 1)
    for pdl in (False, True):
        yield (at._combine_kernel, {"pos_ptr": "*i64"}, dict(D=128, BLOCK_S=64, SPLITS_PAD=32, PDL=pdl), 4, 1)


def int4_mma_variants():
    """teal_kernels/int4_mma.py's Gluon kernel at its measured configs and at the rule's for an untuned
    shape: (name, compile function)."""
    from teal_kernels import int4_mma as im

    def compile_gluon(cfg: im.MmaConfig, pdl: bool, residual: bool, one_row: bool, gate: bool = False,
                      stats: bool = False, prenormed: bool = False, k: int = 4096, scales: str = "*fp32"):
        from triton.experimental.gluon._runtime import GluonASTSource
        kernel, _ = im._kernel()
        layouts = im._layouts(cfg)
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": scales, "z_ptr": scales, "out_ptr": "*bf16",
               "res_ptr": "*bf16", "sw_ptr": "*bf16", "sc_ptr": "*bf16",
               "sq_ptr": "*fp32", "eps": "fp32", "M": "i32", "K": "i32", "N": "i32",
               "KW": "constexpr", "ROWS": "constexpr", "LOOKAHEAD": "constexpr", "PDL": "constexpr",
               "RESIDUAL": "constexpr", "ONE_ROW": "constexpr", "GATE": "constexpr",
               "STATS": "constexpr", "PRENORMED": "constexpr", "SQ_P": "constexpr",
               **{name: "constexpr" for name in layouts}}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                 if name.endswith("_ptr") or name in ("K", "N")}
        constexprs = dict(KW=cfg.k_warps, ROWS=cfg.rows, LOOKAHEAD=cfg.lookahead, PDL=pdl, RESIDUAL=residual, ONE_ROW=one_row, GATE=gate, STATS=stats, PRENORMED=prenormed,
                          SQ_P=1 << (k // 16 - 1).bit_length(), **layouts)
        return triton.compile(GluonASTSource(kernel, sig, constexprs, attrs),
                              target=TARGET, options=dict(num_warps=cfg.k_warps * cfg.row_warps, launch_pdl=pdl))

    # as decode.py calls them: q|k|v plain, o and down with the residual, gate|up gated; also without PDL
    shapes = ((4096, 6144), (4096, 4096), (4096, 28672), (2048, 2048))
    rules = [(im.config_for(k, n, m), m == 1) for k, n in shapes for m in (1, 4)]
    for cfg, one_row in dict.fromkeys(rules + [(c._replace(lookahead=2), o) for c, o in rules[:2]]):
        for pdl, residual in ((True, False), (True, True), (False, False)):
            yield (f"_int4_mma_kernel {tuple(cfg)} PDL={pdl} RESIDUAL={residual} ONE_ROW={one_row} "
                   f"num_warps={cfg.k_warps * cfg.row_warps}",
                   lambda c=cfg, p=pdl, r=residual, o=one_row: compile_gluon(c, p, r, o))
    for cfg, one_row in ((im.config_for(4096, 28672, 1), True), (im.config_for(4096, 28672, 4), False)):
        yield (f"_int4_mma_kernel {tuple(cfg)} PDL=True RESIDUAL=False ONE_ROW={one_row} GATE=True "
               f"num_warps={cfg.k_warps}", lambda c=cfg, o=one_row: compile_gluon(c, True, False, o, True))
    # the copy's scales and zeros in bf16 (TEAL_INT4_MMA_BF16_SCALES): q|k|v, o, gate|up (gated), down at one row
    for k, n, residual, gate in ((4096, 6144, False, False), (4096, 4096, True, False), (4096, 28672, False, True),
                                 (14336, 4096, True, False)):
        cfg = im.config_for(k, n, 1)
        yield (f"_int4_mma_kernel {tuple(cfg)} PDL=True RESIDUAL={residual} ONE_ROW=True GATE={gate} K={k} "
               f"scales=bf16 num_warps={cfg.k_warps}",
               lambda c=cfg, r=residual, g=gate, kk=k: compile_gluon(c, True, r, True, g, k=kk, scales="*bf16"))
    # the norm's statistics: o and down produce them (with the residual), q|k|v and gate|up (gated) take them
    for k, n, gate, stats in ((4096, 4096, False, True), (14336, 4096, False, True), (4096, 6144, False, False),
                              (4096, 28672, True, False), (2048, 2048, False, True), (576, 1536, False, False)):
        for m in (1, 4):
            cfg = im.config_for(k, n, m)
            yield (f"_int4_mma_kernel {tuple(cfg)} PDL=True RESIDUAL={stats} STATS={stats} PRENORMED={not stats} "
                   f"GATE={gate} ONE_ROW={m == 1} K={k} num_warps={cfg.k_warps}",
                   lambda c=cfg, o=m == 1, g=gate, st=stats, kk=k:
                   compile_gluon(c, True, st, o, g, st, not st, kk))


def sparse_mma_lab_variants():
    """benchmarks/int4_sparse_mma_lab.py's Gluon kernel (TEAL-sparse int4 on tensor cores, a lab) at a
    config of each tile count: (name, compile function)."""
    from benchmarks import int4_sparse_mma_lab as lab

    def compile_lab(cfg: "lab.SparseConfig"):
        from triton.experimental.gluon._runtime import GluonASTSource
        kernel, _ = lab._kernel()
        layouts = lab.layouts(cfg.k_warps, cfg.tiles)
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "out_ptr": "*bf16",
               "list_ptr": "*i32", "count_ptr": "*i32", "sum_ptr": "*fp32", "threshold": "fp32", "K": "i32",
               "N": "i32", "KW": "constexpr", "R": "constexpr", "LISTED": "constexpr",
               **{name: "constexpr" for name in layouts}}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                 if name.endswith("_ptr") or name in ("K", "N")}
        constexprs = dict(KW=cfg.k_warps, R=cfg.tiles, LISTED=cfg.listed, **layouts)
        return triton.compile(GluonASTSource(kernel, sig, constexprs, attrs), target=TARGET,
                              options=dict(num_warps=cfg.k_warps))

    for cfg in (lab.SparseConfig(4, 4), lab.SparseConfig(8, 8), lab.SparseConfig(4, 16), lab.SparseConfig(8, 8, True),
                lab.SparseConfig(4, 16, True)):
        yield f"int4_sparse_mma_lab kernel {tuple(cfg)} num_warps={cfg.k_warps}", lambda c=cfg: compile_lab(c)


def bf16_mma_variants():
    """teal_kernels/bf16_mma.py's Gluon kernel (dense bf16 decode calls on tensor cores reading the [K, N]
    rows in place) at each 8B matrix's config with the epilogues the decode step asks of it, one row and
    more: (name, compile function)."""
    from teal_kernels import bf16_mma as bm

    def compile_variant(cfg: "bm.Bf16MmaConfig", one_row: bool, **flags: bool):
        from triton.experimental.gluon._runtime import GluonASTSource
        kernel, _ = bm._kernel()
        layouts = bm.layouts(cfg)
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "out_ptr": "*bf16", "res_ptr": "*bf16", "sw_ptr": "*bf16",
               "sc_ptr": "*bf16", "sq_ptr": "*fp32", "eps": "fp32", "M": "i32", "K": "i32", "N": "i32",
               **{name: "constexpr" for name in ("KW", "T", "CG", "KS", "LOOKAHEAD", "PDL", "ONE_ROW", "RESIDUAL",
                                                 "GATE", "STATS", "PRENORMED", "SQ_P", *layouts)}}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(sig)
                 if name.endswith("_ptr") or name in ("K", "N")}
        constexprs = dict(KW=cfg.k_warps, T=cfg.tiles, CG=cfg.col_groups, KS=cfg.k_step, LOOKAHEAD=cfg.lookahead,
                          PDL=True, ONE_ROW=one_row, SQ_P=256, **{name: flags.get(name.lower(), False)
                                                                  for name in ("RESIDUAL", "GATE", "STATS", "PRENORMED")},
                          **layouts)
        return triton.compile(GluonASTSource(kernel, sig, constexprs, attrs), target=TARGET,
                              options=dict(num_warps=cfg.k_warps, launch_pdl=True))

    for (k, n), flags in (((4096, 6144), dict(prenormed=True)), ((4096, 4096), dict(residual=True, stats=True)),
                          ((4096, 28672), dict(gate=True, prenormed=True)),
                          ((14336, 4096), dict(residual=True, stats=True))):
        cfg = bm.config_for(k, n, flags.get("gate", False))
        for one_row in (True, False):
            yield (f"bf16_mma kernel {tuple(cfg)} ONE_ROW={one_row} {' '.join(sorted(flags))} num_warps={cfg.k_warps}",
                   lambda c=cfg, o=one_row, f=flags: compile_variant(c, o, **f))


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # checked here: tests import the SASS helpers under it
        sys.exit("run without TRITON_INTERPRET=1: the interpreter has no kernels to compile")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resources", action="store_true", help="print registers and shared memory of each variant")
    p.add_argument("--only", default="", metavar="TEXT", help="only the variants whose line contains TEXT")
    p.add_argument("--sass", type=Path, default=None, metavar="DIR", help="write each variant's SASS into DIR")
    p.add_argument("--loop", action="store_true",
                   help="print the instructions and shared-memory bytes a thread of the longest loop (SASS)")
    args = p.parse_args(argv)
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
    triton_variants = itertools.chain(gemv_variants(), dequantize_variants(), quant_gemm_variants(),
                                      preload_variants(), attention_variants())
    named = ((f"{kernel.fn.__name__} " + " ".join(f"{k}={v}" for k, v in constexprs.items() if k != "INTERPRET")
              + f" num_warps={warps} num_stages={stages}"
              + (" packed_scales" if pointers.get("scale_ptr") == "*i32" else ""),
              lambda kernel=kernel, p=pointers, c=constexprs, w=warps, s=stages: compile_one(kernel, p, c, w, s))
             for kernel, pointers, constexprs, warps, stages in triton_variants)
    gluon = (itertools.chain(int4_mma_variants(), sparse_mma_lab_variants(), bf16_mma_variants()) if _has_gluon()
             else iter(()))
    for i, (name, build) in enumerate(itertools.chain(named, gluon)):
        if args.only not in name:
            continue
        try:
            compiled = build()
        except Exception as e:  # Triton's CompilationError and friends: report which variant
            print(f"FAILED {name}\n{e}", file=sys.stderr)
            return 1
        sass = cuobjdump(compiled, "-sass") if args.sass or args.loop else ""
        print(f"ok {name}" + (f": {resources(compiled)}" if args.resources else "")
              + (f"; {loop_profile(sass)}" if args.loop else ""), flush=True)
        if args.sass:
            (args.sass / f"{i:03d}_{name.split()[0]}.sass").write_text(f"# {name}\n" + sass)
    return 0


def _has_gluon() -> bool:
    """Whether this Triton has Gluon's mma_v2 (teal_kernels/int4_mma.py's kernel needs it)."""
    from teal_kernels import int4_mma as im
    return im.available()


if __name__ == "__main__":
    sys.exit(main())
