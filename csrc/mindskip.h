// Shared declarations of the mindskip kernels: argument checks (one implementation for CPU and CUDA, in
// ops.cpp, so every device reports the same error naming the same argument) and small helpers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

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
                            const Tensor& cache_seqlens, const Tensor& out);
void check_varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                            const Tensor& cu_seqlens_k, const Tensor& out);

// Largest head dim the attention kernels accept (the CUDA kernel keeps Dh/32 values per lane in registers).
constexpr int64_t kMaxHeadDim = 256;

template <typename T>
C10_HOST_DEVICE inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace mindskip
