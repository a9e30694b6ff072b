// Tests cuDNN's fused attention (runtime/cuda/cudnn_attention.cpp), selected with
// MOEFORGE_ATTENTION_KERNEL=cudnn: forward and backward through the op catalog against the CPU op
// on the same bf16-rounded inputs (T = 77 and 200, not multiples of any tile; GQA ratios 1, 4 and
// 8; head dims 64 and 128) and against our mma.sync kernels on the same inputs; the sliding
// window against the mma.sync kernels; the selection through the process-wide setting
// (train.attention_kernel) and the environment's precedence over it; plan reuse; and the errors
// of what it does not take. Outputs poisoned with NaN; bf16 outputs to 1e-2 normwise, lse to
// 1e-4. Skips, saying why, without a device or in a build without cuDNN (there, with a device,
// it checks that selecting cuDNN is an error). Without a device, cuDNN still checks the graphs:
// every descriptor and the operation graph finalize (what needs the GPU is the engine).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "runtime/cuda/attention_kernel.h"
#if MOEFORGE_WITH_CUDNN
#include "runtime/cuda/cudnn_attention.h"
#endif
#include "runtime/cuda/kernels.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

// The process-wide setting for the scope, back to automatic after.
class Setting {
 public:
  explicit Setting(cuda::AttentionKernelChoice c) { cuda::set_attention_kernel(std::move(c)); }
  ~Setting() { cuda::set_attention_kernel({}); }
  Setting(const Setting&) = delete;
  Setting& operator=(const Setting&) = delete;
};

size_t cached_plans() {
#if MOEFORGE_WITH_CUDNN
  return cuda::cudnn_attention::cached_plans();
#else
  return 0;
#endif
}

#define MOE_REQUIRE_CUDNN()                                                                                       \
  do {                                                                                                            \
    MOE_REQUIRE_GPU();                                                                                            \
    if (!cuda::cudnn_attention_built())                                                                           \
      GTEST_SKIP() << "this moeforge was built without cuDNN (CMake found no cuDNN 9 in the CUDA toolkit): the "  \
                      "cuDNN attention is not there to test";                                                     \
  } while (0)

using Case = AttentionCase;

// Runs without a GPU: cuDNN accepts every tensor and operation descriptor of the forward and
// backward graphs (dims, strides, dtypes, modes) and finalizes their operation graphs, for the
// shapes the tests below run.
TEST(GpuCudnnAttention, CudnnFinalizesTheGraphsWithoutADevice) {
#if MOEFORGE_WITH_CUDNN
  for (const Case c : {Case{2, 77, 4, 4, 64}, Case{1, 200, 8, 2, 128}, Case{2, 200, 16, 2, 64}, Case{1, 1, 8, 1, 64}})
    for (const int64_t window : {int64_t{0}, int64_t{17}})
      for (const bool backward : {false, true}) {
        if (backward && c.t == 1) continue;  // refused before cuDNN (WhatItDoesNotTakeIsAnError)
        const cuda::flash::Problem p{c.b, c.t, c.h, c.hkv, c.d, window, false, c.b * c.t};
        EXPECT_EQ(testing::error_of([&] { cuda::cudnn_attention::validate_graph(p, backward); }), "<no error>")
            << (backward ? "backward" : "forward") << " T=" << c.t << " H=" << c.h << " Hkv=" << c.hkv
            << " D=" << c.d << " window=" << window;
      }
#else
  GTEST_SKIP() << "this moeforge was built without cuDNN (CMake found no cuDNN 9 in the CUDA toolkit)";
#endif
}

struct Result {
  Tensor out, lse, dq, dk, dv;  // device tensors
};

// Forward and backward through the op catalog with the kernel chosen now.
Result run_catalog(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, float scale) {
  const Shape qs = q.shape(), ks = k.shape(), ls{q.dim(0), q.dim(2), q.dim(1)};
  Result r{poisoned(qs, DType::kBF16), poisoned(ls), poisoned(qs, DType::kBF16), poisoned(ks, DType::kBF16),
           poisoned(ks, DType::kBF16)};
  ops::attention_fwd(q, k, v, scale, r.out, r.lse);
  ops::attention_bwd(q, k, v, r.out, r.lse, dout, scale, r.dq, r.dk, r.dv);
  return r;
}

TEST(GpuCudnnAttention, CatalogOpsMatchTheCpuAndTheMmaKernels) {
  MOE_REQUIRE_CUDNN();
  for (const Case c : {Case{2, 77, 4, 4, 64}, Case{1, 200, 8, 2, 128}, Case{2, 77, 8, 1, 64}, Case{1, 200, 4, 1, 128},
                       Case{1, 77, 8, 8, 128}, Case{2, 200, 16, 2, 64}}) {
    const AttentionReference ref = cpu_attention(c, 1);
    const float scale = ref.scale;
    const Tensor &q = ref.q, &k = ref.k, &v = ref.v, &dout = ref.dout;
    const Tensor &out = ref.out, &lse = ref.lse, &dq = ref.dq, &dk = ref.dk, &dv = ref.dv;

    const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v), gdout = gpu_bf16(dout);
    Result cudnn, mma;
    {
      KernelChoice choice("cudnn");
      cudnn = run_catalog(gq, gk, gv, gdout, scale);
    }
    {
      KernelChoice choice("mma");
      mma = run_catalog(gq, gk, gv, gdout, scale);
    }
    const std::string at =
        " T=" + std::to_string(c.t) + " H=" + std::to_string(c.h) + " Hkv=" + std::to_string(c.hkv) + " D=" +
        std::to_string(c.d);
    EXPECT_GPU_CLOSE(cudnn.out, out, kBF16Tol) << at;
    EXPECT_GPU_CLOSE(cudnn.lse, lse, 1e-4) << at;
    EXPECT_GPU_CLOSE(cudnn.dq, dq, kBF16Tol) << at;
    EXPECT_GPU_CLOSE(cudnn.dk, dk, kBF16Tol) << at;
    EXPECT_GPU_CLOSE(cudnn.dv, dv, kBF16Tol) << at;
    // Against our kernels on the same bf16 inputs (both within bf16 rounding of the exact result).
    EXPECT_GPU_CLOSE(cudnn.out, to_cpu(mma.out), kBF16Tol) << at;
    EXPECT_GPU_CLOSE(cudnn.lse, to_cpu(mma.lse), 1e-4) << at;
    EXPECT_GPU_CLOSE(cudnn.dq, to_cpu(mma.dq), kBF16Tol) << at;
    EXPECT_GPU_CLOSE(cudnn.dk, to_cpu(mma.dk), kBF16Tol) << at;
    EXPECT_GPU_CLOSE(cudnn.dv, to_cpu(mma.dv), kBF16Tol) << at;
  }
}

// The lse is the same quantity in both: each backward runs on the other's forward.
TEST(GpuCudnnAttention, EitherBackwardReadsEitherForwardsLse) {
  MOE_REQUIRE_CUDNN();
  const Shape qs{2, 77, 8, 64}, ks{2, 77, 2, 64}, ls{2, 8, 77};
  const Tensor q = bf16_grid(qs, 11), k = bf16_grid(ks, 12), v = bf16_grid(ks, 13), dout = bf16_grid(qs, 14);
  Tensor out = Tensor::empty(qs, DType::kF32), lse = Tensor::empty(ls, DType::kF32);
  ops::attention_fwd(q, k, v, 0.125f, out, lse);
  Tensor dq = Tensor::empty(qs, DType::kF32), dk = Tensor::empty(ks, DType::kF32), dv = Tensor::empty(ks, DType::kF32);
  ops::attention_bwd(q, k, v, out, lse, dout, 0.125f, dq, dk, dv);
  const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v), gdout = gpu_bf16(dout);
  for (const auto& [forward, backward] : {std::pair{"cudnn", "mma"}, std::pair{"mma", "cudnn"}}) {
    const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
    {
      KernelChoice choice(forward);
      ops::attention_fwd(gq, gk, gv, 0.125f, gout, glse);
    }
    const Tensor gdq = poisoned(qs, DType::kBF16), gdk = poisoned(ks, DType::kBF16), gdv = poisoned(ks, DType::kBF16);
    {
      KernelChoice choice(backward);
      ops::attention_bwd(gq, gk, gv, gout, glse, gdout, 0.125f, gdq, gdk, gdv);
    }
    EXPECT_GPU_CLOSE(gdq, dq, kBF16Tol) << forward << " forward, " << backward << " backward";
    EXPECT_GPU_CLOSE(gdk, dk, kBF16Tol) << forward << " forward, " << backward << " backward";
    EXPECT_GPU_CLOSE(gdv, dv, kBF16Tol) << forward << " forward, " << backward << " backward";
  }
}

// The backward's fp32 dq accumulator comes from the caching allocator, which hands back used
// memory: a second backward on a block that held the first one's sums (and one after a block of
// NaN) must give the same gradients, so the accumulator is zeroed before every run.
TEST(GpuCudnnAttention, RepeatedBackwardsGiveTheSameGradients) {
  MOE_REQUIRE_CUDNN();
  const Shape qs{2, 130, 8, 64}, ks{2, 130, 2, 64}, ls{2, 8, 130};
  const Tensor gq = gpu_bf16(bf16_grid(qs, 31)), gk = gpu_bf16(bf16_grid(ks, 32)), gv = gpu_bf16(bf16_grid(ks, 33));
  const Tensor gdout = gpu_bf16(bf16_grid(qs, 34));
  KernelChoice choice("cudnn");
  const Tensor out = poisoned(qs, DType::kBF16), lse = poisoned(ls);
  ops::attention_fwd(gq, gk, gv, 0.125f, out, lse);
  std::vector<Tensor> dqs;
  for (int run = 0; run < 3; ++run) {
    if (run == 2) poisoned({2 * 8 * 130 * 64 * 2}, DType::kF32);  // NaN into a freed block of that size class
    const Tensor dq = poisoned(qs, DType::kBF16), dk = poisoned(ks, DType::kBF16), dv = poisoned(ks, DType::kBF16);
    ops::attention_bwd(gq, gk, gv, out, lse, gdout, 0.125f, dq, dk, dv);
    dqs.push_back(to_cpu(dq).to(DType::kF32));
  }
  for (int run = 1; run < 3; ++run) EXPECT_LE(rel_err(dqs[run], dqs[0]), 1e-3) << "backward " << run + 1;
}

TEST(GpuCudnnAttention, SlidingWindowMatchesTheMmaKernels) {
  MOE_REQUIRE_CUDNN();
  for (const int64_t d : {64, 128})
    for (const int64_t w : {1, 17, 64, 300}) {
      const Shape qs{2, 200, 8, d}, ks{2, 200, 2, d}, ls{2, 8, 200};
      const Tensor gq = gpu_bf16(bf16_grid(qs, 21)), gk = gpu_bf16(bf16_grid(ks, 22)), gv = gpu_bf16(bf16_grid(ks, 23));
      const Tensor gdout = gpu_bf16(bf16_grid(qs, 24));
      const cuda::FlashOptions opt{w, Tensor(), 0};
      const float scale = 1.0f / std::sqrt(static_cast<float>(d));
      std::vector<Tensor> outs;
      for (const char* kernel : {"mma", "cudnn"}) {
        KernelChoice choice(kernel);
        const Tensor out = poisoned(qs, DType::kBF16), lse = poisoned(ls);
        cuda::flash_attention_fwd(gq, gk, gv, scale, out, lse, opt);
        const Tensor dq = poisoned(qs, DType::kBF16), dk = poisoned(ks, DType::kBF16), dv = poisoned(ks, DType::kBF16);
        cuda::flash_attention_bwd(gq, gk, gv, out, lse, gdout, scale, dq, dk, dv, opt);
        for (const Tensor& t : {out, lse, dq, dk, dv}) outs.push_back(to_cpu(t));
      }
      const char* names[] = {"out", "lse", "dq", "dk", "dv"};
      for (size_t i = 0; i < 5; ++i)
        EXPECT_LE(rel_err(outs[5 + i], outs[i]), i == 1 ? 1e-4 : kBF16Tol)
            << names[i] << " D=" << d << " window=" << w << ": cuDNN vs mma.sync";
    }
}

// train.attention_kernel reaches the op through the process-wide setting; the environment
// overrides it. A new shape shows which ran: only cuDNN builds a plan.
TEST(GpuCudnnAttention, TheSettingSelectsCudnnAndTheEnvironmentOverridesIt) {
  MOE_REQUIRE_CUDNN();
  KernelChoice unset(nullptr);
  const Shape qs{1, 93, 4, 64}, ks{1, 93, 2, 64}, ls{1, 4, 93};
  const Tensor q = bf16_grid(qs, 31), k = bf16_grid(ks, 32), v = bf16_grid(ks, 33);
  Tensor out = Tensor::empty(qs, DType::kF32), lse = Tensor::empty(ls, DType::kF32);
  ops::attention_fwd(q, k, v, 0.125f, out, lse);
  const Tensor gq = gpu_bf16(q), gk = gpu_bf16(k), gv = gpu_bf16(v);
  Setting setting({cuda::AttentionKernel::kCudnn, "train.attention_kernel: CUDNN"});
  {
    KernelChoice env("mma");
    const size_t before = cached_plans();
    const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
    ops::attention_fwd(gq, gk, gv, 0.125f, gout, glse);
    EXPECT_EQ(cached_plans(), before) << "MOEFORGE_ATTENTION_KERNEL=mma overrides the setting: no cuDNN plan";
    EXPECT_GPU_CLOSE(gout, out, kBF16Tol);
  }
  const size_t before = cached_plans();
  const Tensor gout = poisoned(qs, DType::kBF16), glse = poisoned(ls);
  ops::attention_fwd(gq, gk, gv, 0.125f, gout, glse);
  EXPECT_EQ(cached_plans(), before + 1) << "the setting chose cuDNN: one plan for the new shape";
  EXPECT_GPU_CLOSE(gout, out, kBF16Tol);
  EXPECT_GPU_CLOSE(glse, lse, 1e-4);
  // The same sizes again (another scale): the plan is reused.
  ops::attention_fwd(gq, gk, gv, 0.25f, gout, glse);
  EXPECT_EQ(cached_plans(), before + 1) << "a second call with the same sizes builds no plan";
  Tensor out2 = Tensor::empty(qs, DType::kF32), lse2 = Tensor::empty(ls, DType::kF32);
  ops::attention_fwd(q, k, v, 0.25f, out2, lse2);
  EXPECT_GPU_CLOSE(gout, out2, kBF16Tol) << "the scale is an input of each execution";
  EXPECT_GPU_CLOSE(glse, lse2, 1e-4);
}

TEST(GpuCudnnAttention, WhatItDoesNotTakeIsAnError) {
  MOE_REQUIRE_GPU();
  const Tensor q = gpu_bf16(bf16_grid({1, 8, 2, 64}, 41)), lse = poisoned({1, 2, 8});
  const Tensor out = poisoned({1, 8, 2, 64}, DType::kBF16);
  if (!cuda::cudnn_attention_built()) {
    KernelChoice env("cudnn");
    EXPECT_EQ(testing::error_of([&] { cuda::flash_attention_fwd(q, q, q, 1.0f, out, lse); }),
              "flash_attention_fwd (MOEFORGE_ATTENTION_KERNEL=cudnn): cuDNN's fused attention was not built "
              "(configure found no cuDNN 9 in the CUDA toolkit)");
    return;  // no skip: gpu-check counts skips
  }
  {
    KernelChoice env("cudnn");
    const std::vector<int32_t> cu{0, 3, 8};
    const cuda::FlashOptions packed{0, to_gpu(Tensor::from_ints({3}, cu)), 5};
    const Tensor pq = gpu_bf16(bf16_grid({8, 2, 64}, 42)), plse = poisoned({2, 8});
    const Tensor pout = poisoned({8, 2, 64}, DType::kBF16);
    EXPECT_EQ(testing::error_of([&] { cuda::flash_attention_fwd(pq, pq, pq, 1.0f, pout, plse, packed); }),
              "flash_attention_fwd (MOEFORGE_ATTENTION_KERNEL=cudnn): cuDNN's fused attention cannot run this "
              "problem: packed variable-length sequences (cu_seqlens) are not implemented on the cuDNN path (dense "
              "(B, T, H, D) only)");
  }
  {
    KernelChoice unset(nullptr);
    Setting setting({cuda::AttentionKernel::kCudnn, "train.attention_kernel: CUDNN"});
    const Tensor q1 = gpu_bf16(bf16_grid({1, 1, 2, 64}, 43)), lse1 = poisoned({1, 2, 1});
    const Tensor o1 = poisoned({1, 1, 2, 64}, DType::kBF16), d1 = poisoned({1, 1, 2, 64}, DType::kBF16);
    EXPECT_EQ(testing::error_of([&] { cuda::flash_attention_bwd(q1, q1, q1, o1, lse1, o1, 1.0f, d1, d1, d1); }),
              "flash_attention_bwd (train.attention_kernel: CUDNN): cuDNN's fused attention cannot run this problem: "
              "cuDNN's fused attention backward does not take sequence length 1 (s_q = s_kv = 1)");
  }
}

}  // namespace
}  // namespace moeforge
