// SelfComm: a group of one member. Every collective is a copy or a no-op, on any device, so
// model code runs unchanged without MPI (unit tests, ProcessGrid::single()) and a group of size 1
// in a parallel run costs nothing. Arguments are checked exactly as MpiComm checks them.
//
// send/recv have no peer in a group of one and fail with a clear error. Calls are counted like
// any Comm's; bytes_sent() stays 0 since nothing leaves the process.
#pragma once

#include "parallel/comm.h"

namespace moeforge {

class SelfComm final : public Comm {
 public:
  // world_rank: this process's rank in the world, for messages and world_ranks().
  SelfComm(std::string name, int world_rank);

  int rank() const override { return 0; }
  int size() const override { return 1; }
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
  void wait_sends() override {}
  void barrier() override;

  int64_t calls() const override { return calls_; }
  int64_t bytes_sent() const override { return 0; }

 private:
  std::string name_;
  std::vector<int> world_ranks_;
  int64_t calls_ = 0;
};

}  // namespace moeforge
