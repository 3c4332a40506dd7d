"""Dense int4 products through torch's tinygemm (`aten._weight_int4pack_mm`), gpt-fast's int4 kernel.

Why: per matrix on the H200 tinygemm reads int4 faster than our GEMV does without skipping rows
(Llama-3-8B layer 68.2 µs against our 86.5 dense and 78.6 at 50%, q|k|v 9.6 / 13.3, o 6.9 / 12.3,
gate|up 33.1 / 37.0, down 18.6 / 23.9: benchmarks/results/int4_tinygemm/). It cannot skip rows, so
it is a dense path only: PackedLinear keeps its own [K, N / 2] layout for TEAL's sparse calls and, on
CUDA by default, a tinygemm copy of the same weights for its dense decode calls (linear.py, TINYGEMM_ENV).

The copy is exact in the codes and rounds the scales and zeros to bf16 (tinygemm's format): each
dequantized weight (q - 8) * s + z then differs from the float32 reference by those two roundings
(relative 2^-9 each), as gpt-fast's own int4 does. tinygemm takes bf16 activations only, K a multiple
of 32 and N of 8. CPU builds of torch have twins of both ops (`_for_cpu`) with their own packing, so
a copy is made for the device it runs on and tested on the CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

_INNER_K_TILES = (8, 4, 2)  # tinygemm's choices; the largest that divides K wins


def int4pack_fits(k: int, n: int, group_size: int, dtype: torch.dtype) -> bool:
    """Whether tinygemm takes a [K, N] int4 matrix of this group size for `dtype` activations."""
    return (dtype == torch.bfloat16 and k % 32 == 0 and n % 8 == 0 and group_size in (32, 64, 128, 256)
            and k % group_size == 0)


def pack_codes(q: Tensor) -> Tensor:
    """int4 codes q [N, K] (int32, 0..15, one output row per row) -> tinygemm's packed weight on q's
    device: tiled for its kernel on CUDA (uint8 [N, K / 2] input, code 2j in the high nibble, as torch
    >= 2.5 takes it), the CPU op's own layout elsewhere."""
    if q.is_cuda:
        tiles = next(t for t in _INNER_K_TILES if q.shape[1] % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack((q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def int4pack(weight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Our int4 layout (uint8 [K, N / 2], column 2j in the low nibble; float32 scales and zeros
    [K / g, N]; teal_kernels/reference.py) -> (tinygemm's packed weight, its bf16 scales_and_zeros
    [K / g, N, 2]) on the same device."""
    k, n = weight.shape[0], weight.shape[1] * 2
    if not int4pack_fits(k, n, group_size, torch.bfloat16):
        raise ValueError(f"tinygemm takes K % 32 == 0, N % 8 == 0 and groups of 32-256 dividing K; got K={k}, "
                         f"N={n}, group {group_size}")
    q = torch.stack([weight & 0xF, weight >> 4], dim=-1).reshape(k, n)  # [K, N] codes
    packed = pack_codes(q.t().contiguous().to(torch.int32))
    scales_and_zeros = torch.stack([scales.to(torch.bfloat16), zeros.to(torch.bfloat16)], dim=-1).contiguous()
    return packed, scales_and_zeros


def int4pack_mm(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
    """x [M, K] bf16 @ the packed matrix -> [M, N] bf16, through the op of x's device."""
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return mm(x.contiguous(), packed, group_size, scales_and_zeros)
