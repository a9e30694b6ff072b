#include "runtime/cuda/device_alloc.h"

#include <array>
#include <map>
#include <mutex>
#include <vector>

#include "runtime/cuda/cuda_check.h"
#include "runtime/cuda/device.h"

namespace moeforge::cuda {
namespace {

constexpr int kMaxDevices = 64;
constexpr size_t kSmallGranule = 512;
constexpr size_t kLargeGranule = size_t{2} << 20;
constexpr size_t kSmallLimit = size_t{1} << 20;

size_t round_size(size_t bytes) {
  const size_t g = bytes <= kSmallLimit ? kSmallGranule : kLargeGranule;
  return (bytes + g - 1) / g * g;
}

struct DevicePool {
  std::map<size_t, std::vector<void*>> free_blocks;  // rounded size -> cached blocks
  AllocatorStats stats;
};

std::mutex g_mu;
std::array<DevicePool, kMaxDevices> g_pools;

DevicePool& pool(int device) {
  MOE_CHECK(device >= 0 && device < kMaxDevices, "cuda: device index {} out of range [0, {})", device, kMaxDevices);
  return g_pools[device];
}

// Gives the cached blocks back; the caller holds g_mu.
void release_locked(DevicePool& p, int device) {
  if (p.free_blocks.empty()) return;
  // cudaFree waits until the device is idle, so no queued kernel still uses a block it frees.
  MOE_CUDA_CHECK(cudaSetDevice(device));
  for (auto& [size, blocks] : p.free_blocks) {
    for (void* b : blocks) MOE_CUDA_CHECK(cudaFree(b));
    p.stats.bytes_cached -= static_cast<int64_t>(size * blocks.size());
  }
  p.free_blocks.clear();
}

}  // namespace

void* device_alloc(size_t bytes, int device) {
  if (bytes == 0) return nullptr;
  context(device);  // the compute stream exists before any memory it will reuse
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(g_mu);
  DevicePool& p = pool(device);
  void* ptr = nullptr;
  auto it = p.free_blocks.find(size);
  if (it != p.free_blocks.end() && !it->second.empty()) {
    ptr = it->second.back();
    it->second.pop_back();
    p.stats.bytes_cached -= static_cast<int64_t>(size);
  } else {
    cudaError_t s = cudaMalloc(&ptr, size);
    if (s == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      release_locked(p, device);
      s = cudaMalloc(&ptr, size);
    }
    if (s != cudaSuccess) {
      (void)cudaGetLastError();
      MOE_THROW("out of memory on cuda:{} allocating {} bytes ({} in use by tensors, peak {}): {}", device, bytes,
                p.stats.bytes_in_use, p.stats.peak_in_use, cudaGetErrorString(s));
    }
    ++p.stats.cuda_mallocs;
  }
  p.stats.bytes_in_use += static_cast<int64_t>(size);
  if (p.stats.bytes_in_use > p.stats.peak_in_use) p.stats.peak_in_use = p.stats.bytes_in_use;
  return ptr;
}

void device_free(void* ptr, size_t bytes, int device) {
  if (!ptr) return;
  const size_t size = round_size(bytes);
  std::lock_guard<std::mutex> lock(g_mu);
  if (device < 0 || device >= kMaxDevices) return;  // destructors do not throw
  DevicePool& p = g_pools[device];
  p.free_blocks[size].push_back(ptr);
  p.stats.bytes_in_use -= static_cast<int64_t>(size);
  p.stats.bytes_cached += static_cast<int64_t>(size);
}

AllocatorStats allocator_stats(int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  return pool(device).stats;
}

void release_cached(int device) {
  synchronize(device);
  std::lock_guard<std::mutex> lock(g_mu);
  release_locked(pool(device), device);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

void copy_host_to_device(void* dst, const void* src, size_t bytes, int device) {
  if (bytes == 0) return;
  const cudaStream_t s = stream(device);
  MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
  // The source is pageable host memory the caller may free or change right after we return.
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
}

void copy_device_to_host(void* dst, const void* src, size_t bytes, int device) {
  if (bytes == 0) return;
  const cudaStream_t s = stream(device);
  MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
  MOE_CUDA_CHECK(cudaStreamSynchronize(s));
}

void copy_device_to_device(void* dst, const void* src, size_t bytes, int device) {
  if (bytes == 0) return;
  MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream(device)));
}

}  // namespace moeforge::cuda
