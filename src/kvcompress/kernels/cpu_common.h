// Helpers shared by the CPU decode kernels (cpu_decode.cpp, cpu_codebook.cpp): a vector type on
// the widest registers the build targets, dot products, the vectorised exp of the partial
// softmaxes. Internal linkage (an anonymous namespace): each file gets its own copy.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVC_AVX2 1
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kMaxDim = 1024;  // head_dim limit of the stack buffer of one decoded token

// ---- a few vector operations, on the widest registers the build targets
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kChunkVecs = 4;  // vectors of D per micro-tile of the codebook key decode
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(KVC_AVX2)
constexpr int64_t kLanes = 8;
constexpr int kChunkVecs = 2;
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec a) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#else
constexpr int64_t kLanes = 8;
constexpr int kChunkVecs = 1;
struct vec {
  float x[8];
};
inline vec vload(const float* p) {
  vec v;
  std::memcpy(v.x, p, sizeof(v.x));
  return v;
}
inline void vstore(float* p, vec v) { std::memcpy(p, v.x, sizeof(v.x)); }
inline vec vset1(float x) {
  vec v;
  for (float& e : v.x) e = x;
  return v;
}
inline vec vzero() { return vset1(0.0f); }
inline vec vfma(vec a, vec b, vec c) {
  for (int i = 0; i < 8; ++i) c.x[i] += a.x[i] * b.x[i];
  return c;
}
inline float vsum(vec a) {
  float s = 0.0f;
  for (float e : a.x) s += e;
  return s;
}
#endif

#ifdef KVC_AVX2
// [sum(a0), ..., sum(a7)] in one register.
inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h45 = _mm256_hadd_ps(a4, a5), h67 = _mm256_hadd_ps(a6, a7);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}
#endif

// ---- dot products of float rows (three loops, each tuned where it is used)
// n % kLanes == 0, one vector accumulator (the codebook kernel's code-space and decoded-key rows).
inline float dot_lanes(const float* a, const float* b, int64_t n) {
  vec acc = vzero();
  for (int64_t i = 0; i < n; i += kLanes) acc = vfma(vload(a + i), vload(b + i), acc);
  return vsum(acc);
}

// The compiler's simd reduction; DIM > 0 fixes n at compile time, DIM == 0 reads it from `dim`.
template <int DIM>
inline float dot_fixed(const float* a, const float* b, int64_t dim) {
  const int64_t n = DIM > 0 ? DIM : dim;
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

// A float row against a row of full-precision states (float, bfloat16 or float16).
template <typename T>
inline float dot_t(const float* a, const T* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * static_cast<float>(b[i]);
  return acc;
}

// The one exp every kernel uses on scores minus their max (x <= 0), in every vector width:
// n = floor(x log2(e) + 1/2), r = x - n kExpLn2Hi + n kExpLn2Lo (ln 2 in two parts),
// exp(x) = 2^n (1 + r + r^2 q(r)), q by Horner over kExpPoly; exactly 0 below kExpFloor.
constexpr float kExpFloor = -87.0f;
constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpLn2Hi = 0.693359375f;
constexpr float kExpLn2Lo = 2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp(x) for x <= 0 (scores minus their max), vectorisable; exact 0 below kExpFloor.
inline float exp_nonpositive(float x) {
  const float xc = x < kExpFloor ? kExpFloor : x;
  const float n = std::floor(xc * kExpLog2e + 0.5f);
  const float r = xc - n * kExpLn2Hi + n * kExpLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < kExpFloor ? 0.0f : p * scale;
}

// s[j] = exp(s[j] - m) in place (s[j] <= m, s[j] may be -inf); returns the sum.
inline float exp_shifted_sum(float* s, int64_t n, float m) {
  int64_t j = 0;
  float total = 0.0f;
#ifdef KVC_AVX2
  const __m256 mv = _mm256_set1_ps(m), lo = _mm256_set1_ps(kExpFloor);
  __m256 sum = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + j), mv);
    const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);  // exp is 0 below kExpFloor (and for -inf)
    const __m256 xc = _mm256_max_ps(x, lo);
    const __m256 n8 = _mm256_floor_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(kExpLog2e), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n8, _mm256_set1_ps(kExpLn2Hi), xc);
    r = _mm256_fmadd_ps(n8, _mm256_set1_ps(kExpLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpPoly[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
    p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n8), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
    _mm256_storeu_ps(s + j, y);
    sum = _mm256_add_ps(sum, y);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
#endif
  for (; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    total += s[j];
  }
  return total;
}

}  // namespace

// One block of a split softmax: for each of the `rep` query rows of `sc` (rep x len scores, in
// place), the row's max m and sum l of exp(s - m), written to part[i * stride_partial + {0, 1}];
// sc then holds exp(s - m) (zeros for a fully masked row, whose m stays -inf).
inline void block_softmax_stats(float* sc, int rep, int64_t len, float* part, int64_t stride_partial) {
  for (int i = 0; i < rep; ++i) {
    float* s = sc + i * len;
    float m = kNegInf;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < len; ++j) m = s[j] > m ? s[j] : m;
    float l = 0.0f;
    if (m == kNegInf) {
      std::fill(s, s + len, 0.0f);
    } else {
      l = exp_shifted_sum(s, len, m);
    }
    part[i * stride_partial] = m;
    part[i * stride_partial + 1] = l;
  }
}

// acc[i * width + d] += sum_j w[i, j] * row_j[d] over the full-precision tokens of a block: the
// n_sinks sink rows (sv, rows sv_row apart), then the window rows (wv, wv_row apart); w is the
// rep x len block of exp-shifted scores.
template <typename T>
inline void mix_full_precision(const T* sv, int64_t sv_row, const T* wv, int64_t wv_row, int64_t n_sinks,
                               const float* w, int rep, int64_t len, float* acc, int64_t width, int64_t Dv) {
  for (int64_t j = 0; j < len; ++j) {
    const T* row = j < n_sinks ? sv + j * sv_row : wv + (j - n_sinks) * wv_row;
    for (int i = 0; i < rep; ++i) {
      const float wij = w[i * len + j];
      float* a = acc + i * width;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] += wij * static_cast<float>(row[d]);
    }
  }
}
