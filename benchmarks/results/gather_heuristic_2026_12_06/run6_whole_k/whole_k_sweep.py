"""One-off record (forty-fourth session): bf16 gather tiles that each cover the whole of K (one K block,
so no split-K partials, ticket or last-program sum) and few columns, against the stored configs,
Llama-3-8B q|k|v and o at 50% with decode's fusions, timed as tune_kernels times candidates (median of
three). Run from the repository root on a GPU:
PYTHONPATH=. python3 benchmarks/results/gather_heuristic_2026_12_06/run6_whole_k/whole_k_sweep.py OUT.json"""
import json, sys, torch
from benchmarks.timing import decode_fusions
from benchmarks.tune_kernels import build_problems, fitted, is_correct, time_config
from teal_kernels.reference import sparse_gemv_reference
from teal_kernels.triton_gemv import KernelConfig, get_config, gpu_name
G = dict(design="gather", compact=True, num_warps=4)
whole = [dict(block_k=4096, block_n=32, sub_k=64, num_stages=6), dict(block_k=4096, block_n=64, sub_k=64, num_stages=8),
         dict(block_k=4096, block_n=16, sub_k=128, num_stages=8), dict(block_k=2048, block_n=64, sub_k=64, num_stages=6)]
shapes = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096])}
rows = []
for layer, (k, splits) in shapes.items():
    fus = decode_fusions(layer, "bf16", 1)
    problems = build_problems("bf16", 1, k, splits, 0.5, fus)
    ref = sparse_gemv_reference(*problems[0].args(), **problems[0].fusion).float()
    stored = get_config(gpu_name(problems[0].x.device), "bf16", 1, k, sum(splits))
    for cfg in [stored] + [KernelConfig(**G, **d) for d in whole]:
        c = fitted([cfg], "bf16", 1, k, splits)
        if not c or not is_correct(c[0], problems[0], ref):
            rows.append((layer, cfg.to_dict(), None)); continue
        ts = sorted(time_config(c[0], problems) for _ in range(3))
        rows.append((layer, c[0].to_dict(), ts[1]))
        print(layer, c[0].to_dict(), round(ts[1], 2), flush=True)
        json.dump([list(r) for r in rows], open(sys.argv[1], "w"), indent=1)
    del problems
print(f"# whole-K gather tiles, {torch.cuda.get_device_name()}, bf16, 50%, decode fusions, median of 3 graph timings")
for layer, d, t in rows:
    print(f"| {layer} | bk {d['block_k']} bn {d['block_n']} sk {d['sub_k']} st {d['num_stages']} | {t and round(t, 2)} |")
