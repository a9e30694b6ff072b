// Tensor-level fused bf16 attention (kernels in flash_attention*.cu): the CUDA attention_fwd and
// attention_bwd for bf16 tensors, and the packed variable-length and sliding-window forms. Plans
// the launch (runtime/cuda/attention_plan.h) against the device's shared-memory limit, allocates
// the backward's delta scratch and checks the launch status. On a compute capability 9.0 device
// (when built with 90 among the architectures) the wgmma + TMA kernels of
// flash_attention_sm90*.cu run instead of the mma.sync ones (see use_wgmma); cuDNN's fused
// attention (cudnn_attention.h) runs when chosen (attention_kernel.h).
#include <cstdint>
#include <initializer_list>
#include <string>

#include "runtime/cuda/attention_kernel.h"
#include "runtime/cuda/cuda_check.h"
#if MOEFORGE_WITH_CUDNN
#include "runtime/cuda/cudnn_attention.h"
#endif
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

// Why the Hopper wgmma kernels (flash_attention_sm90*.cu) cannot run this problem's forward or
// backward; empty when they can.
std::string wgmma_unsupported(bool backward, const flash::Problem& p, int device,
                              std::initializer_list<const Tensor*> tma_inputs, int64_t max_smem) {
#if MOEFORGE_WITH_SM90_ATTENTION
  const DeviceContext& c = context(device);
  if (c.cc_major != 9 || c.cc_minor != 0)
    return fmt::format("it is built for compute capability 9.0 (sm_90a), the device has {}.{}", c.cc_major,
                       c.cc_minor);
  for (const Tensor* t : tma_inputs)
    if (reinterpret_cast<uintptr_t>(t->raw_data()) % 16 != 0)
      return "the tensors it reads by TMA (q, k, v, and dout in the backward) must be 16-byte aligned";
  const char* why =
      backward ? flash::sm90::bwd_unsupported_reason(p, max_smem) : flash::sm90::unsupported_reason(p, max_smem);
  return why == nullptr ? std::string() : std::string(why);
#else
  return "it was not built (90 is not among CMAKE_CUDA_ARCHITECTURES)";
#endif
}

// The kernels: the wgmma ones where they can run (a compute capability 9.0 device, built with 90
// among the architectures), else mma.sync, unless the choice (attention_kernel.h:
// MOEFORGE_ATTENTION_KERNEL=mma|wgmma|cudnn over train.attention_kernel) forces one; forcing wgmma
// where it cannot run is an error naming the choice's origin. Either backward reads the lse either
// forward writes. (cuDNN is taken before this: see run_cudnn.)
bool use_wgmma(const char* op, const AttentionKernelChoice& choice, bool backward, const flash::Problem& p,
               int device, std::initializer_list<const Tensor*> tma_inputs, int64_t max_smem) {
  if (choice.kernel == AttentionKernel::kMma) return false;
  const std::string why = wgmma_unsupported(backward, p, device, tma_inputs, max_smem);
  MOE_CHECK(choice.kernel != AttentionKernel::kWgmma || why.empty(), "{}: {}, but the wgmma kernel cannot run: {}",
            op, choice.origin, why);
  return why.empty();
}

// cuDNN's fused attention on s.args (cudnn_attention.h), when the choice is cudnn; its errors
// name the op and the choice's origin.
void run_cudnn(const char* op, const AttentionKernelChoice& choice, bool backward, const Setup& s, int device) {
  const std::string who = fmt::format("{} ({})", op, choice.origin);
#if MOEFORGE_WITH_CUDNN
  if (backward)
    cudnn_attention::backward(who.c_str(), s.problem, s.args, device);
  else
    cudnn_attention::forward(who.c_str(), s.problem, s.args, device);
#else
  MOE_THROW("{}: cuDNN's fused attention was not built (configure found no cuDNN 9 in the CUDA toolkit)", who);
#endif
}

}  // namespace

void flash_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& out,
                         const Tensor& lse, const FlashOptions& opt) {
  constexpr const char* op = "flash_attention_fwd";
  Setup s = setup(op, q, k, v, lse, scale, opt);
  check_bf16(op, {{"out", &out}});
  MOE_CHECK(out.shape() == q.shape(), "{}: out {} must have q's shape {}", op, out.shape().str(), q.shape().str());
  if (q.numel() == 0) return;
  const int device = q.device().index;
  const AttentionKernelChoice choice = attention_kernel_for(op);
  s.args.out = out.raw_data();
  if (choice.kernel == AttentionKernel::kCudnn) return run_cudnn(op, choice, false, s, device);
  const int64_t max_smem = max_smem_optin(device);
  const flash::Plan plan = flash::plan_flash_attention(s.problem, max_smem);
  if (use_wgmma(op, choice, false, s.problem, device, {&q, &k, &v}, max_smem)) {
#if MOEFORGE_WITH_SM90_ATTENTION
    MOE_CUDA_CHECK(launch::flash_attention_fwd_sm90(s.args, flash::sm90::plan_fwd(s.problem), stream(device)));
#endif
    return;
  }
  MOE_CUDA_CHECK(launch::flash_attention_fwd(s.args, plan, stream(device)));
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
  const int device = q.device().index;
  const AttentionKernelChoice choice = attention_kernel_for(op);
  s.args.out = out.raw_data();
  s.args.dout = dout.raw_data();
  s.args.dq = dq.raw_data();
  s.args.dk = dk.raw_data();
  s.args.dv = dv.raw_data();
  if (choice.kernel == AttentionKernel::kCudnn) return run_cudnn(op, choice, true, s, device);
  const int64_t max_smem = max_smem_optin(device);
  const flash::Plan plan = flash::plan_flash_attention(s.problem, max_smem);
  const Tensor delta = Tensor::empty(lse.shape(), DType::kF32, q.device());
  s.args.delta = delta.data<float>();
  if (use_wgmma(op, choice, true, s.problem, device, {&q, &k, &v, &dout}, max_smem)) {
#if MOEFORGE_WITH_SM90_ATTENTION
    MOE_CUDA_CHECK(launch::flash_attention_bwd_sm90(s.args, flash::sm90::plan_bwd(s.problem), stream(device)));
#endif
    return;
  }
  MOE_CUDA_CHECK(launch::flash_attention_bwd(s.args, plan, stream(device)));
}

}  // namespace moeforge::cuda
