// Tensor-level fused bf16 attention (kernels in flash_attention*.cu): the CUDA attention_fwd and
// attention_bwd for bf16 tensors, and the packed variable-length and sliding-window forms. Plans
// the launch (runtime/cuda/attention_plan.h) against the device's shared-memory limit, allocates
// the backward's delta scratch and checks the launch status.
#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"
#include "runtime/cuda/kernels.h"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda {
namespace {

int64_t max_smem_optin(int device) {
  int bytes = 0;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return bytes;
}

void check_bf16(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> ts) {
  for (const auto& [name, t] : ts)
    MOE_CHECK(t->dtype() == DType::kBF16, "{}: {} is {}, the fused attention takes bf16", op, name,
              dtype_name(t->dtype()));
}

// The problem and kernel arguments of q, k, v, lse in the dense (4-D) or packed (3-D) layout.
struct Setup {
  flash::Problem problem;
  flash::FlashArgs args;
};

Setup setup(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lse, float scale,
            const FlashOptions& opt) {
  check_bf16(op, {{"q", &q}, {"k", &k}, {"v", &v}});
  MOE_CHECK(lse.dtype() == DType::kF32, "{}: lse is {}, expected f32", op, dtype_name(lse.dtype()));
  flash::Problem p{};
  const bool varlen = opt.cu_seqlens.defined();
  if (varlen) {
    const Shape lse_shape{q.dim(1), q.dim(0)};
    MOE_CHECK(q.ndim() == 3 && k.ndim() == 3 && v.shape() == k.shape() && q.dim(0) == k.dim(0) &&
                  q.dim(2) == k.dim(2) && opt.cu_seqlens.ndim() == 1 && opt.cu_seqlens.dim(0) >= 2 &&
                  opt.cu_seqlens.dtype() == DType::kI32 && lse.shape() == lse_shape,
              "{}: packed sequences need q (R, H, D), k and v (R, Hkv, D), cu_seqlens (B + 1) i32 and lse (H, R); "
              "got q {}, k {}, v {}, cu_seqlens {}, lse {}",
              op, q.shape().str(), k.shape().str(), v.shape().str(), opt.cu_seqlens.shape().str(), lse.shape().str());
    MOE_CHECK(opt.max_seqlen > 0, "{}: max_seqlen {} must be positive with cu_seqlens", op, opt.max_seqlen);
    p = {opt.cu_seqlens.dim(0) - 1, opt.max_seqlen, q.dim(1), k.dim(1), q.dim(2), opt.window, true, q.dim(0)};
  } else {
    const Shape lse_shape{q.dim(0), q.dim(2), q.dim(1)};
    MOE_CHECK(q.ndim() == 4 && k.ndim() == 4 && v.shape() == k.shape() && q.dim(0) == k.dim(0) &&
                  q.dim(1) == k.dim(1) && q.dim(3) == k.dim(3) && lse.shape() == lse_shape,
              "{}: need q (B, T, H, D), k and v (B, T, Hkv, D) and lse (B, H, T); got q {}, k {}, v {}, lse {}", op,
              q.shape().str(), k.shape().str(), v.shape().str(), lse.shape().str());
    p = {q.dim(0), q.dim(1), q.dim(2), k.dim(2), q.dim(3), opt.window, false, q.dim(0) * q.dim(1)};
  }
  flash::FlashArgs a{};
  a.q = q.raw_data();
  a.k = k.raw_data();
  a.v = v.raw_data();
  a.lse = lse.data<float>();
  a.cu_seqlens = varlen ? opt.cu_seqlens.data<int32_t>() : nullptr;
  a.B = p.B;
  a.T = p.T;
  a.H = p.H;
  a.Hkv = p.Hkv;
  a.D = p.D;
  a.window = p.window;
  a.total_rows = p.total_rows;
  a.scale = scale;
  return {p, a};
}

}  // namespace

void flash_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                         const Tensor& lse, const FlashOptions& opt) {
  constexpr const char* op = "flash_attention_fwd";
  Setup s = setup(op, q, k, v, lse, scale, opt);
  check_bf16(op, {{"out", &out}});
  MOE_CHECK(out.shape() == q.shape(), "{}: out {} must have q's shape {}", op, out.shape().str(), q.shape().str());
  if (q.numel() == 0) return;
  const flash::Plan plan = flash::plan_flash_attention(s.problem, max_smem_optin(q.device().index));
  s.args.out = out.raw_data();
  MOE_CUDA_CHECK(launch::flash_attention_fwd(s.args, plan, stream(q.device().index)));
}

void flash_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                         const Tensor& dout, float scale, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                         const FlashOptions& opt) {
  constexpr const char* op = "flash_attention_bwd";
  Setup s = setup(op, q, k, v, lse, scale, opt);
  check_bf16(op, {{"out", &out}, {"dout", &dout}, {"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
  MOE_CHECK(out.shape() == q.shape() && dout.shape() == q.shape() && dq.shape() == q.shape() &&
                dk.shape() == k.shape() && dv.shape() == k.shape(),
            "{}: out, dout and dq must have q's shape {} and dk, dv k's shape {}; got out {}, dout {}, dq {}, dk {}, "
            "dv {}",
            op, q.shape().str(), k.shape().str(), out.shape().str(), dout.shape().str(), dq.shape().str(),
            dk.shape().str(), dv.shape().str());
  if (q.numel() == 0) return;
  const flash::Plan plan = flash::plan_flash_attention(s.problem, max_smem_optin(q.device().index));
  const Tensor delta = Tensor::empty(lse.shape(), DType::kF32, q.device());
  s.args.out = out.raw_data();
  s.args.dout = dout.raw_data();
  s.args.dq = dq.raw_data();
  s.args.dk = dk.raw_data();
  s.args.dv = dv.raw_data();
  s.args.delta = delta.data<float>();
  MOE_CUDA_CHECK(launch::flash_attention_bwd(s.args, plan, stream(q.device().index)));
}

}  // namespace moeforge::cuda
