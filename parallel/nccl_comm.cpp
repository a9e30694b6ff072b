#include "parallel/nccl_comm.h"

#include <fmt/format.h>

#include "parallel/comm_checks.h"
#include "parallel/mpi_check.h"
#include "runtime/cuda/cuda_check.h"

#define MOE_NCCL_CHECK(stmt)                                                                               \
  do {                                                                                                     \
    const ncclResult_t moe_nccl_rc_ = (stmt);                                                              \
    MOE_CHECK(moe_nccl_rc_ == ncclSuccess, "NCCL error {} in `{}`", ncclGetErrorString(moe_nccl_rc_), #stmt); \
  } while (0)

namespace moeforge {
namespace {

using namespace comm_detail;

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return ncclFloat32;
    case DType::kBF16: return ncclBfloat16;
    case DType::kF16: return ncclFloat16;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
  }
  MOE_THROW("NcclComm: no NCCL datatype for {}", dtype_name(dtype));
}

size_t count_of(const Tensor& t) { return static_cast<size_t>(t.numel()); }

}  // namespace

NcclComm::NcclComm(MPI_Comm comm, std::string name, std::shared_ptr<Watchdog> watchdog, double timeout_s, int device)
    : mpi_(comm, std::move(name), watchdog, timeout_s),
      watchdog_(std::move(watchdog)),
      timeout_s_(timeout_s),
      device_(device),
      comm_stream_(device),
      ready_() {
  ncclUniqueId id{};
  if (mpi_.rank() == 0) MOE_NCCL_CHECK(ncclGetUniqueId(&id));
  MOE_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, mpi_.native()));
  cuda::context(device_);  // makes the device current for the communicator
  MOE_NCCL_CHECK(ncclCommInitRank(&nccl_, mpi_.size(), id, mpi_.rank()));
  monitor_ = std::thread([this] { monitor(); });
}

NcclComm::~NcclComm() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (monitor_.joinable()) monitor_.join();
  if (nccl_) {
    // Calls still in flight finish first (destroying a communicator under a running kernel is
    // undefined); a stuck one is the monitor's business and has aborted the job already.
    (void)cudaStreamSynchronize(comm_stream_.get());
    (void)ncclCommDestroy(nccl_);
  }
}

bool NcclComm::on_device(std::string_view op, std::string_view arg, const Tensor& t) const {
  if (t.device().is_cpu()) return false;
  MOE_CHECK(t.device() == Device::cuda(device_), "{} on group {}: {} is {}, but this group's NCCL communicator is on cuda:{}",
            op, name(), arg, t.str(), device_);
  return true;
}

cudaStream_t NcclComm::begin_call() {
  const cudaStream_t compute = cuda::stream(device_);
  ready_.record(compute);
  ready_.wait(comm_stream_.get());
  return comm_stream_.get();
}

void NcclComm::end_call(const char* op, int64_t bytes, int64_t sent) {
  std::unique_ptr<cuda::Event> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!free_events_.empty()) {
      done = std::move(free_events_.back());
      free_events_.pop_back();
    }
  }
  if (!done) done = std::make_unique<cuda::Event>();
  done->record(comm_stream_.get());
  done->wait(cuda::stream(device_));
  ++nccl_calls_;
  if (size() > 1) nccl_bytes_sent_ += sent;
  {
    std::lock_guard<std::mutex> lock(mu_);
    pending_.push_back({nccl_calls_, op, bytes, std::chrono::steady_clock::now(), std::move(done)});
  }
  cv_.notify_all();
}

void NcclComm::monitor() {
  try {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (pending_.empty()) {
        cv_.wait(lock, [this] { return stop_ || !pending_.empty(); });
        continue;
      }
      Pending& oldest = pending_.front();
      if (oldest.done->done()) {
        free_events_.push_back(std::move(oldest.done));
        pending_.pop_front();
        continue;
      }
      const double age = std::chrono::duration<double>(std::chrono::steady_clock::now() - oldest.start).count();
      if (age > timeout_s_) {
        const std::string message = fmt::format(
            "NCCL {} #{} ({} bytes) on group {} (world ranks {}) did not complete within "
            "parallel.collective_timeout_s={} s; a member is dead, stuck or called a different collective. "
            "Aborting the NCCL communicator and the job",
            oldest.op, oldest.seq, oldest.bytes, name(), fmt::join(world_ranks(), ","), timeout_s_);
        lock.unlock();
        (void)ncclCommAbort(nccl_);
        watchdog_->abort(Watchdog::kTimeoutExitCode, message);
      }
      cv_.wait_for(lock, kPollInterval);
    }
  } catch (const std::exception& e) {
    watchdog_->abort(1, fmt::format("NCCL monitor of group {} failed: {}", name(), e.what()));
  }
}

void NcclComm::all_reduce(const Tensor& t, ReduceOp op) {
  if (!on_device("all_reduce", "t", t)) return mpi_.all_reduce(t, op);
  check_dtype(*this, "all_reduce", "t", t);
  const cudaStream_t s = begin_call();
  MOE_NCCL_CHECK(ncclAllReduce(t.raw_data(), t.raw_data(), count_of(t), nccl_type(t.dtype()),
                               op == ReduceOp::kSum ? ncclSum : ncclMax, nccl_, s));
  end_call("all_reduce", t.nbytes(), t.nbytes());
}

void NcclComm::reduce_scatter(const Tensor& in, const Tensor& out) {
  if (!on_device("reduce_scatter", "in", in)) return mpi_.reduce_scatter(in, out);
  check_reduce_scatter(*this, in, out);
  const cudaStream_t s = begin_call();
  MOE_NCCL_CHECK(ncclReduceScatter(in.raw_data(), out.raw_data(), count_of(out), nccl_type(in.dtype()), ncclSum, nccl_, s));
  end_call("reduce_scatter", in.nbytes(), in.nbytes());
}

void NcclComm::all_gather(const Tensor& in, const Tensor& out) {
  if (!on_device("all_gather", "in", in)) return mpi_.all_gather(in, out);
  check_all_gather(*this, in, out);
  // In place (in is out's own block) is NCCL's in-place all-gather, with the same pointers.
  const cudaStream_t s = begin_call();
  MOE_NCCL_CHECK(ncclAllGather(in.raw_data(), out.raw_data(), count_of(in), nccl_type(in.dtype()), nccl_, s));
  end_call("all_gather", in.nbytes(), in.nbytes());
}

void NcclComm::all_to_all_v(const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                            std::span<const int64_t> recv_rows) {
  if (!on_device("all_to_all_v", "in", in)) return mpi_.all_to_all_v(in, send_rows, out, recv_rows);
  check_all_to_all_v(*this, in, send_rows, out, recv_rows);
  const size_t row_bytes = static_cast<size_t>(row_numel(in)) * dtype_size(in.dtype());
  const auto* src = static_cast<const char*>(in.raw_data());
  auto* dst = static_cast<char*>(out.raw_data());
  const cudaStream_t s = begin_call();
  int64_t sent_to_others = 0;
  // Bytes as ncclChar: any dtype, and row counts need not fit NCCL's element type.
  MOE_NCCL_CHECK(ncclGroupStart());
  size_t send_at = 0, recv_at = 0;
  for (int r = 0; r < size(); ++r) {
    const size_t send_bytes = static_cast<size_t>(send_rows[r]) * row_bytes;
    const size_t recv_bytes = static_cast<size_t>(recv_rows[r]) * row_bytes;
    if (send_bytes) MOE_NCCL_CHECK(ncclSend(src + send_at, send_bytes, ncclChar, r, nccl_, s));
    if (recv_bytes) MOE_NCCL_CHECK(ncclRecv(dst + recv_at, recv_bytes, ncclChar, r, nccl_, s));
    if (r != rank()) sent_to_others += static_cast<int64_t>(send_bytes);
    send_at += send_bytes;
    recv_at += recv_bytes;
  }
  MOE_NCCL_CHECK(ncclGroupEnd());
  end_call("all_to_all_v", in.nbytes(), sent_to_others);
}

void NcclComm::broadcast(const Tensor& t, int root) {
  if (!on_device("broadcast", "t", t)) return mpi_.broadcast(t, root);
  check_dtype(*this, "broadcast", "t", t);
  check_member(*this, "broadcast", "root", root, false);
  const cudaStream_t s = begin_call();
  MOE_NCCL_CHECK(ncclBroadcast(t.raw_data(), t.raw_data(), count_of(t), nccl_type(t.dtype()), root, nccl_, s));
  end_call("broadcast", t.nbytes(), rank() == root ? t.nbytes() : 0);
}

void NcclComm::send(const Tensor& t, int peer, int tag) {
  if (!on_device("send", "t", t)) return mpi_.send(t, peer, tag);
  check_dtype(*this, "send", "t", t);
  check_member(*this, "send", "peer", peer, true);
  const cudaStream_t s = begin_call();
  MOE_NCCL_CHECK(ncclSend(t.raw_data(), count_of(t), nccl_type(t.dtype()), peer, nccl_, s));
  end_call("send", t.nbytes(), t.nbytes());
}

void NcclComm::recv(const Tensor& t, int peer, int tag) {
  if (!on_device("recv", "t", t)) return mpi_.recv(t, peer, tag);
  check_dtype(*this, "recv", "t", t);
  check_member(*this, "recv", "peer", peer, true);
  const cudaStream_t s = begin_call();
  MOE_NCCL_CHECK(ncclRecv(t.raw_data(), count_of(t), nccl_type(t.dtype()), peer, nccl_, s));
  end_call("recv", t.nbytes(), 0);
}

void NcclComm::isend(const Tensor& t, int peer, int tag) {
  if (!on_device("isend", "t", t)) return mpi_.isend(t, peer, tag);
  send(t, peer, tag);  // NCCL matches point-to-point calls by order, not tag
}

void NcclComm::wait_sends() { mpi_.wait_sends(); }

void NcclComm::barrier() {
  // Device work of this group first, then the members meet on the host (with the MPI deadline).
  MOE_CUDA_CHECK(cudaStreamSynchronize(comm_stream_.get()));
  mpi_.barrier();
}

}  // namespace moeforge
