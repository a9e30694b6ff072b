#include "optim/distributed_optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "runtime/ops.h"

namespace moeforge {

DistributedOptimizer::DistributedOptimizer(ParamRegistry& registry, const ProcessGrid& grid, AdamWOptions options,
                                           int zero_stage, int64_t bucket_bytes)
    : registry_(registry), grid_(grid), zero_stage_(zero_stage), bucket_bytes_(bucket_bytes) {
  MOE_CHECK(zero_stage == 0 || zero_stage == 1, "parallel.zero_stage must be 0 or 1, got {}", zero_stage);
  MOE_CHECK(bucket_bytes > 0, "DistributedOptimizer: bucket_bytes must be positive, got {}", bucket_bytes);
  int64_t offset = 0;
  for (Param& p : registry_.params()) {
    (tp_partial(p) ? tp_whole_ : tp_split_).push_back(&p);
    index_.emplace(&p, flat_offset_.size());
    flat_offset_.push_back(offset);
    offset += p.value.numel();
  }
  const int dp = grid_.dp().size();
  chunk_ = (offset + dp - 1) / dp;
  flat_size_ = chunk_ * dp;
  chunk_begin_ = chunk_ * grid_.dp().rank();
  if (zero_stage_ == 1) {
    adamw_ = std::make_unique<AdamW>(registry_, options, [this](const Param& p) { return owned(p); });
  } else {
    adamw_ = std::make_unique<AdamW>(registry_, options);
  }
}

bool DistributedOptimizer::tp_partial(const Param& p) const {
  return grid_.tp().size() > 1 && p.spec.shard_group != ShardGroup::kTP;
}

ElementRange DistributedOptimizer::owned(const Param& p) const {
  const int64_t begin = flat_offset_[index_.at(&p)], end = begin + p.value.numel();
  const int64_t lo = std::clamp(chunk_begin_, begin, end), hi = std::clamp(chunk_begin_ + chunk_, begin, end);
  return {lo - begin, hi - begin};
}

Tensor DistributedOptimizer::owned_grad(const Param& p) const {
  if (zero_stage_ == 0) return p.grad;
  const ElementRange r = owned(p);
  return p.grad.reshape({p.grad.numel()}).rows(r.begin, r.end);
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
      const Tensor bucket = Tensor::empty({n}, DType::kF32);
      float* b = bucket.data<float>();
      for (size_t i = first; i < last; ++i) {
        std::memcpy(b, params[i]->grad.data<float>(), params[i]->grad.nbytes());
        b += params[i]->grad.numel();
      }
      group.all_reduce(bucket);
      b = bucket.data<float>();
      for (size_t i = first; i < last; ++i) {
        std::memcpy(params[i]->grad.data<float>(), b, params[i]->grad.nbytes());
        b += params[i]->grad.numel();
      }
      first = last;
    }
  }
  if (scale != 1.0f)
    for (Param* p : params) ops::scale_(p->grad, scale);
}

void DistributedOptimizer::reduce_gradients() {
  const int dp = grid_.dp().size();
  const float inv_dp = 1.0f / static_cast<float>(dp);
  if (zero_stage_ == 0) {
    bucketed_all_reduce(tp_split_, grid_.dp(), inv_dp);
    bucketed_all_reduce(tp_whole_, grid_.stage(), inv_dp);
    return;
  }
  bucketed_all_reduce(tp_whole_, grid_.tp(), 1.0f);
  if (dp == 1) return;
  // ZeRO-1: reduce-scatter the flat gradient so this rank receives its averaged chunk.
  const Tensor flat = Tensor::zeros({flat_size_}, DType::kF32);
  size_t i = 0;
  for (Param& p : registry_.params()) {
    std::memcpy(flat.data<float>() + flat_offset_[i++], p.grad.data<float>(), p.grad.nbytes());
  }
  const Tensor chunk = Tensor::empty({chunk_}, DType::kF32);
  grid_.dp().reduce_scatter(flat, chunk);
  ops::scale_(chunk, inv_dp);
  i = 0;
  for (Param& p : registry_.params()) {
    const ElementRange r = owned(p);
    const int64_t src = flat_offset_[i++] + r.begin - chunk_begin_;
    if (r.size() > 0) std::memcpy(p.grad.data<float>() + r.begin, chunk.data<float>() + src, r.size() * sizeof(float));
  }
}

double DistributedOptimizer::clip_grad_norm(double max_norm) {
  MOE_CHECK(max_norm >= 0.0 && std::isfinite(max_norm), "optim.grad_clip must be finite and >= 0, got {}", max_norm);
  const bool root_tp = grid_.tp().rank() == 0;
  double local = 0.0;
  for (Param& p : registry_.params()) {
    if (tp_partial(p) && !root_tp) continue;  // counted once, on TP rank 0
    local += ops::sum_squares(owned_grad(p));
  }
  // Sum over the ranks that hold different elements: TP (and DP chunks under ZeRO-1).
  Comm& group = zero_stage_ == 1 ? grid_.stage() : grid_.tp();
  if (group.size() > 1) {
    const Tensor t = Tensor::empty({1}, DType::kF32);
    // f32 would lose digits of a large sum of squares: split into high and low parts.
    const float hi = static_cast<float>(local);
    const float lo = static_cast<float>(local - static_cast<double>(hi));
    const Tensor parts = Tensor::from_floats({2}, std::vector<float>{hi, lo});
    group.all_reduce(parts);
    local = static_cast<double>(parts.data<float>()[0]) + static_cast<double>(parts.data<float>()[1]);
  }
  const double norm = std::sqrt(local);
  if (max_norm > 0.0 && std::isfinite(norm) && norm > max_norm) {
    const float s = static_cast<float>(max_norm / (norm + 1e-6));
    for (Param& p : registry_.params()) ops::scale_(owned_grad(p), s);
  }
  return norm;
}

void DistributedOptimizer::step(float lr) {
  adamw_->step(lr);
  if (zero_stage_ == 0 || grid_.dp().size() == 1) return;
  // ZeRO-1: every rank contributes its updated chunk; all-gather the flat parameters.
  const Tensor chunk = Tensor::zeros({chunk_}, DType::kF32);
  size_t i = 0;
  for (Param& p : registry_.params()) {
    const ElementRange r = owned(p);
    const int64_t dst = flat_offset_[i++] + r.begin - chunk_begin_;
    if (r.size() > 0) std::memcpy(chunk.data<float>() + dst, p.value.data<float>() + r.begin, r.size() * sizeof(float));
  }
  const Tensor flat = Tensor::empty({flat_size_}, DType::kF32);
  grid_.dp().all_gather(chunk, flat);
  i = 0;
  for (Param& p : registry_.params()) {
    std::memcpy(p.value.data<float>(), flat.data<float>() + flat_offset_[i++], p.value.nbytes());
  }
}

}  // namespace moeforge
