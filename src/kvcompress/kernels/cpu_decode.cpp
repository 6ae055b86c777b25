// Decode-step attention over a CompressedLayer, computed from the packed codes (CPU).
//
// One query token per sequence. For every (batch, KV head) the scores of each query head of
// its grouped-query group are taken against
//     [ sinks (full precision) | compressed blocks (packed codes) | window (full precision) ]
// then one softmax (float32) and p.v. Codes are decoded one token row at a time into a
// buffer of head_dim floats on the stack; no decoded copy of the cache is ever built.
//
// Codes follow kvcompress.codecs.quant.QuantCodec and kvcompress.codecs.packing exactly:
//   x_hat = code * scale + zero  (scale, zero stored in fp16)
//   axis "channel": `row_tokens` = group tokens share one row; scale/zero (B, H, T/g, D)
//   axis "token":   8 tokens per row; scale/zero (B, H, T, D/g)
//   a row of r tokens holds n = r*D codes (code index t*D + d) split into bit fields (widest
//   first) stored byte-planar: a field of width w takes m = n*w/8 bytes, byte j holding codes
//   j + h*m at bits [h*w, (h+1)*w). With r*w % 8 == 0 every plane holds whole tokens, so
//   token t's D codes of a field are D consecutive bytes shifted by a constant.
//
// The task split, softmax and merge are cpu_split_k.h's; this file supplies how keys are
// scored and values mixed from the codes (`UniformCodes`).
//
// This file does not know about transformers, pre-RoPE keys or codecs other than QuantCodec;
// the Python side (kvcompress.kernels.cpu) decides when it applies.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "cpu_split_k.h"

namespace {

// One QuantCodec's stored tensors, positioned at one (batch, KV head).
struct Packed {
  const uint8_t* codes;   // rows of `row_tokens` tokens
  int64_t row_stride;     // bytes between rows
  const at::Half* scale;  // channel: (T/g, D) rows; token: (T, D/g) rows
  const at::Half* zero;
  int64_t scale_stride;   // elements between scale rows
  int64_t zero_stride;
  int bits;
  bool channel;
  int64_t group;
  int64_t row_tokens;
  int64_t dim;
};

// The D codes of token t (0 <= t < r) of a packed row of r tokens, as floats. DIM > 0 fixes
// head_dim at compile time (the common sizes); DIM == 0 reads it from `dim`.
template <int BITS, int DIM>
inline void decode_token(const uint8_t* row, int64_t r, int64_t dim, int64_t t, float* out) {
  const int64_t D = DIM > 0 ? DIM : dim;
  if constexpr (BITS == 8) {
    const uint8_t* p = row + t * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(p[d]);
  } else if constexpr (BITS == 4 || BITS == 2) {
    const int64_t tpp = r * BITS / 8;  // tokens per plane
    const int sh = static_cast<int>(t / tpp) * BITS;
    const uint8_t* p = row + (t % tpp) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>((p[d] >> sh) & ((1 << BITS) - 1));
  } else {  // 3 bits: a field of width 2 at offset 0, then a field of width 1 at offset 2
    static_assert(BITS == 3, "bits must be 2, 3, 4 or 8");
    const int64_t tpp0 = r / 4, tpp1 = r / 8;
    const int sh0 = static_cast<int>(t / tpp0) * 2, sh1 = static_cast<int>(t / tpp1);
    const uint8_t* p0 = row + (t % tpp0) * D;
    const uint8_t* p1 = row + r * D / 4 + (t % tpp1) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d)
      out[d] = static_cast<float>(((p0[d] >> sh0) & 3) | (((p1[d] >> sh1) & 1) << 2));
  }
}

#ifdef KVC_AVX2
// AVX2 paths for the common layouts: keys per channel (scores of 8 tokens reduced together,
// no horizontal sum per token) and values per token (accumulators held in registers over 8
// tokens). They compute the same sums as the portable loops, in a different order.

inline void half_to_float(const at::Half* src, float* dst, int64_t n) {  // n % 8 == 0
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}

template <int BITS, int DIM>
void key_scores_channel_avx2(const Packed& c, int64_t t0, int64_t t1, const float* q, int rep, float* sc,
                             int64_t ld, std::vector<float>& work) {
  const int64_t D = DIM > 0 ? DIM : c.dim, r = c.row_tokens;
  alignas(32) float cf[8 * kMaxDim];
  work.resize(static_cast<size_t>(rep) * D + 2 * D + rep);
  float* qs = work.data();  // rep x D
  float* sf = qs + rep * D;  // D
  float* zf = sf + D;        // D
  float* qz = zf + D;        // rep
  for (int64_t row = t0 / r; row < t1 / r; ++row) {
    half_to_float(c.scale + row * c.scale_stride, sf, D);
    half_to_float(c.zero + row * c.zero_stride, zf, D);
    for (int h = 0; h < rep; ++h) {
      __m256 accz = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + h * D + d);
        _mm256_storeu_ps(qs + h * D + d, _mm256_mul_ps(qv, _mm256_loadu_ps(sf + d)));
        accz = _mm256_fmadd_ps(qv, _mm256_loadu_ps(zf + d), accz);
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, accz);
      qz[h] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
    const uint8_t* bytes = c.codes + row * c.row_stride;
    for (int64_t tile = 0; tile < r; tile += 8) {
      for (int64_t t = 0; t < 8; ++t) decode_token<BITS, DIM>(bytes, r, D, tile + t, cf + t * D);
      for (int h = 0; h < rep; ++h) {
        __m256 a[8];
        for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 qv = _mm256_loadu_ps(qs + h * D + d);
          for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(qv, _mm256_load_ps(cf + t * D + d), a[t]);
        }
        const __m256 scores = _mm256_add_ps(hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]),
                                            _mm256_set1_ps(qz[h]));
        _mm256_storeu_ps(sc + h * ld + row * r + tile - t0, scores);
      }
    }
  }
}

template <int BITS, int DIM>
void value_mix_token_avx2(const Packed& c, int64_t t0, int64_t t1, const float* p, int rep, int64_t ld,
                          float* acc) {
  const int64_t D = DIM > 0 ? DIM : c.dim, r = c.row_tokens, g = c.group, ng = D / g;
  alignas(32) float cf[8 * kMaxDim];
  float sf[8 * kMaxDim / 8], zf[8 * kMaxDim / 8];  // 8 tokens x ng groups
  for (int64_t row = t0 / r; row < t1 / r; ++row) {  // r == 8: one tile per row
    const uint8_t* bytes = c.codes + row * c.row_stride;
    for (int64_t t = 0; t < 8; ++t) {
      decode_token<BITS, DIM>(bytes, r, D, t, cf + t * D);
      const at::Half* s = c.scale + (row * r + t) * c.scale_stride;
      const at::Half* z = c.zero + (row * r + t) * c.zero_stride;
      for (int64_t k = 0; k < ng; ++k) {
        sf[t * ng + k] = static_cast<float>(s[k]);
        zf[t * ng + k] = static_cast<float>(z[k]);
      }
    }
    for (int h = 0; h < rep; ++h) {
      const float* w = p + h * ld + row * r - t0;
      float* ah = acc + h * D;
      for (int64_t k = 0; k < ng; ++k) {
        float a[8], bsum = 0.0f;
        for (int t = 0; t < 8; ++t) {
          a[t] = w[t] * sf[t * ng + k];
          bsum += w[t] * zf[t * ng + k];
        }
        const __m256 bv = _mm256_set1_ps(bsum);
        for (int64_t d = k * g; d < (k + 1) * g; d += 8) {
          __m256 v = _mm256_add_ps(_mm256_loadu_ps(ah + d), bv);
          for (int t = 0; t < 8; ++t) v = _mm256_fmadd_ps(_mm256_set1_ps(a[t]), _mm256_load_ps(cf + t * D + d), v);
          _mm256_storeu_ps(ah + d, v);
        }
      }
    }
  }
}
#endif  // KVC_AVX2

// Scores of compressed tokens [t0, t1) (t0, t1 multiples of row_tokens) for `rep` query
// heads q (rep x D, already scaled), into sc[h * ld + (t - t0)].
template <int BITS, int DIM>
void key_scores(const Packed& c, int64_t t0, int64_t t1, const float* q, int rep, float* sc, int64_t ld,
                std::vector<float>& work) {
  const int64_t D = DIM > 0 ? DIM : c.dim, r = c.row_tokens;
#ifdef KVC_AVX2
  if (c.channel && D % 8 == 0) return key_scores_channel_avx2<BITS, DIM>(c, t0, t1, q, rep, sc, ld, work);
#endif
  float cf[kMaxDim];
  if (c.channel) {
    work.resize(static_cast<size_t>(rep) * (D + 1));
    float* qs = work.data();       // rep x D: q * scale of this row's group
    float* qz = qs + rep * D;      // rep: q . zero
    for (int64_t row = t0 / r; row < t1 / r; ++row) {
      const at::Half* s = c.scale + row * c.scale_stride;
      const at::Half* z = c.zero + row * c.zero_stride;
      for (int h = 0; h < rep; ++h) {
        const float* qh = q + h * D;
        float* qsh = qs + h * D;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) {
          qsh[d] = qh[d] * static_cast<float>(s[d]);
          acc += qh[d] * static_cast<float>(z[d]);
        }
        qz[h] = acc;
      }
      const uint8_t* bytes = c.codes + row * c.row_stride;
      for (int64_t t = 0; t < r; ++t) {
        decode_token<BITS, DIM>(bytes, r, D, t, cf);
        const int64_t col = row * r + t - t0;
        for (int h = 0; h < rep; ++h) sc[h * ld + col] = dot_fixed<DIM>(qs + h * D, cf, D) + qz[h];
      }
    }
  } else {
    const int64_t g = c.group, ng = D / g;
    work.resize(static_cast<size_t>(rep) * ng);
    float* qsum = work.data();  // rep x ng: sum of q over each channel group
    for (int h = 0; h < rep; ++h)
      for (int64_t k = 0; k < ng; ++k) {
        float acc = 0.0f;
        for (int64_t d = 0; d < g; ++d) acc += q[h * D + k * g + d];
        qsum[h * ng + k] = acc;
      }
    for (int64_t row = t0 / r; row < t1 / r; ++row) {
      const uint8_t* bytes = c.codes + row * c.row_stride;
      for (int64_t t = 0; t < r; ++t) {
        const int64_t token = row * r + t;
        decode_token<BITS, DIM>(bytes, r, D, t, cf);
        const at::Half* s = c.scale + token * c.scale_stride;
        const at::Half* z = c.zero + token * c.zero_stride;
        for (int h = 0; h < rep; ++h) {
          float acc = 0.0f;
          for (int64_t k = 0; k < ng; ++k)
            acc += static_cast<float>(s[k]) * dot_fixed<0>(q + h * D + k * g, cf + k * g, g) +
                   static_cast<float>(z[k]) * qsum[h * ng + k];
          sc[h * ld + token - t0] = acc;
        }
      }
    }
  }
}

// acc[h * D + d] += sum over compressed tokens [t0, t1) of p[h * ld + (t - t0)] * v_hat[t, d].
template <int BITS, int DIM>
void value_mix(const Packed& c, int64_t t0, int64_t t1, const float* p, int rep, int64_t ld, float* acc,
               std::vector<float>& work) {
  const int64_t D = DIM > 0 ? DIM : c.dim, r = c.row_tokens;
#ifdef KVC_AVX2
  if (!c.channel && c.group % 8 == 0) return value_mix_token_avx2<BITS, DIM>(c, t0, t1, p, rep, ld, acc);
#endif
  float cf[kMaxDim];
  if (c.channel) {
    work.resize(static_cast<size_t>(rep) * (D + 1));
    float* pc = work.data();   // rep x D: sum_t p * code over the row
    float* ps = pc + rep * D;  // rep: sum_t p over the row
    for (int64_t row = t0 / r; row < t1 / r; ++row) {
      std::fill(pc, pc + rep * (D + 1), 0.0f);
      const uint8_t* bytes = c.codes + row * c.row_stride;
      for (int64_t t = 0; t < r; ++t) {
        decode_token<BITS, DIM>(bytes, r, D, t, cf);
        const int64_t col = row * r + t - t0;
        for (int h = 0; h < rep; ++h) {
          const float w = p[h * ld + col];
          float* pch = pc + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) pch[d] += w * cf[d];
          ps[h] += w;
        }
      }
      const at::Half* s = c.scale + row * c.scale_stride;
      const at::Half* z = c.zero + row * c.zero_stride;
      for (int h = 0; h < rep; ++h) {
        float* ah = acc + h * D;
        const float* pch = pc + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d)
          ah[d] += static_cast<float>(s[d]) * pch[d] + static_cast<float>(z[d]) * ps[h];
      }
    }
  } else {
    const int64_t g = c.group, ng = D / g;
    for (int64_t row = t0 / r; row < t1 / r; ++row) {
      const uint8_t* bytes = c.codes + row * c.row_stride;
      for (int64_t t = 0; t < r; ++t) {
        const int64_t token = row * r + t;
        decode_token<BITS, DIM>(bytes, r, D, t, cf);
        const at::Half* s = c.scale + token * c.scale_stride;
        const at::Half* z = c.zero + token * c.zero_stride;
        for (int h = 0; h < rep; ++h) {
          const float w = p[h * ld + token - t0];
          if (w == 0.0f) continue;
          float* ah = acc + h * D;
          for (int64_t k = 0; k < ng; ++k) {
            const float a = w * static_cast<float>(s[k]), b = w * static_cast<float>(z[k]);
            float* ak = ah + k * g;
            const float* ck = cf + k * g;
#pragma omp simd
            for (int64_t d = 0; d < g; ++d) ak[d] += a * ck[d] + b;
          }
        }
      }
    }
  }
}

// Instantiate key_scores / value_mix for the common head dims and every bit width.
template <int DIM>
void key_scores_bits(const Packed& c, int64_t t0, int64_t t1, const float* q, int rep, float* sc, int64_t ld,
                     std::vector<float>& work) {
  switch (c.bits) {
    case 2: return key_scores<2, DIM>(c, t0, t1, q, rep, sc, ld, work);
    case 3: return key_scores<3, DIM>(c, t0, t1, q, rep, sc, ld, work);
    case 4: return key_scores<4, DIM>(c, t0, t1, q, rep, sc, ld, work);
    default: return key_scores<8, DIM>(c, t0, t1, q, rep, sc, ld, work);
  }
}

void key_scores_any(const Packed& c, int64_t t0, int64_t t1, const float* q, int rep, float* sc, int64_t ld,
                    std::vector<float>& work) {
  switch (c.dim) {
    case 64: return key_scores_bits<64>(c, t0, t1, q, rep, sc, ld, work);
    case 128: return key_scores_bits<128>(c, t0, t1, q, rep, sc, ld, work);
    case 256: return key_scores_bits<256>(c, t0, t1, q, rep, sc, ld, work);
    default: return key_scores_bits<0>(c, t0, t1, q, rep, sc, ld, work);
  }
}

template <int DIM>
void value_mix_bits(const Packed& c, int64_t t0, int64_t t1, const float* p, int rep, int64_t ld, float* acc,
                    std::vector<float>& work) {
  switch (c.bits) {
    case 2: return value_mix<2, DIM>(c, t0, t1, p, rep, ld, acc, work);
    case 3: return value_mix<3, DIM>(c, t0, t1, p, rep, ld, acc, work);
    case 4: return value_mix<4, DIM>(c, t0, t1, p, rep, ld, acc, work);
    default: return value_mix<8, DIM>(c, t0, t1, p, rep, ld, acc, work);
  }
}

void value_mix_any(const Packed& c, int64_t t0, int64_t t1, const float* p, int rep, int64_t ld, float* acc,
                   std::vector<float>& work) {
  switch (c.dim) {
    case 64: return value_mix_bits<64>(c, t0, t1, p, rep, ld, acc, work);
    case 128: return value_mix_bits<128>(c, t0, t1, p, rep, ld, acc, work);
    case 256: return value_mix_bits<256>(c, t0, t1, p, rep, ld, acc, work);
    default: return value_mix_bits<0>(c, t0, t1, p, rep, ld, acc, work);
  }
}

Packed packed_at(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                 bool channel, int64_t group, int64_t dim, int64_t b, int64_t h) {
  Packed c;
  c.codes = codes.data_ptr<uint8_t>() + b * codes.stride(0) + h * codes.stride(1);
  c.row_stride = codes.stride(2);
  c.scale = scale.data_ptr<at::Half>() + b * scale.stride(0) + h * scale.stride(1);
  c.zero = zero.data_ptr<at::Half>() + b * zero.stride(0) + h * zero.stride(1);
  c.scale_stride = scale.stride(2);
  c.zero_stride = zero.stride(2);
  c.bits = static_cast<int>(bits);
  c.channel = channel;
  c.group = group;
  c.row_tokens = channel ? group : 8;
  c.dim = dim;
  return c;
}

void check_packed(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                  bool channel, int64_t group, int64_t dim, int64_t n_compressed, const char* what) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.stride(3) == 1,
              what, " codes must be (B, H, rows, bytes) uint8 with contiguous rows");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && zero.scalar_type() == at::kHalf && scale.dim() == 4 &&
                  zero.dim() == 4 && scale.stride(3) == 1 && zero.stride(3) == 1,
              what, " scale and zero must be float16 (B, H, n, k) with contiguous rows");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, what, " bits must be 2, 3, 4 or 8");
  const int64_t r = channel ? group : 8;
  TORCH_CHECK(r % 8 == 0, what, " rows must hold a multiple of 8 tokens");
  TORCH_CHECK(codes.size(2) * r == n_compressed && codes.size(3) == r * dim * bits / 8,
              what, " codes shape does not match ", n_compressed, " tokens of dim ", dim);
  if (channel) {
    TORCH_CHECK(scale.size(2) == n_compressed / group && scale.size(3) == dim &&
                    zero.sizes() == scale.sizes(), what, " per-channel scale/zero shape mismatch");
  } else {
    TORCH_CHECK(dim % group == 0 && scale.size(2) == n_compressed && scale.size(3) == dim / group &&
                    zero.sizes() == scale.sizes(), what, " per-token scale/zero shape mismatch");
  }
}

// The policy of split_k_attend for uniform codes: one QuantCodec's keys and one's values.
struct UniformCodes {
  struct Scratch {
    std::vector<float> work;
  };
  static constexpr bool kBlockMajor = false;  // the blocks of a KV head together
  static constexpr bool kCodedValues = false;  // values mixed into acc directly (Dv floats)

  const at::Tensor &k_codes, &k_scale, &k_zero;
  int64_t k_bits;
  bool k_channel;
  int64_t k_group;
  const at::Tensor &v_codes, &v_scale, &v_zero;
  int64_t v_bits;
  bool v_channel;
  int64_t v_group;
  int64_t D, Dv;

  int64_t value_width() const { return Dv; }
  void prepare(const float*, int64_t, int64_t, int) {}
  Scratch scratch() const { return {}; }
  void key_scores(Scratch& s, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* q, int rep, float* sc,
                  int64_t ld) const {
    const Packed kc = packed_at(k_codes, k_scale, k_zero, k_bits, k_channel, k_group, D, b, h);
    key_scores_any(kc, t0, t1, q, rep, sc, ld, s.work);
  }
  void value_mix(Scratch& s, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* p, int rep, int64_t ld,
                 float* acc, int64_t /*acc_stride: Dv*/) const {
    const Packed vc = packed_at(v_codes, v_scale, v_zero, v_bits, v_channel, v_group, Dv, b, h);
    value_mix_any(vc, t0, t1, p, rep, ld, acc, s.work);
  }
};

at::Tensor attend(const at::Tensor& query, const at::Tensor& sink_k, const at::Tensor& sink_v,
                  const at::Tensor& win_k, const at::Tensor& win_v, const at::Tensor& k_codes,
                  const at::Tensor& k_scale, const at::Tensor& k_zero, int64_t k_bits, bool k_channel,
                  int64_t k_group, const at::Tensor& v_codes, const at::Tensor& v_scale, const at::Tensor& v_zero,
                  int64_t v_bits, bool v_channel, int64_t v_group, int64_t n_compressed,
                  const c10::optional<at::Tensor>& mask, double scaling, int64_t block_tokens) {
  check_split_k_inputs(query, sink_k, sink_v, win_k, win_v, n_compressed, mask);
  const int64_t D = query.size(2), Dv = win_v.size(3);
  check_packed(k_codes, k_scale, k_zero, k_bits, k_channel, k_group, D, n_compressed, "key");
  check_packed(v_codes, v_scale, v_zero, v_bits, v_channel, v_group, Dv, n_compressed, "value");
  const int64_t rk = k_channel ? k_group : 8, rv = v_channel ? v_group : 8;
  TORCH_CHECK(block_tokens % rk == 0 && block_tokens % rv == 0, "block_tokens must be a multiple of both row sizes");
  UniformCodes codes{k_codes, k_scale, k_zero, k_bits, k_channel, k_group,
                     v_codes, v_scale, v_zero, v_bits, v_channel, v_group, D, Dv};
  return split_k_attend(codes, query, sink_k, sink_v, win_k, win_v, n_compressed, mask, scaling, block_tokens);
}

}  // namespace

// cpu_codebook.cpp: the same step over codebook codes (codecs.codebook, codecs.allocated).
at::Tensor attend_codebook(const at::Tensor& query, const at::Tensor& sink_k, const at::Tensor& sink_v,
                           const at::Tensor& win_k, const at::Tensor& win_v, const std::vector<at::Tensor>& k_codes,
                           const std::vector<int64_t>& k_bits, const std::vector<at::Tensor>& k_books,
                           const at::Tensor& k_scale, const at::Tensor& k_rows, const at::Tensor& k_offset,
                           const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                           const at::Tensor& rope_positions, const std::vector<at::Tensor>& v_codes,
                           const std::vector<int64_t>& v_bits,
                           const std::vector<at::Tensor>& v_books, const at::Tensor& v_scale,
                           const at::Tensor& v_rows, const at::Tensor& v_offset, int64_t n_compressed,
                           const c10::optional<at::Tensor>& mask, double scaling, int64_t block_tokens);

// cpu_paged.cpp: attention over a paged pool of packed slots (kvcompress.paged).
std::vector<at::Tensor> paged_attend(const at::Tensor& query, const at::Tensor& pages, const at::Tensor& block_table,
                                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                     const std::vector<int64_t>& key_part, const at::Tensor& key_book,
                                     const std::vector<int64_t>& value_part, const at::Tensor& value_book,
                                     const at::Tensor& key_rotation, const at::Tensor& value_rotation_t,
                                     double scale, int64_t split_tokens);

// cpu_paged_write.cpp: a step's keys and values encoded into their slots (kvcompress.paged).
int64_t paged_write(const at::Tensor& pages, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping, const std::vector<int64_t>& key_part, const at::Tensor& key_book,
                    const at::Tensor& key_cuts, const std::vector<int64_t>& value_part,
                    const at::Tensor& value_book, const at::Tensor& value_cuts, int64_t sum_lanes,
                    int64_t extreme_lanes);

// The vector path the build compiled (cpu_common.h): "avx512", "avx2" or "scalar".
static std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(KVC_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "Decode-step attention over packed KV codes (see cpu_decode.cpp)");
  m.def("attend_codebook", &attend_codebook, "Decode-step attention over codebook codes (see cpu_codebook.cpp)");
  m.def("paged_attend", &paged_attend, "Causal attention over a paged pool of packed slots (see cpu_paged.cpp)");
  m.def("paged_write", &paged_write, "Encode keys and values into their slots of a paged pool (see cpu_paged_write.cpp)");
  m.def("isa", &isa, "The vector path the build compiled: avx512, avx2 or scalar");
}
