"""Would a dense int4 GEMV on a K-packed copy beat tinygemm at batch 1? A lab measurement.

Issue 11 asks int4 decode for 1.2x gpt-fast's int4 (tinygemm). Our dense int4 calls already run
tinygemm on a copy of the weights (teal_kernels/tinygemm.py), and tinygemm reads a Llama-3-8B layer at
~2 TB/s (68 µs for ~118 MB, results/int4_tinygemm/), under half the memory's speed. Every GEMV of
ours so far reads the layout TEAL needs (nibbles packed along N, so that a zeroed input skips its
row), whose inner loops were bound by conversions and barriers (results/NOTES.md). A dense call
does not skip rows, so its copy can take any layout. This one is output-major ([N, K / 8] int32
words, kpack): a word holds eight K of one output, one from each eighth of its group, so that
nibble i of a group's consecutive words meets consecutive x. So:
- a thread reads 16 contiguous bytes (32 weights of one output row);
- its sums stay in its registers: no shuffles or shared memory in the loop;
- each group's scale multiplies a per-word partial sum once (1/8 op a weight);
- the zero point adds z * sum(x) once a word.

A code becomes a float without I2F, exactly (2^23 + q, then an FADD: shift, LOP3, FADD, FFMA a
weight) or as 1 + q / 16 with the offset taken off once a word (shift, LOP3, FFMA); the kernel's
docstring says what that costs in precision. Local sm_90 SASS (triton 3.6) counts 5.2 (1 + q / 16,
128 outputs a program) to ~7 instructions a weight in the loop, x's conversion and sums included.
Each program owns BLOCK_N outputs over all of K (no split, no reduction pass); Triton pipelines the
word loads num_stages deep.

Rows of the table, µs a call, CUDA graphs over rotating weight copies (benchmarks/timing.py):
  lab             this kernel, each of CONFIGS, checked against float64 first (best shown)
  tinygemm        torch's _weight_int4pack_mm on its own copy (what dense int4 decode runs now)
  floor           the packed bytes (codes + fp32 scales and zeros) at 4.28 TB/s

    python -m benchmarks.int4_kpacked_lab --out benchmarks/results/int4_kpacked_lab
    TRITON_INTERPRET=1 python -m benchmarks.int4_kpacked_lab --selftest   # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import triton
import triton.language as tl

from benchmarks.timing import MODEL_SHAPES, copies_for, graph_time_us, make_weight, make_x
from files import write_report
from teal_kernels.reference import dequantize_weight

FLOOR_TB_S = 4.28  # the byte floor's bandwidth used throughout results/
# (BLOCK_N, groups a step, warps, stages, unit, split): outputs a program, K groups its step reads,
# launch, the code conversion (the kernel's UNIT), programs along K (their fp32 partials summed by torch
# after the kernel: two more launches, timed; the kernel alone is timed too, as the bound of a fused sum)
CONFIGS = ([(bn, 1, 4, 3, False, 1) for bn in (16, 64, 128)]
           + [(bn, gs, w, st, True, 1) for bn, gs, w, st in ((16, 1, 4, 3), (32, 1, 4, 3), (64, 1, 4, 3), (32, 2, 4, 3),
                                                             (64, 2, 8, 3), (32, 1, 4, 5), (16, 2, 2, 4), (64, 1, 2, 4),
                                                             (128, 1, 4, 3))]
           + [(bn, gs, w, st, True, split) for split in (2, 4)
              for bn, gs, w, st in ((16, 1, 4, 3), (32, 1, 4, 3), (32, 2, 4, 4), (64, 1, 4, 3), (16, 2, 2, 4))])


def kpack(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """Our int4 layout (uint8 [K, N / 2], column 2c in the low nibble; scales and zeros [K / g, N]) ->
    (words int32 [N, K / 8], scales [N, K / g], zeros [N, K / g]). Within group g of output n, nibble i
    of word j holds K = g * group + i * (group / 8) + j: so nibble i of a group's consecutive words
    meets consecutive x, one contiguous load a nibble."""
    k, n = w.shape[0], w.shape[1] * 2
    if group % 8 or k % group:
        raise ValueError(f"kpack needs the group a multiple of 8 dividing K, got group {group}, K {k}")
    q = torch.stack((w & 0xF, w >> 4), dim=-1).reshape(k, n).t().to(torch.int64)  # [N, K] codes
    q = q.reshape(n, k // group, 8, group // 8)  # [N, group, nibble i, word j]
    words = sum(q[:, :, i] << (4 * i) for i in range(8)).reshape(n, k // 8)  # 0 .. 2^32 - 1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.contiguous(), scales.t().contiguous(), zeros.t().contiguous()


@triton.jit
def _unit_float(bits, INTERPRET: tl.constexpr):
    """uint32 with a code in bits 19-22 (anything elsewhere) -> 1 + code / 16 as float32: one LOP3
    ((bits & 0x00780000) | 0x3F800000); as two plain operations ptxas keeps it two instructions (one
    immediate each)."""
    if INTERPRET:
        return ((bits & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
    return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00780000, 0x3F800000, 0xEA;", "=r,r", [bits],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _kpacked_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, K, N,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_A_STEP: tl.constexpr,
                         STAGES: tl.constexpr, UNIT: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr):
    """out[n] = sum_k x[k] * ((q[n, k] - 8) * s[n, k // GROUP] + z[n, k // GROUP]) for BLOCK_N outputs.

    A code becomes a float without I2F, in one of two ways (UNIT):
    - False: 2^23 + q from the bits, then an FADD of -(2^23 + 8) gives q - 8 exactly (4 ops a weight);
    - True: 1 + q / 16 from the bits (the nibble in the mantissa's top four bits), and the offset is
      taken off once a word: sum x (q - 8) = 16 (sum x (1 + q / 16) - 1.5 sum x) (3 ops a weight; the
      subtraction costs a few bits of the word's float32 sum).
    With SPLIT > 1, program (i, j) sums the j-th SPLIT-th of K into float32 row j of out ([SPLIT, N]);
    the caller adds the rows (more programs in flight where N / BLOCK_N alone leaves SMs short of loads)."""
    WPG: tl.constexpr = GROUP // 8  # words of one output in a group
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    words_a_row = K // 8
    groups_a_row = K // GROUP
    j = tl.arange(0, WPG)
    acc = tl.zeros([BLOCK_N, WPG], dtype=tl.float32)
    groups_a_split = groups_a_row // SPLIT
    for g0 in tl.range(split * groups_a_split, (split + 1) * groups_a_split, GROUPS_A_STEP, num_stages=STAGES):
        for gi in tl.static_range(GROUPS_A_STEP):
            g = g0 + gi
            words = tl.load(w_ptr + n[:, None] * words_a_row + (g * WPG + j)[None, :], mask=n_ok[:, None], other=0)
            words = words.to(tl.uint32, bitcast=True)  # logical shifts
            part = tl.zeros([BLOCK_N, WPG], dtype=tl.float32)
            x_sum = tl.zeros([WPG], dtype=tl.float32)  # each word's 8 inputs, summed
            for i in tl.static_range(8):
                x_i = tl.load(x_ptr + g * GROUP + i * WPG + j).to(tl.float32)
                if UNIT:  # nibble i to bits 19-22, under 1.0's exponent
                    shifted = words << (19 - 4 * i) if i < 5 else words >> (4 * i - 19)
                    part += _unit_float(shifted, INTERPRET) * x_i[None, :]
                else:
                    bits = ((words >> (4 * i)) & 0xF) | 0x4B000000
                    part += (bits.to(tl.float32, bitcast=True) - 8388616.0) * x_i[None, :]
                x_sum += x_i
            s = tl.load(s_ptr + n * groups_a_row + g, mask=n_ok, other=0.0)
            z = tl.load(z_ptr + n * groups_a_row + g, mask=n_ok, other=0.0)
            if UNIT:
                part = 16.0 * (part - 1.5 * x_sum[None, :])
            acc += part * s[:, None] + z[:, None] * x_sum[None, :]
    tl.store(out_ptr + split * N + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=n_ok)


def kpacked_gemv(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                 config: tuple[int, int, int, int, bool, int] = CONFIGS[0], reduce: bool = True) -> torch.Tensor:
    """x [1, K] (bf16/fp16) @ the K-packed int4 matrix -> [1, N] in x's dtype. Rejects, one line,
    a batch other than 1, shapes that do not match, and K not a whole number of steps in each split.
    reduce=False returns a split config's float32 partials [SPLIT, N] unsummed (to time the kernel alone)."""
    block_n, groups_a_step, warps, stages, unit, split = config
    n, k = words.shape[0], words.shape[1] * 8
    if x.shape != (1, k) or scales.shape != (n, k // group) or zeros.shape != scales.shape:
        raise ValueError(f"kpacked_gemv needs x [1, {k}] and scales / zeros [{n}, {k // group}], got "
                         f"{tuple(x.shape)}, {tuple(scales.shape)}, {tuple(zeros.shape)}")
    if group % 8 or not fits(k, group, config):
        raise ValueError(f"kpacked_gemv needs the group ({group}) a multiple of 8 and K ({k}) a multiple of "
                         f"{groups_a_step} groups times {split} splits")
    out = torch.empty(split, n, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    interpret = not isinstance(_kpacked_gemv_kernel, triton.runtime.jit.JITFunction)
    _kpacked_gemv_kernel[(triton.cdiv(n, block_n), split)](
        x, words, scales, zeros, out, k, n, GROUP=group, BLOCK_N=block_n, GROUPS_A_STEP=groups_a_step,
        STAGES=stages, UNIT=unit, SPLIT=split, INTERPRET=interpret, num_warps=warps)
    if split == 1 or not reduce:
        return out
    return out.sum(0, keepdim=True).to(x.dtype)


def fits(k: int, group: int, config: tuple[int, int, int, int, bool, int]) -> bool:
    """Whether K splits into config's splits of whole steps."""
    return k % (group * config[1] * config[5]) == 0


def reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x @ W in float64, the bound of an output's error): one unit in the last place of x's dtype
    (the output's rounding; the interpreter truncates) plus a float32 sum's error, 1e-5 of sum |x| |W|
    as the GEMV tests allow (tests/test_kernels.py); W the reference's real weight."""
    real = dequantize_weight(w.cpu(), scales.cpu(), zeros.cpu(), group).double()
    exact = x.cpu().double() @ real
    eps = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-10
    return exact, eps * exact.abs() + 1e-5 * (x.cpu().double().abs() @ real.abs()) + 1e-30


def max_error(got: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Largest |got - x @ W| in units of its bound (`want`: reference's pair)."""
    exact, bound = want
    return ((got.cpu().double() - exact).abs() / bound).max().item()


def selftest() -> None:
    """Tiny shapes against float64 (the interpreter on the CPU); raises on a mismatch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for k, n, group in ((256, 48, 64), (512, 40, 128), (128, 16, 32)):
        w, scales, zeros, _ = make_weight(f"int4-g{group}", k, n, device, seed=k + n)
        x = make_x(1, k, torch.bfloat16, device, seed=n)
        packed = kpack(w, scales, zeros, group)
        want = reference(x, w, scales, zeros, group)
        for config in ((16, 1, 4, 3, False, 1), (32, 2, 4, 2, False, 1), (16, 1, 4, 3, True, 1),
                       (32, 2, 4, 2, True, 1), (16, 1, 4, 3, True, 2), (32, 1, 4, 2, False, 4)):
            if fits(k, group, config):
                err = max_error(kpacked_gemv(x, *packed, group, config), want)
                if err > 1.0:
                    raise AssertionError(f"K={k} N={n} group {group} {config}: error {err:.3g} of its bound")
    print("selftest passed")


def bench(group: int, configs: list[tuple[int, int, int, int, bool, int]]) -> list[dict]:
    """Per 8B matrix: every config (checked first), tinygemm, and the byte floor, µs a call."""
    from teal_kernels.tinygemm import int4pack, int4pack_mm

    rows = []
    for layer, k, splits in MODEL_SHAPES["llama3-8b"]:
        n = sum(splits)
        copies = [make_weight(f"int4-g{group}", k, n, "cuda", seed=i) for i in range(2)]
        nbytes = sum(t.numel() * t.element_size() for t in copies[0][:3])
        copies += [make_weight(f"int4-g{group}", k, n, "cuda", seed=i) for i in range(2, copies_for(nbytes))]
        x = make_x(1, k, torch.bfloat16, "cuda", seed=0)
        packed = [kpack(*c[:3], group) for c in copies]
        tiny = [int4pack(*c[:3], group) for c in copies]
        row = {"layer": layer, "K": k, "N": n, "floor_us": nbytes / (FLOOR_TB_S * 1e6),
               "tinygemm_us": graph_time_us(lambda i: int4pack_mm(x, *tiny[i], group), len(tiny)), "lab_us": {},
               "kernel_only_us": {}}
        want = reference(x, *copies[0][:3], group)
        for config in configs:
            if not fits(k, group, config):
                continue
            err = max_error(kpacked_gemv(x, *packed[0], group, config), want)
            if err > 1.0:
                raise AssertionError(f"{layer} {config}: error {err:.3g} of its bound")
            row["lab_us"][str(config)] = graph_time_us(lambda i, c=config: kpacked_gemv(x, *packed[i], group, c),
                                                       len(packed))
            note = ""
            if config[5] > 1:
                row["kernel_only_us"][str(config)] = graph_time_us(
                    lambda i, c=config: kpacked_gemv(x, *packed[i], group, c, reduce=False), len(packed))
                note = f" (kernel alone {row['kernel_only_us'][str(config)]:.1f})"
            print(f"  {layer} {config}: {row['lab_us'][str(config)]:.1f} µs{note}", flush=True)
        rows.append(row)
        best = min(row["lab_us"].items(), key=lambda kv: kv[1])
        print(f"{layer}: tinygemm {row['tinygemm_us']:.1f} µs, best lab {best[1]:.1f} {best[0]}, "
              f"floor {row['floor_us']:.1f}", flush=True)
        del copies, packed, tiny
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128),
                   help="int4 group size (default 128)")
    p.add_argument("--selftest", action="store_true", help="tiny shapes against float64 (CPU: TRITON_INTERPRET=1)")
    p.add_argument("--out", default="benchmarks/results/int4_kpacked_lab/lab",
                   help="OUT.json and OUT.md (default benchmarks/results/int4_kpacked_lab/lab)")
    args = p.parse_args(argv)
    if args.selftest:
        selftest()
        return 0
    if not torch.cuda.is_available():
        print("error: int4_kpacked_lab needs a CUDA GPU (or --selftest under TRITON_INTERPRET=1)", file=sys.stderr)
        return 1
    rows = bench(args.group, CONFIGS)
    layer = {key: sum(r[key] for r in rows) for key in ("tinygemm_us", "floor_us")}
    layer["lab_us"] = sum(min(r["lab_us"].values()) for r in rows)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "group": args.group}
    lines = [f"# int4 GEMV on a K-packed copy against tinygemm ({meta['gpu']}, {meta['date']})", "",
             f"`{meta['command']}`; µs a call, batch 1, CUDA graphs over rotating weights; "
             "(BLOCK_N, groups a step, warps, stages, UNIT: 1 + q / 16 codes, splits along K); a split's time "
             "includes torch's sum of its partials; 'kernel alone' is the best split kernel without that sum", "",
             "| matrix | floor | tinygemm | best lab | its config | best split kernel alone |", "|---|---|---|---|---|---|"]
    for r in rows:
        best = min(r["lab_us"].items(), key=lambda kv: kv[1])
        alone = min(r["kernel_only_us"].values(), default=float("nan"))
        lines.append(f"| {r['layer']} | {r['floor_us']:.1f} | {r['tinygemm_us']:.1f} | {best[1]:.1f} | {best[0]} "
                     f"| {alone:.1f} |")
    lines.append(f"| a layer | {layer['floor_us']:.1f} | {layer['tinygemm_us']:.1f} | {layer['lab_us']:.1f} | | |")
    write_report(args.out, {"meta": meta, "rows": rows, "layer": layer}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
