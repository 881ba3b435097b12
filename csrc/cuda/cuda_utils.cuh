// Device helpers shared by the CUDA kernels: warp reductions, vector packs, launch sizing.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace mindskip::cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// VEC consecutive elements moved as one aligned load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Exactly rounded fp32/fp64 multiply and add: no FMA contraction, so results match PyTorch bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Sigmoid in fp64: precise whatever the fast-math flags, and only one per token or sequence.
template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return static_cast<acc_t>(1.0 / (1.0 + ::exp(-static_cast<double>(x))));
}

// True when a tensor's data and row length allow VEC-element aligned accesses.
inline bool vec_ok(const void* ptr, int64_t row_elems, int64_t elem_size, int vec) {
  const int64_t bytes = static_cast<int64_t>(vec) * elem_size;
  return row_elems % vec == 0 && reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Blocks for a grid-stride loop: enough to fill the device a few times over, never more than the work.
inline int64_t grid_for(int64_t work_items, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (work_items + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * 32));
}

}  // namespace mindskip::cuda
