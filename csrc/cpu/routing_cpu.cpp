// CPU kernels of the routing pipeline: router, compaction, gather, scatter-add (at::parallel_for).
//
// Each replaces a sequence of PyTorch ops of the reference backend with one pass over the data: the
// router reads z once (no fp32 copy), compaction needs no nonzero(), scatter-add writes each output row
// once (copy or add) instead of clone + index_add.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../mindskip.h"
#include "cpu_utils.h"

namespace mindskip::cpu {
namespace {

// Rows per parallel task: about 32 KiB of row data, so small inputs run on one thread.
int64_t row_grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

// RMSNorm statistics: 1 / sqrt(mean(x^2) + eps).
template <typename acc_t>
acc_t rstd(acc_t sumsq, int64_t dim, double eps) {
  return acc_t(1) / std::sqrt(sumsq / static_cast<acc_t>(dim) + static_cast<acc_t>(eps));
}

// The router logit of one row: z . w, or with gamma (w = gamma * w folded) rstd(z) * (z . w).
template <typename acc_t, typename T>
acc_t row_logit(const T* row, const acc_t* w, int64_t dim, bool norm, double eps) {
  if (!norm) return dot(row, w, dim);
  const auto [d, sq] = dot_sumsq(row, w, dim);
  return d * rstd(sq, dim, eps);
}

void router(const Tensor& z, const Tensor& weight, const std::optional<Tensor>& gamma, double eps, const Tensor& mask,
            double threshold, bool per_sequence, Tensor& scores, Tensor& keep) {
  check_router(z, weight, gamma, eps, mask, threshold, scores, keep);
  const Tensor zc = z.contiguous();
  const Tensor mc = mask.contiguous();
  const int64_t batch = z.size(0), seq = z.size(1), dim = z.size(2), rows = batch * seq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "mindskip_router_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    Tensor w = weight.reshape(-1).to(acc_type);
    w = (gamma.has_value() ? w.mul(gamma->to(acc_type)) : w).contiguous();
    const bool norm = gamma.has_value();
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const bool* mp = mc.const_data_ptr<bool>();
    float* sp = scores.mutable_data_ptr<float>();
    bool* kp = keep.mutable_data_ptr<bool>();
    const auto thr = static_cast<acc_t>(threshold);  // compared in the compute dtype, like the reference
    if (!per_sequence) {
      at::parallel_for(0, rows, row_grain(dim), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const acc_t s = sigmoid(row_logit(zp + r * dim, wp, dim, norm, eps));
          sp[r] = static_cast<float>(s);
          kp[r] = mp[r] && s >= thr;
        }
      });
      return;
    }
    // mean_t(z_t) . w == mean_t(z_t . w): per-token logits, then a masked mean per sequence.
    std::vector<acc_t> logits(rows);
    at::parallel_for(0, rows, row_grain(dim), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) logits[r] = mp[r] ? row_logit(zp + r * dim, wp, dim, norm, eps) : acc_t(0);
    });
    at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / std::max<int64_t>(seq, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        double sum = 0.0;
        int64_t count = 0;
        for (int64_t n = b * seq; n < (b + 1) * seq; ++n) {
          sum += static_cast<double>(logits[n]);
          count += mp[n];
        }
        const acc_t s = sigmoid(static_cast<acc_t>(sum / static_cast<double>(std::max<int64_t>(count, 1))));
        for (int64_t n = b * seq; n < (b + 1) * seq; ++n) {
          sp[n] = static_cast<float>(s);
          kp[n] = mp[n] && s >= thr;
        }
      }
    });
  });
}

void compact_counts(const Tensor& keep, Tensor& cu_seqlens) {
  check_compact_counts(keep, cu_seqlens);
  const Tensor kc = keep.contiguous();
  const int64_t batch = keep.size(0), seq = keep.size(1);
  const bool* kp = kc.const_data_ptr<bool>();
  int32_t* cu = cu_seqlens.mutable_data_ptr<int32_t>();
  at::parallel_for(0, batch, std::max<int64_t>(1, 65536 / std::max<int64_t>(seq, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int32_t count = 0;
      for (int64_t n = 0; n < seq; ++n) count += kp[b * seq + n];
      cu[b + 1] = count;
    }
  });
  cu[0] = 0;
  for (int64_t b = 0; b < batch; ++b) cu[b + 1] += cu[b];
}

void compact(const Tensor& keep, const Tensor& position_ids, const Tensor& cu_seqlens, Tensor& indices,
             Tensor& positions) {
  check_compact(keep, position_ids, cu_seqlens, indices, positions);
  const Tensor kc = keep.contiguous();
  const int64_t batch = keep.size(0), seq = keep.size(1), total = indices.size(0);
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu[batch] == total, "mindskip.compact: indices and positions must have cu_seqlens[-1] = ",
                    cu[batch], " entries, got ", total);
  const bool* kp = kc.const_data_ptr<bool>();
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  int64_t* pp = positions.mutable_data_ptr<int64_t>();
  const int64_t ps0 = position_ids.stride(0), ps1 = position_ids.stride(1);  // may be an expanded view
  AT_DISPATCH_INDEX_TYPES(position_ids.scalar_type(), "mindskip_compact_cpu", [&] {
    const index_t* pos = position_ids.const_data_ptr<index_t>();
    at::parallel_for(0, batch, std::max<int64_t>(1, 16384 / std::max<int64_t>(seq, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        int64_t o = cu[b];
        const int64_t end = cu[b + 1];
        for (int64_t n = 0; n < seq; ++n) {
          if (!kp[b * seq + n]) continue;
          TORCH_CHECK_VALUE(o < end, "mindskip.compact: cu_seqlens does not match keep (sequence ", b, ")");
          ip[o] = b * seq + n;
          pp[o] = static_cast<int64_t>(pos[b * ps0 + n * ps1]);
          ++o;
        }
        TORCH_CHECK_VALUE(o == end, "mindskip.compact: cu_seqlens does not match keep (sequence ", b, ")");
      }
    });
  });
}

void gather(const Tensor& x, const Tensor& indices, Tensor& out) {
  check_gather(x, indices, out);
  const Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const Tensor ic = indices.contiguous();
  const int64_t rows = x.size(0), total = indices.size(0);
  const int64_t row_bytes = x.size(1) * x.element_size(), src_stride = xc.stride(0) * x.element_size();
  const auto* src = static_cast<const char*>(xc.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, total, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = ip[t];
      TORCH_CHECK_VALUE(r >= 0 && r < rows, "mindskip.gather: indices[", t, "] = ", r, " is out of range for x with ",
                        rows, " rows");
      std::memcpy(dst + t * row_bytes, src + r * src_stride, row_bytes);
    }
  });
}

void gather_norm(const Tensor& x, const Tensor& gamma, double eps, const Tensor& indices, Tensor& out) {
  check_gather_norm(x, gamma, eps, indices, out);
  const Tensor xc = x.contiguous();
  const Tensor ic = indices.contiguous();
  const int64_t rows = x.size(0), dim = x.size(1), total = indices.size(0);
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mindskip_gather_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tensor g = gamma.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, total, row_grain(dim), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = ip[t];
        TORCH_CHECK_VALUE(r >= 0 && r < rows, "mindskip.gather_norm: indices[", t, "] = ", r,
                          " is out of range for x with ", rows, " rows");
        const scalar_t* src = xp + r * dim;
        norm_row(src, gp, rstd(dot_sumsq(src, gp, dim).second, dim, eps), op + t * dim, dim);
      }
    });
  });
}

// indices must be strictly ascending and in [0, rows): the kernel merges them with the row range.
void check_ascending(const int64_t* ip, int64_t total, int64_t rows) {
  at::parallel_for(0, total, 65536, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      TORCH_CHECK_VALUE(ip[t] >= 0 && ip[t] < rows && (t == 0 || ip[t] > ip[t - 1]),
                        "mindskip.scatter_add: indices must be strictly ascending row numbers in [0, ", rows,
                        "), got indices[", t, "] = ", ip[t]);
    }
  });
}

void scatter_add(const Tensor& residual, const Tensor& values, const Tensor& indices,
                 const std::optional<Tensor>& scale, Tensor& out) {
  check_scatter_add(residual, values, indices, scale, out);
  const Tensor rc = residual.contiguous();
  const Tensor vc = values.contiguous();
  const Tensor ic = indices.contiguous();
  const int64_t rows = residual.size(0), dim = residual.size(1), total = indices.size(0);
  const int64_t* ip = ic.const_data_ptr<int64_t>();
  check_ascending(ip, total, rows);
  // the gate is rounded to the tensor dtype first, like `values * scale.to(values.dtype)`
  const Tensor sc = scale.has_value() ? scale->to(residual.scalar_type()).contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, residual.scalar_type(), "mindskip_scatter_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    const scalar_t* sp = sc.defined() ? sc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(dim), [&](int64_t r0, int64_t r1) {
      int64_t t = std::lower_bound(ip, ip + total, r0) - ip;  // first kept row at or after r0
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* res = rp + r * dim;
        scalar_t* dst = op + r * dim;
        if (t == total || ip[t] != r) {
          std::memcpy(dst, res, dim * sizeof(scalar_t));
          continue;
        }
        const acc_t gate = sp != nullptr ? static_cast<acc_t>(sp[t]) : acc_t(0);
        add_row(res, vp + t * dim, sp != nullptr ? &gate : nullptr, dst, dim);
        ++t;
      }
    });
  });
}

}  // namespace
}  // namespace mindskip::cpu

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("router", &mindskip::cpu::router);
  m.impl("compact_counts", &mindskip::cpu::compact_counts);
  m.impl("compact", &mindskip::cpu::compact);
  m.impl("gather", &mindskip::cpu::gather);
  m.impl("gather_norm", &mindskip::cpu::gather_norm);
  m.impl("scatter_add", &mindskip::cpu::scatter_add);
}
