// The fused attention kernels for head dim 64 (one translation unit per head dim keeps the
// kernels' compiles parallel; templates in flash_attention.cuh).
#include "runtime/cuda/flash_attention.cuh"

namespace moeforge::cuda::flash {

template cudaError_t run_flash_fwd<64>(const FlashArgs&, const Plan&, cudaStream_t);
template cudaError_t run_flash_bwd<64>(const FlashArgs&, const Plan&, cudaStream_t);

}  // namespace moeforge::cuda::flash
