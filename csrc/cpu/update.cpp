// Binary straight-through feature update: top-k selection per row block (top_mask) and the fused
// margin + straight-through + Adam step with the clamp of the logits (adam_ste_update). Contract:
// fastmetamer/ops/update/reference.py.
#include "fast_math.h"  // first: FP options and SIMD clones
#include "common.h"

#include <cmath>
#include <functional>
#include <algorithm>
#include <limits>
#include <cstring>
#include <vector>

namespace fm {
namespace {

// ---------------------------------------------------------------- leaf kernels (SIMD clones)
FM_SIMD_CLONES void sigmoid_into(float* __restrict p, const float* __restrict th, i64 cnt, float s) {
  for (i64 i = 0; i < cnt; ++i) p[i] = fast_sigmoid(s * th[i]);
}

// out[i] = key[i] >= v (key may be out itself).
FM_SIMD_CLONES void mark_ge(const float* key, float* out, i64 cnt, float v) {
#pragma omp simd
  for (i64 i = 0; i < cnt; ++i) out[i] = key[i] >= v ? 1.f : 0.f;
}

// Appends the entries of p[lo, hi) >= bound to `value` and their positions to `index`, in memory
// order. Groups of 16 entries are first tested with a vectorised count; only groups holding a
// candidate are visited one by one (feature densities are a few percent).
FM_SIMD_CLONES void collect_ge(const float* p, i64 lo, i64 hi, float bound, std::vector<float>& value,
                               std::vector<i64>& index) {
  constexpr int G = 16;
  auto take = [&](i64 i) {
    if (p[i] >= bound) {
      value.push_back(p[i]);
      index.push_back(i);
    }
  };
  i64 i = lo;
  for (; i + G <= hi; i += G) {
    int hits = 0;
#pragma omp simd reduction(+ : hits)
    for (int r = 0; r < G; ++r) hits += p[i + r] >= bound;
    if (hits == 0) continue;
    for (int r = 0; r < G; ++r) take(i + r);
  }
  for (; i < hi; ++i) take(i);
}

// One row chunk of the fused margin + straight-through + Adam step and the clamp to [-bound, bound].
FM_SIMD_CLONES void adam_rows(i64 r0, i64 r1, i64 d, float* th, const float* gx, float* m1, float* m2,
                              const float* thr, const float* ms, const bool* active, float s, float mg,
                              float b1, float c1, float b2, float c2, float ibc1, float ibc2, float ep, float lr,
                              float bound) {
  for (i64 r = r0; r < r1; ++r) {
    const float t = thr[r], msr = ms[r], lra = active[r] ? lr : 0.f;
    float* __restrict tr = th + r * d;
    const float* __restrict gr = gx + r * d;
    float* __restrict ar = m1 + r * d;
    float* __restrict vr = m2 + r * d;
#pragma omp simd
    for (i64 c = 0; c < d; ++c) {
      const float p = fast_sigmoid(s * tr[c]);
      const float gap = p - t;
      const float sign = (gap > 0.f ? 1.f : 0.f) - (gap < 0.f ? 1.f : 0.f);
      const float near = std::fabs(gap) < mg ? 1.f : 0.f;
      const float gp = gr[c] - msr * sign * near;
      const float g = gp * s * p * (1.f - p);
      const float mv = ar[c] * b1 + c1 * g;
      const float vv = vr[c] * b2 + c2 * g * g;
      ar[c] = mv;
      vr[c] = vv;
      const float denom = std::sqrt(vv * ibc2) + ep;
      const float next = tr[c] - lra * ((mv * ibc1) / denom);
      // the projection of every row (active or not): clamp to [-bound, bound]; NaN stays NaN
      tr[c] = next < -bound ? -bound : (next > bound ? bound : next);
    }
  }
}

// ---------------------------------------------------------------- selection
inline i64 chunk_lo(i64 cnt, int tid, int team) { return cnt * tid / team; }

// Runs body(lo, hi, tid) over `team` equal chunks of [0, cnt) (in parallel when team > 1).
template <class Body>
void chunked(i64 cnt, int team, Body&& body) {
  if (team <= 1) {
    body(i64(0), cnt, 0);
    return;
  }
#pragma omp parallel num_threads(team)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
#else
    const int tid = 0, nthr = 1;
#endif
    if (nthr == team) {
      body(chunk_lo(cnt, tid, team), chunk_lo(cnt, tid + 1, team), tid);
    } else if (tid == 0) {  // the runtime gave fewer threads: do every chunk here
      for (int q = 0; q < team; ++q) body(chunk_lo(cnt, q, team), chunk_lo(cnt, q + 1, team), q);
    }
  }
}

// The k-th and (k+1)-th largest of a block and how many entries exceed the k-th.
struct Kth {
  float vk;      // k-th largest
  float next;    // (k+1)-th largest
  i64 greater;   // how many entries exceed vk
};

// The entries of a block that can be among its k + 1 largest (value, position in the block), in
// memory order; `all`: every entry of the block (then value and index stay empty: read the block).
struct Candidates {
  std::vector<float> value;
  std::vector<i64> index;
  bool all = true;
};

// Kth of values[0:n), 0 < k < n, with std::nth_element (values are reordered; no sort).
Kth kth_among(float* values, i64 n, i64 k) {
  std::nth_element(values, values + k, values + n, std::greater<float>());
  const float next = values[k];  // (k+1)-th largest
  float vk = values[0];          // k-th largest = the minimum of the k largest
  for (i64 i = 1; i < k; ++i) vk = values[i] < vk ? values[i] : vk;
  i64 greater = 0;               // every entry > vk is among the k largest
  for (i64 i = 0; i < k; ++i) greater += values[i] > vk;
  return {vk, next, greater};
}

// The candidates of p[0:cnt) for its k + 1 largest, 0 < k < cnt, in one pass over p. When k is a
// small share of the block, a strided sample gives a bound L that the k + 1 largest very probably
// reach, and only the entries >= L are kept (team threads each collect a chunk). If the sample
// misled (fewer than k + 1 entries >= L), or k is not small, every entry is a candidate.
Candidates candidates_of(const float* p, i64 cnt, i64 k, std::vector<float>& scratch, int team) {
  Candidates found;
  if (cnt < 512 || (k + 1) * 8 > cnt) return found;
  // sample size ~ c sqrt(cnt): balances selecting in the sample against selecting among the
  // candidates it lets through (c tuned on Cora-sized blocks: 1433 .. 3.9M entries)
  const double c = cnt < (1 << 15) ? 4.0 : 12.0;
  const i64 S = std::min<i64>(cnt / 4, std::clamp<i64>(static_cast<i64>(c * std::sqrt(double(cnt))), 64, 1 << 15));
  if (static_cast<i64>(scratch.size()) < S) scratch.resize(S);
  float* sc = scratch.data();
  for (i64 i = 0; i < S; ++i) sc[i] = p[static_cast<i64>((static_cast<double>(i) + 0.5) * cnt / S)];
  const double expect = static_cast<double>(k + 1) * S / cnt;
  const i64 r = static_cast<i64>(std::ceil(expect + 4.0 * std::sqrt(expect) + 8.0));  // 1-based rank
  if (r >= S) return found;
  std::nth_element(sc, sc + (r - 1), sc + S, std::greater<float>());
  const float bound = sc[r - 1];
  std::vector<Candidates> parts(team);
  chunked(cnt, team, [&](i64 lo, i64 hi, int tid) {
    Candidates& part = parts[tid];
    const i64 guess = 2 * (k + 1) * (hi - lo) / cnt + 64;
    part.value.reserve(guess);
    part.index.reserve(guess);
    collect_ge(p, lo, hi, bound, part.value, part.index);
  });
  for (Candidates& part : parts) {
    found.value.insert(found.value.end(), part.value.begin(), part.value.end());
    found.index.insert(found.index.end(), part.index.begin(), part.index.end());
  }
  found.all = static_cast<i64>(found.value.size()) < k + 1;
  if (found.all) {
    found.value.clear();
    found.index.clear();
  }
  return found;
}

// Kth of p[0:cnt), 0 < k < cnt, selected among its candidates (copied to scratch).
Kth kth_of(const float* p, i64 cnt, i64 k, const Candidates& candidates, std::vector<float>& scratch, int team) {
  if (candidates.all) {
    if (static_cast<i64>(scratch.size()) < cnt) scratch.resize(cnt);
    float* sc = scratch.data();
    chunked(cnt, team, [&](i64 lo, i64 hi, int) { std::memcpy(sc + lo, p + lo, sizeof(float) * (hi - lo)); });
    return kth_among(sc, cnt, k);
  }
  scratch.assign(candidates.value.begin(), candidates.value.end());
  return kth_among(scratch.data(), static_cast<i64>(scratch.size()), k);
}

// Selects in one block of theta and writes its hard mask to `out`; returns the block threshold.
// For slope > 0, P = sigmoid(s theta) is non-decreasing in theta: the k largest theta are k
// largest P, and P's order statistics are the sigmoid of theta's, so the selection runs on theta
// directly (no sigmoid pass over the block). Otherwise P is computed into `out` and selected on.
// `team` threads work inside the block (1 for the small blocks that run in parallel).
float select_block(float* out, const float* th, i64 cnt, i64 kc, float s, std::vector<float>& scratch, int team) {
  const bool by_theta = s > 0.f;
  const float* key = th;
  if (!by_theta) {
    chunked(cnt, team, [&](i64 lo, i64 hi, int) { sigmoid_into(out + lo, th + lo, hi - lo, s); });
    key = out;
  }
  auto to_p = [&](float v) { return by_theta ? fast_sigmoid(s * v) : v; };
  if (kc <= 0 || kc >= cnt) {
    float lo_v = std::numeric_limits<float>::infinity(), hi_v = -lo_v;
    for (i64 i = 0; i < cnt; ++i) {
      lo_v = key[i] < lo_v ? key[i] : lo_v;
      hi_v = key[i] > hi_v ? key[i] : hi_v;
    }
    const float fill = kc <= 0 ? 0.f : 1.f;
    chunked(cnt, team, [&](i64 lo, i64 hi, int) { std::fill(out + lo, out + hi, fill); });
    return kc <= 0 ? to_p(hi_v) + 1e-6f : to_p(lo_v) - 1e-6f;
  }
  const auto [vk, next, greater] = kth_of(key, cnt, kc, candidates_of(key, cnt, kc, scratch, team), scratch, team);
  if (next < vk) {  // no tie across the boundary: exactly the entries >= vk
    chunked(cnt, team, [&](i64 lo, i64 hi, int) { mark_ge(key + lo, out + lo, hi - lo, vk); });
  } else {
    // Ties at the k-th value: all entries > vk, then the first (memory order) ties up to k.
    // Pass 1 marks > vk and flags ties with -1; pass 2 resolves the flags chunk by chunk.
    std::vector<i64> ties(team + 1, 0);
    chunked(cnt, team, [&](i64 lo, i64 hi, int tid) {
      i64 mine = 0;
      for (i64 i = lo; i < hi; ++i) {
        const float v = key[i];
        mine += v == vk;
        out[i] = v > vk ? 1.f : (v == vk ? -1.f : 0.f);
      }
      ties[tid + 1] = mine;
    });
    const i64 needed = kc - greater;
    for (int q = 0; q < team; ++q) ties[q + 1] += ties[q];  // prefix: ties before each chunk
    chunked(cnt, team, [&](i64 lo, i64 hi, int tid) {
      if (ties[tid + 1] == ties[tid]) return;
      i64 before = ties[tid];
      for (i64 i = lo; i < hi; ++i)
        if (out[i] == -1.f) out[i] = (before++ < needed) ? 1.f : 0.f;
    });
  }
  return 0.5f * (to_p(vk) + to_p(next));
}

// Blocks at least this large (entries) are processed with all threads inside the block.
constexpr i64 BIG_BLOCK = 1 << 17;

// Runs run(c, scratch, team) for every non-empty block c of the row offsets pp [C + 1] (d
// entries per row): small blocks in parallel (one thread each), big ones (at least BIG_BLOCK
// entries and more than 1/threads of all) one after the other with all threads inside.
template <class Run>
void for_blocks(const i64* pp, i64 C, i64 d, Run&& run) {
  const int nt = max_threads();
  const i64 total = (pp[C] - pp[0]) * d;
  std::vector<i64> small, big;
  i64 small_total = 0;
  for (i64 c = 0; c < C; ++c) {
    const i64 cnt = (pp[c + 1] - pp[c]) * d;
    if (cnt == 0) continue;
    if (nt > 1 && cnt >= BIG_BLOCK && cnt * nt > total) {  // too big a share to run beside others
      big.push_back(c);
    } else {
      small.push_back(c);
      small_total += cnt;
    }
  }
  if (!small.empty()) {
    const i64 ns = static_cast<i64>(small.size());
    const int team = (nt > 1 && ns > 1 && small_total >= SERIAL_WORK) ? nt : 1;
    if (team == 1) {
      std::vector<float> scratch;
      for (i64 c : small) run(c, scratch, 1);
    } else {
#pragma omp parallel num_threads(team)
      {
        std::vector<float> scratch;
#pragma omp for schedule(dynamic, 1)
        for (i64 q = 0; q < ns; ++q) run(small[q], scratch, 1);
      }
    }
  }
  std::vector<float> scratch;
  for (i64 c : big) run(c, scratch, nt);
}

// Checks theta [F, d], ptr [C + 1] (non-decreasing offsets within [0, F]) and k [C].
void check_blocks(const at::Tensor& theta, const at::Tensor& ptr, const at::Tensor& k) {
  check_tensor(theta, "theta", at::kFloat, 2);
  check_tensor(ptr, "ptr", at::kLong, 1);
  check_tensor(k, "k", at::kLong, 1);
  const i64 F = theta.size(0);
  TORCH_CHECK_VALUE(ptr.numel() >= 1, "ptr must have C + 1 >= 1 entries");
  const i64 C = ptr.numel() - 1;
  TORCH_CHECK_VALUE(k.numel() == C, "k must have one entry per block (", C, "), got ", k.numel());
  const i64* pp = ptr.data_ptr<i64>();
  bool ok = pp[0] >= 0 && pp[C] <= F;
  for (i64 c = 0; c < C; ++c) ok &= pp[c] <= pp[c + 1];
  TORCH_CHECK_VALUE(ok, "ptr must be non-decreasing row offsets within [0, ", F, "]");
}

// Writes the columns of the ones of rows [0, rows) of key [rows, d] to cols and each row's
// count to counts: the entries > vk, and entries == vk while seen (ties met so far, updated)
// stays below ties. Groups of 16 entries without any entry >= vk are skipped after a
// vectorised test (feature densities are a few percent). Returns how many columns it wrote.
FM_SIMD_CLONES i64 write_ones(const float* key, i64 rows, i64 d, float vk, i64 ties, i64& seen, i64* counts,
                              i64* cols) {
  constexpr int G = 16;
  i64 out = 0;
  for (i64 r = 0; r < rows; ++r) {
    const float* kr = key + r * d;
    const i64 start = out;
    i64 c = 0;
    auto take = [&](i64 j) {
      const float v = kr[j];
      if (v > vk || (v == vk && seen++ < ties)) cols[out++] = j;
    };
    for (; c + G <= d; c += G) {
      int hits = 0;
#pragma omp simd reduction(+ : hits)
      for (int q = 0; q < G; ++q) hits += kr[c + q] >= vk;
      if (hits == 0) continue;
      for (int q = 0; q < G; ++q) take(c + q);
    }
    for (; c < d; ++c) take(c);
    counts[r] = out - start;
  }
  return out;
}

// (entries > vk, entries == vk) of p[0:cnt).
FM_SIMD_CLONES std::pair<i64, i64> count_gt_eq(const float* p, i64 cnt, float vk) {
  i64 gt = 0, eq = 0;
#pragma omp simd reduction(+ : gt, eq)
  for (i64 i = 0; i < cnt; ++i) {
    gt += p[i] > vk;
    eq += p[i] == vk;
  }
  return {gt, eq};
}

// The ones of one block (key [rows, d], block-relative) as columns and row counts: the
// entries > vk, and the first `ties` entries == vk in memory order. With team > 1 the rows are
// split over the threads: a counting pass ranks each chunk's ties and places its columns.
void block_ones(const float* key, i64 rows, i64 d, float vk, i64 ties, i64* counts, i64* cols, int team) {
  if (team <= 1) {
    i64 seen = 0;
    write_ones(key, rows, d, vk, ties, seen, counts, cols);
    return;
  }
  std::vector<i64> taken(team + 1, 0), equal(team + 1, 0);
  chunked(rows, team, [&](i64 lo, i64 hi, int tid) {
    const auto [gt, eq] = count_gt_eq(key + lo * d, (hi - lo) * d, vk);
    taken[tid + 1] = gt;
    equal[tid + 1] = eq;
  });
  for (int q = 0; q < team; ++q) {  // equal[q] holds the ties before chunk q once summed
    const i64 ties_here = std::clamp<i64>(ties - equal[q], 0, equal[q + 1]);
    equal[q + 1] += equal[q];
    taken[q + 1] += taken[q] + ties_here;
  }
  chunked(rows, team, [&](i64 lo, i64 hi, int tid) {
    i64 seen = equal[tid];
    write_ones(key + lo * d, hi - lo, d, vk, ties, seen, counts + lo, cols + taken[tid]);
  });
}

// The ones of one block from its candidates (positions in the block, memory order): those > vk
// and the first `ties` == vk, as columns, with each row's count added to counts (zero before).
void candidate_ones(const Candidates& candidates, i64 d, float vk, i64 ties, i64* counts, i64* cols) {
  i64 out = 0, seen = 0;
  for (size_t j = 0; j < candidates.value.size(); ++j) {
    const float v = candidates.value[j];
    if (v > vk || (v == vk && seen++ < ties)) {
      const i64 at = candidates.index[j];
      ++counts[at / d];
      cols[out++] = at % d;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> top_mask(const at::Tensor& theta, const at::Tensor& ptr, const at::Tensor& k,
                                            double slope) {
  check_blocks(theta, ptr, k);
  const i64 F = theta.size(0), d = theta.size(1), C = ptr.numel() - 1;
  const i64* pp = ptr.data_ptr<i64>();
  const i64* kp = k.data_ptr<i64>();
  const bool covers = pp[0] == 0 && pp[C] == F;
  // Rows outside every block (only when ptr does not cover [0, F)) get mask 0 and threshold 0.
  at::Tensor hard = covers ? at::empty({F, d}, theta.options()) : at::zeros({F, d}, theta.options());
  at::Tensor threshold = at::zeros({F}, theta.options());
  if (F == 0 || C == 0 || d == 0) return {hard, threshold};
  const float s = static_cast<float>(slope);
  const float* th = theta.data_ptr<float>();
  float* hp = hard.data_ptr<float>();
  float* tp = threshold.data_ptr<float>();
  for_blocks(pp, C, d, [&](i64 c, std::vector<float>& scratch, int team) {
    const i64 off = pp[c] * d, cnt = (pp[c + 1] - pp[c]) * d;
    const float t = select_block(hp + off, th + off, cnt, kp[c], s, scratch, team);
    for (i64 r = pp[c]; r < pp[c + 1]; ++r) tp[r] = t;
  });
  return {hard, threshold};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> top_mask_csr(const at::Tensor& theta, const at::Tensor& ptr,
                                                            const at::Tensor& k, double slope) {
  check_blocks(theta, ptr, k);
  const i64 F = theta.size(0), d = theta.size(1), C = ptr.numel() - 1;
  const i64* pp = ptr.data_ptr<i64>();
  const i64* kp = k.data_ptr<i64>();
  // Every block holds exactly clamp(k, 0, size) ones: its slice of col is known up front.
  std::vector<i64> start(C + 1, 0);
  for (i64 c = 0; c < C; ++c) start[c + 1] = start[c] + std::clamp<i64>(kp[c], 0, (pp[c + 1] - pp[c]) * d);
  at::Tensor counts = at::zeros({F}, ptr.options());
  at::Tensor col = at::empty({start[C]}, ptr.options());
  at::Tensor threshold = at::zeros({F}, theta.options());
  if (F > 0 && C > 0 && d > 0) {
    const float s = static_cast<float>(slope);
    const float* th = theta.data_ptr<float>();
    i64* cp = counts.data_ptr<i64>();
    i64* colp = col.data_ptr<i64>();
    float* tp = threshold.data_ptr<float>();
    for_blocks(pp, C, d, [&](i64 c, std::vector<float>& scratch, int team) {
      const i64 r0 = pp[c], rows = pp[c + 1] - pp[c], cnt = rows * d, kc = kp[c];
      std::vector<float> prob;  // the key is theta itself for slope > 0 (sigmoid is increasing)
      const float* key = th + r0 * d;
      if (s <= 0.f) {
        prob.resize(cnt);
        chunked(cnt, team, [&](i64 lo, i64 hi, int) { sigmoid_into(prob.data() + lo, key + lo, hi - lo, s); });
        key = prob.data();
      }
      auto to_p = [&](float v) { return s > 0.f ? fast_sigmoid(s * v) : v; };
      float t;
      if (kc <= 0 || kc >= cnt) {
        const auto [lo_v, hi_v] = std::minmax_element(key, key + cnt);
        t = kc <= 0 ? to_p(*hi_v) + 1e-6f : to_p(*lo_v) - 1e-6f;
        block_ones(key, rows, d, kc <= 0 ? std::numeric_limits<float>::infinity()
                                         : -std::numeric_limits<float>::infinity(),
                   0, cp + r0, colp + start[c], team);
      } else {
        const Candidates candidates = candidates_of(key, cnt, kc, scratch, team);
        const auto [vk, next, greater] = kth_of(key, cnt, kc, candidates, scratch, team);
        t = 0.5f * (to_p(vk) + to_p(next));
        if (candidates.all) {
          block_ones(key, rows, d, vk, kc - greater, cp + r0, colp + start[c], team);
        } else {
          candidate_ones(candidates, d, vk, kc - greater, cp + r0, colp + start[c]);
        }
      }
      for (i64 r = r0; r < pp[c + 1]; ++r) tp[r] = t;
    });
  }
  at::Tensor rowptr = at::zeros({F + 1}, ptr.options());
  if (F > 0) rowptr.narrow(0, 1, F).copy_(counts.cumsum(0));
  return {rowptr, col, threshold};
}

void adam_ste_update(at::Tensor theta, const c10::optional<at::Tensor>& grad_x, at::Tensor exp_avg,
                     at::Tensor exp_avg_sq, int64_t step, double lr, double beta1, double beta2, double eps,
                     double slope, const at::Tensor& threshold, double margin, const at::Tensor& margin_scale,
                     const at::Tensor& active, double bound, const c10::optional<at::Tensor>& grad_rows,
                     const c10::optional<at::Tensor>& weight) {
  check_tensor(theta, "theta", at::kFloat, 2);
  const i64 F = theta.size(0), d = theta.size(1);
  const bool product = grad_rows.has_value();
  TORCH_CHECK_VALUE(product == weight.has_value(), "grad_rows and weight come together (the product grad_rows @ "
                    "weight^T is added to grad_x)");
  TORCH_CHECK_VALUE(product || grad_x.has_value(), "grad_x is needed unless grad_rows and weight are given");
  std::vector<std::pair<const at::Tensor*, const char*>> same_shape{{&exp_avg, "exp_avg"},
                                                                    {&exp_avg_sq, "exp_avg_sq"}};
  if (grad_x) same_shape.emplace_back(&*grad_x, "grad_x");
  for (const auto& [t, name] : same_shape) {
    check_tensor(*t, name, at::kFloat, 2);
    TORCH_CHECK_VALUE(t->size(0) == F && t->size(1) == d, name, " must have the shape of theta ", theta.sizes(),
                      ", got ", t->sizes());
  }
  if (product) check_input_grad(*grad_rows, *weight, F, d);
  check_tensor(threshold, "threshold", at::kFloat, 1);
  check_tensor(margin_scale, "margin_scale", at::kFloat, 1);
  check_tensor(active, "active", at::kBool, 1);
  TORCH_CHECK_VALUE(threshold.numel() == F && margin_scale.numel() == F && active.numel() == F,
                    "threshold, margin_scale and active must have one entry per row of theta (", F, ")");
  TORCH_CHECK_VALUE(step >= 1, "step counts from 1, got ", step);
  TORCH_CHECK_VALUE(bound >= 0, "bound must be >= 0 (inf for no clamp), got ", bound);
  if (F == 0 || d == 0) return;
  float* th = theta.data_ptr<float>();
  float* m1 = exp_avg.data_ptr<float>();
  float* m2 = exp_avg_sq.data_ptr<float>();
  const float* tr = threshold.data_ptr<float>();
  const float* ms = margin_scale.data_ptr<float>();
  const bool* act = active.data_ptr<bool>();
  const float s = static_cast<float>(slope), mg = static_cast<float>(margin);
  const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = static_cast<float>(1.0 - beta1), c2 = static_cast<float>(1.0 - beta2);
  // bias corrections as reciprocals (torch divides a tensor by a scalar the same way)
  const float ibc1 = 1.f / static_cast<float>(1.0 - std::pow(beta1, double(step)));
  const float ibc2 = 1.f / static_cast<float>(1.0 - std::pow(beta2, double(step)));
  const float ep = static_cast<float>(eps), lrf = static_cast<float>(lr);
  const float bd = static_cast<float>(bound);  // rounded as torch.clamp_ rounds a scalar limit
  auto rows_with = [&](i64 r0, i64 r1, const float* gx) {  // gx: the gradient of rows [r0, r1)
    adam_rows(0, r1 - r0, d, th + r0 * d, gx, m1 + r0 * d, m2 + r0 * d, tr + r0, ms + r0, act + r0, s, mg, b1, c1,
              b2, c2, ibc1, ibc2, ep, lrf, bd);
  };
  if (!product) {
    const float* gx = grad_x->data_ptr<float>();
    at::parallel_for(0, F, std::max<i64>(1, SERIAL_WORK / d),
                     [&](i64 r0, i64 r1) { rows_with(r0, r1, gx + r0 * d); });
    return;
  }
  // The gradient grad_x + grad_rows @ weight^T, one tile of rows at a time into a buffer that
  // stays in cache for the update (the tiles of linear_input_grad: the same products).
  const at::Tensor transposed = weight->t();
  for_product_tiles(F, d, [&](i64 r0, i64 rows, at::Tensor& buffer) {
    if (!buffer.defined()) buffer = at::empty({product_tile_rows(d), d}, theta.options());
    at::Tensor slice = buffer.narrow(0, 0, rows);
    if (grad_x) {
      slice.copy_(grad_x->narrow(0, r0, rows)).addmm_(grad_rows->narrow(0, r0, rows), transposed);
    } else {
      at::mm_out(slice, grad_rows->narrow(0, r0, rows), transposed);
    }
    rows_with(r0, r0 + rows, slice.data_ptr<float>());
  });
}

}  // namespace fm
