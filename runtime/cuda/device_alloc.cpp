#include "runtime/cuda/device_alloc.h"

#include <cuda_runtime.h>

#include "runtime/error.h"

#define MOE_CUDA_CHECK(stmt)                                                                    \
  do {                                                                                          \
    const cudaError_t moe_cuda_status = (stmt);                                                 \
    MOE_CHECK(moe_cuda_status == cudaSuccess, "CUDA error {} ({}) in `{}`", cudaGetErrorName(moe_cuda_status), \
              cudaGetErrorString(moe_cuda_status), #stmt);                                      \
  } while (0)

namespace moeforge::cuda {

void* device_alloc(size_t bytes, int device) {
  if (bytes == 0) return nullptr;
  MOE_CUDA_CHECK(cudaSetDevice(device));
  void* p = nullptr;
  MOE_CUDA_CHECK(cudaMalloc(&p, bytes));
  return p;
}

void device_free(void* ptr, size_t, int device) {
  if (!ptr) return;
  // Destructors must not throw: a failed free at teardown is ignored (the context is going away).
  if (cudaSetDevice(device) == cudaSuccess) (void)cudaFree(ptr);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

void copy_host_to_device(void* dst, const void* src, size_t bytes, int device) {
  MOE_CUDA_CHECK(cudaSetDevice(device));
  MOE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void copy_device_to_host(void* dst, const void* src, size_t bytes, int device) {
  MOE_CUDA_CHECK(cudaSetDevice(device));
  MOE_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

}  // namespace moeforge::cuda
