"""One sparse GEMV call at a Llama-3-8B shape (M = 1, the stored config; bf16 unless --format),
for Nsight Compute: where a call's warps stall, per instruction (phase ``ncu`` of
h200_session.sh; int4 and int8 take the "dot" kernel or the "rows" one as tuned, so the -k regex
names both)::

    ncu --clock-control none --cache-control none -k regex:"_sparse_gemv_kernel|_dot_gemv_kernel" \\
        --launch-skip 3 --launch-count 1 --set full --import-source yes -o OUT \\
        python3 -m benchmarks.ncu_gemv --layer qkv --sparsity 0.5 --format int4-g128

``--sparsity none`` sets an infinite threshold (no weight row read: the call's fixed cost alone).
``--gemm_rows M`` profiles a dense quantized prefill's GEMM instead (teal::quant_gemm's
``_quant_gemm_kernel`` at M rows, its heuristic config; ``--int4_vec`` and ``--int4_scales`` change
int4's bytes a thread reads together and where its scales come from; phase ``quant_gemm_ncu``).
``--mma`` profiles teal_kernels/int4_mma.py's ``_int4_mma_kernel`` (int4-g128, dense, its config_for
launch) on the same weights instead (phase ``mma_stalls``).
The first three calls compile and warm up; the fourth is the one to profile.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import MODEL_SHAPES, make_weight, make_x, parse_format, threshold_for
from cli import FRACTION
from teal_kernels.dequantize import INT4_SCALES, quant_gemm_config, quant_gemm_triton
from teal_kernels.triton_gemv import sparse_gemv_triton


def sparsity_or_none(text: str) -> float | None:
    """A fraction in [0, 1), or 'none' (None: an infinite threshold)."""
    return None if text == "none" else FRACTION(text)


def main() -> None:
    layers = {layer: (k, splits) for layer, k, splits in MODEL_SHAPES["llama3-8b"]}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", choices=sorted(layers), required=True, help="Llama-3-8B projection")
    parser.add_argument("--sparsity", type=sparsity_or_none, default=0.5,
                        help="fraction of x zeroed, or 'none': no row kept")
    parser.add_argument("--format", default="bf16", help="bf16, fp16, int8 or int4-g<group> (random weights)")
    parser.add_argument("--gemm_rows", type=int, default=0, metavar="M",
                        help="profile quant_gemm_triton (int8 / int4 formats) at M rows instead of the GEMV")
    parser.add_argument("--int4_vec", type=int, choices=(1, 2, 4, 8, 16), default=None,
                        help="with --gemm_rows and int4: bytes of a packed row a thread reads together "
                             "(GemmConfig.int4_vec; default: the heuristic's, 4; 16 holds 32 columns a thread)")
    parser.add_argument("--int4_scales", choices=INT4_SCALES, default=None,
                        help="with --gemm_rows and int4: load the scales with each tile (step), once a group "
                             "(group) or a group early (ahead): GemmConfig.int4_scales (default: the heuristic's)")
    parser.add_argument("--mma", action="store_true",
                        help="profile int4_mma (dense, int4-g128 only) on the same weights instead of the GEMV")
    args = parser.parse_args()
    try:
        parse_format(args.format)
    except ValueError as e:
        parser.error(str(e))
    if args.gemm_rows < 0 or (args.gemm_rows and not args.format.startswith("int")):
        parser.error("--gemm_rows takes a positive row count and an int8 / int4 format")
    if args.mma and (args.format != "int4-g128" or args.gemm_rows):
        parser.error("--mma takes --format int4-g128 and no --gemm_rows")
    if not torch.cuda.is_available():
        raise SystemExit("error: benchmarks.ncu_gemv needs a CUDA GPU")
    k, splits = layers[args.layer]
    w, scales, zeros, group = make_weight(args.format, k, sum(splits), "cuda", seed=1)
    x = make_x(max(args.gemm_rows, 1), k, torch.float16 if args.format == "fp16" else torch.bfloat16, "cuda", seed=0)
    if args.gemm_rows:
        config = quant_gemm_config(args.gemm_rows, group)
        config = config._replace(int4_vec=args.int4_vec or config.int4_vec,
                                 int4_scales=args.int4_scales or config.int4_scales)
        for _ in range(4):
            quant_gemm_triton(x, w, scales, zeros, group, config)
        torch.cuda.synchronize()
        return
    if args.mma:
        from linear import int4_mma_scale_dtype
        from teal_kernels.int4_mma import int4_mma, pack
        packed = pack(w, scales, zeros, scale_dtype=int4_mma_scale_dtype())  # the product's copy
        for _ in range(4):
            int4_mma(x, *packed)
        torch.cuda.synchronize()
        return
    if args.sparsity is None:
        thr = torch.full((len(splits),), float("inf"), device="cuda")
    else:
        thr = threshold_for(x, args.sparsity, len(splits))
    for _ in range(4):
        sparse_gemv_triton(x, w, thr, splits, scales, zeros, group)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
