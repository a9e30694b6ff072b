// Multi-tensor AdamW (the update of optim/adamw.h, torch.optim.AdamW's formula and order of
// operations) for every parameter at once: the tensors are cut into chunks of kChunk elements
// and each launch covers up to kMaxTensors tensors and kMaxBlocks chunks whose pointers travel in
// the kernel's arguments (as apex's multi_tensor_apply), so a model of hundreds of parameters
// takes a handful of launches and no device-side descriptor copies. Memory bound: reads p, g, m,
// v; writes p, m, v (and the bf16 copy of p in mixed precision).
#include "runtime/cuda/common.cuh"
#include "runtime/cuda/launchers.h"

namespace moeforge::cuda::launch {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 256;

struct Pack {
  AdamWTensor tensors[kMaxTensors];
  int tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
};
static_assert(sizeof(Pack) + sizeof(AdamWCoefficients) < 4000, "kernel arguments stay under the classic 4 KiB");

__global__ void adamw_kernel(const __grid_constant__ Pack pack, const AdamWCoefficients c) {
  const AdamWTensor& t = pack.tensors[pack.tensor_of_block[blockIdx.x]];
  const int64_t begin = pack.chunk_of_block[blockIdx.x] * kChunk, end = min(t.n, begin + kChunk);
  const float wd_factor = t.decay ? c.decay : 1.0f;
  auto* p16 = static_cast<__nv_bfloat16*>(t.p_bf16);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = t.g[i];
    const float mi = c.beta1 * t.m[i] + c.one_minus_beta1 * gi;
    const float vi = c.beta2 * t.v[i] + c.one_minus_beta2 * gi * gi;
    t.m[i] = mi;
    t.v[i] = vi;
    const float denom = sqrtf(vi) / c.bias2_sqrt + c.eps;
    const float pi = t.p[i] * wd_factor - c.step_size * (mi / denom);
    t.p[i] = pi;
    if (p16) p16[i] = __float2bfloat16_rn(pi);
  }
}

}  // namespace

cudaError_t adamw(const AdamWTensor* tensors, int64_t count, const AdamWCoefficients& c, cudaStream_t s) {
  Pack pack{};
  int used_tensors = 0, used_blocks = 0;
  const auto flush = [&]() {
    if (used_blocks > 0) adamw_kernel<<<used_blocks, kThreads, 0, s>>>(pack, c);
    used_tensors = used_blocks = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < count; ++i) {
    const AdamWTensor& t = tensors[i];
    if (t.n == 0) continue;
    const int64_t chunks = (t.n + kChunk - 1) / kChunk;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      // A tensor enters the pack at its first chunk in this launch.
      if (ch == 0 || used_blocks == 0) {
        if (used_tensors == kMaxTensors) {
          const cudaError_t st = flush();
          if (st != cudaSuccess) return st;
        }
        pack.tensors[used_tensors++] = t;
      }
      pack.tensor_of_block[used_blocks] = used_tensors - 1;
      pack.chunk_of_block[used_blocks] = static_cast<int>(ch);
      if (++used_blocks == kMaxBlocks) {
        const cudaError_t st = flush();
        if (st != cudaSuccess) return st;
      }
    }
  }
  return flush();
}

}  // namespace moeforge::cuda::launch
