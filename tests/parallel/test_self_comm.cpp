// SelfComm, the group of one: collectives are copies or no-ops with values unchanged, arguments
// are checked like MpiComm's (same messages), calls are counted and nothing is sent.
#include <gtest/gtest.h>

#include "parallel/self_comm.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::random_tensor;
using testing::to_double;

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(SelfComm, IdentityOfAGroupOfOne) {
  SelfComm c("tp", 5);
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.name(), "tp");
  EXPECT_EQ(c.world_ranks(), std::vector<int>{5});
}

TEST(SelfComm, CollectivesKeepOrCopyTheValues) {
  SelfComm c("dp", 0);
  const Tensor x = random_tensor({3, 5}, 1);
  Tensor t = x.clone();
  c.all_reduce(t);
  c.all_reduce(t, ReduceOp::kMax);
  c.broadcast(t, 0);
  EXPECT_EQ(to_double(t), to_double(x));

  Tensor out = Tensor::zeros({3, 5}, DType::kF32);
  c.reduce_scatter(x, out);
  EXPECT_EQ(to_double(out), to_double(x));
  Tensor gathered = Tensor::zeros({3, 5}, DType::kF32);
  c.all_gather(x, gathered);
  EXPECT_EQ(to_double(gathered), to_double(x));
  c.all_gather(gathered, gathered);  // in place
  EXPECT_EQ(to_double(gathered), to_double(x));

  Tensor ids = Tensor::from_ints({4, 2}, std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8});
  Tensor ids_out = Tensor::zeros({4, 2}, DType::kI32);
  const std::vector<int64_t> rows{4};
  c.all_to_all_v(ids, rows, ids_out, rows);
  EXPECT_EQ(to_double(ids_out), to_double(ids));
  c.barrier();
  EXPECT_EQ(c.calls(), 8);
  EXPECT_EQ(c.bytes_sent(), 0);
}

TEST(SelfComm, BadArgumentsFailLikeMpiComm) {
  SelfComm c("tp", 0);
  EXPECT_EQ(error_of([&] {
              c.reduce_scatter(Tensor::zeros({5, 4}, DType::kF32), Tensor::zeros({2, 4}, DType::kF32));
            }),
            "reduce_scatter on group tp: in has shape (5, 4) but out has shape (2, 4); expected in of shape (2, 4)");
  EXPECT_EQ(error_of([&] {
              c.all_gather(Tensor::zeros({2, 3}, DType::kF32), Tensor::zeros({2, 4}, DType::kF32));
            }),
            "all_gather on group tp: out has shape (2, 4) but in has shape (2, 3); expected out of shape (2, 3)");
  EXPECT_EQ(error_of([&] { c.all_reduce(Tensor::zeros({3}, DType::kF16)); }),
            "all_reduce on group tp: t must be f32, bf16, i32 or i64, got f16(3) cpu");
  EXPECT_EQ(error_of([&] { c.all_reduce(Tensor()); }), "all_reduce on group tp: t is undefined");
  const std::vector<int64_t> three{3}, four{4};
  EXPECT_EQ(error_of([&] {
              c.all_to_all_v(Tensor::zeros({3, 2}, DType::kF32), three, Tensor::zeros({4, 2}, DType::kF32), four);
            }),
            "all_to_all_v on group tp: this member (rank 0) sends itself 3 rows but expects 4");
  const std::vector<int64_t> negative{-1};
  EXPECT_EQ(
      error_of([&] {
        c.all_to_all_v(Tensor::zeros({0, 2}, DType::kF32), negative, Tensor::zeros({0, 2}, DType::kF32), negative);
      }),
      "all_to_all_v on group tp: send_rows[0] is -1, expected a row count >= 0");
  EXPECT_EQ(error_of([&] { c.broadcast(Tensor::zeros({1}, DType::kF32), 1); }),
            "broadcast on group tp: root 1 is not a member; the group has ranks 0..0");
  EXPECT_EQ(error_of([&] { c.send(Tensor::zeros({1}, DType::kF32), 0); }),
            "send on group tp: peer 0 is this member itself");
  EXPECT_EQ(error_of([&] { c.recv(Tensor::zeros({1}, DType::kF32), 1); }),
            "recv on group tp: peer 1 is not a member; the group has ranks 0..0");
  Tensor whole = Tensor::zeros({4, 2}, DType::kF32);
  EXPECT_EQ(error_of([&] { c.all_gather(whole.rows(1, 3), whole.rows(0, 2)); }),
            "all_gather on group tp: in f32(2, 2) cpu overlaps out f32(2, 2) cpu without being out's row block 0 (this "
            "member's)");
  EXPECT_EQ(c.calls(), 0);
}

}  // namespace
}  // namespace moeforge
