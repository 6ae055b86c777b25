// Decode-step attention over a CompressedLayer whose keys and values are codebook codes (CPU).
//
// A codebook-coded tensor (kvcompress.kernels.cpu_codebook describes one) stores, per token
// and KV head, n integer codes split into groups of equal width w (one packed tensor per
// group, 8 tokens per row, byte-planar as kvcompress.codecs.packing), and one fp16 scale s.
// The state it decodes to is linear in the codebook values c_j = book_w[code_j]:
//     x = offset + s * sum_j c_j rows[j]          rows (n, D) per head, offset (D,) or none
// (rotations, principal bases, per-coordinate deviations and mixers are folded into `rows`
// once per layer on the Python side).
//
// One query token per sequence. For every (batch, KV head) the scores of each query head of
// its grouped-query group are taken against
//     [ sinks (full precision) | compressed tokens (codes) | window (full precision) ]
// then one softmax (float32) and p.v:
//   keys, post-RoPE:  q.x_t = q.offset + s_t * sum_j c_tj (rows[j].q): the projected query
//                     rows.q (n) is formed once per step, each token costs n multiply-adds;
//   keys, pre-RoPE:   x_t is decoded 8 tokens at a time into a stack buffer (an 8 x n by n x D
//                     product), rotated to its position p_t with the cos/sin rows given
//                     (x cos + rotate_half(x) sin, transformers' convention), then dotted;
//                     compressed token t reads cos/sin row t (consecutive positions: the rows
//                     given start at the first token's), or, when a (B, H, n) int32 tensor of
//                     positions is given (tokens kept by eviction, each head its own), row
//                     positions[b, h, t] of tables that start at position 0;
//   values:           sum_t p_t s_t c_t is accumulated in code space (n) and mapped back once
//                     per step: out = (sum_t p_t s_t c_t) . rows + (sum_t p_t) offset.
// No decoded copy of the cache is built; codes are read where they are stored.
//
// The task split, softmax and merge are cpu_split_k.h's; this file supplies how keys are
// scored and values mixed from the codes (`CodebookCodes`).
//
// This file does not know codecs or transformers: the Python side decides when it applies
// and hands it plain tensors.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"
#include "cpu_split_k.h"

namespace {

constexpr int64_t kRow = 8;        // tokens per packed row

constexpr int64_t kBookSize = 64;  // codebooks padded to 64 entries (widths up to 6 bits)
constexpr int64_t kPrefetchRows = 8;  // rows of codes fetched ahead of the one decoded

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One field (width `width`) of a packed row, byte-planar: its m = n*width/8 bytes at `src`
// hold codes j + h*m at bits [h*width, (h+1)*width) of byte j. Writes the n field values, one
// byte each, to out[0, n); `out` may be written up to n + 64 (padding).
inline void unpack_field(const uint8_t* src, int width, int64_t n, uint8_t* out) {
  const int64_t m = n * width / 8;
  const int mask = (1 << width) - 1;
  for (int h = 0; h < 8 / width; ++h) {  // in order: a plane's padding is overwritten by the next plane
    uint8_t* dst = out + h * m;
    const int sh = h * width;
#if defined(__AVX512BW__)
    const __m512i keep = _mm512_set1_epi8(static_cast<char>(mask));
    const __m128i right = _mm_cvtsi32_si128(sh);
    for (int64_t j = 0; j < m; j += 64) {  // loads masked to the field (the row may end the tensor)
      const __mmask64 lanes = m - j >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (m - j)) - 1);
      const __m512i v = _mm512_maskz_loadu_epi8(lanes, src + j);
      _mm512_storeu_si512(dst + j, _mm512_and_si512(_mm512_srl_epi16(v, right), keep));
    }
#else
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) dst[j] = static_cast<uint8_t>((src[j] >> sh) & mask);
#endif
  }
}

// The n codes (n % 8 == 0) of one packed row of `bits`-bit codes (1..6), one byte each, in code
// order, as two fields (kvcompress.codecs.packing: widths 8/4/2/1 of the binary expansion of
// bits, widest first at increasing bit offsets; at most two for 6 bits): code = low | high << shift.
// Returns the second field's shift, 0 when there is none.
inline int unpack_row(const uint8_t* row, int bits, int64_t n, uint8_t* low, uint8_t* high) {
  int first = 8;
  while (first > bits) first /= 2;
  unpack_field(row, first, n, low);
  const int rest = bits - first;
  if (rest == 0) return 0;
  unpack_field(row + n * first / 8, rest, n, high);  // rest is 1 or 2 (bits <= 6): a single field
  return first;
}

// out[i] = book[low[i] | high[i] << shift] for i < n (no `high` when shift == 0). `book` holds
// kBookSize floats; low, high and out may be read and written up to round_up(n, 16).
inline void lookup(const float* book, int bits, const uint8_t* low, const uint8_t* high, int shift, int64_t n,
                   float* out) {
#if defined(__AVX512F__)
  const __m512 b0 = _mm512_loadu_ps(book), b1 = _mm512_loadu_ps(book + 16);
  const __m512 b2 = _mm512_loadu_ps(book + 32), b3 = _mm512_loadu_ps(book + 48);
  const __m128i left = _mm_cvtsi32_si128(shift);
  for (int64_t i = 0; i < n; i += 16) {
    __m512i id = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low + i)));
    if (shift != 0)
      id = _mm512_or_si512(id, _mm512_sll_epi32(
                                   _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(high + i))),
                                   left));
    __m512 v;
    if (bits <= 4) {
      v = _mm512_permutexvar_ps(id, b0);
    } else {
      v = _mm512_permutex2var_ps(b0, id, b1);
      if (bits > 5) {
        const __mmask16 top = _mm512_test_epi32_mask(id, _mm512_set1_epi32(32));
        v = _mm512_mask_blend_ps(top, v, _mm512_permutex2var_ps(b2, id, b3));
      }
    }
    _mm512_storeu_ps(out + i, v);
  }
#else
#if defined(KVC_AVX2)
  if (bits <= 3) {
    const __m256 b0 = _mm256_loadu_ps(book);
    const __m128i left = _mm_cvtsi32_si128(shift);
    for (int64_t i = 0; i < n; i += 8) {
      __m256i id = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(low + i)));
      if (shift != 0)
        id = _mm256_or_si256(id, _mm256_sll_epi32(
                                     _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(high + i))),
                                     left));
      _mm256_storeu_ps(out + i, _mm256_permutevar8x32_ps(b0, id));
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = book[shift != 0 ? (low[i] | (high[i] << shift)) : low[i]];
#endif
}

// One code group of a coded tensor: its packed tensor (B, H, rows, bytes) and codebook.
struct Group {
  const uint8_t* codes;
  int64_t stride_b, stride_h, stride_row;
  int bits;
  int64_t count;  // codes per token
  int64_t first;  // index of its first code among the tensor's n
  const float* book;
};

// A codebook-coded tensor as the kernel reads it.
struct Coded {
  std::vector<Group> groups;
  std::vector<float> books;  // kBookSize per group
  const at::Half* scale;     // (B, H, T, 1)
  int64_t scale_b, scale_h, scale_t;
  const float* rows;  // (H, n, D): x = offset + s * sum_j c_j rows[j]
  int64_t rows_h;
  const float* offset;  // (H, D) or nullptr
  int64_t n, np, dim;   // codes per token, n rounded up to kLanes, D
  int64_t max_group;    // largest count * kRow over groups
};

Coded describe(const std::vector<at::Tensor>& codes, const std::vector<int64_t>& bits,
               const std::vector<at::Tensor>& books, const at::Tensor& scale, const at::Tensor& rows,
               const at::Tensor& offset, int64_t n_compressed, int64_t heads, int64_t batch, const char* what) {
  TORCH_CHECK(!codes.empty() && codes.size() == bits.size() && codes.size() == books.size(),
              what, ": one bit width and one codebook per code tensor");
  Coded c;
  c.books.assign(codes.size() * kBookSize, 0.0f);
  int64_t n = 0;
  c.max_group = 0;
  for (size_t g = 0; g < codes.size(); ++g) {
    const at::Tensor& t = codes[g];
    TORCH_CHECK(bits[g] >= 1 && bits[g] <= 6, what, ": code widths must be 1..6 bits");
    TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 4 && t.stride(3) == 1 && t.size(0) == batch &&
                    t.size(1) == heads && t.size(2) * kRow == n_compressed && t.size(3) % bits[g] == 0,
                what, ": codes must be (B, H, tokens/8, count*bits) uint8 with contiguous rows");
    const at::Tensor& book = books[g];
    TORCH_CHECK(book.scalar_type() == at::kFloat && book.dim() == 1 && book.size(0) == (int64_t{1} << bits[g]) &&
                    book.is_contiguous(), what, ": codebooks must be float32 (2**bits,)");
    std::copy(book.data_ptr<float>(), book.data_ptr<float>() + book.size(0), c.books.begin() + g * kBookSize);
    Group gr;
    gr.codes = t.data_ptr<uint8_t>();
    gr.stride_b = t.stride(0);
    gr.stride_h = t.stride(1);
    gr.stride_row = t.stride(2);
    gr.bits = static_cast<int>(bits[g]);
    gr.count = t.size(3) / bits[g];
    gr.first = n;
    n += gr.count;
    c.max_group = std::max(c.max_group, gr.count * kRow);
    c.groups.push_back(gr);
  }
  for (size_t g = 0; g < c.groups.size(); ++g) c.groups[g].book = c.books.data() + g * kBookSize;
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.dim() == 4 && scale.size(0) == batch &&
                  scale.size(1) == heads && scale.size(2) == n_compressed && scale.size(3) == 1,
              what, ": scale must be (B, H, tokens, 1) float16");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.dim() == 3 && (rows.size(0) == heads) &&
                  rows.size(1) == n && rows.stride(2) == 1 && rows.stride(1) == rows.size(2),
              what, ": rows must be float32 (H, n, D) with contiguous (n, D) planes, n = ", n);
  c.scale = scale.data_ptr<at::Half>();
  c.scale_b = scale.stride(0);
  c.scale_h = scale.stride(1);
  c.scale_t = scale.stride(2);
  c.rows = rows.data_ptr<float>();
  c.rows_h = rows.stride(0);
  c.dim = rows.size(2);
  TORCH_CHECK(c.dim % kLanes == 0 && c.dim <= kMaxDim, what, ": head_dim must be a multiple of ", kLanes,
              " and at most ", kMaxDim);
  c.offset = nullptr;
  if (offset.numel() > 0) {
    TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.dim() == 2 && offset.size(0) == heads &&
                    offset.size(1) == c.dim && offset.is_contiguous(), what, ": offset must be float32 (H, D)");
    c.offset = offset.data_ptr<float>();
  }
  c.n = n;
  c.np = round_up(n, kLanes);
  return c;
}

// cos/sin rows of the compressed tokens' positions: token t's at cos + t * row, or, with `pos`,
// at cos + pos[b * pos_b + h * pos_h + t] * row; the second half of a row at offset `second`
// (D/2), or 0 when only the first half is given (both halves equal).
struct Rope {
  const float* cos;
  const float* sin;
  int64_t row, second;
  const int32_t* pos;  // (B, H, n_compressed) absolute positions, or nullptr (consecutive)
  int64_t pos_b, pos_h;
};

// Scratch of one thread for decoding rows.
struct RowScratch {
  std::vector<uint8_t> low, high;  // a group's codes split in their two bit fields
  std::vector<float> values;  // kRow * n + 16: a row's values group by group
  std::vector<float> cval;    // kRow x np token-major, padding zero
  void fit(const Coded& c) {
    low.assign(round_up(c.max_group, 64) + 64, 0);
    high.assign(round_up(c.max_group, 64) + 64, 0);
    values.assign(kRow * c.n + 16, 0.0f);
    cval.assign(kRow * c.np + 16, 0.0f);
  }
};

// Codebook values of packed row `row` at (b, h), group by group: group g's kRow x count values
// (token-major) at out + kRow * first; `out` holds kRow * n + 16 floats.
inline void decode_row_grouped(const Coded& c, int64_t b, int64_t h, int64_t row, RowScratch& s, float* out) {
  for (const Group& g : c.groups) {  // in order: a lookup's padding is overwritten by the next group
    const uint8_t* bytes = g.codes + b * g.stride_b + h * g.stride_h + row * g.stride_row;
    // the groups are separate streams, each too thin for the hardware prefetcher: fetch ahead
    const uint8_t* ahead = bytes + kPrefetchRows * g.stride_row;
    for (int64_t line = 0; line < g.count * g.bits; line += 64) __builtin_prefetch(ahead + line);
    const int shift = unpack_row(bytes, g.bits, g.count * kRow, s.low.data(), s.high.data());
    lookup(g.book, g.bits, s.low.data(), s.high.data(), shift, g.count * kRow, out + kRow * g.first);
  }
}

// cval[t * np + j] = codebook value of code j of token t of packed row `row` at (b, h).
inline void decode_row(const Coded& c, int64_t b, int64_t h, int64_t row, RowScratch& s) {
  if (c.groups.size() == 1 && c.groups[0].count == c.np) {  // one group filling the row: already token-major
    decode_row_grouped(c, b, h, row, s, s.cval.data());
    return;
  }
  decode_row_grouped(c, b, h, row, s, s.values.data());
  for (const Group& g : c.groups)
    for (int64_t t = 0; t < kRow; ++t)
      std::memcpy(s.cval.data() + t * c.np + g.first, s.values.data() + kRow * g.first + t * g.count,
                  g.count * sizeof(float));
}

inline void row_scales(const Coded& c, int64_t b, int64_t h, int64_t row, float* out) {
  const at::Half* s = c.scale + b * c.scale_b + h * c.scale_h + row * kRow * c.scale_t;
  __builtin_prefetch(s + kPrefetchRows * kRow * c.scale_t);
  for (int64_t t = 0; t < kRow; ++t) out[t] = static_cast<float>(s[t * c.scale_t]);
}

// x[t * D + d] = sum_j c_tj * rows[j * D + d] for the kRow tokens of a row, from its values
// group by group (`decode_row_grouped`).
template <int TT, int VPC>
inline void decode_tile(const Coded& c, const float* grouped, const float* rows, float* x) {
  const int64_t D = c.dim;
  for (int64_t t0 = 0; t0 < kRow; t0 += TT) {
    for (int64_t d0 = 0; d0 < D; d0 += VPC * kLanes) {
      vec acc[TT][VPC];
      for (int t = 0; t < TT; ++t)
        for (int v = 0; v < VPC; ++v) acc[t][v] = vzero();
      for (const Group& g : c.groups) {
        const float* cg = grouped + kRow * g.first + t0 * g.count;
        const float* fg = rows + g.first * D + d0;
        for (int64_t k = 0; k < g.count; ++k) {
          vec f[VPC];
          for (int v = 0; v < VPC; ++v) f[v] = vload(fg + k * D + v * kLanes);
          for (int t = 0; t < TT; ++t) {
            const vec w = vset1(cg[t * g.count + k]);
            for (int v = 0; v < VPC; ++v) acc[t][v] = vfma(w, f[v], acc[t][v]);
          }
        }
      }
      for (int t = 0; t < TT; ++t)
        for (int v = 0; v < VPC; ++v) vstore(x + (t0 + t) * D + d0 + v * kLanes, acc[t][v]);
    }
  }
}

inline void decode_keys(const Coded& c, const float* grouped, const float* rows, float* x) {
  if (c.dim % (kChunkVecs * kLanes) == 0) return decode_tile<4, kChunkVecs>(c, grouped, rows, x);
  return decode_tile<8, 1>(c, grouped, rows, x);
}

// out[t] = q . x[t * n .. t * n + n) for the kRow (8) token-major rows of x (n % kLanes == 0): the
// eight sums are reduced together, not one horizontal sum per token.
inline void dots_row(const float* q, const float* x, int64_t n, float* out) {
  static_assert(kRow == 8, "dots_row reduces 8 tokens");
  vec a[kRow];
  for (int t = 0; t < kRow; ++t) a[t] = vzero();
  for (int64_t j = 0; j < n; j += kLanes) {
    const vec qv = vload(q + j);
    for (int t = 0; t < kRow; ++t) a[t] = vfma(qv, vload(x + t * n + j), a[t]);
  }
#if defined(__AVX512F__)
  __m256 f[kRow];  // each 16-lane sum folded to 8 lanes
  for (int t = 0; t < kRow; ++t)
    f[t] = _mm256_add_ps(_mm512_castps512_ps256(a[t]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[t]), 1)));
  _mm256_storeu_ps(out, hsum8(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]));
#elif defined(KVC_AVX2)
  _mm256_storeu_ps(out, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
#else
  for (int t = 0; t < kRow; ++t) out[t] = vsum(a[t]);
#endif
}

// Scores of compressed tokens [t0, t1) into sc[i * ld + (t - t0)] for the rep query heads.
//  rope.cos == nullptr: q_proj (rep x np) = rows . q, q_off (rep) = q . offset; score = q_off + s * (q_proj . c)
//  rope.cos != nullptr: keys decoded, offset added, rotated to their position, dotted with q (rep x D).
void coded_key_scores(const Coded& c, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* q,
                      const float* q_proj, const float* q_off, const Rope& rope, int rep, float* sc, int64_t ld,
                      RowScratch& s, std::vector<float>& work) {
  const int64_t D = c.dim, np = c.np, half = D / 2;
  float scales[kRow];
  if (rope.cos == nullptr) {
    float dots[kRow];
    for (int64_t row = t0 / kRow; row < t1 / kRow; ++row) {
      decode_row(c, b, h, row, s);
      row_scales(c, b, h, row, scales);
      const int64_t col = row * kRow - t0;
      for (int i = 0; i < rep; ++i) {
        dots_row(q_proj + i * np, s.cval.data(), np, dots);
        for (int64_t t = 0; t < kRow; ++t) sc[i * ld + col + t] = q_off[i] + scales[t] * dots[t];
      }
    }
    return;
  }
  work.resize(static_cast<size_t>(2 * kRow * D));
  float* x = work.data();         // kRow x D decoded (pre-RoPE, without offset and scale)
  float* k = x + kRow * D;        // kRow x D rotated keys
  const float* rows = c.rows + h * c.rows_h;
  const float* off = c.offset != nullptr ? c.offset + h * D : nullptr;
  const int32_t* pos = rope.pos != nullptr ? rope.pos + b * rope.pos_b + h * rope.pos_h : nullptr;
  for (int64_t row = t0 / kRow; row < t1 / kRow; ++row) {
    decode_row_grouped(c, b, h, row, s, s.values.data());
    row_scales(c, b, h, row, scales);
    decode_keys(c, s.values.data(), rows, x);
    for (int64_t t = 0; t < kRow; ++t) {
      const int64_t token = row * kRow + t;
      const int64_t table_row = pos != nullptr ? static_cast<int64_t>(pos[token]) : token;
      const float* cs = rope.cos + table_row * rope.row;
      const float* sn = rope.sin + table_row * rope.row;
      const float* cs2 = cs + rope.second;
      const float* sn2 = sn + rope.second;
      const float* xt = x + t * D;
      const float st = scales[t];
      float* kt = k + t * D;
      if (off != nullptr) {  // k = R(p) (offset + s x), R(p) x = x cos + rotate_half(x) sin
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float lo = off[d] + st * xt[d], hi = off[d + half] + st * xt[d + half];
          kt[d] = lo * cs[d] - hi * sn[d];
          kt[d + half] = hi * cs2[d] + lo * sn2[d];
        }
      } else {
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float lo = st * xt[d], hi = st * xt[d + half];
          kt[d] = lo * cs[d] - hi * sn[d];
          kt[d + half] = hi * cs2[d] + lo * sn2[d];
        }
      }
    }
    const int64_t col = row * kRow - t0;
    for (int i = 0; i < rep; ++i)
      for (int64_t t = 0; t < kRow; ++t) sc[i * ld + col + t] = dot_lanes(q + i * D, k + t * D, D);
  }
}

// acc[i * acc_stride + j] += sum over compressed tokens [t0, t1) of p[i * ld + (t - t0)] * s_t * c_tj.
void coded_value_mix(const Coded& c, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* p, int rep,
                     int64_t ld, float* acc, int64_t acc_stride, RowScratch& s) {
  const int64_t np = c.np;
  float scales[kRow], w[kRow];
  for (int64_t row = t0 / kRow; row < t1 / kRow; ++row) {
    decode_row(c, b, h, row, s);
    row_scales(c, b, h, row, scales);
    const int64_t col = row * kRow - t0;
    for (int i = 0; i < rep; ++i) {
      for (int64_t t = 0; t < kRow; ++t) w[t] = p[i * ld + col + t] * scales[t];
      float* a = acc + i * acc_stride;
      for (int64_t j = 0; j < np; j += kLanes) {
        vec v = vload(a + j);
        for (int64_t t = 0; t < kRow; ++t) v = vfma(vset1(w[t]), vload(s.cval.data() + t * np + j), v);
        vstore(a + j, v);
      }
    }
  }
}

// The policy of split_k_attend for codebook codes: keys and values each a `Coded`.
struct CodebookCodes {
  struct Scratch {
    RowScratch key, value;
    std::vector<float> work;
  };
  // blocks outer, the KV heads of a block together: they share its cos/sin rows (at consecutive
  // positions; after eviction each head reads its own rows of the tables)
  static constexpr bool kBlockMajor = true;
  static constexpr bool kCodedValues = true;  // values mixed in code space (np), mapped back once

  const Coded& kc;
  const Coded& vc;
  const Rope& rope;
  // For post-RoPE keys: the projection of every scaled query on the key rows (B, Hq, np) and
  // on the key offset (B, Hq).
  std::vector<float> q_proj, q_off;
  int64_t n_query_heads = 0;

  int64_t value_width() const { return vc.np; }
  void prepare(const float* q_all, int64_t B, int64_t Hq, int rep) {
    const int64_t D = kc.dim;
    n_query_heads = Hq;
    q_off.assign(static_cast<size_t>(B * Hq), 0.0f);
    if (rope.cos != nullptr) return;
    q_proj.assign(static_cast<size_t>(B * Hq * kc.np), 0.0f);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Hq; ++i) {
        const int64_t h = i / rep;
        const float* qi = q_all + (b * Hq + i) * D;
        for (int64_t j = 0; j < kc.n; ++j)
          q_proj[(b * Hq + i) * kc.np + j] = dot_lanes(qi, kc.rows + h * kc.rows_h + j * D, D);
        if (kc.offset != nullptr) q_off[b * Hq + i] = dot_lanes(qi, kc.offset + h * D, D);
      }
  }
  Scratch scratch() const {
    Scratch s;
    s.key.fit(kc);
    s.value.fit(vc);
    return s;
  }
  void key_scores(Scratch& s, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* q, int rep, float* sc,
                  int64_t ld) const {
    const int64_t first = b * n_query_heads + h * rep;  // the task's first query head
    const float* qp_bh = rope.cos == nullptr ? q_proj.data() + first * kc.np : nullptr;
    coded_key_scores(kc, b, h, t0, t1, q, qp_bh, q_off.data() + first, rope, rep, sc, ld, s.key, s.work);
  }
  void value_mix(Scratch& s, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* p, int rep, int64_t ld,
                 float* acc, int64_t acc_stride) const {
    coded_value_mix(vc, b, h, t0, t1, p, rep, ld, acc, acc_stride, s.value);
  }
  void finish_values(int64_t h, const float* coded, float l_coded, float* full, int64_t Dv) const {
    const float* rows = vc.rows + h * vc.rows_h;
    for (int64_t j = 0; j < vc.n; ++j) {
      const float cj = coded[j];
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) full[d] += cj * rows[j * Dv + d];
    }
    if (vc.offset != nullptr)
      for (int64_t d = 0; d < Dv; ++d) full[d] += l_coded * vc.offset[h * Dv + d];
  }
};

}  // namespace

at::Tensor attend_codebook(const at::Tensor& query, const at::Tensor& sink_k, const at::Tensor& sink_v,
                           const at::Tensor& win_k, const at::Tensor& win_v, const std::vector<at::Tensor>& k_codes,
                           const std::vector<int64_t>& k_bits, const std::vector<at::Tensor>& k_books,
                           const at::Tensor& k_scale, const at::Tensor& k_rows, const at::Tensor& k_offset,
                           const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                           const at::Tensor& rope_positions, const std::vector<at::Tensor>& v_codes,
                           const std::vector<int64_t>& v_bits, const std::vector<at::Tensor>& v_books,
                           const at::Tensor& v_scale, const at::Tensor& v_rows, const at::Tensor& v_offset,
                           int64_t n_compressed,
                           const c10::optional<at::Tensor>& mask, double scaling, int64_t block_tokens) {
  check_split_k_inputs(query, sink_k, sink_v, win_k, win_v, n_compressed, mask);
  const int64_t B = query.size(0), D = query.size(2), H = win_k.size(1), Dv = win_v.size(3);
  TORCH_CHECK(n_compressed > 0 && n_compressed % kRow == 0, "compressed tokens must be a positive multiple of 8");
  TORCH_CHECK(block_tokens > 0 && block_tokens % kRow == 0, "block_tokens must be a multiple of 8");
  const Coded kc = describe(k_codes, k_bits, k_books, k_scale, k_rows, k_offset, n_compressed, H, B, "keys");
  const Coded vc = describe(v_codes, v_bits, v_books, v_scale, v_rows, v_offset, n_compressed, H, B, "values");
  TORCH_CHECK(kc.dim == D && vc.dim == Dv, "rows must map codes to head_dim");
  Rope rope{nullptr, nullptr, 0, 0, nullptr, 0, 0};
  if (rope_cos.numel() > 0) {
    const bool positioned = rope_positions.numel() > 0;
    TORCH_CHECK(rope_cos.scalar_type() == at::kFloat && rope_sin.scalar_type() == at::kFloat &&
                    rope_cos.dim() == 2 && (positioned || rope_cos.size(0) == n_compressed) &&
                    (rope_cos.size(1) == D || 2 * rope_cos.size(1) == D) && rope_sin.sizes() == rope_cos.sizes() &&
                    rope_cos.stride(1) == 1 && rope_sin.stride(1) == 1 && rope_sin.stride(0) == rope_cos.stride(0),
                "rope cos/sin must be float32 (rows, D) or (rows, D/2) (equal halves) with contiguous rows, "
                "rows = n_compressed without positions");
    TORCH_CHECK(D % 2 == 0, "rotary keys need an even head_dim");
    rope.cos = rope_cos.data_ptr<float>();
    rope.sin = rope_sin.data_ptr<float>();
    rope.row = rope_cos.stride(0);
    rope.second = rope_cos.size(1) == D ? D / 2 : 0;
    if (positioned) {
      TORCH_CHECK(rope_positions.scalar_type() == at::kInt && rope_positions.dim() == 3 &&
                      rope_positions.size(0) == B && rope_positions.size(1) == H &&
                      rope_positions.size(2) == n_compressed && rope_positions.stride(2) == 1,
                  "rope positions must be int32 (B, H, n_compressed) with contiguous rows");
      rope.pos = rope_positions.data_ptr<int32_t>();
      rope.pos_b = rope_positions.stride(0);
      rope.pos_h = rope_positions.stride(1);
      const int64_t limit = rope_cos.size(0);
      bool inside = true;  // every position must name a row of the tables (they are read unchecked)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int32_t* p = rope.pos + b * rope.pos_b + h * rope.pos_h;
          for (int64_t t = 0; t < n_compressed; ++t) inside &= p[t] >= 0 && p[t] < limit;
        }
      TORCH_CHECK(inside, "rope positions must lie in [0, ", limit, "), the rows of cos/sin");
    }
  } else {
    TORCH_CHECK(rope_positions.numel() == 0, "rope positions need cos/sin tables");
  }
  CodebookCodes codes{kc, vc, rope};
  return split_k_attend(codes, query, sink_k, sink_v, win_k, win_v, n_compressed, mask, scaling, block_tokens);
}
