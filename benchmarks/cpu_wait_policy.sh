#!/usr/bin/env bash
# Usage: benchmarks/cpu_wait_policy.sh (needs checkpoints/SmolLM2-135M-Instruct and its thresholds: `make demo` makes both).
# OMP wait policies on this 2-vCPU VM: idle, then with one busy-loop process on the cores.
cd "$(dirname "$0")/.."
out=docs/cpu/wait_policy
run() {  # label, env...
  local label=$1; shift
  env OMP_NUM_THREADS=2 "$@" timeout 400 .venv/bin/python benchmarks/bench_cpu.py --formats bf16 --sparsity 0 0.5 --modes compiled --runs 3 --tokens 64 --thresholds checkpoints/SmolLM2-135M-Instruct/teal_thresholds.safetensors --out $out/$label 2>&1 | grep "^| bf16" | sed "s/^/$label /"
}
date -u
for load in idle hog; do
  if [ $load = hog ]; then python3 -c "
while True: pass" & hog=$!; sleep 1; fi
  run ${load}_passive OMP_WAIT_POLICY=PASSIVE
  run ${load}_spin20k OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=20000
  run ${load}_active OMP_WAIT_POLICY=ACTIVE
  if [ $load = hog ]; then kill $hog; fi
done
date -u
