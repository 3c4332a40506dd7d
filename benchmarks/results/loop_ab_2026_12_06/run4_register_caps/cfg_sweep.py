"""One-off record (forty-third session): int4-g128 gather configs with more programs a wave (register
caps) against the stored ones, Llama-3-8B gate|up and down at 50% with decode's fusions, timed as
tune_kernels times candidates (median of three). Run from the repository root on a GPU:
PYTHONPATH=. python3 benchmarks/results/loop_ab_2026_12_06/run4_register_caps/cfg_sweep.py OUT.json"""
import json, sys, torch
from benchmarks.timing import decode_fusions
from benchmarks.tune_kernels import build_problems, fitted, is_correct, time_config
from teal_kernels.reference import sparse_gemv_reference
from teal_kernels.triton_gemv import KernelConfig
G = dict(design="gather", compact=True, num_warps=4)
shapes = {
    "gate_up": (4096, [14336, 14336], [
        dict(block_k=1024, block_n=512, sub_k=64, num_stages=4),  # stored
        dict(block_k=512, block_n=512, sub_k=64, num_stages=4),
        dict(block_k=512, block_n=512, sub_k=64, num_stages=4, max_registers=128),
        dict(block_k=512, block_n=512, sub_k=32, num_stages=6, max_registers=128),
        dict(block_k=512, block_n=512, sub_k=64, num_stages=4, max_registers=168),
        dict(block_k=1024, block_n=256, sub_k=64, num_stages=4, max_registers=128),
        dict(block_k=1024, block_n=512, sub_k=64, num_stages=4, max_registers=168),
        dict(block_k=256, block_n=512, sub_k=64, num_stages=4, max_registers=128),
    ]),
    "down": (14336, [4096], [
        dict(block_k=512, block_n=512, sub_k=32, num_stages=6),  # stored
        dict(block_k=256, block_n=512, sub_k=32, num_stages=6, max_registers=128),
        dict(block_k=512, block_n=256, sub_k=32, num_stages=6, max_registers=128),
        dict(block_k=512, block_n=512, sub_k=32, num_stages=6, max_registers=168),
        dict(block_k=256, block_n=512, sub_k=32, num_stages=6),
        dict(block_k=1024, block_n=512, sub_k=32, num_stages=6),
    ]),
}
rows = []
for layer, (k, splits, cfgs) in shapes.items():
    fus = decode_fusions(layer, "int4-g128", 1)
    problems = build_problems("int4-g128", 1, k, splits, 0.5, fus)
    ref = sparse_gemv_reference(*problems[0].args(), **problems[0].fusion).float()
    for d in cfgs:
        c = fitted([KernelConfig(**G, **d)], "int4-g128", 1, k, splits)
        if not c or not is_correct(c[0], problems[0], ref):
            rows.append((layer, d, None)); continue
        ts = sorted(time_config(c[0], problems) for _ in range(3))
        rows.append((layer, c[0].to_dict(), ts[1]))
    del problems
json.dump([list(r) for r in rows], open(sys.argv[1], "w"), indent=1)
print(f"# gather register caps, {torch.cuda.get_device_name()}, int4-g128, 50%, decode fusions, median of 3 graph timings")
for layer, d, t in rows:
    print(f"| {layer} | bk {d['block_k']} bn {d['block_n']} sk {d['sub_k']} st {d['num_stages']} reg {d.get('max_registers', 0)} | {t and round(t, 2)} |")
