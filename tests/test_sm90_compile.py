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
