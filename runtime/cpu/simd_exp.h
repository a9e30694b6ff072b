// exp for f32 that vectorises. glibc's expf is an opaque call that GCC only replaces with its
// vector variant under -ffast-math, which the build does not use (NaN/Inf semantics matter);
// in the softmax, cross-entropy and SiLU loops that call costs ~10x the rest of the loop.
// simd_exp is branch-free arithmetic, so a loop under `#pragma omp simd` vectorises it.
//
// Method (Cephes expf): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite split of ln2), exp(r) by a
// degree-7 minimax polynomial, 2^n assembled in the exponent bits. Relative error about 1 ulp
// (8.6e-8 at most over 2e8 points of [-87.3, 88.3], against exp in double).
// Range: like expf it gives 0 far below and +inf far above, and NaN stays NaN. The clamp to
// [-88, 89] maps the ends onto n = -127 and n = 128, whose exponent bits are those of 0 and inf.
// The price: results below ~8e-39 (x < -87.68) flush to 0 (expf goes subnormal there), and
// x in (88.37, 88.72] already overflows to inf.
#pragma once

#include <bit>
#include <cstdint>

namespace moeforge::cpu {

// x < lo ? lo : (x > hi ? hi : x), NaN passing through. Selected with integer masks: under
// -ftrapping-math (GCC's default) a float ternary or std::min is not if-converted, and the loop
// around it would stay scalar.
inline float clamp_for_simd(float x, float lo, float hi) {
  const int32_t below = -static_cast<int32_t>(x < lo);
  const int32_t above = -static_cast<int32_t>(x > hi);
  return std::bit_cast<float>((std::bit_cast<int32_t>(x) & ~(below | above)) | (std::bit_cast<int32_t>(lo) & below) |
                              (std::bit_cast<int32_t>(hi) & above));
}

inline float simd_exp(float x) {
  x = clamp_for_simd(x, -88.0f, 89.0f);
  // Round x / ln2 to the nearest integer: adding 1.5 * 2^23 pushes the fraction bits out and
  // leaves n in the low mantissa bits, where it is read without a float-to-int conversion.
  constexpr float kRound = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const int32_t n_int = std::bit_cast<int32_t>(shifted) - std::bit_cast<int32_t>(kRound);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  return er * std::bit_cast<float>((n_int + 127) << 23);
}

}  // namespace moeforge::cpu
