// CPU decode attention over the shared paged KV cache: one query token per sequence, keys and values read
// in place from the pages listed in the sequence's block table (no gather into a contiguous copy).
//
// For sequence b, query head h (kv head g = h / (H / Hkv), GQA), context length L_b and window start
// s_b = max(0, L_b - window) (s_b = 0 without a sliding window):
//     out[b, h] = sum_{t=s_b}^{L_b-1} softmax_t(scale * q[b, h] . K_b[t, g]) * V_b[t, g]
// with K_b[t, g] = k_cache[block_tables[b, t / B], t % B, g] (B = block size), the same for V.
// A sequence with an empty window (L_b = 0) gets zeros.
//
// Parallelism: ATen's parallel_for (OpenMP in torch's CPU builds) over (sequence, kv head) pairs; one work
// item computes the G = H / Hkv query heads that share a kv head, so every K/V row is loaded once for G heads.
// Inner loops run over the head dimension with `omp simd` so the compiler vectorises them; scores and
// accumulators are float (double for float64 input), and half/bfloat16 rows are widened once per row.
#include "sipo_fast.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace sipo_fast {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Return a pointer to `n` accumulator-typed values of row `src`: the row itself when no conversion is
// needed, else a widened copy in `buf`.
template <typename scalar_t, typename acc_t>
inline const acc_t* widen(const scalar_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(src[i]);
    return buf;
  }
}

// Pointers and strides (in elements) of one call. Caches are [num_blocks, block, Hkv, D] with unit stride on D.
template <typename scalar_t>
struct DecodeProblem {
  const scalar_t *q, *kc, *vc;
  scalar_t* o;
  const int32_t *tables, *lens;
  int64_t H, D, Hkv, G, block, window;
  int64_t qs0, qs1, ks0, ks1, ks2, vs0, vs1, vs2, ts0, ts1;
  double scale;
};

// Per-thread scratch, reused across work items.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> qf, acc, row, denom, scores;
  Scratch(int64_t G, int64_t D) : qf(G * D), acc(G * D), row(D), denom(G) {}
};

// Attention of the G query heads of sequence b that share kv head g.
template <typename scalar_t, typename acc_t>
void attend(const DecodeProblem<scalar_t>& p, int64_t b, int64_t g, Scratch<acc_t>& s) {
  const int64_t G = p.G, D = p.D, L = p.lens[b];
  const int64_t start = p.window > 0 ? std::max<int64_t>(0, L - p.window) : 0;
  const int64_t n = L - start;
  scalar_t* out = p.o + (b * p.H + g * G) * D;  // (G, D) block of the contiguous output
  if (n <= 0) {
    std::fill(out, out + G * D, scalar_t(0));
    return;
  }
  // Scale the query once instead of every score.
  for (int64_t j = 0; j < G; ++j) {
    const scalar_t* qh = p.q + b * p.qs0 + (g * G + j) * p.qs1;
    for (int64_t d = 0; d < D; ++d) s.qf[j * D + d] = static_cast<acc_t>(qh[d]) * static_cast<acc_t>(p.scale);
  }
  s.scores.resize(G * n);
  // Pass 1: scores[j, t] = q_j . k_t, walking the block table.
  for (int64_t t = start; t < L; ++t) {
    const int64_t blk = p.tables[b * p.ts0 + (t / p.block) * p.ts1];
    const acc_t* k = widen<scalar_t, acc_t>(p.kc + blk * p.ks0 + (t % p.block) * p.ks1 + g * p.ks2, s.row.data(), D);
    for (int64_t j = 0; j < G; ++j) {
      const acc_t* qj = s.qf.data() + j * D;
      acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qj[d] * k[d];
      s.scores[j * n + (t - start)] = dot;
    }
  }
  // Softmax per head (max-subtracted, so exp never overflows).
  for (int64_t j = 0; j < G; ++j) {
    acc_t* sj = s.scores.data() + j * n;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sj[t]);
    acc_t sum = 0;
    for (int64_t t = 0; t < n; ++t) {
      sj[t] = std::exp(sj[t] - m);
      sum += sj[t];
    }
    s.denom[j] = sum;
  }
  // Pass 2: acc[j] = sum_t p[j, t] * v_t.
  std::fill(s.acc.begin(), s.acc.end(), acc_t(0));
  for (int64_t t = start; t < L; ++t) {
    const int64_t blk = p.tables[b * p.ts0 + (t / p.block) * p.ts1];
    const acc_t* v = widen<scalar_t, acc_t>(p.vc + blk * p.vs0 + (t % p.block) * p.vs1 + g * p.vs2, s.row.data(), D);
    for (int64_t j = 0; j < G; ++j) {
      const acc_t w = s.scores[j * n + (t - start)];
      acc_t* aj = s.acc.data() + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) aj[d] += w * v[d];
    }
  }
  for (int64_t j = 0; j < G; ++j) {
    const acc_t inv = acc_t(1) / s.denom[j];
    for (int64_t d = 0; d < D; ++d) out[j * D + d] = static_cast<scalar_t>(s.acc[j * D + d] * inv);
  }
}

template <typename scalar_t>
void decode_attention_impl(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                           int64_t window, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2), Hkv = k_cache.size(2);
  DecodeProblem<scalar_t> p{query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(),
                            context_lens.data_ptr<int32_t>(), H, D, Hkv, H / Hkv, k_cache.size(1), window,
                            query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1),
                            k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                            block_tables.stride(0), block_tables.stride(1), scale};
  // Parallel over (sequence, kv head) items with ATen's OpenMP pool (follows torch.set_num_threads). The grain
  // keeps small decode batches on one thread: opening a parallel region costs more than ~256k multiply-adds
  // (~0.1 ms), and much more on a loaded machine, where threads spin at the barrier while descheduled.
  int64_t total_len = 0;
  for (int64_t b = 0; b < B; ++b) total_len += p.lens[b];
  const int64_t macs_per_item = std::max<int64_t>(1, total_len / std::max<int64_t>(B, 1) * p.G * D * 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / macs_per_item);
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(p.G, D);
    for (int64_t item = begin; item < end; ++item) attend<scalar_t, acc_t>(p, item / Hkv, item % Hkv, scratch);
  });
}

at::Tensor paged_attention_decode(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window) {
  // The Python wrapper (sipo_fast.ops.paged_attention) validates with clear messages; these checks keep a
  // direct caller from reading out of bounds.
  TORCH_CHECK_VALUE(query.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
                    "paged_attention_decode: query [B, H, D], k_cache/v_cache [num_blocks, block, Hkv, D]");
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have the same shape");
  TORCH_CHECK_VALUE(query.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
                    "the C++ paged attention kernel runs on CPU tensors");
  TORCH_CHECK_VALUE(query.scalar_type() == k_cache.scalar_type() && query.scalar_type() == v_cache.scalar_type(),
                    "query, k_cache and v_cache must share a dtype");
  TORCH_CHECK_VALUE(query.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                    "the head dimension must be contiguous (stride 1)");
  TORCH_CHECK_VALUE(query.size(2) == k_cache.size(3), "query and cache head dims differ");
  TORCH_CHECK_VALUE(k_cache.size(2) > 0 && query.size(1) % k_cache.size(2) == 0,
                    "query heads must be a multiple of kv heads");
  TORCH_CHECK_VALUE(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
                    "block_tables and context_lens must be int32");
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.size(0) == query.size(0) && context_lens.dim() == 1 &&
                        context_lens.size(0) == query.size(0),
                    "block_tables [B, W] and context_lens [B] must match the batch");
  auto lens = context_lens.contiguous();
  const int64_t B = query.size(0), W = block_tables.size(1), block = k_cache.size(1), nb = k_cache.size(0);
  auto tables_acc = block_tables.accessor<int32_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens.data_ptr<int32_t>()[b];
    TORCH_CHECK_VALUE(L >= 0 && L <= W * block, "context_lens[", b, "]=", L, " is outside [0, ",
                      W * block, "] (block table width x block size)");
    for (int64_t i = 0; i < (L + block - 1) / block; ++i) {
      TORCH_CHECK_VALUE(tables_acc[b][i] >= 0 && tables_acc[b][i] < nb, "block_tables[", b, ", ", i,
                        "]=", tables_acc[b][i], " is not a block of the cache (", nb, " blocks)");
    }
  }
  auto out = at::empty({B, query.size(1), query.size(2)}, query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "paged_attention_decode", [&] {
    decode_attention_impl<scalar_t>(query, k_cache, v_cache, block_tables, lens, scale, sliding_window, out);
  });
  return out;
}

}  // namespace

void init_paged_attention(pybind11::module_& m) {
  m.def("paged_attention_decode", &paged_attention_decode, pybind11::arg("query"), pybind11::arg("k_cache"),
        pybind11::arg("v_cache"), pybind11::arg("block_tables"), pybind11::arg("context_lens"),
        pybind11::arg("scale"), pybind11::arg("sliding_window") = 0,
        "Decode attention reading K/V pages in place: query [B, H, D], caches [num_blocks, block, Hkv, D], "
        "block_tables int32 [B, W], context_lens int32 [B] -> [B, H, D]. OpenMP over (sequence, kv head).");
}

}  // namespace sipo_fast
