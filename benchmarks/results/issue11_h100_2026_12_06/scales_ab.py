"""The per-call A/B of run 6 (run as benchmarks/_ab_tmp.py on the H100, 2026-12-06; kept here as the record of
its command): int4-g128 at 50%, the stored config of each 8B shape (the H200's rows: this call's tree had
no H100 rows yet), float32 then bf16 scales and zeros, twice, graph-timed over 4 rotating weights."""
import torch
from benchmarks.timing import MODEL_SHAPES, Problem, copies_for, graph_time_us, make_weight, make_x, threshold_for
from teal_kernels.triton_gemv import get_config, gpu_name, sparse_gemv_triton
for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
    n = sum(splits)
    ws = [make_weight("int4-g128", k, n, "cuda", seed=1 + i) for i in range(4)]
    x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
    cfg = get_config(gpu_name(x.device), "int4-g128", 1, k, n)
    thr = threshold_for(x, 0.5, len(splits))
    row = [layer, cfg.design]
    for dt in (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16):
        ps = [Problem(x, w, thr, splits, s.to(dt), z.to(dt), g) for w, s, z, g in ws]
        row.append(round(graph_time_us(lambda i: sparse_gemv_triton(*ps[i].args(), config=cfg), len(ps)), 2))
    print(row, flush=True)
