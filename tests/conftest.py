"""Pytest fixtures. Triton kernels run in the interpreter on machines without CUDA, which must be
chosen before triton is first imported. Builders of tiny models and checkpoints: tests/fixtures.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fixtures import SHARED_DATA, SMOLLM2, tiny_checkpoint  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted default model. `make test` sets REQUIRE_MODEL=1 after preparing it, so a
    missing model fails there instead of silently skipping the tests that matter most."""
    if not (SMOLLM2 / "model.safetensors").exists():
        if os.environ.get("REQUIRE_MODEL") == "1":
            pytest.fail(f"{SMOLLM2} missing: run `make model`")
        pytest.skip("default model not converted (run `make model`)")
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir: Path):
    from checkpoint import load_model
    return load_model(smollm2_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    from tokenizer import load_tokenizer
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def eval_text() -> str:
    path = SHARED_DATA / "wikitext2-eval.txt"
    if not path.exists():
        pytest.skip(f"{path} missing (the shared data folder is beside the checkout in CI)")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint (64-token context) with the offline byte tokenizer."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", block_size=64, tie_embeddings=True)


@pytest.fixture
def interpreted_kernels(monkeypatch) -> None:
    """On the CPU the ops run the plain-torch reference by default; with this they run the Triton
    kernels in the interpreter (a no-op on a GPU, where the ops always run the kernels)."""
    from teal_kernels.ops import CPU_KERNELS_ENV
    monkeypatch.setenv(CPU_KERNELS_ENV, "interpreter")
