// Tests the CUDA elementwise ops (runtime/cuda/elementwise.cu) and GEMM (runtime/cuda/gemm.cpp)
// against the CPU ops on random inputs, outputs poisoned with NaN: fp32 to 1e-5, bf16 GEMM to 1e-2.
#include <gtest/gtest.h>

#include "runtime/cuda/kernels.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;
using testing::random_tensor;

TEST(GpuElementwise, FillCopyAddScaleMatchTheCpu) {
  MOE_REQUIRE_GPU();
  for (int64_t n : {1, 7, 1000, 1 << 20}) {
    const Tensor a = random_tensor({n}, 10 + n), b = random_tensor({n}, 20 + n);
    const Tensor ga = to_gpu(a), gb = to_gpu(b);

    Tensor out = Tensor::empty({n}, DType::kF32);
    ops::add(a, b, out);
    Tensor gout = poisoned({n});
    ops::add(ga, gb, gout);
    EXPECT_GPU_CLOSE(gout, out, kF32Tol);

    ops::add_(out, b, -0.75f);
    ops::add_(gout, gb, -0.75f);
    EXPECT_GPU_CLOSE(gout, out, kF32Tol);

    ops::scale_(out, 3.0f);
    ops::scale_(gout, 3.0f);
    EXPECT_GPU_CLOSE(gout, out, kF32Tol);

    Tensor gcopy = poisoned({n});
    ops::copy(gout, gcopy);
    EXPECT_GPU_CLOSE(gcopy, out, 0.0);

    ops::fill(gcopy, -2.5f);
    ops::fill(out, -2.5f);
    EXPECT_GPU_CLOSE(gcopy, out, 0.0);
  }
  const Tensor gi = poisoned({33}, DType::kI64);
  ops::fill(gi, 42.0f);
  for (float v : to_cpu(gi).to_floats()) EXPECT_EQ(v, 42.0f);
}

TEST(GpuGemm, AllTransposeCombinationsMatchTheCpu) {
  MOE_REQUIRE_GPU();
  struct Case {
    int64_t m, n, k;
  };
  for (const Case c : {Case{1, 1, 1}, Case{17, 33, 65}, Case{128, 96, 256}, Case{3, 300, 7}}) {
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (bool acc : {false, true}) {
          const Tensor a = random_tensor(ta ? Shape{c.k, c.m} : Shape{c.m, c.k}, 1 + c.m);
          const Tensor b = random_tensor(tb ? Shape{c.n, c.k} : Shape{c.k, c.n}, 2 + c.n);
          const Tensor c0 = random_tensor({c.m, c.n}, 3 + c.k);
          Tensor want = c0.clone();
          ops::gemm(a, ta, b, tb, want, acc, 0.5f);
          const Tensor got = to_gpu(c0);
          if (!acc) ops::fill(got, std::numeric_limits<float>::quiet_NaN());
          ops::gemm(to_gpu(a), ta, to_gpu(b), tb, got, acc, 0.5f);
          EXPECT_GPU_CLOSE(got, want, kF32Tol) << " m=" << c.m << " n=" << c.n << " k=" << c.k << " ta=" << ta
                                               << " tb=" << tb << " acc=" << acc;
        }
  }
}

TEST(GpuGemm, Bf16ProductsAccumulateInFp32) {
  MOE_REQUIRE_GPU();
  const int64_t m = 64, n = 80, k = 1024;
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      const Tensor a = random_tensor(ta ? Shape{k, m} : Shape{m, k}, 5);
      const Tensor b = random_tensor(tb ? Shape{n, k} : Shape{k, n}, 6);
      // The reference multiplies the bf16-rounded inputs in fp32.
      const Tensor a16 = a.to(DType::kBF16), b16 = b.to(DType::kBF16);
      Tensor want = Tensor::empty({m, n}, DType::kF32);
      ops::gemm(a16.to(DType::kF32), ta, b16.to(DType::kF32), tb, want);
      for (DType out_dtype : {DType::kF32, DType::kBF16}) {
        const Tensor got = poisoned({m, n}, out_dtype);
        cuda::gemm(to_gpu(a16), ta, to_gpu(b16), tb, got, false, 1.0f);
        EXPECT_GPU_CLOSE(got, want, kBF16Tol) << " ta=" << ta << " tb=" << tb << " c " << dtype_name(out_dtype);
      }
    }
}

TEST(GpuGemm, EmptyInnerDimensionZeroesOrKeepsC) {
  MOE_REQUIRE_GPU();
  const Tensor a = Tensor::empty({4, 0}, DType::kF32, gpu());
  const Tensor b = Tensor::empty({0, 3}, DType::kF32, gpu());
  const Tensor c = poisoned({4, 3});
  ops::gemm(a, false, b, false, c);
  for (float v : to_cpu(c).to_floats()) EXPECT_EQ(v, 0.0f);
}

}  // namespace
}  // namespace moeforge
