// CPU SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g).
//
// Backward: d silu / dg = s + g s (1 - s) = s (1 + g (1 - s)) with s = sigmoid(g).
// sigmoid(g) = 1 / (1 + exp(-g)) is safe for every finite g: for g below about -88, exp(-g)
// overflows to inf and s becomes exactly 0, so silu and its derivative are 0, not NaN.
#include "runtime/cpu/dense.h"
#include "runtime/cpu/simd_exp.h"

namespace moeforge::cpu {
namespace {

inline float sigmoid(float g) { return 1.0f / (1.0f + simd_exp(-g)); }

}  // namespace

void swiglu_fwd(const Tensor& gate, const Tensor& up, const Tensor& out) {
  const float* pg = gate.data<float>();
  const float* pu = up.data<float>();
  float* po = out.data<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) po[i] = pg[i] * sigmoid(pg[i]) * pu[i];
}

void swiglu_bwd(const Tensor& gate, const Tensor& up, const Tensor& dout, const Tensor& dgate, const Tensor& dup) {
  const float* pg = gate.data<float>();
  const float* pu = up.data<float>();
  const float* pd = dout.data<float>();
  float* pdg = dgate.data<float>();
  float* pdu = dup.data<float>();
  const int64_t n = gate.numel();
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float g = pg[i];
    const float s = sigmoid(g);
    pdg[i] = pd[i] * pu[i] * s * (1.0f + g * (1.0f - s));
    pdu[i] = pd[i] * g * s;
  }
}

}  // namespace moeforge::cpu
