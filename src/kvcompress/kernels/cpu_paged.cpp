// Causal attention of query tokens over a paged pool of packed slots (kvcompress.paged), on the
// CPU: what kernels.paged_attention.paged_attention_torch computes, rotations included.
//
// pages (num_blocks, Hkv, block_size, slot_bytes) uint8; token t of request r is row
// t % block_size of block block_table[r, t / block_size]; request r's q_r queries (rows
// query_start_loc[r] .. query_start_loc[r + 1]) are its last q_r of seq_lens[r] tokens: query i
// sits at p = seq_lens[r] - q_r + i and attends to tokens 0 .. p. Splits cut the tokens at fixed
// multiples of `split_tokens` from token 0; a task (request, KV head, split, up to kTaskRows query
// tokens) decodes the split's tokens its rows reach, kTile at a time, into a buffer of at most one
// split (no dense copy of a sequence), then passes the tiles in order over kBlockRows query tokens at a
// time (their partial states stay in cache), with an online softmax per row; threads take tasks as they
// come free, costliest first; the splits are merged in order.
// The tile holds keys transposed (D, kTile) and values (kTile, D) in float32. With AVX-512, the keys
// of uniform and codebook parts are gathered 16 tokens at a time from their slots straight into the
// transposed tile (`gather_keys`); other parts, and values, are decoded token by token with SIMD
// unpacking, keys then transposed 8 x 8 in registers. Every path computes the same float values
// (code * scale + zero by one fma, centroid * scale), so the path does not change a result's bits.
// Every step of a row's arithmetic (rotation, tiles, merge, un-rotation) depends only on its query
// and p, never on the other rows of the call: a token computes the same bits in any chunk or batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

// One part (K or V) of a slot, as kvcompress.paged.PartLayout describes it.
struct Part {
  int method;         // 0: uniform codes ("quant", "hadamard+quant"); 1: codebook; 2: "none"
  int64_t offset;     // first byte of the part in the slot
  int bits;           // code width (methods 0 and 1)
  int64_t group;      // channels per scale and zero point (method 0)
  int64_t scale_at;   // byte offset of the fp16 scales in the part
  int64_t zero_at;    // byte offset of the fp16 zero points (method 0)
  int dtype;          // method 2: 0 float32, 1 float16, 2 bfloat16
  const float* book;  // method 1: 2**bits centroids
  float book_padded[16];  // method 1 with bits <= 4: the centroids, zeros after (a 16-lane lookup table)
};

Part describe_part(const std::vector<int64_t>& d, const at::Tensor& book, int64_t D, int64_t slot_bytes,
                   const char* what) {
  TORCH_CHECK(d.size() == 7, what, ": part description must be (method, offset, bits, group, scale_at, zero_at, dtype)");
  Part p{static_cast<int>(d[0]), d[1], static_cast<int>(d[2]), d[3], d[4], d[5], static_cast<int>(d[6]), nullptr, {}};
  TORCH_CHECK(p.method >= 0 && p.method <= 2, what, ": unknown method");
  if (p.method != 2) TORCH_CHECK(p.bits >= 1 && p.bits <= 8, what, ": bits must be 1..8");
  if (p.method == 0) TORCH_CHECK(p.group >= 1, what, ": group must be positive");
  if (p.method == 1) {
    TORCH_CHECK(book.scalar_type() == at::kFloat && book.dim() == 1 && book.is_contiguous() &&
                    book.size(0) == (int64_t{1} << p.bits), what, ": codebook must be float32 (2**bits,)");
    p.book = book.data_ptr<float>();
    for (int64_t i = 0; i < std::min<int64_t>(16, book.size(0)); ++i) p.book_padded[i] = p.book[i];
  }
  if (p.method == 2) TORCH_CHECK(p.dtype >= 0 && p.dtype <= 2, what, ": unknown dtype");
  if (p.method == 0) TORCH_CHECK(D % p.group == 0, what, ": group must divide head_dim");
  const int64_t codes = p.method == 2 ? 0 : D * p.bits / 8;
  const int64_t end = p.method == 2 ? D * (p.dtype == 0 ? 4 : 2)
                                    : std::max(p.scale_at + 2 * (p.method == 1 ? 1 : D / p.group),
                                               p.method == 0 ? p.zero_at + 2 * (D / p.group) : 0);
  TORCH_CHECK(p.offset >= 0 && p.scale_at >= codes && p.offset + std::max(codes, end) <= slot_bytes,
              what, ": the part does not fit in a slot of ", slot_bytes, " bytes");
  return p;
}

inline float half_at(const uint8_t* p) {
#ifdef KVC_AVX2
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _cvtsh_ss(bits);  // exact, as every fp16 -> fp32 conversion
#else
  at::Half h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
#endif
}

// The D codes of a part (bit fields of widths 8/4/2/1, the binary expansion of bits, widest first;
// byte-planar: byte j of a field of width w holds codes j + h * m at bits h * w, m = D * w / 8).
inline void unpack_codes(const uint8_t* field, int bits, int64_t D, uint8_t* codes) {
  int shift = 0;
  for (int width = 8; width >= 1; width /= 2) {
    if (bits - shift < width) continue;
    const int64_t m = D * width / 8;
    const int mask = (1 << width) - 1;
    int64_t j0 = 0;
#ifdef KVC_AVX2
    if (width == 4 && shift == 0) {  // the int4 case: 16 bytes -> 32 codes at a time
      const __m128i low = _mm_set1_epi8(0x0F);
      for (; j0 + 16 <= m; j0 += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(field + j0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + j0), _mm_and_si128(v, low));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + m + j0), _mm_and_si128(_mm_srli_epi16(v, 4), low));
      }
    }
#endif
    for (int h = 0; h < 8 / width; ++h)
      for (int64_t j = j0; j < m; ++j) {
        const uint8_t value = static_cast<uint8_t>(((field[j] >> (h * width)) & mask) << shift);
        codes[h * m + j] = shift ? static_cast<uint8_t>(codes[h * m + j] | value) : value;
      }
    field += m;
    shift += width;
  }
}

// The part's stored vector (D floats) in the slot at `slot` (kvcompress.paged.SlotLayout).
inline void decode_part(const Part& c, const uint8_t* slot, int64_t D, float* out) {
  const uint8_t* p = slot + c.offset;
  if (c.method == 2) {
    if (c.dtype == 0) {
      std::memcpy(out, p, D * sizeof(float));
    } else if (c.dtype == 1) {
      for (int64_t d = 0; d < D; ++d) out[d] = half_at(p + 2 * d);
    } else {
      for (int64_t d = 0; d < D; ++d) {
        at::BFloat16 v;
        std::memcpy(&v, p + 2 * d, sizeof(v));
        out[d] = static_cast<float>(v);
      }
    }
    return;
  }
  alignas(32) uint8_t codes_buffer[kMaxDim];
  const uint8_t* codes = p;  // 8-bit codes are the bytes themselves
  if (c.bits != 8) {
    unpack_codes(p, c.bits, D, codes_buffer);
    codes = codes_buffer;
  }
  if (c.method == 1) {
    const float s = half_at(p + c.scale_at);
    for (int64_t d = 0; d < D; ++d) out[d] = c.book[codes[d]] * s;
    return;
  }
  for (int64_t k = 0; k < D / c.group; ++k) {
    const float s = half_at(p + c.scale_at + 2 * k), z = half_at(p + c.zero_at + 2 * k);
    const uint8_t* ck = codes + k * c.group;
    float* ok = out + k * c.group;
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 ws = _mm512_set1_ps(s), wz = _mm512_set1_ps(z);
    for (; d + 16 <= c.group; d += 16) {
      const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ck + d))));
      _mm512_storeu_ps(ok + d, _mm512_fmadd_ps(x, ws, wz));
    }
#endif
#ifdef KVC_AVX2
    const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
    for (; d + 8 <= c.group; d += 8) {
      const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(ck + d))));
      _mm256_storeu_ps(ok + d, _mm256_fmadd_ps(x, vs, vz));
    }
#endif
    for (; d < c.group; ++d) ok[d] = std::fma(static_cast<float>(ck[d]), s, z);
  }
}

constexpr int64_t kTile = 32;  // tokens decoded at a time (a multiple of kLanes)

// kt (D, kTile) = kr (kTile, D) transposed (D a multiple of 8): 8 x 8 blocks in registers.
inline void transpose_tile(const float* kr, int64_t D, float* kt) {
#ifdef KVC_AVX2
  for (int64_t j0 = 0; j0 < kTile; j0 += 8)
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(kr + (j0 + i) * D + d0);
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 2; ++i)
        for (int k = 0; k < 2; ++k) {
          r[4 * i + k] = _mm256_shuffle_ps(t[4 * i + k], t[4 * i + 2 + k], _MM_SHUFFLE(1, 0, 1, 0));
          r[4 * i + 2 + k] = _mm256_shuffle_ps(t[4 * i + k], t[4 * i + 2 + k], _MM_SHUFFLE(3, 2, 3, 2));
        }
      // r: rows 0-3 then 4-7 of each 128-bit half; pair the halves
      const int order[4] = {0, 2, 1, 3};
      for (int k = 0; k < 4; ++k) {
        const int m = order[k];
        _mm256_storeu_ps(kt + (d0 + k) * kTile + j0, _mm256_permute2f128_ps(r[m], r[4 + m], 0x20));
        _mm256_storeu_ps(kt + (d0 + 4 + k) * kTile + j0, _mm256_permute2f128_ps(r[m], r[4 + m], 0x31));
      }
    }
#else
  for (int64_t j = 0; j < kTile; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * kTile + j] = kr[j * D + d];
#endif
}

#if defined(__AVX512F__)
// Whether the keys' tile can be gathered straight into kt (`gather_keys`): uniform or codebook codes
// (codebooks of at most 16 centroids) whose every bit field is a whole number of 32-bit words.
inline bool gatherable(const Part& c, int64_t D) {
  if (c.method == 2 || (c.method == 1 && c.bits > 4)) return false;
  int shift = 0;
  for (int width = 8; width >= 1; width /= 2) {
    if (c.bits - shift < width) continue;
    if ((D * width / 8) % 4) return false;
    shift += width;
  }
  return true;
}

// kt[d * kTile + j] (D, kTile) = the stored keys of the tile's tokens j < n (zeros after), gathered 16
// tokens at a time from their slots (byte offsets `offsets` from `base`, the part's offset included):
// the same values decode_part gives (code * scale + zero by one fma; centroid * scale), without a
// per-token row or a transpose. `codes` is scratch of D vectors.
inline void gather_keys(const Part& c, const uint8_t* base, const int32_t* offsets, int64_t n, int64_t D,
                        float* kt, __m512i* codes) {
  for (int64_t h0 = 0; h0 < kTile; h0 += 16) {
    const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, n - h0));
    float* col = kt + h0;
    if (valid == 0) {
      for (int64_t d = 0; d < D; ++d) _mm512_storeu_ps(col + d * kTile, _mm512_setzero_ps());
      continue;
    }
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
    const __m512i at = _mm512_maskz_loadu_epi32(mask, offsets + h0);
    const __m512i zero = _mm512_setzero_si512();
    auto gather = [&](int64_t byte) {  // the 32-bit word at `byte` of each token's part (0 for padding)
      return _mm512_mask_i32gather_epi32(zero, mask, _mm512_add_epi32(at, _mm512_set1_epi32(static_cast<int>(byte))),
                                         base, 1);
    };
    auto half = [&](int64_t byte) {  // the fp16 at `byte` (read as the top of the word 2 bytes before), as floats
      const __m512i word = _mm512_srli_epi32(gather(byte - 2), 16);
      return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(word));
    };
    // codes: field by field (widths 8/4/2/1, widest first); byte j of a field holds codes j + h * m
    int shift = 0;
    int64_t field = 0;
    for (int width = 8; width >= 1; width /= 2) {
      if (c.bits - shift < width) continue;
      const int64_t m = D * width / 8;
      const __m512i wmask = _mm512_set1_epi32((1 << width) - 1);
      for (int64_t u = 0; u < m; u += 4) {
        const __m512i word = gather(field + u);
        for (int k = 0; k < 4; ++k)
          for (int h = 0; h < 8 / width; ++h) {
            const int64_t d = u + k + h * m;
            const __m512i value = _mm512_and_si512(_mm512_srl_epi32(word, _mm_cvtsi32_si128(8 * k + h * width)), wmask);
            codes[d] = shift ? _mm512_or_si512(codes[d], _mm512_sll_epi32(value, _mm_cvtsi32_si128(shift))) : value;
          }
      }
      field += m;
      shift += width;
    }
    if (c.method == 1) {
      const __m512 book = _mm512_loadu_ps(c.book_padded);
      const __m512 s = half(c.scale_at);
      for (int64_t d = 0; d < D; ++d)
        _mm512_storeu_ps(col + d * kTile, _mm512_mul_ps(_mm512_permutexvar_ps(codes[d], book), s));
      continue;
    }
    for (int64_t g = 0; g < D / c.group; ++g) {
      const __m512 s = half(c.scale_at + 2 * g), z = half(c.zero_at + 2 * g);
      for (int64_t d = g * c.group; d < (g + 1) * c.group; ++d)
        _mm512_storeu_ps(col + d * kTile, _mm512_fmadd_ps(_mm512_cvtepi32_ps(codes[d]), s, z));
    }
  }
}
#endif

constexpr int64_t kTaskRows = 256;   // query tokens per task at most: a long chunk's rows spread over the threads
constexpr int64_t kBlockRows = 16;   // query tokens whose partial states stay in cache while a task's tiles pass

// Query tokens i_begin .. i_end of a request, against the tokens of one split, for one KV head.
struct Task {
  int64_t request, head, split, i_begin, i_end;
  int64_t cost;  // query-token x token pairs, for the order in which the threads take tasks
};

// y (D) = x (D) @ m (D, D), summed over x's index in order (m row-major); the same bits for a row
// whatever else is computed.
inline void row_times_matrix(const float* x, const float* m, int64_t D, float* y) {
  std::fill(y, y + D, 0.0f);
  for (int64_t e = 0; e < D; ++e) {
    const float xe = x[e];
    const float* me = m + e * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) y[d] += xe * me[d];
  }
}

// v, kept in a register: a vector that several rows use is loaded once (the compiler would otherwise fold
// the load into each row's fma, loading it once per row: the loads, not the fmas, then bound the loop).
inline vec in_register(vec v) {
#if defined(__AVX512F__) || defined(KVC_AVX2)
  asm("" : "+v"(v));
#endif
  return v;
}

// s[r * kTile + j] = q_r . kt[:, j] for ROWS query rows (q_r = q + r * D) and the kTile columns of the
// transposed tile kt (D, kTile), each summed over d in order (the rows share the tile's loads; a row's
// bits do not depend on the others).
template <int ROWS>
inline void tile_scores(const float* q, const float* kt, int64_t D, float* s) {
  constexpr int kVecs = static_cast<int>(kTile / kLanes);
  vec a[ROWS][kVecs];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) a[r][v] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    const float* row = kt + d * kTile;
    vec k[kVecs];
    for (int v = 0; v < kVecs; ++v) k[v] = in_register(vload(row + v * kLanes));
    for (int r = 0; r < ROWS; ++r) {
      const vec qd = vset1(q[r * D + d]);
      for (int v = 0; v < kVecs; ++v) a[r][v] = vfma(qd, k[v], a[r][v]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < kVecs; ++v) vstore(s + r * kTile + v * kLanes, a[r][v]);
}

// acc[r] (D) += sum_j w[r * kTile + j] * vt[j, :] over j < n, in order of j, for ROWS rows (vt (kTile, D)).
template <int ROWS>
inline void tile_mix(const float* w, const float* vt, int64_t n, int64_t D, float* const* acc) {
  int64_t d0 = 0;
  for (; d0 + 2 * kLanes <= D; d0 += 2 * kLanes) {
    vec a[ROWS][2];
    for (int r = 0; r < ROWS; ++r) a[r][0] = vload(acc[r] + d0), a[r][1] = vload(acc[r] + d0 + kLanes);
    for (int64_t j = 0; j < n; ++j) {
      const float* row = vt + j * D + d0;
      const vec v0 = in_register(vload(row)), v1 = in_register(vload(row + kLanes));
      for (int r = 0; r < ROWS; ++r) {
        const vec wj = vset1(w[r * kTile + j]);
        a[r][0] = vfma(wj, v0, a[r][0]);
        a[r][1] = vfma(wj, v1, a[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r) vstore(acc[r] + d0, a[r][0]), vstore(acc[r] + d0 + kLanes, a[r][1]);
  }
  for (; d0 + kLanes <= D; d0 += kLanes)
    for (int r = 0; r < ROWS; ++r) {
      vec a = vload(acc[r] + d0);
      for (int64_t j = 0; j < n; ++j) a = vfma(vset1(w[r * kTile + j]), vload(vt + j * D + d0), a);
      vstore(acc[r] + d0, a);
    }
  for (; d0 < D; ++d0)
    for (int r = 0; r < ROWS; ++r) {
      float a = acc[r][d0];
      for (int64_t j = 0; j < n; ++j) a = std::fma(w[r * kTile + j], vt[j * D + d0], a);
      acc[r][d0] = a;
    }
}

// One tile for ROWS query rows of one token (the same position, so the same `len` tokens of the tile):
// scores, each row's online softmax update (part: max, sum, acc[D]), and the values mixed in.
template <int ROWS>
inline void tile_rows(const float* q, const float* kt, const float* vt, int64_t len, int64_t D, float scale,
                      float* const* parts, float* sc) {
  tile_scores<ROWS>(q, kt, D, sc);
  float* acc[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    float* part = parts[r];
    float* s = sc + r * kTile;
    acc[r] = part + 2;
    float m = kNegInf;
    int64_t j = 0;
#if defined(__AVX512F__)
    {
      const __m512 vscale = _mm512_set1_ps(scale);
      __m512 vm = _mm512_set1_ps(kNegInf);
      for (; j + 16 <= len; j += 16) {
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale);
        _mm512_storeu_ps(s + j, x);
        vm = _mm512_max_ps(vm, x);
      }
      m = _mm512_reduce_max_ps(vm);
    }
#endif
    for (; j < len; ++j) {
      s[j] *= scale;
      m = std::max(m, s[j]);
    }
    if (m == kNegInf) {  // every score -inf (NaN-free inputs never give it): the row takes nothing from here
      std::fill(s, s + len, 0.0f);
      continue;
    }
    if (m > part[0]) {
      if (part[0] != kNegInf) {
        const float correction = exp_nonpositive(part[0] - m);
        part[1] *= correction;
        for (int64_t d = 0; d < D; ++d) part[2 + d] *= correction;
      }
      part[0] = m;
    }
    part[1] += exp_shifted_sum(s, len, part[0]);
  }
  tile_mix<ROWS>(sc, vt, len, D, acc);
}

#if defined(__AVX512F__)
// exp(x) per lane, x <= 0 or -inf: exp_shifted_sum's AVX2 steps on 16 lanes (the same bits in every lane).
inline __m512 exp_lanes(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpFloor);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);  // exp is 0 below kExpFloor (and for -inf)
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(kExpLog2e), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Hi), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kExpLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e));
}

// The sum exp_shifted_sum returns for the 32 values of e0, e1: 8 lanes summed over the four groups of 8 in
// order, then the lanes in pairs.
inline float sum_as_exp_shifted(__m512 e0, __m512 e1) {
  __m256 acc = _mm256_add_ps(_mm512_castps512_ps256(e0), _mm512_extractf32x8_ps(e0, 1));
  acc = _mm256_add_ps(_mm256_add_ps(acc, _mm512_castps512_ps256(e1)), _mm512_extractf32x8_ps(e1, 1));
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// tile_rows for a whole tile (len == kTile == 32) with AVX-512: the same bits, the rows' softmax steps
// side by side in registers instead of one row after the other through memory.
template <int ROWS>
inline void tile_rows_full(const float* q, const float* kt, const float* vt, int64_t D, float scale,
                           float* const* parts, float* sc) {
  static_assert(kTile == 32 && kLanes == 16, "a tile is two vectors");
  tile_scores<ROWS>(q, kt, D, sc);
  const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(kNegInf);
  __m512 x[ROWS][2];
  float m[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    x[r][0] = _mm512_mul_ps(_mm512_loadu_ps(sc + r * kTile), vscale);
    x[r][1] = _mm512_mul_ps(_mm512_loadu_ps(sc + r * kTile + kLanes), vscale);
    m[r] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(neg_inf, x[r][0]), x[r][1]));
  }
  float* acc[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    float* part = parts[r];
    acc[r] = part + 2;
    if (m[r] == kNegInf) continue;  // every score -inf (NaN-free inputs never give it): nothing from here
    if (m[r] > part[0]) {
      if (part[0] != kNegInf) {
        const float correction = exp_nonpositive(part[0] - m[r]);
        part[1] *= correction;
        for (int64_t d = 0; d < D; ++d) part[2 + d] *= correction;
      }
      part[0] = m[r];
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float* s = sc + r * kTile;
    if (m[r] == kNegInf) {
      _mm512_storeu_ps(s, _mm512_setzero_ps());
      _mm512_storeu_ps(s + kLanes, _mm512_setzero_ps());
      continue;
    }
    const __m512 mv = _mm512_set1_ps(parts[r][0]);
    const __m512 e0 = exp_lanes(_mm512_sub_ps(x[r][0], mv)), e1 = exp_lanes(_mm512_sub_ps(x[r][1], mv));
    _mm512_storeu_ps(s, e0);
    _mm512_storeu_ps(s + kLanes, e1);
    parts[r][1] += sum_as_exp_shifted(e0, e1);
  }
  tile_mix<ROWS>(sc, vt, kTile, D, acc);
}
#endif

}  // namespace

// (out (T, Hq, D) float32, lse (T, Hq) float32) of query (T, Hq, D) float32; key_rotation (D, D)
// (queries scored as q @ R_K against the stored keys) and value_rotation_t (D, D) (out = o @ R_V^T,
// given as R_V^T) are float32, or empty for none. See the top of this file.
std::vector<at::Tensor> paged_attend(const at::Tensor& query, const at::Tensor& pages, const at::Tensor& block_table,
                                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                                     const std::vector<int64_t>& key_part, const at::Tensor& key_book,
                                     const std::vector<int64_t>& value_part, const at::Tensor& value_book,
                                     const at::Tensor& key_rotation, const at::Tensor& value_rotation_t,
                                     double scale, int64_t split_tokens) {
  TORCH_CHECK(query.device().is_cpu() && pages.device().is_cpu(), "kvcompress paged kernel: tensors must be on the CPU");
  TORCH_CHECK(query.scalar_type() == at::kFloat && query.dim() == 3 && query.is_contiguous(),
              "query must be contiguous float32 (T, Hq, D)");
  TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 4 && pages.stride(3) == 1,
              "pages must be uint8 (num_blocks, Hkv, block_size, slot_bytes) with contiguous slots");
  const int64_t T = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t H = pages.size(1), block_size = pages.size(2), slot_bytes = pages.size(3);
  TORCH_CHECK(Hq % H == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(D <= kMaxDim && D % 8 == 0, "head_dim must be a multiple of 8 and at most ", kMaxDim);
  const int64_t R = seq_lens.size(0);
  for (const at::Tensor* t : {&block_table, &seq_lens, &query_start_loc})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "block table and lengths must be contiguous int32");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == R && query_start_loc.numel() == R + 1,
              "block_table (R, max_blocks), seq_lens (R,), query_start_loc (R + 1,)");
  TORCH_CHECK(split_tokens > 0 && split_tokens % kTile == 0, "split_tokens must be a multiple of ", kTile);
  for (const at::Tensor* m : {&key_rotation, &value_rotation_t})
    TORCH_CHECK(m->numel() == 0 || (m->scalar_type() == at::kFloat && m->is_contiguous() && m->dim() == 2 &&
                                    m->size(0) == D && m->size(1) == D),
                "rotations must be contiguous float32 (D, D) or empty");
  const Part kp = describe_part(key_part, key_book, D, slot_bytes, "keys");
  const Part vp = describe_part(value_part, value_book, D, slot_bytes, "values");
  const int rep = static_cast<int>(Hq / H);
  const float fscale = static_cast<float>(scale);
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int64_t max_blocks = block_table.size(1);
  const uint8_t* base = pages.data_ptr<uint8_t>();
  const int64_t s_block = pages.stride(0), s_head = pages.stride(1), s_row = pages.stride(2);
  const float* rk = key_rotation.numel() ? key_rotation.data_ptr<float>() : nullptr;
  const float* rvt = value_rotation_t.numel() ? value_rotation_t.data_ptr<float>() : nullptr;

  int64_t max_splits = 1;
  std::vector<Task> tasks;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = lens[r], first = starts[r], last = starts[r + 1];
    TORCH_CHECK(first >= 0 && first <= last && last <= T, "query_start_loc must rise within [0, T]");
    if (last <= first) continue;
    TORCH_CHECK(n >= last - first, "request ", r, " has ", last - first, " queries but ", n, " stored tokens");
    TORCH_CHECK((n + block_size - 1) / block_size <= max_blocks, "seq_lens exceed the block table");
    for (int64_t b = 0; b < (n + block_size - 1) / block_size; ++b)  // slots are read unchecked below
      TORCH_CHECK(table[r * max_blocks + b] >= 0 && table[r * max_blocks + b] < pages.size(0),
                  "block table entry outside the pages");
    const int64_t splits = (n + split_tokens - 1) / split_tokens;
    max_splits = std::max(max_splits, splits);
    const int64_t q_r = last - first, first_pos = n - q_r;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t t0 = s * split_tokens, t1 = std::min(t0 + split_tokens, n);
      for (int64_t i0 = std::max<int64_t>(0, t0 - first_pos); i0 < q_r; i0 += kTaskRows) {
        const int64_t i1 = std::min(i0 + kTaskRows, q_r);
        int64_t cost = 0;  // sum over the rows of the split's tokens each reaches
        for (int64_t i = i0; i < i1; ++i) cost += std::min(t1, first_pos + i + 1) - t0;
        for (int64_t h = 0; h < H; ++h) tasks.push_back({r, h, s, i0, i1, cost});
      }
    }
  }
  // the costliest first, taken one at a time by whichever thread is free (no row's arithmetic depends on it)
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });

  // The queries in K's stored space, row by row.
  const float* q_in = query.data_ptr<float>();
  at::Tensor rotated = rk ? at::empty_like(query) : query;
  float* qp = rotated.data_ptr<float>();
  if (rk)
    at::parallel_for(0, T * Hq, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) row_times_matrix(q_in + row * D, rk, D, qp + row * D);
    });

  // partial[((token * Hq + query head) * max_splits + split) * (2 + D)]: max, sum, acc[D] of a split.
  const int64_t stride_partial = 2 + D;
  at::Tensor partial_t = at::empty({T * Hq * max_splits * stride_partial}, query.options());
  float* partial = partial_t.data_ptr<float>();

#if defined(__AVX512F__)
  // keys gathered 16 tokens at a time with 32-bit offsets into the pages (a layer's pages spanning under 2 GiB)
  int64_t span = 1;
  for (int64_t i = 0; i < pages.dim(); ++i) span += (pages.size(i) - 1) * pages.stride(i);
  const bool gather_k = gatherable(kp, D) && span < (int64_t{1} << 31) - 64;
#else
  const bool gather_k = false;
#endif
  // Each thread takes the next task until none is left. A task decodes the tiles its rows reach (keys
  // transposed (D, kTile), values (kTile, D), padding tokens zeros) once, then passes them, in order,
  // kBlockRows query tokens at a time (their partial states stay in cache).
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next_task{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    alignas(64) float sc[3 * kTile];
    const int64_t max_tiles = split_tokens / kTile;
    std::vector<float> kt_all(static_cast<size_t>(max_tiles * D * kTile)),
        vt_all(static_cast<size_t>(max_tiles * kTile * D)), kr(static_cast<size_t>(kTile * D));
    int32_t offsets[kTile];
#if defined(__AVX512F__)
    std::vector<__m512i> codes(static_cast<size_t>(D));
#endif
    for (int64_t task = next_task++; task < n_tasks; task = next_task++) {
      const Task& tk = tasks[task];
      const int64_t first = starts[tk.request], q_r = starts[tk.request + 1] - first, n = lens[tk.request];
      const int64_t first_pos = n - q_r;  // position of the request's first query
      const int64_t t0 = tk.split * split_tokens, t1 = std::min(t0 + split_tokens, n);
      const int64_t t_end = std::min(t1, first_pos + tk.i_end);  // tokens the task's rows reach end here
      const int64_t n_tiles = (t_end - t0 + kTile - 1) / kTile;
      const int32_t* blocks = table + tk.request * max_blocks;
      auto part_of = [&](int64_t i, int k) {
        return partial + (((first + i) * Hq + tk.head * rep + k) * max_splits + tk.split) * stride_partial;
      };
      for (int64_t i = tk.i_begin; i < tk.i_end; ++i)
        for (int k = 0; k < rep; ++k) {
          float* part = part_of(i, k);
          part[0] = kNegInf;
          std::fill(part + 1, part + stride_partial, 0.0f);
        }
      for (int64_t tile = 0; tile < n_tiles; ++tile) {
        const int64_t a = t0 + tile * kTile, b = std::min(a + kTile, t1);
        float* kt = kt_all.data() + tile * D * kTile;
        float* vt = vt_all.data() + tile * kTile * D;
        int64_t block = a / block_size, row = a % block_size;  // the tile's first token, then token by token
        for (int64_t j = 0; j < kTile; ++j) {
          if (a + j < b) {
            const uint8_t* slot = base + blocks[block] * s_block + tk.head * s_head + row * s_row;
            if (++row == block_size) row = 0, ++block;
            if (gather_k) {
              offsets[j] = static_cast<int32_t>(slot - base + kp.offset);
            } else {
              decode_part(kp, slot, D, kr.data() + j * D);
            }
            decode_part(vp, slot, D, vt + j * D);
          } else {
            if (!gather_k) std::fill(kr.begin() + j * D, kr.begin() + (j + 1) * D, 0.0f);
            std::fill(vt + j * D, vt + (j + 1) * D, 0.0f);
          }
        }
#if defined(__AVX512F__)
        if (gather_k) {
          gather_keys(kp, base, offsets, b - a, D, kt, codes.data());
        } else {
          transpose_tile(kr.data(), D, kt);
        }
#else
        transpose_tile(kr.data(), D, kt);
#endif
      }
      for (int64_t ib = tk.i_begin; ib < tk.i_end; ib += kBlockRows) {
        const int64_t ie = std::min(ib + kBlockRows, tk.i_end);
        for (int64_t tile = 0; tile < n_tiles; ++tile) {
          const int64_t a = t0 + tile * kTile, b = std::min(a + kTile, t1);
          const float* kt = kt_all.data() + tile * D * kTile;
          const float* vt = vt_all.data() + tile * kTile * D;
          for (int64_t i = std::max(ib, a - first_pos); i < ie; ++i) {
            const int64_t len = std::min(b, first_pos + i + 1) - a;  // tokens of the tile at or before the query
            const float* q = qp + ((first + i) * Hq + tk.head * rep) * D;
            for (int k = 0; k < rep;) {  // the token's query heads, 3 (or the rest) at a time
              const int rows = std::min(3, rep - k);
              float* parts[3] = {part_of(i, k), rows > 1 ? part_of(i, k + 1) : nullptr,
                                 rows > 2 ? part_of(i, k + 2) : nullptr};
#if defined(__AVX512F__)
              if (len == kTile) {
                if (rows == 3) {
                  tile_rows_full<3>(q + k * D, kt, vt, D, fscale, parts, sc);
                } else if (rows == 2) {
                  tile_rows_full<2>(q + k * D, kt, vt, D, fscale, parts, sc);
                } else {
                  tile_rows_full<1>(q + k * D, kt, vt, D, fscale, parts, sc);
                }
                k += rows;
                continue;
              }
#endif
              if (rows == 3) {
                tile_rows<3>(q + k * D, kt, vt, len, D, fscale, parts, sc);
              } else if (rows == 2) {
                tile_rows<2>(q + k * D, kt, vt, len, D, fscale, parts, sc);
              } else {
                tile_rows<1>(q + k * D, kt, vt, len, D, fscale, parts, sc);
              }
              k += rows;
            }
          }
        }
      }
    }
  });

  // Merge each row's splits 0 .. p / split_tokens in order, normalise, un-rotate.
  at::Tensor out = at::zeros({T, Hq, D}, query.options());
  at::Tensor lse = at::full({T, Hq}, -std::numeric_limits<float>::infinity(), query.options());
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float o[kMaxDim];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t first = starts[r], q_r = starts[r + 1] - first, first_pos = lens[r] - q_r;
      for (int64_t i = 0; i < q_r; ++i) {
        const int64_t splits = (first_pos + i) / split_tokens + 1;
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const int64_t index = (first + i) * Hq + hq;
          const float* parts = partial + index * max_splits * stride_partial;
          float m = kNegInf;
          for (int64_t s = 0; s < splits; ++s) m = std::max(m, parts[s * stride_partial]);
          if (m == kNegInf) continue;  // every score -inf: out 0, lse -inf
          float l = 0.0f;
          std::fill(o, o + D, 0.0f);
          for (int64_t s = 0; s < splits; ++s) {
            const float* part = parts + s * stride_partial;
            if (part[0] == kNegInf) continue;
            const float w = exp_nonpositive(part[0] - m);
            l += w * part[1];
            for (int64_t d = 0; d < D; ++d) o[d] += w * part[2 + d];
          }
          for (int64_t d = 0; d < D; ++d) o[d] /= l;
          if (rvt) {
            row_times_matrix(o, rvt, D, op + index * D);
          } else {
            std::copy(o, o + D, op + index * D);
          }
          lp[index] = m + std::log(l);
        }
      }
    }
  });
  return {out, lse};
}
