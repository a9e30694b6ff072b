// NcclComm: a Comm whose CUDA tensors move over NCCL, next to an MpiComm of the same group for CPU
// tensors (so one Comm serves both, chosen per call by the tensor's device: model code never asks
// which backend it has).
//
// Setup (collective over the MPI group): rank 0 creates the NCCL unique id, MPI broadcasts it, and
// every member joins one NCCL communicator for this group on its CUDA device.
//
// Streams, no host synchronisation: each NCCL call waits (on the device) for the work already
// queued on the device's compute stream (runtime/cuda/device.h), runs on this group's own
// communication stream, and the compute stream waits (on the device) for it to finish before
// anything issued later. Grouped calls (ncclGroupStart/End) carry all_to_all_v's sends and
// receives.
//
// Deadlines: a call returns once it is queued, so the blocking-call watchdog cannot time it.
// Each call records an event instead; a monitor thread polls the oldest unfinished call every
// kPollInterval and, past parallel.collective_timeout_s, aborts the NCCL communicator
// (ncclCommAbort, which frees the peers' kernels from waiting on it) and then the job through
// Watchdog::abort, with one message naming the group, the call and its sequence number. CPU
// tensors keep the MpiComm's watchdog and diagnosis.
//
// Thread rules: as MpiComm (one calling thread per Comm). Destroy before the MpiRuntime.
#pragma once

#include <nccl.h>

#include <atomic>
#include <condition_variable>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>

#include "parallel/mpi_comm.h"
#include "runtime/cuda/device.h"

namespace moeforge {

class NcclComm final : public Comm {
 public:
  static constexpr std::chrono::milliseconds kPollInterval{10};

  // Takes ownership of `comm` (as MpiComm). device: this process's CUDA device index.
  NcclComm(MPI_Comm comm, std::string name, std::shared_ptr<Watchdog> watchdog, double timeout_s, int device);
  ~NcclComm() override;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const override { return mpi_.rank(); }
  int size() const override { return mpi_.size(); }
  const std::string& name() const override { return mpi_.name(); }
  const std::vector<int>& world_ranks() const override { return mpi_.world_ranks(); }

  void all_reduce(const Tensor& t, ReduceOp op = ReduceOp::kSum) override;
  void reduce_scatter(const Tensor& in, const Tensor& out) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void all_to_all_v(const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                    std::span<const int64_t> recv_rows) override;
  void broadcast(const Tensor& t, int root) override;
  void send(const Tensor& t, int peer, int tag = 0) override;
  void recv(const Tensor& t, int peer, int tag = 0) override;
  // NCCL sends are already asynchronous to the host (ordered on the communication stream), so a
  // CUDA isend is a send; CPU tensors use the MpiComm's non-blocking send.
  void isend(const Tensor& t, int peer, int tag) override;
  void wait_sends() override;
  void barrier() override;

  int64_t calls() const override { return mpi_.calls() + nccl_calls_; }
  int64_t bytes_sent() const override { return mpi_.bytes_sent() + nccl_bytes_sent_; }

  ncclComm_t native() const { return nccl_; }
  cudaStream_t comm_stream() const { return comm_stream_.get(); }

 private:
  struct Pending {
    int64_t seq;
    const char* op;
    int64_t bytes;
    std::chrono::steady_clock::time_point start;
    std::unique_ptr<cuda::Event> done;
  };

  // True when t is on this comm's CUDA device; false for CPU tensors (the MPI path). Any other
  // device is an error naming the op.
  bool on_device(std::string_view op, std::string_view arg, const Tensor& t) const;
  // Orders the comm stream after the compute stream; returns the stream to issue on.
  cudaStream_t begin_call();
  // Records the call's completion, makes the compute stream wait for it, and hands it to the
  // monitor.
  void end_call(const char* op, int64_t bytes, int64_t sent);
  void monitor();

  MpiComm mpi_;
  std::shared_ptr<Watchdog> watchdog_;
  double timeout_s_;
  int device_;
  ncclComm_t nccl_ = nullptr;
  cuda::Stream comm_stream_;
  cuda::Event ready_;
  int64_t nccl_calls_ = 0, nccl_bytes_sent_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> pending_;
  std::vector<std::unique_ptr<cuda::Event>> free_events_;
  bool stop_ = false;
  std::thread monitor_;
};

}  // namespace moeforge
