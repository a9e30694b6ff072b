// Tests runtime/cuda/device_alloc.cpp on a real device: a CUDA tensor's storage takes a
// host -> device -> host round trip unchanged, also through a rows view (offset pointer).
// Skips without a device or without the CUDA backend; labelled `gpu` by tests/CMakeLists.txt.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

#ifdef MOEFORGE_WITH_CUDA
#include "runtime/cuda/device_alloc.h"
#endif

namespace moeforge {
namespace {

TEST(GpuDeviceAlloc, HostDeviceHostRoundTrip) {
#ifdef MOEFORGE_WITH_CUDA
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const Tensor d = Tensor::empty({1000, 37}, DType::kF32, Device::cuda(0));
  ASSERT_TRUE(d.device().is_cuda());
  std::vector<float> host(static_cast<size_t>(d.numel()));
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(i) * 0.25f - 1000.0f;
  cuda::copy_host_to_device(d.raw_data(), host.data(), d.nbytes(), 0);
  std::vector<float> back(host.size(), 0.0f);
  cuda::copy_device_to_host(back.data(), d.raw_data(), d.nbytes(), 0);
  EXPECT_EQ(back, host);

  // A rows view's pointer is offset on the device: rows [10, 12) are elements [370, 444).
  const Tensor v = d.rows(10, 12);
  std::vector<float> part(static_cast<size_t>(v.numel()));
  cuda::copy_device_to_host(part.data(), v.raw_data(), v.nbytes(), 0);
  EXPECT_EQ(part, std::vector<float>(host.begin() + 370, host.begin() + 444));
#else
  GTEST_SKIP() << "built without CUDA (MOEFORGE_CUDA=OFF or no nvcc)";
#endif
}

TEST(GpuDeviceAlloc, ManyAllocationsAreFreed) {
#ifdef MOEFORGE_WITH_CUDA
  if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
  // 200 x 1 GiB allocated and dropped one after the other: more than any current device holds,
  // so a leak in Storage's destructor ends in an out-of-memory Error here.
  for (int i = 0; i < 200; ++i) {
    const Tensor t = Tensor::empty({256, 1024, 1024}, DType::kF32, Device::cuda(0));
    ASSERT_NE(t.raw_data(), nullptr);
  }
  const std::vector<int32_t> ints = {1, -2, 3, 2147483647};
  const Tensor d = Tensor::empty({4}, DType::kI32, Device::cuda(0));
  cuda::copy_host_to_device(d.data<int32_t>(), ints.data(), d.nbytes(), 0);
  std::vector<int32_t> back(4);
  cuda::copy_device_to_host(back.data(), d.data<int32_t>(), d.nbytes(), 0);
  EXPECT_EQ(back, ints);
#else
  GTEST_SKIP() << "built without CUDA (MOEFORGE_CUDA=OFF or no nvcc)";
#endif
}

}  // namespace
}  // namespace moeforge
