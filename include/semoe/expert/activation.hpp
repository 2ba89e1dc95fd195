// semoe/expert/activation.hpp: activations as SEMOE_HD value functions with
// exact derivatives. float uses a branch-free exp that the compiler
// vectorizes (std::exp does not without -ffast-math); double uses std::exp so
// finite-difference checks see the exact function.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "semoe/core/config.hpp"

namespace semoe::act {

namespace detail {

/// exp(x) for float: 2^n * p(r), |r| <= ln2/2, degree-6 minimax-style
/// polynomial; ~2 ulp over [-87, 88], clamps outside.
SEMOE_HD inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest even by adding and subtracting 1.5 * 2^23 (exact for
  // |value| < 2^22): std::nearbyint's bits, without a libm call that stops
  // the loop from vectorizing where the target lacks a rounding instruction.
  constexpr float shifter = 12582912.0f;
  const float n = (x * 1.44269504088896341f + shifter) - shifter;
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto bits = static_cast<std::int32_t>(n) + 127;
  return p * std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 23);
}

template <class T>
SEMOE_HD inline T exp(T x) {
  if constexpr (std::is_same_v<T, float>)
    return exp_f32(x);
  else
    return std::exp(x);
}

/// tanh through exp: exact to a few ulp, vectorizable for float.
template <class T>
SEMOE_HD inline T tanh(T x) {
  const T e = exp<T>(T(-2) * std::fabs(x));
  return std::copysign((T(1) - e) / (T(1) + e), x);  // sign by bit operations, no branch
}

}  // namespace detail

/// max(x, 0).
struct relu {
  static constexpr const char* name = "relu";
  static constexpr bool gated = false;
  template <class T>
  SEMOE_HD static T f(T x) { return x > T(0) ? x : T(0); }
  template <class T>
  SEMOE_HD static T df(T x) { return x > T(0) ? T(1) : T(0); }
};

/// GELU, tanh form (Hendrycks & Gimpel), as in GPT-2 and most MoE models:
/// 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as
/// x * sigmoid(2u) (the same function: 0.5 (1 + tanh(u)) = sigmoid(2u)), one
/// exp and one division.
struct gelu {
  static constexpr const char* name = "gelu";
  static constexpr bool gated = false;
  template <class T>
  SEMOE_HD static T f(T x) {
    return x * (T(1) / (T(1) + detail::exp<T>(T(-2) * u(x))));  // the bits f_df gives
  }
  template <class T>
  SEMOE_HD static T df(T x) {
    T v, d;
    f_df(x, v, d);
    return d;
  }
  /// f and df together, sharing one exp (backward needs both):
  /// df = s + 2 x s (1 - s) du/dx with s = sigmoid(2u).
  template <class T>
  SEMOE_HD static void f_df(T x, T& v, T& d) {
    const T s = T(1) / (T(1) + detail::exp<T>(T(-2) * u(x)));
    const T du = T(0.7978845608028654) * (T(1) + T(3 * 0.044715) * x * x);
    v = x * s;
    d = s + T(2) * x * s * (T(1) - s) * du;
  }

 private:
  template <class T>
  SEMOE_HD static T u(T x) {
    return T(0.7978845608028654) * (x + T(0.044715) * x * x * x);
  }
};

/// SiLU / swish: x * sigmoid(x).
struct silu {
  static constexpr const char* name = "silu";
  static constexpr bool gated = false;
  template <class T>
  SEMOE_HD static T sigmoid(T x) { return T(1) / (T(1) + detail::exp<T>(-x)); }
  template <class T>
  SEMOE_HD static T f(T x) { return x * sigmoid(x); }
  template <class T>
  SEMOE_HD static T df(T x) {
    const T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
  template <class T>
  SEMOE_HD static void f_df(T x, T& v, T& d) {
    const T s = sigmoid(x);
    v = x * s;
    d = s * (T(1) + x * (T(1) - s));
  }
};

/// SwiGLU (Shazeer 2020): the first projection is twice as wide, [a | b], and
/// the hidden value is silu(a) * b. `gated` tells the expert to size W1 so.
struct swiglu {
  static constexpr const char* name = "swiglu";
  static constexpr bool gated = true;
  template <class T>
  SEMOE_HD static T f(T a) { return silu::f(a); }
  template <class T>
  SEMOE_HD static T df(T a) { return silu::df(a); }
  template <class T>
  SEMOE_HD static void f_df(T a, T& v, T& d) { silu::f_df(a, v, d); }
};

/// v = A::f(x) and d = A::df(x), through A::f_df when A has it (one
/// exp or tanh for both), else through f and df.
template <class A, class T>
SEMOE_HD inline void value_and_slope(T x, T& v, T& d) {
  if constexpr (requires { A::template f_df<T>(x, v, d); }) {
    A::template f_df<T>(x, v, d);
  } else {
    v = A::template f<T>(x);
    d = A::template df<T>(x);
  }
}

template <class A>
concept Activation = requires {
  { A::gated } -> std::convertible_to<bool>;
  { A::template f<float>(1.0f) } -> std::same_as<float>;
  { A::template df<float>(1.0f) } -> std::same_as<float>;
};

}  // namespace semoe::act
