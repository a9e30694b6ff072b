// The fused attention's kernel choice (see attention_kernel.h).
#include "runtime/cuda/attention_kernel.h"

#include <cstdlib>
#include <mutex>

#include "runtime/error.h"

namespace moeforge::cuda {
namespace {

constexpr const char* kEnv = "MOEFORGE_ATTENTION_KERNEL";

std::mutex& setting_mutex() {
  static std::mutex m;
  return m;
}

AttentionKernelChoice& setting() {
  static AttentionKernelChoice choice;
  return choice;
}

}  // namespace

const char* attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kAuto: return "auto";
    case AttentionKernel::kMma: return "mma";
    case AttentionKernel::kWgmma: return "wgmma";
    case AttentionKernel::kCudnn: return "cudnn";
  }
  MOE_THROW("attention_kernel_name: unknown kernel {}", static_cast<int>(kernel));
}

AttentionKernelChoice parse_attention_kernel_env(const char* value, const char* op) {
  const std::string_view v = value == nullptr ? std::string_view() : std::string_view(value);
  if (v.empty()) return {};
  for (const AttentionKernel k : {AttentionKernel::kMma, AttentionKernel::kWgmma, AttentionKernel::kCudnn})
    if (v == attention_kernel_name(k)) return {k, fmt::format("{}={}", kEnv, v)};
  MOE_THROW("{}: {} is '{}', expected mma, wgmma or cudnn (or unset)", op, kEnv, v);
}

AttentionKernelChoice resolve_attention_kernel(const char* env_value, const AttentionKernelChoice& configured,
                                               const char* op) {
  AttentionKernelChoice env = parse_attention_kernel_env(env_value, op);
  return env.kernel != AttentionKernel::kAuto ? env : configured;
}

void set_attention_kernel(AttentionKernelChoice choice) {
  MOE_CHECK(choice.kernel == AttentionKernel::kAuto || !choice.origin.empty(),
            "set_attention_kernel: the choice {} needs an origin to name in errors",
            attention_kernel_name(choice.kernel));
  const std::lock_guard<std::mutex> lock(setting_mutex());
  setting() = std::move(choice);
}

AttentionKernelChoice attention_kernel_setting() {
  const std::lock_guard<std::mutex> lock(setting_mutex());
  return setting();
}

AttentionKernelChoice attention_kernel_for(const char* op) {
  return resolve_attention_kernel(std::getenv(kEnv), attention_kernel_setting(), op);
}

bool cudnn_attention_built() {
#if MOEFORGE_WITH_CUDNN
  return true;
#else
  return false;
#endif
}

}  // namespace moeforge::cuda
