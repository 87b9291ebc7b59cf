// CSR aggregation with fused epilogue (forward), its backward over the transposed CSR fused with
// the activation derivative, and the edge-weight gradient (SDDMM). Contracts:
// fastmetamer/ops/aggregate/reference.py.
//
// Rows are split into chunks of similar cost (edges + rows) run in parallel; every row is
// computed by one thread, in edge order, so results do not depend on the thread count. The
// per-chunk kernels are multi-versioned (FM_SIMD_CLONES) and vectorise over features.
#include "fast_math.h"  // first: FP options and SIMD clones
#include "activations.h"
#include "common.h"

#include <type_traits>

namespace fm {
namespace {

// 0/1 float masks of the 8 bits of a byte: relu bits -> multipliers, 8 features at a time.
struct BitMasks {
  alignas(32) float m[256][8];
  BitMasks() {
    for (int b = 0; b < 256; ++b)
      for (int q = 0; q < 8; ++q) m[b][q] = ((b >> q) & 1) ? 1.f : 0.f;
  }
};
const BitMasks& bit_masks() {
  static const BitMasks masks;
  return masks;
}

// Gathered rows are random reads: ask for the row PREFETCH_EDGES edges ahead while this one is
// summed, so the memory latency of a large graph's rows overlaps with the arithmetic. The look
// ahead crosses row ends (up to the chunk's last edge): with ~20 edges a row, stopping at each
// row's end would leave its first edges unprefetched (measured: 30% slower on 1 M rows).
constexpr i64 PREFETCH_EDGES = 8;
inline void prefetch_row(const float* row, i64 f) {
  for (i64 c = 0; c < f; c += 16) __builtin_prefetch(row + c);
}

// spmm_row for a compile-time width F: the sums stay in registers across the edges (a runtime
// width leaves them in memory, one store-to-load chain per edge: ~2x slower on APPNP's 7
// classes, and on a first layer's 64 hidden features). The same operations in the same order as
// the general loop.
template <int F>
inline void spmm_row_fixed(float* __restrict acc, i64 e0, i64 e1, i64 ahead_end, const i64* __restrict col,
                           const float* __restrict w, const float* __restrict x) {
  float sum[F] = {};
  for (i64 e = e0; e < e1; ++e) {
    if (e + PREFETCH_EDGES < ahead_end) prefetch_row(x + col[e + PREFETCH_EDGES] * F, F);
    const float we = w[e];
    const float* __restrict xr = x + col[e] * F;
    for (int c = 0; c < F; ++c) sum[c] += we * xr[c];
  }
  for (int c = 0; c < F; ++c) acc[c] = sum[c];
}

// acc[0:f) = sum_{e in [e0, e1)} w[e] * x[col[e], 0:f), accumulated in edge order (as index_add_);
// rows are prefetched up to edge `ahead_end` (the end of the rows this thread sums).
inline void spmm_row(float* __restrict acc, i64 e0, i64 e1, i64 ahead_end, const i64* __restrict col,
                     const float* __restrict w, const float* __restrict x, i64 f) {
#pragma omp simd
  for (i64 c = 0; c < f; ++c) acc[c] = 0.f;
  for (i64 e = e0; e < e1; ++e) {
    if (e + PREFETCH_EDGES < ahead_end) prefetch_row(x + col[e + PREFETCH_EDGES] * f, f);
    const float we = w[e];
    const float* __restrict xr = x + col[e] * f;
#pragma omp simd
    for (i64 c = 0; c < f; ++c) acc[c] += we * xr[c];
  }
}

// relu bits of one row: bit c % 8 of byte c / 8 set when v[c] > 0. `pos` is scratch of
// >= 8 * ceil(f / 8) bytes (one 0/1 byte per feature, vectorised compare; then 8 bytes -> 1 by
// a multiply that gathers the low bit of each byte into the top byte).
inline void pack_positive(const float* __restrict v, i64 f, uint8_t* __restrict pos, uint8_t* __restrict out) {
  const i64 nb = (f + 7) / 8;
#pragma omp simd
  for (i64 c = 0; c < f; ++c) pos[c] = v[c] > 0.f ? 1 : 0;
  for (i64 c = f; c < nb * 8; ++c) pos[c] = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (i64 q = 0; q < nb; ++q) {
    uint64_t word;
    std::memcpy(&word, pos + 8 * q, sizeof(word));
    out[q] = static_cast<uint8_t>((word * 0x0102040810204080ULL) >> 56);
  }
#else
  for (i64 q = 0; q < nb; ++q) {
    unsigned byte = 0;
    for (int r = 0; r < 8; ++r) byte |= unsigned(pos[8 * q + r]) << r;
    out[q] = static_cast<uint8_t>(byte);
  }
#endif
}

// Forward rows [r0, r1): pre = A x + bias (in acc), saved state, out = act(pre) + residual. W > 0:
// f == W, known at compile time (see with_width).
template <int A, int W = 0>
FM_SIMD_CLONES void forward_rows(i64 r0, i64 r1, float* __restrict acc, const i64* rowptr, const i64* col,
                                 const float* w, const float* x, i64 f, const float* bias, const float* res,
                                 float* out, float* pre_out, uint8_t* bits) {
  if constexpr (W > 0) f = W;
  const i64 nb = (f + 7) / 8;
  uint8_t* pos = reinterpret_cast<uint8_t*>(acc + f);  // scratch beyond the accumulator
  for (i64 i = r0; i < r1; ++i) {
    if constexpr (W > 0) {
      spmm_row_fixed<W>(acc, rowptr[i], rowptr[i + 1], rowptr[r1], col, w, x);
    } else {
      spmm_row(acc, rowptr[i], rowptr[i + 1], rowptr[r1], col, w, x, f);
    }
    if (bias) {
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] += bias[c];
    }
    if constexpr (A == ACT_RELU) {
      pack_positive(acc, f, pos, bits + i * nb);
    } else if constexpr (A != ACT_NONE) {
      float* __restrict pr = pre_out + i * f;
#pragma omp simd
      for (i64 c = 0; c < f; ++c) pr[c] = acc[c];
    }
    float* __restrict o = out + i * f;
    if (res) {
      const float* __restrict rr = res + i * f;
#pragma omp simd
      for (i64 c = 0; c < f; ++c) o[c] = act_apply<A>(acc[c]) + rr[c];
    } else {
#pragma omp simd
      for (i64 c = 0; c < f; ++c) o[c] = act_apply<A>(acc[c]);
    }
  }
}

// Backward rows [r0, r1) of A^T: out[j] = sum_e w[e] * (g[i] * act'(pre[i])) over i = col[e],
// act' recomputed from the saved state of the gathered row (no grad_pre materialised). W as in
// forward_rows.
template <int A, int W = 0>
FM_SIMD_CLONES void backward_rows(i64 r0, i64 r1, float* __restrict acc, const i64* rowptr, const i64* col,
                                  const float* w, const float* g, const float* pre, const uint8_t* bits, i64 f,
                                  float* out) {
  if constexpr (W > 0) f = W;
  const i64 nb = (f + 7) / 8, full = f / 8;
  const BitMasks& lut = bit_masks();
  for (i64 j = r0; j < r1; ++j) {
    if constexpr (A == ACT_NONE && W > 0) {
      spmm_row_fixed<W>(acc, rowptr[j], rowptr[j + 1], rowptr[r1], col, w, g);
    } else if constexpr (A == ACT_NONE) {
      spmm_row(acc, rowptr[j], rowptr[j + 1], rowptr[r1], col, w, g, f);
    } else {
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] = 0.f;
      for (i64 e = rowptr[j]; e < rowptr[j + 1]; ++e) {
        const float we = w[e];
        const i64 i = col[e];
        const float* __restrict gr = g + i * f;
        if constexpr (A == ACT_RELU) {
          const uint8_t* __restrict br = bits + i * nb;
          for (i64 q = 0; q < full; ++q) {
            const float* __restrict mk = lut.m[br[q]];
            const float* __restrict gq = gr + 8 * q;
            float* __restrict aq = acc + 8 * q;
#pragma omp simd
            for (int r = 0; r < 8; ++r) aq[r] += we * (gq[r] * mk[r]);
          }
          for (i64 c = full * 8; c < f; ++c)
            if ((br[full] >> (c & 7)) & 1) acc[c] += we * gr[c];
        } else {
          const float* __restrict pr = pre + i * f;
#pragma omp simd
          for (i64 c = 0; c < f; ++c) acc[c] += we * (gr[c] * act_deriv<A>(pr[c]));
        }
      }
    }
    float* __restrict o = out + j * f;
#pragma omp simd
    for (i64 c = 0; c < f; ++c) o[c] = acc[c];
  }
}

// grad_pre row i into dst: g[i] * act'(pre[i]).
template <int A>
inline void grad_pre_row(float* __restrict dst, i64 i, const float* __restrict g, const float* __restrict pre,
                         const uint8_t* __restrict bits, i64 f) {
  const float* __restrict gr = g + i * f;
  if constexpr (A == ACT_NONE) {
#pragma omp simd
    for (i64 c = 0; c < f; ++c) dst[c] = gr[c];
  } else if constexpr (A == ACT_RELU) {
    const uint8_t* __restrict br = bits + i * ((f + 7) / 8);
    const BitMasks& lut = bit_masks();
    const i64 full = f / 8;
    for (i64 q = 0; q < full; ++q) {
      const float* __restrict mk = lut.m[br[q]];
#pragma omp simd
      for (int r = 0; r < 8; ++r) dst[8 * q + r] = gr[8 * q + r] * mk[r];
    }
    for (i64 c = full * 8; c < f; ++c) dst[c] = gr[c] * lut.m[br[full]][c & 7];
  } else {
    const float* __restrict pr = pre + i * f;
#pragma omp simd
    for (i64 c = 0; c < f; ++c) dst[c] = gr[c] * act_deriv<A>(pr[c]);
  }
}

template <int A>
FM_SIMD_CLONES void grad_pre_rows(i64 r0, i64 r1, float* dst, const float* g, const float* pre,
                                  const uint8_t* bits, i64 f) {
  for (i64 i = r0; i < r1; ++i) grad_pre_row<A>(dst + i * f, i, g, pre, bits, f);
}

// SDDMM rows [r0, r1): out[e] = <g[i] * act'(pre[i]), x[col[e]]>, dot products in double.
template <int A>
FM_SIMD_CLONES void edge_rows(i64 r0, i64 r1, float* __restrict buf, const i64* rp, const i64* cp,
                              const float* gp, const float* pre, const uint8_t* bits, const float* xp, i64 f,
                              float* op) {
  for (i64 i = r0; i < r1; ++i) {
    const i64 e0 = rp[i], e1 = rp[i + 1];
    if (e0 == e1) continue;
    grad_pre_row<A>(buf, i, gp, pre, bits, f);
    const float* __restrict g = buf;
    for (i64 e = e0; e < e1; ++e) {
      const float* __restrict xr = xp + cp[e] * f;
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (i64 c = 0; c < f; ++c) s += double(g[c]) * double(xr[c]);
      op[e] = static_cast<float>(s);
    }
  }
}

// acc[0:f) = sum of x[col[e], 0:f) over e in [e0, e1) in edge order, skipping the entries whose
// column is `skip` (a row's own self loop; -1 skips nothing); prefetched as spmm_row.
inline void sum_row(float* __restrict acc, i64 e0, i64 e1, i64 ahead_end, const i64* __restrict col,
                    const float* __restrict x, i64 f, i64 skip) {
#pragma omp simd
  for (i64 c = 0; c < f; ++c) acc[c] = 0.f;
  for (i64 e = e0; e < e1; ++e) {
    if (e + PREFETCH_EDGES < ahead_end) prefetch_row(x + col[e + PREFETCH_EDGES] * f, f);
    const i64 j = col[e];
    if (j == skip) continue;
    const float* __restrict xr = x + j * f;
#pragma omp simd
    for (i64 c = 0; c < f; ++c) acc[c] += xr[c];
  }
}

// Propagation rows [r0, r1): out[i] = act(s_i * sum_e x[col[e]] + t_i * self_x[i] + bias), with
// s = row_scale, t = self_scale (1 where absent) and the self term only where self_x is given.
template <int A>
FM_SIMD_CLONES void propagate_rows(i64 r0, i64 r1, float* __restrict acc, const i64* rowptr, const i64* col,
                                   const float* x, i64 f, const float* row_scale, const float* self_x,
                                   const float* self_scale, const float* bias, bool skip_loops, float* out) {
  for (i64 i = r0; i < r1; ++i) {
    sum_row(acc, rowptr[i], rowptr[i + 1], rowptr[r1], col, x, f, skip_loops ? i : -1);
    const float s = row_scale ? row_scale[i] : 1.f;
    if (self_x) {
      const float t = self_scale ? self_scale[i] : 1.f;
      const float* __restrict sx = self_x + i * f;
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] = s * acc[c] + t * sx[c];
    } else {
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] *= s;
    }
    if (bias) {
#pragma omp simd
      for (i64 c = 0; c < f; ++c) acc[c] += bias[c];
    }
    float* __restrict o = out + i * f;
#pragma omp simd
    for (i64 c = 0; c < f; ++c) o[c] = act_apply<A>(acc[c]);
  }
}

// Calls rows(std::integral_constant<int, W>) with W = f for 1 <= f <= 7 and f in {16, 32, 64} when A
// has no activation (the propagation of a last layer's classes, where per-row loops over a runtime
// width of a few features cost more than the sums; the gather of a first layer's weight rows at
// common hidden widths, 1.8x faster at 64), else W = 0 (f at run time).
template <int A, class Rows>
void with_width(i64 f, Rows&& rows) {
  if constexpr (A == ACT_NONE) {
    switch (f) {
#define FM_FIXED(W) \
  case W:           \
    return rows(std::integral_constant<int, W>{});
      FM_FIXED(1) FM_FIXED(2) FM_FIXED(3) FM_FIXED(4) FM_FIXED(5) FM_FIXED(6) FM_FIXED(7) FM_FIXED(16) FM_FIXED(32)
      FM_FIXED(64)
#undef FM_FIXED
      default:
        break;
    }
  }
  rows(std::integral_constant<int, 0>{});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> aggregate_forward(const at::Tensor& rowptr, const at::Tensor& col,
                                                     const at::Tensor& weight, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& bias, int64_t act,
                                                     const c10::optional<at::Tensor>& residual) {
  check_tensor(x, "x", at::kFloat, 2);
  const i64 m = x.size(0), f = x.size(1);
  const i64 n = check_csr(rowptr, col, &weight, m, "aggregate_forward");
  TORCH_CHECK_VALUE(act >= 0 && act < NUM_ACTS, "unknown activation code ", act);
  const float* bias_p = nullptr;
  const float* res_p = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_tensor(*bias, "bias", at::kFloat, 1);
    TORCH_CHECK_VALUE(bias->numel() == f, "bias must have ", f, " entries, got ", bias->numel());
    bias_p = bias->data_ptr<float>();
  }
  if (residual.has_value() && residual->defined()) {
    check_tensor(*residual, "residual", at::kFloat, 2);
    TORCH_CHECK_VALUE(residual->size(0) == n && residual->size(1) == f, "residual must have shape [", n, ", ", f,
                      "], got ", residual->sizes());
    res_p = residual->data_ptr<float>();
  }
  at::Tensor out = at::empty({n, f}, x.options());
  at::Tensor saved;
  float* pre_p = nullptr;
  uint8_t* bits_p = nullptr;
  if (act == ACT_NONE) {
    saved = at::empty({0}, x.options());
  } else if (act == ACT_RELU) {
    saved = at::empty({n, (f + 7) / 8}, x.options().dtype(at::kByte));
    bits_p = saved.data_ptr<uint8_t>();
  } else {
    saved = at::empty({n, f}, x.options());
    pre_p = saved.data_ptr<float>();
  }
  if (n == 0 || f == 0) {
    if (act == ACT_RELU) saved.zero_();
    return {out, saved};
  }
  const i64* rp = rowptr.data_ptr<i64>();
  const i64* cp = col.data_ptr<i64>();
  const float* wp = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const i64 scratch = f + 2 * ((f + 7) / 8) + 2;  // accumulator + relu byte mask
  FM_DISPATCH_ACT(act, parallel_csr_rows(rp, n, f, cheap_deriv<A>() ? 2 * f : 8 * f, scratch,
                                         [&](i64 r0, i64 r1, float* acc) {
                                           with_width<A>(f, [&](auto width) {
                                             forward_rows<A, decltype(width)::value>(r0, r1, acc, rp, cp, wp, xp, f,
                                                                                     bias_p, res_p, op, pre_p, bits_p);
                                           });
                                         }));
  return {out, saved};
}

at::Tensor aggregate_backward(const at::Tensor& t_rowptr, const at::Tensor& t_col, const at::Tensor& t_weight,
                              const at::Tensor& grad_out, const at::Tensor& saved, int64_t act) {
  check_tensor(grad_out, "grad_out", at::kFloat, 2);
  const i64 n = grad_out.size(0), f = grad_out.size(1);
  const i64 m = check_csr(t_rowptr, t_col, &t_weight, n, "aggregate_backward");
  TORCH_CHECK_VALUE(act >= 0 && act < NUM_ACTS, "unknown activation code ", act);
  check_saved(saved, act, n, f);
  at::Tensor grad_x = at::empty({m, f}, grad_out.options());
  if (m == 0 || f == 0) return grad_x;
  const i64* rp = t_rowptr.data_ptr<i64>();
  const i64* cp = t_col.data_ptr<i64>();
  const float* wp = t_weight.data_ptr<float>();
  const float* gp = grad_out.data_ptr<float>();
  const float* pre = (act >= ACT_ELU) ? saved.data_ptr<float>() : nullptr;
  const uint8_t* bits = (act == ACT_RELU) ? saved.data_ptr<uint8_t>() : nullptr;
  float* out = grad_x.data_ptr<float>();
  const i64 E = t_col.numel();

  // Transcendental derivatives (elu, tanh, gelu): when rows are gathered more than once on average,
  // evaluating act' once per element (grad_pre, n x f, then a plain SpMM) is cheaper than once per
  // gathered edge. relu / leaky_relu / none are always fused into the gather.
  at::Tensor grad_pre;
  if ((act == ACT_ELU || act == ACT_TANH || act == ACT_GELU) && E > n) {
    grad_pre = at::empty({n, f}, grad_out.options());
    float* gpre = grad_pre.data_ptr<float>();
    const i64 rows_per_task = std::max<i64>(1, SERIAL_WORK / (8 * f));
    FM_DISPATCH_ACT(act, at::parallel_for(0, n, rows_per_task, [&](i64 r0, i64 r1) {
      grad_pre_rows<A>(r0, r1, gpre, gp, pre, bits, f);
    }));
    gp = gpre;
    act = ACT_NONE;
  }
  FM_DISPATCH_ACT(act, parallel_csr_rows(rp, m, cheap_deriv<A>() ? 2 * f : 10 * f, f, f,
                                         [&](i64 r0, i64 r1, float* acc) {
                                           with_width<A>(f, [&](auto width) {
                                             backward_rows<A, decltype(width)::value>(r0, r1, acc, rp, cp, wp, gp, pre,
                                                                                      bits, f, out);
                                           });
                                         }));
  return grad_x;
}

at::Tensor edge_grad(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& grad_out,
                     const at::Tensor& saved, int64_t act, const at::Tensor& x) {
  check_tensor(grad_out, "grad_out", at::kFloat, 2);
  check_tensor(x, "x", at::kFloat, 2);
  const i64 m = x.size(0), f = x.size(1);
  const i64 n = check_csr(rowptr, col, nullptr, m, "edge_grad");
  TORCH_CHECK_VALUE(grad_out.size(0) == n && grad_out.size(1) == f, "grad_out must have shape [", n, ", ", f,
                    "] (rows of the CSR, features of x), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(act >= 0 && act < NUM_ACTS, "unknown activation code ", act);
  check_saved(saved, act, n, f);
  const i64 E = col.numel();
  at::Tensor out = at::empty({E}, x.options());
  if (E == 0) return out;
  const i64* rp = rowptr.data_ptr<i64>();
  const i64* cp = col.data_ptr<i64>();
  const float* gp = grad_out.data_ptr<float>();
  const float* pre = (act >= ACT_ELU) ? saved.data_ptr<float>() : nullptr;
  const uint8_t* bits = (act == ACT_RELU) ? saved.data_ptr<uint8_t>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  FM_DISPATCH_ACT(act, parallel_csr_rows(rp, n, 2 * f, cheap_deriv<A>() ? f : 8 * f, f,
                                         [&](i64 r0, i64 r1, float* buf) {
                                           edge_rows<A>(r0, r1, buf, rp, cp, gp, pre, bits, xp, f, op);
                                         }));
  return out;
}

// Optional float32 tensor argument: its data, after checking it is [rows] (cols < 0) or [rows, cols].
namespace {
const float* optional_rows(const c10::optional<at::Tensor>& t, const char* name, i64 rows, i64 cols) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_tensor(*t, name, at::kFloat, cols < 0 ? 1 : 2);
  const bool ok = t->size(0) == rows && (cols < 0 || t->size(1) == cols);
  TORCH_CHECK_VALUE(ok, name, " must have shape [", rows, cols < 0 ? "" : ", ", cols < 0 ? "" : std::to_string(cols),
                    "], got ", t->sizes());
  return t->data_ptr<float>();
}
}  // namespace

at::Tensor propagate_forward(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                             const c10::optional<at::Tensor>& row_scale, const c10::optional<at::Tensor>& self_x,
                             const c10::optional<at::Tensor>& self_scale, const c10::optional<at::Tensor>& bias,
                             int64_t act, bool skip_loops) {
  check_tensor(x, "x", at::kFloat, 2);
  const i64 m = x.size(0), f = x.size(1);
  const i64 n = check_csr(rowptr, col, nullptr, m, "propagate_forward");
  TORCH_CHECK_VALUE(act >= 0 && act < NUM_ACTS, "unknown activation code ", act);
  const float* scale_p = optional_rows(row_scale, "row_scale", n, -1);
  const float* self_p = optional_rows(self_x, "self_x", n, f);
  const float* self_scale_p = optional_rows(self_scale, "self_scale", n, -1);
  TORCH_CHECK_VALUE(self_p || !self_scale_p, "self_scale needs self_x");
  const float* bias_p = optional_rows(bias, "bias", f, -1);
  at::Tensor out = at::empty({n, f}, x.options());
  if (n == 0 || f == 0) return out;
  const i64* rp = rowptr.data_ptr<i64>();
  const i64* cp = col.data_ptr<i64>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  FM_DISPATCH_ACT(act, parallel_csr_rows(rp, n, f, cheap_deriv<A>() ? 3 * f : 9 * f, f,
                                         [&](i64 r0, i64 r1, float* acc) {
                                           propagate_rows<A>(r0, r1, acc, rp, cp, xp, f, scale_p, self_p,
                                                             self_scale_p, bias_p, skip_loops, op);
                                         }));
  return out;
}

}  // namespace fm
