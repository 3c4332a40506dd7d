"""Measured per-shape decode speed of the sparse kernel against the dense path, and the lookup
PackedLinear uses so that TEAL never makes a projection slower than dense.

kernels/speed_table.json is written by `benchmarks/bench_kernels.py --table` from runs on a GPU:
key "GPU|format|M<m>|K<k>|N<n>" -> {"dense_us": the dense path (cuBLAS x @ W^T for bf16/fp16; the
kernel at 0% for int8/int4, which have no other path), "sparse_us": {"<sparsity>": µs, ...},
"source": the command and date of the run}. Shapes nobody measured have no entry: the kernel is
used there (the caller reports them as unmeasured).
"""
from __future__ import annotations

import bisect
import functools
import json
from pathlib import Path

SPEED_TABLE_PATH = Path(__file__).with_name("speed_table.json")


def table_key(device_name: str, weight_format: str, m: int, k: int, n: int) -> str:
    return f"{device_name}|{weight_format}|M{m}|K{k}|N{n}"


@functools.cache
def speed_table() -> dict:
    return json.loads(SPEED_TABLE_PATH.read_text()) if SPEED_TABLE_PATH.exists() else {}


def sparse_beats_dense(device_name: str, weight_format: str, m: int, k: int, n: int,
                       sparsity: float) -> bool | None:
    """Whether the kernel at `sparsity` (linear between measured levels) is faster than the dense
    path for this shape; None if the shape was not measured. fp16 uses bf16's entries."""
    table = speed_table()
    fmt = "bf16" if weight_format == "fp16" else weight_format
    entry = table.get(table_key(device_name, fmt, m, k, n)) or table.get(table_key(device_name, fmt, 1, k, n))
    if entry is None:
        return None
    levels = sorted((float(s), us) for s, us in entry["sparse_us"].items())
    if len(levels) == 1:
        return levels[0][1] < entry["dense_us"]
    xs = [s for s, _ in levels]
    i = min(max(bisect.bisect_left(xs, sparsity), 1), len(xs) - 1)
    (s0, t0), (s1, t1) = levels[i - 1], levels[i]
    a = min(max((sparsity - s0) / (s1 - s0), 0.0), 1.0)  # clamp outside the measured range
    return t0 + a * (t1 - t0) < entry["dense_us"]
