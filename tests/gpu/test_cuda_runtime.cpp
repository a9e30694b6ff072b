// Tests runtime/cuda/device_alloc.cpp, device.cpp, the casts of elementwise.cu and
// Tensor::to_device on a real device: round trips, the caching allocator's reuse (no cudaMalloc
// in a repeated step), events ordering a second stream after the compute stream, and f32 <-> bf16
// casts bit-exact against the CPU's round-to-nearest-even.
#include <gtest/gtest.h>

#include "runtime/cuda/device.h"
#include "runtime/cuda/device_alloc.h"
#include "runtime/cuda/kernels.h"
#include "tests/gpu/gpu_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using namespace gpu_testing;

TEST(GpuRuntime, ToDeviceRoundTripKeepsEveryDtype) {
  MOE_REQUIRE_GPU();
  const Tensor f = testing::random_tensor({37, 5}, 1);
  EXPECT_EQ(to_cpu(to_gpu(f)).to_floats(), f.to_floats());
  const Tensor i = testing::random_ints({1001}, 2, -5, 1 << 20);
  expect_equal_ints(to_gpu(i), i, "i32 round trip");
  const Tensor view = to_gpu(f).rows(3, 9);  // an offset pointer on the device
  EXPECT_EQ(to_cpu(view).to_floats(), f.rows(3, 9).to_floats());
}

TEST(GpuRuntime, CachingAllocatorReusesFreedBlocks) {
  MOE_REQUIRE_GPU();
  const auto step = [] {
    for (int64_t n : {1, 100, 4096, 1 << 20, 3 << 20}) {
      const Tensor t = Tensor::empty({n}, DType::kF32, gpu());
      ops::fill(t, 1.0f);
    }
  };
  step();  // warm-up: the blocks enter the cache
  const cuda::AllocatorStats before = cuda::allocator_stats(0);
  for (int i = 0; i < 10; ++i) step();
  const cuda::AllocatorStats after = cuda::allocator_stats(0);
  EXPECT_EQ(after.cuda_mallocs, before.cuda_mallocs) << "a repeated step must not call cudaMalloc";
  EXPECT_EQ(after.bytes_in_use, before.bytes_in_use);
  cuda::release_cached(0);
  EXPECT_EQ(cuda::allocator_stats(0).bytes_cached, 0);
}

TEST(GpuRuntime, EventsOrderASecondStreamAfterTheComputeStream) {
  MOE_REQUIRE_GPU();
  // fill on the compute stream, then copy on a side stream that waits on an event: the copy must
  // see the fill although the host never synchronised in between.
  const Tensor a = Tensor::empty({1 << 22}, DType::kF32, gpu());
  const Tensor b = poisoned({1 << 22});
  ops::fill(a, 3.5f);
  cuda::Stream side(0);
  cuda::Event ready;
  ready.record(cuda::stream(0));
  ready.wait(side.get());
  ASSERT_EQ(cudaMemcpyAsync(b.raw_data(), a.raw_data(), a.nbytes(), cudaMemcpyDeviceToDevice, side.get()),
            cudaSuccess);
  cuda::Event done;
  done.record(side.get());
  done.wait(cuda::stream(0));
  const std::vector<float> host = to_cpu(b).to_floats();
  for (size_t i = 0; i < host.size(); i += 4099) ASSERT_EQ(host[i], 3.5f) << i;
  EXPECT_TRUE(done.done());
}

TEST(GpuRuntime, CastsMatchTheCpuRoundingBitForBit) {
  MOE_REQUIRE_GPU();
  Tensor x = testing::random_tensor({4097}, 3, 100.0f);
  // Ties, tiny and huge values, infinities and NaN.
  float* p = x.data<float>();
  p[0] = 1.00390625f;  // exactly halfway between two bf16 values
  p[1] = 1e-40f;
  p[2] = 3e38f;
  p[3] = -std::numeric_limits<float>::infinity();
  p[4] = 70000.0f;  // beyond f16: rounds to inf
  for (DType to : {DType::kBF16, DType::kF16}) {
    const Tensor d = poisoned(x.shape(), to);
    cuda::cast(to_gpu(x), d);
    const Tensor want = x.to(to);
    expect_equal_ints(d, want, dtype_name(to));
    const Tensor back = poisoned(x.shape());
    cuda::cast(d, back);
    EXPECT_EQ(to_cpu(back).to_floats(), want.to_floats()) << dtype_name(to) << " -> f32";
  }
}

TEST(GpuRuntime, SumSquaresIsDeterministicAndMatchesTheCpu) {
  MOE_REQUIRE_GPU();
  const Tensor x = testing::random_tensor({1000003}, 4);
  const Tensor d = to_gpu(x);
  const double gpu1 = ops::sum_squares(d), gpu2 = ops::sum_squares(d);
  EXPECT_EQ(gpu1, gpu2);
  EXPECT_NEAR(gpu1, ops::sum_squares(x), 1e-9 * ops::sum_squares(x));
}

}  // namespace
}  // namespace moeforge
