#include "optim/adamw.h"

#include <cmath>
#include <vector>

#include "models/device_tensors.h"
#ifdef MOEFORGE_WITH_CUDA
#include "runtime/cuda/adamw.h"
#endif

namespace moeforge {
namespace {

// Per-step scalars of the update, each formed in double and rounded to f32 once (as PyTorch
// does with its Python-float hyperparameters).
struct AdamWCoefficients {
  float decay;           // 1 - lr * wd, for parameters with weight decay
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float step_size;       // lr / (1 - beta1^t)
  float bias2_sqrt;      // sqrt(1 - beta2^t)
  float eps;
};

// The fused elementwise update of one f32 tensor; memory bound (reads p, g, m, v; writes p, m, v).
void adamw_update(float* p, const float* g, float* m, float* v, int64_t n, const AdamWCoefficients& c,
                  bool decay) {
  const float wd_factor = decay ? c.decay : 1.0f;
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = c.beta1 * m[i] + c.one_minus_beta1 * gi;
    const float vi = c.beta2 * v[i] + c.one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = std::sqrt(vi) / c.bias2_sqrt + c.eps;
    p[i] = p[i] * wd_factor - c.step_size * (mi / denom);
  }
}

}  // namespace

AdamW::AdamW(ParamRegistry& registry, AdamWOptions options, const std::function<ElementRange(const Param&)>& owned)
    : registry_(&registry), options_(options) {
  const auto in_unit = [](float b) { return b >= 0.0f && b < 1.0f; };
  MOE_CHECK(in_unit(options.beta1), "optim.beta1 ({}) must be in [0, 1)", options.beta1);
  MOE_CHECK(in_unit(options.beta2), "optim.beta2 ({}) must be in [0, 1)", options.beta2);
  MOE_CHECK(options.eps > 0.0f && std::isfinite(options.eps), "optim.eps ({}) must be positive and finite",
            options.eps);
  MOE_CHECK(options.weight_decay >= 0.0f && std::isfinite(options.weight_decay),
            "optim.weight_decay ({}) must be non-negative and finite", options.weight_decay);
  state_.reserve(registry.params().size());
  for (const Param& p : registry.params()) {
    index_.emplace(p.spec.name, state_.size());
    const ElementRange r = !p.spec.trainable ? ElementRange{} : owned ? owned(p) : ElementRange{0, p.value.numel()};
    MOE_CHECK(0 <= r.begin && r.begin <= r.end && r.end <= p.value.numel(),
              "AdamW: owned range [{}, {}) of {} is outside its {} elements", r.begin, r.end, p.spec.name,
              p.value.numel());
    const Shape shape = r.size() == p.value.numel() ? p.value.shape() : Shape{r.size()};
    state_.push_back({r, zeros_on(shape, DType::kF32, p.value.device()), zeros_on(shape, DType::kF32, p.value.device())});
  }
}

void AdamW::step(float lr) {
  MOE_CHECK(std::isfinite(lr) && lr >= 0.0f, "AdamW::step: learning rate must be finite and >= 0, got {}", lr);
  std::deque<Param>& params = registry_->params();
  MOE_CHECK(params.size() == state_.size(),
            "AdamW::step: the registry has {} parameters but the optimizer was built for {}", params.size(),
            state_.size());

  const double t = static_cast<double>(steps_ + 1);
  const double b1 = options_.beta1, b2 = options_.beta2;
  const AdamWCoefficients c{
      .decay = static_cast<float>(1.0 - static_cast<double>(lr) * options_.weight_decay),
      .beta1 = options_.beta1,
      .one_minus_beta1 = static_cast<float>(1.0 - b1),
      .beta2 = options_.beta2,
      .one_minus_beta2 = static_cast<float>(1.0 - b2),
      .step_size = static_cast<float>(lr / (1.0 - std::pow(b1, t))),
      .bias2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(b2, t))),
      .eps = options_.eps,
  };

#ifdef MOEFORGE_WITH_CUDA
  std::vector<cuda::AdamWEntry> device_entries;  // GPU parameters: one multi-tensor launch
#endif
  for (size_t i = 0; i < params.size(); ++i) {
    Param& p = params[i];
    State& s = state_[i];
    const Device dev = p.value.device();
    MOE_CHECK(p.grad.shape() == p.value.shape() && p.grad.device() == dev,
              "AdamW::step: parameter {} is {} but its gradient is {}", p.spec.name, p.value.str(), p.grad.str());
    const Shape state_shape = s.range.size() == p.value.numel() ? p.value.shape() : Shape{s.range.size()};
    for (const Tensor* st : {&s.exp_avg, &s.exp_avg_sq}) {
      MOE_CHECK(st->defined() && st->dtype() == DType::kF32 && st->shape() == state_shape && st->device() == dev,
                "AdamW::step: optimizer state of {} is {}, expected f32{} {}", p.spec.name,
                st->defined() ? st->str() : "undefined", state_shape.str(), dev.str());
    }
    const int64_t b = s.range.begin;
    if (dev.is_cpu()) {
      adamw_update(p.value.data<float>() + b, p.grad.data<float>() + b, s.exp_avg.data<float>(),
                   s.exp_avg_sq.data<float>(), s.range.size(), c, p.spec.weight_decay);
      continue;
    }
#ifdef MOEFORGE_WITH_CUDA
    if (s.range.size() == 0) continue;
    // The owned range as 1-D views of the flattened master weights and gradient; the state is
    // exactly that range (any shape of range.size() elements: the kernel is elementwise).
    const auto owned = [&](const Tensor& x) { return x.reshape({x.numel()}).rows(b, s.range.end); };
    device_entries.push_back({.master = owned(p.value),
                              .grad = owned(p.grad),
                              .exp_avg = s.exp_avg,
                              .exp_avg_sq = s.exp_avg_sq,
                              .param_bf16 = Tensor(),
                              .weight_decay = p.spec.weight_decay});
#else
    MOE_THROW("AdamW::step: parameter {} is on {}, but moeforge was built without CUDA", p.spec.name, dev.str());
#endif
  }
#ifdef MOEFORGE_WITH_CUDA
  // runtime/cuda/adamw.cu applies the formula of adamw_update above to each element, with the
  // same f32 coefficients (launch::AdamWCoefficients has these fields, in this order).
  cuda::adamw_step(device_entries, cuda::AdamWCoefficients{c.decay, c.beta1, c.one_minus_beta1, c.beta2,
                                                           c.one_minus_beta2, c.step_size, c.bias2_sqrt, c.eps});
#endif
  steps_ += 1;
}

void AdamW::set_steps(int64_t steps) {
  MOE_CHECK(steps >= 0, "AdamW::set_steps: step count must be >= 0, got {}", steps);
  steps_ = steps;
}

const AdamW::State& AdamW::state(const std::string& name) const {
  const auto it = index_.find(name);
  MOE_CHECK(it != index_.end(), "AdamW: no optimizer state for parameter {}", name);
  return state_[it->second];
}

AdamW::State& AdamW::state(const std::string& name) {
  const auto it = index_.find(name);
  MOE_CHECK(it != index_.end(), "AdamW: no optimizer state for parameter {}", name);
  return state_[it->second];
}

}  // namespace moeforge
