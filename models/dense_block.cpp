#include "models/dense_block.h"

#include <cmath>

#include <fmt/format.h>

namespace moeforge {

DenseFfnBlock::DenseFfnBlock(const ModelConfig& cfg, ParamRegistry& reg, int layer) : cfg_(cfg) {
  const std::string p = fmt::format("layers.{}.", layer);
  const int64_t C = cfg.dim, Fd = cfg.dense_hidden;
  const float out_std = cfg.init_std / std::sqrt(2.0f * static_cast<float>(cfg.n_layers));
  norm_ = &reg.add({.name = p + "ffn_norm.weight", .global_shape = {C}, .init = ParamInit::kOnes, .weight_decay = false});
  w1_ = &reg.add({.name = p + "ffn.w1", .global_shape = {Fd, C}, .init_std = cfg.init_std});
  w3_ = &reg.add({.name = p + "ffn.w3", .global_shape = {Fd, C}, .init_std = cfg.init_std});
  w2_ = &reg.add({.name = p + "ffn.w2", .global_shape = {C, Fd}, .init_std = out_std});
}

void DenseFfnBlock::forward(const Tensor& h_in, const Tensor& h_out, DenseActs& a) const {
  const int64_t N = h_in.dim(0), C = cfg_.dim, Fd = cfg_.dense_hidden;
  const Device dev = h_in.device();  // every activation lives where the input does
  const DType act = h_in.dtype();    // and has its dtype
  a.h_in = h_in;
  a.xn = Tensor::empty({N, C}, act, dev);
  a.rstd = Tensor::empty({N}, DType::kF32, dev);
  ops::rmsnorm_fwd(h_in, norm_->compute, cfg_.norm_eps, a.xn, a.rstd);
  a.gate = Tensor::empty({N, Fd}, act, dev);
  a.up = Tensor::empty({N, Fd}, act, dev);
  a.act = Tensor::empty({N, Fd}, act, dev);
  ops::gemm(a.xn, false, w1_->compute, true, a.gate);
  ops::gemm(a.xn, false, w3_->compute, true, a.up);
  ops::swiglu_fwd(a.gate, a.up, a.act);
  ops::gemm(a.act, false, w2_->compute, true, h_out);
  ops::add_(h_out, h_in);
}

void DenseFfnBlock::backward(const Tensor& dh_out, const Tensor& dh_in, const DenseActs& a) const {
  const int64_t N = a.xn.dim(0), C = cfg_.dim, Fd = cfg_.dense_hidden;
  const Device dev = dh_out.device();
  const DType act = dh_out.dtype();
  const Tensor dact = Tensor::empty({N, Fd}, act, dev);
  ops::gemm(dh_out, false, w2_->compute, false, dact);
  ops::gemm(dh_out, true, a.act, false, w2_->grad, /*accumulate=*/true);
  const Tensor dgate = Tensor::empty({N, Fd}, act, dev);
  const Tensor dup = Tensor::empty({N, Fd}, act, dev);
  ops::swiglu_bwd(a.gate, a.up, dact, dgate, dup);
  const Tensor dxn = Tensor::empty({N, C}, act, dev);
  ops::gemm(dgate, false, w1_->compute, false, dxn);
  ops::gemm(dup, false, w3_->compute, false, dxn, /*accumulate=*/true);
  ops::gemm(dgate, true, a.xn, false, w1_->grad, true);
  ops::gemm(dup, true, a.xn, false, w3_->grad, true);
  ops::rmsnorm_bwd(a.h_in, norm_->compute, a.rstd, dxn, dh_in, norm_->grad);
  ops::add_(dh_in, dh_out);
}

}  // namespace moeforge
