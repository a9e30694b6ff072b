// Tests embedding_fwd / embedding_bwd (runtime/ops_dense.cpp, runtime/cpu/embedding.cpp): the
// lookup against a naive double gather, the scatter-add backward against finite differences
// (repeated ids included) and its accumulate rule, determinism across thread counts, and the
// error messages for bad ids, shapes and dtypes. Vocab-parallel: over R = 1, 2, 3 shards of a
// padded vocabulary, each shard's lookup is the gather of its own ids (zero rows elsewhere) and
// the shards' sum is the full lookup; each shard's backward equals its rows of the unsplit
// backward and leaves the padding rows alone; the slice arguments are validated.
#include <gtest/gtest.h>
#include <omp.h>

#include <string>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::random_ints;
using testing::random_tensor;
using testing::to_double;

using testing::error_of;

// out (N, C) = table[ids]
std::vector<double> ref_embedding(const std::vector<int32_t>& ids, const std::vector<double>& table, int64_t c) {
  std::vector<double> out;
  for (int32_t id : ids) {
    for (int64_t j = 0; j < c; ++j) out.push_back(table[id * c + j]);
  }
  return out;
}

std::vector<int32_t> ints_of(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return {p, p + t.numel()};
}

struct EmbeddingCase {
  int64_t n, v, c;
};

std::string case_name(const ::testing::TestParamInfo<EmbeddingCase>& test) {
  return fmt::format("N{}_V{}_C{}", test.param.n, test.param.v, test.param.c);
}

class EmbeddingTest : public ::testing::TestWithParam<EmbeddingCase> {};

TEST_P(EmbeddingTest, ForwardMatchesGather) {
  const EmbeddingCase p = GetParam();
  const Tensor ids = random_ints({p.n}, 1, 0, static_cast<int32_t>(p.v));
  const Tensor table = random_tensor({p.v, p.c}, 2);
  const Tensor out = random_tensor({p.n, p.c}, 3);
  ops::embedding_fwd(ids, table, out);
  expect_close(out, ref_embedding(ints_of(ids), to_double(table), p.c), 0.0, 0.0, "embedding_fwd");
}

TEST_P(EmbeddingTest, BackwardMatchesFiniteDifferencesAndAccumulates) {
  const EmbeddingCase p = GetParam();
  // Fewer distinct ids than positions, so most ids repeat.
  const Tensor ids = random_ints({p.n}, 4, 0, static_cast<int32_t>(p.v));
  const std::vector<int32_t> id_values = ints_of(ids);
  const Tensor table = random_tensor({p.v, p.c}, 5);
  const Tensor g = random_tensor({p.n, p.c}, 6);
  const std::vector<double> gv = to_double(g);
  const auto loss = [&](const std::vector<double>& t) { return testing::dot(ref_embedding(id_values, t, p.c), gv); };
  const std::vector<double> fd = testing::finite_diff(loss, to_double(table));

  const Tensor dtable = random_tensor({p.v, p.c}, 7);
  std::vector<double> want = to_double(dtable);
  for (size_t i = 0; i < want.size(); ++i) want[i] += fd[i];
  ops::embedding_bwd(ids, g, dtable);
  expect_close(dtable, want, 1e-6, 1e-6, "embedding_bwd (dtable += FD)");
}

INSTANTIATE_TEST_SUITE_P(Shapes, EmbeddingTest,
                         ::testing::Values(EmbeddingCase{1, 1, 1}, EmbeddingCase{5, 7, 13}, EmbeddingCase{37, 11, 37},
                                           EmbeddingCase{40, 3, 8}, EmbeddingCase{64, 259, 5}),
                         case_name);

TEST(Embedding, BackwardSumsRepeatedIdsInPositionOrder) {
  const Tensor ids = Tensor::from_ints({4}, std::vector<int32_t>{2, 0, 2, 2});
  const Tensor dout = Tensor::from_floats({4, 2}, std::vector<float>{1, 2, 3, 4, 10, 20, 100, 200});
  const Tensor dtable = Tensor::zeros({3, 2}, DType::kF32);
  ops::embedding_bwd(ids, dout, dtable);
  expect_close(dtable, {3, 4, 0, 0, 111, 222}, 0.0, 0.0, "embedding_bwd");
}

TEST(Embedding, BackwardIsIdenticalForAnyThreadCount) {
  // Large enough to run in parallel; a skewed id distribution (half the positions hit id 0).
  const int64_t n = 4096, v = 300, c = 48;
  Tensor ids = random_ints({n}, 8, 0, static_cast<int32_t>(v));
  for (int64_t i = 0; i < n; i += 2) ids.data<int32_t>()[i] = 0;
  const Tensor dout = random_tensor({n, c}, 9);
  const Tensor serial = random_tensor({v, c}, 10);
  const Tensor parallel = serial.clone();
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  ops::embedding_bwd(ids, dout, serial);
  omp_set_num_threads(4);
  ops::embedding_bwd(ids, dout, parallel);
  omp_set_num_threads(threads);
  expect_close(parallel, to_double(serial), 0.0, 0.0, "embedding_bwd with 4 threads vs 1");
}

TEST(Embedding, OutOfRangeIdNamesIdPositionAndVocabulary) {
  std::vector<int32_t> values(8, 1);
  values[5] = 300;
  const Tensor ids = Tensor::from_ints({8}, values);
  const Tensor table = random_tensor({259, 4}, 1);
  const Tensor out = Tensor::empty({8, 4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, table, out); }),
            "embedding_fwd: id 300 at position 5 is outside the vocabulary [0, 259)");
  EXPECT_EQ(error_of([&] { ops::embedding_bwd(ids, out, table); }),
            "embedding_bwd: id 300 at position 5 is outside the vocabulary [0, 259)");
  ids.data<int32_t>()[5] = 1;
  ids.data<int32_t>()[2] = -1;
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, table, out); }),
            "embedding_fwd: id -1 at position 2 is outside the vocabulary [0, 259)");
}

TEST(Embedding, ShapeAndDtypeErrorsNameOpAndShapes) {
  const Tensor ids = random_ints({3}, 1, 0, 10);
  const Tensor table = random_tensor({10, 5}, 2);
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, table, Tensor::empty({3, 4}, DType::kF32)); }),
            "embedding_fwd: out has shape (3, 4) but table has shape (10, 5); expected out of shape (3, 5)");
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, table, Tensor::empty({4, 5}, DType::kF32)); }),
            "embedding_fwd: out has shape (4, 5) but ids has shape (3); expected out of shape (3, 5)");
  EXPECT_EQ(error_of([&] { ops::embedding_bwd(ids, random_tensor({3, 6}, 3), table); }),
            "embedding_bwd: dout has shape (3, 6) but dtable has shape (10, 5); expected dout of shape (3, 5)");
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(random_tensor({3}, 4), table, Tensor::empty({3, 5}, DType::kF32)); }),
            "embedding_fwd: ids must be i32, got f32 with shape (3)");
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids.reshape({1, 3}), table, Tensor::empty({3, 5}, DType::kF32)); }),
            "embedding_fwd: ids must have 1 dims, got shape (1, 3)");
}

// ---- vocab-parallel ------------------------------------------------------------------------------

struct ShardCase {
  int64_t n, v, c, r;
};

class VocabParallelEmbeddingTest : public ::testing::TestWithParam<ShardCase> {};

// The vocabulary of V ids padded to R * Vl rows, Vl = ceil(V / R); shard r holds rows
// [r * Vl, (r + 1) * Vl). The padding rows hold values too: no id may reach them.
TEST_P(VocabParallelEmbeddingTest, ShardsSumToTheLookupAndOwnTheirRowsOfTheGradient) {
  const ShardCase p = GetParam();
  const int64_t vl = (p.v + p.r - 1) / p.r;
  const Tensor ids = random_ints({p.n}, 11, 0, static_cast<int32_t>(p.v));
  ids.data<int32_t>()[p.n - 1] = static_cast<int32_t>(p.v - 1);  // the last real row, next to the padding
  const std::vector<int32_t> id_values = ints_of(ids);
  const Tensor table = random_tensor({p.r * vl, p.c}, 12);
  const std::vector<double> tv = to_double(table);
  const Tensor dout = random_tensor({p.n, p.c}, 13);
  const Tensor full_dtable = random_tensor({p.r * vl, p.c}, 14);
  const std::vector<double> dtable_before = to_double(full_dtable);
  ops::embedding_bwd(ids, dout, full_dtable.rows(0, p.v));
  const std::vector<double> full_grad = to_double(full_dtable);

  std::vector<double> sum(static_cast<size_t>(p.n * p.c), 0.0);
  for (int64_t r = 0; r < p.r; ++r) {
    const int64_t start = r * vl;
    const Tensor out = random_tensor({p.n, p.c}, 15 + r);
    ops::embedding_fwd(ids, table.rows(start, start + vl).clone(), out, start, p.v);
    std::vector<double> want;
    for (int32_t id : id_values) {
      const bool owned = id >= start && id < start + vl;
      for (int64_t j = 0; j < p.c; ++j) want.push_back(owned ? tv[id * p.c + j] : 0.0);
    }
    expect_close(out, want, 0.0, 0.0, fmt::format("embedding_fwd shard {}", r));
    const std::vector<double> got = to_double(out);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += got[i];

    const Tensor dtable = Tensor::empty({vl, p.c}, DType::kF32);
    std::copy(dtable_before.begin() + start * p.c, dtable_before.begin() + (start + vl) * p.c,
              dtable.data<float>());
    ops::embedding_bwd(ids, dout, dtable, start, p.v);
    // Rows of real ids match the unsplit backward bitwise (same positions, same order); padding
    // rows are untouched.
    expect_close(dtable,
                 std::vector<double>(full_grad.begin() + start * p.c, full_grad.begin() + (start + vl) * p.c), 0.0,
                 0.0, fmt::format("embedding_bwd shard {}", r));
  }
  expect_close(sum, ref_embedding(id_values, tv, p.c), 0.0, 0.0, "sum of the shards' lookups");
}

// V = 259 over 3 shards of 87 pads 2 rows; V = 5 over 3 shards of 2 pads 1; 4096 x 48 runs the
// kernels in parallel.
INSTANTIATE_TEST_SUITE_P(Shards, VocabParallelEmbeddingTest,
                         ::testing::Values(ShardCase{1, 1, 3, 1}, ShardCase{37, 11, 37, 1}, ShardCase{37, 11, 5, 2},
                                           ShardCase{40, 5, 8, 3}, ShardCase{64, 259, 5, 3},
                                           ShardCase{64, 259, 7, 2}, ShardCase{4096, 300, 48, 3}),
                         [](const ::testing::TestParamInfo<ShardCase>& test) {
                           return fmt::format("N{}_V{}_C{}_R{}", test.param.n, test.param.v, test.param.c,
                                              test.param.r);
                         });

TEST(Embedding, ShardChecksIdsAgainstTheRealVocabularyAndValidatesItsSlice) {
  std::vector<int32_t> values(8, 1);
  values[5] = 259;  // a padding row of the last shard: not a token
  const Tensor ids = Tensor::from_ints({8}, values);
  const Tensor shard = random_tensor({87, 4}, 1);
  const Tensor out = Tensor::empty({8, 4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, shard, out, 174, 259); }),
            "embedding_fwd: id 259 at position 5 is outside the vocabulary [0, 259)");
  EXPECT_EQ(error_of([&] { ops::embedding_bwd(ids, out, shard, 0, 259); }),
            "embedding_bwd: id 259 at position 5 is outside the vocabulary [0, 259)");
  ids.data<int32_t>()[5] = 258;
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, shard, out, 0, 259); }), "<no error>");

  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, shard, out, -1, 259); }),
            "embedding_fwd: vocab_start=-1 must be >= 0");
  EXPECT_EQ(error_of([&] { ops::embedding_bwd(ids, out, shard, 0, 0); }),
            "embedding_bwd: vocab_size=0 must be >= 1, or -1 for the whole table");
  EXPECT_EQ(error_of([&] { ops::embedding_fwd(ids, shard, out, 87, -1); }),
            "embedding_fwd: vocab_size=-1 (the table is the whole vocabulary) needs vocab_start=0, got 87");
}

}  // namespace
}  // namespace moeforge
