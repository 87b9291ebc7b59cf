// Matched layer fused with the activation-matching loss: aggregation at the T target rows ->
// activation -> h - target -> per-row squared error and d loss / d pre, h never written.
// Contract: fastmetamer/ops/loss/reference.py.
#include "fast_math.h"  // first: FP options and SIMD clones
#include "activations.h"
#include "common.h"

#include <cstring>

namespace fm {
namespace {

// Target rows [r0, r1): pre = A x + bias (in acc), per_row[t] = ||act(pre) - target[t]||^2 (in
// double), grad_pre[t] = 2 (act(pre) - target[t]) / scale[comp[t]] * act'(pre).
template <int A>
FM_SIMD_CLONES void loss_rows(i64 r0, i64 r1, float* __restrict acc, const i64* rowptr, const i64* col,
                              const float* w, const float* x, i64 f, const float* bias, const float* target,
                              const i64* comp, const float* scale, double* per_row, float* grad_pre) {
  for (i64 t = r0; t < r1; ++t) {
#pragma omp simd
    for (i64 c = 0; c < f; ++c) acc[c] = 0.f;
    for (i64 e = rowptr[t]; e < rowptr[t + 1]; ++e) {
      const float we = w[e];
      const float* __restrict xr = x + col[e] * f;
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] += we * xr[c];
    }
    if (bias) {
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] += bias[c];
    }
    const float* __restrict tr = target + t * f;
    float* __restrict gr = grad_pre + t * f;
    const float s = scale[comp[t]];
    double sq = 0.0;
#pragma omp simd reduction(+ : sq)
    for (i64 c = 0; c < f; ++c) {
      const float pre = acc[c];
      const float diff = act_apply<A>(pre) - tr[c];
      sq += double(diff) * double(diff);
      gr[c] = 2.f * diff / s * act_deriv<A>(pre);
    }
    per_row[t] = sq;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> matched_loss(const at::Tensor& rowptr, const at::Tensor& col,
                                                const at::Tensor& weight, const at::Tensor& x,
                                                const at::Tensor& target, const at::Tensor& component,
                                                const at::Tensor& scale, const c10::optional<at::Tensor>& bias,
                                                int64_t act) {
  check_tensor(x, "x", at::kFloat, 2);
  check_tensor(target, "target", at::kFloat, 2);
  check_tensor(component, "component", at::kLong, 1);
  check_tensor(scale, "scale", at::kFloat, 1);
  const i64 m = x.size(0), f = x.size(1);
  const i64 T = check_csr(rowptr, col, &weight, m, "matched_loss");
  TORCH_CHECK_VALUE(target.size(0) == T && target.size(1) == f, "target must have shape [", T, ", ", f,
                    "] (CSR rows, features of x), got ", target.sizes());
  TORCH_CHECK_VALUE(component.numel() == T, "component must have ", T, " entries, got ", component.numel());
  TORCH_CHECK_VALUE(act >= 0 && act < NUM_ACTS, "unknown activation code ", act);
  const i64 C = scale.numel();
  const i64* comp = component.data_ptr<i64>();
  bool ok = true;
  for (i64 t = 0; t < T; ++t) ok &= (comp[t] >= 0) & (comp[t] < C);
  TORCH_CHECK_VALUE(ok, "component entries must lie in [0, ", C, ")");
  const float* bias_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", at::kFloat, 1);
    TORCH_CHECK_VALUE(bias->numel() == f, "bias must have ", f, " entries, got ", bias->numel());
    bias_p = bias->data_ptr<float>();
  }
  at::Tensor grad_pre = at::empty({T, f}, x.options());
  std::vector<double> per_row(T, 0.0);
  if (T > 0 && f > 0) {
    const i64* rp = rowptr.data_ptr<i64>();
    const i64* cp = col.data_ptr<i64>();
    const float* wp = weight.data_ptr<float>();
    const float* xp = x.data_ptr<float>();
    const float* tp = target.data_ptr<float>();
    const float* sp = scale.data_ptr<float>();
    float* gp = grad_pre.data_ptr<float>();
    double* prp = per_row.data();
    FM_DISPATCH_ACT(act, parallel_csr_rows(rp, T, f, cheap_deriv<A>() ? 6 * f : 20 * f, f,
                                           [&](i64 r0, i64 r1, float* acc) {
                                             loss_rows<A>(r0, r1, acc, rp, cp, wp, xp, f, bias_p, tp, comp, sp,
                                                          prp, gp);
                                           }));
  }
  // Deterministic reduction: per-row sums added per component in row order.
  std::vector<double> sums(C, 0.0);
  for (i64 t = 0; t < T; ++t) sums[comp[t]] += per_row[t];
  at::Tensor loss = at::empty({C}, x.options());
  float* lp = loss.data_ptr<float>();
  const float* sp = scale.data_ptr<float>();
  for (i64 c = 0; c < C; ++c) lp[c] = static_cast<float>(sums[c] / double(sp[c]));
  return {loss, grad_pre};
}

}  // namespace fm
