// CUDA kernels of the routing pipeline: router (warp per token, optional RMSNorm folded in, + block reduction
// per sequence), compaction (block reduce, scan over sequences, block scan within each sequence), 16-byte
// vectorised gather (and gather + RMSNorm) and a single-pass scatter-add (every output row written once:
// copied, or residual + scale * values).
// None of them synchronises with the host; compaction's caller reads T once (see backends/compiled.py).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../mindskip.h"
#include "cuda_utils.cuh"

namespace mindskip::cuda {
namespace {

constexpr int kThreads = 256;

// ---- router ----------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t rstd(acc_t sumsq, int64_t dim, double eps) {
  return acc_t(1) / sqrt(sumsq / static_cast<acc_t>(dim) + static_cast<acc_t>(eps));
}

// One warp per token: logit = z_row . w (NORM: w = gamma * w and logit *= rstd(z_row), RMSNorm folded in).
// Token granularity finishes here (score, keep); sequence granularity stores the masked logit for
// router_sequence_kernel.
template <typename T, typename acc_t, int VEC, bool NORM>
__global__ void router_token_kernel(const T* __restrict__ z, const acc_t* __restrict__ w, double eps,
                                    const bool* __restrict__ mask, int64_t rows, int64_t dim, bool per_sequence,
                                    acc_t thr, float* __restrict__ scores, bool* __restrict__ keep,
                                    acc_t* __restrict__ logits) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; r < rows; r += warps) {
    const T* row = z + r * dim;
    acc_t sum = 0, sumsq = 0;
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < dim; i += kWarp * VEC) {
      const auto p = *reinterpret_cast<const Pack<T, VEC>*>(row + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const auto x = static_cast<acc_t>(p.v[j]);
        sum += x * w[i + j];
        if constexpr (NORM) sumsq += x * x;
      }
    }
    sum = warp_sum(sum);
    if constexpr (NORM) sum *= rstd(warp_sum(sumsq), dim, eps);
    if (lane == 0) {
      if (per_sequence) {
        logits[r] = mask[r] ? sum : acc_t(0);
      } else {
        const acc_t s = sigmoid(sum);
        scores[r] = static_cast<float>(s);
        keep[r] = mask[r] && s >= thr;
      }
    }
  }
}

// One block per sequence: score = sigmoid(mean of the real tokens' logits) (= sigmoid(mean(z) . w)).
template <typename acc_t>
__global__ void router_sequence_kernel(const acc_t* __restrict__ logits, const bool* __restrict__ mask,
                                       int64_t seq, acc_t thr, float* __restrict__ scores,
                                       bool* __restrict__ keep) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ acc_t score;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * seq;
  double sum = 0.0, count = 0.0;
  for (int64_t n = threadIdx.x; n < seq; n += kThreads) {
    sum += static_cast<double>(logits[base + n]);
    count += mask[base + n];
  }
  sum = Reduce(temp).Sum(sum);
  __syncthreads();
  count = Reduce(temp).Sum(count);
  if (threadIdx.x == 0) score = sigmoid(static_cast<acc_t>(sum / fmax(count, 1.0)));
  __syncthreads();
  for (int64_t n = threadIdx.x; n < seq; n += kThreads) {
    scores[base + n] = static_cast<float>(score);
    keep[base + n] = mask[base + n] && score >= thr;
  }
}

void router(const Tensor& z, const Tensor& weight, const std::optional<Tensor>& gamma, double eps, const Tensor& mask,
            double threshold, bool per_sequence, Tensor& scores, Tensor& keep) {
  check_router(z, weight, gamma, eps, mask, threshold, scores, keep);
  const c10::cuda::CUDAGuard guard(z.device());
  const Tensor zc = z.contiguous();
  const Tensor mc = mask.contiguous();
  const int64_t batch = z.size(0), seq = z.size(1), dim = z.size(2), rows = batch * seq;
  if (rows == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mindskip_router_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    Tensor w = weight.reshape(-1).to(acc_type);
    w = (gamma.has_value() ? w.mul(gamma->to(acc_type)) : w).contiguous();
    const Tensor logits = per_sequence ? at::empty({rows}, z.options().dtype(acc_type)) : Tensor();
    acc_t* lp = per_sequence ? logits.mutable_data_ptr<acc_t>() : nullptr;
    const auto thr = static_cast<acc_t>(threshold);
    const int64_t grid = grid_for(rows * kWarp, kThreads);
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(zc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), eps,
                                            mc.const_data_ptr<bool>(), rows, dim, per_sequence, thr,
                                            scores.mutable_data_ptr<float>(), keep.mutable_data_ptr<bool>(), lp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    const bool vec = vec_ok(zc.const_data_ptr(), dim, sizeof(scalar_t), kVec);
    if (gamma.has_value()) {
      vec ? launch(router_token_kernel<scalar_t, acc_t, kVec, true>)
          : launch(router_token_kernel<scalar_t, acc_t, 1, true>);
    } else {
      vec ? launch(router_token_kernel<scalar_t, acc_t, kVec, false>)
          : launch(router_token_kernel<scalar_t, acc_t, 1, false>);
    }
    if (per_sequence) {
      router_sequence_kernel<acc_t><<<batch, kThreads, 0, stream>>>(
          lp, mc.const_data_ptr<bool>(), seq, thr, scores.mutable_data_ptr<float>(), keep.mutable_data_ptr<bool>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ---- compaction ------------------------------------------------------------------------------------------

// cu_seqlens[b + 1] = kept tokens of sequence b (one block per sequence).
__global__ void count_kernel(const bool* __restrict__ keep, int64_t seq, int32_t* __restrict__ cu) {
  using Reduce = cub::BlockReduce<int32_t, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * seq;
  int32_t count = 0;
  for (int64_t n = threadIdx.x; n < seq; n += kThreads) count += keep[base + n];
  count = Reduce(temp).Sum(count);
  if (threadIdx.x == 0) {
    cu[blockIdx.x + 1] = count;
    if (blockIdx.x == 0) cu[0] = 0;
  }
}

// In-place inclusive scan of cu[1..batch] by one block, kThreads sequences at a time.
__global__ void scan_kernel(int32_t* __restrict__ cu, int64_t batch) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  int32_t carry = 0;
  for (int64_t base = 0; base < batch; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    int32_t incl, total;
    Scan(temp).InclusiveSum(i < batch ? cu[i + 1] : 0, incl, total);
    if (i < batch) cu[i + 1] = carry + incl;
    carry += total;
    __syncthreads();
  }
}

// One block per sequence: a block scan of the keep flags gives each kept token its packed slot.
template <typename index_t>
__global__ void compact_kernel(const bool* __restrict__ keep, const index_t* __restrict__ pos, int64_t ps0,
                               int64_t ps1, int64_t seq, const int32_t* __restrict__ cu, int64_t total,
                               int64_t* __restrict__ indices, int64_t* __restrict__ positions) {
  using Scan = cub::BlockScan<int32_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t b = blockIdx.x;
  int64_t slot = cu[b];
  for (int64_t base = 0; base < seq; base += kThreads) {
    const int64_t n = base + threadIdx.x;
    const int32_t flag = n < seq && keep[b * seq + n];
    int32_t before, kept;
    Scan(temp).ExclusiveSum(flag, before, kept);
    if (flag && slot + before < total) {  // bound: indices has exactly cu[-1] entries when called correctly
      indices[slot + before] = b * seq + n;
      positions[slot + before] = static_cast<int64_t>(pos[b * ps0 + n * ps1]);
    }
    slot += kept;
    __syncthreads();
  }
}

void compact_counts(const Tensor& keep, Tensor& cu_seqlens) {
  check_compact_counts(keep, cu_seqlens);
  const c10::cuda::CUDAGuard guard(keep.device());
  const Tensor kc = keep.contiguous();
  const int64_t batch = keep.size(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (batch == 0) {
    cu_seqlens.zero_();
    return;
  }
  count_kernel<<<batch, kThreads, 0, stream>>>(kc.const_data_ptr<bool>(), keep.size(1),
                                                cu_seqlens.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_kernel<<<1, kThreads, 0, stream>>>(cu_seqlens.mutable_data_ptr<int32_t>(), batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void compact(const Tensor& keep, const Tensor& position_ids, const Tensor& cu_seqlens, Tensor& indices,
             Tensor& positions) {
  check_compact(keep, position_ids, cu_seqlens, indices, positions);
  const c10::cuda::CUDAGuard guard(keep.device());
  const Tensor kc = keep.contiguous();
  const int64_t batch = keep.size(0);
  if (batch == 0 || indices.numel() == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(position_ids.scalar_type(), "mindskip_compact_cuda", [&] {
    compact_kernel<index_t><<<batch, kThreads, 0, stream>>>(
        kc.const_data_ptr<bool>(), position_ids.const_data_ptr<index_t>(), position_ids.stride(0),
        position_ids.stride(1), keep.size(1), cu_seqlens.const_data_ptr<int32_t>(), indices.size(0),
        indices.mutable_data_ptr<int64_t>(), positions.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- gather / scatter-add --------------------------------------------------------------------------------

// out row t = x row indices[t], moved in units of V (16 bytes where alignment allows); dtype-agnostic.
template <typename V>
__global__ void gather_kernel(const char* __restrict__ src, int64_t src_stride, const int64_t* __restrict__ idx,
                              int64_t total, int64_t rows, int64_t vecs, V* __restrict__ dst) {
  const int64_t n = total * vecs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / vecs;
    const int64_t r = idx[t];
    CUDA_KERNEL_ASSERT(r >= 0 && r < rows);
    dst[i] = reinterpret_cast<const V*>(src + r * src_stride)[i - t * vecs];
  }
}

template <typename V>
void launch_gather(const Tensor& xc, const Tensor& ic, Tensor& out, int64_t row_bytes) {
  const int64_t total = ic.size(0), vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  gather_kernel<V><<<grid_for(total * vecs, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const char*>(xc.const_data_ptr()), xc.stride(0) * xc.element_size(), ic.const_data_ptr<int64_t>(),
      total, xc.size(0), vecs, static_cast<V*>(out.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gather(const Tensor& x, const Tensor& indices, Tensor& out) {
  check_gather(x, indices, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const Tensor ic = indices.contiguous();
  const int64_t row_bytes = x.size(1) * x.element_size();
  if (out.numel() == 0) return;
  // widest unit dividing the row length, the source row stride and both base addresses
  const auto fits = [&](int64_t w) {
    return row_bytes % w == 0 && (xc.stride(0) * xc.element_size()) % w == 0 &&
           reinterpret_cast<uintptr_t>(xc.const_data_ptr()) % w == 0 &&
           reinterpret_cast<uintptr_t>(out.const_data_ptr()) % w == 0;
  };
  if (fits(16)) {
    launch_gather<uint4>(xc, ic, out, row_bytes);
  } else if (fits(8)) {
    launch_gather<uint2>(xc, ic, out, row_bytes);
  } else if (fits(4)) {
    launch_gather<uint32_t>(xc, ic, out, row_bytes);
  } else if (fits(2)) {
    launch_gather<uint16_t>(xc, ic, out, row_bytes);
  } else {
    launch_gather<uint8_t>(xc, ic, out, row_bytes);
  }
}

// One warp per packed row: RMS statistic of x[indices[t]], then the normalized row (fp32 math, one rounding).
template <typename T, int VEC>
__global__ void gather_norm_kernel(const T* __restrict__ x, const at::opmath_type<T>* __restrict__ gamma, double eps,
                                   const int64_t* __restrict__ idx, int64_t total, int64_t rows, int64_t dim,
                                   T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t t = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; t < total; t += warps) {
    const int64_t r = idx[t];
    CUDA_KERNEL_ASSERT(r >= 0 && r < rows);
    const T* row = x + r * dim;
    acc_t sumsq = 0;
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < dim; i += kWarp * VEC) {
      const P p = *reinterpret_cast<const P*>(row + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sumsq += static_cast<acc_t>(p.v[j]) * static_cast<acc_t>(p.v[j]);
    }
    const acc_t rs = rstd(warp_sum(sumsq), dim, eps);
    for (int64_t i = static_cast<int64_t>(lane) * VEC; i < dim; i += kWarp * VEC) {  // second read hits L1/L2
      P p = *reinterpret_cast<const P*>(row + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<T>(static_cast<acc_t>(p.v[j]) * rs * gamma[i + j]);
      *reinterpret_cast<P*>(out + t * dim + i) = p;
    }
  }
}

void gather_norm(const Tensor& x, const Tensor& gamma, double eps, const Tensor& indices, Tensor& out) {
  check_gather_norm(x, gamma, eps, indices, out);
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor xc = x.contiguous(), ic = indices.contiguous();
  const int64_t total = indices.size(0), dim = x.size(1);
  if (out.numel() == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mindskip_gather_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const Tensor g = gamma.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    auto launch = [&](auto kernel) {
      kernel<<<grid_for(total * kWarp, kThreads), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(), eps, ic.const_data_ptr<int64_t>(), total,
          x.size(0), dim, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec_ok(xc.const_data_ptr(), dim, sizeof(scalar_t), kVec) &&
        vec_ok(out.const_data_ptr(), dim, sizeof(scalar_t), kVec)) {
      launch(gather_norm_kernel<scalar_t, kVec>);
    } else {
      launch(gather_norm_kernel<scalar_t, 1>);
    }
  });
}

constexpr int kMaxRowsPerBlock = 64;

// A block owns rows [r0, r0 + rows_per_block): each of its rows finds its packed slot (binary search in the
// ascending indices), then every output element is written once: residual, or residual + scale * value
// rounded like `residual + (values * scale)` in T.
template <typename T, int VEC>
__global__ void scatter_add_kernel(const T* __restrict__ res, const T* __restrict__ val,
                                   const int64_t* __restrict__ idx, const T* __restrict__ scale, int64_t total,
                                   int64_t rows, int64_t dim, int rows_per_block, T* __restrict__ out) {
  using acc_t = at::opmath_type<T>;
  using P = Pack<T, VEC>;
  __shared__ int64_t slot[kMaxRowsPerBlock];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  if (threadIdx.x < rows_per_block) {
    const int64_t r = r0 + threadIdx.x;
    int64_t lo = 0, hi = total;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (idx[mid] < r) lo = mid + 1; else hi = mid;
    }
    slot[threadIdx.x] = lo < total && idx[lo] == r ? lo : -1;
  }
  __syncthreads();
  const int64_t vecs = dim / VEC;
  const int64_t n = min(static_cast<int64_t>(rows_per_block), rows - r0) * vecs;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const int64_t local = i / vecs, col = (i - local * vecs) * VEC, r = r0 + local;
    P a = *reinterpret_cast<const P*>(res + r * dim + col);
    const int64_t t = slot[local];
    if (t >= 0) {
      const P v = *reinterpret_cast<const P*>(val + t * dim + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const T add = scale ? static_cast<T>(mul_rn(static_cast<acc_t>(v.v[k]), static_cast<acc_t>(scale[t])))
                            : v.v[k];
        a.v[k] = static_cast<T>(add_rn(static_cast<acc_t>(a.v[k]), static_cast<acc_t>(add)));
      }
    }
    *reinterpret_cast<P*>(out + r * dim + col) = a;
  }
}

// Device-side check of the scatter-add contract (no host sync): indices strictly ascending, in range.
__global__ void check_ascending_kernel(const int64_t* __restrict__ idx, int64_t total, int64_t rows) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    CUDA_KERNEL_ASSERT(idx[t] >= 0 && idx[t] < rows && (t == 0 || idx[t] > idx[t - 1]));
  }
}

void scatter_add(const Tensor& residual, const Tensor& values, const Tensor& indices,
                 const std::optional<Tensor>& scale, Tensor& out) {
  check_scatter_add(residual, values, indices, scale, out);
  const c10::cuda::CUDAGuard guard(residual.device());
  const Tensor rc = residual.contiguous(), vc = values.contiguous(), ic = indices.contiguous();
  const Tensor sc = scale.has_value() ? scale->to(residual.scalar_type()).contiguous() : Tensor();
  const int64_t rows = residual.size(0), dim = residual.size(1), total = indices.size(0);
  if (out.numel() == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (total > 0) {
    check_ascending_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(ic.const_data_ptr<int64_t>(), total,
                                                                               rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "mindskip_scatter_add_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = vec_ok(rc.const_data_ptr(), dim, sizeof(scalar_t), kVec) &&
                     vec_ok(vc.const_data_ptr(), dim, sizeof(scalar_t), kVec) &&
                     vec_ok(out.const_data_ptr(), dim, sizeof(scalar_t), kVec);
    const int64_t vecs = vec ? dim / kVec : dim;
    const auto rows_per_block = static_cast<int>(std::clamp<int64_t>(ceil_div<int64_t>(2048, vecs), 1,
                                                                    kMaxRowsPerBlock));
    const int64_t grid = ceil_div<int64_t>(rows, rows_per_block);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(rc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                                            ic.const_data_ptr<int64_t>(),
                                            sc.defined() ? sc.const_data_ptr<scalar_t>() : nullptr, total, rows, dim,
                                            rows_per_block, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      launch(scatter_add_kernel<scalar_t, kVec>);
    } else {
      launch(scatter_add_kernel<scalar_t, 1>);
    }
  });
}

}  // namespace
}  // namespace mindskip::cuda

TORCH_LIBRARY_IMPL(mindskip, CUDA, m) {
  m.impl("router", &mindskip::cuda::router);
  m.impl("compact_counts", &mindskip::cuda::compact_counts);
  m.impl("compact", &mindskip::cuda::compact);
  m.impl("gather", &mindskip::cuda::gather);
  m.impl("gather_norm", &mindskip::cuda::gather_norm);
  m.impl("scatter_add", &mindskip::cuda::scatter_add);
}
