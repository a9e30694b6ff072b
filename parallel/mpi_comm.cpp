#include "parallel/mpi_comm.h"

#include <algorithm>
#include <climits>
#include <numeric>

#include "parallel/comm_checks.h"
#include "parallel/mpi_check.h"
#include "runtime/ops.h"

namespace moeforge {
namespace {

using namespace comm_detail;

// Elements per MPI call when a buffer is split to stay within MPI's int counts.
constexpr int64_t kMaxChunk = int64_t{1} << 30;
constexpr int kP2PTag = 0;

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kBF16: return MPI_UINT16_T;  // moved as bits; reductions widen to f32 first
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    default: break;
  }
  MOE_THROW("MpiComm: no MPI datatype for {}", dtype_name(dtype));
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::kSum ? MPI_SUM : MPI_MAX; }

// Keeps the call's record open for exactly the duration of the MPI call, also when it throws.
class CallScope {
 public:
  CallScope(CallLog& log, CommOp op, int64_t bytes, int peer = -1) : log_(log) { log_.begin(op, bytes, peer); }
  ~CallScope() { log_.end(); }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  CallLog& log_;
};

// A committed datatype of one row of `row_numel` elements, freed with the scope.
class RowType {
 public:
  RowType(int row_numel, MPI_Datatype base) {
    MOE_MPI_CHECK(MPI_Type_contiguous(row_numel, base, &type_));
    MOE_MPI_CHECK(MPI_Type_commit(&type_));
  }
  ~RowType() { MPI_Type_free(&type_); }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// Runs fn(pointer, count) over consecutive chunks of at most kMaxChunk elements.
template <class Fn>
void for_each_chunk(const Tensor& t, Fn&& fn) {
  auto* p = static_cast<char*>(t.raw_data());
  const int64_t n = t.numel();
  const size_t elem = dtype_size(t.dtype());
  for (int64_t off = 0; off < n; off += kMaxChunk) {
    fn(p + off * elem, static_cast<int>(std::min(kMaxChunk, n - off)));
  }
}

}  // namespace

MpiComm::MpiComm(MPI_Comm comm, std::string name, std::shared_ptr<Watchdog> watchdog, double timeout_s)
    : comm_(comm), name_(std::move(name)), watchdog_(std::move(watchdog)) {
  try {
    MOE_CHECK(timeout_s > 0, "group {}: parallel.collective_timeout_s must be > 0 seconds, got {}", name_, timeout_s);
    MOE_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MOE_MPI_CHECK(MPI_Comm_size(comm_, &size_));
    MPI_Group group = MPI_GROUP_NULL, world = MPI_GROUP_NULL;
    MOE_MPI_CHECK(MPI_Comm_group(comm_, &group));
    MOE_MPI_CHECK(MPI_Comm_group(MPI_COMM_WORLD, &world));
    std::vector<int> ranks(size_);
    std::iota(ranks.begin(), ranks.end(), 0);
    world_ranks_.resize(size_);
    MOE_MPI_CHECK(MPI_Group_translate_ranks(group, size_, ranks.data(), world, world_ranks_.data()));
    MOE_MPI_CHECK(MPI_Group_free(&group));
    MOE_MPI_CHECK(MPI_Group_free(&world));
    // Two live groups may have the same name and members (a second grid): the id comes from the
    // first member's world rank and its own counter, shared with the others.
    uint64_t id = 0;
    if (rank_ == 0) id = (static_cast<uint64_t>(world_ranks_[0]) << 32) | watchdog_->next_group_serial();
    MOE_MPI_CHECK(MPI_Bcast(&id, 1, MPI_UINT64_T, 0, comm_));
    log_ = watchdog_->track(GroupInfo{name_, world_ranks_, rank_, id, timeout_s});
  } catch (...) {
    MPI_Comm_free(&comm_);
    throw;
  }
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

void MpiComm::check_cpu(std::string_view op, std::string_view arg, const Tensor& t) const {
  MOE_CHECK(t.device().is_cpu(), "{} on group {}: {} is {}; the MPI backend moves CPU tensors only", op, name_, arg,
            t.str());
}

int MpiComm::to_int(std::string_view op, std::string_view what, int64_t n) const {
  MOE_CHECK(n <= INT_MAX, "{} on group {}: {} is {}, more than MPI's int count ({}); split the call", op, name_, what,
            n, INT_MAX);
  return static_cast<int>(n);
}

void MpiComm::count_sent(int64_t bytes) {
  if (size_ > 1) bytes_sent_ += bytes;
}

void MpiComm::all_reduce(const Tensor& t, ReduceOp op) {
  check_dtype(*this, "all_reduce", "t", t);
  check_cpu("all_reduce", "t", t);
  if (t.dtype() == DType::kBF16) {  // reduced in f32 and rounded once, whatever the member count
    const Tensor wide = t.to(DType::kF32);
    all_reduce(wide, op);
    ops::cast(wide, t);
    return;
  }
  const MPI_Datatype type = mpi_type(t.dtype());
  CallScope scope(*log_, CommOp::kAllReduce, t.nbytes());
  for_each_chunk(t, [&](char* p, int n) { MOE_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p, n, type, mpi_op(op), comm_)); });
  count_sent(t.nbytes());
}

void MpiComm::reduce_scatter(const Tensor& in, const Tensor& out) {
  check_reduce_scatter(*this, in, out);
  check_cpu("reduce_scatter", "in", in);
  if (in.dtype() == DType::kBF16) {  // reduced in f32 and rounded once
    const Tensor wide_out = Tensor::empty(out.shape(), DType::kF32);
    reduce_scatter(in.to(DType::kF32), wide_out);
    ops::cast(wide_out, out);
    return;
  }
  const int count = to_int("reduce_scatter", "the element count of out", out.numel());
  CallScope scope(*log_, CommOp::kReduceScatter, in.nbytes());
  MOE_MPI_CHECK(MPI_Reduce_scatter_block(in.raw_data(), out.raw_data(), count, mpi_type(in.dtype()), MPI_SUM, comm_));
  count_sent(in.nbytes());
}

void MpiComm::all_gather(const Tensor& in, const Tensor& out) {
  check_all_gather(*this, in, out);
  check_cpu("all_gather", "in", in);
  const int count = to_int("all_gather", "the element count of in", in.numel());
  const MPI_Datatype type = mpi_type(in.dtype());
  // Gathering in place: in is already this member's block of out.
  const void* send = is_own_block(*this, in, out) ? MPI_IN_PLACE : in.raw_data();
  CallScope scope(*log_, CommOp::kAllGather, in.nbytes());
  MOE_MPI_CHECK(MPI_Allgather(send, count, type, out.raw_data(), count, type, comm_));
  count_sent(in.nbytes());
}

void MpiComm::all_to_all_v(const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                           std::span<const int64_t> recv_rows) {
  check_all_to_all_v(*this, in, send_rows, out, recv_rows);
  check_cpu("all_to_all_v", "in", in);
  // Counts and displacements are in rows of one derived datatype, so only row counts must fit
  // MPI's int, not element counts.
  std::vector<int> send_counts(size_), send_displs(size_), recv_counts(size_), recv_displs(size_);
  int64_t send_at = 0, recv_at = 0, sent_to_others = 0;
  for (int r = 0; r < size_; ++r) {
    send_displs[r] = to_int("all_to_all_v", "a send row offset", send_at);
    recv_displs[r] = to_int("all_to_all_v", "a receive row offset", recv_at);
    send_counts[r] = static_cast<int>(send_rows[r]);  // <= in's rows, checked below via offsets
    recv_counts[r] = static_cast<int>(recv_rows[r]);
    send_at += send_rows[r];
    recv_at += recv_rows[r];
    if (r != rank_) sent_to_others += send_rows[r];
  }
  to_int("all_to_all_v", "the row count of in", send_at);
  to_int("all_to_all_v", "the row count of out", recv_at);
  const RowType row(to_int("all_to_all_v", "the element count of a row", row_numel(in)), mpi_type(in.dtype()));
  CallScope scope(*log_, CommOp::kAllToAllV, in.nbytes());
  MOE_MPI_CHECK(MPI_Alltoallv(in.raw_data(), send_counts.data(), send_displs.data(), row.get(), out.raw_data(),
                              recv_counts.data(), recv_displs.data(), row.get(), comm_));
  count_sent(sent_to_others * row_numel(in) * static_cast<int64_t>(dtype_size(in.dtype())));
}

void MpiComm::broadcast(const Tensor& t, int root) {
  check_dtype(*this, "broadcast", "t", t);
  check_member(*this, "broadcast", "root", root, false);
  check_cpu("broadcast", "t", t);
  const MPI_Datatype type = mpi_type(t.dtype());
  CallScope scope(*log_, CommOp::kBroadcast, t.nbytes());
  for_each_chunk(t, [&](char* p, int n) { MOE_MPI_CHECK(MPI_Bcast(p, n, type, root, comm_)); });
  if (rank_ == root) count_sent(t.nbytes());
}

void MpiComm::check_tag(std::string_view op, int tag) const {
  int* ub = nullptr;
  int found = 0;
  MOE_MPI_CHECK(MPI_Comm_get_attr(comm_, MPI_TAG_UB, &ub, &found));
  const int limit = found && ub ? *ub : 32767;
  MOE_CHECK(tag >= 0 && tag <= limit, "{} on group {}: tag {} is outside MPI's [0, {}]", op, name_, tag, limit);
}

void MpiComm::send(const Tensor& t, int peer, int tag) {
  check_dtype(*this, "send", "t", t);
  check_member(*this, "send", "peer", peer, true);
  check_cpu("send", "t", t);
  check_tag("send", tag);
  const MPI_Datatype type = mpi_type(t.dtype());
  CallScope scope(*log_, CommOp::kSend, t.nbytes(), peer);
  for_each_chunk(t, [&](char* p, int n) { MOE_MPI_CHECK(MPI_Send(p, n, type, peer, kP2PTag + tag, comm_)); });
  count_sent(t.nbytes());
}

void MpiComm::isend(const Tensor& t, int peer, int tag) {
  check_dtype(*this, "isend", "t", t);
  check_member(*this, "isend", "peer", peer, true);
  check_cpu("isend", "t", t);
  check_tag("isend", tag);
  const MPI_Datatype type = mpi_type(t.dtype());
  PendingSend s{{}, t, peer};
  for_each_chunk(t, [&](char* p, int n) {
    s.requests.push_back(MPI_REQUEST_NULL);
    MOE_MPI_CHECK(MPI_Isend(p, n, type, peer, kP2PTag + tag, comm_, &s.requests.back()));
  });
  pending_.push_back(std::move(s));
  count_sent(t.nbytes());
}

void MpiComm::wait_sends() {
  // One logged send per started one, so a receiver that never comes shows up in the watchdog's
  // diagnosis as "send #n to world rank r".
  for (PendingSend& s : pending_) {
    CallScope scope(*log_, CommOp::kSend, s.t.nbytes(), s.peer);
    MOE_MPI_CHECK(MPI_Waitall(static_cast<int>(s.requests.size()), s.requests.data(), MPI_STATUSES_IGNORE));
  }
  pending_.clear();
}

void MpiComm::recv(const Tensor& t, int peer, int tag) {
  check_dtype(*this, "recv", "t", t);
  check_member(*this, "recv", "peer", peer, true);
  check_cpu("recv", "t", t);
  check_tag("recv", tag);
  const MPI_Datatype type = mpi_type(t.dtype());
  CallScope scope(*log_, CommOp::kRecv, t.nbytes(), peer);
  for_each_chunk(t, [&](char* p, int n) {
    MPI_Status status;
    MOE_MPI_CHECK(MPI_Recv(p, n, type, peer, kP2PTag + tag, comm_, &status));
    int got = 0;
    MOE_MPI_CHECK(MPI_Get_count(&status, type, &got));
    // A longer message fails inside MPI (truncation); a shorter one must not pass silently.
    MOE_CHECK(got == n, "recv on group {}: expected {} elements from group rank {} (world rank {}) for {}, got {}",
              name_, n, peer, world_ranks_[peer], t.str(), got);
  });
}

void MpiComm::barrier() {
  CallScope scope(*log_, CommOp::kBarrier, 0);
  MOE_MPI_CHECK(MPI_Barrier(comm_));
}

}  // namespace moeforge
