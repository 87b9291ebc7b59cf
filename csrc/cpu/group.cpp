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

}  // namespace fm
