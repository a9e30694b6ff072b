// The CUDA backend's per-device state, streams and events.
//
// Every op of the catalog on a CUDA tensor runs on its device's compute stream, in issue order,
// so the host never waits for the device except where a result has to reach it (a copy to the
// host, sum_squares, a loss read back). The op signatures carry no context (runtime/ops.h), so
// the compute stream, the cuBLASLt handle and its workspace live in one DeviceContext per device,
// created on first use and kept for the life of the process: these are immutable handles, not
// mutable configuration, and destroying them at exit would race the CUDA driver's own teardown.
//
// Stream rules: kernels of the catalog launch on context(d).stream. Anything issued on another
// stream (NCCL's communication stream, a benchmark's) orders itself against the compute stream
// with events (Event::record / Event::wait), never with host synchronisation. Device memory
// freed by a Tensor is reused by later work on the compute stream (runtime/cuda/device_alloc.h),
// which is safe because that stream runs in order and other streams join it before the memory
// they use can be dropped.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace moeforge::cuda {

struct DeviceContext {
  int device = 0;
  cudaStream_t stream = nullptr;      // the compute stream (non-blocking w.r.t. the legacy stream)
  cublasLtHandle_t lt = nullptr;      // cuBLASLt handle bound to nothing; matmuls pass the stream
  void* workspace = nullptr;          // cuBLASLt workspace, used only on `stream`
  size_t workspace_bytes = 0;
  int sm_count = 0;
  int cc_major = 0, cc_minor = 0;     // compute capability
};

// The context of `device` (created on first use; thread-safe). Also makes `device` current on the
// calling thread, so the kernels launched next run there.
DeviceContext& context(int device);
inline cudaStream_t stream(int device) { return context(device).stream; }
// Waits for all work issued on the compute stream of `device`.
void synchronize(int device);

// An owned stream (for communication or benchmarks), non-blocking w.r.t. the legacy stream.
class Stream {
 public:
  explicit Stream(int device, int priority = 0);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// An owned event without timing (cheap to record), or with timing for benchmarks.
class Event {
 public:
  explicit Event(bool timing = false);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream);
  // Makes `stream` wait (on the device) for the work recorded before this event.
  void wait(cudaStream_t stream) const;
  // True once the recorded work is done (never blocks).
  bool done() const;
  void synchronize() const;
  // Milliseconds between `start` and this event (both recorded with timing).
  float elapsed_ms(const Event& start) const;

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace moeforge::cuda
