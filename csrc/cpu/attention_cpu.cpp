// CPU attention kernels: decode (one query per sequence against a ragged KV cache, dense or paged through a
// block table: a group of query heads sharing one KV head (GQA) attends to the cached rows, fp32/fp64
// accumulation, parallel over sequences, KV heads and splits of the keys) and varlen (packed sequences, optionally causal aligned
// bottom-right or up to a per-query key position: PyTorch's fused CPU attention per sequence on views of the packed
// rows; keys packed too, or read from a paged pool for chunked prefill).
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

// One split of a decode (flash-decoding): the query heads q[j * dh ...] (j < group) against keys/values s0..s1-1.
// Writes each head's softmax state to state[j * (dh + 2) ...]: the largest logit, the sum of exp(logit - it),
// and the exp-weighted sum of the value rows (unnormalised); an empty split writes (-inf, 0, zeros). Vectorised
// dot products, exp and value updates (cpu_utils.h); `buf` is per-thread scratch.
template <typename T, typename acc_t>
void attend_split(const T* q, int64_t group, Rows<T> k, Rows<T> v, int64_t s0, int64_t s1, int64_t dh, acc_t scale,
                  acc_t* state, std::vector<acc_t>& buf) {
  const int64_t n = std::max<int64_t>(s1 - s0, 0);
  for (int64_t j = 0; j < group; ++j) {
    acc_t* st = state + j * (dh + 2);
    st[0] = -std::numeric_limits<acc_t>::infinity();
    std::fill(st + 1, st + dh + 2, acc_t(0));
  }
  if (n == 0) return;
  buf.resize(group * (dh + n));
  acc_t* qf = buf.data();          // [group, dh] queries in acc_t
  acc_t* prob = qf + group * dh;   // [group, n] logits, then exp(logit - max)
  for (int64_t i = 0; i < group * dh; ++i) qf[i] = static_cast<acc_t>(q[i]);
  for (int64_t s = 0; s < n; ++s) {
    const T* krow = k.row(s0 + s);
    for (int64_t j = 0; j < group; ++j) prob[j * n + s] = dot(krow, qf + j * dh, dh) * scale;
  }
  for (int64_t j = 0; j < group; ++j) {
    acc_t* p = prob + j * n;
    acc_t* st = state + j * (dh + 2);
    st[0] = *std::max_element(p, p + n);
    st[1] = exp_sum(p, st[0], n);
  }
  for (int64_t s = 0; s < n; ++s) {
    const T* vrow = v.row(s0 + s);
    for (int64_t j = 0; j < group; ++j) axpy(state + j * (dh + 2) + 2, prob[j * n + s], vrow, dh);
  }
}

// One head's output from its splits' states (`splits` of them, `stride` apart): sum_i e^(m_i - M) acc_i over
// sum_i e^(m_i - M) l_i with M the largest m_i; zeros when every split was empty (no key).
template <typename T, typename acc_t>
void merge_splits(const acc_t* state, int64_t splits, int64_t stride, int64_t dh, T* out) {
  acc_t top = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < splits; ++i) top = std::max(top, state[i * stride]);
  if (top == -std::numeric_limits<acc_t>::infinity()) {
    std::fill(out, out + dh, T(0));
    return;
  }
  acc_t sum = 0;
  std::vector<acc_t> acc(dh, acc_t(0));
  for (int64_t i = 0; i < splits; ++i) {
    const acc_t* st = state + i * stride;
    if (st[1] == 0) continue;
    const acc_t w = std::exp(st[0] - top);
    sum += w * st[1];
    for (int64_t d = 0; d < dh; ++d) acc[d] += w * st[2 + d];
  }
  const acc_t inv = acc_t(1) / sum;
  for (int64_t d = 0; d < dh; ++d) out[d] = static_cast<T>(acc[d] * inv);
}

// Dense caches [B, S, Hkv, Dh], or with a block table pools [num_blocks, block_size, Hkv, Dh] (see Paging).
// Parallel over sequences x KV heads x splits of the keys (enough splits to keep every thread busy at batch 1,
// none shorter than kMinSplit rows), then the splits merged per head.
void decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& cache_seqlens,
                      const std::optional<Tensor>& block_table, double softmax_scale, Tensor& out) {
  constexpr int64_t kMinSplit = 128;
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
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, std::clamp<int64_t>(lp[b], 0, cap));
  const int64_t heads = batch * hkv;
  const int64_t wanted = (4 * at::get_num_threads() + heads - 1) / std::max<int64_t>(heads, 1);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::max<int64_t>((longest + kMinSplit - 1) / kMinSplit, 1));
  const int64_t split_len = std::max<int64_t>((longest + splits - 1) / splits, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mindskip_decode_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* qp = qc.const_data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.const_data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t stride = group * (dh + 2);  // one split's states of a KV head's query heads
    std::vector<acc_t> states(heads * splits * stride);
    at::parallel_for(0, heads * splits, 1, [&](int64_t w0, int64_t w1) {
      std::vector<acc_t> buf;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t b = w / (hkv * splits), h = w / splits % hkv, i = w % splits;
        const int64_t n = std::clamp<int64_t>(lp[b], 0, cap);  // rows past the capacity do not exist
        const Rows<scalar_t> k{kp + h * k_cache.stride(2), paging, b, k_cache.stride(0), k_cache.stride(1)};
        const Rows<scalar_t> v{vp + h * v_cache.stride(2), paging, b, v_cache.stride(0), v_cache.stride(1)};
        attend_split(qp + (b * hq + h * group) * dh, group, k, v, i * split_len, std::min(n, (i + 1) * split_len),
                     dh, static_cast<acc_t>(softmax_scale), states.data() + w * stride, buf);
      }
    });
    at::parallel_for(0, batch * hq, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // query head r % hq of sequence r / hq
        const int64_t head = r / group, j = r % group;  // its KV head (b * hkv + h) and place in the group
        merge_splits(states.data() + head * splits * stride + j * (dh + 2), splits, stride, dh, op + r * dh);
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

// Attention through PyTorch's fused CPU attention (at::_scaled_dot_product_flash_attention_for_cpu, the dense
// model's SDPA kernel: tiled online softmax, vectorised, GQA without copying K/V, parallel over batch x heads x
// query blocks, causal blocks above the diagonal skipped). q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] are strided
// views of packed rows (no copy); `mask` (additive, q's dtype, [Lq, Lk]) or `causal` (top-left); the result is
// written into `dst` [B, Lq, Hq, Dh].
void fused(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, const std::optional<Tensor>& mask,
           double scale, Tensor dst) {
  const Tensor o = std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, mask, scale));
  dst.copy_(o.transpose(1, 2));
}

// `fused` on one sequence's rows: q [Lq, Hq, Dh], k/v [Lk, Hkv, Dh], dst [Lq, Hq, Dh].
void fused_rows(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, const std::optional<Tensor>& mask,
                double scale, const Tensor& dst) {
  fused(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal, mask, scale, dst.unsqueeze(0));
}

// The additive mask [nq, nk] in `like`'s dtype: row t sees keys 0..last[t] (0), hides the rest (-inf).
Tensor key_limit_mask(const int64_t* last, int64_t nq, int64_t nk, const Tensor& like) {
  Tensor mask = at::empty({nq, nk}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "mindskip_key_limit_mask", [&] {
    scalar_t* m = mask.mutable_data_ptr<scalar_t>();
    const scalar_t hidden = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t t = 0; t < nq; ++t) {
      const int64_t seen = std::clamp<int64_t>(last[t] + 1, 0, nk);
      std::fill(m + t * nk, m + t * nk + seen, scalar_t(0));
      std::fill(m + t * nk + seen, m + (t + 1) * nk, hidden);
    }
  });
  return mask;
}

// Per sequence: its queries against its keys by the fused kernel, with no per-block work of ours. Without
// per-query limits (not causal, or causal with as many queries as keys) one call; otherwise (causal aligned
// bottom-right with fewer queries than keys, or `positions`: query row t sees keys 0..positions[t], clamped, in
// any order) the queries go in chunks of kQueryChunk, each against only the keys its furthest-seeing query sees,
// with a mask where its queries see fewer (so a sparse subset of queries costs about its own share of the causal
// work, not the whole sequence's). A query that sees no key gets zeros (the kernel's fully-masked rows).
// `key_len(b)` is sequence b's number of keys, `keys(b, n)` its first n key and value rows as [n, Hkv, Dh].
template <typename KeyLen, typename Keys>
void varlen_fused(const Tensor& q, const int64_t* cq, int64_t batch, KeyLen key_len, Keys keys, bool causal,
                  double softmax_scale, const Tensor& positions, Tensor& out) {
  constexpr int64_t kQueryChunk = 64;
  const int64_t* pos = positions.defined() ? positions.const_data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> last;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len_q = cq[b + 1] - cq[b], len_k = key_len(b);
    if (len_q == 0) continue;
    Tensor dst = out.narrow(0, cq[b], len_q);
    const Tensor qb = q.narrow(0, cq[b], len_q);
    // the last key each query sees (clamped to [-1, len_k - 1])
    last.resize(len_q);
    for (int64_t t = 0; t < len_q; ++t) {
      last[t] = std::clamp<int64_t>(!causal ? len_k - 1 : pos ? pos[cq[b] + t] : t + len_k - len_q, -1, len_k - 1);
    }
    bool plain_causal = causal && len_q == len_k;  // query t sees keys 0..t: the kernel's own causal mask
    for (int64_t t = 0; plain_causal && t < len_q; ++t) plain_causal = last[t] == t;
    const int64_t needed = *std::max_element(last.begin(), last.end()) + 1;
    if (needed <= 0) {
      dst.zero_();
      continue;
    }
    const auto [k_rows, v_rows] = keys(b, needed);
    const bool full = std::all_of(last.begin(), last.end(), [&](int64_t l) { return l == needed - 1; });
    if (plain_causal || full) {
      fused_rows(qb, k_rows, v_rows, plain_causal, std::nullopt, softmax_scale, dst);
      continue;
    }
    for (int64_t q0 = 0; q0 < len_q; q0 += kQueryChunk) {
      const int64_t nq = std::min(kQueryChunk, len_q - q0);
      const int64_t* lim = last.data() + q0;
      const int64_t nk = *std::max_element(lim, lim + nq) + 1;
      Tensor part = dst.narrow(0, q0, nq);
      if (nk <= 0) {
        part.zero_();
        continue;
      }
      const bool sees_all = std::all_of(lim, lim + nq, [&](int64_t l) { return l == nk - 1; });
      fused_rows(qb.narrow(0, q0, nq), k_rows.narrow(0, 0, nk), v_rows.narrow(0, 0, nk), false,
                 sees_all ? std::nullopt : std::optional<Tensor>(key_limit_mask(lim, nq, nk, q)), softmax_scale,
                 part);
    }
  }
}

// The per-query key positions as int64 on the CPU, or an undefined tensor without them.
Tensor positions_long(const std::optional<Tensor>& query_positions) {
  return query_positions ? query_positions->to(at::kLong).contiguous() : Tensor();
}

// The common length L when every sequence has L queries over its own L keys, both packed back to back from row 0,
// and each query sees exactly what the fused kernel's own mask shows it (causal: query t keys 0..t, by the
// bottom-right rule or its position; or every key), else -1: then one fused call covers the whole batch.
int64_t uniform_length(const int64_t* cq, const int64_t* ck, int64_t batch, bool causal, const int64_t* pos) {
  const int64_t len = batch ? cq[1] : 0;
  for (int64_t b = 0; b < batch; ++b) {
    if (cq[b] != b * len || ck[b] != b * len || cq[b + 1] != (b + 1) * len || ck[b + 1] != (b + 1) * len) return -1;
  }
  for (int64_t t = 0; causal && pos && t < batch * len; ++t) {
    if (std::clamp<int64_t>(pos[t], -1, len - 1) != t % len) return -1;
  }
  return len;
}

void varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                      const Tensor& cu_seqlens_k, bool causal, double softmax_scale, Tensor& out,
                      const std::optional<Tensor>& query_positions) {
  check_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, out, query_positions);
  const Tensor cuq = checked_offsets(cu_seqlens_q, "cu_seqlens_q", q.size(0), true);
  const Tensor cuk = checked_offsets(cu_seqlens_k, "cu_seqlens_k", k.size(0), false);
  const int64_t* ck = cuk.const_data_ptr<int64_t>();
  const Tensor positions = positions_long(query_positions);
  const int64_t batch = cuq.numel() - 1;
  const int64_t len = uniform_length(cuq.const_data_ptr<int64_t>(), ck, batch, causal,
                                     positions.defined() ? positions.const_data_ptr<int64_t>() : nullptr);
  if (len > 0) {  // [B * L, H, Dh] rows as [B, L, H, Dh]: the dense model's one call
    const auto batched = [&](const Tensor& t) { return t.narrow(0, 0, batch * len).unflatten(0, {batch, len}); };
    fused(batched(q), batched(k), batched(v), causal, std::nullopt, softmax_scale, batched(out));
    return;
  }
  varlen_fused(q, cuq.const_data_ptr<int64_t>(), batch,
               [&](int64_t b) { return ck[b + 1] - ck[b]; },
               [&](int64_t b, int64_t n) { return std::pair{k.narrow(0, ck[b], n), v.narrow(0, ck[b], n)}; },
               causal, softmax_scale, positions, out);
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
  varlen_fused(q, cuq.const_data_ptr<int64_t>(), cuq.numel() - 1,
               [&](int64_t b) { return std::clamp<int64_t>(lp[b], 0, cap); },
               [&](int64_t b, int64_t n) {  // the sequence's rows gathered once, through its block table
                 const Tensor s = at::arange(n, table.options());
                 const Tensor block = table[b].index_select(0, s.div(block_size, "floor")).clamp_(0, blocks - 1);
                 const Tensor offset = s.remainder(block_size);
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
