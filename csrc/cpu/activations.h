// Activation functions of the fused CPU kernels and their derivatives (branch-free, vectorisable).
// Codes match fastmetamer/ops/activations.py ACT_CODES (the order of ACTIVATIONS).
#pragma once

#include <cmath>

#include "fast_math.h"

namespace fm {

enum Act : int { ACT_NONE = 0, ACT_RELU = 1, ACT_ELU = 2, ACT_LEAKY = 3, ACT_TANH = 4, ACT_GELU = 5 };
constexpr int NUM_ACTS = 6;
constexpr float LEAKY_SLOPE = 0.01f;  // torch.nn.LeakyReLU default

// act(x)
template <int A>
inline float act_apply(float x) {
  if constexpr (A == ACT_NONE) {
    return x;
  } else if constexpr (A == ACT_RELU) {
    return x < 0.f ? 0.f : x;  // NaN propagates like torch.relu
  } else if constexpr (A == ACT_ELU) {
    return x > 0.f ? x : fast_expm1(x);
  } else if constexpr (A == ACT_LEAKY) {
    return x > 0.f ? x : x * LEAKY_SLOPE;
  } else if constexpr (A == ACT_TANH) {
    return fast_tanh(x);
  } else {
    return 0.5f * x * (1.f + fast_erf(x * 0.70710678118654752440f));
  }
}

// act'(x) (subgradient 0 at 0 for relu, as autograd)
template <int A>
inline float act_deriv(float x) {
  if constexpr (A == ACT_NONE) {
    return 1.f;
  } else if constexpr (A == ACT_RELU) {
    return x > 0.f ? 1.f : 0.f;
  } else if constexpr (A == ACT_ELU) {
    return x > 0.f ? 1.f : fast_exp(x);
  } else if constexpr (A == ACT_LEAKY) {
    return x > 0.f ? 1.f : LEAKY_SLOPE;
  } else if constexpr (A == ACT_TANH) {
    return fast_sech2(x);
  } else {
    const float cdf = 0.5f * (1.f + fast_erf(x * 0.70710678118654752440f));
    return cdf + x * fast_exp(-0.5f * x * x) * 0.39894228040143267794f;
  }
}

// Derivatives that are cheap enough to recompute per gathered edge in backward.
template <int A>
constexpr bool cheap_deriv() {
  return A == ACT_NONE || A == ACT_RELU || A == ACT_LEAKY;
}

}  // namespace fm

// Runs the statement with a constexpr int A bound to the activation code `act`.
#define FM_DISPATCH_ACT(act, ...)                                                       \
  switch (act) {                                                                        \
    case ::fm::ACT_NONE: { constexpr int A = ::fm::ACT_NONE; __VA_ARGS__; break; }      \
    case ::fm::ACT_RELU: { constexpr int A = ::fm::ACT_RELU; __VA_ARGS__; break; }      \
    case ::fm::ACT_ELU: { constexpr int A = ::fm::ACT_ELU; __VA_ARGS__; break; }        \
    case ::fm::ACT_LEAKY: { constexpr int A = ::fm::ACT_LEAKY; __VA_ARGS__; break; }    \
    case ::fm::ACT_TANH: { constexpr int A = ::fm::ACT_TANH; __VA_ARGS__; break; }      \
    case ::fm::ACT_GELU: { constexpr int A = ::fm::ACT_GELU; __VA_ARGS__; break; }      \
    default: TORCH_CHECK_VALUE(false, "unknown activation code ", act);                 \
  }
