#include "optim/distributed_optimizer.h"

#include <algorithm>
#include <cmath>

#include "models/device_tensors.h"
#include "runtime/ops.h"

namespace moeforge {

namespace {
// The flattened elements [begin, end) of t, as a 1-D view (any device).
Tensor flat_rows(const Tensor& t, int64_t begin, int64_t end) { return t.reshape({t.numel()}).rows(begin, end); }
}  // namespace

void DistributedOptimizer::Flat::build(Comm& g) {
  group = &g;
  int64_t n = 0;
  for (const Param* p : params) {
    offset.push_back(n);
    n += p->value.numel();
  }
  chunk = (n + g.size() - 1) / g.size();
  size = chunk * g.size();
  begin = chunk * g.rank();
}

void DistributedOptimizer::Flat::reduce_scatter(float scale) const {
  if (params.empty() || group->size() == 1) {
    for (Param* p : params) ops::scale_(p->grad, scale);
    return;
  }
  // The flat buffers live on the parameters' device; the copies are the catalog's (memcpy on
  // the CPU, device-to-device on a GPU).
  const Device dev = params.front()->grad.device();
  const Tensor flat = zeros_on({size}, DType::kF32, dev);
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& g = params[i]->grad;
    ops::copy(flat_rows(g, 0, g.numel()), flat.rows(offset[i], offset[i] + g.numel()));
  }
  const Tensor mine = Tensor::empty({chunk}, DType::kF32, dev);
  group->reduce_scatter(flat, mine);
  ops::scale_(mine, scale);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t lo = std::clamp(begin - offset[i], int64_t{0}, params[i]->grad.numel());
    const int64_t hi = std::clamp(begin + chunk - offset[i], int64_t{0}, params[i]->grad.numel());
    if (hi > lo)
      ops::copy(mine.rows(offset[i] + lo - begin, offset[i] + hi - begin), flat_rows(params[i]->grad, lo, hi));
  }
}

void DistributedOptimizer::Flat::all_gather() const {
  if (params.empty() || group->size() == 1) return;
  const Device dev = params.front()->value.device();
  const Tensor mine = zeros_on({chunk}, DType::kF32, dev);
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t lo = std::clamp(begin - offset[i], int64_t{0}, params[i]->value.numel());
    const int64_t hi = std::clamp(begin + chunk - offset[i], int64_t{0}, params[i]->value.numel());
    if (hi > lo)
      ops::copy(flat_rows(params[i]->value, lo, hi), mine.rows(offset[i] + lo - begin, offset[i] + hi - begin));
  }
  const Tensor flat = Tensor::empty({size}, DType::kF32, dev);
  group->all_gather(mine, flat);
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor& v = params[i]->value;
    ops::copy(flat.rows(offset[i], offset[i] + v.numel()), flat_rows(v, 0, v.numel()));
  }
}

DistributedOptimizer::DistributedOptimizer(ParamRegistry& registry, const ProcessGrid& grid, AdamWOptions options,
                                           int zero_stage, int64_t bucket_bytes)
    : registry_(registry), grid_(grid), zero_stage_(zero_stage), bucket_bytes_(bucket_bytes) {
  MOE_CHECK(zero_stage == 0 || zero_stage == 1, "parallel.zero_stage must be 0 or 1, got {}", zero_stage);
  MOE_CHECK(bucket_bytes > 0, "DistributedOptimizer: bucket_bytes must be positive, got {}", bucket_bytes);
  for (Param& p : registry_.params()) {
    if (!p.spec.trainable) continue;
    if (p.spec.tied) tied_.push_back(&p);
    if (p.spec.expert) {
      experts_.push_back(&p);
      expert_flat_.params.push_back(&p);
    } else {
      (tp_partial(p) ? tp_whole_ : tp_split_).push_back(&p);
      dense_flat_.params.push_back(&p);
    }
  }
  dense_flat_.build(grid_.dp());
  expert_flat_.build(grid_.expert_dp());
  for (const Flat* f : {&dense_flat_, &expert_flat_})
    for (size_t i = 0; i < f->params.size(); ++i) flat_index_.emplace(f->params[i], std::pair{f, i});
  if (zero_stage_ == 1) {
    adamw_ = std::make_unique<AdamW>(registry_, options, [this](const Param& p) { return owned(p); });
  } else {
    adamw_ = std::make_unique<AdamW>(registry_, options);
  }
}

bool DistributedOptimizer::tp_partial(const Param& p) const {
  return grid_.tp().size() > 1 && p.spec.shard_group != ShardGroup::kTP && !p.spec.expert;
}

Comm& DistributedOptimizer::state_group(const Param& p) const {
  return p.spec.expert ? grid_.expert_dp() : grid_.dp();
}

ElementRange DistributedOptimizer::owned(const Param& p) const {
  const auto it = flat_index_.find(&p);
  if (it == flat_index_.end()) return {};  // non-trainable
  const Flat& f = *it->second.first;
  const int64_t begin = f.offset[it->second.second], end = begin + p.value.numel();
  const int64_t lo = std::clamp(f.begin, begin, end), hi = std::clamp(f.begin + f.chunk, begin, end);
  return {lo - begin, hi - begin};
}

Tensor DistributedOptimizer::owned_grad(const Param& p) const {
  if (zero_stage_ == 0) return p.grad;
  const ElementRange r = owned(p);
  return flat_rows(p.grad, r.begin, r.end);
}

void DistributedOptimizer::bucketed_all_reduce(const std::vector<Param*>& params, Comm& group, float scale) {
  if (params.empty()) return;
  if (group.size() > 1) {
    const int64_t cap = std::max<int64_t>(1, bucket_bytes_ / static_cast<int64_t>(sizeof(float)));
    size_t first = 0;
    while (first < params.size()) {
      // A bucket: consecutive parameters up to `cap` elements (at least one parameter).
      size_t last = first;
      int64_t n = 0;
      while (last < params.size() && (last == first || n + params[last]->grad.numel() <= cap)) {
        n += params[last]->grad.numel();
        ++last;
      }
      // On the gradients' device; the copies are the catalog's (memcpy on the CPU).
      const Tensor bucket = Tensor::empty({n}, DType::kF32, params[first]->grad.device());
      int64_t at = 0;
      for (size_t i = first; i < last; ++i) {
        const Tensor& g = params[i]->grad;
        ops::copy(flat_rows(g, 0, g.numel()), bucket.rows(at, at + g.numel()));
        at += g.numel();
      }
      group.all_reduce(bucket);
      at = 0;
      for (size_t i = first; i < last; ++i) {
        const Tensor& g = params[i]->grad;
        ops::copy(bucket.rows(at, at + g.numel()), flat_rows(g, 0, g.numel()));
        at += g.numel();
      }
      first = last;
    }
  }
  if (scale != 1.0f)
    for (Param* p : params) ops::scale_(p->grad, scale);
}

void DistributedOptimizer::reduce_gradients() {
  const float inv_dp = 1.0f / static_cast<float>(grid_.dp().size());
  bucketed_all_reduce(tied_, grid_.embed(), 1.0f);  // the two copies of tied embeddings
  if (zero_stage_ == 0) {
    bucketed_all_reduce(tp_split_, grid_.dp(), inv_dp);
    bucketed_all_reduce(tp_whole_, grid_.stage(), inv_dp);
    bucketed_all_reduce(experts_, grid_.expert_dp(), inv_dp);
    return;
  }
  bucketed_all_reduce(tp_whole_, grid_.tp(), 1.0f);
  dense_flat_.reduce_scatter(inv_dp);
  expert_flat_.reduce_scatter(inv_dp);
}

bool DistributedOptimizer::counts_in_norm(const Param& p) const {
  if (!p.spec.trainable || p.spec.replica) return false;
  if (zero_stage_ == 1) return !tp_partial(p) || grid_.tp_rank() == 0;  // chunks are unique in their group
  if (p.spec.expert) return grid_.expert_dp_rank() == 0;
  if (tp_partial(p)) return grid_.tp_rank() == 0 && grid_.dp_rank() == 0;
  return grid_.dp_rank() == 0;
}

double DistributedOptimizer::clip_grad_norm(double max_norm) {
  MOE_CHECK(max_norm >= 0.0 && std::isfinite(max_norm), "optim.grad_clip must be finite and >= 0, got {}", max_norm);
  double local = 0.0;
  for (Param& p : registry_.params())
    if (counts_in_norm(p)) local += ops::sum_squares(owned_grad(p));
  if (grid_.stage().size() > 1 || grid_.pp().size() > 1) {
    // f32 would lose digits of a large sum of squares: split into high and low parts (a
    // non-finite sum stays in the high part).
    const float hi = static_cast<float>(local);
    const float lo = std::isfinite(hi) ? static_cast<float>(local - static_cast<double>(hi)) : 0.0f;
    const Tensor parts = Tensor::from_floats({2}, std::vector<float>{hi, lo});
    for (Comm* group : {&grid_.stage(), &grid_.pp()})  // the stages hold different layers
      if (group->size() > 1) group->all_reduce(parts);
    local = static_cast<double>(parts.data<float>()[0]) + static_cast<double>(parts.data<float>()[1]);
  }
  const double norm = std::sqrt(local);
  if (max_norm > 0.0 && std::isfinite(norm) && norm > max_norm) {
    const float s = static_cast<float>(max_norm / (norm + 1e-6));
    for (Param& p : registry_.params())
      if (p.spec.trainable) ops::scale_(owned_grad(p), s);
  }
  return norm;
}

void DistributedOptimizer::step(float lr) {
  adamw_->step(lr);
  if (zero_stage_ > 0) {
    dense_flat_.all_gather();
    expert_flat_.all_gather();
  }
  registry_.refresh_compute();  // bf16 copies of the updated masters (nothing in f32 mode)
}

}  // namespace moeforge
