// Attention of query tokens over a paged pool of packed slots (kvcompress.paged), on the CPU:
// what kernels.paged_attention.paged_attention_torch computes, in the stored (rotated) space
// (the caller rotates the queries and un-rotates the output).
//
// pages (num_blocks, Hkv, block_size, slot_bytes) uint8; token t of request r is row
// t % block_size of block block_table[r, t / block_size]; request r's queries (rows
// query_start_loc[r] .. query_start_loc[r + 1]) attend to its first context_lens[r] tokens.
// A slot's K and V parts (`Part`) are decoded one token at a time into a stack buffer; no dense
// copy of a sequence is built. Work is split into tasks (request, KV head, split of
// `split_tokens` tokens), each writing a partial softmax of every query row it serves; the
// partials are merged at the end (split-K, as in cpu_split_k.h, whose exp and stats it uses).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
};

Part describe_part(const std::vector<int64_t>& d, const at::Tensor& book, int64_t D, int64_t slot_bytes,
                   const char* what) {
  TORCH_CHECK(d.size() == 7, what, ": part description must be (method, offset, bits, group, scale_at, zero_at, dtype)");
  Part p{static_cast<int>(d[0]), d[1], static_cast<int>(d[2]), d[3], d[4], d[5], static_cast<int>(d[6]), nullptr};
  TORCH_CHECK(p.method >= 0 && p.method <= 2, what, ": unknown method");
  if (p.method != 2) TORCH_CHECK(p.bits >= 1 && p.bits <= 8, what, ": bits must be 1..8");
  if (p.method == 0) TORCH_CHECK(p.group >= 1, what, ": group must be positive");
  if (p.method == 1) {
    TORCH_CHECK(book.scalar_type() == at::kFloat && book.dim() == 1 && book.is_contiguous() &&
                    book.size(0) == (int64_t{1} << p.bits), what, ": codebook must be float32 (2**bits,)");
    p.book = book.data_ptr<float>();
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
  at::Half h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
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
  // codes: bit fields of widths 8/4/2/1 (binary expansion of bits, widest first), byte-planar
  uint8_t codes[kMaxDim];
  std::fill(codes, codes + D, 0);
  const uint8_t* field = p;
  int shift = 0;
  for (int width = 8; width >= 1; width /= 2) {
    if (c.bits - shift < width) continue;
    const int64_t m = D * width / 8;
    const int mask = (1 << width) - 1;
    for (int h = 0; h < 8 / width; ++h) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j)
        codes[h * m + j] |= static_cast<uint8_t>(((field[j] >> (h * width)) & mask) << shift);
    }
    field += m;
    shift += width;
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
#pragma omp simd
    for (int64_t d = 0; d < c.group; ++d) ok[d] = static_cast<float>(ck[d]) * s + z;
  }
}

struct Task {
  int64_t request, head, split;
};

}  // namespace

// (out (T, Hq, D) float32 in V's stored space, lse (T, Hq) float32) of query (T, Hq, D) float32
// (in K's stored space); see the top of this file.
std::vector<at::Tensor> paged_attend(const at::Tensor& query, const at::Tensor& pages, const at::Tensor& block_table,
                                     const at::Tensor& context_lens, const at::Tensor& query_start_loc,
                                     const std::vector<int64_t>& key_part, const at::Tensor& key_book,
                                     const std::vector<int64_t>& value_part, const at::Tensor& value_book,
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
  const int64_t R = context_lens.size(0);
  for (const at::Tensor* t : {&block_table, &context_lens, &query_start_loc})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "block table and lengths must be contiguous int32");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == R && query_start_loc.numel() == R + 1,
              "block_table (R, max_blocks), context_lens (R,), query_start_loc (R + 1,)");
  TORCH_CHECK(split_tokens > 0 && split_tokens % block_size == 0, "split_tokens must be a multiple of block_size");
  const Part kp = describe_part(key_part, key_book, D, slot_bytes, "keys");
  const Part vp = describe_part(value_part, value_book, D, slot_bytes, "values");
  const int rep = static_cast<int>(Hq / H);
  const float fscale = static_cast<float>(scale);
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const int64_t max_blocks = block_table.size(1);
  const uint8_t* base = pages.data_ptr<uint8_t>();
  const int64_t s_block = pages.stride(0), s_head = pages.stride(1), s_row = pages.stride(2);

  int64_t max_splits = 1;
  std::vector<Task> tasks;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = lens[r], first = starts[r], last = starts[r + 1];
    TORCH_CHECK(first >= 0 && first <= last && last <= T, "query_start_loc must rise within [0, T]");
    if (n <= 0 || last <= first) continue;
    TORCH_CHECK((n + block_size - 1) / block_size <= max_blocks, "context_lens exceed the block table");
    const int64_t splits = (n + split_tokens - 1) / split_tokens;
    max_splits = std::max(max_splits, splits);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < splits; ++s) tasks.push_back({r, h, s});
  }
  for (int64_t r = 0; r < R; ++r)  // every block a request reads must exist (slots are read unchecked)
    for (int64_t b = 0; b < (std::max<int64_t>(lens[r], 0) + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[r * max_blocks + b] >= 0 && table[r * max_blocks + b] < pages.size(0),
                  "block table entry outside the pages");

  const int64_t stride_partial = 2 + D;  // max, sum, acc[D] of one (query token, query head, split)
  std::vector<float> partial(static_cast<size_t>(T * Hq * max_splits * stride_partial), 0.0f);
  std::vector<uint8_t> done(static_cast<size_t>(T * Hq * max_splits), 0);
  const float* qp = query.data_ptr<float>();

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc, acc, stats;
    alignas(32) float row[kMaxDim];
    for (int64_t task = begin; task < end; ++task) {
      const Task& tk = tasks[task];
      const int64_t first = starts[tk.request], t_r = starts[tk.request + 1] - first;
      const int64_t M = t_r * rep;  // query rows: row tq * rep + i is query head h * rep + i of token first + tq
      const int64_t t0 = tk.split * split_tokens, t1 = std::min<int64_t>(t0 + split_tokens, lens[tk.request]);
      const int64_t len = t1 - t0;
      sc.resize(static_cast<size_t>(M * len));
      acc.assign(static_cast<size_t>(M * D), 0.0f);
      stats.resize(static_cast<size_t>(2 * M));
      const int32_t* blocks = table + tk.request * max_blocks;
      auto slot_of = [&](int64_t t) {
        return base + blocks[t / block_size] * s_block + tk.head * s_head + (t % block_size) * s_row;
      };
      for (int64_t j = 0; j < len; ++j) {
        decode_part(kp, slot_of(t0 + j), D, row);
        for (int64_t tq = 0; tq < t_r; ++tq)
          for (int i = 0; i < rep; ++i) {
            const float* q = qp + ((first + tq) * Hq + tk.head * rep + i) * D;
            sc[(tq * rep + i) * len + j] = dot_fixed<0>(q, row, D) * fscale;
          }
      }
      block_softmax_stats(sc.data(), static_cast<int>(M), len, stats.data(), 2);
      for (int64_t j = 0; j < len; ++j) {
        decode_part(vp, slot_of(t0 + j), D, row);
        for (int64_t m = 0; m < M; ++m) {
          const float w = sc[m * len + j];
          if (w == 0.0f) continue;
          float* a = acc.data() + m * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * row[d];
        }
      }
      for (int64_t tq = 0; tq < t_r; ++tq)
        for (int i = 0; i < rep; ++i) {
          const int64_t m = tq * rep + i, index = ((first + tq) * Hq + tk.head * rep + i) * max_splits + tk.split;
          float* part = partial.data() + index * stride_partial;
          part[0] = stats[2 * m];
          part[1] = stats[2 * m + 1];
          std::copy(acc.begin() + m * D, acc.begin() + (m + 1) * D, part + 2);
          done[index] = 1;
        }
    }
  });

  at::Tensor out = at::zeros({T, Hq, D}, query.options());
  at::Tensor lse = at::full({T, Hq}, -std::numeric_limits<float>::infinity(), query.options());
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  for (int64_t row = 0; row < T * Hq; ++row) {
    float m = kNegInf;
    for (int64_t s = 0; s < max_splits; ++s)
      if (done[row * max_splits + s]) m = std::max(m, partial[(row * max_splits + s) * stride_partial]);
    if (m == kNegInf) continue;  // no stored tokens (or every score -inf): out 0, lse -inf
    float l = 0.0f;
    float* o = op + row * D;
    for (int64_t s = 0; s < max_splits; ++s) {
      const float* part = partial.data() + (row * max_splits + s) * stride_partial;
      if (!done[row * max_splits + s] || part[0] == kNegInf) continue;
      const float w = std::exp(part[0] - m);
      l += w * part[1];
      for (int64_t d = 0; d < D; ++d) o[d] += w * part[2 + d];
    }
    const float inv = 1.0f / l;
    for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    lp[row] = m + std::log(l);
  }
  return {out, lse};
}
