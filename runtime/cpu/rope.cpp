// CPU rotary position embedding, Hugging Face non-interleaved convention ("rotate_half"): within
// each head, element i < D/2 pairs with i + D/2 and the pair rotates by t * theta^(-2i/D).
//
// The (T, D/2) cos/sin table is built once per call, its angles in double: t * inv_freq reaches
// 1e4..1e5 radians for long sequences, where an f32 angle already carries an error of ~1e-3.
//
// Each pair is read completely before it is written, so out may alias x (and dx may alias dout).
// The backward is the transpose of the rotation, i.e. the rotation by the negated angle.
#include <cmath>
#include <vector>

#include "runtime/cpu/dense.h"

namespace moeforge::cpu {
namespace {

// sign = +1 rotates forward, -1 applies the inverse rotation.
void rope_rotate(const Tensor& x, float theta, float sign, const Tensor& out) {
  const int64_t b = x.dim(0), t = x.dim(1), h = x.dim(2), d = x.dim(3);
  const int64_t half = d / 2;
  std::vector<float> cos_t(static_cast<size_t>(t * half));  // (T, D/2)
  std::vector<float> sin_t(static_cast<size_t>(t * half));  // (T, D/2), sign folded in
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[i] = std::pow(static_cast<double>(theta), -2.0 * static_cast<double>(i) / static_cast<double>(d));
  }
#pragma omp parallel for schedule(static) if (t * half > (1 << 14))
  for (int64_t pos = 0; pos < t; ++pos) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos) * inv_freq[i];
      cos_t[pos * half + i] = static_cast<float>(std::cos(angle));
      sin_t[pos * half + i] = sign * static_cast<float>(std::sin(angle));
    }
  }

  const float* px = x.data<float>();
  float* po = out.data<float>();
  const int64_t rows = b * t;  // one row = the H heads of one (batch, position)
#pragma omp parallel for schedule(static) if (rows * h * d > (1 << 15))
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos_t.data() + (r % t) * half;
    const float* s = sin_t.data() + (r % t) * half;
    for (int64_t head = 0; head < h; ++head) {
      const float* xi = px + (r * h + head) * d;
      float* oi = po + (r * h + head) * d;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = xi[i];
        const float x2 = xi[i + half];
        oi[i] = x1 * c[i] - x2 * s[i];
        oi[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

}  // namespace

void rope_fwd(const Tensor& x, float theta, const Tensor& out) { rope_rotate(x, theta, 1.0f, out); }

void rope_bwd(const Tensor& dout, float theta, const Tensor& dx) { rope_rotate(dout, theta, -1.0f, dx); }

}  // namespace moeforge::cpu
