#include "runtime/cuda/adamw.h"

#include <vector>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"

namespace moeforge::cuda {

void adamw_step(std::span<const AdamWEntry> entries, const AdamWCoefficients& c) {
  if (entries.empty()) return;
  const Device dev = entries[0].master.device();
  MOE_CHECK(dev.is_cuda(), "adamw_step: tensors must be on a CUDA device, got {}", entries[0].master.str());
  std::vector<launch::AdamWTensor> list;
  list.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const AdamWEntry& e = entries[i];
    const int64_t n = e.master.numel();
    for (const Tensor* t : {&e.master, &e.grad, &e.exp_avg, &e.exp_avg_sq}) {
      MOE_CHECK(t->defined() && t->dtype() == DType::kF32 && t->device() == dev && t->numel() == n,
                "adamw_step: entry {}: expected f32 tensors of {} elements on {} (master {}), got {}", i, n,
                dev.str(), e.master.str(), t->defined() ? t->str() : "undefined");
    }
    if (e.param_bf16.defined()) {
      MOE_CHECK(e.param_bf16.dtype() == DType::kBF16 && e.param_bf16.device() == dev && e.param_bf16.numel() == n,
                "adamw_step: entry {}: param_bf16 is {}, expected bf16 of {} elements on {}", i, e.param_bf16.str(), n,
                dev.str());
    }
    list.push_back({e.master.data<float>(), e.grad.data<float>(), e.exp_avg.data<float>(), e.exp_avg_sq.data<float>(),
                    e.param_bf16.defined() ? e.param_bf16.raw_data() : nullptr, n, e.weight_decay});
  }
  MOE_CUDA_CHECK(launch::adamw(list.data(), static_cast<int64_t>(list.size()), c, stream(dev.index)));
}

}  // namespace moeforge::cuda
