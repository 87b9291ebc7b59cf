// Grouping of entries by an integer key (a stable counting sort): the CSR of a graph from its
// edge list in O(E + groups) instead of an O(E log E) comparison sort.
#include "common.h"

namespace fm {

namespace {

// Inside a parallel region: runs body(t) for the slices t in [0, nt) this thread owns (all of
// them when the runtime gave the region fewer threads than asked for).
template <class Body>
void for_my_slices(int nt, Body&& body) {
#ifdef _OPENMP
  const int team = omp_get_num_threads(), me = omp_get_thread_num();
#else
  const int team = 1, me = 0;
#endif
  for (int t = me; t < nt; t += team) body(t);
}

}  // namespace

// keys [E] int64 in [0, num_groups). Returns (rowptr [num_groups + 1], order [E]) such that
// order[rowptr[g] : rowptr[g + 1]] lists the entries with key g in ascending entry order
// (identical to a stable argsort of keys). Each thread counts, then scatters, a contiguous slice
// of the entries; its per-group write offsets come after the earlier slices', so the result
// does not depend on the thread count.
std::tuple<at::Tensor, at::Tensor> group_by(const at::Tensor& keys, int64_t num_groups) {
  check_tensor(keys, "keys", at::kLong, 1);
  TORCH_CHECK_VALUE(num_groups >= 0, "num_groups must be >= 0, got ", num_groups);
  const i64 E = keys.numel(), G = num_groups;
  const i64* k = keys.data_ptr<i64>();
  // One histogram per thread: only worth it when the entries outnumber the groups.
  const int nt = (E >= (1 << 18) && E >= G) ? max_threads() : 1;
  int in_range = 1;
#pragma omp parallel for num_threads(nt) reduction(& : in_range) schedule(static) if (nt > 1)
  for (i64 e = 0; e < E; ++e) in_range &= (k[e] >= 0) & (k[e] < G);
  TORCH_CHECK_VALUE(in_range, "keys must lie in [0, num_groups = ", G, ")");

  std::vector<i64> offset(static_cast<size_t>(nt) * G, 0);
  auto slice = [&](int t) { return std::pair<i64, i64>{E * t / nt, E * (t + 1) / nt}; };
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    for_my_slices(nt, [&](int t) {
      i64* count = offset.data() + static_cast<size_t>(t) * G;
      const auto [lo, hi] = slice(t);
      for (i64 e = lo; e < hi; ++e) ++count[k[e]];
    });
  }
  at::Tensor rowptr = at::empty({G + 1}, keys.options());
  i64* rp = rowptr.data_ptr<i64>();
  i64 running = 0;
  for (i64 g = 0; g < G; ++g) {
    rp[g] = running;
    for (int t = 0; t < nt; ++t) {
      i64& slot = offset[static_cast<size_t>(t) * G + g];
      const i64 c = slot;
      slot = running;
      running += c;
    }
  }
  rp[G] = running;
  at::Tensor order = at::empty({E}, keys.options());
  i64* op = order.data_ptr<i64>();
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    for_my_slices(nt, [&](int t) {
      i64* next = offset.data() + static_cast<size_t>(t) * G;
      const auto [lo, hi] = slice(t);
      for (i64 e = lo; e < hi; ++e) op[next[k[e]]++] = e;
    });
  }
  return {rowptr, order};
}

// The CSR of an operator whose entries are a graph's edges followed by one entry per node, from
// the graph's in-edge CSR (rowptr [n + 1], source [E], edge_id [E]): row i holds node i's
// in-edges in CSR order, then its node entry (column node_col[i], coordinate E + i). Returns
// (rowptr [n + 1], col [E + n], order [E + n]: the coordinate index of every entry). O(E + n)
// sequential writes, rows in parallel.
std::tuple<at::Tensor, at::Tensor, at::Tensor> append_node_entries(const at::Tensor& rowptr, const at::Tensor& source,
                                                                   const at::Tensor& edge_id,
                                                                   const at::Tensor& node_col) {
  check_tensor(rowptr, "rowptr", at::kLong, 1);
  check_tensor(source, "source", at::kLong, 1);
  check_tensor(edge_id, "edge_id", at::kLong, 1);
  check_tensor(node_col, "node_col", at::kLong, 1);
  const i64 n = rowptr.numel() - 1, E = source.numel();
  TORCH_CHECK_VALUE(n >= 0, "rowptr must hold n + 1 >= 1 offsets");
  TORCH_CHECK_VALUE(edge_id.numel() == E, "edge_id must have one entry per edge (", E, "), got ", edge_id.numel());
  TORCH_CHECK_VALUE(node_col.numel() == n, "node_col must have one entry per node (", n, "), got ", node_col.numel());
  const i64* rp = rowptr.data_ptr<i64>();
  int monotone = rp[0] == 0 && rp[n] == E;
  for (i64 i = 0; i < n; ++i) monotone &= rp[i] <= rp[i + 1];
  TORCH_CHECK_VALUE(monotone, "rowptr must rise from 0 to the number of edges (", E, ")");
  at::Tensor out_rowptr = at::empty({n + 1}, rowptr.options());
  at::Tensor col = at::empty({E + n}, source.options());
  at::Tensor order = at::empty({E + n}, source.options());
  i64 *orp = out_rowptr.data_ptr<i64>(), *cp = col.data_ptr<i64>(), *op = order.data_ptr<i64>();
  const i64 *sp = source.data_ptr<i64>(), *ep = edge_id.data_ptr<i64>(), *nc = node_col.data_ptr<i64>();
  const int nt = E + n >= (1 << 18) ? max_threads() : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (i64 i = 0; i < n; ++i) {
    const i64 shift = i;  // entries of the rows before i: their edges plus i node entries
    for (i64 e = rp[i]; e < rp[i + 1]; ++e) {
      cp[e + shift] = sp[e];
      op[e + shift] = ep[e];
    }
    cp[rp[i + 1] + shift] = nc[i];
    op[rp[i + 1] + shift] = E + i;
    orp[i] = rp[i] + i;
  }
  orp[n] = E + n;
  return {out_rowptr, col, order};
}

}  // namespace fm
