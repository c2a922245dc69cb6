// Elementwise float math for the optional CPU kernels (selective_scan_cpu.cpp, causal_conv1d_cpu.cpp),
// in forms the compiler vectorises: an 8-float GCC vector type `vf` (one AVX2 register, or two SSE
// ones), exp / log1p / softplus / sigmoid / silu written for both `float` and `vf`, and `for_steps`, a loop
// over a row that runs W steps at a time and then the tail one by one.
#pragma once

#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace muse_pyramid_cpu {

constexpr int64_t W = 8;  // floats per vector

typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef float vh __attribute__((vector_size(W / 2 * sizeof(float))));
// the same vector at any float address (an unaligned load or store, no aliasing assumption)
typedef float vf_unaligned __attribute__((vector_size(W * sizeof(float)), aligned(alignof(float)), may_alias));

inline vf load_vf(const float* p) { return *reinterpret_cast<const vf_unaligned*>(p); }
inline void store_vf(float* p, vf v) { *reinterpret_cast<vf_unaligned*>(p) = v; }

template <class T>
inline T splat(float v) {
  return T{} + v;
}

inline float bits_to_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline vf bits_to_float(vi b) {
  vf f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline int32_t to_int(float x) { return static_cast<int32_t>(x); }
inline vi to_int(vf x) { return __builtin_convertvector(x, vi); }

// x clamped to [lo, hi] (one max and one min instruction where AVX has them)
inline float clamp(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }
inline vf clamp(vf x, float lo, float hi) {
#if defined(__AVX__)
  static_assert(sizeof(vf) == sizeof(__m256), "clamp is written for 8-float vectors");
  return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
#else
  const vf lo_v = splat<vf>(lo), hi_v = splat<vf>(hi);
  x = x < lo_v ? lo_v : x;
  return x > hi_v ? hi_v : x;
#endif
}

// exp: Cody-Waite reduction by ln 2 and a degree-6 polynomial (the coefficients of Cephes' expf);
// relative error about 2e-7 on [-87.3, 88]. T: float or vf.
template <class T>
inline T exp_f32(T x) {
  x = clamp(x, -87.33654f, 88.0f);
  const T k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  T r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  T p = splat<T>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((to_int(k) + 127) << 23);
}

inline float hsum(vf v) {
  const vh s = vh{v[0], v[1], v[2], v[3]} + vh{v[4], v[5], v[6], v[7]};
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, series to s^13 (error < 1e-8)
template <class T>
inline T log1p_unit(T e) {
  const T s = e / (2.0f + e), s2 = s * s;
  T p = splat<T>(1.0f / 13.0f);
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)); equals F.softplus (threshold 20) in fp32
template <class T>
inline T softplus(T x) {
  const T zero = splat<T>(0.0f);
  return (x > zero ? x : zero) + log1p_unit(exp_f32(x < zero ? x : -x));
}

template <class T>
inline T sigmoid(T x) {
  const T zero = splat<T>(0.0f), e = exp_f32(x < zero ? x : -x), r = 1.0f / (1.0f + e);
  return x >= zero ? r : e * r;
}

// silu(x) = x sigmoid(x)
template <class T>
inline T silu(T x) {
  return x * sigmoid(x);
}

// g * d silu / dx at x, given s = sigmoid(x)
template <class T>
inline T silu_grad(T x, T s, T g) {
  return g * s * (1.0f + x * (1.0f - s));
}

// Elementwise loops over steps, W steps at a time: f(t, T{}) with T = vf for whole vectors, then
// T = float for the tail. `get<T>(p, t)` reads W (or 1) values at p + t, `put` writes them.
template <class F>
inline void for_steps(int64_t n, F f) {
  int64_t t = 0;
  for (; t + W <= n; t += W) f(t, vf{});
  for (; t < n; ++t) f(t, 0.0f);
}

template <class T>
inline T get(const float* p, int64_t t) {
  if constexpr (sizeof(T) == sizeof(vf)) {
    return load_vf(p + t);
  } else {
    return p[t];
  }
}

inline void put(float* p, int64_t t, vf v) { store_vf(p + t, v); }
inline void put(float* p, int64_t t, float v) { p[t] = v; }

inline float hsum(float v) { return v; }

}  // namespace muse_pyramid_cpu
