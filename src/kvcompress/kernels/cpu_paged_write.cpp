// Encoding of a step's keys and values straight into their slots of a paged pool (kvcompress.paged):
// the bytes `SlotLayout.write` writes, byte for byte, in one call per layer instead of a few dozen
// small torch operations.
//
// Byte identity with the torch writer is the contract, so every value is rounded as torch rounds it:
// fp32 divisions and subtractions (no fused multiply-add: this file is compiled with contraction
// off), fp16 by round-to-nearest-even, torch.round's ties-to-even, torch's min/max order for the
// sign of a zero (`torch_extreme`), and the order of torch's CPU sum over head_dim (`torch_sum`: the
// cascade of vector lanes ATen's SumKernel uses). The vector widths of both are arguments: the caller
// finds the ones that reproduce torch on this machine (`kernels.cpu_paged`). Rotations are not applied here:
// the caller passes rotated float32 states (torch's matmul, as the torch writer does).
// Nothing is written unless every token encodes: non-finite states or values outside the fp16
// range return a non-zero status, and the caller runs the torch writer, which raises its error.
#pragma GCC optimize("fp-contract=off")

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxWriteDim = 1024;
constexpr float kFp16Max = 65504.0f;

struct WritePart {
  int method;         // 0: uniform codes; 1: codebook; 2: "none" (raw bytes of the input)
  int64_t offset;     // first byte of the part in the slot
  int bits;           // code width (methods 0 and 1)
  int64_t group;      // channels per scale and zero point (method 0)
  int64_t scale_at;   // byte offset of the fp16 scales in the part
  int64_t zero_at;    // byte offset of the fp16 zero points (method 0)
  int64_t nbytes;     // bytes of the part (method 2: bytes of one input row)
  const float* book;  // method 1: 2**bits centroids
  const float* cuts;  // method 1: 2**bits - 1 midpoints between neighbouring centroids
};

// Lane-wise arithmetic of a vector of `W` floats, emulating ATen's Vectorized<float> sums.
struct Lanes {
  float v[16];
};

// ATen's multi_row_sum (SumKernel.cpp) over `size` rows of `nrows` lane vectors, rows `row_stride`
// lane vectors apart: a cascade of partial sums in levels of 16 rows, lane by lane.
void multi_row_sum(const float* x, int64_t W, int64_t row_stride, int64_t size, Lanes* out /* [4] */) {
  constexpr int nrows = 4, levels = 4;
  const int64_t power = 4, step = int64_t{1} << power, mask = step - 1;  // max(4, CeilLog2(size) / 4) for size <= 2**16
  Lanes acc[levels][nrows];
  for (auto& level : acc)
    for (auto& a : level) std::fill(a.v, a.v + 16, 0.0f);
  auto add_row = [&](int64_t i) {
    for (int k = 0; k < nrows; ++k)
      for (int64_t l = 0; l < W; ++l) acc[0][k].v[l] += x[(i * row_stride + k) * W + l];
  };
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i) add_row(i);
    for (int j = 1; j < levels; ++j) {
      for (int k = 0; k < nrows; ++k)
        for (int64_t l = 0; l < W; ++l) {
          acc[j][k].v[l] += acc[j - 1][k].v[l];
          acc[j - 1][k].v[l] = 0.0f;
        }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < levels; ++j)
    for (int k = 0; k < nrows; ++k)
      for (int64_t l = 0; l < W; ++l) acc[0][k].v[l] += acc[j][k].v[l];
  for (int k = 0; k < nrows; ++k) out[k] = acc[0][k];
}

// torch's CPU x.sum(-1) of n contiguous floats, in its order (vectorized inner sum with W lanes for
// n >= W, else its scalar row sum).
float torch_sum(const float* x, int64_t n, int64_t W) {
  if (n < W) {  // scalar_inner_sum: row_sum with ilp 4 over single floats
    const int64_t size_ilp = n / 4;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    // multi_row_sum over size_ilp rows of 4 scalars (size_ilp < 16 here: no cascade)
    for (int64_t i = 0; i < size_ilp; ++i)
      for (int k = 0; k < 4; ++k) acc[k] += x[i * 4 + k];
    for (int64_t i = size_ilp * 4; i < n; ++i) acc[0] += x[i];
    for (int k = 1; k < 4; ++k) acc[0] += acc[k];
    return 0.0f + acc[0];
  }
  const int64_t vec_size = n / W, size_ilp = vec_size / 4;
  Lanes partial[4];
  multi_row_sum(x, W, 4, size_ilp, partial);
  for (int64_t i = size_ilp * 4; i < vec_size; ++i)
    for (int64_t l = 0; l < W; ++l) partial[0].v[l] += x[i * W + l];
  for (int k = 1; k < 4; ++k)
    for (int64_t l = 0; l < W; ++l) partial[0].v[l] += partial[k].v[l];
  float total = 0.0f;
  for (int64_t k = vec_size * W; k < n; ++k) total += x[k];
  for (int64_t l = 0; l < W; ++l) total += partial[0].v[l];
  return 0.0f + total;  // the output starts at 0 and accumulates
}

// torch's amin / amax of n contiguous floats (no NaN), including which zero a tie of -0 and +0 gives:
// ATen's inner reduction runs lanes of 4 vectors (a tie keeps the newer value, as vminps / vmaxps do)
// over the first n / (4 W) * 4 W values, then a scalar loop that keeps the older value on a tie.
template <bool kMax>
float torch_extreme(const float* x, int64_t n, int64_t W) {
  auto newer = [](float acc, float y) { return kMax ? (acc > y ? acc : y) : (acc < y ? acc : y); };
  auto older = [](float acc, float y) { return kMax ? (acc < y ? y : acc) : (y < acc ? y : acc); };
  float out = kMax ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  const int64_t stride = 4 * W, count = n / stride;
  if (count > 0) {
    float acc[64];
    std::copy(x, x + stride, acc);
    for (int64_t i = 1; i < count; ++i)
      for (int64_t j = 0; j < stride; ++j) acc[j] = newer(acc[j], x[i * stride + j]);
    float buffer[16];
    for (int64_t l = 0; l < W; ++l)
      buffer[l] = newer(newer(acc[l], acc[W + l]), newer(acc[2 * W + l], acc[3 * W + l]));
    for (int64_t l = 1; l < W; ++l) buffer[0] = older(buffer[0], buffer[l]);
    out = older(out, buffer[0]);
  }
  for (int64_t i = count * stride; i < n; ++i) out = older(out, x[i]);
  return out;
}

inline uint16_t half_bits(float x) {
  const at::Half h(x);  // round to nearest even
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}

inline float half_value(uint16_t bits) {
  at::Half h;
  std::memcpy(&h, &bits, sizeof(h));
  return static_cast<float>(h);
}

// D codes (< 2**bits) packed byte-planar as kvcompress.codecs.packing.pack does.
void pack_codes(const uint8_t* codes, int64_t D, int bits, uint8_t* out) {
  int offset = 0;
  for (int width = 8; width >= 1; width /= 2) {
    if (bits - offset < width) continue;
    const int64_t m = D * width / 8;
    const int mask = (1 << width) - 1;
    for (int64_t j = 0; j < m; ++j) {
      int byte = 0;
      for (int h = 0; h < 8 / width; ++h) byte |= ((codes[j + h * m] >> offset) & mask) << (h * width);
      out[j] = static_cast<uint8_t>(byte);
    }
    out += m;
    offset += width;
  }
}

// The part's bytes for one vector x (D floats); returns 0, or 1 (non-finite) / 2 (outside fp16).
int encode_part(const WritePart& p, const float* x, int64_t D, int64_t W, int64_t WX, uint8_t* part) {
  for (int64_t d = 0; d < D; ++d)
    if (!std::isfinite(x[d])) return 1;
  uint8_t codes[kMaxWriteDim];
  if (p.method == 0) {
    const int levels = (1 << p.bits) - 1;
    for (int64_t k = 0; k < D / p.group; ++k) {
      const float* g = x + k * p.group;
      const float lo = torch_extreme<false>(g, p.group, WX), hi = torch_extreme<true>(g, p.group, WX);
      if (std::fabs(hi) > kFp16Max || std::fabs(lo) > kFp16Max) return 2;
      const uint16_t zero_bits = half_bits(lo);
      const float zero = half_value(zero_bits);
      const float diff = hi - zero;
      const uint16_t scale_bits = half_bits(diff / static_cast<float>(levels));
      const float scale = half_value(scale_bits);
      const float safe = scale > 0.0f ? scale : 1.0f;
      for (int64_t d = 0; d < p.group; ++d) {
        const float shifted = g[d] - zero;
        float c = std::nearbyint(shifted / safe);
        c = std::min(std::max(c, 0.0f), static_cast<float>(levels));
        codes[k * p.group + d] = static_cast<uint8_t>(c);
      }
      std::memcpy(part + p.scale_at + 2 * k, &scale_bits, 2);
      std::memcpy(part + p.zero_at + 2 * k, &zero_bits, 2);
    }
  } else {
    float buffer[kMaxWriteDim];
    for (int64_t d = 0; d < D; ++d) buffer[d] = x[d] * x[d];
    float mean = torch_sum(buffer, D, W) / static_cast<float>(D);
    const float rms = std::sqrt(mean);
    const float divisor = rms > 0.0f ? rms : 1.0f;
    const int n_cuts = (1 << p.bits) - 1;
    float values[kMaxWriteDim];
    for (int64_t d = 0; d < D; ++d) {
      const float u = x[d] / divisor;
      int idx = 0;
      while (idx < n_cuts && p.cuts[idx] < u) ++idx;  // torch.bucketize: ties go to the lower centroid
      codes[d] = static_cast<uint8_t>(idx);
      values[d] = p.book[idx];
    }
    for (int64_t d = 0; d < D; ++d) buffer[d] = values[d] * values[d];
    const float energy = torch_sum(buffer, D, W);
    for (int64_t d = 0; d < D; ++d) buffer[d] = x[d] * values[d];
    const float dot = torch_sum(buffer, D, W);
    const float scale = dot / (energy > 0.0f ? energy : 1.0f);
    if (std::fabs(scale) > kFp16Max) return 2;
    const uint16_t scale_bits = half_bits(scale);
    std::memcpy(part + p.scale_at, &scale_bits, 2);
  }
  pack_codes(codes, D, p.bits, part);
  return 0;
}

WritePart describe(const std::vector<int64_t>& d, const at::Tensor& book, const at::Tensor& cuts, int64_t D,
                   int64_t slot_bytes, const char* what) {
  TORCH_CHECK(d.size() == 7, what, ": part description must be (method, offset, bits, group, scale_at, zero_at, nbytes)");
  WritePart p{static_cast<int>(d[0]), d[1], static_cast<int>(d[2]), d[3], d[4], d[5], d[6], nullptr, nullptr};
  TORCH_CHECK(p.method >= 0 && p.method <= 2, what, ": unknown method");
  TORCH_CHECK(p.offset >= 0 && p.nbytes > 0 && p.offset + p.nbytes <= slot_bytes, what, ": the part does not fit a slot");
  if (p.method == 2) return p;
  TORCH_CHECK(p.bits >= 1 && p.bits <= 8, what, ": bits must be 1..8");
  const int64_t codes = D * p.bits / 8;
  if (p.method == 0) {
    TORCH_CHECK(p.group >= 1 && D % p.group == 0, what, ": group must divide head_dim");
    TORCH_CHECK(p.scale_at >= codes && p.scale_at + 2 * (D / p.group) <= p.nbytes &&
                    p.zero_at >= codes && p.zero_at + 2 * (D / p.group) <= p.nbytes,
                what, ": scales or zero points outside the part");
  } else {
    TORCH_CHECK(book.scalar_type() == at::kFloat && book.is_contiguous() && book.numel() == (int64_t{1} << p.bits) &&
                    cuts.scalar_type() == at::kFloat && cuts.is_contiguous() && cuts.numel() == book.numel() - 1,
                what, ": codebook (2**bits,) and midpoints (2**bits - 1,) must be contiguous float32");
    TORCH_CHECK(p.scale_at >= codes && p.scale_at + 2 <= p.nbytes, what, ": the scale lies outside the part");
    p.book = book.data_ptr<float>();
    p.cuts = cuts.data_ptr<float>();
  }
  return p;
}

// Row `i`, head `h` of a (N, H, D) input as D floats in `out` (exact conversions), or its raw bytes.
inline void load_row(const at::Tensor& x, const uint8_t* base, int64_t i, int64_t h, int64_t D, float* out) {
  const int64_t elem = x.element_size();
  const uint8_t* p = base + (i * x.stride(0) + h * x.stride(1)) * elem;
  switch (x.scalar_type()) {
    case at::kFloat:
      std::memcpy(out, p, D * sizeof(float));
      break;
    case at::kBFloat16:
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(reinterpret_cast<const at::BFloat16*>(p)[d]);
      break;
    default:
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(reinterpret_cast<const at::Half*>(p)[d]);
  }
}

}  // namespace

// Encode keys and values (N, H, D) of token i into slot slot_mapping[i] of pages (num_blocks, H,
// block_size, slot_bytes) uint8 (negative slots skipped). key / value: float32, bfloat16 or float16
// with a contiguous last dimension (already rotated for rotated parts); for a "none" part, the
// values in the stored dtype. Part descriptions: (method, offset, bits, group, scale_at, zero_at,
// nbytes); books and midpoints: float32 for codebook parts, else empty. `sum_lanes`, `extreme_lanes`:
// the vector widths of torch's float sums and of its amin / amax on this machine. Returns 0 when every slot was written; 1 (non-finite states)
// or 2 (outside the fp16 range) with nothing written.
int64_t paged_write(const at::Tensor& pages, const at::Tensor& key, const at::Tensor& value,
                    const at::Tensor& slot_mapping, const std::vector<int64_t>& key_part, const at::Tensor& key_book,
                    const at::Tensor& key_cuts, const std::vector<int64_t>& value_part,
                    const at::Tensor& value_book, const at::Tensor& value_cuts, int64_t sum_lanes,
                    int64_t extreme_lanes) {
  TORCH_CHECK(pages.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "kvcompress paged write: tensors must be on the CPU");
  TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 4 && pages.stride(3) == 1,
              "pages must be uint8 (num_blocks, H, block_size, slot_bytes) with contiguous slots");
  for (int64_t lanes : {sum_lanes, extreme_lanes})
    TORCH_CHECK(lanes == 4 || lanes == 8 || lanes == 16, "lanes must be 4, 8 or 16");
  const int64_t N = slot_mapping.numel(), H = pages.size(1), block_size = pages.size(2);
  const int64_t slot_bytes = pages.size(3), num_blocks = pages.size(0);
  for (const at::Tensor* x : {&key, &value}) {
    TORCH_CHECK(x->dim() == 3 && x->size(0) == N && x->size(1) == H && x->stride(2) == 1,
                "keys and values must be (N, H, D) with a contiguous last dimension, N = len(slot_mapping)");
    TORCH_CHECK(x->scalar_type() == at::kFloat || x->scalar_type() == at::kBFloat16 || x->scalar_type() == at::kHalf,
                "keys and values must be float32, bfloat16 or float16");
  }
  const int64_t D = key.size(2);
  TORCH_CHECK(value.size(2) == D && D % 8 == 0 && D <= kMaxWriteDim, "head_dim must match, be a multiple of 8 and <= 1024");
  const WritePart kp = describe(key_part, key_book, key_cuts, D, slot_bytes, "keys");
  const WritePart vp = describe(value_part, value_book, value_cuts, D, slot_bytes, "values");
  for (const auto& [p, x] : {std::pair<const WritePart&, const at::Tensor&>{kp, key}, {vp, value}})
    if (p.method == 2)
      TORCH_CHECK(p.nbytes == D * x.element_size(), "a \"none\" part holds D values of its input's dtype");
  at::Tensor mapping = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slots = mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(slots[i] < num_blocks * block_size, "slot ", slots[i], " lies outside the pages");

  std::vector<uint8_t> encoded(static_cast<size_t>(N * H * slot_bytes), 0);
  std::vector<int> status(static_cast<size_t>(N * H), 0);
  const uint8_t* kbase = static_cast<const uint8_t*>(key.data_ptr());
  const uint8_t* vbase = static_cast<const uint8_t*>(value.data_ptr());
  at::parallel_for(0, N * H, 64, [&](int64_t begin, int64_t end) {
    float row[kMaxWriteDim];
    for (int64_t index = begin; index < end; ++index) {
      const int64_t i = index / H, h = index % H;
      if (slots[i] < 0) continue;
      uint8_t* slot = encoded.data() + index * slot_bytes;
      for (const auto& [p, x, base] : {std::tuple<const WritePart&, const at::Tensor&, const uint8_t*>{kp, key, kbase},
                                       {vp, value, vbase}}) {
        if (p.method == 2) {
          std::memcpy(slot + p.offset, base + (i * x.stride(0) + h * x.stride(1)) * x.element_size(), p.nbytes);
          continue;
        }
        load_row(x, base, i, h, D, row);
        const int s = encode_part(p, row, D, sum_lanes, extreme_lanes, slot + p.offset);
        if (s) {
          status[index] = s;
          break;
        }
      }
    }
  });
  for (int s : status)
    if (s) return s;
  uint8_t* out = pages.data_ptr<uint8_t>();
  const int64_t s_block = pages.stride(0), s_head = pages.stride(1), s_row = pages.stride(2);
  for (int64_t i = 0; i < N; ++i) {
    if (slots[i] < 0) continue;
    const int64_t b = slots[i] / block_size, r = slots[i] % block_size;
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(out + b * s_block + h * s_head + r * s_row, encoded.data() + (i * H + h) * slot_bytes, slot_bytes);
  }
  return 0;
}
