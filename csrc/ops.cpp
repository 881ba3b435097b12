// Schemas of torch.ops.mindskip.* and the argument checks every device implementation runs first.
//
// Outputs are passed in (`Tensor(a!) out`) and allocated by the Python wrappers (backends/compiled.py), so
// tests can poison them and torch.compile sees ordinary mutating ops. Device kernels register themselves
// with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda; fake implementations are registered in Python.
#include <torch/library.h>

#include <initializer_list>
#include <utility>

#include "mindskip.h"

namespace mindskip {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

bool is_index(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), "mindskip.", op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_dtype(const char* op, const char* name, const Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "mindskip.", op, ": ", name, " must be ", want, ", got ",
                   t.scalar_type());
}

void check_index(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(is_index(t.scalar_type()), "mindskip.", op, ": ", name, " must be int32 or int64, got ",
                   t.scalar_type());
}

void check_rank(const char* op, const char* name, const Tensor& t, int64_t rank, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == rank, "mindskip.", op, ": ", name, " must be ", rank, "-D ", layout, ", got shape ",
                    t.sizes());
}

void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef want, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == want, "mindskip.", op, ": ", name, " must have shape ", want, " (", what,
                    "), got ", t.sizes());
}

// An output must be contiguous: the kernels write it densely.
void check_out(const char* op, const char* name, const Tensor& t, at::IntArrayRef want, at::ScalarType dtype) {
  check_shape(op, name, t, want, "output");
  check_dtype(op, name, t, dtype);
  TORCH_CHECK_VALUE(t.is_contiguous(), "mindskip.", op, ": output ", name, " must be contiguous");
}

void check_same_device(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  const auto& [first_name, first] = *tensors.begin();
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK_VALUE(t->device() == first->device(), "mindskip.", op, ": ", name, " is on ", t->device(),
                      " but ", first_name, " is on ", first->device(), "; move them to one device");
  }
}

void check_head_dim(const char* op, int64_t dh) {
  TORCH_CHECK_VALUE(dh >= 1 && dh <= kMaxHeadDim, "mindskip.", op, ": head dim must be in [1, ", kMaxHeadDim,
                    "], got ", dh);
}

// RMSNorm weight [D] of x's last dim, eps >= 0, on x's device.
void check_norm(const char* op, const char* x_name, const Tensor& x, const Tensor& gamma, double eps) {
  check_float(op, "gamma", gamma);
  check_shape(op, "gamma", gamma, {x.size(-1)}, "RMSNorm weight over the hidden size");
  TORCH_CHECK_VALUE(eps >= 0.0, "mindskip.", op, ": eps must be >= 0, got ", eps);
  check_same_device(op, {{x_name, &x}, {"gamma", &gamma}});
}

void gather_args(const char* op, const Tensor& x, const Tensor& indices, const Tensor& out) {
  check_rank(op, "x", x, 2, "[rows, D]");
  check_rank(op, "indices", indices, 1, "[T]");
  check_dtype(op, "indices", indices, at::kLong);
  check_out(op, "out", out, {indices.size(0), x.size(1)}, x.scalar_type());
  check_same_device(op, {{"x", &x}, {"indices", &indices}, {"out", &out}});
}

// A paged pool [num_blocks, block_size >= 1, Hkv, dh] with its int32 block table [batch, max_blocks].
void check_paged(const char* op, const Tensor& k_cache, const Tensor& block_table, int64_t batch, int64_t dh) {
  TORCH_CHECK_VALUE(k_cache.size(1) >= 1 && k_cache.size(3) == dh, "mindskip.", op, ": k_cache must be a paged pool "
                    "[num_blocks, block_size >= 1, Hkv, ", dh, "] with a block_table, got ", k_cache.sizes());
  check_rank(op, "block_table", block_table, 2, "[B, max_blocks]");
  check_dtype(op, "block_table", block_table, at::kInt);
  TORCH_CHECK_VALUE(block_table.size(0) == batch, "mindskip.", op, ": block_table must have shape [", batch,
                    ", max_blocks] (one row per sequence), got ", block_table.sizes());
}

// Optional per-query key positions: [Tq] int32/int64 on q's device, only with causal attention.
void check_query_positions(const char* op, const Tensor& q, bool causal, const std::optional<Tensor>& positions) {
  if (!positions) return;
  check_index(op, "query_positions", *positions);
  check_shape(op, "query_positions", *positions, {q.size(0)}, "one per query row");
  TORCH_CHECK_VALUE(causal, "mindskip.", op, ": query_positions needs causal=True (it is the causal rule, per query)");
  check_same_device(op, {{"q", &q}, {"query_positions", &*positions}});
}

}  // namespace

void check_router(const Tensor& z, const Tensor& weight, const std::optional<Tensor>& gamma, double eps,
                  const Tensor& mask, double threshold, const Tensor& scores, const Tensor& keep) {
  const char* op = "router";
  check_rank(op, "z", z, 3, "[B, N, D]");
  check_float(op, "z", z);
  check_float(op, "weight", weight);
  const int64_t b = z.size(0), n = z.size(1), d = z.size(2);
  TORCH_CHECK_VALUE(weight.numel() == d && (weight.dim() == 1 || (weight.dim() == 2 && weight.size(0) == 1)),
                    "mindskip.router: weight must have shape [", d, "] or [1, ", d, "] (hidden size of z), got ",
                    weight.sizes());
  check_dtype(op, "mask", mask, at::kBool);
  check_shape(op, "mask", mask, {b, n}, "[B, N] of z, True = real token");
  TORCH_CHECK_VALUE(threshold >= 0.0 && threshold <= 1.0,
                    "mindskip.router: threshold must be in [0, 1] (a sigmoid score), got ", threshold);
  check_out(op, "scores", scores, {b, n}, at::kFloat);
  check_out(op, "keep", keep, {b, n}, at::kBool);
  check_same_device(op, {{"z", &z}, {"weight", &weight}, {"mask", &mask}, {"scores", &scores}, {"keep", &keep}});
  if (gamma.has_value()) check_norm(op, "z", z, *gamma, eps);
}

void check_compact_counts(const Tensor& keep, const Tensor& cu_seqlens) {
  const char* op = "compact_counts";
  check_rank(op, "keep", keep, 2, "[B, N]");
  check_dtype(op, "keep", keep, at::kBool);
  check_out(op, "cu_seqlens", cu_seqlens, {keep.size(0) + 1}, at::kInt);
  check_same_device(op, {{"keep", &keep}, {"cu_seqlens", &cu_seqlens}});
}

void check_compact(const Tensor& keep, const Tensor& position_ids, const Tensor& cu_seqlens,
                   const Tensor& indices, const Tensor& positions) {
  const char* op = "compact";
  check_rank(op, "keep", keep, 2, "[B, N]");
  check_dtype(op, "keep", keep, at::kBool);
  check_index(op, "position_ids", position_ids);
  check_shape(op, "position_ids", position_ids, keep.sizes(), "[B, N] like keep");
  check_dtype(op, "cu_seqlens", cu_seqlens, at::kInt);
  check_shape(op, "cu_seqlens", cu_seqlens, {keep.size(0) + 1}, "[B + 1] from compact_counts");
  TORCH_CHECK_VALUE(cu_seqlens.is_contiguous(), "mindskip.compact: cu_seqlens must be contiguous");
  check_rank(op, "indices", indices, 1, "[T]");
  check_out(op, "indices", indices, {indices.size(0)}, at::kLong);
  check_out(op, "positions", positions, {indices.size(0)}, at::kLong);
  check_same_device(op, {{"keep", &keep}, {"position_ids", &position_ids}, {"cu_seqlens", &cu_seqlens},
                         {"indices", &indices}, {"positions", &positions}});
}

void check_gather(const Tensor& x, const Tensor& indices, const Tensor& out) { gather_args("gather", x, indices, out); }

void check_gather_norm(const Tensor& x, const Tensor& gamma, double eps, const Tensor& indices, const Tensor& out) {
  gather_args("gather_norm", x, indices, out);
  check_float("gather_norm", "x", x);
  check_norm("gather_norm", "x", x, gamma, eps);
}

void check_scatter_add(const Tensor& residual, const Tensor& values, const Tensor& indices,
                       const std::optional<Tensor>& scale, const Tensor& out) {
  const char* op = "scatter_add";
  check_rank(op, "residual", residual, 2, "[rows, D]");
  check_float(op, "residual", residual);
  check_rank(op, "indices", indices, 1, "[T]");
  check_dtype(op, "indices", indices, at::kLong);
  const int64_t t = indices.size(0), d = residual.size(1);
  check_shape(op, "values", values, {t, d}, "[T kept rows, D]");
  check_dtype(op, "values", values, residual.scalar_type());
  check_out(op, "out", out, residual.sizes(), residual.scalar_type());
  check_same_device(op, {{"residual", &residual}, {"values", &values}, {"indices", &indices}, {"out", &out}});
  if (scale.has_value()) {
    check_float(op, "scale", *scale);
    check_shape(op, "scale", *scale, {t}, "one gate per kept row");
    check_same_device(op, {{"residual", &residual}, {"scale", &*scale}});
  }
}

void check_decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                            const Tensor& cache_seqlens, const std::optional<Tensor>& block_table,
                            const Tensor& out) {
  const char* op = "decode_attention";
  check_rank(op, "q", q, 3, "[B, Hq, Dh]");
  check_float(op, "q", q);
  check_rank(op, "k_cache", k_cache, 4, block_table ? "[num_blocks, block_size, Hkv, Dh]" : "[B, S, Hkv, Dh]");
  check_dtype(op, "k_cache", k_cache, q.scalar_type());
  check_shape(op, "v_cache", v_cache, k_cache.sizes(), "like k_cache");
  check_dtype(op, "v_cache", v_cache, q.scalar_type());
  const int64_t b = q.size(0), hq = q.size(1), dh = q.size(2), hkv = k_cache.size(2);
  if (block_table) {
    check_paged(op, k_cache, *block_table, b, dh);
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == b && k_cache.size(3) == dh, "mindskip.decode_attention: k_cache must "
                      "have shape [", b, ", S, Hkv, ", dh, "] to match q, got ", k_cache.sizes());
  }
  TORCH_CHECK_VALUE(hkv >= 1 && hq % hkv == 0, "mindskip.decode_attention: number of query heads (", hq,
                    ") must be a multiple of cache heads (", hkv, ")");
  check_head_dim(op, dh);
  TORCH_CHECK_VALUE(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
                    "mindskip.decode_attention: k_cache and v_cache must have a contiguous last dim");
  check_index(op, "cache_seqlens", cache_seqlens);
  check_shape(op, "cache_seqlens", cache_seqlens, {b}, "one length per sequence");
  check_out(op, "out", out, q.sizes(), q.scalar_type());
  check_same_device(op, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache},
                         {"cache_seqlens", &cache_seqlens}, {"out", &out}});
  if (block_table) check_same_device(op, {{"q", &q}, {"block_table", &*block_table}});
}

void check_paged_varlen_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                  const Tensor& cu_seqlens_q, const Tensor& cache_seqlens, const Tensor& block_table,
                                  bool causal, const Tensor& out, const std::optional<Tensor>& query_positions) {
  const char* op = "paged_varlen_attention";
  check_rank(op, "q", q, 3, "[Tq, Hq, Dh]");
  check_float(op, "q", q);
  check_rank(op, "k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, Dh]");
  check_dtype(op, "k_cache", k_cache, q.scalar_type());
  check_shape(op, "v_cache", v_cache, k_cache.sizes(), "like k_cache");
  check_dtype(op, "v_cache", v_cache, q.scalar_type());
  check_index(op, "cu_seqlens_q", cu_seqlens_q);
  check_rank(op, "cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]");
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() >= 1, "mindskip.paged_varlen_attention: cu_seqlens_q must have B + 1 >= 1 "
                    "entries, got ", cu_seqlens_q.sizes());
  const int64_t b = cu_seqlens_q.numel() - 1, hq = q.size(1), dh = q.size(2), hkv = k_cache.size(2);
  check_paged(op, k_cache, block_table, b, dh);
  TORCH_CHECK_VALUE(hkv >= 1 && hq % hkv == 0, "mindskip.paged_varlen_attention: number of query heads (", hq,
                    ") must be a multiple of cache heads (", hkv, ")");
  check_head_dim(op, dh);
  check_index(op, "cache_seqlens", cache_seqlens);
  check_shape(op, "cache_seqlens", cache_seqlens, {b}, "one length per sequence");
  check_out(op, "out", out, q.sizes(), q.scalar_type());
  check_same_device(op, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"cu_seqlens_q", &cu_seqlens_q},
                         {"cache_seqlens", &cache_seqlens}, {"block_table", &block_table}, {"out", &out}});
  check_query_positions(op, q, causal, query_positions);
}

void check_varlen_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                            const Tensor& cu_seqlens_k, bool causal, const Tensor& out,
                            const std::optional<Tensor>& query_positions) {
  const char* op = "varlen_attention";
  check_rank(op, "q", q, 3, "[Tq, Hq, Dh]");
  check_float(op, "q", q);
  check_rank(op, "k", k, 3, "[Tk, Hkv, Dh]");
  check_dtype(op, "k", k, q.scalar_type());
  check_shape(op, "v", v, k.sizes(), "like k");
  check_dtype(op, "v", v, q.scalar_type());
  TORCH_CHECK_VALUE(k.size(2) == q.size(2), "mindskip.varlen_attention: k must have head dim ", q.size(2),
                    " like q, got ", k.size(2));
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "mindskip.varlen_attention: number of query "
                    "heads (", q.size(1), ") must be a multiple of key/value heads (", k.size(1), ")");
  check_head_dim(op, q.size(2));
  check_index(op, "cu_seqlens_q", cu_seqlens_q);
  check_index(op, "cu_seqlens_k", cu_seqlens_k);
  check_rank(op, "cu_seqlens_q", cu_seqlens_q, 1, "[B + 1]");
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() >= 1 && cu_seqlens_k.sizes() == cu_seqlens_q.sizes(),
                    "mindskip.varlen_attention: cu_seqlens_q and cu_seqlens_k must both have B + 1 >= 1 entries, "
                    "got ", cu_seqlens_q.sizes(), " and ", cu_seqlens_k.sizes());
  check_out(op, "out", out, q.sizes(), q.scalar_type());
  check_same_device(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"cu_seqlens_q", &cu_seqlens_q},
                         {"cu_seqlens_k", &cu_seqlens_k}, {"out", &out}});
  check_query_positions(op, q, causal, query_positions);
}

}  // namespace mindskip

TORCH_LIBRARY(mindskip, m) {
  // gamma given: z is the un-normalized hidden state and the router scores RMSNorm(z) * gamma (eps inside)
  m.def("router(Tensor z, Tensor weight, Tensor? gamma, float eps, Tensor mask, float threshold, bool per_sequence, "
        "Tensor(a!) scores, Tensor(b!) keep) -> ()");
  m.def("compact_counts(Tensor keep, Tensor(a!) cu_seqlens) -> ()");
  m.def("compact(Tensor keep, Tensor position_ids, Tensor cu_seqlens, Tensor(a!) indices, "
        "Tensor(b!) positions) -> ()");
  m.def("gather(Tensor x, Tensor indices, Tensor(a!) out) -> ()");
  m.def("gather_norm(Tensor x, Tensor gamma, float eps, Tensor indices, Tensor(a!) out) -> ()");
  m.def("scatter_add(Tensor residual, Tensor values, Tensor indices, Tensor? scale, Tensor(a!) out) -> ()");
  // block_table given: k_cache/v_cache are pools [num_blocks, block_size, Hkv, Dh] read through it
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, "
        "float softmax_scale, Tensor(a!) out) -> ()");
  // query_positions given (causal only): query row t sees its sequence's keys 0..query_positions[t]; trailing
  // with a default, so calls without it keep their argument order
  m.def("paged_varlen_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cu_seqlens_q, "
        "Tensor cache_seqlens, Tensor block_table, bool causal, float softmax_scale, Tensor(a!) out, "
        "Tensor? query_positions=None) -> ()");
  m.def("varlen_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, bool causal, "
        "float softmax_scale, Tensor(a!) out, Tensor? query_positions=None) -> ()");
}
