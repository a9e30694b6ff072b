// MpiComm on 2, 3 and 4 ranks: every collective against values each rank computes locally from
// every member's (seeded) input; sequence numbers, call records and byte counters; argument
// errors, which every rank raises alike before any communication.
#include <mpi.h>

#include <chrono>
#include <cstring>
#include <numeric>
#include <thread>

#include "parallel/mpi_comm.h"
#include "runtime/ops.h"
#include "tests/parallel/mpi/mpi_testing.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::kTestTimeoutS;
using testing::mpi;
using testing::random_tensor;

std::unique_ptr<MpiComm> make_comm(MPI_Comm parent, int color, int key, const char* name) {
  MPI_Comm c = MPI_COMM_NULL;
  MOE_MPI_CHECK(MPI_Comm_split(parent, color, key, &c));
  return std::make_unique<MpiComm>(c, name, mpi().watchdog(), kTestTimeoutS);
}

class MpiCommTest : public ::testing::Test {
 protected:
  void SetUp() override { comm_ = make_comm(MPI_COMM_WORLD, 0, mpi().world_rank(), "test"); }
  void TearDown() override { comm_.reset(); }

  MpiComm& comm() { return *comm_; }
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }

  std::unique_ptr<MpiComm> comm_;
};

// Member r's input of a test: f32 uniform in [-1, 1), seeded by (test salt, r).
Tensor input_of(const Shape& shape, int r, int salt) { return random_tensor(shape, 1000 * salt + r); }

// Integer input of member r: value (r + 1) * 1000003 + i * 7919 - 5000 (distinct per member and
// element, negative ones included), as i32 or i64.
Tensor int_input_of(const Shape& shape, int r, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  for (int64_t i = 0; i < t.numel(); ++i) {
    const int64_t v = (r + 1) * 1000003 + i * 7919 - 5000;
    if (dtype == DType::kI32) {
      t.data<int32_t>()[i] = static_cast<int32_t>(v);
    } else {
      t.data<int64_t>()[i] = v;
    }
  }
  return t;
}

int64_t int_at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::kI32 ? t.data<int32_t>()[i] : t.data<int64_t>()[i];
}

// Exact small integers as an f32 or i64 tensor, and back.
Tensor tensor_of(const Shape& shape, DType dtype, const std::vector<double>& values) {
  if (dtype == DType::kF32) return testing::from_double(shape, values);
  Tensor t = Tensor::empty(shape, DType::kI64);
  for (size_t i = 0; i < values.size(); ++i) t.data<int64_t>()[i] = static_cast<int64_t>(values[i]);
  return t;
}

std::vector<double> values_of(const Tensor& t) {
  if (t.dtype() == DType::kF32) return testing::to_double(t);
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = static_cast<double>(int_at(t, i));
  return v;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST_F(MpiCommTest, MembersAreTheWorldInOrder) {
  EXPECT_EQ(rank(), mpi().world_rank());
  EXPECT_EQ(size(), mpi().world_size());
  std::vector<int> expected(size());
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(comm().world_ranks(), expected);
  EXPECT_EQ(comm().name(), "test");
}

TEST_F(MpiCommTest, AllReduceSumAndMaxF32) {
  int salt = 0;
  for (const Shape& shape : {Shape{}, Shape{1}, Shape{7}, Shape{3, 5}, Shape{2, 3, 33}}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      ++salt;
      std::vector<double> want(shape.numel(), op == ReduceOp::kSum ? 0.0 : -1e30);
      for (int r = 0; r < size(); ++r) {
        const std::vector<double> x = testing::to_double(input_of(shape, r, salt));
        for (size_t i = 0; i < want.size(); ++i)
          want[i] = op == ReduceOp::kSum ? want[i] + x[i] : std::max(want[i], x[i]);
      }
      Tensor t = input_of(shape, rank(), salt);
      comm().all_reduce(t, op);
      expect_close(t, want, 1e-6, 1e-6, "all_reduce " + shape.str());
    }
  }
}

TEST_F(MpiCommTest, AllReduceIntegersIsExact) {
  for (DType dtype : {DType::kI32, DType::kI64}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
      const Shape shape{4, 9};
      Tensor t = int_input_of(shape, rank(), dtype);
      comm().all_reduce(t, op);
      for (int64_t i = 0; i < shape.numel(); ++i) {
        int64_t want = op == ReduceOp::kSum ? 0 : INT64_MIN;
        for (int r = 0; r < size(); ++r) {
          const int64_t v = int_at(int_input_of(shape, r, dtype), i);
          want = op == ReduceOp::kSum ? want + v : std::max(want, v);
        }
        ASSERT_EQ(int_at(t, i), want) << dtype_name(dtype) << " element " << i;
      }
    }
  }
}

TEST_F(MpiCommTest, ReduceScatterSumsEachMembersBlock) {
  int salt = 100;
  for (const auto& [n, trailing] :
       std::vector<std::pair<int64_t, std::vector<int64_t>>>{{1, {}}, {3, {5}}, {2, {3, 7}}, {0, {4}}}) {
    ++salt;
    std::vector<int64_t> in_dims{size() * n}, out_dims{n};
    in_dims.insert(in_dims.end(), trailing.begin(), trailing.end());
    out_dims.insert(out_dims.end(), trailing.begin(), trailing.end());
    const Shape in_shape(in_dims), out_shape(out_dims);
    const int64_t block = out_shape.numel();
    std::vector<double> want(block, 0.0);
    for (int r = 0; r < size(); ++r) {
      const std::vector<double> x = testing::to_double(input_of(in_shape, r, salt));
      for (int64_t i = 0; i < block; ++i) want[i] += x[rank() * block + i];
    }
    Tensor out = Tensor::zeros(out_shape, DType::kF32);
    comm().reduce_scatter(input_of(in_shape, rank(), salt), out);
    expect_close(out, want, 1e-6, 1e-6, "reduce_scatter " + in_shape.str());
  }
}

TEST_F(MpiCommTest, AllGatherConcatenatesBlocksInRankOrder) {
  for (int64_t n : {1, 3, 0}) {
    const Shape in_shape{n, 6};
    std::vector<double> want;
    for (int r = 0; r < size(); ++r) {
      const std::vector<double> x = testing::to_double(input_of(in_shape, r, 200 + n));
      want.insert(want.end(), x.begin(), x.end());
    }
    Tensor out = Tensor::zeros({size() * n, 6}, DType::kF32);
    comm().all_gather(input_of(in_shape, rank(), 200 + n), out);
    expect_close(out, want, 0, 0, "all_gather " + in_shape.str());

    // In place: this member's block of out is the input.
    Tensor in_place = Tensor::zeros({size() * n, 6}, DType::kF32);
    {
      Tensor mine = in_place.rows(rank() * n, (rank() + 1) * n);
      const Tensor src = input_of(in_shape, rank(), 200 + n);
      std::copy_n(src.data<float>(), src.numel(), mine.data<float>());
      comm().all_gather(mine, in_place);
    }
    expect_close(in_place, want, 0, 0, "all_gather in place " + in_shape.str());
  }
}

// all_to_all_v with uneven counts including zeros: member r sends rows(r, q) = (r + 2q + 1) % 3
// rows to member q; row j of that block holds r * 1000 + q * 100 + j * 10 + c in column c.
TEST_F(MpiCommTest, AllToAllVWithUnevenAndZeroCounts) {
  const int64_t cols = 3;
  auto rows = [](int r, int q) -> int64_t { return (r + 2 * q + 1) % 3; };
  for (DType dtype : {DType::kF32, DType::kI64}) {
    std::vector<int64_t> send_rows(size()), recv_rows(size());
    for (int q = 0; q < size(); ++q) {
      send_rows[q] = rows(rank(), q);
      recv_rows[q] = rows(q, rank());
    }
    const int64_t n_in = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
    const int64_t n_out = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
    std::vector<double> in_values, want;
    for (int q = 0; q < size(); ++q) {
      for (int64_t j = 0; j < send_rows[q]; ++j) {
        for (int64_t c = 0; c < cols; ++c) in_values.push_back(rank() * 1000 + q * 100 + j * 10 + c);
      }
      for (int64_t j = 0; j < recv_rows[q]; ++j) {
        for (int64_t c = 0; c < cols; ++c) want.push_back(q * 1000 + rank() * 100 + j * 10 + c);
      }
    }
    Tensor out = Tensor::zeros({n_out, cols}, dtype);
    comm().all_to_all_v(tensor_of({n_in, cols}, dtype, in_values), send_rows, out, recv_rows);
    expect_close(values_of(out), want, 0, 0, std::string("all_to_all_v ") + dtype_name(dtype));
  }
}

TEST_F(MpiCommTest, BroadcastFromEveryRoot) {
  for (int root = 0; root < size(); ++root) {
    Tensor t = input_of({5, 4}, rank(), 300);
    comm().broadcast(t, root);
    expect_close(t, testing::to_double(input_of({5, 4}, root, 300)), 0, 0, "broadcast from " + std::to_string(root));
    Tensor ids = int_input_of({11}, rank(), DType::kI32);
    comm().broadcast(ids, root);
    for (int64_t i = 0; i < 11; ++i) ASSERT_EQ(int_at(ids, i), int_at(int_input_of({11}, root, DType::kI32), i));
  }
}

// Each member sends to the next and receives from the previous; 100k floats is past the eager
// limit, so the even/odd order matters (all sending first would deadlock).
TEST_F(MpiCommTest, SendRecvRing) {
  const int next = (rank() + 1) % size(), prev = (rank() + size() - 1) % size();
  const Shape shape{100, 1000};
  Tensor got = Tensor::zeros(shape, DType::kF32);
  if (rank() % 2 == 0) {
    comm().send(input_of(shape, rank(), 400), next);
    comm().recv(got, prev);
  } else {
    comm().recv(got, prev);
    comm().send(input_of(shape, rank(), 400), next);
  }
  expect_close(got, testing::to_double(input_of(shape, prev, 400)), 0, 0, "recv from previous");
  const CallLogSnapshot log = comm().log();
  EXPECT_EQ(log.calls, 0) << "send/recv are numbered per peer, not as collectives";
  EXPECT_EQ(log.sent[next], 1);
  EXPECT_EQ(log.received[prev], 1);
}

TEST_F(MpiCommTest, BarrierWaitsForTheLastMember) {
  comm().barrier();
  const auto start = std::chrono::steady_clock::now();
  if (rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  comm().barrier();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(waited, 0.29) << "the barrier returned before rank 0 arrived";
}

TEST_F(MpiCommTest, SequenceNumbersRecordsAndBytes) {
  Tensor x = input_of({16}, rank(), 500);  // 64 bytes
  Tensor big = Tensor::zeros({size() * 4, 2}, DType::kF32);
  comm().all_reduce(x);                                                       // #1
  comm().all_gather(x.rows(0, 4), Tensor::zeros({size() * 4}, DType::kF32));  // #2
  comm().reduce_scatter(big, Tensor::zeros({4, 2}, DType::kF32));             // #3
  comm().broadcast(x, size() - 1);                                            // #4
  comm().barrier();                                                           // #5
  if (size() >= 2) {
    if (rank() == 0) comm().send(x, 1);
    if (rank() == 1) comm().recv(x, 0);
  }
  EXPECT_EQ(comm().calls(), 5);
  int64_t want_bytes = 64 + 16 + size() * 4 * 2 * 4 + (rank() == size() - 1 ? 64 : 0) + (rank() == 0 ? 64 : 0);
  EXPECT_EQ(comm().bytes_sent(), want_bytes);
  const CallLogSnapshot log = comm().log();
  const std::vector<CommOp> ops{CommOp::kAllReduce, CommOp::kAllGather, CommOp::kReduceScatter, CommOp::kBroadcast,
                                CommOp::kBarrier};
  ASSERT_EQ(log.records.size(), rank() <= 1 ? 6u : 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(log.records[i].op, ops[i]) << i;
    EXPECT_EQ(log.records[i].seq, i + 1);
    EXPECT_TRUE(log.records[i].done());
  }
  EXPECT_EQ(log.records[0].bytes, 64);
  EXPECT_EQ(log.current(), nullptr);
  if (rank() <= 1) {
    EXPECT_EQ(log.records[5].op, rank() == 0 ? CommOp::kSend : CommOp::kRecv);
    EXPECT_EQ(log.records[5].seq, 1);
    EXPECT_EQ(log.records[5].peer, 1 - rank());
  }
}

TEST_F(MpiCommTest, RingKeepsTheLastSixteenCalls) {
  Tensor x = Tensor::zeros({1}, DType::kF32);
  for (int i = 0; i < 40; ++i) comm().all_reduce(x);
  const CallLogSnapshot log = comm().log();
  ASSERT_EQ(log.records.size(), 16u);
  EXPECT_EQ(log.records.front().seq, 25);
  EXPECT_EQ(log.records.back().seq, 40);
}

TEST_F(MpiCommTest, SubgroupsSplitByParity) {
  const int parity = mpi().world_rank() % 2;
  std::unique_ptr<MpiComm> half = make_comm(MPI_COMM_WORLD, parity, mpi().world_rank(), "half");
  std::vector<int> members;
  for (int w = parity; w < mpi().world_size(); w += 2) members.push_back(w);
  EXPECT_EQ(half->world_ranks(), members);
  EXPECT_EQ(half->rank(), mpi().world_rank() / 2);
  Tensor t = Tensor::from_ints({1}, std::vector<int32_t>{mpi().world_rank()});
  half->all_reduce(t);
  EXPECT_EQ(t.data<int32_t>()[0], std::accumulate(members.begin(), members.end(), 0));
}

// bf16 activations (mixed precision): reductions are the f32 reduction of the widened inputs,
// rounded once (so the result does not depend on the member count's rounding steps); the data
// movers are bitwise.
TEST_F(MpiCommTest, Bf16ReducesInF32AndMovesBitwise) {
  const auto bf16_input = [&](const Shape& shape, int r, int salt) { return input_of(shape, r, salt).to(DType::kBF16); };
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax}) {
    const Shape shape{5, 13};
    Tensor want = Tensor::zeros(shape, DType::kF32);
    if (op == ReduceOp::kMax) ops::fill(want, -1e30f);
    for (int r = 0; r < size(); ++r) {
      const Tensor x = bf16_input(shape, r, 300).to(DType::kF32);
      for (int64_t i = 0; i < shape.numel(); ++i) {
        float& w = want.data<float>()[i];
        w = op == ReduceOp::kSum ? w + x.data<float>()[i] : std::max(w, x.data<float>()[i]);
      }
    }
    Tensor t = bf16_input(shape, rank(), 300);
    comm().all_reduce(t, op);
    ASSERT_EQ(t.dtype(), DType::kBF16);
    const Tensor rounded = want.to(DType::kBF16);
    EXPECT_EQ(std::memcmp(t.raw_data(), rounded.raw_data(), rounded.nbytes()), 0) << "all_reduce bf16";
  }
  {
    const Shape in_shape{size() * 3, 7}, out_shape{3, 7};
    Tensor want = Tensor::zeros(out_shape, DType::kF32);
    for (int r = 0; r < size(); ++r) {
      const Tensor x = bf16_input(in_shape, r, 301).to(DType::kF32);
      for (int64_t i = 0; i < out_shape.numel(); ++i) want.data<float>()[i] += x.data<float>()[rank() * 21 + i];
    }
    Tensor out = Tensor::empty(out_shape, DType::kBF16);
    comm().reduce_scatter(bf16_input(in_shape, rank(), 301), out);
    const Tensor rounded = want.to(DType::kBF16);
    EXPECT_EQ(std::memcmp(out.raw_data(), rounded.raw_data(), rounded.nbytes()), 0) << "reduce_scatter bf16";
  }
  {
    const Tensor mine = bf16_input({2, 9}, rank(), 302);
    Tensor all = Tensor::empty({2 * size(), 9}, DType::kBF16);
    comm().all_gather(mine, all);
    for (int r = 0; r < size(); ++r) {
      const Tensor theirs = bf16_input({2, 9}, r, 302);
      EXPECT_EQ(std::memcmp(all.rows(2 * r, 2 * r + 2).raw_data(), theirs.raw_data(), theirs.nbytes()), 0) << r;
    }
    std::vector<int64_t> counts(size(), 1);
    const Tensor send = bf16_input({size(), 5}, rank(), 303);
    Tensor recv = Tensor::empty({size(), 5}, DType::kBF16);
    comm().all_to_all_v(send, counts, recv, counts);
    for (int r = 0; r < size(); ++r) {
      const Tensor theirs = bf16_input({size(), 5}, r, 303);
      EXPECT_EQ(std::memcmp(recv.rows(r, r + 1).raw_data(), theirs.rows(rank(), rank() + 1).raw_data(), 10), 0) << r;
    }
  }
}

TEST_F(MpiCommTest, BadArgumentsFailAlikeOnEveryRank) {
  const std::string group = "test";
  EXPECT_EQ(error_of([&] {
              comm().reduce_scatter(Tensor::zeros({5, 4}, DType::kF32), Tensor::zeros({2, 4}, DType::kF32));
            }),
            fmt::format("reduce_scatter on group test: in has shape (5, 4) but out has shape (2, 4); expected in of "
                        "shape ({}, 4)",
                        2 * size()));
  EXPECT_EQ(error_of([&] {
              comm().all_gather(Tensor::zeros({2, 4}, DType::kF32), Tensor::zeros({2, 4}, DType::kI32));
            }),
            "all_gather on group test: out must be f32, got i32 with shape (2, 4)");
  EXPECT_EQ(error_of([&] { comm().all_reduce(Tensor::zeros({3}, DType::kF16)); }),
            "all_reduce on group test: t must be f32, bf16, i32 or i64, got f16(3) cpu");
  const std::vector<int64_t> short_counts(size() - 1, 0), counts(size(), 1);
  EXPECT_EQ(error_of([&] {
              comm().all_to_all_v(Tensor::zeros({size(), 2}, DType::kF32), short_counts,
                                  Tensor::zeros({size(), 2}, DType::kF32), counts);
            }),
            fmt::format("all_to_all_v on group test: send_rows has {} entries, expected one per member ({})",
                        size() - 1, size()));
  EXPECT_EQ(error_of([&] {
              comm().all_to_all_v(Tensor::zeros({size() + 1, 2}, DType::kF32), counts,
                                  Tensor::zeros({size(), 2}, DType::kF32), counts);
            }),
            fmt::format("all_to_all_v on group test: send_rows sum to {0} but in has shape ({1}, 2); expected {0} rows",
                        size(), size() + 1));
  EXPECT_EQ(
      error_of([&] { comm().broadcast(Tensor::zeros({1}, DType::kF32), size()); }),
      fmt::format("broadcast on group test: root {} is not a member; the group has ranks 0..{}", size(), size() - 1));
  EXPECT_EQ(error_of([&] { comm().send(Tensor::zeros({1}, DType::kF32), rank()); }),
            fmt::format("send on group test: peer {} is this member itself", rank()));
  Tensor whole = Tensor::zeros({2 * size(), 2}, DType::kF32);
  EXPECT_EQ(error_of([&] { comm().reduce_scatter(whole, whole.rows(0, 2)); }),
            fmt::format("reduce_scatter on group test: in f32({}, 2) cpu and out f32(2, 2) cpu overlap in memory",
                        2 * size()));
  // Nothing was issued: the failed calls took no sequence number.
  EXPECT_EQ(comm().calls(), 0);
}

}  // namespace
}  // namespace moeforge
