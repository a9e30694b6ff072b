#include "parallel/comm_checks.h"

#include <fmt/format.h>

#include <numeric>
#include <vector>

#include "runtime/op_checks.h"

namespace moeforge::comm_detail {
namespace {

using ops::detail::NamedTensor;

std::string op_on(const Comm& comm, std::string_view op) { return fmt::format("{} on group {}", op, comm.name()); }

// The shape (rows, trailing dims of like).
Shape with_rows(const Tensor& like, int64_t rows) {
  std::vector<int64_t> dims(like.shape().dims().begin(), like.shape().dims().end());
  dims.at(0) = rows;
  return Shape(std::span<const int64_t>(dims));
}

bool overlap(const Tensor& a, const Tensor& b) {
  const auto* pa = static_cast<const char*>(a.raw_data());
  const auto* pb = static_cast<const char*>(b.raw_data());
  return a.nbytes() && b.nbytes() && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

void check_pair(const Comm& comm, std::string_view op, const Tensor& in, const Tensor& out) {
  const std::string name = op_on(comm, op);
  check_dtype(comm, op, "in", in);
  ops::detail::check_dtype(name, {"out", out}, in.dtype());
  ops::detail::check_same_device(name, {{"in", in}, {"out", out}});
  MOE_CHECK(in.ndim() >= 1, "{}: in must have at least 1 dim, got shape {}", name, in.shape().str());
}

void check_counts(const Comm& comm, std::string_view op, std::string_view what, std::span<const int64_t> rows) {
  MOE_CHECK(static_cast<int>(rows.size()) == comm.size(), "{}: {} has {} entries, expected one per member ({})",
            op_on(comm, op), what, rows.size(), comm.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    MOE_CHECK(rows[r] >= 0, "{}: {}[{}] is {}, expected a row count >= 0", op_on(comm, op), what, r, rows[r]);
  }
}

}  // namespace

void check_dtype(const Comm& comm, std::string_view op, std::string_view arg, const Tensor& t) {
  MOE_CHECK(t.defined(), "{}: {} is undefined", op_on(comm, op), arg);
  const DType d = t.dtype();
  MOE_CHECK(d == DType::kF32 || d == DType::kBF16 || d == DType::kI32 || d == DType::kI64,
            "{}: {} must be f32, bf16, i32 or i64, got {}",
            op_on(comm, op), arg, t.str());
}

void check_reduce_scatter(const Comm& comm, const Tensor& in, const Tensor& out) {
  check_pair(comm, "reduce_scatter", in, out);
  const std::string name = op_on(comm, "reduce_scatter");
  ops::detail::check_ndim(name, {"out", out}, in.ndim());
  ops::detail::check_shape(name, {"in", in}, with_rows(out, comm.size() * out.dim(0)), {"out", out});
  MOE_CHECK(!overlap(in, out), "{}: in {} and out {} overlap in memory", name, in.str(), out.str());
}

void check_all_gather(const Comm& comm, const Tensor& in, const Tensor& out) {
  check_pair(comm, "all_gather", in, out);
  const std::string name = op_on(comm, "all_gather");
  ops::detail::check_shape(name, {"out", out}, with_rows(in, comm.size() * in.dim(0)), {"in", in});
  MOE_CHECK(!overlap(in, out) || is_own_block(comm, in, out),
            "{}: in {} overlaps out {} without being out's row block {} (this member's)", name, in.str(), out.str(),
            comm.rank());
}

void check_all_to_all_v(const Comm& comm, const Tensor& in, std::span<const int64_t> send_rows, const Tensor& out,
                        std::span<const int64_t> recv_rows) {
  check_pair(comm, "all_to_all_v", in, out);
  const std::string name = op_on(comm, "all_to_all_v");
  check_counts(comm, "all_to_all_v", "send_rows", send_rows);
  check_counts(comm, "all_to_all_v", "recv_rows", recv_rows);
  const int64_t sent = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
  const int64_t received = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  MOE_CHECK(in.dim(0) == sent, "{}: send_rows sum to {} but in has shape {}; expected {} rows", name, sent,
            in.shape().str(), sent);
  ops::detail::check_shape(name, {"out", out}, with_rows(in, received), {"in", in});
  const int me = comm.rank();
  MOE_CHECK(send_rows[me] == recv_rows[me], "{}: this member (rank {}) sends itself {} rows but expects {}", name, me,
            send_rows[me], recv_rows[me]);
  MOE_CHECK(!overlap(in, out), "{}: in {} and out {} overlap in memory", name, in.str(), out.str());
}

void check_member(const Comm& comm, std::string_view op, std::string_view what, int member, bool other_than_self) {
  MOE_CHECK(member >= 0 && member < comm.size(), "{}: {} {} is not a member; the group has ranks 0..{}",
            op_on(comm, op), what, member, comm.size() - 1);
  MOE_CHECK(!other_than_self || member != comm.rank(), "{}: {} {} is this member itself", op_on(comm, op), what,
            member);
}

int64_t row_numel(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.ndim(); ++i) n *= t.dim(i);
  return n;
}

bool is_own_block(const Comm& comm, const Tensor& in, const Tensor& out) {
  const int64_t block_bytes = static_cast<int64_t>(in.nbytes());
  return static_cast<const char*>(in.raw_data()) ==
         static_cast<const char*>(out.raw_data()) + comm.rank() * block_bytes;
}

}  // namespace moeforge::comm_detail
