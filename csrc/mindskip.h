// Shared declarations of the mindskip kernels: argument checks (one implementation for CPU and CUDA, in
// ops.cpp, so every device reports the same error naming the same argument) and small helpers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace mindskip {

using at::Tensor;

// Each check raises ValueError (shape, rank, device, out-of-range value) or TypeError (dtype) through
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE, with the op and the argument named.
void check_router(const Tensor& z, const Tensor& weight, const std::optional<Tensor>& gamma, double eps,
                  const Tensor& mask, double threshold, const Tensor& scores, const Tensor& keep);
void check_compact_counts(const Tensor& keep, const Tensor& cu_seqlens);
void check_compact(const Tensor& keep, const Tensor& position_ids, const Tensor& cu_seqlens,
                   const Tensor& indices, const Tensor& positions);
void check_gather(const Tensor& x, const Tensor& indices, const Tensor& out);
void check_gather_norm(const Tensor& x, const Tensor& gamma, double eps, const Tensor& indices, const Tensor& out);
void check_scatter_add(const Tensor& residual, const Tensor& values, const Tensor& indices,
                       const std::optional<Tensor>& scale, const Tensor& out);
void check_decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                            const Tensor& cache_seqlens, const std::optional<Tensor>& block_table,
                            const Tensor& out);
// The varlen checks include the optional query_positions ([Tq] int32/int64, only with causal).
void check_paged_varlen_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                  const Tensor& cu_seqlens_q, const Tensor& cache_seqlens, const Tensor& block_table,
                                  bool causal, const Tensor& out, const std::optional<Tensor>& query_positions);
void check_varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                            const Tensor& cu_seqlens_k, bool causal, const Tensor& out,
                            const std::optional<Tensor>& query_positions);

// Largest head dim the attention kernels accept (the CUDA kernel keeps Dh/32 values per lane in registers).
constexpr int64_t kMaxHeadDim = 256;

// Where row s of sequence b lives in a K/V cache: a paged pool read through an int32 block table (block ids
// clamped to the pool, like the reference), or a dense cache, the identity table (block b, offset s).
struct Paging {
  const int32_t* table;  // nullptr: dense cache [B, S, ...]
  int64_t table_stride;  // elements between block-table rows
  int64_t block_size;
  int64_t num_blocks;

  // Element offset of the row in a cache with strides (block_stride, row_stride) of its first two dims.
  C10_HOST_DEVICE int64_t row_offset(int64_t b, int64_t s, int64_t block_stride, int64_t row_stride) const {
    if (table == nullptr) return b * block_stride + s * row_stride;
    int64_t block = table[b * table_stride + s / block_size];
    block = block < 0 ? 0 : (block >= num_blocks ? num_blocks - 1 : block);
    return block * block_stride + (s % block_size) * row_stride;
  }
};

// Paging over k_cache, with `table` the contiguous block table or an undefined tensor (dense cache), and the
// capacity: the most rows a sequence can have (lengths are clamped to it; 0 for an empty pool).
inline std::pair<Paging, int64_t> make_paging(const Tensor& k_cache, const Tensor& table) {
  if (!table.defined()) return {Paging{nullptr, 0, k_cache.size(1), k_cache.size(0)}, k_cache.size(1)};
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1);
  return {Paging{table.const_data_ptr<int32_t>(), table.size(1), block_size, blocks},
          blocks == 0 ? 0 : table.size(1) * block_size};
}

template <typename T>
C10_HOST_DEVICE inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace mindskip
