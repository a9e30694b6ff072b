// Helpers of the gpu-labelled tests: skipping without a device, moving tensors, poisoned outputs
// and the CUDA-vs-CPU comparison every test uses.
//
// The pattern (ggml's backend tests, llm.c's dev/cuda): build random inputs on the CPU, run the op
// on the CPU (the reference) and on the GPU with outputs pre-filled with NaN (so an element the
// kernel forgets to write fails the comparison), copy back, and compare normwise:
//   ||gpu - cpu|| / ||cpu|| <= 1e-5 for fp32, 1e-2 for bf16.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "runtime/cuda/device_alloc.h"
#include "runtime/ops.h"
#include "runtime/tensor.h"
#include "tests/testing.h"

namespace moeforge::gpu_testing {

constexpr double kF32Tol = 1e-5;
constexpr double kBF16Tol = 1e-2;

inline bool has_gpu() { return cuda::device_count() > 0; }

inline Device gpu() { return Device::cuda(0); }

// Every test starts with this: a clear, visible skip on machines without a GPU.
#define MOE_REQUIRE_GPU()                                                                                  \
  do {                                                                                                     \
    if (!::moeforge::gpu_testing::has_gpu())                                                               \
      GTEST_SKIP() << "no CUDA device visible: this gpu-labelled test compares the CUDA kernels with the " \
                      "CPU ones and runs only where a GPU is present (scripts/gpu-check.sh)";              \
  } while (0)

inline Tensor to_gpu(const Tensor& t) { return t.to_device(gpu()); }
inline Tensor to_cpu(const Tensor& t) { return t.to_device(Device::cpu()); }

// A device tensor whose every element is garbage: NaN for floats, a large negative for integers.
inline Tensor poisoned(const Shape& shape, DType dtype = DType::kF32) {
  Tensor t = Tensor::empty(shape, dtype, gpu());
  const bool is_float = dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
  ops::fill(t, is_float ? std::numeric_limits<float>::quiet_NaN() : -777.0f);
  return t;
}

// ||got - want|| / max(||want||, tiny) over the elements, in double; NaN anywhere gives +inf.
inline double rel_err(const Tensor& got_any_device, const Tensor& want_cpu) {
  const std::vector<float> got = to_cpu(got_any_device).to_floats();
  const std::vector<float> want = want_cpu.to_floats();
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i]) != std::isnan(want[i])) return std::numeric_limits<double>::infinity();
    if (std::isnan(want[i])) continue;
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// The normwise relative error of got (any device) against want (CPU) is at most tol; more
// context can be streamed in with <<.
#define EXPECT_GPU_CLOSE(got, want, tol) \
  EXPECT_LE(::moeforge::gpu_testing::rel_err((got), (want)), (tol)) << #got " vs " #want ": normwise relative error"

// Integer results must match exactly.
inline void expect_equal_ints(const Tensor& got_gpu, const Tensor& want_cpu, const char* what) {
  const Tensor got = to_cpu(got_gpu);
  ASSERT_EQ(got.numel(), want_cpu.numel()) << what;
  ASSERT_EQ(got.dtype(), want_cpu.dtype()) << what;
  const size_t bytes = want_cpu.nbytes();
  EXPECT_EQ(0, std::memcmp(got.raw_data(), want_cpu.raw_data(), bytes)) << what << " differs from the CPU result";
}

// A routing plan of n tokens, top-k of e experts (random, seeded), with every 11th copy dropped
// (expert -1): the CPU plan (positions (n, k), offsets (e + 1)) and its row count m.
struct DroppingPlan {
  Tensor positions, offsets;
  int64_t m = 0;
};
inline DroppingPlan dropping_plan(int64_t n, int64_t k, int e, uint64_t seed) {
  Tensor experts = testing::random_ints({n, k}, seed, 0, e);
  for (int64_t i = 0; i < n * k; i += 11) experts.data<int32_t>()[i] = -1;
  DroppingPlan p{Tensor::empty({n, k}, DType::kI32), Tensor::empty({e + 1}, DType::kI64), 0};
  ops::moe_plan(experts, e, p.positions, p.offsets);
  p.m = p.offsets.data<int64_t>()[e];
  return p;
}

// Random values already on the bf16 grid, as f32 on the CPU (the reference's inputs), and their
// bf16 copy on the GPU: both sides start from the same numbers.
inline Tensor bf16_grid(const Shape& s, uint64_t seed) {
  return testing::random_tensor(s, seed).to(DType::kBF16).to(DType::kF32);
}
inline Tensor gpu_bf16(const Tensor& f32) { return to_gpu(f32.to(DType::kBF16)); }

// An attention problem of the gpu tests: q (b, t, h, d), k and v (b, t, hkv, d).
struct AttentionCase {
  int64_t b, t, h, hkv, d;
};
// Its bf16-grid inputs (seeds seed..seed+3) and the CPU op's forward and backward on them in f32:
// the reference every GPU attention path is compared with.
struct AttentionReference {
  Shape qs, ks, ls;  // q-like, k-like and lse shapes
  float scale = 0.0f;
  Tensor q, k, v, dout, out, lse, dq, dk, dv;
};
inline AttentionReference cpu_attention(const AttentionCase& c, uint64_t seed) {
  AttentionReference r;
  r.qs = Shape{c.b, c.t, c.h, c.d};
  r.ks = Shape{c.b, c.t, c.hkv, c.d};
  r.ls = Shape{c.b, c.h, c.t};
  r.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  r.q = bf16_grid(r.qs, seed);
  r.k = bf16_grid(r.ks, seed + 1);
  r.v = bf16_grid(r.ks, seed + 2);
  r.dout = bf16_grid(r.qs, seed + 3);
  r.out = Tensor::empty(r.qs, DType::kF32);
  r.lse = Tensor::empty(r.ls, DType::kF32);
  ops::attention_fwd(r.q, r.k, r.v, r.scale, r.out, r.lse);
  r.dq = Tensor::empty(r.qs, DType::kF32);
  r.dk = Tensor::empty(r.ks, DType::kF32);
  r.dv = Tensor::empty(r.ks, DType::kF32);
  ops::attention_bwd(r.q, r.k, r.v, r.out, r.lse, r.dout, r.scale, r.dq, r.dk, r.dv);
  return r;
}

// Sets MOEFORGE_ATTENTION_KERNEL for the scope (unset for nullptr), restoring the previous value.
class KernelChoice {
 public:
  explicit KernelChoice(const char* kernel) {
    if (const char* old = std::getenv(kName)) old_ = old;
    if (kernel != nullptr)
      setenv(kName, kernel, 1);
    else
      unsetenv(kName);
  }
  ~KernelChoice() {
    if (old_)
      setenv(kName, old_->c_str(), 1);
    else
      unsetenv(kName);
  }
  KernelChoice(const KernelChoice&) = delete;
  KernelChoice& operator=(const KernelChoice&) = delete;

 private:
  static constexpr const char* kName = "MOEFORGE_ATTENTION_KERNEL";
  std::optional<std::string> old_;
};

}  // namespace moeforge::gpu_testing
