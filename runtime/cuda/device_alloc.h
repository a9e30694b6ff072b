// Device memory for Tensor storage: a caching allocator, and host <-> device copies.
//
// cudaMalloc and cudaFree synchronise the device and cost tens of microseconds, so a training
// step must not call them. Freed blocks go back to a per-device cache keyed by their rounded size
// (512 B granules up to 1 MiB, 2 MiB granules above) and the next allocation of that size takes
// one from there; a step that allocates the same shapes as the last one calls cudaMalloc zero
// times (tests/gpu/test_cuda_runtime.cpp checks this). When cudaMalloc fails, the cache is given
// back to the driver and the allocation retried once before the out-of-memory Error.
//
// Reuse is stream-ordered: a freed block is handed to later work on the device's compute stream
// (runtime/cuda/device.h), which runs after every kernel that used the block. The host copies
// below run on the compute stream and wait for it, so they see every earlier op's result.
//
// Thread-safe (one mutex per process; allocation is not on any kernel's critical path).
#pragma once

#include <cstddef>
#include <cstdint>

namespace moeforge::cuda {

void* device_alloc(size_t bytes, int device);
void device_free(void* ptr, size_t bytes, int device);

struct AllocatorStats {
  int64_t cuda_mallocs = 0;   // cudaMalloc calls so far
  int64_t bytes_in_use = 0;   // rounded bytes held by live tensors
  int64_t bytes_cached = 0;   // rounded bytes in the cache, ready for reuse
  int64_t peak_in_use = 0;
};
AllocatorStats allocator_stats(int device);
// Returns every cached block of `device` to the driver (after the device is idle).
void release_cached(int device);

// Number of visible CUDA devices; 0 when there is no device or no driver (never throws).
int device_count();

// Copies ordered on the compute stream of `device`; host copies return once the data is there.
void copy_host_to_device(void* dst, const void* src, size_t bytes, int device);
void copy_device_to_host(void* dst, const void* src, size_t bytes, int device);
void copy_device_to_device(void* dst, const void* src, size_t bytes, int device);

}  // namespace moeforge::cuda
