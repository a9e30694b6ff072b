// Device memory for Tensor storage and host<->device copies. The caching allocator and streams
// of the CUDA backend build on these. Every CUDA runtime call goes through MOE_CUDA_CHECK, which
// names the failing statement, the CUDA error and where it happened.
#pragma once

#include <cstddef>

namespace moeforge::cuda {

void* device_alloc(size_t bytes, int device);
void device_free(void* ptr, size_t bytes, int device);
// Number of visible CUDA devices; 0 when there is no device or no driver (never throws).
int device_count();
void copy_host_to_device(void* dst, const void* src, size_t bytes, int device);
void copy_device_to_host(void* dst, const void* src, size_t bytes, int device);

}  // namespace moeforge::cuda
