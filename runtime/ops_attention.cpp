// Validation and dispatch of causal grouped-query attention.
#include <string_view>

#include "runtime/cpu/attention.h"
#include "runtime/op_checks.h"
#include "runtime/ops.h"

namespace moeforge::ops {

using detail::check_dtype;
using detail::check_ndim;
using detail::check_same_device;
using detail::check_same_shape;
using detail::check_shape;

namespace {

// The dtype of q, k, v and the other activations: f32 or bf16 (q's; on CUDA bf16 runs the fused
// flash attention of runtime/cuda/flash_attention*.cu, on the CPU the f32 kernel on widened
// copies); lse is always f32.
DType activation_dtype(std::string_view op, const Tensor& q) {
  detail::check_float(op, {"q", q});
  return q.dtype();
}

// q (B, T, H, D), k and v (B, T, Hkv, D) with H a multiple of Hkv, lse (B, H, T) f32.
void check_qkv(std::string_view op, DType dtype, const Tensor& q, const Tensor& k, const Tensor& v,
               const Tensor& lse) {
  check_dtype(op, {"q", q}, dtype);
  check_dtype(op, {"k", k}, dtype);
  check_dtype(op, {"v", v}, dtype);
  check_dtype(op, {"lse", lse}, DType::kF32);
  check_ndim(op, {"q", q}, 4);
  check_ndim(op, {"k", k}, 4);
  MOE_CHECK(q.dim(3) > 0, "{}: q {} has head dim 0; attention needs D >= 1", op, q.shape().str());
  check_shape(op, {"k", k}, Shape{q.dim(0), q.dim(1), k.dim(2), q.dim(3)}, {"q", q});
  check_same_shape(op, {"v", v}, {"k", k});
  const int64_t H = q.dim(2), Hkv = k.dim(2);
  MOE_CHECK(Hkv > 0 && H % Hkv == 0,
            "{}: q has {} heads and k has {} kv heads; grouped-query attention needs H to be a multiple of Hkv "
            "(q {}, k {})",
            op, H, Hkv, q.shape().str(), k.shape().str());
  check_shape(op, {"lse", lse}, Shape{q.dim(0), H, q.dim(1)}, {"q", q});
}

// The mask's window and documents (ops.h): cu_seqlens (S + 1) i32 on the op's device, with
// max_seqlen; on the CPU also its values (0 first, B * T last, increasing, every row start
// among them, no document longer than max_seqlen). A device's values are the caller's to get
// right: reading them would synchronise with the device.
void check_mask(std::string_view op, const AttentionMask& mask, const Tensor& q) {
  MOE_CHECK(mask.window >= 0, "{}: the attention window is {}; expected 0 (none) or a positive number of keys", op,
            mask.window);
  if (!mask.cu_seqlens.defined()) return;
  const Tensor& cu = mask.cu_seqlens;
  check_same_device(op, {{"q", q}, {"mask.cu_seqlens", cu}});
  check_dtype(op, {"mask.cu_seqlens", cu}, DType::kI32);
  MOE_CHECK(cu.ndim() == 1 && cu.dim(0) >= 2, "{}: mask.cu_seqlens has shape {}; expected (S + 1) with S >= 1 documents",
            op, cu.shape().str());
  MOE_CHECK(mask.max_seqlen >= 1, "{}: mask.max_seqlen is {}; it must be the longest document's length (>= 1)", op,
            mask.max_seqlen);
  if (!cu.device().is_cpu()) return;
  const int64_t T = q.dim(1), rows = q.dim(0) * T;
  const int32_t* c = cu.data<int32_t>();
  const int64_t n = cu.dim(0);
  MOE_CHECK(c[0] == 0 && c[n - 1] == rows, "{}: mask.cu_seqlens runs from {} to {}; expected 0 to B * T = {} (q {})",
            op, c[0], c[n - 1], rows, q.shape().str());
  int64_t next_row_start = 0;
  for (int64_t s = 0; s + 1 < n; ++s) {
    MOE_CHECK(c[s + 1] > c[s], "{}: mask.cu_seqlens[{}] = {} does not increase past mask.cu_seqlens[{}] = {}", op,
              s + 1, c[s + 1], s, c[s]);
    MOE_CHECK(c[s + 1] - c[s] <= mask.max_seqlen, "{}: document {} has {} tokens, more than mask.max_seqlen = {}", op,
              s, c[s + 1] - c[s], mask.max_seqlen);
    if (c[s] == next_row_start) next_row_start += T;
    MOE_CHECK(c[s + 1] <= next_row_start,
              "{}: document {} ([{}, {}) of the flattened rows) crosses the start of row {} at {}; every row of q {} "
              "must start a document",
              op, s, c[s], c[s + 1], next_row_start / T, next_row_start, q.shape().str());
  }
}

}  // namespace

void attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                   const Tensor& lse, const AttentionMask& mask) {
  constexpr std::string_view op = "attention_fwd";
  const Device dev = check_same_device(op, {{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"lse", lse}});
  const DType dtype = activation_dtype(op, q);
  check_qkv(op, dtype, q, k, v, lse);
  check_dtype(op, {"out", out}, dtype);
  check_same_shape(op, {"out", out}, {"q", q});
  check_mask(op, mask, q);
  if (dev.is_cpu() && dtype == DType::kBF16) {
    using detail::Widened;
    const Widened wq(q, Widened::kIn), wk(k, Widened::kIn), wv(v, Widened::kIn), wo(out, Widened::kOut);
    cpu::attention_fwd(wq.f32(), wk.f32(), wv.f32(), scale, wo.f32(), lse, mask);
    wo.finish();
    return;
  }
  MOE_DISPATCH(attention_fwd, dev, q, k, v, scale, out, lse, mask);
}

void attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                   const AttentionMask& mask) {
  constexpr std::string_view op = "attention_bwd";
  const Device dev = check_same_device(
      op,
      {{"q", q}, {"k", k}, {"v", v}, {"out", out}, {"lse", lse}, {"dout", dout}, {"dq", dq}, {"dk", dk}, {"dv", dv}});
  const DType dtype = activation_dtype(op, q);
  check_qkv(op, dtype, q, k, v, lse);
  for (const detail::NamedTensor t : {detail::NamedTensor{"out", out}, {"dout", dout}, {"dq", dq}}) {
    check_dtype(op, t, dtype);
    check_same_shape(op, t, {"q", q});
  }
  for (const detail::NamedTensor t : {detail::NamedTensor{"dk", dk}, {"dv", dv}}) {
    check_dtype(op, t, dtype);
    check_same_shape(op, t, {"k", k});
  }
  check_mask(op, mask, q);
  if (dev.is_cpu() && dtype == DType::kBF16) {
    using detail::Widened;
    const Widened wq(q, Widened::kIn), wk(k, Widened::kIn), wv(v, Widened::kIn), wo(out, Widened::kIn),
        wd(dout, Widened::kIn), wdq(dq, Widened::kOut), wdk(dk, Widened::kOut), wdv(dv, Widened::kOut);
    cpu::attention_bwd(wq.f32(), wk.f32(), wv.f32(), wo.f32(), lse, wd.f32(), scale, wdq.f32(), wdk.f32(), wdv.f32(),
                       mask);
    wdq.finish();
    wdk.finish();
    wdv.finish();
    return;
  }
  MOE_DISPATCH(attention_bwd, dev, q, k, v, out, lse, dout, scale, dq, dk, dv, mask);
}

}  // namespace moeforge::ops
