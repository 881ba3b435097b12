// Inner loops shared by the CPU kernels.
//
// The extension is built for the baseline x86-64/aarch64 ISA, where fp16 <-> fp32 conversion is scalar
// software. The hot loops (router dot product and RMS statistic, normalized and scatter-add rows) therefore
// have an AVX2+FMA+F16C variant, compiled with a target attribute and chosen at run time when the CPU has
// it. The portable versions use independent partial sums so GCC vectorises them at -O3. Rounding is the
// same on both paths: products and sums are rounded to the tensor dtype exactly where PyTorch rounds them
// (no FMA contraction).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MINDSKIP_X86_SIMD 1
#define MINDSKIP_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace mindskip::cpu {

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// ---- portable loops --------------------------------------------------------------------------------------

// sum_i acc_t(a[i]) * w[i] over kLanes independent partial sums.
template <typename acc_t, typename T>
inline acc_t dot_portable(const T* __restrict__ a, const acc_t* __restrict__ w, int64_t n) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<acc_t>(a[i + l]) * w[i + l];
  }
  acc_t sum = 0;
  for (; i < n; ++i) sum += static_cast<acc_t>(a[i]) * w[i];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// (sum_i a[i] * w[i], sum_i a[i]^2) in one pass: the router logit and the RMS statistic of a row.
template <typename acc_t, typename T>
inline std::pair<acc_t, acc_t> dot_sumsq_portable(const T* __restrict__ a, const acc_t* __restrict__ w, int64_t n) {
  constexpr int kLanes = 16;
  acc_t dp[kLanes] = {}, sq[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const auto x = static_cast<acc_t>(a[i + l]);
      dp[l] += x * w[i + l];
      sq[l] += x * x;
    }
  }
  acc_t d = 0, q = 0;
  for (; i < n; ++i) {
    const auto x = static_cast<acc_t>(a[i]);
    d += x * w[i];
    q += x * x;
  }
  for (int l = 0; l < kLanes; ++l) {
    d += dp[l];
    q += sq[l];
  }
  return {d, q};
}

// dst = T(src * rstd * gamma): an RMS-normalized row with one rounding.
template <typename acc_t, typename T>
inline void norm_row_portable(const T* __restrict__ src, const acc_t* __restrict__ gamma, acc_t rstd,
                              T* __restrict__ dst, int64_t n, int64_t i0 = 0) {
  for (int64_t i = i0; i < n; ++i) dst[i] = static_cast<T>(static_cast<acc_t>(src[i]) * rstd * gamma[i]);
}

// dst = res + T(val * gate) (gate == nullptr: dst = res + val), each result rounded to T.
template <typename acc_t, typename T>
inline void add_row_portable(const T* __restrict__ res, const T* __restrict__ val, const acc_t* gate,
                             T* __restrict__ dst, int64_t n, int64_t i0 = 0) {
  for (int64_t i = i0; i < n; ++i) {
    const T v = gate ? static_cast<T>(static_cast<acc_t>(val[i]) * *gate) : val[i];
    dst[i] = static_cast<T>(static_cast<acc_t>(res[i]) + static_cast<acc_t>(v));
  }
}

// p[i] = exp(p[i] - shift) in place; returns the sum (a softmax row's denominator).
template <typename acc_t>
inline acc_t exp_sum_portable(acc_t* __restrict__ p, acc_t shift, int64_t n, int64_t i0 = 0) {
  acc_t sum = 0;
  for (int64_t i = i0; i < n; ++i) sum += (p[i] = std::exp(p[i] - shift));
  return sum;
}

// acc[i] += p * acc_t(v[i]): a value row weighted into an attention output.
template <typename acc_t, typename T>
inline void axpy_portable(acc_t* __restrict__ acc, acc_t p, const T* __restrict__ v, int64_t n, int64_t i0 = 0) {
  for (int64_t i = i0; i < n; ++i) acc[i] += p * static_cast<acc_t>(v[i]);
}

// ---- AVX2 loops (fp32 accumulation types only) -----------------------------------------------------------

#ifdef MINDSKIP_X86_SIMD
inline bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

MINDSKIP_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MINDSKIP_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MINDSKIP_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

MINDSKIP_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
MINDSKIP_AVX2 inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
// Round to nearest even like c10::BFloat16 (NaN -> 0x7FC0).
MINDSKIP_AVX2 inline void store8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

MINDSKIP_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename T>
MINDSKIP_AVX2 float dot_avx2(const T* a, const float* w, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(w + i), s0);
    s1 = _mm256_fmadd_ps(load8(a + i + 8), _mm256_loadu_ps(w + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(w + i), s0);
  float sum = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) sum += static_cast<float>(a[i]) * w[i];
  return sum;
}

template <typename T>
MINDSKIP_AVX2 std::pair<float, float> dot_sumsq_avx2(const T* a, const float* w, int64_t n) {
  __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps(), q0 = _mm256_setzero_ps(), q1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = load8(a + i), x1 = load8(a + i + 8);
    d0 = _mm256_fmadd_ps(x0, _mm256_loadu_ps(w + i), d0);
    d1 = _mm256_fmadd_ps(x1, _mm256_loadu_ps(w + i + 8), d1);
    q0 = _mm256_fmadd_ps(x0, x0, q0);
    q1 = _mm256_fmadd_ps(x1, x1, q1);
  }
  float d = hsum(_mm256_add_ps(d0, d1)), q = hsum(_mm256_add_ps(q0, q1));
  for (; i < n; ++i) {
    const float x = static_cast<float>(a[i]);
    d += x * w[i];
    q += x * x;
  }
  return {d, q};
}

// exp of 8 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts), e^r by its degree-6 Taylor-like minimax
// polynomial, 2^n through the exponent bits; inputs clamped to [-87.3, 88] (e^x underflows to ~1e-38 at the
// bottom, which a softmax sum cannot tell from 0). Relative error about 2 ulp.
MINDSKIP_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

MINDSKIP_AVX2 inline float exp_sum_avx2(float* p, float shift, int64_t n) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), s));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum(acc) + exp_sum_portable(p, shift, n, i);
}

template <typename T>
MINDSKIP_AVX2 void axpy_avx2(float* acc, float p, const T* v, int64_t n) {
  const __m256 w = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(w, load8(v + i), _mm256_loadu_ps(acc + i)));
  axpy_portable(acc, p, v, n, i);
}

template <typename T>
MINDSKIP_AVX2 void norm_row_avx2(const T* src, const float* gamma, float rstd, T* dst, int64_t n) {
  const __m256 r = _mm256_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    store8(dst + i, _mm256_mul_ps(_mm256_mul_ps(load8(src + i), r), _mm256_loadu_ps(gamma + i)));
  }
  norm_row_portable(src, gamma, rstd, dst, n, i);
}

template <typename T>
MINDSKIP_AVX2 void add_row_avx2(const T* res, const T* val, const float* gate, T* dst, int64_t n) {
  int64_t i = 0;
  if (gate) {
    const __m256 g = _mm256_set1_ps(*gate);
    alignas(32) T prod[8];
    for (; i + 8 <= n; i += 8) {
      store8(prod, _mm256_mul_ps(load8(val + i), g));  // rounded to T, like `values * scale`
      store8(dst + i, _mm256_add_ps(load8(res + i), load8(prod)));
    }
  } else {
    for (; i + 8 <= n; i += 8) store8(dst + i, _mm256_add_ps(load8(res + i), load8(val + i)));
  }
  add_row_portable(res, val, gate, dst, n, i);
}
#endif

// ---- dispatch --------------------------------------------------------------------------------------------

template <typename acc_t, typename T>
inline acc_t dot(const T* a, const acc_t* w, int64_t n) {
#ifdef MINDSKIP_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return dot_avx2(a, w, n);
  }
#endif
  return dot_portable(a, w, n);
}

template <typename acc_t, typename T>
inline std::pair<acc_t, acc_t> dot_sumsq(const T* a, const acc_t* w, int64_t n) {
#ifdef MINDSKIP_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return dot_sumsq_avx2(a, w, n);
  }
#endif
  return dot_sumsq_portable(a, w, n);
}

template <typename acc_t, typename T>
inline void norm_row(const T* src, const acc_t* gamma, acc_t rstd, T* dst, int64_t n) {
#ifdef MINDSKIP_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return norm_row_avx2(src, gamma, rstd, dst, n);
  }
#endif
  norm_row_portable(src, gamma, rstd, dst, n);
}

template <typename acc_t>
inline acc_t exp_sum(acc_t* p, acc_t shift, int64_t n) {
#ifdef MINDSKIP_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return exp_sum_avx2(p, shift, n);
  }
#endif
  return exp_sum_portable(p, shift, n);
}

template <typename acc_t, typename T>
inline void axpy(acc_t* acc, acc_t p, const T* v, int64_t n) {
#ifdef MINDSKIP_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return axpy_avx2(acc, p, v, n);
  }
#endif
  axpy_portable(acc, p, v, n);
}

template <typename acc_t, typename T>
inline void add_row(const T* res, const T* val, const acc_t* gate, T* dst, int64_t n) {
#ifdef MINDSKIP_X86_SIMD
  if constexpr (std::is_same_v<acc_t, float>) {
    if (has_avx2()) return add_row_avx2(res, val, gate, dst, n);
  }
#endif
  add_row_portable(res, val, gate, dst, n);
}

}  // namespace mindskip::cpu
