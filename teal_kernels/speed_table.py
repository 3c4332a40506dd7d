"""Measured per-shape decode speed of the sparse kernel against the dense path, and the lookup
PackedLinear uses so that TEAL never makes a projection slower than dense.

teal_kernels/speed_table.json is written by `benchmarks/bench_kernels.py --table` from runs on a GPU:
key "GPU|format|M<m>|K<k>|N<n>" -> {"dense_us": the dense path (cuBLAS x @ W^T for bf16/fp16; the
kernel at 0% for int8/int4), "sparse_us": {"<sparsity>": µs, ...}, for int4 "tinygemm_us": torch's
tinygemm on the shape (the dense path of a layer with a tinygemm copy, linear.TINYGEMM_ENV) and for
int4-g128 "int4_mma_us": teal_kernels/int4_mma.py's kernel (that of a layer with its copy,
linear.INT4_MMA_ENV), and
"source": the command and date of the run, and where another GPU's timings were adopted for this
one, "adopted": the end-to-end measurement that decided it}. Shapes nobody measured have no entry:
there a size model decides (estimated_sparse_beats_dense), and the caller reports them as estimated.
"""
from __future__ import annotations

import bisect
import functools
import json
from pathlib import Path

SPEED_TABLE_PATH = Path(__file__).with_name("speed_table.json")


def table_key(device_name: str, weight_format: str, m: int, k: int, n: int) -> str:
    return f"{device_name}|{weight_format}|M{m}|K{k}|N{n}"


# GPUs whose measurements stand in for a GPU (by name prefix) on keys it has none of its own for.
# The H100 is the H200's chip (sm_90, 132 SMs, 227 KB of shared memory an SM) with less memory
# bandwidth, so the H200's configs fit it and its verdicts scale alike; untuned, an H100 would
# otherwise fall back to the heuristics and the size model on every Llama shape.
STAND_INS = {"NVIDIA H100": "NVIDIA H200"}


def lookup_names(device_name: str) -> list[str]:
    """Device names to look a key up under, in order: the GPU's own, then its stand-in's."""
    return [device_name] + [sub for prefix, sub in STAND_INS.items()
                            if device_name.startswith(prefix) and sub != device_name]


@functools.cache
def speed_table() -> dict:
    return json.loads(SPEED_TABLE_PATH.read_text()) if SPEED_TABLE_PATH.exists() else {}


def measured_on(device_name: str, weight_format: str, m: int, k: int, n: int, dense: str = "dense_us") -> str | None:
    """The GPU whose entry sparse_beats_dense reads for this shape: the first of lookup_names (the
    GPU's own, then its stand-in's) with an entry, or None where none has one or that entry has no
    `dense` time (fp16 reads bf16's entries)."""
    table = speed_table()
    fmt = "bf16" if weight_format == "fp16" else weight_format
    name = next((name for name in lookup_names(device_name) if table_key(name, fmt, m, k, n) in table), None)
    return None if name is None or table[table_key(name, fmt, m, k, n)].get(dense) is None else name


def sparse_beats_dense(device_name: str, weight_format: str, m: int, k: int, n: int,
                       sparsity: float, dense: str = "dense_us") -> bool | None:
    """Whether the kernel at `sparsity` (linear between measured levels) is faster than the dense
    path (`dense`: the entry's field that times it) for this shape and batch size; None if they
    were not measured (on this GPU or its stand-in, lookup_names). fp16 uses bf16's
    entries. A batch never borrows the batch-1 entry: it reads the union of its rows' kept rows
    (Llama-3-8B bf16 at 50%, batch 4 / 8: the kernel 0.91x / 0.85x of dense, where batch 1 gains
    1.39x; benchmarks/results/context_batch/)."""
    name = measured_on(device_name, weight_format, m, k, n, dense)
    if name is None:
        return None
    entry = speed_table()[table_key(name, "bf16" if weight_format == "fp16" else weight_format, m, k, n)]
    levels = sorted((float(s), us) for s, us in entry["sparse_us"].items())
    if len(levels) == 1:
        return levels[0][1] < entry[dense]
    xs = [s for s, _ in levels]
    i = min(max(bisect.bisect_left(xs, sparsity), 1), len(xs) - 1)
    (s0, t0), (s1, t1) = levels[i - 1], levels[i]
    a = min(max((sparsity - s0) / (s1 - s0), 0.0), 1.0)  # clamp outside the measured range
    return t0 + a * (t1 - t0) < entry[dense]


# The size model for shapes nobody measured, fitted (least squares) to the H200's bf16 rows of
# benchmarks/results/kernels_llama3_8b_planes.md (2026-12-02; Llama-3-8B shapes, 0.4/0.5/0.65):
# the kernel takes 7.36 us + kept bytes at 3.75 TB/s, cuBLAS 6.17 us + all bytes at 4.74 TB/s.
# Break-even: 15 MB of bf16 weight at 50%, 23 MB at 40%, 108 MB at 25%; SmolLM2's matrices
# (1-4 MB) stay dense, where the kernel measured 6.7 us per call against cuBLAS's 3.7.
_SPARSE_FIXED_US, _SPARSE_MB_PER_US = 7.36, 3.747
_DENSE_FIXED_US, _DENSE_MB_PER_US = 6.17, 4.735


def estimated_sparse_beats_dense(weight_format: str, k: int, n: int, sparsity: float, rows: int = 1) -> bool:
    """The size model's verdict for an unmeasured float shape; int8/int4 have no other decode
    path than the kernel (its 0% is their dense path), so skipping rows always pays there. A
    batch of `rows` reads every weight row that any of its rows keeps: with the rows' zeros taken
    as independent, a fraction sparsity ** rows is skipped (50% at batch 4: 6%, so dense)."""
    if weight_format not in ("bf16", "fp16"):
        return True
    mb = k * n * 2 / 1e6
    sparse_us = _SPARSE_FIXED_US + (1 - sparsity ** rows) * mb / _SPARSE_MB_PER_US
    return sparse_us < _DENSE_FIXED_US + mb / _DENSE_MB_PER_US
