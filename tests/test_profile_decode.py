"""benchmarks/profile_decode.py without a GPU: kernel roles, step splitting, trace parsing, the
byte floor, the Markdown output and the command line's CPU path (one-line errors)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "profile_decode.py"

import benchmarks.profile_decode as pd  # noqa: E402

GEMV = "gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false, cublasGemvParams<cublasGemvTensorStridedBatched<__nv_bfloat16 const>, cublasGemvTensorStridedBatched<__nv_bfloat16 const>, cublasGemvTensorStridedBatched<__nv_bfloat16>, float> >"  # noqa: E501
NVJET = "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT"
SDPA = "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0"
NORM = "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0"
ROPE = "triton_poi_fused__scaled_dot_product_cudnn_attention_index_put_stack_1"  # Inductor copy, not attention
SILU = "triton_poi_fused_mul_silu_2"
ARGMAX = "triton_red_fused_argmax_3"
POS_ADD = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<long>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<long>, std::array<char*, 3ul>)"  # noqa: E501
REDUCE = "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, float const*)"  # noqa: E501
COPY = "Memcpy DtoD (Device -> Device)"


def dense_step(n_layer: int = 2) -> list[tuple[str, float]]:
    """A dense bf16 step: graph-input copy, per layer norm/qkv/rope/sdpa/o/norm/gate_up/silu/down,
    final norm, lm_head (split-K with a memset and a reduce kernel), argmax, token clone, pos += 1."""
    ks = [(COPY, 1.0)]
    for _ in range(n_layer):
        ks += [(NORM, 2.0), (NVJET, 15.0), (ROPE, 1.5), (SDPA, 6.5), (NVJET, 12.5), (NORM, 2.0),
               (NVJET, 55.0), (SILU, 1.5), (GEMV, 30.0)]
    return ks + [(NORM, 2.5), (NVJET, 200.0), ("Memset (Device)", 1.0), (REDUCE, 5.0), (ARGMAX, 4.0),
                 (COPY, 1.0), (POS_ADD, 1.5)]


@pytest.mark.parametrize("name, role", [
    (NVJET, "projection GEMV"), (GEMV, "projection GEMV"), (REDUCE, "projection GEMV"),
    ("_sparse_gemv_kernel", "projection GEMV"), ("_fused_rmsnorm_gemv_kernel", "projection GEMV"),
    ("_int4_mma_kernel", "projection GEMV"), ("_bf16_mma_kernel", "projection GEMV"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "projection GEMV"),  # noqa: E501
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8::Params)", "projection GEMV"),  # noqa: E501
    ("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT", "projection GEMV"), ("triton_tem_fused_mm_0", "projection GEMV"),
    # Inductor names kernels after the ops of their nodes: these are the SiLU and RMSNorm next to
    # sparse_gemv (seen on the H200), and a copy before the cuDNN SDPA call
    ("triton_poi_fused_mul_silu_sparse_gemv_split_view_6", "elementwise/norm"),
    ("triton_per_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_sparse_gemv_view_0", "elementwise/norm"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy_add_index_mul_scalar_tensor_select_", "elementwise/norm"),
    ("triton_red_fused_mm_4", "elementwise/norm"),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3_64x64x64_4x1x1_cga1x1x1_kernel0_0", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<2>, at::native::(anonymous namespace)::CopyFunctor<long, long, long, 1, 1, 0> >", "elementwise/norm"),  # noqa: E501
    (SDPA, "attention"), ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, cutlass::bfloat16_t> >(pytorch_flash::Flash_fwd_params)", "attention"),  # noqa: E501
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", "attention"),  # noqa: E501
    ("_decode_attention_stage1_kernel", "attention"), ("_split_kernel", "attention"), ("_combine_kernel", "attention"),
    (NORM, "elementwise/norm"), (ROPE, "elementwise/norm"), (SILU, "elementwise/norm"), (ARGMAX, "elementwise/norm"),
    ("triton_per_fused_add_mean_mul_pow_rsqrt_5", "elementwise/norm"), (POS_ADD, "elementwise/norm"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>", "elementwise/norm"),  # noqa: E501
    ("Memset (Device)", "memset/memcpy"), (COPY, "memset/memcpy"), ("Memcpy HtoD (Pageable -> Device)", "memset/memcpy"),
])
def test_classify(name: str, role: str) -> None:
    assert pd.classify(name) == role


def test_split_steps_finds_identical_steps() -> None:
    step = dense_step()
    parts = pd.split_steps(step * 3, 3)
    assert parts == [step, step, step]
    with pytest.raises(ValueError, match="do not split"):
        pd.split_steps(step * 3 + [(COPY, 1.0)], 3)
    with pytest.raises(ValueError, match="step 2 differs"):
        pd.split_steps(step + [(SILU, 1.0)] + step[1:], 2)
    with pytest.raises(ValueError):
        pd.split_steps([], 5)


def test_lm_head_is_the_trailing_matrix_run() -> None:
    step = dense_step()
    roles = pd.step_roles(step)
    lm = [name for (name, _), r in zip(step, roles) if r == "lm_head"]
    assert lm == [NVJET, REDUCE]  # split-K main kernel and its reduce, not the memset between
    assert roles[step.index(("Memset (Device)", 1.0))] == "memset/memcpy"
    assert roles.count("projection GEMV") == 2 * 4  # 4 projections per layer
    assert roles[-1] == "elementwise/norm" and roles[0] == "memset/memcpy"


def test_lm_head_of_a_sparse_step() -> None:
    """Kernel order of a TEAL 50% step as profiled on the H200 (one layer shown)."""
    sg, norm = "_sparse_gemv_kernel", "triton_per_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_sparse_gemv_view_5"
    step = [("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", 1.3),
            ("triton_per_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_sparse_gemv_view_0", 1.8), (sg, 6.5),
            ("triton_poi_fused_index_put_split_with_sizes_transpose_view_2", 0.9), (SDPA, 6.4), (sg, 6.3),
            (norm, 1.5), (sg, 6.8), ("triton_poi_fused_mul_silu_sparse_gemv_split_view_6", 1.0), (sg, 7.0),
            ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_view_14", 1.5),
            ("nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT", 16.0), (ARGMAX, 8.4), (COPY, 0.8), (POS_ADD, 1.3)]
    roles = pd.step_roles(step)
    assert roles.count("lm_head") == 1 and roles[11] == "lm_head"
    assert [n for (n, _), r in zip(step, roles) if r == "projection GEMV"] == [sg] * 4
    assert roles.count("elementwise/norm") == 8


def test_summarize_per_step() -> None:
    steps = 4
    step = dense_step(n_layer=2)
    s = pd.summarize(step * steps, steps)
    assert s["kernels_per_step"] == len(step)
    assert s["kernel_us"] == pytest.approx(sum(d for _, d in step))
    assert sum(s["role_us"].values()) == pytest.approx(s["kernel_us"])
    assert s["role_us"]["lm_head"] == pytest.approx(205.0)
    assert s["role_us"]["projection GEMV"] == pytest.approx(2 * (15 + 12.5 + 55 + 30))
    assert s["role_us"]["attention"] == pytest.approx(13.0)
    assert s["role_us"]["memset/memcpy"] == pytest.approx(3.0)
    assert s["role_kernels"] == {"projection GEMV": 8, "lm_head": 2, "attention": 2,
                                 "elementwise/norm": 11, "memset/memcpy": 3}
    top = s["top"]["projection GEMV"]
    assert top[0]["name"] == NVJET and top[0]["us"] == pytest.approx(2 * (15 + 12.5 + 55)) and top[0]["calls"] == 6
    assert top[1]["name"] == GEMV and top[1]["calls"] == 2
    assert s["top"]["elementwise/norm"][-1]["name"].startswith("at::native::vectorized_elementwise_kernel")


def test_kernels_from_trace_keeps_gpu_work_in_order() -> None:
    trace = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::add_", "ts": 0.5, "dur": 9.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 8.0},
        {"ph": "X", "cat": "kernel", "name": NVJET, "ts": 30.0, "dur": 15.0},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "## Call CompiledFxGraph", "ts": 9.0, "dur": 90.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": COPY, "ts": 10.0, "dur": 1.0},
        {"ph": "X", "cat": "kernel", "name": NORM, "ts": 20.25, "dur": 2.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 50.0, "dur": 0.75},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "ts": 30.0},
    ]}
    assert pd.kernels_from_trace(trace) == [(COPY, 1.0), (NORM, 2.0), (NVJET, 15.0), ("Memset (Device)", 0.75)]


def test_real_cpu_trace_parses() -> None:
    """The installed torch's Chrome trace export is JSON that kernels_from_trace reads (no GPU
    work in a CPU-only profile)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8).add_(1)
    path = Path(pd.tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(path))
    assert pd.kernels_from_trace(json.loads(path.read_text())) == []


def test_byte_floor_matches_background() -> None:
    """Llama-3-8B bf16 reads ~15.0 GB per token: floor ~285 tok/s dense, ~533 at 50% (lm_head dense)."""
    from generate import random_model, weight_bytes_per_token
    from linear import pack_model
    model = random_model("Llama-3-8B", torch.bfloat16, torch.device("meta"))
    dense = weight_bytes_per_token(model)
    assert dense / 1e9 == pytest.approx(15.0, abs=0.1)
    assert pd.READ_BW / dense == pytest.approx(285, rel=0.01)
    assert pd.READ_BW / weight_bytes_per_token(pack_model(model), 0.5) == pytest.approx(533, rel=0.01)
    kv = pd.kv_bytes(model.config, 1, 128, 2)
    assert kv == 2 * 32 * 8 * 128 * 128 * 2  # K and V, 32 layers, 8 KV heads, head_dim 128


def test_markdown_ends_with_the_table() -> None:
    s = pd.summarize(dense_step() * 2, 2)
    row = dict(weights="bf16", sparsity=0.0, path="nn.Linear (cuBLAS)", realized=0.0, step_us=400.0,
               tok_s=2500.0, floor_us=300.0, floor_tok_s=3333.0, gaps_us=400.0 - s["kernel_us"], **s)
    meta = dict(command="python benchmarks/profile_decode.py", gpu="GPU", torch="2.11", triton="3.6",
                date="2026-12-02", model="SmolLM2-135M", batch=1, context=128, kv_len=154, steps=2, label="before")
    lines = pd.markdown(meta, [row]).rstrip("\n").splitlines()
    assert lines[-1].startswith("| bf16 | nn.Linear (cuBLAS) | 0.00 |")
    assert lines[-3].startswith("| weights |") and "lm_head µs (n)" in lines[-3]
    assert lines[-1].count("|") == lines[-3].count("|") == lines[-2].count("|")
    assert any(line.startswith("- lm_head: `nvjet_tst") for line in lines)
    assert "label: before" in "\n".join(lines)


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_bad_model_is_one_line(tmp_path: Path) -> None:
    proc = run_script("--model", "NoSuchModel", "--out", str(tmp_path / "p"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: unknown model name 'NoSuchModel'")
    assert list(tmp_path.iterdir()) == []


def test_bench_decode_provides_the_setup() -> None:
    """The script reuses bench_decode's setup instead of copying it: fail here, not on the GPU."""
    import benchmarks.bench_decode as bench_decode
    import generate
    assert all(callable(getattr(bench_decode, f, None)) for f in ("apply_weights", "realized_on", "set_level"))
    assert all(callable(getattr(generate, f, None)) for f in ("decode_one_token", "random_model",
                                                                "weight_bytes_per_token", "Sampling"))


def test_bench_decode_results_name_the_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode result records the TEAL_ switches it ran under (an A/B of a switch is two files that
    differ only there), in the JSON and on the Markdown's command line."""
    import argparse

    import benchmarks.bench_decode as bench_decode
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setenv("TEAL_ATTENTION_O", "0")
    monkeypatch.delenv("TEAL_PDL", raising=False)
    args = argparse.Namespace(model="Llama-3-8B", tokens=256, runs=3, out=tmp_path / "d")
    rows = [dict(weights="int8", path="fused", sparsity=0.5, realized=0.5, tok_s=390.0, gb_s=3000.0)]
    bench_decode.write_results(args, rows)  # no bf16 row (--no-bf16_baseline): no ratio, no error
    assert "| 390.0 |  | 3000 |" in (tmp_path / "d.md").read_text()
    meta = json.loads((tmp_path / "d.json").read_text())["meta"]
    assert {k: v for k, v in meta["switches"].items() if k in ("TEAL_ATTENTION_O", "TEAL_PDL")} == {"TEAL_ATTENTION_O": "0"}
    assert "TEAL_ATTENTION_O=0 " in (tmp_path / "d.md").read_text()


def test_cli_bad_weights_is_one_line(tmp_path: Path) -> None:
    for bad in ("fp8", "bf16+lm_head"):
        proc = run_script("--weights", bad, "--out", str(tmp_path / "p"))
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: unknown --weights '{bad}'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_cli_without_gpu_is_one_line(tmp_path: Path) -> None:
    """The whole CPU-capable path: parse, validate, stop at the GPU check, write nothing."""
    import os
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = run_script("--model", "SmolLM2-135M", "--weights", "bf16", "int8+lm_head", "--sparsity", "0", "0.5",
                      "--label", "before", env=env)
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr == "error: profile_decode.py needs a CUDA GPU\n"
    assert list(tmp_path.iterdir()) == []


def test_default_out_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert pd.parse_args([]).out == tmp_path / "profile_decode"
    assert pd.parse_args(["--out", "x/y"]).out == Path("x/y")
    monkeypatch.delenv("OUT")
    assert pd.parse_args([]).out == Path("benchmarks/results/profile_decode")


def test_bench_decode_switches_alternate_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """--switches: each entry's variables are set while its fresh model is built, installed and timed,
    the entries alternate round after round, the seeded weights are calibrated once, the environment is
    restored after, and each row names its entry; a malformed entry is a one-line error."""
    import argparse

    import benchmarks.bench_decode as bench_decode
    seen = []  # (what ran, TEAL_X during it)
    env = lambda: os.environ.get("TEAL_X")  # noqa: E731

    class Model:
        config = None
    monkeypatch.setattr(bench_decode, "random_model", lambda *a, **k: seen.append(("build", env())) or Model())
    monkeypatch.setattr(bench_decode, "apply_weights", lambda *a: None)
    monkeypatch.setattr(bench_decode, "self_calibrated_thresholds", lambda *a: seen.append(("calibrate", env())) or {})
    monkeypatch.setattr(bench_decode, "install_fused_decode", lambda m: seen.append(("install", env())))
    monkeypatch.setattr(bench_decode, "set_level", lambda *a: None)
    monkeypatch.setattr(bench_decode, "realized_on", lambda m, level: level)
    monkeypatch.setattr(bench_decode, "time_decode", lambda *a: seen.append(("time", env())) or [100.0])
    monkeypatch.setattr(bench_decode, "weight_bytes_per_token", lambda *a: 1e9)
    monkeypatch.setattr(bench_decode.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_decode.torch, "compile", lambda f, **k: f)
    monkeypatch.setenv("TEAL_X", "outer")
    args = argparse.Namespace(model="Llama-3-8B", tokens=8, runs=1, calib_tokens=8, baselines=[],
                              weights=["int4-g128"], sparsity=[0.5], decode_path=["fused"], rounds=2,
                              bf16_baseline=True)
    variants = [bench_decode.parse_switches(e) for e in ("TEAL_X=0", "TEAL_X=1,TEAL_Y=2")]
    rows = bench_decode.measure(args, torch.device("cpu"), 1, variants)
    assert os.environ["TEAL_X"] == "outer" and "TEAL_Y" not in os.environ
    ours = [r["switches"] for r in rows[1:]]
    assert ours == ["TEAL_X=0", "TEAL_X=1,TEAL_Y=2"] * 2 and "switches" not in rows[0]
    assert [s for s in seen if s[0] == "calibrate"] == [("calibrate", "0")]
    after_baseline = [s for s in seen[2:] if s[0] != "calibrate"]  # the bf16 baseline's build and timing first
    assert after_baseline == [(what, value) for value in ("0", "1", "0", "1") for what in ("build", "install", "time")]
    seen.clear()  # --no-bf16_baseline: no bf16 model, no bf16 row
    rows = bench_decode.measure(argparse.Namespace(**{**vars(args), "bf16_baseline": False, "rounds": 1}),
                                torch.device("cpu"), 1, variants)
    assert [r["switches"] for r in rows] == ["TEAL_X=0", "TEAL_X=1,TEAL_Y=2"] and seen[0] == ("build", "0")
    assert bench_decode.parse_switches("-") == {}
    for bad in ("X=1", "TEAL_X", "TEAL_X="):
        with pytest.raises(SystemExit, match="expected TEAL_NAME=VALUE"):
            bench_decode.parse_switches(bad)


def test_bench_decode_weights_name_the_heads_format() -> None:
    """--weights: +lm_head stores the head in int8, +lm_head_int4 (int4 only) in the projections' int4
    format, as gpt-fast's int4 baseline does; anything else is a one-line error (profile_decode agrees)."""
    import argparse

    import benchmarks.bench_decode as bench_decode
    assert bench_decode.parse_weights("int4-g128+lm_head") == ("int4", 128, "int8")
    assert bench_decode.parse_weights("int4-g64+lm_head_int4") == ("int4", 64, "int4")
    assert bench_decode.parse_weights("int8") == ("int8", 0, None)
    for bad in ("int8+lm_head_int4", "bf16+lm_head", "int4-g128+head"):
        with pytest.raises(SystemExit, match="expected bf16, int8 or int4-g<G>"):
            bench_decode.parse_weights(bad)
    args = argparse.Namespace(model="Llama-3-8B", sparsity=[0.0], context=128, batch=1, steps=8,
                              weights=["int4-g128+lm_head_int4"])
    pd.check_args(args)
    with pytest.raises(ValueError, match="unknown --weights 'int8\\+lm_head_int4'"):
        pd.check_args(argparse.Namespace(**{**vars(args), "weights": ["int8+lm_head_int4"]}))
