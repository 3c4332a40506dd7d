"""Bad input to the command-line tools ends in one line on stderr, a non-zero exit, no traceback
and no half-written output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert needle in err[-1], proc.stderr


def test_generate_missing_checkpoint(tmp_path: Path) -> None:
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(tmp_path / "nope")), "checkpoint not found")


def test_generate_truncated_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(broken)), "corrupt or truncated")


def test_generate_unsupported_architecture(tmp_path: Path, tiny_ckpt: Path) -> None:
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_ckpt, other)
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(other)), "unsupported architecture")


def test_generate_prompt_longer_than_context(tiny_ckpt: Path) -> None:
    proc = run("generate.py", "--checkpoint_path", str(tiny_ckpt), "--prompt", "word " * 80,
               "--max_new_tokens", "4")
    assert_one_line_error(proc, "exceeds the model's context")


def test_generate_zero_new_tokens(tiny_ckpt: Path) -> None:
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(tiny_ckpt), "--max_new_tokens", "0"),
                          "--max_new_tokens must be at least 1")


def test_generate_unknown_device(tiny_ckpt: Path) -> None:
    assert_one_line_error(run("generate.py", "--checkpoint_path", str(tiny_ckpt), "--device", "tpu9"),
                          "--device")


def test_generate_runs_on_tiny_checkpoint(tiny_ckpt: Path) -> None:
    proc = run("generate.py", "--checkpoint_path", str(tiny_ckpt), "--max_new_tokens", "5", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "tok/s" in proc.stdout


def test_convert_corrupt_hf_checkpoint_writes_nothing(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}))
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = tmp_path / "out"
    proc = run("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(hf), "--out", str(out))
    assert_one_line_error(proc, "cannot read")
    assert not out.exists() or not any(out.iterdir())


def test_convert_unsupported_architecture_writes_nothing(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = tmp_path / "out"
    proc = run("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(hf), "--out", str(out))
    assert_one_line_error(proc, "unsupported architecture")
    assert not out.exists()
