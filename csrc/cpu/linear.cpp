// The gradient of a first layer x @ W with respect to x: out [F, d] (+)= grad [F, f] @ W^T
// (W [d, f]), in row tiles of product_tile_rows(d) (common.h) that run in parallel, one thread
// each. The inner size f is the hidden width (tens) and d the feature width (thousands).
#include "common.h"

namespace fm {

void check_input_grad(const at::Tensor& grad, const at::Tensor& weight, i64 F, i64 d) {
  check_tensor(grad, "grad", at::kFloat, 2);
  check_tensor(weight, "weight", at::kFloat, 2);
  const i64 f = grad.size(1);
  TORCH_CHECK_VALUE(grad.size(0) == F, "grad must have ", F, " rows, got ", grad.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == d && weight.size(1) == f, "weight must be [", d, ", ", f, "], got ",
                    weight.sizes());
}

void linear_input_grad(at::Tensor out, const at::Tensor& grad, const at::Tensor& weight, bool accumulate) {
  check_tensor(out, "out", at::kFloat, 2);
  const i64 F = out.size(0), d = out.size(1);
  check_input_grad(grad, weight, F, d);
  if (F == 0 || d == 0) return;
  if (grad.size(1) == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const at::Tensor transposed = weight.t();
  for_product_tiles(F, d, [&](i64 r0, i64 rows, at::Tensor&) {
    at::Tensor slice = out.narrow(0, r0, rows);
    if (accumulate) {
      slice.addmm_(grad.narrow(0, r0, rows), transposed);
    } else {
      at::mm_out(slice, grad.narrow(0, r0, rows), transposed);
    }
  });
}

}  // namespace fm
