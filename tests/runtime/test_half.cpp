// Tests runtime/half.h: bf16 and f16 <-> fp32 conversion. Every 16-bit pattern round-trips;
// fp32 -> 16-bit rounds to nearest, ties to even, as IEEE-754 conversion does (checked on
// constructed ties, overflow and subnormal boundaries, and against two independent references on
// a million random bit patterns); Tensor::to() goes through the same conversions.
#include <gtest/gtest.h>

#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "runtime/half.h"
#include "runtime/tensor.h"

namespace moeforge {
namespace {

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }
float float_of(uint32_t u) { return std::bit_cast<float>(u); }

// Round |x| (a finite, non-negative double holding an exact fp32 value) to the nearest multiple
// of the 16-bit format's quantum at x's binade, ties to an even multiple. `mant_bits` is the
// stored mantissa width, `min_exp` the smallest normal exponent, `max_finite` the largest finite
// value; anything that rounds past max_finite is Inf. Plain arithmetic on doubles: shares no
// bit manipulation with half.h.
double round_reference(double x, int mant_bits, int min_exp, double max_finite) {
  if (x == 0.0) return 0.0;
  const int e = std::max(std::ilogb(x), min_exp);
  const double quantum = std::ldexp(1.0, e - mant_bits);
  const double q = x / quantum;  // exact: a power-of-two scaling of an fp32 value
  const double lo = std::floor(q);
  const double frac = q - lo;
  double n = lo;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(lo, 2.0) != 0.0)) n = lo + 1.0;
  const double r = n * quantum;
  return r > max_finite ? std::numeric_limits<double>::infinity() : r;
}

// The expected 16-bit pattern for a finite or infinite fp32 value, via round_reference().
uint16_t bf16_reference(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isinf(f)) return sign | 0x7f80;
  const double r = round_reference(std::fabs(static_cast<double>(f)), 7, -126, 0x1.fep127);
  if (std::isinf(r)) return sign | 0x7f80;
  // r is representable in bf16, hence in fp32 with the low 16 bits zero.
  const uint32_t u = bits_of(static_cast<float>(r));
  EXPECT_EQ(u & 0xffffu, 0u);
  return sign | static_cast<uint16_t>(u >> 16);
}

uint16_t f16_reference(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isinf(f)) return sign | 0x7c00;
  const double r = round_reference(std::fabs(static_cast<double>(f)), 10, -14, 65504.0);
  if (std::isinf(r)) return sign | 0x7c00;
  // Encode: subnormals are multiples of 2^-24 below 2^-14, normals 2^(e-15) * (1 + m/1024).
  if (r < 0x1p-14) return sign | static_cast<uint16_t>(r / 0x1p-24);
  const int e = std::ilogb(r);
  const double m = (r / std::ldexp(1.0, e) - 1.0) * 1024.0;
  return sign | static_cast<uint16_t>(((e + 15) << 10) | static_cast<int>(m));
}

// Decodes a 16-bit pattern arithmetically (the other direction's reference).
double decode_reference(uint16_t h, int mant_bits, int exp_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int e = (h >> mant_bits) & ((1 << exp_bits) - 1);
  const int m = h & ((1 << mant_bits) - 1);
  const double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == (1 << exp_bits) - 1)
    return m ? std::numeric_limits<double>::quiet_NaN() : s * std::numeric_limits<double>::infinity();
  if (e == 0) return s * std::ldexp(static_cast<double>(m), 1 - bias - mant_bits);
  return s * std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -mant_bits), e - bias);
}

// ---- exhaustive round trips ----------------------------------------------------------------

TEST(F16, EveryBitPatternRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float f = f16_bits_to_float(h);
    const double want = decode_reference(h, 10, 5);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << h;
      const uint16_t back = float_to_f16_bits(f);
      ASSERT_EQ(back & 0x7c00, 0x7c00) << std::hex << h;
      ASSERT_NE(back & 0x03ff, 0) << std::hex << h;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << "NaN sign of " << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), want) << std::hex << h;
    ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << std::hex << h;
    ASSERT_EQ(float_to_f16_bits(f), h) << std::hex << h;
  }
}

TEST(Bf16, EveryBitPatternRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t b = static_cast<uint16_t>(i);
    const float f = bf16_bits_to_float(b);
    const double want = decode_reference(b, 7, 8);
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << b;
      const uint16_t back = float_to_bf16_bits(f);
      ASSERT_EQ(back & 0x7f80, 0x7f80) << std::hex << b;
      ASSERT_NE(back & 0x007f, 0) << std::hex << b;
      ASSERT_EQ(back & 0x8000, b & 0x8000) << "NaN sign of " << std::hex << b;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), want) << std::hex << b;
    ASSERT_EQ(std::signbit(f), (b & 0x8000) != 0) << std::hex << b;
    ASSERT_EQ(float_to_bf16_bits(f), b) << std::hex << b;
  }
}

// ---- f16 rounding ----------------------------------------------------------------------------

TEST(F16, TiesGoToEven) {
  // Around 1: f16 spacing is 2^-10. 1 + 2^-11 is halfway between 1 (even, 0x3c00) and
  // 1 + 2^-10 (odd, 0x3c01): rounds down. 1 + 3 * 2^-11 is halfway between 0x3c01 and 0x3c02:
  // rounds up to the even one.
  EXPECT_EQ(float_to_f16_bits(1.0f + 0x1p-11f), 0x3c00);
  EXPECT_EQ(float_to_f16_bits(1.0f + 3 * 0x1p-11f), 0x3c02);
  EXPECT_EQ(float_to_f16_bits(-(1.0f + 0x1p-11f)), 0xbc00);
  EXPECT_EQ(float_to_f16_bits(-(1.0f + 3 * 0x1p-11f)), 0xbc02);
  // Just off the tie goes to the nearer neighbour.
  EXPECT_EQ(float_to_f16_bits(std::nextafter(1.0f + 0x1p-11f, 2.0f)), 0x3c01);
  EXPECT_EQ(float_to_f16_bits(std::nextafter(1.0f + 3 * 0x1p-11f, 0.0f)), 0x3c01);
  // A tie that carries into the exponent: 2 - 2^-11 is halfway between 0x3fff (odd) and 2.
  EXPECT_EQ(float_to_f16_bits(2.0f - 0x1p-11f), 0x4000);
  EXPECT_EQ(float_to_f16_bits(std::nextafter(2.0f - 0x1p-11f, 0.0f)), 0x3fff);
  // Large binade: spacing 32 in [32768, 65504]; 32784 is halfway between 32768 and 32800.
  EXPECT_EQ(float_to_f16_bits(32784.0f), 0x7800);
  EXPECT_EQ(float_to_f16_bits(32816.0f), 0x7802);
}

TEST(F16, OverflowRoundsToInfOnlyPastTheLastTie) {
  EXPECT_EQ(float_to_f16_bits(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16_bits(65519.99f), 0x7bff);
  EXPECT_EQ(float_to_f16_bits(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  // 65520 is halfway between 65504 (odd mantissa) and 65536 (= Inf after rounding): ties to
  // even means Inf.
  EXPECT_EQ(float_to_f16_bits(65520.0f), 0x7c00);
  EXPECT_EQ(float_to_f16_bits(-65520.0f), 0xfc00);
  EXPECT_EQ(float_to_f16_bits(-65519.99f), 0xfbff);
  EXPECT_EQ(float_to_f16_bits(1e6f), 0x7c00);
  EXPECT_EQ(float_to_f16_bits(FLT_MAX), 0x7c00);
  EXPECT_EQ(float_to_f16_bits(-FLT_MAX), 0xfc00);
}

TEST(F16, Subnormals) {
  EXPECT_EQ(float_to_f16_bits(0x1p-24f), 0x0001);  // smallest subnormal
  EXPECT_EQ(f16_bits_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(float_to_f16_bits(0x1p-25f), 0x0000);  // tie between 0 and 2^-24: even is 0
  EXPECT_EQ(float_to_f16_bits(-0x1p-25f), 0x8000);
  EXPECT_EQ(float_to_f16_bits(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(float_to_f16_bits(1.5f * 0x1p-25f), 0x0001);
  EXPECT_EQ(float_to_f16_bits(3.0f * 0x1p-25f), 0x0002);  // tie between 1 and 2 quanta: 2
  EXPECT_EQ(float_to_f16_bits(5.0f * 0x1p-25f), 0x0002);  // tie between 2 and 3 quanta: 2
  EXPECT_EQ(float_to_f16_bits(0x1p-30f), 0x0000);
  EXPECT_EQ(float_to_f16_bits(FLT_TRUE_MIN), 0x0000);
  EXPECT_EQ(float_to_f16_bits(-FLT_TRUE_MIN), 0x8000);
  // Largest subnormal 1023 * 2^-24, smallest normal 2^-14; the tie between them rounds up into
  // the normal range (1024 is even).
  EXPECT_EQ(float_to_f16_bits(1023.0f * 0x1p-24f), 0x03ff);
  EXPECT_EQ(float_to_f16_bits(1023.5f * 0x1p-24f), 0x0400);
  EXPECT_EQ(float_to_f16_bits(0x1p-14f), 0x0400);
  EXPECT_EQ(f16_bits_to_float(0x03ff), 1023.0f * 0x1p-24f);
}

TEST(F16, ZerosInfinitiesAndNaN) {
  EXPECT_EQ(float_to_f16_bits(0.0f), 0x0000);
  EXPECT_EQ(float_to_f16_bits(-0.0f), 0x8000);
  EXPECT_TRUE(std::signbit(f16_bits_to_float(0x8000)));
  EXPECT_EQ(f16_bits_to_float(0x8000), 0.0f);
  EXPECT_EQ(float_to_f16_bits(INFINITY), 0x7c00);
  EXPECT_EQ(float_to_f16_bits(-INFINITY), 0xfc00);
  EXPECT_EQ(f16_bits_to_float(0x7c00), INFINITY);
  EXPECT_EQ(f16_bits_to_float(0xfc00), -INFINITY);
  // A signalling fp32 NaN whose payload lives only in the low bits must not turn into Inf (a
  // plain truncation would drop the payload): it becomes a quiet NaN of the same sign.
  for (uint32_t nan : {0x7f800001u, 0x7fc00000u, 0x7fbfffffu, 0x7f802000u, 0xff800001u, 0xffc00000u}) {
    const uint16_t h = float_to_f16_bits(float_of(nan));
    EXPECT_EQ(h & 0x7c00, 0x7c00) << std::hex << nan;
    EXPECT_NE(h & 0x0200, 0) << "quiet bit for " << std::hex << nan;
    EXPECT_EQ((h & 0x8000) != 0, (nan & 0x80000000u) != 0) << std::hex << nan;
    EXPECT_TRUE(std::isnan(f16_bits_to_float(h)));
  }
}

// ---- bf16 rounding ---------------------------------------------------------------------------

TEST(Bf16, TiesGoToEven) {
  // bf16 keeps the top 16 bits of the fp32 pattern. 0x3f80'8000 is halfway between 0x3f80
  // (even) and 0x3f81: down. 0x3f81'8000 is halfway between 0x3f81 and 0x3f82 (even): up.
  EXPECT_EQ(float_to_bf16_bits(float_of(0x3f808000u)), 0x3f80);
  EXPECT_EQ(float_to_bf16_bits(float_of(0x3f818000u)), 0x3f82);
  EXPECT_EQ(float_to_bf16_bits(float_of(0xbf808000u)), 0xbf80);
  EXPECT_EQ(float_to_bf16_bits(float_of(0xbf818000u)), 0xbf82);
  EXPECT_EQ(float_to_bf16_bits(float_of(0x3f808001u)), 0x3f81);  // just above the tie
  EXPECT_EQ(float_to_bf16_bits(float_of(0x3f807fffu)), 0x3f80);  // just below
  EXPECT_EQ(float_to_bf16_bits(float_of(0x3f817fffu)), 0x3f81);
  // Carry into the exponent: 0x3fff'8000 = 2 - 2^-8 lies halfway between 0x3fff (odd) and 2.
  EXPECT_EQ(float_to_bf16_bits(float_of(0x3fff8000u)), 0x4000);
  EXPECT_EQ(float_to_bf16_bits(1.0f + 0x1p-8f), 0x3f80);
  EXPECT_EQ(float_to_bf16_bits(1.0f + 3 * 0x1p-8f), 0x3f82);
}

TEST(Bf16, OverflowFollowsIeee) {
  // Largest finite bf16 is 0x7f7f = (2 - 2^-7) * 2^127. IEEE rounds as if the exponent were
  // unbounded: the next value would be 2^128, the midpoint is (2 - 2^-8) * 2^127 (0x7f7f'8000),
  // and FLT_MAX = (2 - 2^-23) * 2^127 lies above it, so FLT_MAX rounds to +Inf.
  EXPECT_EQ(float_to_bf16_bits(FLT_MAX), 0x7f80);
  EXPECT_EQ(float_to_bf16_bits(-FLT_MAX), 0xff80);
  EXPECT_EQ(float_to_bf16_bits(float_of(0x7f7f8000u)), 0x7f80);  // tie, 0x7f7f is odd: up = Inf
  EXPECT_EQ(float_to_bf16_bits(float_of(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(float_to_bf16_bits(float_of(0x7f7f0000u)), 0x7f7f);
}

TEST(Bf16, SubnormalsZerosInfinitiesAndNaN) {
  // fp32 subnormals keep the fp32 exponent field (0), so bf16 has subnormals too, with quantum
  // 2^-133.
  EXPECT_EQ(float_to_bf16_bits(FLT_TRUE_MIN), 0x0000);              // 2^-149 << 2^-134
  EXPECT_EQ(float_to_bf16_bits(0x1p-133f), 0x0001);                 // smallest bf16 subnormal
  EXPECT_EQ(float_to_bf16_bits(0x1p-134f), 0x0000);                 // tie with 0: even
  EXPECT_EQ(float_to_bf16_bits(1.5f * 0x1p-134f), 0x0001);          // above the tie
  EXPECT_EQ(float_to_bf16_bits(3.0f * 0x1p-134f), 0x0002);          // tie between 1 and 2: 2
  EXPECT_EQ(float_to_bf16_bits(-3.0f * 0x1p-134f), 0x8002);
  EXPECT_EQ(float_to_bf16_bits(float_of(0x007fffffu)), 0x0080);    // rounds up to 2^-126 (normal)
  EXPECT_EQ(bf16_bits_to_float(0x0001), 0x1p-133f);
  EXPECT_EQ(float_to_bf16_bits(0.0f), 0x0000);
  EXPECT_EQ(float_to_bf16_bits(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16_bits(-FLT_TRUE_MIN), 0x8000);
  EXPECT_EQ(float_to_bf16_bits(INFINITY), 0x7f80);
  EXPECT_EQ(float_to_bf16_bits(-INFINITY), 0xff80);
  EXPECT_EQ(bf16_bits_to_float(0xff80), -INFINITY);
  // NaNs whose payload is only in the low 16 bits would truncate (or round) to Inf or
  // overflow into the sign; they must stay NaN, quiet, same sign.
  for (uint32_t nan : {0x7f800001u, 0x7fffffffu, 0x7f80ffffu, 0x7fc00000u, 0xff800001u, 0xffffffffu}) {
    const uint16_t b = float_to_bf16_bits(float_of(nan));
    EXPECT_EQ(b & 0x7f80, 0x7f80) << std::hex << nan;
    EXPECT_NE(b & 0x0040, 0) << "quiet bit for " << std::hex << nan;
    EXPECT_EQ((b & 0x8000) != 0, (nan & 0x80000000u) != 0) << std::hex << nan;
    EXPECT_TRUE(std::isnan(bf16_bits_to_float(b)));
  }
}

// ---- random bit patterns against independent references ---------------------------------

// Random fp32 bit patterns cover every binade uniformly; a second set concentrates on the f16
// range, where the interesting rounding happens.
std::vector<uint32_t> random_patterns() {
  std::mt19937 gen(20240531);
  std::vector<uint32_t> v(1'000'000);
  std::uniform_int_distribution<uint32_t> f16_range(0x33000000u, 0x47800000u);
  for (size_t i = 0; i < v.size(); ++i) v[i] = i % 2 ? gen() : (f16_range(gen) | (gen() & 0x80000000u));
  return v;
}

TEST(F16, MatchesArithmeticReferenceOnRandomPatterns) {
  for (uint32_t u : random_patterns()) {
    const float f = float_of(u);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(f16_bits_to_float(float_to_f16_bits(f)))) << std::hex << u;
      continue;
    }
    ASSERT_EQ(float_to_f16_bits(f), f16_reference(f)) << std::hex << u;
  }
}

#ifdef __FLT16_MAX__
// The compiler's _Float16 conversion is IEEE round-to-nearest-even (F16C's vcvtps2ph or
// libgcc's soft-float __truncsfhf2).
TEST(F16, MatchesCompilerFloat16OnRandomPatterns) {
  for (uint32_t u : random_patterns()) {
    const float f = float_of(u);
    const _Float16 h = static_cast<_Float16>(f);
    const uint16_t want = std::bit_cast<uint16_t>(h);
    if (std::isnan(f)) continue;
    ASSERT_EQ(float_to_f16_bits(f), want) << std::hex << u;
    ASSERT_EQ(f16_bits_to_float(want), static_cast<float>(h)) << std::hex << u;
  }
}
#endif

TEST(Bf16, MatchesArithmeticReferenceOnRandomPatterns) {
  for (uint32_t u : random_patterns()) {
    const float f = float_of(u);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(bf16_bits_to_float(float_to_bf16_bits(f)))) << std::hex << u;
      continue;
    }
    ASSERT_EQ(float_to_bf16_bits(f), bf16_reference(f)) << std::hex << u;
  }
}

// The references themselves must be right where we know the answer.
TEST(Half, ReferencesAgreeWithHandPickedValues) {
  EXPECT_EQ(f16_reference(65519.99f), 0x7bff);
  EXPECT_EQ(f16_reference(65520.0f), 0x7c00);
  EXPECT_EQ(f16_reference(0x1p-25f), 0x0000);
  EXPECT_EQ(f16_reference(1.5f * 0x1p-25f), 0x0001);
  EXPECT_EQ(f16_reference(-1.0f - 3 * 0x1p-11f), 0xbc02);
  EXPECT_EQ(bf16_reference(FLT_MAX), 0x7f80);
  EXPECT_EQ(bf16_reference(float_of(0x3f818000u)), 0x3f82);
  EXPECT_EQ(bf16_reference(3.0f * 0x1p-134f), 0x0002);
}

// ---- Tensor::to --------------------------------------------------------------------------

TEST(Half, TensorToAndBack) {
  const std::vector<float> values = {0.0f,     -0.0f,       1.0f,          1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f,
                                     65520.0f, 65519.99f,   -0x1p-24f,     1e-30f,          3.14159265f,
                                     INFINITY, -INFINITY,   NAN,           FLT_MAX,         -1234.5678f};
  const Tensor t = Tensor::from_floats({3, 5}, values);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    const Tensor h = t.to(dt);
    ASSERT_EQ(h.dtype(), dt);
    ASSERT_EQ(h.shape(), t.shape());
    const Tensor back = h.to(DType::kF32);
    ASSERT_EQ(back.dtype(), DType::kF32);
    const std::vector<float> got = back.to_floats();
    const std::vector<float> got_direct = h.to_floats();
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t bits = dt == DType::kBF16 ? h.data<bf16>()[i].bits : h.data<f16>()[i].bits;
      const uint16_t want = dt == DType::kBF16 ? float_to_bf16_bits(values[i]) : float_to_f16_bits(values[i]);
      EXPECT_EQ(bits, want) << dtype_name(dt) << " element " << i;
      const float want_f = dt == DType::kBF16 ? bf16_bits_to_float(want) : f16_bits_to_float(want);
      if (std::isnan(values[i])) {
        EXPECT_TRUE(std::isnan(got[i]));
        EXPECT_TRUE(std::isnan(got_direct[i]));
      } else {
        EXPECT_EQ(bits_of(got[i]), bits_of(want_f)) << dtype_name(dt) << " element " << i;
        EXPECT_EQ(bits_of(got_direct[i]), bits_of(want_f)) << dtype_name(dt) << " element " << i;
      }
    }
    // bf16 -> f16 -> bf16 goes through fp32 and rounds twice; f16 values all fit in bf16's
    // range but not its precision, so only check a value exact in both.
    const Tensor one = Tensor::from_floats({1}, std::vector<float>{0.75f}).to(dt);
    const DType other = dt == DType::kBF16 ? DType::kF16 : DType::kBF16;
    EXPECT_EQ(one.to(other).to(dt).to_floats()[0], 0.75f);
  }
  EXPECT_EQ(t.to(DType::kF16).to_floats()[5], INFINITY);     // 65520 -> Inf in f16
  EXPECT_EQ(t.to(DType::kBF16).to_floats()[5], 65536.0f);    // 65520 -> 2^16 in bf16
  EXPECT_EQ(t.to(DType::kBF16).to_floats()[13], INFINITY);   // FLT_MAX -> Inf in bf16
}

}  // namespace
}  // namespace moeforge
