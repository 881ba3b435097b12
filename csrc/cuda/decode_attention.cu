// Decode attention on CUDA: one query token per sequence against its KV cache of ragged length.
//
// Split-K (flash-decoding): the cache length is cut into `splits` chunks so that even batch 1 fills the
// GPU. A block owns (sequence, KV head, up to kHeads query heads of that KV head's GQA group, chunk):
// each K/V row is loaded once for the whole group. Its kWarps warps stride over the chunk's keys with
// an online softmax per query head (lane l holds elements l, l+32, ... of the head dim), merge in shared
// memory and write (max, sum, unnormalised output) partials; a second kernel merges the splits. The
// split count depends only on shapes (cache capacity, batch, heads), never on cache_seqlens: no host sync,
// so a decode step can be captured in a CUDA graph. The cache is dense [B, S, Hkv, Dh] or a paged pool
// [num_blocks, block_size, Hkv, Dh] read through an int32 block table (vLLM / flash-attention layout): the
// same kernel, rows addressed through `Paging` (a dense cache is the identity table). A sequence of length 0
// (a skipped row of a routed decode step) reads no K/V and gets zeros.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>

#include "../mindskip.h"
#include "cuda_utils.cuh"

namespace mindskip::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kHeads = 4;       // query heads per block (a GQA group is split across blocks if larger)
constexpr int kMinChunk = 64;   // keys per split at least

struct CacheLayout {
  int64_t b, s, h;  // element strides of [B or num_blocks, S or block_size, Hkv, Dh] (last dim contiguous)
};

// Partials: part[((b * hq + head) * splits + split) * (dh + 2) + {0: max, 1: sum, 2..: output}].
template <typename T, int PER_LANE>
__global__ void __launch_bounds__(kWarps * kWarp)
decode_split_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, CacheLayout kl,
                    CacheLayout vl, Paging paging, const int64_t* __restrict__ lens, int64_t cap, int hq, int hkv,
                    int dh, int64_t chunk, float scale, float* __restrict__ part) {
  __shared__ float s_max[kWarps][kHeads], s_sum[kWarps][kHeads];
  __shared__ float s_acc[kWarps][kHeads][kMaxHeadDim];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int group = hq / hkv, head_blocks = ceil_div(group, kHeads);
  const int b = blockIdx.z, kvh = blockIdx.y / head_blocks;
  const int h0 = kvh * group + (blockIdx.y % head_blocks) * kHeads;
  const int nh = min(kHeads, kvh * group + group - h0);
  const int splits = gridDim.x, split = blockIdx.x;
  const int64_t len = min(max(lens[b], int64_t(0)), cap);
  const int64_t s0 = split * chunk, s1 = min(s0 + chunk, len);

  float qr[kHeads][PER_LANE], acc[kHeads][PER_LANE], m[kHeads], l[kHeads];
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    m[h] = -FLT_MAX;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int d = lane + i * kWarp;
      qr[h][i] = h < nh && d < dh ? static_cast<float>(q[(static_cast<int64_t>(b) * hq + h0 + h) * dh + d]) : 0.f;
      acc[h][i] = 0.f;
    }
  }
  for (int64_t s = s0 + warp; s < s1; s += kWarps) {
    const T* krow = k + paging.row_offset(b, s, kl.b, kl.s) + kvh * kl.h;
    const T* vrow = v + paging.row_offset(b, s, vl.b, vl.s) + kvh * vl.h;
    float kr[PER_LANE], vr[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int d = lane + i * kWarp;
      kr[i] = d < dh ? static_cast<float>(krow[d]) : 0.f;
      vr[i] = d < dh ? static_cast<float>(vrow[d]) : 0.f;
    }
#pragma unroll
    for (int h = 0; h < kHeads; ++h) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) dot += qr[h][i] * kr[i];
      const float logit = warp_sum(dot) * scale;
      const float m_new = fmaxf(m[h], logit);
      const float corr = expf(m[h] - m_new), p = expf(logit - m_new);
      l[h] = l[h] * corr + p;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) acc[h][i] = acc[h][i] * corr + p * vr[i];
      m[h] = m_new;
    }
  }
  // merge the warps of this block
#pragma unroll
  for (int h = 0; h < kHeads; ++h) {
    if (lane == 0) {
      s_max[warp][h] = m[h];
      s_sum[warp][h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int d = lane + i * kWarp;
      if (d < dh) s_acc[warp][h][d] = acc[h][i];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nh * (dh + 2); e += blockDim.x) {
    const int h = e / (dh + 2), c = e % (dh + 2);
    float mx = -FLT_MAX;
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_max[w][h]);
    float val = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float wt = s_sum[w][h] > 0.f ? expf(s_max[w][h] - mx) : 0.f;  // empty warps weigh nothing
      val += wt * (c == 1 ? s_sum[w][h] : c >= 2 ? s_acc[w][h][c - 2] : 0.f);
    }
    part[((static_cast<int64_t>(b) * hq + h0 + h) * splits + split) * (dh + 2) + c] = c == 0 ? mx : val;
  }
}

// out[b, head] = sum_split w_split * acc_split / sum_split w_split * l_split; zeros when no key was seen.
template <typename T>
__global__ void decode_merge_kernel(const float* __restrict__ part, int splits, int dh, T* __restrict__ out) {
  const int64_t row = blockIdx.x;  // b * hq + head
  const float* p = part + row * splits * (dh + 2);
  float mx = -FLT_MAX;
  for (int s = 0; s < splits; ++s) mx = p[s * (dh + 2) + 1] > 0.f ? fmaxf(mx, p[s * (dh + 2)]) : mx;
  float denom = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float l = p[s * (dh + 2) + 1];
    denom += l > 0.f ? l * expf(p[s * (dh + 2)] - mx) : 0.f;
  }
  for (int d = threadIdx.x; d < dh; d += blockDim.x) {
    float num = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float l = p[s * (dh + 2) + 1];
      num += l > 0.f ? p[s * (dh + 2) + 2 + d] * expf(p[s * (dh + 2)] - mx) : 0.f;
    }
    out[row * dh + d] = static_cast<T>(denom > 0.f ? num / denom : 0.f);
  }
}

void decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                      const std::optional<Tensor>& block_table, double softmax_scale, Tensor& out) {
  check_decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, out);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), hq = q.size(1), dh = q.size(2), hkv = k_cache.size(2);
  if (out.numel() == 0) return;
  const Tensor qc = q.contiguous();
  const Tensor lens = cache_seqlens.to(at::kLong).contiguous();  // on the device: no sync
  const Tensor table = block_table ? block_table->contiguous() : Tensor();
  const std::pair<Paging, int64_t> layout = make_paging(k_cache, table);  // shapes only
  const Paging paging = layout.first;
  const int64_t cap = layout.second;
  const int64_t head_blocks = ceil_div<int64_t>(hq / hkv, kHeads);
  TORCH_CHECK_VALUE(batch <= 65535 && hkv * head_blocks <= 65535,
                    "mindskip.decode_attention: batch and heads must be at most 65535 blocks, got batch ", batch);
  // enough blocks for ~2 waves, chunks of at least kMinChunk keys
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t base = batch * hkv * head_blocks;
  const int64_t splits = std::clamp<int64_t>(ceil_div<int64_t>(2 * sms, base), 1,
                                             std::max<int64_t>(1, ceil_div<int64_t>(cap, kMinChunk)));
  const int64_t chunk = std::max<int64_t>(1, ceil_div<int64_t>(std::max<int64_t>(cap, 1), splits));
  Tensor part = at::empty({batch, hq, splits, dh + 2}, q.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(hkv * head_blocks),
                  static_cast<unsigned>(batch));
  const CacheLayout kl{k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const CacheLayout vl{v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mindskip_decode_attention_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<grid, kWarps * kWarp, 0, stream>>>(
          qc.const_data_ptr<scalar_t>(), k_cache.const_data_ptr<scalar_t>(), v_cache.const_data_ptr<scalar_t>(), kl,
          vl, paging, lens.const_data_ptr<int64_t>(), cap, static_cast<int>(hq), static_cast<int>(hkv),
          static_cast<int>(dh), chunk, static_cast<float>(softmax_scale), part.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dh <= 32) {
      launch(decode_split_kernel<scalar_t, 1>);
    } else if (dh <= 64) {
      launch(decode_split_kernel<scalar_t, 2>);
    } else if (dh <= 128) {
      launch(decode_split_kernel<scalar_t, 4>);
    } else {
      launch(decode_split_kernel<scalar_t, kMaxHeadDim / kWarp>);
    }
    decode_merge_kernel<scalar_t><<<batch * hq, 128, 0, stream>>>(part.const_data_ptr<float>(),
                                                                   static_cast<int>(splits), static_cast<int>(dh),
                                                                   out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace mindskip::cuda

TORCH_LIBRARY_IMPL(mindskip, CUDA, m) { m.impl("decode_attention", &mindskip::cuda::decode_attention); }
