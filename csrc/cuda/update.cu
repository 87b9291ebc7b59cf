// Binary straight-through feature update on the GPU: exact top-k per row block by radix select
// (top_mask, top_mask_csr) and the fused margin + straight-through + Adam step with the clamp of
// the logits (adam_ste_update). Contract: fastmetamer/ops/update/reference.py; the organisation
// of the kernels (two block classes, passes, what the wrapper scans and reads to the host) is
// described in fastmetamer/ops/update/cuda.py, which allocates every buffer.
//
// Keys: P = sigmoid(s theta) is computed as torch does in float32 (1 / (1 + exp(-(s theta)))) and
// never stored; P >= 0, so its IEEE bit pattern read as uint32 orders like P. Every NaN maps to
// NAN_KEY, above every other key and tied with the other NaNs (as torch.sort orders NaN). Keys
// are < 2^30 (P <= 1.0 has bit pattern <= 0x3f800000).
//
// Selection rule of a block of n elements (r1 = clamp(k, 1, n)): K = the key of the r1-th largest
// P; gt / eq = how many keys are > / == K; every key > K is a one and the first
// need = clamp(k, 0, n) - gt keys == K in memory (row-major) order are ones. So exactly
// clamp(k, 0, n) ones, the reference's tie order, and k <= 0 / k >= n need no special case.
#include "common.cuh"

#include <algorithm>

namespace fm {
namespace {

constexpr unsigned FULL = 0xffffffffu;
constexpr int WARP = 32;
constexpr i64 SMALL_MAX = 1024;                 // blocks up to this size: one warp each
constexpr int KPL = SMALL_MAX / WARP;           // keys per lane held in registers there
constexpr int TILE_WARPS = 8;                   // warps per CTA in the large-block kernels
constexpr int THREADS = TILE_WARPS * WARP;      // threads per CTA of every top-k kernel
constexpr i64 SUBTILE = 1024;                   // elements per warp in the large-block passes
constexpr i64 TILE = SUBTILE * TILE_WARPS;      // elements per CTA in the large-block passes
constexpr int BINS = 256;                       // bins of a radix digit (8 bits at most)
constexpr int PASSES = 4;                       // digits of the 30-bit key: 29-22, 21-14, 13-6, 5-0
constexpr unsigned NAN_KEY = 0x3fffffffu;
// Columns of the int64 state [L, L_COLS] of each large block, written by select_kernel.
enum LargeState { L_KEY = 0, L_RANK = 1, L_GT = 2, L_EQ = 3, L_BELOW = 4, L_COLS = 5 };

static_assert(KPL * WARP == SMALL_MAX, "SMALL_MAX must be a multiple of the warp size");

// ---------------------------------------------------------------- keys and warp helpers
__device__ __forceinline__ float sigmoid_p(float theta, float slope) {
  return 1.f / (1.f + expf(-(slope * theta)));
}

__device__ __forceinline__ unsigned key_of(float p) { return isnan(p) ? NAN_KEY : __float_as_uint(p); }

__device__ __forceinline__ float p_of_key(unsigned key) {
  return key == NAN_KEY ? __uint_as_float(0x7fc00000u) : __uint_as_float(key);
}

__device__ __forceinline__ unsigned theta_key(const float* theta, i64 e, float slope) {
  return key_of(sigmoid_p(theta[e], slope));
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & (WARP - 1); }

__device__ __forceinline__ unsigned warp_sum(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_add_sync(FULL, v);
#else
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  return v;
#endif
}

__device__ __forceinline__ unsigned warp_max(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(FULL, v);
#else
  for (int o = WARP / 2; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL, v, o));
  return v;
#endif
}

__device__ __forceinline__ unsigned warp_min(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(FULL, v);
#else
  for (int o = WARP / 2; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(FULL, v, o));
  return v;
#endif
}

// ---------------------------------------------------------------- the selection rule
struct Rule {
  unsigned key;     // K, the key of the r1-th largest P
  i64 need;         // keys == K that are ones (the first ones in memory order)
  float threshold;  // (P_(k) + P_(k+1)) / 2, or max P + 1e-6 (k <= 0), min P - 1e-6 (k >= n)
};

// The rule of a block of n >= 1 elements from K, gt = #{key > K}, eq = #{key == K} and below =
// the largest key < K (read only when the (k+1)-th largest is below K, so that one exists).
__device__ __forceinline__ Rule block_rule(i64 k, i64 n, unsigned key, i64 gt, i64 eq, unsigned below) {
  const i64 r2 = k < 0 ? 1 : (k >= n ? n : k + 1);  // rank of P_(k+1), clamped to [1, n]
  const float p1 = p_of_key(key);
  const float p2 = p_of_key(r2 <= gt + eq ? key : below);
  Rule rule;
  rule.key = key;
  rule.need = (k < 0 ? 0 : (k > n ? n : k)) - gt;
  rule.threshold = k <= 0 ? p1 + 1e-6f : (k >= n ? p1 - 1e-6f : 0.5f * (p1 + p2));
  return rule;
}

// Outputs of the top-k kernels: the dense mask (top_mask) or the CSR of the ones (top_mask_csr).
struct Out {
  float* hard;       // [F, d] 0/1, or null for the CSR form
  float* threshold;  // [F]
  i64* col;          // [nnz] column of every one, row by row (CSR form)
  i64* row_count;    // [F] ones per row, zero on entry (CSR form)
  const i64* start;  // [C] position in col of each block's first one (CSR form)
};

// One 32-element step of the emission of a block, in memory order. Lane l holds block element
// e (block-relative, valid or past the end) with key `key`; the block starts at row `row0`.
// ties: the block's keys == K before this step; at: where the next one goes in col (CSR).
// Called by all 32 lanes.
template <bool CSR>
__device__ __forceinline__ void emit_step(const Out& out, i64 row0, i64 d, const Rule& rule, unsigned key,
                                          bool valid, i64 e, i64& ties, i64& at) {
  const int lane = lane_id();
  const unsigned before = (1u << lane) - 1u;
  const bool tie = valid && key == rule.key;
  const unsigned tie_mask = __ballot_sync(FULL, tie);
  const bool one = valid && (key > rule.key || (tie && ties + __popc(tie_mask & before) < rule.need));
  ties += __popc(tie_mask);
  if constexpr (CSR) {
    const unsigned one_mask = __ballot_sync(FULL, one);
    if (one) {
      const i64 row = e / d;
      out.col[at + __popc(one_mask & before)] = e - row * d;
      atomicAdd(reinterpret_cast<unsigned long long*>(out.row_count + row0 + row), 1ull);
    }
    at += __popc(one_mask);
  } else if (valid) {
    out.hard[row0 * d + e] = one ? 1.f : 0.f;
  }
}

// ---------------------------------------------------------------- small blocks: a warp each
// One warp per block of 1 .. SMALL_MAX elements (others are skipped: empty, or large ones, done by
// the kernels below). The keys stay in registers (lane l holds elements l, l + 32, ...); K by
// bisection on the key bits below the common prefix of the block's min and max key, one warp
// count per bit; then gt, eq, below and the emission in memory order. No shared memory, no
// atomics but the CSR row counts.
template <bool CSR>
__global__ void __launch_bounds__(THREADS) small_blocks_kernel(const float* __restrict__ theta,
                                                               const i64* __restrict__ ptr,
                                                               const i64* __restrict__ k, i64 num_blocks, i64 d,
                                                               float slope, Out out) {
  const int lane = lane_id();
  const i64 warps = static_cast<i64>(gridDim.x) * TILE_WARPS;
  for (i64 c = static_cast<i64>(blockIdx.x) * TILE_WARPS + threadIdx.x / WARP; c < num_blocks; c += warps) {
    const i64 row0 = ptr[c], n = (ptr[c + 1] - row0) * d;
    if (n == 0 || n > SMALL_MAX) continue;  // warp-uniform
    const float* th = theta + row0 * d;
    unsigned key[KPL] = {};  // past the end: 0, never counted (every candidate below is >= 1)
    unsigned hi = 0, lo = FULL;
#pragma unroll
    for (int i = 0; i < KPL; ++i) {
      if (i * WARP >= n) break;
      const i64 e = i * WARP + lane;
      if (e < n) {
        key[i] = theta_key(th, e, slope);
        hi = max(hi, key[i]);
        lo = min(lo, key[i]);
      }
    }
    hi = warp_max(hi);
    lo = warp_min(lo);
    const i64 kc = k[c];
    const unsigned r1 = static_cast<unsigned>(kc < 1 ? 1 : (kc > n ? n : kc));
    // K = the largest v with #{key >= v} >= r1. Every key shares the bits of lo and hi above
    // their highest differing bit; the bits below are found one by one from the top.
    const int nbits = (hi ^ lo) ? 32 - __clz(static_cast<int>(hi ^ lo)) : 0;
    unsigned K = nbits == 32 ? 0u : (hi >> nbits) << nbits;
    for (int b = nbits - 1; b >= 0; --b) {
      const unsigned cand = K | (1u << b);
      unsigned cnt = 0;
#pragma unroll
      for (int i = 0; i < KPL; ++i) {
        if (i * WARP >= n) break;
        cnt += key[i] >= cand;
      }
      if (warp_sum(cnt) >= r1) K = cand;
    }
    unsigned gt = 0, eq = 0, below = 0;
#pragma unroll
    for (int i = 0; i < KPL; ++i) {
      if (i * WARP >= n) break;
      if (i * WARP + lane < n) {
        gt += key[i] > K;
        eq += key[i] == K;
        if (key[i] < K) below = max(below, key[i]);
      }
    }
    const Rule rule = block_rule(kc, n, K, warp_sum(gt), warp_sum(eq), warp_max(below));
    i64 ties = 0, at = CSR ? out.start[c] : 0;
#pragma unroll
    for (int i = 0; i < KPL; ++i) {
      if (i * WARP >= n) break;
      const i64 e = i * WARP + lane;
      emit_step<CSR>(out, row0, d, rule, key[i], e < n, e, ties, at);
    }
    for (i64 r = row0 + lane; r < ptr[c + 1]; r += WARP) out.threshold[r] = rule.threshold;
  }
}

// ---------------------------------------------------------------- large blocks: many CTAs each
// Each large block (more than SMALL_MAX elements) is cut into tiles of TILE elements (one CTA),
// each cut into TILE_WARPS subtiles of SUBTILE elements (one warp). The wrapper lists the tiles.
struct Large {
  i64 num_large;           // L
  const i64* block;        // [L] block id of each large block
  i64 num_tiles;           // T
  const i64* tile_large;   // [T] large-block index (into block) of each tile
  const i64* tile_offset;  // [T] first element of each tile, block-relative
};

__host__ __device__ constexpr int pass_shift(int pass) { return pass < PASSES - 1 ? 22 - 8 * pass : 0; }
__host__ __device__ constexpr int pass_width(int pass) { return pass < PASSES - 1 ? 8 : 6; }
static_assert(pass_shift(PASSES - 2) == 6 && pass_shift(0) + pass_width(0) == 30, "digits must cover bits 29-0");

// Radix pass `pass`: hist[b, digit] += #{keys of large block b that match the digits found so far}
// per value of this pass's digit. Shared-memory histogram per tile, then one global atomic per
// non-empty bin.
__global__ void __launch_bounds__(THREADS) histogram_kernel(const float* __restrict__ theta,
                                                            const i64* __restrict__ ptr, i64 d, float slope,
                                                            Large lg, const i64* __restrict__ state,
                                                            i64* __restrict__ hist, int pass) {
  __shared__ unsigned counts[BINS];
  const int shift = pass_shift(pass), top = shift + pass_width(pass);
  const unsigned digit_mask = (1u << pass_width(pass)) - 1u;
  for (i64 t = blockIdx.x; t < lg.num_tiles; t += gridDim.x) {
    for (int j = threadIdx.x; j < BINS; j += THREADS) counts[j] = 0;
    __syncthreads();
    const i64 b = lg.tile_large[t], c = lg.block[b];
    const i64 row0 = ptr[c], n = (ptr[c + 1] - row0) * d;
    const float* th = theta + row0 * d;
    const unsigned prefix = pass == 0 ? 0u : static_cast<unsigned>(state[b * L_COLS + L_KEY]);
    const i64 end = min(lg.tile_offset[t] + TILE, n);
    for (i64 e = lg.tile_offset[t] + threadIdx.x; e < end; e += THREADS) {
      const unsigned key = theta_key(th, e, slope);
      if ((key >> top) == (prefix >> top)) atomicAdd(&counts[(key >> shift) & digit_mask], 1u);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < BINS; j += THREADS)
      if (counts[j]) atomicAdd(reinterpret_cast<unsigned long long*>(hist + b * BINS + j), 1ull * counts[j]);
    __syncthreads();  // counts is zeroed for the next tile
  }
}

// After radix pass `pass`, one warp per large block: the digit of K is the bin where the running
// count from the top bin reaches the remaining rank; updates K's prefix, the rank within it and
// gt, stores eq = that bin's count (#{key == K} after the last pass) and zeroes hist[b] for the
// next pass. Pass 0 starts from rank r1 = clamp(k, 1, n), gt = 0.
__global__ void __launch_bounds__(THREADS) select_kernel(const i64* __restrict__ ptr, const i64* __restrict__ k,
                                                         i64 d, Large lg, i64* __restrict__ state,
                                                         i64* __restrict__ hist, int pass) {
  constexpr int PER = BINS / WARP;  // lane l owns bins [PER l, PER l + PER)
  const int lane = lane_id();
  const int shift = pass_shift(pass);
  const i64 warps = static_cast<i64>(gridDim.x) * TILE_WARPS;
  for (i64 b = static_cast<i64>(blockIdx.x) * TILE_WARPS + threadIdx.x / WARP; b < lg.num_large; b += warps) {
    i64* st = state + b * L_COLS;
    i64 rank, gt;
    unsigned prefix;
    if (pass == 0) {
      const i64 c = lg.block[b], n = (ptr[c + 1] - ptr[c]) * d, kc = k[c];
      rank = kc < 1 ? 1 : (kc > n ? n : kc);
      gt = 0;
      prefix = 0;
    } else {
      rank = st[L_RANK];
      gt = st[L_GT];
      prefix = static_cast<unsigned>(st[L_KEY]);
    }
    i64* h = hist + b * BINS + lane * PER;
    i64 own[PER], sum = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      own[j] = h[j];
      sum += own[j];
    }
    i64 suffix = sum;  // keys in the bins of lanes >= this one
#pragma unroll
    for (int o = 1; o < WARP; o <<= 1) {
      const i64 v = __shfl_down_sync(FULL, suffix, o);
      if (lane + o < WARP) suffix += v;
    }
    i64 above = suffix - sum;  // keys in the bins of higher lanes
    if (above < rank && rank <= suffix) {  // exactly one lane: K's digit is one of its bins
      for (int j = PER - 1; j >= 0; --j) {
        if (above + own[j] >= rank) {
          st[L_KEY] = prefix | (static_cast<unsigned>(lane * PER + j) << shift);
          st[L_RANK] = rank - above;
          st[L_GT] = gt + above;
          st[L_EQ] = own[j];
          break;
        }
        above += own[j];
      }
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) h[j] = 0;
  }
}

// With K known: per subtile s, counts[s] = (#{key > K}, #{key == K}); state[b, L_BELOW] = the
// largest key < K of the block (a max per CTA, then one integer atomicMax).
__global__ void __launch_bounds__(THREADS) count_kernel(const float* __restrict__ theta,
                                                        const i64* __restrict__ ptr, i64 d, float slope, Large lg,
                                                        i64* __restrict__ state, i64* __restrict__ counts) {
  __shared__ unsigned below_of_warp[TILE_WARPS];
  const int lane = lane_id(), warp = threadIdx.x / WARP;
  for (i64 t = blockIdx.x; t < lg.num_tiles; t += gridDim.x) {
    const i64 b = lg.tile_large[t], c = lg.block[b];
    const i64 row0 = ptr[c], n = (ptr[c + 1] - row0) * d;
    const float* th = theta + row0 * d;
    const unsigned K = static_cast<unsigned>(state[b * L_COLS + L_KEY]);
    const i64 lo = lg.tile_offset[t] + warp * SUBTILE, hi = min(lo + SUBTILE, n);
    unsigned gt = 0, eq = 0, below = 0;
    for (i64 e = lo + lane; e < hi; e += WARP) {
      const unsigned key = theta_key(th, e, slope);
      gt += key > K;
      eq += key == K;
      if (key < K) below = max(below, key);
    }
    gt = warp_sum(gt);
    eq = warp_sum(eq);
    below = warp_max(below);
    if (lane == 0) {
      const i64 s = t * TILE_WARPS + warp;
      counts[2 * s] = gt;
      counts[2 * s + 1] = eq;
      below_of_warp[warp] = below;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned m = below_of_warp[0];
      for (int w = 1; w < TILE_WARPS; ++w) m = max(m, below_of_warp[w]);
      atomicMax(reinterpret_cast<unsigned long long*>(state + b * L_COLS + L_BELOW), 1ull * m);
    }
    __syncthreads();  // below_of_warp is rewritten for the next tile
  }
}

// The emission of the large blocks, one warp per subtile: ties[s] = the block's keys == K in the
// subtiles before s, at[s] = its ones there (CSR form). Each warp also writes the threshold of the
// rows whose first element lies in its subtile.
template <bool CSR>
__global__ void __launch_bounds__(THREADS) large_emit_kernel(const float* __restrict__ theta,
                                                             const i64* __restrict__ ptr,
                                                             const i64* __restrict__ k, i64 d, float slope, Large lg,
                                                             const i64* __restrict__ state,
                                                             const i64* __restrict__ ties_before,
                                                             const i64* __restrict__ ones_before, Out out) {
  const int lane = lane_id(), warp = threadIdx.x / WARP;
  for (i64 t = blockIdx.x; t < lg.num_tiles; t += gridDim.x) {
    const i64 b = lg.tile_large[t], c = lg.block[b];
    const i64 row0 = ptr[c], n = (ptr[c + 1] - row0) * d;
    const float* th = theta + row0 * d;
    const i64* st = state + b * L_COLS;
    const Rule rule = block_rule(k[c], n, static_cast<unsigned>(st[L_KEY]), st[L_GT], st[L_EQ],
                                 static_cast<unsigned>(st[L_BELOW]));
    const i64 s = t * TILE_WARPS + warp;
    const i64 lo = lg.tile_offset[t] + warp * SUBTILE, hi = min(lo + SUBTILE, n);
    i64 ties = ties_before[s], at = CSR ? out.start[c] + ones_before[s] : 0;
    for (i64 e0 = lo; e0 < hi; e0 += WARP) {
      const i64 e = e0 + lane;
      const bool valid = e < hi;
      emit_step<CSR>(out, row0, d, rule, valid ? theta_key(th, e, slope) : 0u, valid, e, ties, at);
    }
    if (lo < hi)
      for (i64 r = (lo + d - 1) / d + lane; r < (hi + d - 1) / d; r += WARP) out.threshold[row0 + r] = rule.threshold;
  }
}

// ---------------------------------------------------------------- Adam
struct AdamArgs {
  float slope, margin, beta1, one_minus_beta1, beta2, one_minus_beta2;
  float inv_bias1, inv_bias2;  // 1 / (1 - beta^step), as torch divides a tensor by a scalar
  float eps, lr, bound;
};

// One thread per element, grid-stride over at most ADAM_GRID CTAs (a few waves on any current
// GPU); the row index advances without a division per element.
constexpr i64 ADAM_GRID = 4096;
constexpr int ADAM_THREADS = 256;

__global__ void __launch_bounds__(ADAM_THREADS) adam_ste_kernel(float* __restrict__ theta,
                                                                const float* __restrict__ grad_x,
                                                                float* __restrict__ exp_avg,
                                                                float* __restrict__ exp_avg_sq,
                                                                const float* __restrict__ threshold,
                                                                const float* __restrict__ margin_scale,
                                                                const bool* __restrict__ active, i64 numel, i64 d,
                                                                AdamArgs a) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  const i64 row_step = stride / d, col_step = stride - row_step * d;
  i64 e = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  i64 row = e / d, col = e - row * d;
  for (; e < numel; e += stride) {
    const float th = theta[e];
    const float p = sigmoid_p(th, a.slope);
    const float gap = p - threshold[row];
    const float sign = (gap > 0.f ? 1.f : 0.f) - (gap < 0.f ? 1.f : 0.f);
    const float near = fabsf(gap) < a.margin ? 1.f : 0.f;
    const float grad_p = grad_x[e] - margin_scale[row] * sign * near;
    const float g = grad_p * a.slope * p * (1.f - p);
    const float m = exp_avg[e] * a.beta1 + a.one_minus_beta1 * g;
    const float v = exp_avg_sq[e] * a.beta2 + a.one_minus_beta2 * g * g;
    exp_avg[e] = m;
    exp_avg_sq[e] = v;
    const float step = (m * a.inv_bias1) / (sqrtf(v * a.inv_bias2) + a.eps);
    const float next = th - (active[row] ? a.lr : 0.f) * step;  // inactive: th - 0 * step, as the reference
    theta[e] = next < -a.bound ? -a.bound : (next > a.bound ? a.bound : next);  // NaN stays NaN
    row += row_step;
    col += col_step;
    if (col >= d) {
      col -= d;
      ++row;
    }
  }
}

template <bool CSR>
int top_mask_launch(const void* theta, const void* ptr, const void* k, i64 num_blocks, i64 d, double slope,
                    i64 num_large, const void* large_block, i64 num_tiles, const void* tile_large,
                    const void* tile_offset, const void* state, const void* ties_before, const void* ones_before,
                    Out out, i64 small_max, i64 tile, cudaStream_t stream) {
  if (small_max != SMALL_MAX || tile != TILE || d < 0 || num_blocks < 0 || num_large < 0 || num_tiles < 0)
    return cudaErrorInvalidValue;
  const auto* th = static_cast<const float*>(theta);
  const auto* pp = static_cast<const i64*>(ptr);
  const auto* kp = static_cast<const i64*>(k);
  const float s = static_cast<float>(slope);
  if (num_blocks > 0 && d > 0)
    small_blocks_kernel<CSR><<<blocks_for(num_blocks, TILE_WARPS), THREADS, 0, stream>>>(th, pp, kp, num_blocks, d, s,
                                                                                         out);
  if (num_tiles > 0) {
    const Large lg{num_large, static_cast<const i64*>(large_block), num_tiles, static_cast<const i64*>(tile_large),
                   static_cast<const i64*>(tile_offset)};
    large_emit_kernel<CSR><<<blocks_for(num_tiles, 1), THREADS, 0, stream>>>(
        th, pp, kp, d, s, lg, static_cast<const i64*>(state), static_cast<const i64*>(ties_before),
        static_cast<const i64*>(ones_before), out);
  }
  return cudaGetLastError();
}

}  // namespace
}  // namespace fm

using fm::i64;

// Radix select of the large blocks (more than small_max elements): PASSES histogram + select
// passes, then the per-subtile counts. theta [F, d] float32; ptr [C + 1], k [C] int64; large_block
// [L]; tile_large, tile_offset [T]; state [L, 5] int64, zero on entry; hist [L, 256] int64, zero
// on entry (zero again on return); counts [T * 8, 2] int64 (gt, eq per subtile). tile = 8192.
FM_API int fm_top_mask_select(const void* theta, const void* ptr, const void* k, int64_t d, double slope,
                              int64_t num_large, const void* large_block, int64_t num_tiles, const void* tile_large,
                              const void* tile_offset, void* state, void* hist, void* counts, int64_t tile,
                              cudaStream_t stream) {
  if (tile != fm::TILE || d < 1 || num_large < 0 || num_tiles < 0) return cudaErrorInvalidValue;
  if (num_tiles == 0) return cudaSuccess;
  const fm::Large lg{num_large, static_cast<const i64*>(large_block), num_tiles, static_cast<const i64*>(tile_large),
                     static_cast<const i64*>(tile_offset)};
  auto* st = static_cast<i64*>(state);
  const auto* th = static_cast<const float*>(theta);
  const auto* pp = static_cast<const i64*>(ptr);
  const float s = static_cast<float>(slope);
  auto* h = static_cast<i64*>(hist);
  const unsigned tiles_grid = fm::blocks_for(num_tiles, 1), large_grid = fm::blocks_for(num_large, fm::TILE_WARPS);
  for (int pass = 0; pass < fm::PASSES; ++pass) {
    fm::histogram_kernel<<<tiles_grid, fm::THREADS, 0, stream>>>(th, pp, d, s, lg, st, h, pass);
    fm::select_kernel<<<large_grid, fm::THREADS, 0, stream>>>(pp, static_cast<const i64*>(k), d, lg, st, h, pass);
  }
  fm::count_kernel<<<tiles_grid, fm::THREADS, 0, stream>>>(th, pp, d, s, lg, st, static_cast<i64*>(counts));
  return cudaGetLastError();
}

// Dense mask: hard [F, d] float 0/1 and threshold [F] of the rows of the non-empty blocks (the
// caller zeroes the other rows). ties_before [T * 8]: keys == K of the block before each subtile.
// small_max = 1024, tile = 8192 (checked against the compiled constants).
FM_API int fm_top_mask(const void* theta, const void* ptr, const void* k, int64_t num_blocks, int64_t d, double slope,
                       int64_t num_large, const void* large_block, int64_t num_tiles, const void* tile_large,
                       const void* tile_offset, const void* state, const void* ties_before, void* hard,
                       void* threshold, int64_t small_max, int64_t tile, cudaStream_t stream) {
  const fm::Out out{static_cast<float*>(hard), static_cast<float*>(threshold), nullptr, nullptr, nullptr};
  return fm::top_mask_launch<false>(theta, ptr, k, num_blocks, d, slope, num_large, large_block, num_tiles,
                                    tile_large, tile_offset, state, ties_before, nullptr, out, small_max, tile, stream);
}

// CSR of the ones: col [nnz] int64 (block c's ones from start[c], row by row, increasing column),
// row_count [F] int64 (zero on entry; ones per row) and threshold [F] of the rows of the non-empty
// blocks. ones_before [T * 8]: the block's ones before each subtile.
FM_API int fm_top_mask_csr(const void* theta, const void* ptr, const void* k, int64_t num_blocks, int64_t d,
                           double slope, int64_t num_large, const void* large_block, int64_t num_tiles,
                           const void* tile_large, const void* tile_offset, const void* state, const void* ties_before,
                           const void* ones_before, const void* start, void* col, void* row_count, void* threshold,
                           int64_t small_max, int64_t tile, cudaStream_t stream) {
  const fm::Out out{nullptr, static_cast<float*>(threshold), static_cast<i64*>(col), static_cast<i64*>(row_count),
                    static_cast<const i64*>(start)};
  return fm::top_mask_launch<true>(theta, ptr, k, num_blocks, d, slope, num_large, large_block, num_tiles, tile_large,
                                   tile_offset, state, ties_before, ones_before, out, small_max, tile, stream);
}

// One fused straight-through + margin + Adam step and the clamp to [-bound, bound] (inf: none),
// in place on theta, exp_avg, exp_avg_sq [rows, d]; threshold, margin_scale [rows] float32,
// active [rows] bool; bias_correction1/2 = 1 - beta1/2^step (computed in double by the caller).
FM_API int fm_adam_ste_update(void* theta, const void* grad_x, void* exp_avg, void* exp_avg_sq, int64_t rows, int64_t d,
                              double lr, double beta1, double beta2, double eps, double slope, const void* threshold,
                              double margin, const void* margin_scale, const void* active, double bias_correction1,
                              double bias_correction2, double bound, cudaStream_t stream) {
  if (rows < 0 || d < 0) return cudaErrorInvalidValue;
  if (rows == 0 || d == 0) return cudaSuccess;
  const fm::AdamArgs a{static_cast<float>(slope),
                       static_cast<float>(margin),
                       static_cast<float>(beta1),
                       static_cast<float>(1.0 - beta1),
                       static_cast<float>(beta2),
                       static_cast<float>(1.0 - beta2),
                       1.f / static_cast<float>(bias_correction1),
                       1.f / static_cast<float>(bias_correction2),
                       static_cast<float>(eps),
                       static_cast<float>(lr),
                       static_cast<float>(bound)};
  const i64 ctas = std::min<i64>(fm::blocks_for(rows * d, fm::ADAM_THREADS), fm::ADAM_GRID);
  fm::adam_ste_kernel<<<static_cast<unsigned>(ctas), fm::ADAM_THREADS, 0, stream>>>(
      static_cast<float*>(theta), static_cast<const float*>(grad_x), static_cast<float*>(exp_avg),
      static_cast<float*>(exp_avg_sq), static_cast<const float*>(threshold), static_cast<const float*>(margin_scale),
      static_cast<const bool*>(active), rows * d, d, a);
  return cudaGetLastError();
}
