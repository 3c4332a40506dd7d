"""The Triton kernels compile for sm_90 (H100/H200) on a machine without a GPU: the interpreter
runs every other kernel test but does not type-check, so a kernel can pass all of them and still
fail to compile on the GPU (the RMSNorm prologue did, 2026-12-02). tests/sm90_compile.py compiles
each variant the launchers use, in a process without TRITON_INTERPRET."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sm90_compile import loop_profile, smem_bytes

ROOT = Path(__file__).resolve().parents[1]


def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_cuda_backend(), reason="Triton without its NVIDIA backend")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sm90_compile.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("ok ") >= 40


def test_loop_profile_counts_the_longest_loop():
    """--loop's static counts on a hand-made listing: only the longest loop's instructions, predicated
    ones included, and shared-memory bytes a thread by each instruction's width (LDS 4, LDS.128 16,
    LDSM .x4 16, STS.64 8, cp.async 4 or 16); global loads and wgmma move none."""
    assert [smem_bytes(op) for op in ("LDS", "LDS.U8", "LDS.128", "LDSM.16.M88.4", "LDSM.16.MT88.2",
                                       "STS.64", "LDGSTS.E", "LDGSTS.E.BYPASS.128", "LDG.E.128",
                                       "HGMMA.64x128x16.F32")] == [4, 1, 16, 16, 8, 8, 4, 16, 0, 0]
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDS R2, [R3] ;
        /*0020*/              @!P0 BRA 0x0010 ;
        /*0030*/                   LDS.128 R4, [R3] ;
        /*0040*/              @P1 STS.64 [R3], R4 ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R6.64] ;
        /*0060*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0070*/                   HGMMA.64x128x16.F32 R24, gdesc[UR16], R24 ;
        /*0080*/              @!P2 BRA 0x0030 ;
        /*0090*/                   EXIT ;
    """
    assert loop_profile(sass) == "loop 6 instructions, shared memory a thread: 16 B read, 24 B written"
    assert loop_profile("/*0000*/ EXIT ;") == "no loop"
