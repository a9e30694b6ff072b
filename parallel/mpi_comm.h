// MpiComm: a Comm over an MPI communicator, for CPU tensors (f32, i32, i64).
//
// Each call checks its arguments (parallel/comm_checks.h), opens a record in the group's CallLog,
// makes the blocking MPI call and closes the record; the watchdog (parallel/watchdog.h) holds the
// record to the group's deadline from its own thread. Counts beyond MPI's int range: all_reduce,
// broadcast, send and recv split the buffer into several MPI calls; all_to_all_v counts rows
// (one MPI datatype per row); reduce_scatter and all_gather reject blocks of more than INT_MAX
// elements with a clear error.
//
// Thread rules: one thread at a time calls a given MpiComm (MPI_THREAD_MULTIPLE is for the
// watchdog, not for sharing a Comm). Destroy every MpiComm before the MpiRuntime.
#pragma once

#include <mpi.h>

#include <memory>
#include <vector>

#include "parallel/call_log.h"
#include "parallel/comm.h"
#include "parallel/watchdog.h"

namespace moeforge {

class MpiComm final : public Comm {
 public:
  // Takes ownership of `comm` (freed on destruction), which must return errors
  // (MPI_ERRORS_RETURN: inherited by every split of MPI_COMM_WORLD under MpiRuntime). Collective
  // over `comm`: the members agree on the group's id for the watchdog. timeout_s: deadline of
  // every blocking call (parallel.collective_timeout_s), > 0.
  MpiComm(MPI_Comm comm, std::string name, std::shared_ptr<Watchdog> watchdog, double timeout_s);
  ~MpiComm() override;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  const std::vector<int>& world_ranks() const override { return world_ranks_; }

  void all_reduce(const Tensor& t, ReduceOp op = ReduceOp::kSum) override;
  void reduce_scatter(const Tensor& in, const Tensor& out) override;
  void all_gather(const Tensor& in, const Tensor& out) override;
  void all_to_all_v(const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                    std::span<const int64_t> recv_rows) override;
  void broadcast(const Tensor& t, int root) override;
  void send(const Tensor& t, int peer, int tag = 0) override;
  void recv(const Tensor& t, int peer, int tag = 0) override;
  void isend(const Tensor& t, int peer, int tag) override;
  void wait_sends() override;
  void barrier() override;

  int64_t calls() const override { return log_->calls(); }
  int64_t bytes_sent() const override { return bytes_sent_; }

  // The underlying communicator (benchmarks compare against raw MPI on it).
  MPI_Comm native() const { return comm_; }
  // Recent calls, oldest first.
  CallLogSnapshot log() const { return log_->snapshot(); }

 private:
  void check_cpu(std::string_view op, std::string_view arg, const Tensor& t) const;
  int to_int(std::string_view op, std::string_view what, int64_t n) const;
  void count_sent(int64_t bytes);
  void check_tag(std::string_view op, int tag) const;

  // Started non-blocking sends: the requests of each chunk, the tensor they read, the peer.
  struct PendingSend {
    std::vector<MPI_Request> requests;
    Tensor t;
    int peer = 0;
  };
  std::vector<PendingSend> pending_;

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  std::vector<int> world_ranks_;
  int rank_ = 0, size_ = 1;
  std::shared_ptr<Watchdog> watchdog_;
  std::shared_ptr<CallLog> log_;
  int64_t bytes_sent_ = 0;
};

}  // namespace moeforge
