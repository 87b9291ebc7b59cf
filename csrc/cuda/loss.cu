// Matched layer fused with the activation-matching loss: aggregation at the T target rows ->
// activation -> h - target -> per-row squared error (double) and d loss / d pre, h never written;
// then the per-component loss. Contract: fastmetamer/ops/loss/reference.py.
//
// Rows: row_tiles (common.cuh), a warp per target row, a block per hub row; a row's squared error
// is summed in double over its lanes (and warps) in a fixed order. Components: a block per
// component sums its rows' errors in double over the rows listed in row order by the caller's
// stable sort (order, seg_ptr), in a fixed order. No atomics: bitwise reproducible.
#include "common.cuh"

namespace fm {
namespace {

struct LossArgs {
  const i64* rowptr;  // [T + 1]
  const i64* col;
  const float* weight;
  const float* x;          // [m, f]
  const float* target;     // [T, f]
  const i64* component;    // [T], in [0, C)
  const float* scale;      // [C]
  const float* bias;       // [f] or null
  float* grad_pre;         // [T, f]
  double* row_loss;        // [T]: ||act(pre[t]) - target[t]||^2
  i64 T, f;
};

// Target row t: pre = A x + bias, diff = act(pre) - target[t]; grad_pre[t] = 2 diff / s * act'(pre)
// (s = scale[component[t]]); this thread's share of ||diff||^2 accumulates in `squares`.
template <int A>
struct LossRow : WeightedGather {
  LossArgs a;
  i64 t;
  float s;
  double squares = 0.0;
  __device__ LossRow(const LossArgs& args, i64 row)
      : WeightedGather{args.x, args.f}, a(args), t(row), s(args.scale[args.component[row]]) {}
  __device__ void finish(i64 j, float sum) {
    if (j >= a.f) return;
    const float pre = a.bias ? sum + a.bias[j] : sum;
    const float diff = act_apply<A>(pre) - a.target[t * a.f + j];
    squares = fma(double(diff), double(diff), squares);
    a.grad_pre[t * a.f + j] = 2.f * diff / s * act_deriv<A>(pre);
  }
};

template <int A, bool HUB>
__global__ void loss_rows_kernel(const LossArgs a) {
  for_each_row<HUB>(a.rowptr, a.T, [&](i64 t, i64 b, i64 e) {
    LossRow<A> op(a, t);
    row_tiles<HUB>(op, b, e, a.f, a.col, a.weight);
    const double total = group_sum<HUB>(op.squares);
    if (threadIdx.x % (HUB ? ROW_THREADS : WARP) == 0) a.row_loss[t] = total;
  });
}

// loss[c] = (sum of row_loss[order[r]] over r in [seg_ptr[c], seg_ptr[c + 1])) / scale[c], a block
// per component (grid-stride), each thread summing a strided share in double, then group_sum.
__global__ void component_loss_kernel(const i64* seg_ptr, const i64* order,
                                                               const double* row_loss, const float* scale, i64 C,
                                                               float* loss) {
  for (i64 c = blockIdx.x; c < C; c += gridDim.x) {
    double sum = 0.0;
    for (i64 r = seg_ptr[c] + threadIdx.x; r < seg_ptr[c + 1]; r += ROW_THREADS) sum += row_loss[order[r]];
    sum = group_sum<true>(sum);
    if (threadIdx.x == 0) loss[c] = static_cast<float>(sum / double(scale[c]));
  }
}

}  // namespace
}  // namespace fm

using fm::i64;

// grad_pre [T, f] and loss [C] of the matched layer. Scratch from the caller: row_loss (double [T]);
// order [T] (a stable argsort of component) and seg_ptr [C + 1] (component c's rows are
// order[seg_ptr[c]:seg_ptr[c + 1]]). bias may be null.
FM_API int fm_matched_loss(const i64* rowptr, const i64* col, const float* weight, const float* x,
                           const float* target, const i64* component, const float* scale, const float* bias,
                           const i64* order, const i64* seg_ptr, double* row_loss, float* loss, float* grad_pre,
                           i64 T, i64 f, i64 C, i64 act, cudaStream_t stream) {
  const fm::LossArgs args{rowptr, col, weight, x, target, component, scale, bias, grad_pre, row_loss, T, f};
  cudaError_t err = cudaSuccess;
  FM_DISPATCH_ACT(act, err = fm::launch_rows(fm::loss_rows_kernel<A, false>, fm::loss_rows_kernel<A, true>, args, T,
                                             stream));
  if (err != cudaSuccess || C <= 0) return err;
  fm::component_loss_kernel<<<fm::blocks_for(C, 1), fm::ROW_THREADS, 0, stream>>>(seg_ptr, order, row_loss, scale,
                                                                                  C, loss);
  return cudaGetLastError();
}
