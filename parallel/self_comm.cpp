#include "parallel/self_comm.h"

#include "parallel/comm_checks.h"
#include "runtime/ops.h"

namespace moeforge {

using namespace comm_detail;

SelfComm::SelfComm(std::string name, int world_rank) : name_(std::move(name)), world_ranks_{world_rank} {}

void SelfComm::all_reduce(const Tensor& t, ReduceOp) {
  check_dtype(*this, "all_reduce", "t", t);
  ++calls_;
}

void SelfComm::reduce_scatter(const Tensor& in, const Tensor& out) {
  check_reduce_scatter(*this, in, out);
  ops::copy(in, out);
  ++calls_;
}

void SelfComm::all_gather(const Tensor& in, const Tensor& out) {
  check_all_gather(*this, in, out);
  if (!is_own_block(*this, in, out)) ops::copy(in, out);
  ++calls_;
}

void SelfComm::all_to_all_v(const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                            std::span<const int64_t> recv_rows) {
  check_all_to_all_v(*this, in, send_rows, out, recv_rows);
  ops::copy(in, out);
  ++calls_;
}

void SelfComm::broadcast(const Tensor& t, int root) {
  check_dtype(*this, "broadcast", "t", t);
  check_member(*this, "broadcast", "root", root, false);
  ++calls_;
}

void SelfComm::send(const Tensor& t, int peer, int /*tag*/) {
  check_dtype(*this, "send", "t", t);
  check_member(*this, "send", "peer", peer, true);
}

void SelfComm::isend(const Tensor& t, int peer, int /*tag*/) {
  check_dtype(*this, "isend", "t", t);
  check_member(*this, "isend", "peer", peer, true);
}

void SelfComm::recv(const Tensor& t, int peer, int /*tag*/) {
  check_dtype(*this, "recv", "t", t);
  check_member(*this, "recv", "peer", peer, true);
}

void SelfComm::barrier() { ++calls_; }

}  // namespace moeforge
