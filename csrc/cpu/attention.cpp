// Edge-weighted softmax over each CSR row's entries (the attention coefficients of GAT-type
// layers) and its backward. Contracts: edge_softmax / edge_softmax_backward in
// fastmetamer/ops/aggregate/reference.py.
//
// Every row is computed by one thread, entries in order, so results do not depend on the thread
// count; rows are split into chunks of similar cost run in parallel.
#include "common.h"

#include <cmath>
#include <limits>

namespace fm {
namespace {

constexpr float MAX_EXPONENT = 60.f;
constexpr float SOFTMAX_EPS = 1e-16f;

// rowptr [n + 1] starting at 0, non-decreasing, ending at E.
void check_rows(const at::Tensor& rowptr, i64 E, const char* what) {
  check_tensor(rowptr, "rowptr", at::kLong, 1);
  TORCH_CHECK_VALUE(rowptr.numel() >= 1, what, ": rowptr must have n + 1 >= 1 entries");
  const i64* rp = rowptr.data_ptr<i64>();
  const i64 n = rowptr.numel() - 1;
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[n] == E, what, ": rowptr must start at 0 and end at the ", E,
                    " entries (got ", rp[0], " .. ", rp[n], ")");
  bool monotone = true;
  for (i64 i = 0; i < n; ++i) monotone &= rp[i] <= rp[i + 1];
  TORCH_CHECK_VALUE(monotone, what, ": rowptr must be non-decreasing");
}

// Rows [r0, r1): alpha, beta [E, H]; `top` and `denom` are per-head scratch of H floats each.
void softmax_rows(i64 r0, i64 r1, const i64* rp, const float* logit, const float* w, i64 H, float* alpha,
                  float* beta, float* top, float* denom) {
  for (i64 i = r0; i < r1; ++i) {
    const i64 e0 = rp[i], e1 = rp[i + 1];
    for (i64 h = 0; h < H; ++h) top[h] = -std::numeric_limits<float>::infinity();
    for (i64 e = e0; e < e1; ++e)
      if (w[e] > 0.f)
        for (i64 h = 0; h < H; ++h) top[h] = std::max(top[h], logit[e * H + h]);
    for (i64 h = 0; h < H; ++h) {
      if (!std::isfinite(top[h])) top[h] = 0.f;
      denom[h] = 0.f;
    }
    for (i64 e = e0; e < e1; ++e)
      for (i64 h = 0; h < H; ++h) {
        const float ex = std::exp(std::min(logit[e * H + h] - top[h], MAX_EXPONENT));
        beta[e * H + h] = ex;
        denom[h] += w[e] * ex;
      }
    for (i64 h = 0; h < H; ++h) denom[h] += SOFTMAX_EPS;
    for (i64 e = e0; e < e1; ++e)
      for (i64 h = 0; h < H; ++h) {
        const float ex = beta[e * H + h];
        alpha[e * H + h] = (w[e] * ex) / denom[h];
        beta[e * H + h] = ex / denom[h];
      }
  }
}

// Rows [r0, r1): grad_logits [E, H], grad_weight [E]; `dot` is per-head scratch of H floats.
void softmax_backward_rows(i64 r0, i64 r1, const i64* rp, const float* alpha, const float* beta, const float* g,
                           i64 H, float* grad_logit, float* grad_w, float* dot) {
  for (i64 i = r0; i < r1; ++i) {
    const i64 e0 = rp[i], e1 = rp[i + 1];
    for (i64 h = 0; h < H; ++h) dot[h] = 0.f;
    for (i64 e = e0; e < e1; ++e)
      for (i64 h = 0; h < H; ++h) dot[h] += alpha[e * H + h] * g[e * H + h];
    for (i64 e = e0; e < e1; ++e) {
      float gw = 0.f;
      for (i64 h = 0; h < H; ++h) {
        const float centred = g[e * H + h] - dot[h];
        grad_logit[e * H + h] = alpha[e * H + h] * centred;
        gw += beta[e * H + h] * centred;
      }
      grad_w[e] = gw;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> edge_softmax(const at::Tensor& rowptr, const at::Tensor& logits,
                                                const at::Tensor& weight) {
  check_tensor(logits, "logits", at::kFloat, 2);
  check_tensor(weight, "weight", at::kFloat, 1);
  const i64 E = logits.size(0), H = logits.size(1);
  TORCH_CHECK_VALUE(weight.numel() == E, "edge_softmax: weight has ", weight.numel(), " entries, logits ", E);
  check_rows(rowptr, E, "edge_softmax");
  at::Tensor alpha = at::empty_like(logits), beta = at::empty_like(logits);
  if (E == 0 || H == 0) return {alpha, beta};
  const i64* rp = rowptr.data_ptr<i64>();
  const float* lp = logits.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* ap = alpha.data_ptr<float>();
  float* bp = beta.data_ptr<float>();
  parallel_csr_rows(rp, rowptr.numel() - 1, 4 * H, H, 2 * H, [&](i64 r0, i64 r1, float* buf) {
    softmax_rows(r0, r1, rp, lp, wp, H, ap, bp, buf, buf + H);
  });
  return {alpha, beta};
}

std::tuple<at::Tensor, at::Tensor> edge_softmax_backward(const at::Tensor& rowptr, const at::Tensor& alpha,
                                                         const at::Tensor& beta, const at::Tensor& grad_alpha) {
  check_tensor(alpha, "alpha", at::kFloat, 2);
  check_tensor(beta, "beta", at::kFloat, 2);
  check_tensor(grad_alpha, "grad_alpha", at::kFloat, 2);
  TORCH_CHECK_VALUE(beta.sizes() == alpha.sizes() && grad_alpha.sizes() == alpha.sizes(),
                    "edge_softmax_backward: alpha, beta and grad_alpha must have one shape, got ", alpha.sizes(),
                    ", ", beta.sizes(), ", ", grad_alpha.sizes());
  const i64 E = alpha.size(0), H = alpha.size(1);
  check_rows(rowptr, E, "edge_softmax_backward");
  at::Tensor grad_logits = at::empty_like(alpha);
  at::Tensor grad_weight = at::zeros({E}, alpha.options());
  if (E == 0 || H == 0) return {grad_logits, grad_weight};
  const i64* rp = rowptr.data_ptr<i64>();
  const float* ap = alpha.data_ptr<float>();
  const float* bp = beta.data_ptr<float>();
  const float* gp = grad_alpha.data_ptr<float>();
  float* glp = grad_logits.data_ptr<float>();
  float* gwp = grad_weight.data_ptr<float>();
  parallel_csr_rows(rp, rowptr.numel() - 1, 4 * H, H, H, [&](i64 r0, i64 r1, float* buf) {
    softmax_backward_rows(r0, r1, rp, ap, bp, gp, H, glp, gwp, buf);
  });
  return {grad_logits, grad_weight};
}

}  // namespace fm
