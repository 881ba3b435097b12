// CPU attention kernels: decode (one query per sequence against a ragged KV cache, dense or paged through a
// block table: a group of query heads sharing one KV head (GQA) attends to the cached rows, fp32/fp64
// accumulation, parallel over sequences and KV heads) and varlen (packed sequences, optionally causal aligned
// bottom-right or up to a per-query key position: blocked GEMMs per sequence; keys packed too, or read from a
// paged pool for chunked prefill).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <limits>
#include <vector>

#include "../mindskip.h"
#include "cpu_utils.h"

namespace mindskip::cpu {
namespace {

// Rows of keys/values for one (sequence, KV head): row s at base + paging.row_offset(seq, s, ...), so a dense
// cache and a paged pool share one loop.
template <typename T>
struct Rows {
  const T* base;  // the cache's data offset to the KV head
  Paging paging;
  int64_t seq, block_stride, row_stride;

  const T* row(int64_t s) const { return base + paging.row_offset(seq, s, block_stride, row_stride); }
};

// Query heads q[j * dh ...] (j < group) attend to keys/values 0..n-1; writes out[j * dh ...]. n == 0 gives
// zeros and reads no cache. `buf` is per-thread scratch.
template <typename T, typename acc_t>
void attend(const T* q, int64_t group, Rows<T> k, Rows<T> v, int64_t n, int64_t dh, acc_t scale, T* out,
            std::vector<acc_t>& buf) {
  if (n == 0) {
    std::fill(out, out + group * dh, T(0));
    return;
  }
  buf.assign(group * (2 * dh + n), acc_t(0));
  acc_t* qf = buf.data();          // [group, dh] queries in acc_t
  acc_t* acc = qf + group * dh;    // [group, dh] weighted sum of values
  acc_t* prob = acc + group * dh;  // [group, n] logits, then probabilities
  for (int64_t i = 0; i < group * dh; ++i) qf[i] = static_cast<acc_t>(q[i]);
  for (int64_t s = 0; s < n; ++s) {
    const T* krow = k.row(s);
    for (int64_t j = 0; j < group; ++j) prob[j * n + s] = dot(krow, qf + j * dh, dh) * scale;
  }
  for (int64_t j = 0; j < group; ++j) {
    acc_t* p = prob + j * n;
    const acc_t mx = *std::max_element(p, p + n);
    acc_t sum = 0;
    for (int64_t s = 0; s < n; ++s) sum += (p[s] = std::exp(p[s] - mx));
    const acc_t inv = acc_t(1) / sum;
    for (int64_t s = 0; s < n; ++s) p[s] *= inv;
  }
  for (int64_t s = 0; s < n; ++s) {
    const T* vrow = v.row(s);
    for (int64_t j = 0; j < group; ++j) {
      const acc_t p = prob[j * n + s];
      acc_t* a = acc + j * dh;
      for (int64_t d = 0; d < dh; ++d) a[d] += p * static_cast<acc_t>(vrow[d]);
    }
  }
  for (int64_t i = 0; i < group * dh; ++i) out[i] = static_cast<T>(acc[i]);
}

// Dense caches [B, S, Hkv, Dh], or with a block table pools [num_blocks, block_size, Hkv, Dh] (see Paging).
void decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                      const std::optional<Tensor>& block_table, double softmax_scale, Tensor& out) {
  check_decode_attention(q, k_cache, v_cache, cache_seqlens, block_table, out);
  const Tensor qc = q.contiguous();
  const Tensor lens = cache_seqlens.to(at::kLong).contiguous();
  const Tensor table = block_table ? block_table->contiguous() : Tensor();
  const std::pair<Paging, int64_t> layout = make_paging(k_cache, table);
  const Paging paging = layout.first;
  const int64_t cap = layout.second;
  const int64_t batch = q.size(0), hq = q.size(1), dh = q.size(2), hkv = k_cache.size(2);
  const int64_t group = hq / hkv;
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mindskip_decode_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * hkv, 1, [&](int64_t w0, int64_t w1) {
      std::vector<acc_t> buf;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / hkv, h = w % hkv;
        const int64_t n = std::clamp<int64_t>(lp[b], 0, cap);  // rows past the capacity do not exist
        const Rows<scalar_t> k{kp + h * k_cache.stride(2), paging, b, k_cache.stride(0), k_cache.stride(1)};
        const Rows<scalar_t> v{vp + h * v_cache.stride(2), paging, b, v_cache.stride(0), v_cache.stride(1)};
        const int64_t head = (b * hq + h * group) * dh;
        attend(qp + head, group, k, v, n, dh, static_cast<acc_t>(softmax_scale), op + head, buf);
      }
    });
  });
}

// cu_seqlens as int64 on the CPU, checked: non-decreasing from 0, ending at `rows` (at most `rows` unless exact).
Tensor checked_offsets(const Tensor& cu, const char* name, int64_t rows, bool exact) {
  Tensor c = cu.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t n = c.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(i == 0 ? p[0] == 0 : p[i] >= p[i - 1], "mindskip.varlen_attention: ", name,
                      " must be non-decreasing from 0, got ", name, "[", i, "] = ", p[i]);
  }
  TORCH_CHECK_VALUE(exact ? p[n - 1] == rows : p[n - 1] <= rows, "mindskip.varlen_attention: ", name,
                    " must end at ", exact ? "" : "most ", rows, " (rows of the packed tensor), got ", p[n - 1]);
  return c;
}

// Per sequence and block of kQueryBlock queries: the group's queries of each KV head as one GEMM against the
// keys the block can see (BLAS through at::bmm, fp32/fp64), masked causally, softmax, GEMM with V. Only real
// rows are computed (no padding to the longest sequence); scratch is bounded by the query block.
// `key_len(b)` is sequence b's number of keys, `keys(b, n)` its first n key and value rows as [n, Hkv, Dh].
// Causal is bottom-right, or with `positions` (int64 [Tq], one per packed query row) query row t sees keys
// 0..positions[t] (clamped to the sequence's keys; negative: none), in any order within the block.
template <typename KeyLen, typename Keys>
void varlen_blocks(const Tensor& q, const int64_t* cq, int64_t batch, int64_t hkv, KeyLen key_len, Keys keys,
                   bool causal, double softmax_scale, const Tensor& positions, Tensor& out) {
  constexpr int64_t kQueryBlock = 64;  // small enough that causal blocks skip most hidden keys
  const int64_t hq = q.size(1), dh = q.size(2), group = hq / hkv;
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const int64_t* pos = positions.defined() ? positions.const_data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len_q = cq[b + 1] - cq[b], len_k = key_len(b);
    for (int64_t q0 = 0; q0 < len_q; q0 += kQueryBlock) {
      const int64_t nq = std::min(kQueryBlock, len_q - q0);
      // the keys the block's furthest-seeing query sees: bottom-right, query i sees keys j <= i + len_k - len_q
      // (the block's last query the most), or keys j <= its position
      const int64_t seen = pos ? std::min(*std::max_element(pos + cq[b] + q0, pos + cq[b] + q0 + nq), len_k) + 1
                               : q0 + nq + len_k - len_q;
      const int64_t nk = causal ? std::clamp<int64_t>(seen, 0, len_k) : len_k;
      Tensor dst = out.narrow(0, cq[b] + q0, nq);
      if (nk == 0) {
        dst.zero_();
        continue;
      }
      // [hkv, nq * group, dh]: row r is query q0 + r / group, head h * group + r % group
      const Tensor qs = q.narrow(0, cq[b] + q0, nq).to(acc_type).view({nq, hkv, group, dh}).permute({1, 0, 2, 3})
                            .reshape({hkv, nq * group, dh});
      const auto [k_rows, v_rows] = keys(b, nk);
      const Tensor ks = k_rows.to(acc_type).transpose(0, 1);  // [hkv, nk, dh]
      const Tensor vs = v_rows.to(acc_type).transpose(0, 1);
      Tensor logits = at::bmm(qs, ks.transpose(1, 2)).mul_(softmax_scale);  // [hkv, nq * group, nk]
      if (causal) {
        // the last key each row r sees (keys past it are hidden)
        const Tensor last = pos ? positions.narrow(0, cq[b] + q0, nq).repeat_interleave(group).unsqueeze(1)
                                : at::arange(nq * group, logits.options().dtype(at::kLong)).div_(group, "floor")
                                      .add_(q0 + len_k - len_q).unsqueeze(1);
        const Tensor hidden = at::arange(nk, last.options()).unsqueeze(0).gt(last);  // [nq * group, nk]
        logits.masked_fill_(hidden, -std::numeric_limits<double>::infinity());
      }
      const Tensor probs = logits.softmax(-1).nan_to_num_(0.0);  // a query that sees no key -> zeros
      const Tensor o = at::bmm(probs, vs).view({hkv, nq, group, dh}).permute({1, 0, 2, 3}).reshape({nq, hq, dh});
      dst.copy_(o);
    }
  }
}

// The per-query key positions as int64 on the CPU, or an undefined tensor without them.
Tensor positions_long(const std::optional<Tensor>& query_positions) {
  return query_positions ? query_positions->to(at::kLong).contiguous() : Tensor();
}

void varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                      const Tensor& cu_seqlens_k, bool causal, double softmax_scale, Tensor& out,
                      const std::optional<Tensor>& query_positions) {
  check_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, out, query_positions);
  const Tensor cuq = checked_offsets(cu_seqlens_q, "cu_seqlens_q", q.size(0), true);
  const Tensor cuk = checked_offsets(cu_seqlens_k, "cu_seqlens_k", k.size(0), false);
  const int64_t* ck = cuk.const_data_ptr<int64_t>();
  varlen_blocks(q, cuq.const_data_ptr<int64_t>(), cuq.numel() - 1, k.size(1),
                [&](int64_t b) { return ck[b + 1] - ck[b]; },
                [&](int64_t b, int64_t n) { return std::pair{k.narrow(0, ck[b], n), v.narrow(0, ck[b], n)}; },
                causal, softmax_scale, positions_long(query_positions), out);
}

// Queries packed by cu_seqlens_q; sequence b's keys are rows 0..cache_seqlens[b]-1 of the paged pools (its new
// tokens' keys already appended), read through the block table; causal aligned bottom-right (chunked prefill),
// or up to each query's position.
void paged_varlen_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cu_seqlens_q,
                            const Tensor& cache_seqlens, const Tensor& block_table, bool causal, double softmax_scale,
                            Tensor& out, const std::optional<Tensor>& query_positions) {
  check_paged_varlen_attention(q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, block_table, causal, out,
                               query_positions);
  const Tensor cuq = checked_offsets(cu_seqlens_q, "cu_seqlens_q", q.size(0), true);
  const Tensor lens = cache_seqlens.to(at::kLong).contiguous();
  const Tensor table = block_table.to(at::kLong);
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t cap = blocks == 0 ? 0 : table.size(1) * block_size;
  varlen_blocks(q, cuq.const_data_ptr<int64_t>(), cuq.numel() - 1, k_cache.size(2),
                [&](int64_t b) { return std::clamp<int64_t>(lp[b], 0, cap); },
                [&](int64_t b, int64_t n) {
                  const Tensor s = at::arange(n, table.options());
                  const Tensor block = table[b].index_select(0, s.div(block_size, "floor")).clamp_(0, blocks - 1);
                  const Tensor offset = s.remainder(block_size);  // rows gathered by selection: no copy of others
                  return std::pair{k_cache.index({block, offset}), v_cache.index({block, offset})};
                },
                causal, softmax_scale, positions_long(query_positions), out);
}

}  // namespace
}  // namespace mindskip::cpu

TORCH_LIBRARY_IMPL(mindskip, CPU, m) {
  m.impl("decode_attention", &mindskip::cpu::decode_attention);
  m.impl("varlen_attention", &mindskip::cpu::varlen_attention);
  m.impl("paged_varlen_attention", &mindskip::cpu::paged_varlen_attention);
}
