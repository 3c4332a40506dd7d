"""The CPU decode kernel of ``teal::sparse_gemv``: a small C++ row-skipping GEMV over our own
weight layouts (kernels/reference.py), built once by torch's extension tooling (no Triton).

Why C++: the plain-torch reference dequantizes the whole weight on every call (int4 ran at
0.7 tok/s) and multiplies by masked zeros, so TEAL saved nothing. This kernel walks the kept
input rows only, each a contiguous row of the transposed weight [K, N], and accumulates
``x[k] * W[k, :]`` in float32; int8 scales are applied once per output, and int4 groups are
summed as integers-times-x first, then ``scale * (sum x q - 8 sum x) + zero * sum x``
(= sum x ((q - 8) scale + zero), the reference's dequantization). Scales and zeros stay float32,
as on the GPU. The layouts are the checkpoint's own, so nothing is repacked at load time.

The build (g++ and ninja, about a minute the first time, cached under torch's extension
directory) happens on first use; ``available()`` says whether it succeeded, and kernels/ops.py
falls back to the reference when it did not.
"""
from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 512;  // output columns per task: float32 accumulators stay in L1

inline float to_float(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

// Kept inputs of one row of x for one threshold: (index, value) pairs, zeros dropped.
template <typename T>
int64_t kept(const T* x, int64_t k, float t, int64_t* idx, float* val) {
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i) {
    float v = to_float(x[i]);
    if (std::abs(v) > t) { idx[n] = i; val[n] = v; ++n; }
  }
  return n;
}

// 16 float32 lanes (one AVX-512 register, two AVX2 ones): GCC/Clang vector extensions, so the
// convert-multiply-add is vectorized whatever the compiler's alias analysis concludes.
typedef float vf __attribute__((vector_size(64)));
typedef int8_t v16i8 __attribute__((vector_size(16)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));
typedef int32_t v16i32 __attribute__((vector_size(64)));

template <typename T>
inline vf load16(const T* p) {
  vf r;
  for (int i = 0; i < 16; ++i) r[i] = to_float(p[i]);
  return r;
}
template <>
inline vf load16(const int8_t* p) {
  v16i8 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(__builtin_convertvector(v, v16i32), vf);  // widen, then convert
}
template <>
inline vf load16(const at::BFloat16* p) {
  v16u16 v;
  std::memcpy(&v, p, sizeof v);
  v16u32 bits = __builtin_convertvector(v, v16u32) << 16;
  vf r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// Float and int8 rows: out = sum over the kept k of x[k] * W[k, c0:c0 + width].
template <typename T>
void tile_rows(const T* w, int64_t ldw, const int64_t* idx, const float* val, int64_t nk, float* out,
               int64_t width) {
  const int64_t nv = width / 16;
  vf acc[TILE / 16] = {};
  float tail[16] = {};
  for (int64_t j = 0; j < nk; ++j) {
    const T* row = w + idx[j] * ldw;
    const float xv = val[j];
    for (int64_t v = 0; v < nv; ++v) acc[v] += xv * load16(row + 16 * v);
    for (int64_t c = 16 * nv; c < width; ++c) tail[c - 16 * nv] += xv * to_float(row[c]);
  }
  std::memcpy(out, acc, nv * sizeof(vf));
  std::memcpy(out + 16 * nv, tail, (width - 16 * nv) * sizeof(float));
}

// int4: columns c0 .. c0 + width (even) of a packed [K, N/2] weight; per group, even and odd
// columns are accumulated separately (low and high nibbles), then scaled.
void tile_int4(const uint8_t* w, int64_t ldw, const int64_t* idx, const float* val, int64_t nk, float* acc,
               int64_t width, const float* scales, const float* zeros, int64_t n, int64_t group) {
  const int64_t half = width / 2;
  float lo[TILE / 2], hi[TILE / 2];
  int64_t j = 0;
  while (j < nk) {
    const int64_t g = idx[j] / group;
    std::fill(lo, lo + half, 0.f);
    std::fill(hi, hi + half, 0.f);
    float xsum = 0.f;
    for (; j < nk && idx[j] / group == g; ++j) {
      const uint8_t* row = w + idx[j] * ldw;
      const float xv = val[j];
      xsum += xv;
      for (int64_t b = 0; b < half; ++b) {
        lo[b] += xv * static_cast<float>(row[b] & 15);
        hi[b] += xv * static_cast<float>(row[b] >> 4);
      }
    }
    const float* s = scales + g * n;
    const float* z = zeros + g * n;
    const float x8 = 8.f * xsum;
    for (int64_t b = 0; b < half; ++b) {
      acc[2 * b] += s[2 * b] * (lo[b] - x8) + z[2 * b] * xsum;
      acc[2 * b + 1] += s[2 * b + 1] * (hi[b] - x8) + z[2 * b + 1] * xsum;
    }
  }
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds, const std::vector<int64_t>& splits,
         const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& zeros, int64_t group,
         at::Tensor& out) {
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1), ldw = w.size(1);
  const int64_t nseg = static_cast<int64_t>(splits.size());
  const float* th = thresholds.data_ptr<float>();
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  // Kept lists per (row, segment), computed once and shared by the column tasks.
  std::vector<int64_t> idx(m * nseg * k), count(m * nseg);
  std::vector<float> val(m * nseg * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t s = 0; s < nseg; ++s)
      count[r * nseg + s] = kept(xp + r * k, k, th[s], &idx[(r * nseg + s) * k], &val[(r * nseg + s) * k]);
  // Tasks: (segment, tile of its columns).
  std::vector<int64_t> task_seg, task_col, task_width;
  int64_t c0 = 0;
  for (int64_t s = 0; s < nseg; ++s) {
    for (int64_t c = 0; c < splits[s]; c += TILE) {
      task_seg.push_back(s);
      task_col.push_back(c0 + c);
      task_width.push_back(std::min(TILE, splits[s] - c));
    }
    c0 += splits[s];
  }
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  const float* zp = zeros ? zeros->data_ptr<float>() : nullptr;
  at::parallel_for(0, static_cast<int64_t>(task_seg.size()), 1, [&](int64_t begin, int64_t end) {
    float acc[TILE];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = task_seg[t], col = task_col[t], width = task_width[t];
      for (int64_t r = 0; r < m; ++r) {
        const int64_t* ri = &idx[(r * nseg + s) * k];
        const float* rv = &val[(r * nseg + s) * k];
        const int64_t nk = count[r * nseg + s];
        if (w.scalar_type() == at::kChar) {
          tile_rows(w.data_ptr<int8_t>() + col, ldw, ri, rv, nk, acc, width);
          for (int64_t c = 0; c < width; ++c) acc[c] *= sp[col + c];
        } else if (w.scalar_type() == at::kByte) {
          std::fill(acc, acc + width, 0.f);
          tile_int4(w.data_ptr<uint8_t>() + col / 2, ldw, ri, rv, nk, acc, width, sp + col, zp + col, n, group);
        } else {
          tile_rows(w.data_ptr<T>() + col, ldw, ri, rv, nk, acc, width);
        }
        T* o = op + r * n + col;
        for (int64_t c = 0; c < width; ++c) o[c] = static_cast<T>(acc[c]);
      }
    }
  });
}

}  // namespace

at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds,
                       std::vector<int64_t> splits, const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group) {
  int64_t n = 0;
  for (auto s : splits) n += s;
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(x, w, thresholds, splits, scales, zeros, group, out);
  } else {
    run<at::Half>(x, w, thresholds, splits, scales, zeros, group, out);
  }
  return out;
}
"""

_CPP_DECL = ("at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds, "
             "std::vector<int64_t> splits, const c10::optional<at::Tensor>& scales, "
             "const c10::optional<at::Tensor>& zeros, int64_t group);")


@functools.cache
def _extension() -> ModuleType | None:
    """Build (or load the cached build of) the extension; None, with a warning, if that fails."""
    from torch.utils.cpp_extension import load_inline
    try:
        return load_inline("teal_cpu_gemv", cpp_sources=[_CPP_DECL, _SOURCE], functions=["sparse_gemv"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as e:  # no compiler / ninja: the reference serves
        warnings.warn(f"teal CPU kernel unavailable, using the plain-torch reference: {e}", stacklevel=2)
        return None


def available() -> bool:
    """Whether the C++ kernel built on this machine."""
    return _extension() is not None


def sparse_gemv_cpu(x: Tensor, w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None,
                    zeros: Tensor | None, group_size: int) -> Tensor:
    """Threshold-sparse x @ W^T reading only the rows of kept inputs; arguments validated by the
    caller (kernels.reference.validate, for_kernel=True)."""
    return _extension().sparse_gemv(x, w, thresholds, list(split_sizes), scales, zeros, group_size)
