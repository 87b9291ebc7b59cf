// Include first in every kernel file.
//
// 1. Floating-point options that let GCC if-convert and vectorise loops with selects and
//    float<->int conversions: no FP trapping, no errno for math functions. Results stay IEEE
//    (no fast-math reassociation). No unroll-and-jam either: it fuses two edges of the sparse
//    gathers into one scalar feature loop instead of vectorising over features. Set before any other include so that inlined functions share
//    one set of options (GCC does not inline across differing optimize attributes).
// 2. FM_SIMD_CLONES: function multi-versioning for the hot leaf kernels. The extension is built
//    with portable flags (x86-64 baseline = SSE2); on x86-64 Linux with GCC each marked function
//    is also compiled for x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512), and the dynamic loader
//    picks the best one the CPU supports (ifunc). Elsewhere it expands to nothing.
// 3. Branch-free exp / expm1 / tanh / erf / sqrt for float that vectorise (libm calls do not).
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "no-math-errno", "no-loop-unroll-and-jam")
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FM_NO_CLONES)
#define FM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_SIMD_CLONES
#endif

namespace fm {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x) (Cephes expf polynomial, ~1 ulp); inputs are clamped to [-87.34, 88.72] (so exp(x)
// underflows to ~1.2e-38, not 0, and is +inf above).
inline float fast_exp(float x) {
  x = x < -87.3365447f ? -87.3365447f : x;
  x = x > 88.7228391f ? 88.7228391f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.f) - 12582912.f;  // round to nearest (|t| < 2^22)
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// exp(x) - 1, accurate near 0 (Taylor series to x^8 for |x| < 0.5).
inline float fast_expm1(float x) {
  float p = 2.48015873e-5f;  // 1/8!
  p = p * x + 1.98412698e-4f;
  p = p * x + 1.38888889e-3f;
  p = p * x + 8.33333333e-3f;
  p = p * x + 4.16666667e-2f;
  p = p * x + 1.66666667e-1f;
  p = p * x + 0.5f;
  const float small = x + x * x * p;
  const float big = fast_exp(x) - 1.f;
  return std::fabs(x) < 0.5f ? small : big;
}

// tanh(x): Eigen's rational 13/6 approximation (a few ulp), exact sign and tanh(x) = x near 0.
inline float fast_tanh(float x) {
  const float c = 7.90531110763549805f;
  const float xc = x > c ? c : (x < -c ? -c : x);
  const float x2 = xc * xc;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * xc;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const float r = p / q;
  return std::fabs(x) < 0.0004f ? x : r;
}

// erf(x): Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), the formula PyTorch's
// vectorised CPU erf uses.
inline float fast_erf(float x) {
  const float ax = std::fabs(x);
  const float t = 1.f / (1.f + 0.3275911f * ax);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float y = 1.f - r * t * fast_exp(-ax * ax);
  return x < 0.f ? -y : y;
}

// sqrt(x) for x >= 0 without a libm call (GCC keeps errno handling around std::sqrt even under
// the optimize pragma, which stops vectorisation): reciprocal square root by the bit trick, two
// Newton steps, one Newton correction of the root (~1 ulp). Subnormals are scaled first.
inline float fast_sqrt(float x) {
  const bool tiny = x < 1.17549435e-38f;
  const float xs = tiny ? x * 281474976710656.f : x;  // 2^48
  float y = bits_to_float(0x5f375a86 - (float_to_bits(xs) >> 1));
  const float hx = 0.5f * xs;
  y = y * (1.5f - hx * y * y);
  y = y * (1.5f - hx * y * y);
  float r = xs * y;
  r = r + 0.5f * y * (xs - r * r);
  return tiny ? r * 5.9604644775390625e-8f : r;  // 2^-24
}

inline float fast_sigmoid(float z) { return 1.f / (1.f + fast_exp(-z)); }

}  // namespace fm
