// Inner loops shared by the CPU kernels, written so GCC vectorises them at -O3 (independent partial sums).
#pragma once

#include <cmath>
#include <cstdint>

namespace mindskip::cpu {

// sum_i acc_t(a[i]) * w[i], accumulated in acc_t over kLanes independent partial sums.
template <typename acc_t, typename T>
inline acc_t dot(const T* __restrict__ a, const acc_t* __restrict__ w, int64_t n) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += static_cast<acc_t>(a[i + l]) * w[i + l];
  }
  acc_t sum = 0;
  for (; i < n; ++i) sum += static_cast<acc_t>(a[i]) * w[i];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

}  // namespace mindskip::cpu
