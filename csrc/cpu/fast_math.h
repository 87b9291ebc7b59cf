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
// 3. Branch-free exp / expm1 / tanh / erf for float that vectorise (libm calls do not); tanh and
//    its derivative are evaluated in double so that they round (almost) correctly. std::sqrt
//    vectorises to the hardware's correctly rounded square root because setup.py compiles with
//    -fno-math-errno (the optimize pragma alone leaves errno handling around it).
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

// expm1(2|x|) in double, to ~1e-12 relative at every size: Taylor series (to z^14) at
// z = 2|x| / 128, then seven doublings expm1(2z) = expm1(z) (expm1(z) + 2), which keep the
// relative accuracy (no cancellation near 0). |x| is clamped to 44 (beyond, tanh is 1 and sech^2
// below the smallest normal float); NaN stays NaN. Pure double arithmetic: it vectorises.
inline double expm1_2abs(float x) {
  double a = std::fabs(static_cast<double>(x));
  a = a > 44.0 ? 44.0 : a;
  const double z = a * (2.0 / 128.0);
  double p = 1.1470745597729725e-11;  // 1/14!
  p = p * z + 1.6059043836821613e-10;  // 1/13!
  p = p * z + 2.08767569878681e-09;  // 1/12!
  p = p * z + 2.505210838544172e-08;  // 1/11!
  p = p * z + 2.755731922398589e-07;  // 1/10!
  p = p * z + 2.7557319223985893e-06;  // 1/9!
  p = p * z + 2.48015873015873e-05;  // 1/8!
  p = p * z + 0.0001984126984126984;  // 1/7!
  p = p * z + 0.001388888888888889;  // 1/6!
  p = p * z + 0.008333333333333333;  // 1/5!
  p = p * z + 0.041666666666666664;  // 1/4!
  p = p * z + 0.16666666666666666;  // 1/3!
  p = p * z + 0.5;  // 1/2!
  p = p * z + 1.0;
  double m = z * p;
  for (int i = 0; i < 7; ++i) m = m * (m + 2.0);
  return m;
}

// tanh(x) = sign(x) m / (m + 2) with m = expm1(2|x|), evaluated in double: the float result is
// the correctly rounded tanh but in rare near-halfway cases (torch's tanh is within 0.51 ulp;
// an all-float approximation such as Eigen's rational one is off by up to 4.5 ulp, more than the
// SPEC 7 rule of 2x the float32 reference's error allows). Keeps the sign of zero.
inline float fast_tanh(float x) {
  const double m = expm1_2abs(x);
  return std::copysign(static_cast<float>(m / (m + 2.0)), x);
}

// 1 - tanh(x)^2 = 4 (m + 1) / (m + 2)^2 with m = expm1(2|x|), in double: no cancellation for
// large |x| (1 - t*t of a rounded t loses all digits there).
inline float fast_sech2(float x) {
  const double m = expm1_2abs(x);
  const double q = m + 2.0;
  return static_cast<float>(4.0 * (m + 1.0) / (q * q));
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

inline float fast_sigmoid(float z) { return 1.f / (1.f + fast_exp(-z)); }

}  // namespace fm
