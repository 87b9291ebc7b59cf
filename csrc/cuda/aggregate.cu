// CSR aggregation with fused epilogue (forward), its backward over the transposed CSR fused with the
// activation derivative, the edge-weight gradient (SDDMM), unit-weight propagation and the batched
// tangents A @ x[p]. Contracts: fastmetamer/ops/aggregate/reference.py.
//
// Every op but edge_grad is row_tiles (common.cuh) with its own gather and epilogue; each launches a
// warp-per-row kernel and a block-per-hub-row kernel over all rows. float32 data, int64 indices,
// all index arithmetic in int64; no atomics, so results are bitwise reproducible.
#include "common.cuh"

namespace fm {
namespace {

// relu bits of the 32 consecutive features j a warp finishes (j % 8 == lane % 8, so lanes 0, 8, 16
// and 24 each start a byte): bit j % 8 of byte j / 8 of `row_bits` is set where `positive` and
// j < f (the padding bits of a row's last byte stay 0). Every lane of the warp must call it.
__device__ __forceinline__ void store_relu_bits(uint8_t* row_bits, i64 j, i64 f, bool positive) {
  const int lane = threadIdx.x % WARP;
  const unsigned mask = __ballot_sync(FULL_MASK, positive && j < f);
  if (lane % 8 == 0 && j < f) row_bits[j / 8] = static_cast<uint8_t>(mask >> lane);
}

// ------------------------------------------------------------------------- forward
struct ForwardArgs {
  const i64* rowptr;
  const i64* col;
  const float* weight;
  const float* x;         // [m, f]
  const float* bias;      // [f] or null
  const float* residual;  // [n, f] or null
  float* out;             // [n, f]
  void* saved;            // relu: uint8 [n, ceil(f / 8)]; none: null; others: float pre [n, f]
  i64 n, f;
};

// Row i: pre = A x + bias, saved state, out = act(pre) + residual.
template <int A>
struct ForwardRow : WeightedGather {
  ForwardArgs a;
  i64 i;
  __device__ ForwardRow(const ForwardArgs& args, i64 row) : WeightedGather{args.x, args.f}, a(args), i(row) {}
  __device__ void finish(i64 j, float sum) const {
    const bool in = j < a.f;
    const float pre = (in && a.bias) ? sum + a.bias[j] : sum;
    if constexpr (A == ACT_RELU) {
      store_relu_bits(static_cast<uint8_t*>(a.saved) + i * ((a.f + 7) / 8), j, a.f, pre > 0.f);
    } else if constexpr (A != ACT_NONE) {
      if (in) static_cast<float*>(a.saved)[i * a.f + j] = pre;
    }
    if (in) {
      const float h = act_apply<A>(pre);
      a.out[i * a.f + j] = a.residual ? h + a.residual[i * a.f + j] : h;
    }
  }
};

template <int A, bool HUB>
__global__ void forward_kernel(const ForwardArgs a) {
  for_each_row<HUB>(a.rowptr, a.n, [&](i64 i, i64 b, i64 e) {
    ForwardRow<A> op(a, i);
    row_tiles<HUB>(op, b, e, a.f, a.col, a.weight);
  });
}

// ------------------------------------------------------------------------- backward
struct BackwardArgs {
  const i64* t_rowptr;  // A^T in CSR: [m + 1]
  const i64* t_col;     // [E], destination ids in [0, n)
  const float* t_weight;
  const float* grad_out;  // [n, f]
  const void* saved;      // the forward's saved state of the n destination rows
  float* grad_x;          // [m, f]
  i64 m, f;
};

// Row r of A^T: grad_x[r] = sum_e w[e] * (grad_out[i] * act'(pre[i])), i = t_col[e]; act' from the
// saved state of each gathered row (grad_pre is never written).
template <int A>
struct BackwardRow {
  BackwardArgs a;
  i64 r, j0 = 0;
  __device__ BackwardRow(const BackwardArgs& args, i64 row) : a(args), r(row) {}
  __device__ void begin_tile(i64 first) { j0 = first; }
  __device__ void gather(i64 i, float w, float (&acc)[LANE_FEATURES]) const {
    const float* gr = a.grad_out + i * a.f;
#pragma unroll
    for (int k = 0; k < LANE_FEATURES; ++k) {
      const i64 j = j0 + k * WARP;
      if (j < a.f) acc[k] = fmaf(w, gr[j] * saved_deriv<A>(a.saved, i, j, a.f), acc[k]);
    }
  }
  __device__ void finish(i64 j, float sum) const {
    if (j < a.f) a.grad_x[r * a.f + j] = sum;
  }
};

template <int A, bool HUB>
__global__ void backward_kernel(const BackwardArgs a) {
  for_each_row<HUB>(a.t_rowptr, a.m, [&](i64 r, i64 b, i64 e) {
    BackwardRow<A> op(a, r);
    row_tiles<HUB>(op, b, e, a.f, a.t_col, a.t_weight);
  });
}

// ------------------------------------------------------------------------- edge gradient (SDDMM)
struct EdgeGradArgs {
  const i64* rowptr;
  const i64* col;
  const float* grad_out;  // [n, f]
  const void* saved;
  const float* x;  // [m, f]
  float* out;      // [E]
  i64 n, f;
};

// out[e] = <grad_out[i] * act'(pre[i]), x[col[e]]> for the edges e of row i in this warp's 32-edge
// chunks. Per chunk and tile, lane l holds grad_pre[i, f0 + l + 32 k]; each edge's partial dot
// products (double) are summed over the warp by a butterfly, and lane q keeps the total of the
// chunk's edge q over the tiles. Edges are independent, so a hub's warps share no state.
template <int A, bool HUB>
__device__ __forceinline__ void edge_grad_row(const EdgeGradArgs& a, i64 i, i64 b, i64 e) {
  const int lane = threadIdx.x % WARP;
  const i64 f = a.f;
  for (i64 base = first_chunk<HUB>(b); base < e; base += chunk_step<HUB>) {
    const int count = e - base < WARP ? static_cast<int>(e - base) : WARP;
    const i64 my_col = lane < count ? a.col[base + lane] : 0;
    double total = 0.0;
    for (i64 f0 = 0; f0 < f; f0 += FEATURE_TILE) {
      float gp[LANE_FEATURES];
#pragma unroll
      for (int k = 0; k < LANE_FEATURES; ++k) {
        const i64 j = f0 + lane + k * WARP;
        gp[k] = j < f ? a.grad_out[i * f + j] * saved_deriv<A>(a.saved, i, j, f) : 0.f;
      }
#pragma unroll 2
      for (int q = 0; q < count; ++q) {
        const float* xr = a.x + __shfl_sync(FULL_MASK, my_col, q) * f + f0 + lane;
        double s = 0.0;
#pragma unroll
        for (int k = 0; k < LANE_FEATURES; ++k)
          if (f0 + lane + k * WARP < f) s = fma(double(gp[k]), double(xr[k * WARP]), s);
        s = warp_sum(s);
        if (lane == q) total += s;
      }
    }
    if (lane < count) a.out[base + lane] = static_cast<float>(total);
  }
}

template <int A, bool HUB>
__global__ void edge_grad_kernel(const EdgeGradArgs a) {
  for_each_row<HUB>(a.rowptr, a.n, [&](i64 i, i64 b, i64 e) { edge_grad_row<A, HUB>(a, i, b, e); });
}

// ------------------------------------------------------------------------- propagation
struct PropagateArgs {
  const i64* rowptr;
  const i64* col;
  const float* x;           // [m, f]
  const float* row_scale;   // [n] or null (1)
  const float* self_x;      // [n, f] or null (no self term)
  const float* self_scale;  // [n] or null (1)
  const float* bias;        // [f] or null
  float* out;               // [n, f]
  i64 n, f;
  bool skip_loops;
};

// Row i: out = act(s_i * sum_{e, col[e] != skip} x[col[e]] + t_i * self_x[i] + bias), unit weights.
template <int A>
struct PropagateRow {
  PropagateArgs a;
  i64 i, skip, j0 = 0;
  __device__ PropagateRow(const PropagateArgs& args, i64 row)
      : a(args), i(row), skip(args.skip_loops ? row : -1) {}
  __device__ void begin_tile(i64 first) { j0 = first; }
  __device__ void gather(i64 c, float /*unit weight*/, float (&acc)[LANE_FEATURES]) const {
    if (c == skip) return;
    const float* xr = a.x + c * a.f + j0;
#pragma unroll
    for (int k = 0; k < LANE_FEATURES; ++k)
      if (j0 + k * WARP < a.f) acc[k] += xr[k * WARP];
  }
  __device__ void finish(i64 j, float sum) const {
    if (j >= a.f) return;
    float pre = a.row_scale ? a.row_scale[i] * sum : sum;
    if (a.self_x) {
      const float own = a.self_x[i * a.f + j];
      pre += a.self_scale ? a.self_scale[i] * own : own;
    }
    if (a.bias) pre += a.bias[j];
    a.out[i * a.f + j] = act_apply<A>(pre);
  }
};

template <int A, bool HUB>
__global__ void propagate_kernel(const PropagateArgs a) {
  for_each_row<HUB>(a.rowptr, a.n, [&](i64 i, i64 b, i64 e) {
    PropagateRow<A> op(a, i);
    row_tiles<HUB>(op, b, e, a.f, a.col, nullptr);
  });
}

// ------------------------------------------------------------------------- tangents
struct TangentArgs {
  const i64* rowptr;
  const i64* col;
  const float* weight;
  const float* x;  // [P, m, f]
  float* out;      // [P, n, f]
  i64 n, m, f, P;
};

// Row i of every tangent: the P * f (tangent, feature) pairs v = p * f + j are the features of one
// row_tiles pass, so each edge's col / weight is read once per FEATURE_TILE pairs (just once when
// P f <= FEATURE_TILE), not once per tangent. Per edge and pair the same fmaf in the same order as
// the forward: out[p] is bitwise the forward's A @ x[p].
struct TangentRow {
  TangentArgs a;
  i64 i;
  i64 src[LANE_FEATURES];  // the lane's pair k: its offset p m f + j in x (the row term c f apart); -1: v >= P f
  __device__ TangentRow(const TangentArgs& args, i64 row) : a(args), i(row) {}
  __device__ void begin_tile(i64 first) {
#pragma unroll
    for (int k = 0; k < LANE_FEATURES; ++k) {
      const i64 v = first + k * WARP, p = v / a.f;
      src[k] = v < a.P * a.f ? p * a.m * a.f + (v - p * a.f) : -1;
    }
  }
  __device__ void gather(i64 c, float w, float (&acc)[LANE_FEATURES]) const {
#pragma unroll
    for (int k = 0; k < LANE_FEATURES; ++k)
      if (src[k] >= 0) acc[k] = fmaf(w, a.x[src[k] + c * a.f], acc[k]);
  }
  __device__ void finish(i64 v, float sum) const {
    if (v >= a.P * a.f) return;
    const i64 p = v / a.f;
    a.out[p * a.n * a.f + i * a.f + (v - p * a.f)] = sum;
  }
};

template <bool HUB>
__global__ void tangent_kernel(const TangentArgs a) {
  for_each_row<HUB>(a.rowptr, a.n, [&](i64 i, i64 b, i64 e) {
    TangentRow op(a, i);
    row_tiles<HUB>(op, b, e, a.P * a.f, a.col, a.weight);
  });
}

}  // namespace
}  // namespace fm

using fm::i64;

// out [n, f] = act(A @ x + bias) + residual and the saved state (see ForwardArgs); bias / residual
// may be null.
FM_API int fm_aggregate_forward(const i64* rowptr, const i64* col, const float* weight, const float* x,
                                const float* bias, const float* residual, float* out, void* saved, i64 n, i64 f,
                                i64 act, cudaStream_t stream) {
  const fm::ForwardArgs args{rowptr, col, weight, x, bias, residual, out, saved, n, f};
  cudaError_t err = cudaSuccess;
  if (f > 0)
    FM_DISPATCH_ACT(act, err = fm::launch_rows(fm::forward_kernel<A, false>, fm::forward_kernel<A, true>, args, n,
                                               stream));
  return err;
}

// grad_x [m, f] = A^T (grad_out * act'(pre)) over the transposed CSR (t_rowptr [m + 1]).
FM_API int fm_aggregate_backward(const i64* t_rowptr, const i64* t_col, const float* t_weight, const float* grad_out,
                                 const void* saved, float* grad_x, i64 m, i64 f, i64 act, cudaStream_t stream) {
  const fm::BackwardArgs args{t_rowptr, t_col, t_weight, grad_out, saved, grad_x, m, f};
  cudaError_t err = cudaSuccess;
  if (f > 0)
    FM_DISPATCH_ACT(act, err = fm::launch_rows(fm::backward_kernel<A, false>, fm::backward_kernel<A, true>, args, m,
                                               stream));
  return err;
}

// out [E]: out[e] = <grad_out[i] * act'(pre[i]), x[col[e]]> for the edges e of row i (0 when f = 0).
FM_API int fm_edge_grad(const i64* rowptr, const i64* col, const float* grad_out, const void* saved, const float* x,
                        float* out, i64 n, i64 f, i64 act, cudaStream_t stream) {
  const fm::EdgeGradArgs args{rowptr, col, grad_out, saved, x, out, n, f};
  cudaError_t err = cudaSuccess;
  FM_DISPATCH_ACT(act, err = fm::launch_rows(fm::edge_grad_kernel<A, false>, fm::edge_grad_kernel<A, true>, args, n,
                                             stream));
  return err;
}

// out [n, f] = act(row_scale * (A_unit @ x) + self_scale * self_x + bias); the four may be null.
FM_API int fm_propagate_forward(const i64* rowptr, const i64* col, const float* x, const float* row_scale,
                                const float* self_x, const float* self_scale, const float* bias, float* out, i64 n,
                                i64 f, i64 act, i64 skip_loops, cudaStream_t stream) {
  const fm::PropagateArgs args{rowptr, col, x, row_scale, self_x, self_scale, bias, out, n, f, skip_loops != 0};
  cudaError_t err = cudaSuccess;
  if (f > 0)
    FM_DISPATCH_ACT(act, err = fm::launch_rows(fm::propagate_kernel<A, false>, fm::propagate_kernel<A, true>, args, n,
                                               stream));
  return err;
}

// out [P, n, f] with out[p] = A @ x[p] for x [P, m, f], one pass over the CSR for all tangents.
FM_API int fm_aggregate_tangents(const i64* rowptr, const i64* col, const float* weight, const float* x, float* out,
                                 i64 n, i64 m, i64 f, i64 P, cudaStream_t stream) {
  const fm::TangentArgs args{rowptr, col, weight, x, out, n, m, f, P};
  if (P * f == 0) return cudaSuccess;
  return fm::launch_rows(fm::tangent_kernel<false>, fm::tangent_kernel<true>, args, n, stream);
}
