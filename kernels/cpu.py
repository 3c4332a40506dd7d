"""The CPU decode kernel of ``teal::sparse_gemv``: a small C++ row-skipping GEMV over our own
weight layouts (kernels/reference.py), built once by torch's extension tooling (no Triton).

Why C++: the plain-torch reference dequantizes the whole weight on every call (int4 decoded at
0.7 tok/s) and multiplies masked zeros, so TEAL saved nothing. This kernel reads the rows of kept
inputs only, each a contiguous row of the transposed weight [K, N], and accumulates
``x[k] * W[k, :]`` in float32 (16-lane vectors); int8 scales are applied once per output, int4
groups are summed as x times the integer q first, then ``scale * (sum x q - 8 sum x) + zero * sum x``
(= sum x ((q - 8) scale + zero), the reference's dequantization). Scales and zeros stay float32,
as on the GPU, and the layouts are the checkpoint's own: nothing is repacked at load time.
Threads split K into contiguous blocks, so each streams its part of the weight in memory order
(splitting N instead, each thread striding over all rows, ran 2-4x slower on a 2-core VM).

The build (g++ and ninja, 30-60 s the first time, cached under torch's extension directory)
happens on first use; ``available()`` says whether it succeeded, and kernels/ops.py falls back to
the reference when it did not. ``-march=native``: the cached build is for this machine's CPU.
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
#include <algorithm>
#include <cstring>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <vector>

namespace {

inline float to_float(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

// 16 float32 lanes (one AVX-512 register, two AVX2 ones): GCC/Clang vector extensions, so the
// convert-multiply-add is vectorized whatever the compiler's alias analysis concludes.
typedef float vf __attribute__((vector_size(64)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));
typedef uint32_t v16u32 __attribute__((vector_size(64)));

inline vf load_acc(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void store_acc(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

template <typename T>
inline vf load16(const T* p) {
  vf r;
  for (int i = 0; i < 16; ++i) r[i] = to_float(p[i]);
  return r;
}
template <>
inline vf load16(const int8_t* p) {
#ifdef __AVX512F__  // GCC 12 widens int8 vectors lane by lane; one vpmovsxbd does it
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vf r;
  for (int i = 0; i < 16; ++i) r[i] = p[i];
  return r;
#endif
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
// 16 packed bytes -> the 32 nibbles in column order (low, high, low, ...) as floats.
inline void load_nibbles(const uint8_t* p, vf& q0, vf& q1) {
#ifdef __AVX512F__
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i q = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(15)),
                                    _mm256_slli_epi16(_mm256_srli_epi16(b, 4), 8));  // bytes: lo, hi per word
  q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(q)));
  q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(q, 1)));
#else
  for (int i = 0; i < 8; ++i) {
    q0[2 * i] = p[i] & 15; q0[2 * i + 1] = p[i] >> 4;
    q1[2 * i] = p[8 + i] & 15; q1[2 * i + 1] = p[8 + i] >> 4;
  }
#endif
}

// Kept rows are not contiguous, so the hardware prefetcher loses the stream at every skipped row:
// ask for the kept row about PREFETCH_BYTES ahead (measured on a 70 MB bf16 weight at 50%: 1.7x).
constexpr int64_t PREFETCH_BYTES = 16384;
inline int64_t prefetch_distance(int64_t row_bytes) { return std::max<int64_t>(2, PREFETCH_BYTES / row_bytes); }
inline void prefetch_row(const void* row, int64_t bytes) {
  if (!row) return;
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

// Kept inputs of one row of x for one threshold: (index, value) pairs in index order.
template <typename T>
int64_t kept(const T* x, int64_t k, float t, int64_t* idx, float* val) {
  int64_t n = 0;
  for (int64_t i = 0; i < k; ++i) {
    float v = to_float(x[i]);
    if (std::abs(v) > t) { idx[n] = i; val[n] = v; ++n; }
  }
  return n;
}

// Float and int8: acc[0:width] += x[k] * W[k, 0:width] over the kept k. Whole rows, in row
// order: the weight streams from memory sequentially, the accumulator stays in L1.
template <typename T>
void accumulate_rows(const T* w, int64_t ldw, const int64_t* idx, const float* val, int64_t nk, float* acc,
                     int64_t width) {
  const int64_t nv = width / 16, ahead = prefetch_distance(width * sizeof(T));
  for (int64_t j = 0; j < nk; ++j) {
    const T* row = w + idx[j] * ldw;
    const float xv = val[j];
    prefetch_row(j + ahead < nk ? w + idx[j + ahead] * ldw : nullptr, width * sizeof(T));
    for (int64_t v = 0; v < nv; ++v) store_acc(acc + 16 * v, load_acc(acc + 16 * v) + xv * load16(row + 16 * v));
    for (int64_t c = 16 * nv; c < width; ++c) acc[c] += xv * to_float(row[c]);
  }
}

// int4 (packed [K, N/2], even width): per group, gq = sum x q over its kept rows (columns in
// order), then acc += scale * (gq - 8 sum x) + zero * sum x. gq: width floats of scratch.
void accumulate_int4(const uint8_t* w, int64_t ldw, const int64_t* idx, const float* val, int64_t nk, float* acc,
                     int64_t width, const float* scales, const float* zeros, int64_t n, int64_t group, float* gq) {
  const int64_t nv = width / 32, ahead = prefetch_distance(width / 2);
  int64_t j = 0;
  while (j < nk) {
    const int64_t g = idx[j] / group;
    std::fill(gq, gq + width, 0.f);
    float xsum = 0.f;
    for (; j < nk && idx[j] / group == g; ++j) {
      const uint8_t* row = w + idx[j] * ldw;
      const float xv = val[j];
      xsum += xv;
      prefetch_row(j + ahead < nk ? w + idx[j + ahead] * ldw : nullptr, width / 2);
      for (int64_t v = 0; v < nv; ++v) {
        vf q0, q1;
        load_nibbles(row + 16 * v, q0, q1);
        store_acc(gq + 32 * v, load_acc(gq + 32 * v) + xv * q0);
        store_acc(gq + 32 * v + 16, load_acc(gq + 32 * v + 16) + xv * q1);
      }
      for (int64_t c = 32 * nv; c < width; c += 2) {
        gq[c] += xv * static_cast<float>(row[c / 2] & 15);
        gq[c + 1] += xv * static_cast<float>(row[c / 2] >> 4);
      }
    }
    const float* s = scales + g * n;
    const float* z = zeros + g * n;
    const float x8 = 8.f * xsum;
    const int64_t nf = width / 16;
    for (int64_t v = 0; v < nf; ++v)
      store_acc(acc + 16 * v, load_acc(acc + 16 * v) + load_acc(s + 16 * v) * (load_acc(gq + 16 * v) - x8) +
                              load_acc(z + 16 * v) * xsum);
    for (int64_t c = 16 * nf; c < width; ++c) acc[c] += s[c] * (gq[c] - x8) + z[c] * xsum;
  }
}

// gated: x is a gate|up output [M, 2K]; the input is SiLU(gate) * up in float32, rounded once to T.
template <typename T>
std::vector<T> gated_input(const T* x, int64_t m, int64_t k) {
  std::vector<T> out(m * k);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const float g = to_float(x[r * 2 * k + i]), u = to_float(x[r * 2 * k + k + i]);
      out[r * k + i] = static_cast<T>(g / (1.f + std::exp(-g)) * u);
    }
  return out;
}

// Each thread takes a contiguous block of K (whole int4 groups) and all columns, and sums into its
// own float32 [M, N]; the blocks' sums are added at the end.
template <typename T>
void run(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds, const std::vector<int64_t>& splits,
         const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& zeros, int64_t group,
         bool gated, const c10::optional<at::Tensor>& residual, at::Tensor& out) {
  const int64_t m = x.size(0), k = w.size(0), n = out.size(1), ldw = w.size(1);
  const int64_t nseg = static_cast<int64_t>(splits.size());
  const bool int8 = w.scalar_type() == at::kChar, int4 = w.scalar_type() == at::kByte;
  const float* th = thresholds.data_ptr<float>();
  const std::vector<T> xg = gated ? gated_input(x.data_ptr<T>(), m, k) : std::vector<T>();
  const T* xp = gated ? xg.data() : x.data_ptr<T>();
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  const float* zp = zeros ? zeros->data_ptr<float>() : nullptr;
  std::vector<int64_t> idx(m * nseg * k), count(m * nseg), col0(nseg + 1, 0);
  std::vector<float> val(m * nseg * k);
  for (int64_t s = 0; s < nseg; ++s) col0[s + 1] = col0[s] + splits[s];
  for (int64_t r = 0; r < m; ++r)
    for (int64_t s = 0; s < nseg; ++s)
      count[r * nseg + s] = kept(xp + r * k, k, th[s], &idx[(r * nseg + s) * k], &val[(r * nseg + s) * k]);
  const int64_t align = int4 ? group : 16;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), k / align));
  const int64_t block_k = (k / align + blocks - 1) / blocks * align;
  std::vector<float> partial(blocks * m * n, 0.f);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gq(int4 ? n : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t k0 = b * block_k, k1 = std::min(k, k0 + block_k);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t s = 0; s < nseg; ++s) {
          const int64_t* ri = &idx[(r * nseg + s) * k];
          const int64_t nk = count[r * nseg + s];
          const int64_t j0 = std::lower_bound(ri, ri + nk, k0) - ri, j1 = std::lower_bound(ri, ri + nk, k1) - ri;
          const float* rv = &val[(r * nseg + s) * k] + j0;
          float* acc = &partial[(b * m + r) * n + col0[s]];
          const int64_t c = col0[s], width = splits[s];
          if (int8) {
            accumulate_rows(w.data_ptr<int8_t>() + c, ldw, ri + j0, rv, j1 - j0, acc, width);
          } else if (int4) {
            accumulate_int4(w.data_ptr<uint8_t>() + c / 2, ldw, ri + j0, rv, j1 - j0, acc, width, sp + c, zp + c, n,
                            group, gq.data());
          } else {
            accumulate_rows(w.data_ptr<T>() + c, ldw, ri + j0, rv, j1 - j0, acc, width);
          }
        }
    }
  });
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < m * n; ++i) {
    float sum = 0.f;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[b * m * n + i];
    if (int8) sum *= sp[i % n];
    // residual: the product rounded to T first, then added, as the unfused model computes it
    op[i] = rp ? static_cast<T>(to_float(static_cast<T>(sum)) + to_float(rp[i])) : static_cast<T>(sum);
  }
}

}  // namespace

at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds,
                       std::vector<int64_t> splits, const c10::optional<at::Tensor>& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t group, bool gated,
                       const c10::optional<at::Tensor>& residual) {
  int64_t n = 0;
  for (auto s : splits) n += s;
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    run<at::BFloat16>(x, w, thresholds, splits, scales, zeros, group, gated, residual, out);
  } else {
    run<at::Half>(x, w, thresholds, splits, scales, zeros, group, gated, residual, out);
  }
  return out;
}
"""

_CPP_DECL = ("at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds, "
             "std::vector<int64_t> splits, const c10::optional<at::Tensor>& scales, "
             "const c10::optional<at::Tensor>& zeros, int64_t group, bool gated, "
             "const c10::optional<at::Tensor>& residual);")


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
                    zeros: Tensor | None, group_size: int, gated: bool = False,
                    residual: Tensor | None = None) -> Tensor:
    """Threshold-sparse x @ W^T reading only the rows of kept inputs, with the op's `gated` and
    `residual` fusions (kernels/reference.py); arguments validated by the caller
    (kernels.reference.validate, for_kernel=True)."""
    return _extension().sparse_gemv(x, w, thresholds, list(split_sizes), scales, zeros, group_size, gated,
                                    residual)
