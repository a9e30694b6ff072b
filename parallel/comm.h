// Comm: one communication group (TP, DP, PP, EP, expert-DP, or the whole world) and the
// training-level collectives on tensors. Backends: MPI (CPU tensors, parallel/mpi_comm.h) and,
// with the CUDA backend, NCCL behind the same interface. A group of size 1 is a valid Comm whose
// collectives are copies or no-ops, so model code never branches on "is this parallel".
//
// Collective rules (every backend):
//  - Every member calls the same collectives in the same order with matching sizes. Each call
//    gets the next sequence number of this Comm; a short record of recent calls (sequence
//    number, op, bytes, when) is kept for diagnosis.
//  - Every blocking call has a deadline (parallel.collective_timeout_s). Past it the watchdog
//    asks the group's members where they are, prints one message naming the collective, the
//    group, the ranks that did not arrive and where their call sequence diverged, and aborts the
//    whole job (no rank is left hanging).
//  - Tensors are contiguous; "along dim 0" means in row blocks of equal size, ordered by rank.
//  - Bytes moved per call are counted per Comm (bytes_sent()) so the planner can be checked.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace moeforge {

enum class ReduceOp : uint8_t { kSum, kMax };

class Comm {
 public:
  virtual ~Comm() = default;

  // Rank within this group, group size, and the group's name for messages ("tp", "dp", ...).
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;
  // World ranks of this group's members, in group-rank order.
  virtual const std::vector<int>& world_ranks() const = 0;

  // In place: t = op over members of t (f32, i32 or i64 for kSum/kMax; f64 not used).
  virtual void all_reduce(const Tensor& t, ReduceOp op = ReduceOp::kSum) = 0;
  // in: (size * n, ...) ; out: (n, ...) = sum over members of in's row block `rank`.
  virtual void reduce_scatter(const Tensor& in, const Tensor& out) = 0;
  // in: (n, ...) ; out: (size * n, ...) with member r's `in` at row block r.
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  // Variable all-to-all along dim 0: send_rows[r] rows of `in` (consecutive, in rank order) go to
  // member r; recv_rows[r] rows from member r land consecutively in `out`, in rank order.
  virtual void all_to_all_v(const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                            std::span<const int64_t> recv_rows) = 0;
  virtual void broadcast(const Tensor& t, int root) = 0;
  // Point to point. A recv matches the sends from that peer with the same tag, in send order.
  virtual void send(const Tensor& t, int peer, int tag = 0) = 0;
  virtual void recv(const Tensor& t, int peer, int tag = 0) = 0;
  // Non-blocking send (the pipeline's activations and gradients): returns at once; t must stay
  // unchanged until wait_sends(), which completes every send this member started, in order.
  virtual void isend(const Tensor& t, int peer, int tag) = 0;
  virtual void wait_sends() = 0;
  virtual void barrier() = 0;

  // Collectives issued so far (the last sequence number; send/recv are numbered per peer, so a
  // pipeline's uneven sends do not look like diverged collectives, and are not counted here), and
  // the payload bytes this member put into calls on a group of more than one member: the input of
  // all_reduce, reduce_scatter and all_gather, the rows all_to_all_v sends to other members, t on
  // broadcast's root, t of send. (What an MPI algorithm moves on the wire depends on it.)
  virtual int64_t calls() const = 0;
  virtual int64_t bytes_sent() const = 0;
};

}  // namespace moeforge
