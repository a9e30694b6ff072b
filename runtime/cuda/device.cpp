#include "runtime/cuda/device.h"

#include <array>
#include <memory>
#include <mutex>

#include "runtime/cuda/cuda_check.h"

namespace moeforge::cuda {
namespace {

constexpr int kMaxDevices = 64;
// cuBLASLt's recommended workspace on Hopper (32 MiB also covers the older architectures' 4 MiB).
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

std::mutex g_contexts_mu;
std::array<DeviceContext*, kMaxDevices> g_contexts{};

DeviceContext* create(int device) {
  auto ctx = std::make_unique<DeviceContext>();
  ctx->device = device;
  MOE_CUDA_CHECK(cudaSetDevice(device));
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking));
  MOE_CUBLAS_CHECK(cublasLtCreate(&ctx->lt));
  MOE_CUDA_CHECK(cudaMalloc(&ctx->workspace, kWorkspaceBytes));
  ctx->workspace_bytes = kWorkspaceBytes;
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&ctx->sm_count, cudaDevAttrMultiProcessorCount, device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&ctx->cc_major, cudaDevAttrComputeCapabilityMajor, device));
  MOE_CUDA_CHECK(cudaDeviceGetAttribute(&ctx->cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  return ctx.release();  // kept for the life of the process (see device.h)
}

}  // namespace

DeviceContext& context(int device) {
  MOE_CHECK(device >= 0 && device < kMaxDevices, "cuda: device index {} out of range [0, {})", device, kMaxDevices);
  DeviceContext* ctx = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_contexts_mu);
    if (!g_contexts[device]) g_contexts[device] = create(device);
    ctx = g_contexts[device];
  }
  MOE_CUDA_CHECK(cudaSetDevice(device));
  return *ctx;
}

void synchronize(int device) { MOE_CUDA_CHECK(cudaStreamSynchronize(context(device).stream)); }

Stream::Stream(int device, int priority) {
  MOE_CUDA_CHECK(cudaSetDevice(device));
  MOE_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
}

Stream::~Stream() {
  if (stream_) (void)cudaStreamDestroy(stream_);
}

Event::Event(bool timing) {
  MOE_CUDA_CHECK(cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
}

Event::~Event() {
  if (event_) (void)cudaEventDestroy(event_);
}

void Event::record(cudaStream_t stream) { MOE_CUDA_CHECK(cudaEventRecord(event_, stream)); }

void Event::wait(cudaStream_t stream) const { MOE_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0)); }

bool Event::done() const {
  const cudaError_t s = cudaEventQuery(event_);
  if (s == cudaErrorNotReady) {
    (void)cudaGetLastError();  // not an error: clear it so the next check does not see it
    return false;
  }
  MOE_CUDA_CHECK(s);
  return true;
}

void Event::synchronize() const { MOE_CUDA_CHECK(cudaEventSynchronize(event_)); }

float Event::elapsed_ms(const Event& start) const {
  float ms = 0;
  MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
  return ms;
}

}  // namespace moeforge::cuda
