// The gradient of a first layer x @ W with respect to x: out [F, d] (+)= grad [F, f] @ W^T
// (W [d, f]). The inner size f is the hidden width (tens) and d the feature width (thousands),
// so the product is as large as x; one GEMM over all F rows streams it out to memory at about
// half the speed of the same GEMM done in tiles of rows whose slice of out stays in the core's
// cache (measured on AMD EPYC with MKL: 21 against 44 GFLOPS a thread, F = 19,200, f = 64,
// d = 1,433). The tiles run in parallel, one thread each.
#include "common.h"

namespace fm {
namespace {

// Bytes of out a tile writes: about half of a core's L2 cache.
constexpr i64 TILE_BYTES = 384 * 1024;

}  // namespace

void linear_input_grad(at::Tensor out, const at::Tensor& grad, const at::Tensor& weight, bool accumulate) {
  check_tensor(out, "out", at::kFloat, 2);
  check_tensor(grad, "grad", at::kFloat, 2);
  check_tensor(weight, "weight", at::kFloat, 2);
  const i64 F = grad.size(0), f = grad.size(1), d = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == f, "weight must be [d, ", f, "] (grad is [F, ", f, "]), got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(out.size(0) == F && out.size(1) == d, "out must be [", F, ", ", d, "], got ", out.sizes());
  if (F == 0 || d == 0) return;
  if (f == 0) {
    if (!accumulate) out.zero_();
    return;
  }
  const i64 tile = std::max<i64>(8, TILE_BYTES / (static_cast<i64>(sizeof(float)) * d));
  const at::Tensor transposed = weight.t();
  at::parallel_for(0, (F + tile - 1) / tile, 1, [&](i64 t0, i64 t1) {
    for (i64 t = t0; t < t1; ++t) {
      const i64 r0 = t * tile, rows = std::min(F, r0 + tile) - r0;
      at::Tensor slice = out.narrow(0, r0, rows);
      if (accumulate) {
        slice.addmm_(grad.narrow(0, r0, rows), transposed);
      } else {
        at::mm_out(slice, grad.narrow(0, r0, rows), transposed);
      }
    }
  });
}

}  // namespace fm
