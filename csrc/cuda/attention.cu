// Edge-weighted softmax over each CSR row's entries (the attention coefficients of GAT-type
// layers) and its backward. Contracts: edge_softmax / edge_softmax_backward in
// fastmetamer/ops/aggregate/reference.py.
//
// One block of SOFTMAX_THREADS threads per row, heads in a loop: thread t owns the row's entries
// t, t + SOFTMAX_THREADS, ... (so a power-law hub's row is shared by the whole block, not walked
// by one thread), and the row's maximum, denominator and dot products are combined by a tree in
// shared memory in a fixed order: no atomics, bitwise reproducible. Each entry's weight gradient
// (a sum over heads) is written only by its owner.
#include "common.cuh"

#include <cmath>

namespace fm {
namespace {

constexpr float MAX_EXPONENT = 60.f;
constexpr float SOFTMAX_EPS = 1e-16f;
constexpr int SOFTMAX_THREADS = 128;

// The block's combination of every thread's `value` (max or sum), in a fixed tree order; every
// thread gets the result. `scratch` holds SOFTMAX_THREADS floats.
template <bool MAX>
__device__ float block_combine(float value, float* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int width = SOFTMAX_THREADS / 2; width > 0; width /= 2) {
    if (static_cast<int>(threadIdx.x) < width) {
      const float other = scratch[threadIdx.x + width];
      scratch[threadIdx.x] = MAX ? fmaxf(scratch[threadIdx.x], other) : scratch[threadIdx.x] + other;
    }
    __syncthreads();
  }
  const float result = scratch[0];
  __syncthreads();  // scratch is reused by the next combination
  return result;
}

__global__ void edge_softmax_kernel(const i64* __restrict__ rowptr, const float* __restrict__ logit,
                                    const float* __restrict__ w, float* __restrict__ alpha,
                                    float* __restrict__ beta, i64 H) {
  __shared__ float scratch[SOFTMAX_THREADS];
  const i64 e0 = rowptr[blockIdx.x], e1 = rowptr[blockIdx.x + 1];
  for (i64 h = 0; h < H; ++h) {
    float top = -INFINITY;
    for (i64 e = e0 + threadIdx.x; e < e1; e += SOFTMAX_THREADS)
      if (w[e] > 0.f) top = fmaxf(top, logit[e * H + h]);
    top = block_combine<true>(top, scratch);
    if (!isfinite(top)) top = 0.f;
    float part = 0.f;
    for (i64 e = e0 + threadIdx.x; e < e1; e += SOFTMAX_THREADS)
      part += w[e] * expf(fminf(logit[e * H + h] - top, MAX_EXPONENT));
    const float denom = block_combine<false>(part, scratch) + SOFTMAX_EPS;
    for (i64 e = e0 + threadIdx.x; e < e1; e += SOFTMAX_THREADS) {
      const float ex = expf(fminf(logit[e * H + h] - top, MAX_EXPONENT));
      alpha[e * H + h] = (w[e] * ex) / denom;
      beta[e * H + h] = ex / denom;
    }
  }
}

__global__ void edge_softmax_backward_kernel(const i64* __restrict__ rowptr, const float* __restrict__ alpha,
                                             const float* __restrict__ beta, const float* __restrict__ g,
                                             float* __restrict__ grad_logit, float* __restrict__ grad_w, i64 H) {
  __shared__ float scratch[SOFTMAX_THREADS];
  const i64 e0 = rowptr[blockIdx.x], e1 = rowptr[blockIdx.x + 1];
  for (i64 e = e0 + threadIdx.x; e < e1; e += SOFTMAX_THREADS) grad_w[e] = 0.f;
  for (i64 h = 0; h < H; ++h) {
    float part = 0.f;
    for (i64 e = e0 + threadIdx.x; e < e1; e += SOFTMAX_THREADS) part += alpha[e * H + h] * g[e * H + h];
    const float dot = block_combine<false>(part, scratch);
    for (i64 e = e0 + threadIdx.x; e < e1; e += SOFTMAX_THREADS) {
      const float centred = g[e * H + h] - dot;
      grad_logit[e * H + h] = alpha[e * H + h] * centred;
      grad_w[e] += beta[e * H + h] * centred;
    }
  }
}

}  // namespace
}  // namespace fm

// alpha, beta [E, H] of the edge-weighted softmax of logits [E, H] per CSR row (rowptr [n + 1]).
FM_API int fm_edge_softmax(const fm::i64* rowptr, const float* logits, const float* weight, float* alpha, float* beta,
                           fm::i64 n, fm::i64 H, cudaStream_t stream) {
  if (n * H == 0) return cudaSuccess;
  fm::edge_softmax_kernel<<<static_cast<unsigned>(n), fm::SOFTMAX_THREADS, 0, stream>>>(rowptr, logits, weight, alpha,
                                                                                     beta, H);
  return cudaGetLastError();
}

// grad_logits [E, H] and grad_weight [E] of edge_softmax, from its alpha, beta and grad_alpha [E, H].
FM_API int fm_edge_softmax_backward(const fm::i64* rowptr, const float* alpha, const float* beta,
                                    const float* grad_alpha, float* grad_logits, float* grad_weight, fm::i64 n,
                                    fm::i64 H, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  fm::edge_softmax_backward_kernel<<<static_cast<unsigned>(n), fm::SOFTMAX_THREADS, 0, stream>>>(
      rowptr, alpha, beta, grad_alpha, grad_logits, grad_weight, H);
  return cudaGetLastError();
}
