// Shared helpers of the CPU kernels: input checks (raising ValueError) and row partitioning.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fm {

using i64 = int64_t;

inline int max_threads() { return std::max(1, at::get_num_threads()); }

// Work below this many scalar operations runs on the calling thread.
constexpr i64 SERIAL_WORK = 1 << 15;

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// Checks a CSR (rowptr [n+1], col [E], weight [E] or undefined) with column ids in [0, m).
// O(n + E); returns n.
inline i64 check_csr(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor* weight, i64 m,
                     const char* what) {
  check_tensor(rowptr, "rowptr", at::kLong, 1);
  check_tensor(col, "col", at::kLong, 1);
  TORCH_CHECK_VALUE(rowptr.numel() >= 1, what, ": rowptr must have n + 1 >= 1 entries");
  const i64 n = rowptr.numel() - 1;
  const i64 E = col.numel();
  if (weight) {
    check_tensor(*weight, "weight", at::kFloat, 1);
    TORCH_CHECK_VALUE(weight->numel() == E, what, ": weight has ", weight->numel(), " entries, col has ", E);
  }
  const i64* rp = rowptr.data_ptr<i64>();
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[n] == E, what, ": rowptr must start at 0 and end at col.numel() = ", E,
                    " (got ", rp[0], " .. ", rp[n], ")");
  const int nt = (n + E >= (1 << 18)) ? max_threads() : 1;  // O(n + E): parallel on big graphs
  int monotone = 1;
#pragma omp parallel for num_threads(nt) reduction(& : monotone) schedule(static) if (nt > 1)
  for (i64 i = 0; i < n; ++i) monotone &= rp[i] <= rp[i + 1];
  TORCH_CHECK_VALUE(monotone, what, ": rowptr must be non-decreasing");
  const i64* c = col.data_ptr<i64>();
  int in_range = 1;
#pragma omp parallel for num_threads(nt) reduction(& : in_range) schedule(static) if (nt > 1)
  for (i64 e = 0; e < E; ++e) in_range &= (c[e] >= 0) & (c[e] < m);
  TORCH_CHECK_VALUE(in_range, what, ": col entries must lie in [0, ", m, ")");
  return n;
}

// Chunk boundaries over rows [0, n) with similar cost (edges + rows) each: nchunks + 1 entries.
inline std::vector<i64> balanced_chunks(const i64* rowptr, i64 n, i64 nchunks) {
  nchunks = std::max<i64>(1, std::min(nchunks, n));
  std::vector<i64> bounds(nchunks + 1);
  const i64 total = rowptr[n] + n;
  bounds[0] = 0;
  i64 r = 0;
  for (i64 k = 1; k < nchunks; ++k) {
    const i64 target = total * k / nchunks;
    // first row r with rowptr[r] + r >= target (monotone in r)
    i64 lo = r, hi = n;
    while (lo < hi) {
      const i64 mid = lo + (hi - lo) / 2;
      if (rowptr[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    r = lo;
    bounds[k] = r;
  }
  bounds[nchunks] = n;
  return bounds;
}

// Runs body(r0, r1, scratch) over rows [0, n) of a CSR, balanced by edges + rows, in parallel when
// the work (per_edge * E + per_row * n) is large enough. `scratch` is a per-thread float buffer of
// `scratch_size` entries.
template <class Body>
void parallel_csr_rows(const i64* rowptr, i64 n, i64 per_edge, i64 per_row, i64 scratch_size, Body&& body) {
  if (n <= 0) return;
  const i64 work = per_edge * rowptr[n] + per_row * n;
  const int nt = max_threads();
  if (nt == 1 || work < SERIAL_WORK || n == 1) {
    std::vector<float> scratch(std::max<i64>(scratch_size, 1));
    body(i64(0), n, scratch.data());
    return;
  }
  const std::vector<i64> bounds = balanced_chunks(rowptr, n, i64(nt) * 8);
  const i64 nchunks = static_cast<i64>(bounds.size()) - 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> scratch(std::max<i64>(scratch_size, 1));
#pragma omp for schedule(dynamic, 1)
    for (i64 k = 0; k < nchunks; ++k) {
      if (bounds[k] < bounds[k + 1]) body(bounds[k], bounds[k + 1], scratch.data());
    }
  }
}

// aggregate.cpp
std::tuple<at::Tensor, at::Tensor> aggregate_forward(const at::Tensor& rowptr, const at::Tensor& col,
                                                     const at::Tensor& weight, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& bias, int64_t act,
                                                     const c10::optional<at::Tensor>& residual);
at::Tensor aggregate_backward(const at::Tensor& t_rowptr, const at::Tensor& t_col, const at::Tensor& t_weight,
                              const at::Tensor& grad_out, const at::Tensor& saved, int64_t act);
at::Tensor edge_grad(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& grad_out,
                     const at::Tensor& saved, int64_t act, const at::Tensor& x);
at::Tensor propagate_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                             const c10::optional<at::Tensor>& row_scale, const c10::optional<at::Tensor>& self_x,
                             const c10::optional<at::Tensor>& self_scale, const c10::optional<at::Tensor>& bias,
                             int64_t act, bool skip_loops);
// attention.cpp
std::tuple<at::Tensor, at::Tensor> edge_softmax(const at::Tensor& rowptr, const at::Tensor& logits,
                                                const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> edge_softmax_backward(const at::Tensor& rowptr, const at::Tensor& alpha,
                                                         const at::Tensor& beta, const at::Tensor& grad_alpha);
// loss.cpp
std::tuple<at::Tensor, at::Tensor> matched_loss(const at::Tensor& rowptr, const at::Tensor& col,
                                                const at::Tensor& weight, const at::Tensor& x,
                                                const at::Tensor& target, const at::Tensor& component,
                                                const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                                                int64_t act);
// update.cpp
std::tuple<at::Tensor, at::Tensor> top_mask(const at::Tensor& theta, const at::Tensor& ptr, const at::Tensor& k,
                                            double slope);
std::tuple<at::Tensor, at::Tensor, at::Tensor> top_mask_csr(const at::Tensor& theta, const at::Tensor& ptr,
                                                            const at::Tensor& k, double slope);
std::tuple<at::Tensor, at::Tensor> group_by(const at::Tensor& keys, int64_t num_groups);
std::tuple<at::Tensor, at::Tensor, at::Tensor> append_node_entries(const at::Tensor& rowptr, const at::Tensor& source,
                                                                   const at::Tensor& edge_id,
                                                                   const at::Tensor& node_col);
void adam_ste_update(at::Tensor theta, const c10::optional<at::Tensor>& grad_x, at::Tensor exp_avg,
                     at::Tensor exp_avg_sq, int64_t step, double lr, double beta1, double beta2, double eps,
                     double slope, const at::Tensor& threshold, double margin, const at::Tensor& margin_scale,
                     const at::Tensor& active, double bound, const c10::optional<at::Tensor>& grad_rows,
                     const c10::optional<at::Tensor>& weight);

void linear_input_grad(at::Tensor out, const at::Tensor& grad, const at::Tensor& weight, bool accumulate);
// Checks grad [F, f] and weight [d, f] of a product grad @ weight^T into out [F, d].
void check_input_grad(const at::Tensor& grad, const at::Tensor& weight, i64 F, i64 d);

// Rows of a tile of a [*, d] float product grad @ weight^T that stays in a core's cache while a
// GEMM writes it (about half of its L2): one GEMM of this shape over all rows streams its output
// to memory at about half the speed (21 against 44 GFLOPS a thread on AMD EPYC with MKL,
// 19,200 x 64 x 1,433).
inline i64 product_tile_rows(i64 d) {
  return std::max<i64>(8, (384 * 1024) / (static_cast<i64>(sizeof(float)) * std::max<i64>(d, 1)));
}

// Runs body(r0, rows, scratch) for every tile of product_tile_rows(d) rows of [0, F), the tiles
// in parallel (at::parallel_for, one grain per tile). `scratch` starts undefined and lasts over
// the tiles of one thread's chunk: a buffer the body allocates once there.
template <class Body>
void for_product_tiles(i64 F, i64 d, const Body& body) {
  const i64 tile = product_tile_rows(d);
  at::parallel_for(0, (F + tile - 1) / tile, 1, [&](i64 t0, i64 t1) {
    at::Tensor scratch;
    for (i64 t = t0; t < t1; ++t) {
      const i64 r0 = t * tile;
      body(r0, std::min(F, r0 + tile) - r0, scratch);
    }
  });
}

// Saved-state checks shared by backward ops: validates `saved` for activation `act` and rows x f.
inline void check_saved(const at::Tensor& saved, int64_t act, i64 rows, i64 f) {
  TORCH_CHECK_VALUE(saved.device().is_cpu(), "saved must be a CPU tensor");
  if (act == 0) return;  // none: anything (an empty tensor) is accepted and ignored
  if (act == 1) {
    check_tensor(saved, "saved (relu bits)", at::kByte, 2);
    TORCH_CHECK_VALUE(saved.size(0) == rows && saved.size(1) == (f + 7) / 8, "saved relu bits must have shape [",
                      rows, ", ", (f + 7) / 8, "], got ", saved.sizes());
  } else {
    check_tensor(saved, "saved (pre-activation)", at::kFloat, 2);
    TORCH_CHECK_VALUE(saved.size(0) == rows && saved.size(1) == f, "saved pre-activation must have shape [", rows,
                      ", ", f, "], got ", saved.sizes());
  }
}

}  // namespace fm
