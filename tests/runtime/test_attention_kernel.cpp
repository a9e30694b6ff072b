// Tests runtime/cuda/attention_kernel.{h,cpp} on the CPU: the environment value's parsing (each
// kernel, its origin text, the exact error of a bad value), its precedence over the process-wide
// setting, the setting itself, and whether this build has the cuDNN attention.
#include <gtest/gtest.h>

#include <string>

#include "runtime/cuda/attention_kernel.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using cuda::AttentionKernel;
using cuda::AttentionKernelChoice;

TEST(AttentionKernel, Names) {
  EXPECT_STREQ(cuda::attention_kernel_name(AttentionKernel::kAuto), "auto");
  EXPECT_STREQ(cuda::attention_kernel_name(AttentionKernel::kMma), "mma");
  EXPECT_STREQ(cuda::attention_kernel_name(AttentionKernel::kWgmma), "wgmma");
  EXPECT_STREQ(cuda::attention_kernel_name(AttentionKernel::kCudnn), "cudnn");
}

TEST(AttentionKernel, EnvironmentValues) {
  for (const char* unset : {static_cast<const char*>(nullptr), ""}) {
    const AttentionKernelChoice c = cuda::parse_attention_kernel_env(unset, "op");
    EXPECT_EQ(c.kernel, AttentionKernel::kAuto);
    EXPECT_EQ(c.origin, "");
  }
  const struct {
    const char* value;
    AttentionKernel kernel;
  } cases[] = {{"mma", AttentionKernel::kMma}, {"wgmma", AttentionKernel::kWgmma}, {"cudnn", AttentionKernel::kCudnn}};
  for (const auto& c : cases) {
    const AttentionKernelChoice choice = cuda::parse_attention_kernel_env(c.value, "op");
    EXPECT_EQ(choice.kernel, c.kernel) << c.value;
    EXPECT_EQ(choice.origin, std::string("MOEFORGE_ATTENTION_KERNEL=") + c.value);
  }
}

TEST(AttentionKernel, BadEnvironmentValueIsAnError) {
  EXPECT_EQ(testing::error_of([] { cuda::parse_attention_kernel_env("fast", "flash_attention_fwd"); }),
            "flash_attention_fwd: MOEFORGE_ATTENTION_KERNEL is 'fast', expected mma, wgmma or cudnn (or unset)");
  // Exact names only: no case folding, no "auto" (unset means automatic).
  EXPECT_EQ(testing::error_of([] { cuda::parse_attention_kernel_env("CUDNN", "flash_attention_bwd"); }),
            "flash_attention_bwd: MOEFORGE_ATTENTION_KERNEL is 'CUDNN', expected mma, wgmma or cudnn (or unset)");
  EXPECT_EQ(testing::error_of([] { cuda::parse_attention_kernel_env("auto", "op"); }),
            "op: MOEFORGE_ATTENTION_KERNEL is 'auto', expected mma, wgmma or cudnn (or unset)");
}

TEST(AttentionKernel, EnvironmentOverridesTheConfiguredChoice) {
  const AttentionKernelChoice configured{AttentionKernel::kCudnn, "train.attention_kernel: CUDNN"};
  const AttentionKernelChoice kept = cuda::resolve_attention_kernel(nullptr, configured, "op");
  EXPECT_EQ(kept.kernel, AttentionKernel::kCudnn);
  EXPECT_EQ(kept.origin, "train.attention_kernel: CUDNN");
  EXPECT_EQ(cuda::resolve_attention_kernel("", configured, "op").kernel, AttentionKernel::kCudnn);
  const AttentionKernelChoice env = cuda::resolve_attention_kernel("mma", configured, "op");
  EXPECT_EQ(env.kernel, AttentionKernel::kMma);
  EXPECT_EQ(env.origin, "MOEFORGE_ATTENTION_KERNEL=mma");
  EXPECT_EQ(cuda::resolve_attention_kernel("wgmma", {}, "op").kernel, AttentionKernel::kWgmma);
  // A bad environment value is an error even when the config chose a kernel.
  EXPECT_EQ(testing::error_of([&] { cuda::resolve_attention_kernel("cudnn9", configured, "op"); }),
            "op: MOEFORGE_ATTENTION_KERNEL is 'cudnn9', expected mma, wgmma or cudnn (or unset)");
}

TEST(AttentionKernel, ProcessWideSetting) {
  EXPECT_EQ(cuda::attention_kernel_setting().kernel, AttentionKernel::kAuto) << "the default";
  cuda::set_attention_kernel({AttentionKernel::kWgmma, "train.attention_kernel: WGMMA"});
  EXPECT_EQ(cuda::attention_kernel_setting().kernel, AttentionKernel::kWgmma);
  EXPECT_EQ(cuda::attention_kernel_setting().origin, "train.attention_kernel: WGMMA");
  EXPECT_EQ(testing::error_of([] { cuda::set_attention_kernel({AttentionKernel::kCudnn, ""}); }),
            "set_attention_kernel: the choice cudnn needs an origin to name in errors");
  EXPECT_EQ(cuda::attention_kernel_setting().kernel, AttentionKernel::kWgmma) << "a rejected choice changes nothing";
  cuda::set_attention_kernel({});
  EXPECT_EQ(cuda::attention_kernel_setting().kernel, AttentionKernel::kAuto);
}

TEST(AttentionKernel, CudnnBuiltMatchesTheBuild) {
#if MOEFORGE_WITH_CUDNN
  EXPECT_TRUE(cuda::cudnn_attention_built());
#else
  EXPECT_FALSE(cuda::cudnn_attention_built());
#endif
}

}  // namespace
}  // namespace moeforge
