"""The CPU decode kernels: ``teal_cpu::sparse_gemv``, a small C++ row-skipping GEMV over our own
weight layouts (teal_kernels/reference.py), and ``teal_cpu::decode_attention_step``, the fused decode
path's attention step (decode.py), built once by torch's extension tooling (no Triton).

Why C++: the plain-torch reference dequantizes the whole weight on every call (int4 decoded at
0.7 tok/s) and multiplies masked zeros, so TEAL saved nothing. This kernel reads the rows of kept
inputs only, each a contiguous row of the transposed weight [K, N], and accumulates
``x[k] * W[k, :]`` in float32 (native-width vectors, four rows per pass over the accumulator);
int8 scales are applied once per output, int4 groups are summed as x times the integer q first,
then ``scale * (sum x q - 8 sum x) + zero * sum x`` (= sum x ((q - 8) scale + zero), the
reference's dequantization). Scales and zeros stay float32, as on the GPU, and the layouts are the
checkpoint's own: nothing is repacked at load time. Weights of 128 KB and more are split over the
threads in contiguous blocks of K, so each streams its part in memory order (splitting N instead
ran 2-4x slower on a 2-core VM); smaller ones (the limit: TEAL_CPU_PARALLEL_BYTES) run on the calling
thread (see ``run``).
``TEAL_CPU_POOL`` picks who runs the blocks: ``spin`` (the default, unless OMP_WAIT_POLICY=ACTIVE),
the kernel's own workers, which stay awake for TEAL_CPU_SPIN_US (200) after a call, yielding the
core, and leave any block they have not claimed to the calling thread (``SpinPool``: no wake-up
on the critical path of a decode step's ~120 calls), or ``openmp`` (at::parallel_for);
docs/cpu/README.md has the measurements.
The attention step reads only the cache positions 0..p (the plain-torch reference and the model's
SDPA read and mask the whole static cache: 418 us a layer on a 2-vCPU AVX2 VM, 49 us here).

Both are registered with the dispatcher from C++ (TORCH_LIBRARY), so compiled graphs call them
without a Python custom op in between (~25 us a call, 120 calls a token); teal_kernels/ops.py sends CPU
calls to them. The build (g++ and ninja, ~30 s the first time, cached under torch's extension
directory) happens on first use; ``available()`` says whether it succeeded, and teal_kernels/ops.py
falls back to the reference when it did not. ``-march=native``: the cached build is for this
machine's CPU.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from teal_kernels.reference import unpack_scales_zeros, validate, validate_step

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <sched.h>
#include <strings.h>
#include <atomic>
#include <chrono>
#include <cmath>
#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#ifdef __AVX2__
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

// One native float32 vector: 16 lanes (AVX-512) or 8 (AVX2 and others), as GCC/Clang vector
// extensions, so the convert-multiply-add is vectorized whatever the compiler's alias analysis
// concludes. A vector twice the register width compiled to spills on an AVX2 host (4 GB/s).
#ifdef __AVX512F__
constexpr int64_t LANES = 16;
#else
constexpr int64_t LANES = 8;
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef uint16_t vu16 __attribute__((vector_size(2 * LANES)));
typedef uint32_t vu32 __attribute__((vector_size(4 * LANES)));
constexpr int64_t NIBBLE_VECTORS = 32 / LANES;  // vectors of the 32 columns in 16 int4 bytes

inline vf load_acc(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline void store_acc(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

template <typename T>
inline vf loadv(const T* p) {
  vf r;
  for (int64_t i = 0; i < LANES; ++i) r[i] = to_float(p[i]);
  return r;
}
template <>
inline vf loadv(const at::BFloat16* p) {
  vu16 v;
  std::memcpy(&v, p, sizeof v);
  vu32 bits = __builtin_convertvector(v, vu32) << 16;
  vf r;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}
// GCC 12 widens int8 and fp16 lane by lane: one sign-extension / conversion instruction does it.
template <>
inline vf loadv(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vf r;
  for (int64_t i = 0; i < LANES; ++i) r[i] = p[i];
  return r;
#endif
}
#if defined(__AVX512F__)
template <>
inline vf loadv(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#elif defined(__AVX2__) && defined(__F16C__)
template <>
inline vf loadv(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// 16 packed bytes -> the 32 nibbles in column order (low, high, low, ...) as floats.
inline void load_nibbles(const uint8_t* p, vf* q) {
#if defined(__AVX512F__)
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i v = _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi16(15)),
                                    _mm256_slli_epi16(_mm256_srli_epi16(b, 4), 8));  // bytes: lo, hi per word
  q[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v)));
  q[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1)));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
  const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  // columns 0-15, 16-31
  q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0));
  q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)));
  q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1));
  q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)));
#else
  for (int64_t i = 0; i < 32; ++i) q[i / LANES][i % LANES] = (p[i / 2] >> (4 * (i % 2))) & 15;
#endif
}

// Kept rows are not contiguous, so the hardware prefetcher loses the stream at every skipped row:
// ask for the kept row about PREFETCH_BYTES ahead (measured on a 70 MB bf16 weight at 50%: 1.7x).
constexpr int64_t PREFETCH_BYTES = 16384;
inline int64_t prefetch_distance(int64_t row_bytes) { return std::max<int64_t>(4, PREFETCH_BYTES / row_bytes); }
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}
// Kept rows j..j+r-1 are being read: prefetch the r kept rows `ahead` further on (the rows a pass
// `ahead` rows later will read): skipped rows break the hardware's streams. Dense calls are
// prefetched the same way, as before the eight-row passes (on the shared VM the difference either
// way was below run-to-run noise).
inline void prefetch_ahead(const uint8_t* w, int64_t row_stride, const int64_t* idx, int64_t j, int64_t r,
                           int64_t nk, int64_t ahead, int64_t bytes) {
  for (int64_t a = j + ahead; a < std::min(nk, j + ahead + r); ++a) prefetch_row(w + idx[a] * row_stride, bytes);
}

// Weights below this many bytes run on the calling thread (see run); TEAL_CPU_PARALLEL_BYTES
// overrides it per call (`benchmarks/bench_cpu.py --parallel_bytes` compares limits in one process).
constexpr int64_t PARALLEL_BYTES = 128 << 10;
inline int64_t parallel_bytes() {
  const char* env = std::getenv("TEAL_CPU_PARALLEL_BYTES");
  return env ? std::atoll(env) : PARALLEL_BYTES;
}

// Blocks of one call over the threads. TEAL_CPU_POOL=spin (the default): our own workers, which after
// a call spin for TEAL_CPU_SPIN_US (default 200; yielding the core) before they sleep, so the ~120
// calls of a decode step find them awake, and the calling thread takes every block no worker has
// claimed yet, so a worker that is asleep or descheduled (a busy machine) costs a wake-up only for
// a block it already holds. TEAL_CPU_POOL=openmp: at::parallel_for (OpenMP: with
// OMP_WAIT_POLICY=PASSIVE every call wakes a sleeping thread; docs/cpu/README.md).
class SpinPool {
 public:
  static SpinPool& get() {
    static SpinPool* pool = new SpinPool(std::max(1, at::get_num_threads()) - 1);  // never destroyed
    return *pool;
  }

  // fn(b) for every b in [0, blocks), on the calling thread and the workers; returns when all are done.
  void run(int64_t blocks, const std::function<void(int64_t)>& fn) {
    if (workers_ == 0 || blocks <= 1) {
      for (int64_t b = 0; b < blocks; ++b) fn(b);
      return;
    }
    TORCH_CHECK(blocks < (1 << 24), "too many blocks for the pool");
    std::lock_guard<std::mutex> one_caller(call_mu_);  // calls from several threads take turns
    task_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    gen_ = (gen_ + 1) & 0xffff;
    ticket_.store(pack(gen_, blocks, 0), std::memory_order_seq_cst);  // publishes task_ and done_
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(sleep_mu_);
      wake_.notify_all();
    }
    work(gen_);
    while (done_.load(std::memory_order_acquire) < blocks) pause();
  }

 private:
  explicit SpinPool(int workers) : workers_(workers) {
    const char* env = std::getenv("TEAL_CPU_SPIN_US");
    spin_us_ = env ? std::atoll(env) : 200;
    for (int i = 0; i < workers_; ++i) std::thread([this] { loop(); }).detach();
  }

  // ticket = generation (16 bits) | blocks (24) | next block (24): a claim is valid for one call only
  static uint64_t pack(uint64_t gen, int64_t blocks, int64_t next) {
    return gen << 48 | static_cast<uint64_t>(blocks) << 24 | static_cast<uint64_t>(next);
  }
  static uint64_t gen_of(uint64_t t) { return t >> 48; }

  static void pause() {
#ifdef __x86_64__
    __builtin_ia32_pause();
#endif
  }

  // Claim and run blocks of call `gen` until none is left.
  void work(uint64_t gen) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t blocks = static_cast<int64_t>(t >> 24 & 0xffffff), next = static_cast<int64_t>(t & 0xffffff);
      if (gen_of(t) != gen || next >= blocks) return;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        (*task_)(next);
        done_.fetch_add(1, std::memory_order_release);
        t = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void loop() {
    uint64_t seen = gen_of(ticket_.load(std::memory_order_acquire));
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      auto yielded = start;
      uint64_t gen;
      for (int spins = 0; (gen = gen_of(ticket_.load(std::memory_order_acquire))) == seen; ++spins) {
        if ((spins & 63) == 63) {
          const auto now = std::chrono::steady_clock::now();
          if (now - start > std::chrono::microseconds(spin_us_)) break;
          if (now - yielded > std::chrono::microseconds(YIELD_US)) {  // a busy machine gets the core back
            sched_yield();
            yielded = now;
          }
        }
        pause();
      }
      if (gen == seen) {  // nothing came while spinning: sleep until the next call
        std::unique_lock<std::mutex> lk(sleep_mu_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lk, [&] { return gen_of(ticket_.load(std::memory_order_seq_cst)) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        gen = gen_of(ticket_.load(std::memory_order_acquire));
      }
      seen = gen;
      work(gen);
    }
  }

  // Yielding after every 64 pauses doubled a call's hand-off on a 2-vCPU VM (576 x 128 bf16: 18-21
  // us a call; 9-10 yielding every 20 us), yet another thread that needs this core (OpenMP's worker
  // in an Inductor kernel) must not wait for the scheduler's time slice.
  static constexpr int64_t YIELD_US = 20;
  const int workers_;
  int64_t spin_us_ = 200;
  uint64_t gen_ = 0;
  const std::function<void(int64_t)>* task_ = nullptr;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex call_mu_, sleep_mu_;
  std::condition_variable wake_;
};

// TEAL_CPU_POOL=spin|openmp; unset: spin, unless OpenMP's own threads spin (OMP_WAIT_POLICY=ACTIVE):
// both kinds spinning on two cores lost a quarter to a third of the decode speed (docs/cpu/README.md).
inline bool spin_pool() {
  if (const char* pool = std::getenv("TEAL_CPU_POOL")) {
    const bool spin = std::strcmp(pool, "spin") == 0;
    TORCH_CHECK(spin || std::strcmp(pool, "openmp") == 0, "TEAL_CPU_POOL must be spin or openmp, got '", pool, "'");
    return spin;
  }
  const char* wait = std::getenv("OMP_WAIT_POLICY");
  return !(wait && strcasecmp(wait, "active") == 0);
}

// fn(b) for b in [0, blocks) over the threads: TEAL_CPU_POOL picks the pool (see SpinPool).
inline void parallel_blocks(int64_t blocks, const std::function<void(int64_t)>& fn) {
  if (spin_pool()) {
    SpinPool::get().run(blocks, fn);
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) fn(b);
    });
  }
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

// bf16 keeps its sums in "planes": 2 * LANES columns load as LANES 32-bit words, whose low halves
// are the even columns and high halves the odd ones, so a shift and a mask make two float vectors
// with no widening shuffle (the shuffle's convert ran ~2 multiply-adds a cycle, slower than the
// memory); planes hold the even columns, then the odd ones, per 2 * LANES columns.
template <typename T>
constexpr bool in_planes = std::is_same<T, at::BFloat16>::value;

// sums[0:full] += sum over R rows of x[u] * rows[u][0:full] (bf16: in planes; others: in column order).
template <typename T, int64_t R>
inline void row_pass(const T* const* rows, const float* x, float* sums, int64_t full) {
  vf xv[R];
  for (int64_t u = 0; u < R; ++u) xv[u] = vf{} + x[u];
  if constexpr (in_planes<T>) {
    const vu32 high = vu32{} + 0xffff0000u;
    for (int64_t c = 0; c < full; c += 2 * LANES) {
      vf even = load_acc(sums + c), odd = load_acc(sums + c + LANES);
      for (int64_t u = 0; u < R; ++u) {
        vu32 bits;
        std::memcpy(&bits, rows[u] + c, sizeof bits);
        const vu32 lo = bits << 16, hi = bits & high;
        vf flo, fhi;
        std::memcpy(&flo, &lo, sizeof flo);
        std::memcpy(&fhi, &hi, sizeof fhi);
        even += xv[u] * flo;
        odd += xv[u] * fhi;
      }
      store_acc(sums + c, even);
      store_acc(sums + c + LANES, odd);
    }
  } else {
    for (int64_t c = 0; c < full; c += LANES) {
      vf sum = load_acc(sums + c);
      for (int64_t u = 0; u < R; ++u) sum += xv[u] * loadv(rows[u] + c);
      store_acc(sums + c, sum);
    }
  }
}

// Float and int8: acc[0:width] += x[k] * W[k, 0:width] over the kept k. Whole rows, in row order,
// eight a pass: the weight streams from memory, the sums stay in L1 and are read and written once
// per eight rows (once per row was L1-bound: 2x slower than four).
template <typename T>
void accumulate_rows(const T* w, int64_t ldw, const int64_t* idx, const float* val, int64_t nk, float* acc,
                     int64_t width) {
  constexpr int64_t R = 8, C = in_planes<T> ? 2 * LANES : LANES;
  const int64_t full = width / C * C, bytes = width * sizeof(T), ahead = std::max(R, prefetch_distance(bytes));
  const uint8_t* wb = reinterpret_cast<const uint8_t*>(w);
  std::vector<float> planes(in_planes<T> ? full : 0, 0.f);
  float* sums = in_planes<T> ? planes.data() : acc;
  const T* rows[R];
  for (int64_t j = 0; j < nk;) {
    const int64_t r = std::min(R, nk - j);
    for (int64_t u = 0; u < r; ++u) rows[u] = w + idx[j + u] * ldw;
    prefetch_ahead(wb, ldw * sizeof(T), idx, j, r, nk, ahead, bytes);
    if (r == R) {
      row_pass<T, R>(rows, val + j, sums, full);
    } else {
      for (int64_t u = 0; u < r; ++u) row_pass<T, 1>(rows + u, val + j + u, sums, full);
    }
    for (int64_t u = 0; u < r; ++u)
      for (int64_t c = full; c < width; ++c) acc[c] += val[j + u] * to_float(rows[u][c]);
    j += r;
  }
  if constexpr (in_planes<T>) {
    for (int64_t c = 0; c < full; c += 2) {
      acc[c] += planes[c / C * C + c % C / 2];
      acc[c + 1] += planes[c / C * C + c % C / 2 + LANES];
    }
  }
}

// gq[0:width] += x * q over kept rows j0..j1 of one int4 group, eight rows at a time.
void accumulate_nibbles(const uint8_t* w, int64_t ldw, const int64_t* idx, const float* val, int64_t j0, int64_t j1,
                        int64_t nk, int64_t ahead, float* gq, int64_t width) {
  constexpr int64_t R = 8;
  const int64_t nv = width / 32;
  int64_t j = j0;
  for (; j + R <= j1; j += R) {
    const uint8_t* r[R];
    for (int64_t u = 0; u < R; ++u) r[u] = w + idx[j + u] * ldw;
    prefetch_ahead(w, ldw, idx, j, R, nk, ahead, width / 2);
    for (int64_t v = 0; v < nv; ++v) {
      vf sum[NIBBLE_VECTORS];
      for (int64_t i = 0; i < NIBBLE_VECTORS; ++i) sum[i] = load_acc(gq + 32 * v + LANES * i);
      for (int64_t u = 0; u < R; ++u) {
        vf q[NIBBLE_VECTORS];
        load_nibbles(r[u] + 16 * v, q);
        for (int64_t i = 0; i < NIBBLE_VECTORS; ++i) sum[i] += val[j + u] * q[i];
      }
      for (int64_t i = 0; i < NIBBLE_VECTORS; ++i) store_acc(gq + 32 * v + LANES * i, sum[i]);
    }
    for (int64_t u = 0; u < R; ++u)
      for (int64_t c = 32 * nv; c < width; c += 2) {
        gq[c] += val[j + u] * static_cast<float>(r[u][c / 2] & 15);
        gq[c + 1] += val[j + u] * static_cast<float>(r[u][c / 2] >> 4);
      }
  }
  for (; j < j1; ++j) {
    const uint8_t* row = w + idx[j] * ldw;
    for (int64_t v = 0; v < nv; ++v) {
      vf q[NIBBLE_VECTORS];
      load_nibbles(row + 16 * v, q);
      for (int64_t i = 0; i < NIBBLE_VECTORS; ++i)
        store_acc(gq + 32 * v + LANES * i, load_acc(gq + 32 * v + LANES * i) + val[j] * q[i]);
    }
    for (int64_t c = 32 * nv; c < width; c += 2) {
      gq[c] += val[j] * static_cast<float>(row[c / 2] & 15);
      gq[c + 1] += val[j] * static_cast<float>(row[c / 2] >> 4);
    }
  }
}

// int4 (packed [K, N/2], even width): per group, gq = sum x q over its kept rows (columns in
// order), then acc += scale * (gq - 8 sum x) + zero * sum x. gq: width floats of scratch.
void accumulate_int4(const uint8_t* w, int64_t ldw, const int64_t* idx, const float* val, int64_t nk, float* acc,
                     int64_t width, const float* scales, const float* zeros, int64_t n, int64_t group, float* gq) {
  const int64_t ahead = std::max<int64_t>(8, prefetch_distance(width / 2));  // at least a pass ahead
  int64_t j = 0;
  while (j < nk) {
    const int64_t g = idx[j] / group;
    int64_t end = j;
    float xsum = 0.f;
    for (; end < nk && idx[end] / group == g; ++end) xsum += val[end];
    std::fill(gq, gq + width, 0.f);
    accumulate_nibbles(w, ldw, idx, val, j, end, nk, ahead, gq, width);
    j = end;
    const float* s = scales + g * n;
    const float* z = zeros + g * n;
    const float x8 = 8.f * xsum;
    const int64_t nf = width / LANES;
    for (int64_t c = 0; c < LANES * nf; c += LANES)
      store_acc(acc + c, load_acc(acc + c) + load_acc(s + c) * (load_acc(gq + c) - x8) + load_acc(z + c) * xsum);
    for (int64_t c = LANES * nf; c < width; ++c) acc[c] += s[c] * (gq[c] - x8) + z[c] * xsum;
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
  // Inside a model the weights stream from DRAM, and one thread reads them at well under the
  // machine's bandwidth: SmolLM2's projections (0.7-3.5 MB) on two threads took compiled bf16
  // decode from 28.1 to 37.8 tok/s dense and from 35.3 to 43.0 at 50% (2-vCPU AVX2 VM, 2026-12-02,
  // the two limits interleaved in one run: docs/cpu/threads/bench_cpu.md; OMP_WAIT_POLICY=PASSIVE,
  // which generate.py sets). A kernel timed alone on one cache-resident weight says otherwise
  // (the wake-up outweighs the gain there): measure in a model. Tiny weights stay on one thread.
  const int64_t threads = w.nbytes() < parallel_bytes() ? 1 : at::get_num_threads();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(threads, k / align));
  const int64_t block_k = (k / align + blocks - 1) / blocks * align;
  std::vector<float> partial(blocks * m * n, 0.f);
  parallel_blocks(blocks, [&](int64_t b) {
    std::vector<float> gq(int4 ? n : 0);
    const int64_t k0 = b * block_k, k1 = b == blocks - 1 ? k : std::min(k, k0 + block_k);  // the last takes K % align
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


// Attention of one new token per sequence (the fused decode step, decode.py): RoPE of q and k
// (pairs 2i, 2i+1, float32, rounded to T as model.apply_rotary_emb), k and v written at position p,
// then softmax(q k^T * scale) v over positions 0..p only, float32. One task per (sequence, KV head):
// its query heads share each cached row as it streams past.
template <typename T>
void rope(const T* x, const float* cs, int64_t d, T* out) {
  for (int64_t i = 0; i < d / 2; ++i) {
    const float a = to_float(x[2 * i]), b = to_float(x[2 * i + 1]), c = cs[2 * i], s = cs[2 * i + 1];
    out[2 * i] = static_cast<T>(a * c - b * s);
    out[2 * i + 1] = static_cast<T>(b * c + a * s);
  }
}

inline float dot(const float* q, vf const* k, int64_t nv) {
  vf acc = {};
  for (int64_t v = 0; v < nv; ++v) acc += load_acc(q + LANES * v) * k[v];
  float sum = 0.f;
  for (int64_t i = 0; i < LANES; ++i) sum += acc[i];
  return sum;
}

template <typename T>
void attention_step(const T* qkv, const float* cs, T* kc, T* vc, int64_t b, int64_t h, int64_t hkv, int64_t smax,
                    int64_t d, int64_t p, float scale, T* out) {
  const int64_t width = (h + 2 * hkv) * d, group = h / hkv, nv = d / LANES, len = p + 1;
  std::vector<T> qr(b * h * d);
  for (int64_t s = 0; s < b; ++s) {
    const T* row = qkv + s * width;
    for (int64_t j = 0; j < h; ++j) rope(row + j * d, cs, d, &qr[(s * h + j) * d]);
    for (int64_t j = 0; j < hkv; ++j) {
      const int64_t at = ((s * hkv + j) * smax + p) * d;
      rope(row + (h + j) * d, cs, d, kc + at);
      std::memcpy(vc + at, row + (h + hkv + j) * d, d * sizeof(T));
    }
  }
  const auto one_group = [&](int64_t task) {
    std::vector<float> q(group * d), scores(group * len), acc(group * d);
    std::vector<vf> row(nv);
    const int64_t s = task / hkv, head0 = s * h + (task % hkv) * group;
    const T* keys = kc + task * smax * d;
    const T* values = vc + task * smax * d;
    for (int64_t i = 0; i < group * d; ++i) q[i] = to_float(qr[head0 * d + i]);
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t v = 0; v < nv; ++v) row[v] = loadv(keys + t * d + LANES * v);
      for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(&q[g * d], row.data(), nv) * scale;
    }
    for (int64_t g = 0; g < group; ++g) {
      float* sc = &scores[g * len];
      const float top = *std::max_element(sc, sc + len);
      float sum = 0.f;
      for (int64_t t = 0; t < len; ++t) sum += (sc[t] = std::exp(sc[t] - top));
      for (int64_t t = 0; t < len; ++t) sc[t] /= sum;
    }
    for (int64_t t = 0; t < len; ++t) {
      for (int64_t v = 0; v < nv; ++v) row[v] = loadv(values + t * d + LANES * v);
      for (int64_t g = 0; g < group; ++g) {
        const float pg = scores[g * len + t];
        for (int64_t v = 0; v < nv; ++v) store_acc(&acc[g * d + LANES * v], load_acc(&acc[g * d + LANES * v]) + pg * row[v]);
      }
    }
    for (int64_t i = 0; i < group * d; ++i) out[head0 * d + i] = static_cast<T>(acc[i]);
  };
  if (len * d * group < (1 << 16)) {  // a short cache is cheaper on one thread than waking the others
    for (int64_t task = 0; task < b * hkv; ++task) one_group(task);
  } else {
    parallel_blocks(b * hkv, one_group);
  }
}

}  // namespace

at::Tensor sparse_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& thresholds, at::IntArrayRef split_sizes,
                       const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& zeros, int64_t group,
                       bool gated, const c10::optional<at::Tensor>& residual) {
  const std::vector<int64_t> splits(split_sizes.begin(), split_sizes.end());
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

at::Tensor decode_attention_step(const at::Tensor& qkv, const at::Tensor& freqs_cis, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& input_pos, int64_t n_head,
                                 c10::optional<double> scale) {
  const int64_t b = k_cache.size(0), hkv = k_cache.size(1), smax = k_cache.size(2), d = k_cache.size(3);
  const int64_t p = input_pos.item<int64_t>();
  TORCH_CHECK(0 <= p && p < smax, "input_pos ", p, " is outside the cache of ", smax, " positions");
  const float sc = scale ? static_cast<float>(*scale) : 1.f / std::sqrt(static_cast<float>(d));
  at::Tensor out = at::empty({b, n_head, d}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16) {
    attention_step(qkv.data_ptr<at::BFloat16>(), freqs_cis.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
                   v_cache.data_ptr<at::BFloat16>(), b, n_head, hkv, smax, d, p, sc, out.data_ptr<at::BFloat16>());
  } else {
    attention_step(qkv.data_ptr<at::Half>(), freqs_cis.data_ptr<float>(), k_cache.data_ptr<at::Half>(),
                   v_cache.data_ptr<at::Half>(), b, n_head, hkv, smax, d, p, sc, out.data_ptr<at::Half>());
  }
  return out;
}

// Registered with the dispatcher, so a compiled graph calls the kernels without Python in between
// (the Python custom op's dispatch cost ~25 us a call, 120 calls a token).
TORCH_LIBRARY(teal_cpu, m) {
  m.def("sparse_gemv(Tensor x, Tensor w, Tensor thresholds, int[] split_sizes, Tensor? scales, Tensor? zeros, "
        "int group_size, bool gated, Tensor? residual) -> Tensor");
  m.def("decode_attention_step(Tensor qkv, Tensor freqs_cis, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor input_pos, int n_head, float? scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(teal_cpu, CPU, m) {
  m.impl("sparse_gemv", &sparse_gemv);
  m.impl("decode_attention_step", &decode_attention_step);
}
"""


@functools.cache
def available() -> bool:
    """Build (or load the cached build of) the kernels and register them as the ``teal_cpu`` ops;
    False, with a warning, if that fails (no compiler / ninja: the reference serves)."""
    from torch.utils.cpp_extension import load_inline
    try:
        load_inline("teal_cpu_kernels", cpp_sources=[_SOURCE], is_python_module=False, no_implicit_headers=True,
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as e:
        warnings.warn(f"teal CPU kernel unavailable, using the plain-torch reference: {e}", stacklevel=2)
        return False
    torch.library.register_fake("teal_cpu::sparse_gemv")(_sparse_gemv_fake)
    torch.library.register_fake("teal_cpu::decode_attention_step")(_attention_step_fake)
    return True


def _sparse_gemv_fake(x: Tensor, w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None,
                      zeros: Tensor | None, group_size: int, gated: bool, residual: Tensor | None) -> Tensor:
    validate(x, w, thresholds, split_sizes, scales, zeros, group_size, for_kernel=True, gated=gated, residual=residual)
    return x.new_empty(x.shape[0], sum(split_sizes))


def _attention_step_fake(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                         n_head: int, scale: float | None) -> Tensor:
    return qkv.new_empty(validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale))


def sparse_gemv_cpu(x: Tensor, w: Tensor, thresholds: Tensor, split_sizes: list[int], scales: Tensor | None,
                    zeros: Tensor | None, group_size: int, gated: bool = False,
                    residual: Tensor | None = None) -> Tensor:
    """Threshold-sparse x @ W^T reading only the rows of kept inputs, with the op's `gated` and
    `residual` fusions (teal_kernels/reference.py). Eager calls are validated here; compiled ones at
    trace time, by the op's fake."""
    if not torch.compiler.is_compiling():
        validate(x, w, thresholds, split_sizes, scales, zeros, group_size, for_kernel=True, gated=gated,
                 residual=residual)
    if group_size and scales.dtype == torch.int32:  # the C++ reads float32: packed pairs widened (exact)
        scales, zeros = unpack_scales_zeros(scales)
    return torch.ops.teal_cpu.sparse_gemv(x, w, thresholds, list(split_sizes), scales, zeros, group_size, gated,
                                          residual)


def decode_attention_step_cpu(qkv: Tensor, freqs_cis: Tensor, k_cache: Tensor, v_cache: Tensor, input_pos: Tensor,
                              n_head: int, scale: float | None = None) -> Tensor:
    """teal_kernels.ops.decode_attention_step on the CPU: reads only the filled positions 0..input_pos of
    the cache (the reference reads and masks all of it)."""
    if not torch.compiler.is_compiling():
        validate_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)
    return torch.ops.teal_cpu.decode_attention_step(qkv, freqs_cis, k_cache, v_cache, input_pos, n_head, scale)
