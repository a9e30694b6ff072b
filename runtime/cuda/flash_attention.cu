// Launchers of the fused attention (kernels in flash_attention.cuh, one translation unit per head
// dim) and the backward's pre-pass delta_i = <dO_i, O_i>.
#include "runtime/cuda/attention_plan.h"
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda {
namespace flash {

// Defined in flash_attention.cuh, instantiated in flash_attention_hd64.cu and _hd128.cu.
template <int kD>
cudaError_t run_flash_fwd(const FlashArgs& a, const Plan& plan, cudaStream_t s);
template <int kD>
cudaError_t run_flash_bwd(const FlashArgs& a, const Plan& plan, cudaStream_t s);

namespace {

constexpr int kDeltaWarps = 4;

// One warp per (row, head) of the packed rows: delta in lse's layout, fp32 from bf16.
__global__ void flash_delta_kernel(FlashArgs a) {
  const int64_t w = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp;
  if (w >= a.total_rows * a.H) return;
  const int64_t r = w / a.H, h = w % a.H;
  const auto* o = static_cast<const __nv_bfloat16*>(a.out) + w * a.D;
  const auto* d = static_cast<const __nv_bfloat16*>(a.dout) + w * a.D;
  float acc = 0.0f;
  for (int64_t c = threadIdx.x % kWarp; c < a.D; c += kWarp) acc += __bfloat162float(o[c]) * __bfloat162float(d[c]);
  acc = warp_sum(acc);
  if (threadIdx.x % kWarp != 0) return;
  const int64_t index = a.cu_seqlens == nullptr ? (r / a.T * a.H + h) * a.T + r % a.T : h * a.total_rows + r;
  a.delta[index] = acc;
}

}  // namespace
}  // namespace flash

namespace launch {

cudaError_t flash_attention_fwd(const flash::FlashArgs& args, const flash::Plan& plan, cudaStream_t s) {
  return args.D == 64 ? flash::run_flash_fwd<64>(args, plan, s) : flash::run_flash_fwd<128>(args, plan, s);
}

cudaError_t flash_attention_bwd(const flash::FlashArgs& args, const flash::Plan& plan, cudaStream_t s) {
  const int64_t warps = plan.delta_rows;
  if (warps > 0) {
    constexpr int threads = flash::kDeltaWarps * kWarp;
    flash::flash_delta_kernel<<<static_cast<unsigned>((warps + flash::kDeltaWarps - 1) / flash::kDeltaWarps),
                                threads, 0, s>>>(args);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return args.D == 64 ? flash::run_flash_bwd<64>(args, plan, s) : flash::run_flash_bwd<128>(args, plan, s);
}

}  // namespace launch
}  // namespace moeforge::cuda
