// CPU decode attention over the shared paged KV cache: one query token per sequence, keys and values read
// in place from the pages listed in the sequence's block table (no gather into a contiguous copy).
//
// For sequence b, query head h (kv head g = h / (H / Hkv), GQA), context length L_b and window start
// s_b = max(0, L_b - window) (s_b = 0 without a sliding window):
//     out[b, h] = sum_{t=s_b}^{L_b-1} softmax_t(scale * q[b, h] . K_b[t, g]) * V_b[t, g]
// with K_b[t, g] = k_cache[block_tables[b, t / B], t % B, g] (B = block size), the same for V.
// A sequence with an empty window (L_b = 0) gets zeros.
//
// Parallelism: OpenMP over (sequence, kv head) pairs; one work item computes the G = H / Hkv query heads that
// share a kv head, so every K/V row is loaded once for G heads. Inner loops run over the head dimension with
// `omp simd` so the compiler vectorises them; scores and accumulators are float (double for float64 input),
// and half/bfloat16 rows are widened once per row.
#include "sipo_fast.h"

#include <ATen/Dispatch.h>
#include <omp.h>

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

template <typename scalar_t>
void decode_attention_impl(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                           int64_t window, at::Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t Hkv = k_cache.size(2), block = k_cache.size(1);
  const int64_t G = H / Hkv;
  const scalar_t* q = query.data_ptr<scalar_t>();
  const scalar_t* kc = k_cache.data_ptr<scalar_t>();
  const scalar_t* vc = v_cache.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  // Strides in elements. Caches: [num_blocks, block, Hkv, D] with unit stride on D (checked by the caller).
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1);
  const int64_t ks0 = k_cache.stride(0), ks1 = k_cache.stride(1), ks2 = k_cache.stride(2);
  const int64_t vs0 = v_cache.stride(0), vs1 = v_cache.stride(1), vs2 = v_cache.stride(2);
  const int64_t ts0 = block_tables.stride(0), ts1 = block_tables.stride(1);

#pragma omp parallel
  {
    std::vector<acc_t> qf(G * D), acc(G * D), rowbuf(D), denom(G), scores;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t L = lens[b];
        const int64_t start = window > 0 ? std::max<int64_t>(0, L - window) : 0;
        const int64_t n = L - start;
        if (n <= 0) {
          for (int64_t j = 0; j < G; ++j)
            for (int64_t d = 0; d < D; ++d) o[(b * H + g * G + j) * D + d] = scalar_t(0);
          continue;
        }
        // Scale the query once instead of every score.
        for (int64_t j = 0; j < G; ++j) {
          const scalar_t* qh = q + b * qs0 + (g * G + j) * qs1;
          for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<acc_t>(qh[d]) * static_cast<acc_t>(scale);
        }
        scores.resize(G * n);
        // Pass 1: scores[j, t] = q_j . k_t, walking the block table.
        for (int64_t t = start; t < L; ++t) {
          const int64_t blk = tables[b * ts0 + (t / block) * ts1];
          const acc_t* k = widen<scalar_t, acc_t>(kc + blk * ks0 + (t % block) * ks1 + g * ks2, rowbuf.data(), D);
          for (int64_t j = 0; j < G; ++j) {
            const acc_t* qj = qf.data() + j * D;
            acc_t s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qj[d] * k[d];
            scores[j * n + (t - start)] = s;
          }
        }
        // Softmax per head (max-subtracted, so exp never overflows).
        for (int64_t j = 0; j < G; ++j) {
          acc_t* sj = scores.data() + j * n;
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for (int64_t t = 0; t < n; ++t) m = std::max(m, sj[t]);
          acc_t sum = 0;
          for (int64_t t = 0; t < n; ++t) {
            sj[t] = std::exp(sj[t] - m);
            sum += sj[t];
          }
          denom[j] = sum;
        }
        // Pass 2: acc[j] = sum_t p[j, t] * v_t.
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t t = start; t < L; ++t) {
          const int64_t blk = tables[b * ts0 + (t / block) * ts1];
          const acc_t* v = widen<scalar_t, acc_t>(vc + blk * vs0 + (t % block) * vs1 + g * vs2, rowbuf.data(), D);
          for (int64_t j = 0; j < G; ++j) {
            const acc_t p = scores[j * n + (t - start)];
            acc_t* aj = acc.data() + j * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) aj[d] += p * v[d];
          }
        }
        for (int64_t j = 0; j < G; ++j) {
          const acc_t inv = acc_t(1) / denom[j];
          scalar_t* oj = o + (b * H + g * G + j) * D;
          for (int64_t d = 0; d < D; ++d) oj[d] = static_cast<scalar_t>(acc[j * D + d] * inv);
        }
      }
    }
  }
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
