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

// Stable counting sort of the entries by key: fills rowptr [G + 1] and order [E] (order[rowptr[g]
// : rowptr[g + 1]] lists the entries with key g in ascending entry order, as a stable argsort) and,
// when `payload` is given, grouped[p] = payload[order[p]] in the same scatter (no second, random
// gather). Each thread counts, then scatters, a contiguous slice of the entries; its per-group
// write offsets come after the earlier slices', so the result does not depend on the thread count.
void stable_group(const i64* k, i64 E, i64 G, i64* rp, i64* op, const i64* payload, i64* grouped,
                  const char* what) {
  // One histogram per thread: only worth it when the entries outnumber the groups.
  const int nt = (E >= (1 << 18) && E >= G) ? max_threads() : 1;
  int in_range = 1;
#pragma omp parallel for num_threads(nt) reduction(& : in_range) schedule(static) if (nt > 1)
  for (i64 e = 0; e < E; ++e) in_range &= (k[e] >= 0) & (k[e] < G);
  TORCH_CHECK_VALUE(in_range, what, " must lie in [0, ", G, ")");

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
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    for_my_slices(nt, [&](int t) {
      i64* next = offset.data() + static_cast<size_t>(t) * G;
      const auto [lo, hi] = slice(t);
      if (payload) {
        for (i64 e = lo; e < hi; ++e) {
          const i64 p = next[k[e]]++;
          op[p] = e;
          grouped[p] = payload[e];
        }
      } else {
        for (i64 e = lo; e < hi; ++e) op[next[k[e]]++] = e;
      }
    });
  }
}

}  // namespace

// keys [E] int64 in [0, num_groups). Returns (rowptr [num_groups + 1], order [E]): see stable_group.
std::tuple<at::Tensor, at::Tensor> group_by(const at::Tensor& keys, int64_t num_groups) {
  check_tensor(keys, "keys", at::kLong, 1);
  TORCH_CHECK_VALUE(num_groups >= 0, "num_groups must be >= 0, got ", num_groups);
  at::Tensor rowptr = at::empty({num_groups + 1}, keys.options());
  at::Tensor order = at::empty({keys.numel()}, keys.options());
  stable_group(keys.data_ptr<i64>(), keys.numel(), num_groups, rowptr.data_ptr<i64>(), order.data_ptr<i64>(),
               nullptr, nullptr, "keys");
  return {rowptr, order};
}

// The in-edge CSR of a graph from its edge list (source [E], destination [E], ids in [0, n)):
// (rowptr [n + 1], source grouped by destination [E], edge_id [E]), entries of a row in edge order.
// The sources are written in the counting sort's scatter, not gathered afterwards.
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_edge_csr(const at::Tensor& source, const at::Tensor& destination,
                                                           int64_t num_nodes) {
  check_tensor(source, "source", at::kLong, 1);
  check_tensor(destination, "destination", at::kLong, 1);
  TORCH_CHECK_VALUE(num_nodes >= 0, "num_nodes must be >= 0, got ", num_nodes);
  const i64 E = destination.numel();
  TORCH_CHECK_VALUE(source.numel() == E, "source and destination must have one entry per edge, got ",
                    source.numel(), " and ", E);
  const i64* sp = source.data_ptr<i64>();
  int in_range = 1;
  const int nt = E >= (1 << 18) ? max_threads() : 1;
#pragma omp parallel for num_threads(nt) reduction(& : in_range) schedule(static) if (nt > 1)
  for (i64 e = 0; e < E; ++e) in_range &= (sp[e] >= 0) & (sp[e] < num_nodes);
  TORCH_CHECK_VALUE(in_range, "source ids must lie in [0, num_nodes = ", num_nodes, ")");
  at::Tensor rowptr = at::empty({num_nodes + 1}, source.options());
  at::Tensor grouped = at::empty({E}, source.options());
  at::Tensor edge_id = at::empty({E}, source.options());
  stable_group(destination.data_ptr<i64>(), E, num_nodes, rowptr.data_ptr<i64>(), edge_id.data_ptr<i64>(), sp,
               grouped.data_ptr<i64>(), "destination ids");
  return {rowptr, grouped, edge_id};
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
