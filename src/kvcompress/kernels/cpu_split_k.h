// The split-K ("flash decoding") driver shared by the CPU decode kernels: one query token per
// sequence attends to
//     [ sinks (full precision) | compressed tokens (codes) | window (full precision) ]
// of every (batch, KV head), each query head of its grouped-query group. Work is split into
// tasks (batch, KV head, block): task 0 of a head takes the sinks and the window, task k the
// k-th block of `block_tokens` compressed tokens. Each task writes a partial softmax (max, sum,
// unnormalised p.v) and the partials are merged at the end, as vLLM and flashinfer merge the
// partial results of split attention. Tasks run under at::parallel_for (torch's thread count).
//
// A codec supplies only how compressed keys are scored and values mixed, as a Policy:
//   struct Policy {
//     struct Scratch;                   // one thread's buffers
//     static constexpr bool kBlockMajor;  // task order: blocks outer, the KV heads of a block
//                                         // together (true), or the blocks of a head together
//     static constexpr bool kCodedValues; // values of compressed tokens accumulated in another
//                                         // space (value_width floats), mapped back by finish_values
//     int64_t value_width() const;
//     void prepare(const float* q_all, int64_t B, int64_t Hq, int rep);  // per step, q_all (B, Hq, D)
//     Scratch scratch() const;
//     // scores of compressed tokens [t0, t1) of (b, h), q (rep x D, scaled), into sc[i * ld + t - t0]
//     void key_scores(Scratch&, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* q, int rep,
//                     float* sc, int64_t ld);
//     // acc[i * acc_stride + j] += mix of the weights p[i * ld + t - t0] with the values of [t0, t1)
//     void value_mix(Scratch&, int64_t b, int64_t h, int64_t t0, int64_t t1, const float* p, int rep,
//                    int64_t ld, float* acc, int64_t acc_stride);
//     // with kCodedValues: full (Dv) += the merged value accumulator `coded` of KV head h, whose
//     // softmax weights sum to l_coded
//     void finish_values(int64_t h, const float* coded, float l_coded, float* full, int64_t Dv) const;
//   };

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {

// The mask's additive term or exclusion applied to the rep x len scores of one task: position
// pos0 + j for compressed tasks; sinks then window (after the compressed tokens) for task 0.
inline void apply_mask(const bool* mb, const float* mf, int64_t offset, bool full_precision, int64_t pos0,
                       int64_t n_sinks, int64_t n_compressed, int rep, int64_t len, float* sc) {
  for (int64_t j = 0; j < len; ++j) {
    int64_t pos = pos0 + j;
    if (full_precision && j >= n_sinks) pos = n_sinks + n_compressed + (j - n_sinks);
    if (mb) {
      if (!mb[offset + pos])
        for (int i = 0; i < rep; ++i) sc[i * len + j] = kNegInf;
    } else {
      const float add = mf[offset + pos];
      for (int i = 0; i < rep; ++i) sc[i * len + j] += add;
    }
  }
}

// The inputs split_k_attend reads itself: CPU tensors, query (B, Hq, D), sinks and window
// (B, H, n, D or Dv) in the query's dtype with contiguous rows, mask (B or 1, seq) bool or
// additive float32 with seq = sinks + n_compressed + window.
inline void check_split_k_inputs(const at::Tensor& query, const at::Tensor& sink_k, const at::Tensor& sink_v,
                                 const at::Tensor& win_k, const at::Tensor& win_v, int64_t n_compressed,
                                 const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(query.device().is_cpu(), "kvcompress cpu kernel: tensors must be on the CPU");
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1, "query must be (B, Hq, D) with contiguous rows");
  const int64_t B = query.size(0), D = query.size(2), H = win_k.size(1), Dv = win_v.size(3);
  for (const at::Tensor* t : {&sink_k, &sink_v, &win_k, &win_v}) {
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1 && t->scalar_type() == query.scalar_type() && t->size(0) == B &&
                    t->size(1) == H,
                "sinks and window must be (B, H, n, D) in the query's dtype with contiguous rows");
  }
  TORCH_CHECK(win_k.size(3) == D && sink_k.size(3) == D && sink_v.size(3) == Dv, "head_dim mismatch");
  TORCH_CHECK(D <= kMaxDim && Dv <= kMaxDim, "head_dim above ", kMaxDim);
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->stride(1) == 1 &&
                    (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat),
                "mask must be (B or 1, seq) bool or float32 with contiguous rows");
    TORCH_CHECK(mask->size(1) == sink_k.size(2) + n_compressed + win_k.size(2), "mask length != cached tokens");
    TORCH_CHECK(mask->size(0) == 1 || mask->size(0) == B, "mask batch mismatch");
  }
}

// out (B, Hq, Dv) in the query's dtype T (see `split_k_attend`).
template <typename T, typename Policy>
at::Tensor split_k_attend_typed(Policy& policy, const at::Tensor& query, const at::Tensor& sink_k,
                          const at::Tensor& sink_v, const at::Tensor& win_k, const at::Tensor& win_v,
                          int64_t n_compressed, const c10::optional<at::Tensor>& mask, double scaling,
                          int64_t block_tokens) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t H = win_k.size(1), Dv = win_v.size(3);
  const int64_t n_sinks = sink_k.size(2), n_window = win_k.size(2);
  TORCH_CHECK(Hq % H == 0, "query heads must be a multiple of KV heads");
  const int rep = static_cast<int>(Hq / H);
  const int64_t n_blocks = (n_compressed + block_tokens - 1) / block_tokens;
  const int64_t tasks_per_head = 1 + n_blocks;  // task 0: sinks and window
  const int64_t width = std::max(Dv, policy.value_width());
  const int64_t stride_partial = 2 + width;  // max, sum, acc (Dv for task 0, value_width for the others)
  std::vector<float> partial(static_cast<size_t>(B * H * tasks_per_head * rep * stride_partial));

  // The scaled query of every (batch, query head).
  const float fscale = static_cast<float>(scaling);
  const T* qp = query.data_ptr<T>();
  std::vector<float> q_all(static_cast<size_t>(B * Hq * D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < Hq; ++i)
      for (int64_t d = 0; d < D; ++d)
        q_all[(b * Hq + i) * D + d] = static_cast<float>(qp[b * query.stride(0) + i * query.stride(1) + d]) * fscale;
  policy.prepare(q_all.data(), B, Hq, rep);

  const bool mask_bool = mask.has_value() && mask->scalar_type() == at::kBool;
  const bool* mb = mask_bool ? mask->data_ptr<bool>() : nullptr;
  const float* mf = (mask.has_value() && !mask_bool) ? mask->data_ptr<float>() : nullptr;
  const int64_t mask_bstride = mask.has_value() ? (mask->size(0) == 1 ? 0 : mask->stride(0)) : 0;
  const int64_t max_len = std::max(n_sinks + n_window, std::min(block_tokens, n_compressed));

  at::parallel_for(0, B * H * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(static_cast<size_t>(rep) * std::max<int64_t>(max_len, 1));
    std::vector<float> acc(static_cast<size_t>(rep) * width);
    typename Policy::Scratch scratch = policy.scratch();
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, h, blk;
      if constexpr (Policy::kBlockMajor) {
        b = task / (tasks_per_head * H), blk = task / H % tasks_per_head, h = task % H;
      } else {
        const int64_t bh = task / tasks_per_head;
        blk = task % tasks_per_head, b = bh / H, h = bh % H;
      }
      const int64_t bh = b * H + h;
      const float* q = q_all.data() + (b * Hq + h * rep) * D;
      // ---- scores of this task's positions, in sc[i * len + j]
      int64_t len, pos0, t0 = 0, t1 = 0;  // first position (compressed tasks) / token range
      if (blk == 0) {
        len = n_sinks + n_window;
        const T* sk = sink_k.data_ptr<T>() + b * sink_k.stride(0) + h * sink_k.stride(1);
        const T* wk = win_k.data_ptr<T>() + b * win_k.stride(0) + h * win_k.stride(1);
        for (int64_t j = 0; j < len; ++j) {
          const T* row = j < n_sinks ? sk + j * sink_k.stride(2) : wk + (j - n_sinks) * win_k.stride(2);
          for (int i = 0; i < rep; ++i) sc[i * len + j] = dot_t(q + i * D, row, D);
        }
        pos0 = 0;
      } else {
        t0 = (blk - 1) * block_tokens;
        t1 = std::min(t0 + block_tokens, n_compressed);
        len = t1 - t0;
        policy.key_scores(scratch, b, h, t0, t1, q, rep, sc.data(), len);
        pos0 = n_sinks + t0;
      }
      if (mask.has_value())
        apply_mask(mb, mf, b * mask_bstride, blk == 0, pos0, n_sinks, n_compressed, rep, len, sc.data());
      // ---- partial softmax, then p . v
      float* part = partial.data() + (bh * tasks_per_head + blk) * rep * stride_partial;
      std::fill(acc.begin(), acc.end(), 0.0f);
      block_softmax_stats(sc.data(), rep, len, part, stride_partial);
      if (blk == 0) {
        const T* sv = sink_v.data_ptr<T>() + b * sink_v.stride(0) + h * sink_v.stride(1);
        const T* wv = win_v.data_ptr<T>() + b * win_v.stride(0) + h * win_v.stride(1);
        mix_full_precision(sv, sink_v.stride(2), wv, win_v.stride(2), n_sinks, sc.data(), rep, len, acc.data(),
                           width, Dv);
      } else {
        policy.value_mix(scratch, b, h, t0, t1, sc.data(), rep, len, acc.data(), width);
      }
      for (int i = 0; i < rep; ++i)
        std::copy(acc.begin() + i * width, acc.begin() + (i + 1) * width, part + i * stride_partial + 2);
    }
  });

  // ---- merge the partial softmaxes of every (batch, query head)
  at::Tensor out = at::empty({B, Hq, Dv}, query.options());
  T* op = out.data_ptr<T>();
  const int64_t coded_width = Policy::kCodedValues ? policy.value_width() : 0;
  std::vector<float> full(Dv), coded(coded_width);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const int64_t h = bh % H;
    for (int i = 0; i < rep; ++i) {
      float m = kNegInf;
      for (int64_t blk = 0; blk < tasks_per_head; ++blk)
        m = std::max(m, partial[((bh * tasks_per_head + blk) * rep + i) * stride_partial]);
      std::fill(full.begin(), full.end(), 0.0f);
      std::fill(coded.begin(), coded.end(), 0.0f);
      float l = 0.0f, l_coded = 0.0f;
      for (int64_t blk = 0; blk < tasks_per_head; ++blk) {
        const float* part = partial.data() + ((bh * tasks_per_head + blk) * rep + i) * stride_partial;
        if (part[0] == kNegInf) continue;
        const float w = std::exp(part[0] - m);
        l += w * part[1];
        if (blk == 0 || !Policy::kCodedValues) {
          for (int64_t d = 0; d < Dv; ++d) full[d] += w * part[2 + d];
        } else {
          l_coded += w * part[1];
          for (int64_t j = 0; j < coded_width; ++j) coded[j] += w * part[2 + j];
        }
      }
      if constexpr (Policy::kCodedValues) policy.finish_values(h, coded.data(), l_coded, full.data(), Dv);
      const float inv = 1.0f / l;  // all positions masked: 0 / 0 = NaN, as torch's softmax gives
      T* o = op + ((bh / H) * Hq + h * rep + i) * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(full[d] * inv);
    }
  }
  return out;
}

// Attention of one decode step, out (B, Hq, Dv) in the query's dtype (float32, bfloat16 or
// float16), with `policy` reading the compressed tokens; the caller checks the inputs first
// (`check_split_k_inputs`, and its own of the codes).
template <typename Policy>
at::Tensor split_k_attend(Policy& policy, const at::Tensor& query, const at::Tensor& sink_k, const at::Tensor& sink_v,
                          const at::Tensor& win_k, const at::Tensor& win_v, int64_t n_compressed,
                          const c10::optional<at::Tensor>& mask, double scaling, int64_t block_tokens) {
  switch (query.scalar_type()) {
    case at::kFloat:
      return split_k_attend_typed<float>(policy, query, sink_k, sink_v, win_k, win_v, n_compressed, mask, scaling,
                                         block_tokens);
    case at::kBFloat16:
      return split_k_attend_typed<at::BFloat16>(policy, query, sink_k, sink_v, win_k, win_v, n_compressed, mask,
                                                scaling, block_tokens);
    case at::kHalf:
      return split_k_attend_typed<at::Half>(policy, query, sink_k, sink_v, win_k, win_v, n_compressed, mask,
                                            scaling, block_tokens);
    default:
      TORCH_CHECK(false, "kvcompress cpu kernel: query dtype must be float32, bfloat16 or float16");
  }
}

}  // namespace
