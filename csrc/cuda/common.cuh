// Shared helpers of the CUDA kernels: the C ABI, activation functions, launch sizes.
//
// Every op is exported as `extern "C" int fm_<name>(..., cudaStream_t stream)` (FM_API) taking
// raw device pointers, int64_t sizes and double scalars, and returns a cudaError_t (0: success).
// Python (fastmetamer/ops/cuda_library.py) allocates every output and scratch buffer with torch on
// the tensors' device and checks the inputs before the call; the kernels never allocate.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#define FM_API extern "C" __attribute__((visibility("default")))

namespace fm {

using i64 = int64_t;

enum Act : int { ACT_NONE = 0, ACT_RELU = 1, ACT_ELU = 2, ACT_LEAKY = 3, ACT_TANH = 4, ACT_GELU = 5 };
constexpr float LEAKY_SLOPE = 0.01f;  // torch.nn.LeakyReLU's default

// act(x); codes match fastmetamer/ops/activations.py ACT_CODES.
template <int A>
__device__ __forceinline__ float act_apply(float x) {
  if constexpr (A == ACT_NONE) {
    return x;
  } else if constexpr (A == ACT_RELU) {
    return x < 0.f ? 0.f : x;  // NaN propagates like torch.relu
  } else if constexpr (A == ACT_ELU) {
    return x > 0.f ? x : expm1f(x);
  } else if constexpr (A == ACT_LEAKY) {
    return x > 0.f ? x : x * LEAKY_SLOPE;
  } else if constexpr (A == ACT_TANH) {
    return tanhf(x);
  } else {
    return 0.5f * x * (1.f + erff(x * 0.70710678118654752440f));
  }
}

// act'(x) (subgradient 0 at 0 for relu, as autograd).
template <int A>
__device__ __forceinline__ float act_deriv(float x) {
  if constexpr (A == ACT_NONE) {
    return 1.f;
  } else if constexpr (A == ACT_RELU) {
    return x > 0.f ? 1.f : 0.f;
  } else if constexpr (A == ACT_ELU) {
    return x > 0.f ? 1.f : expf(x);
  } else if constexpr (A == ACT_LEAKY) {
    return x > 0.f ? 1.f : LEAKY_SLOPE;
  } else if constexpr (A == ACT_TANH) {
    const float t = tanhf(x);
    return 1.f - t * t;
  } else {
    const float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752440f));
    return cdf + x * expf(-0.5f * x * x) * 0.39894228040143267794f;
  }
}

// act'(pre[i, j]) from a forward's saved state (fastmetamer/ops/activations.py): relu -> one bit
// per element (uint8 [n, ceil(f/8)]), none -> nothing, others -> the float pre-activation [n, f].
template <int A>
__device__ __forceinline__ float saved_deriv(const void* saved, i64 i, i64 j, i64 f) {
  if constexpr (A == ACT_NONE) {
    return 1.f;
  } else if constexpr (A == ACT_RELU) {
    const uint8_t byte = static_cast<const uint8_t*>(saved)[i * ((f + 7) / 8) + j / 8];
    return (byte >> (j % 8)) & 1 ? 1.f : 0.f;
  } else {
    return act_deriv<A>(static_cast<const float*>(saved)[i * f + j]);
  }
}

inline unsigned blocks_for(i64 work, int threads) {
  const i64 b = (work + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 2147483647 ? 2147483647 : b));
}

// ------------------------------------------------------------------------- warp / block sums
constexpr int WARP = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int ROW_THREADS = 256;               // threads of a block of every CSR row kernel
constexpr int ROW_WARPS = ROW_THREADS / WARP;  // warps of such a block

// Sum of v over the warp by an xor butterfly: every lane gets the same, reproducible value (each
// level adds a lane's value and its partner's, a commutative pair).
__device__ __forceinline__ double warp_sum(double v) {
  for (int s = WARP / 2; s > 0; s /= 2) v += __shfl_xor_sync(FULL_MASK, v, s);
  return v;
}

// Sum of v over the warp (BLOCKWIDE false) or over the block (true: then every thread of the block
// must call it), in a fixed order (warp sums, then the warps' sums in warp order); every calling
// thread gets the result.
template <bool BLOCKWIDE>
__device__ __forceinline__ double group_sum(double v) {
  v = warp_sum(v);
  if constexpr (BLOCKWIDE) {
    __shared__ double totals[ROW_WARPS];
    if (threadIdx.x % WARP == 0) totals[threadIdx.x / WARP] = v;
    __syncthreads();
    v = 0.0;
    for (int w = 0; w < ROW_WARPS; ++w) v += totals[w];
    __syncthreads();  // `totals` may be written again right after
  }
  return v;
}

// ------------------------------------------------------------------------- CSR row scheduling
// A CSR op runs two kernels of ROW_THREADS threads over all rows, each skipping the other's rows:
//  - HUB false: a warp per row of degree <= HUB_DEGREE (row blockIdx * ROW_WARPS + warp,
//    grid-stride);
//  - HUB true: a whole block per row of degree > HUB_DEGREE (power-law hubs): each block scans
//    ROW_THREADS rows (one per thread, a ballot) and runs their hubs one after the other; its warps
//    take the row's 32-edge chunks w, w + ROW_WARPS, w + 2 ROW_WARPS, ...
// Nothing is decided on the host (no row lists, no synchronisation) and no sum uses atomics: every
// result is added in a fixed order, so it is bitwise reproducible.
constexpr i64 HUB_DEGREE = 512;
constexpr int LANE_FEATURES = 8;                    // features a lane holds per tile
constexpr int FEATURE_TILE = WARP * LANE_FEATURES;  // features per tile: lane l holds f0 + l + 32 k
static_assert(FEATURE_TILE == ROW_THREADS, "a hub block finishes one feature of a tile per thread");

// Calls row(i, rowptr[i], rowptr[i + 1]) for the rows of [0, rows) of this kernel's class: on each
// warp (HUB false) or on the whole block (HUB true; every thread of the block calls it).
template <bool HUB, class Row>
__device__ __forceinline__ void for_each_row(const i64* rowptr, i64 rows, Row row) {
  if constexpr (!HUB) {
    const i64 stride = i64(gridDim.x) * ROW_WARPS;
    for (i64 i = i64(blockIdx.x) * ROW_WARPS + threadIdx.x / WARP; i < rows; i += stride) {
      const i64 b = rowptr[i], e = rowptr[i + 1];
      if (e - b <= HUB_DEGREE) row(i, b, e);
    }
  } else {
    __shared__ unsigned hubs[ROW_WARPS];  // bit l of hubs[w]: row r0 + 32 w + l is a hub
    for (i64 r0 = i64(blockIdx.x) * ROW_THREADS; r0 < rows; r0 += i64(gridDim.x) * ROW_THREADS) {
      const i64 i = r0 + threadIdx.x;
      const unsigned mask = __ballot_sync(FULL_MASK, i < rows && rowptr[i + 1] - rowptr[i] > HUB_DEGREE);
      if (threadIdx.x % WARP == 0) hubs[threadIdx.x / WARP] = mask;
      __syncthreads();
      for (int w = 0; w < ROW_WARPS; ++w) {
        for (unsigned m = hubs[w]; m != 0; m &= m - 1) {
          const i64 h = r0 + w * WARP + (__ffs(static_cast<int>(m)) - 1);
          row(h, rowptr[h], rowptr[h + 1]);
        }
      }
      __syncthreads();  // `hubs` is written again by the next stride
    }
  }
}

// The first edge of this warp's first 32-edge chunk of a row starting at edge b, and the distance
// between its chunks: every chunk (a warp per row) or every ROW_WARPS-th (a block per row).
template <bool HUB>
__device__ __forceinline__ i64 first_chunk(i64 b) {
  return HUB ? b + i64(threadIdx.x / WARP) * WARP : b;
}
template <bool HUB>
constexpr i64 chunk_step = HUB ? i64(WARP) * ROW_WARPS : WARP;

// visit(col[e], weight[e]) on every lane of the warp for the edges e of the 32-edge chunks
// [base, min(base + 32, end)), base = begin, begin + step, ... < end, in edge order (weight 1 where
// `weight` is null). A chunk's col / weight are loaded once, coalesced, and broadcast by shuffles.
template <class Visit>
__device__ __forceinline__ void for_each_edge(const i64* col, const float* weight, i64 begin, i64 end, i64 step,
                                              Visit visit) {
  const int lane = threadIdx.x % WARP;
  for (i64 base = begin; base < end; base += step) {
    const int count = end - base < WARP ? static_cast<int>(end - base) : WARP;
    i64 my_col = 0;
    float my_w = 1.f;
    if (lane < count) {
      my_col = col[base + lane];
      if (weight) my_w = weight[base + lane];
    }
#pragma unroll 4
    for (int q = 0; q < count; ++q) visit(__shfl_sync(FULL_MASK, my_col, q), __shfl_sync(FULL_MASK, my_w, q));
  }
}

// Row sums of a CSR op, tile by tile (FEATURE_TILE features of `width`): for each tile,
// op.begin_tile(f0 + lane) sets up the lane's features, op.gather(c, w, acc) adds edge (c, w) to the
// lane's LANE_FEATURES sums over the edges [b, e), and op.finish(j, sum) receives feature j's total.
// op.finish is called by every lane of the warp (it may ballot) with j possibly >= width (nothing
// to write then).
//  - HUB false (a warp per row): the lane finishes features f0 + lane + 32 k;
//  - HUB true (a block per row): the warps' partial sums are added in warp order in shared memory
//    and thread t finishes feature f0 + t.
// Either way a warp finishes 32 consecutive features j with j % 8 == lane % 8.
template <bool HUB, class Op>
__device__ __forceinline__ void row_tiles(Op& op, i64 b, i64 e, i64 width, const i64* col, const float* weight) {
  const int lane = threadIdx.x % WARP;
  for (i64 f0 = 0; f0 < width; f0 += FEATURE_TILE) {
    op.begin_tile(f0 + lane);
    float acc[LANE_FEATURES];
#pragma unroll
    for (int k = 0; k < LANE_FEATURES; ++k) acc[k] = 0.f;
    for_each_edge(col, weight, first_chunk<HUB>(b), e, chunk_step<HUB>, [&](i64 c, float w) { op.gather(c, w, acc); });
    if constexpr (HUB) {
      __shared__ float part[ROW_WARPS][FEATURE_TILE];
#pragma unroll
      for (int k = 0; k < LANE_FEATURES; ++k) part[threadIdx.x / WARP][k * WARP + lane] = acc[k];
      __syncthreads();
      float sum = 0.f;
      for (int w = 0; w < ROW_WARPS; ++w) sum += part[w][threadIdx.x];
      __syncthreads();  // `part` is written again by the next tile or row
      op.finish(f0 + threadIdx.x, sum);
    } else {
#pragma unroll
      for (int k = 0; k < LANE_FEATURES; ++k)
        if (f0 + k * WARP < width) op.finish(f0 + k * WARP + lane, acc[k]);  // warp-uniform condition
    }
  }
}

// The gather of out = A x (x [rows, f] float32): acc[k] += w * x[c, j0 + 32 k] with one rounding
// (fmaf), in edge order.
struct WeightedGather {
  const float* x;
  i64 f;
  i64 j0 = 0;
  __device__ void begin_tile(i64 first) { j0 = first; }
  __device__ void gather(i64 c, float w, float (&acc)[LANE_FEATURES]) const {
    const float* xr = x + c * f + j0;
#pragma unroll
    for (int k = 0; k < LANE_FEATURES; ++k)
      if (j0 + k * WARP < f) acc[k] = fmaf(w, xr[k * WARP], acc[k]);
  }
};

// Launches the two kernels of a CSR op over `rows` rows (see "CSR row scheduling").
template <class Args>
cudaError_t launch_rows(void (*light)(Args), void (*hub)(Args), const Args& args, i64 rows, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  light<<<blocks_for(rows, ROW_WARPS), ROW_THREADS, 0, stream>>>(args);
  hub<<<blocks_for(rows, ROW_THREADS), ROW_THREADS, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace fm

// Runs the statement with a constexpr int A bound to the activation code `act`; an unknown code
// returns cudaErrorInvalidValue from the enclosing function.
#define FM_DISPATCH_ACT(act, ...)                                                      \
  switch (act) {                                                                       \
    case ::fm::ACT_NONE: { constexpr int A = ::fm::ACT_NONE; __VA_ARGS__; break; }     \
    case ::fm::ACT_RELU: { constexpr int A = ::fm::ACT_RELU; __VA_ARGS__; break; }     \
    case ::fm::ACT_ELU: { constexpr int A = ::fm::ACT_ELU; __VA_ARGS__; break; }       \
    case ::fm::ACT_LEAKY: { constexpr int A = ::fm::ACT_LEAKY; __VA_ARGS__; break; }   \
    case ::fm::ACT_TANH: { constexpr int A = ::fm::ACT_TANH; __VA_ARGS__; break; }     \
    case ::fm::ACT_GELU: { constexpr int A = ::fm::ACT_GELU; __VA_ARGS__; break; }     \
    default: return cudaErrorInvalidValue;                                             \
  }
