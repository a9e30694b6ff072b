// Tests cross_entropy_fwd / cross_entropy_bwd (runtime/ops_dense.cpp, runtime/cpu/cross_entropy.cpp):
// losses and lse against a naive double log-softmax (ignored targets, large logits), dlogits
// against finite differences of scale * sum(losses), the in-place path (dlogits aliasing logits)
// against the out-of-place one, and the errors for bad targets, shapes and dtypes.
// The vocab-parallel path (cross_entropy_partial_fwd, cross_entropy_combine, the sharded
// cross_entropy_bwd): for R = 1, 2, 3 shards with NaN padding, the partials against double row
// statistics, the combined losses and lse against the fused op on the unsplit logits, the
// concatenated shard gradients against the unsplit gradient (in place too, padding zeroed), and
// the errors of the new ops.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

// logits (N, V) -> losses (N), lse (N)
void ref_cross_entropy(const std::vector<double>& logits, const std::vector<int32_t>& targets, int64_t v,
                       std::vector<double>& losses, std::vector<double>& lse) {
  const size_t n = targets.size();
  losses.assign(n, 0.0);
  lse.assign(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    const double* row = logits.data() + i * v;
    const double m = *std::max_element(row, row + v);
    double s = 0.0;
    for (int64_t j = 0; j < v; ++j) s += std::exp(row[j] - m);
    lse[i] = m + std::log(s);
    if (targets[i] >= 0) losses[i] = lse[i] - row[targets[i]];
  }
}

double ref_total_loss(const std::vector<double>& logits, const std::vector<int32_t>& targets, int64_t v) {
  std::vector<double> losses, lse;
  ref_cross_entropy(logits, targets, v, losses, lse);
  double total = 0.0;
  for (double l : losses) total += l;
  return total;
}

struct CeCase {
  int64_t n, v;
  float logit_scale;
};

std::string case_name(const ::testing::TestParamInfo<CeCase>& test) {
  return fmt::format("N{}_V{}_scale{}", test.param.n, test.param.v, static_cast<int>(test.param.logit_scale));
}

// Random targets in [0, V) with every third row ignored (two different negative values).
Tensor targets_with_ignored(int64_t n, int64_t v, uint64_t seed) {
  Tensor t = random_ints({n}, seed, 0, static_cast<int32_t>(v));
  for (int64_t i = 1; i < n; i += 3) t.data<int32_t>()[i] = i % 2 ? -100 : -1;
  return t;
}

std::vector<int32_t> ints_of(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return {p, p + t.numel()};
}

class CrossEntropyTest : public ::testing::TestWithParam<CeCase> {};

TEST_P(CrossEntropyTest, ForwardMatchesDouble) {
  const CeCase p = GetParam();
  const Tensor logits = random_tensor({p.n, p.v}, 1, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 2);
  const Tensor losses = random_tensor({p.n}, 3), lse = random_tensor({p.n}, 4);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  std::vector<double> want_losses, want_lse;
  ref_cross_entropy(to_double(logits), ints_of(targets), p.v, want_losses, want_lse);
  expect_close(losses, want_losses, 1e-5, 1e-5 * p.logit_scale, "cross_entropy_fwd losses");
  expect_close(lse, want_lse, 1e-6, 1e-6, "cross_entropy_fwd lse");
}

TEST_P(CrossEntropyTest, InPlaceBackwardEqualsOutOfPlace) {
  const CeCase p = GetParam();
  const Tensor logits = random_tensor({p.n, p.v}, 8, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 9);
  const Tensor losses = Tensor::empty({p.n}, DType::kF32), lse = Tensor::empty({p.n}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  const Tensor dlogits = Tensor::empty({p.n, p.v}, DType::kF32);
  ops::cross_entropy_bwd(logits, targets, lse, 1.0f / static_cast<float>(p.n), dlogits);
  const Tensor in_place = logits.clone();
  ops::cross_entropy_bwd(in_place, targets, lse, 1.0f / static_cast<float>(p.n), in_place);
  expect_close(in_place, to_double(dlogits), 0.0, 0.0, "cross_entropy_bwd in place");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyTest,
                         ::testing::Values(CeCase{1, 1, 1.0f}, CeCase{1, 7, 1.0f}, CeCase{5, 13, 3.0f},
                                           CeCase{4, 37, 50.0f}, CeCase{16, 259, 4.0f}, CeCase{33, 1001, 100.0f}),
                         case_name);

// Finite differences cost O((N V)^2): small shapes only.
class CrossEntropyGradTest : public ::testing::TestWithParam<CeCase> {};

TEST_P(CrossEntropyGradTest, BackwardMatchesFiniteDifferences) {
  const CeCase p = GetParam();
  const float scale = 0.37f;
  const Tensor logits = random_tensor({p.n, p.v}, 5, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 6);
  const std::vector<int32_t> tv = ints_of(targets);
  std::vector<double> fd = testing::finite_diff(
      [&](const std::vector<double>& x) { return ref_total_loss(x, tv, p.v); }, to_double(logits));
  for (double& d : fd) d *= scale;

  const Tensor losses = Tensor::empty({p.n}, DType::kF32), lse = Tensor::empty({p.n}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  const Tensor dlogits = random_tensor({p.n, p.v}, 7);  // written, ignored rows included
  ops::cross_entropy_bwd(logits, targets, lse, scale, dlogits);
  expect_close(dlogits, fd, 1e-4, 1e-6, "cross_entropy_bwd");
}

INSTANTIATE_TEST_SUITE_P(Shapes, CrossEntropyGradTest,
                         ::testing::Values(CeCase{1, 1, 1.0f}, CeCase{1, 7, 1.0f}, CeCase{5, 13, 3.0f},
                                           CeCase{4, 37, 50.0f}, CeCase{7, 67, 4.0f}),
                         case_name);

TEST(CrossEntropy, IgnoredRowsHaveZeroLossAndGradient) {
  const Tensor logits = random_tensor({3, 5}, 1);
  const Tensor targets = Tensor::from_ints({3}, std::vector<int32_t>{-1, 4, -7});
  const Tensor losses = Tensor::empty({3}, DType::kF32), lse = Tensor::empty({3}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, losses, lse);
  const std::vector<float> l = losses.to_floats();
  EXPECT_EQ(l[0], 0.0f);
  EXPECT_GT(l[1], 0.0f);
  EXPECT_EQ(l[2], 0.0f);
  std::vector<double> want_losses, want_lse;
  ref_cross_entropy(to_double(logits), {-1, 4, -7}, 5, want_losses, want_lse);
  expect_close(lse, want_lse, 1e-6, 1e-6, "lse of ignored rows is still computed");

  const Tensor dlogits = random_tensor({3, 5}, 2);
  ops::cross_entropy_bwd(logits, targets, lse, 1.0f, dlogits);
  const std::vector<float> d = dlogits.to_floats();
  double row1 = 0.0;
  for (int j = 0; j < 5; ++j) {
    EXPECT_EQ(d[j], 0.0f);
    EXPECT_EQ(d[10 + j], 0.0f);
    row1 += d[5 + j];
  }
  EXPECT_NEAR(row1, 0.0, 1e-6);  // softmax - onehot sums to 0
}

TEST(CrossEntropy, OutOfRangeTargetNamesValuePositionAndVocabulary) {
  std::vector<int32_t> values(8, 3);
  values[5] = 300;
  const Tensor targets = Tensor::from_ints({8}, values);
  const Tensor logits = random_tensor({8, 259}, 1);
  const Tensor losses = Tensor::empty({8}, DType::kF32), lse = Tensor::empty({8}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, targets, losses, lse); }),
            "cross_entropy_fwd: target 300 at position 5 is outside the vocabulary [0, 259)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, logits); }),
            "cross_entropy_bwd: target 300 at position 5 is outside the vocabulary [0, 259)");
  targets.data<int32_t>()[5] = 259;
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, targets, losses, lse); }),
            "cross_entropy_fwd: target 259 at position 5 is outside the vocabulary [0, 259)");
}

TEST(CrossEntropy, ShapeAndDtypeErrorsNameOpAndShapes) {
  const Tensor logits = random_tensor({4, 7}, 1);
  const Tensor targets = random_ints({4}, 2, 0, 7);
  const Tensor losses = Tensor::empty({4}, DType::kF32), lse = Tensor::empty({4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, random_ints({3}, 3, 0, 7), losses, lse); }),
            "cross_entropy_fwd: targets has shape (3) but logits has shape (4, 7); expected targets of shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, targets, losses, Tensor::empty({4, 1}, DType::kF32)); }),
            "cross_entropy_fwd: lse has shape (4, 1) but logits has shape (4, 7); expected lse of shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, random_tensor({4, 8}, 4)); }),
            "cross_entropy_bwd: dlogits has shape (4, 8) but logits has shape (4, 7); "
            "expected dlogits of shape (4, 7)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits, random_tensor({4}, 5), losses, lse); }),
            "cross_entropy_fwd: targets must be i32, got f32 with shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_fwd(logits.reshape({28}), targets, losses, lse); }),
            "cross_entropy_fwd: logits must have 2 dims, got shape (28)");
}

// ---- vocab-parallel ------------------------------------------------------------------------------

// One rank's view of the vocabulary padded to R * Vl: columns [start, start + Vl), the first
// `valid` of them real.
struct Shard {
  int64_t start, valid;
  Tensor logits;  // (N, Vl)
};

// Splits logits (N, V) over R shards of Vl = ceil(V / R) columns. The padding columns are NaN, so
// a kernel that reads one shows it in its results.
std::vector<Shard> split_vocab(const Tensor& logits, int64_t r_count) {
  const int64_t n = logits.dim(0), v = logits.dim(1);
  const int64_t vl = (v + r_count - 1) / r_count;
  const float* src = logits.data<float>();
  std::vector<Shard> shards;
  for (int64_t r = 0; r < r_count; ++r) {
    Shard s{r * vl, std::clamp<int64_t>(v - r * vl, 0, vl), Tensor::empty({n, vl}, DType::kF32)};
    float* dst = s.logits.data<float>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < vl; ++j)
        dst[i * vl + j] = j < s.valid ? src[i * v + s.start + j] : std::numeric_limits<float>::quiet_NaN();
    shards.push_back(std::move(s));
  }
  return shards;
}

// The vocab-parallel forward as the ranks run it: each shard's partial into its slice of the
// gathered partials (R, N, 3), then the combination.
Tensor sharded_forward(const std::vector<Shard>& shards, const Tensor& targets, int64_t v, const Tensor& losses,
                       const Tensor& lse) {
  const int64_t r_count = static_cast<int64_t>(shards.size()), n = targets.dim(0);
  const Tensor partials = Tensor::empty({r_count, n, 3}, DType::kF32);
  for (int64_t r = 0; r < r_count; ++r) {
    const Shard& s = shards[r];
    ops::cross_entropy_partial_fwd(s.logits, targets, s.start, s.valid, partials.rows(r, r + 1).reshape({n, 3}));
  }
  ops::cross_entropy_combine(partials, targets, v, losses, lse);
  return partials;
}

struct ShardCase {
  int64_t n, v, r;
  float logit_scale;
};

class VocabParallelTest : public ::testing::TestWithParam<ShardCase> {};

TEST_P(VocabParallelTest, PartialsMatchDoubleRowStatistics) {
  const ShardCase p = GetParam();
  const Tensor logits = random_tensor({p.n, p.v}, 11, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 12);
  const std::vector<Shard> shards = split_vocab(logits, p.r);
  const Tensor losses = Tensor::empty({p.n}, DType::kF32), lse = Tensor::empty({p.n}, DType::kF32);
  const Tensor partials = sharded_forward(shards, targets, p.v, losses, lse);
  const std::vector<double> x = to_double(logits);
  const std::vector<int32_t> tv = ints_of(targets);
  std::vector<double> want_max, want_sum, want_target, got_max, got_sum, got_target;
  const float* pp = partials.data<float>();
  for (int64_t r = 0; r < p.r; ++r) {
    const Shard& s = shards[r];
    for (int64_t i = 0; i < p.n; ++i) {
      const float* got = pp + (r * p.n + i) * 3;
      const double* row = x.data() + i * p.v + s.start;
      if (s.valid == 0) {  // a shard of padding only: (-inf, 0, 0)
        EXPECT_EQ(got[0], -std::numeric_limits<float>::infinity());
        EXPECT_EQ(got[1], 0.0f);
        EXPECT_EQ(got[2], 0.0f);
        continue;
      }
      const double m = *std::max_element(row, row + s.valid);
      double sum = 0.0;
      for (int64_t j = 0; j < s.valid; ++j) sum += std::exp(row[j] - m);
      const bool owns = tv[i] >= s.start && tv[i] < s.start + s.valid;
      want_max.push_back(m), want_sum.push_back(sum), want_target.push_back(owns ? row[tv[i] - s.start] : 0.0);
      got_max.push_back(got[0]), got_sum.push_back(got[1]), got_target.push_back(got[2]);
    }
  }
  expect_close(got_max, want_max, 0.0, 0.0, "partial row max");
  expect_close(got_sum, want_sum, 1e-6, 0.0, "partial sum of exp");
  expect_close(got_target, want_target, 0.0, 0.0, "partial target logit");
}

TEST_P(VocabParallelTest, CombinedForwardEqualsFusedOnUnsplitLogits) {
  const ShardCase p = GetParam();
  const Tensor logits = random_tensor({p.n, p.v}, 13, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 14);
  const Tensor losses = random_tensor({p.n}, 15), lse = random_tensor({p.n}, 16);
  sharded_forward(split_vocab(logits, p.r), targets, p.v, losses, lse);

  const Tensor fused_losses = Tensor::empty({p.n}, DType::kF32), fused_lse = Tensor::empty({p.n}, DType::kF32);
  ops::cross_entropy_fwd(logits, targets, fused_losses, fused_lse);
  expect_close(losses, to_double(fused_losses), 1e-6, 1e-6, "combined losses vs fused");
  expect_close(lse, to_double(fused_lse), 1e-6, 1e-6, "combined lse vs fused");
  std::vector<double> want_losses, want_lse;
  ref_cross_entropy(to_double(logits), ints_of(targets), p.v, want_losses, want_lse);
  expect_close(losses, want_losses, 1e-5, 1e-5 * p.logit_scale, "combined losses vs double");
  expect_close(lse, want_lse, 1e-6, 1e-6, "combined lse vs double");
  const std::vector<int32_t> tv = ints_of(targets);
  for (int64_t i = 0; i < p.n; ++i) {
    if (tv[i] < 0) {
      EXPECT_EQ(losses.data<float>()[i], 0.0f) << "ignored row " << i;
    }
  }
}

TEST_P(VocabParallelTest, ShardedBackwardConcatenatesToUnsplitBackward) {
  const ShardCase p = GetParam();
  const float scale = 0.37f;
  const Tensor logits = random_tensor({p.n, p.v}, 17, p.logit_scale);
  const Tensor targets = targets_with_ignored(p.n, p.v, 18);
  const std::vector<Shard> shards = split_vocab(logits, p.r);
  const Tensor losses = Tensor::empty({p.n}, DType::kF32), lse = Tensor::empty({p.n}, DType::kF32);
  sharded_forward(shards, targets, p.v, losses, lse);

  const Tensor want = Tensor::empty({p.n, p.v}, DType::kF32);
  ops::cross_entropy_bwd(logits, targets, lse, scale, want);
  const std::vector<double> w = to_double(want);
  std::vector<double> got(w.size());
  for (const Shard& s : shards) {
    const int64_t vl = s.logits.dim(1);
    const Tensor dlogits = random_tensor({p.n, vl}, 19);  // written everywhere, padding included
    ops::cross_entropy_bwd(s.logits, targets, lse, scale, dlogits, s.start, s.valid);
    const Tensor in_place = s.logits.clone();
    ops::cross_entropy_bwd(in_place, targets, lse, scale, in_place, s.start, s.valid);
    expect_close(in_place, to_double(dlogits), 0.0, 0.0, "sharded cross_entropy_bwd in place");
    const float* d = dlogits.data<float>();
    for (int64_t i = 0; i < p.n; ++i) {
      for (int64_t j = 0; j < vl; ++j) {
        if (j < s.valid) {
          got[i * p.v + s.start + j] = d[i * vl + j];
        } else {
          EXPECT_EQ(d[i * vl + j], 0.0f) << "padding column " << s.start + j << " of row " << i;
        }
      }
    }
  }
  expect_close(got, w, 1e-6, 1e-6, "concatenated sharded dlogits vs unsplit");
  const std::vector<int32_t> tv = ints_of(targets);
  for (int64_t i = 0; i < p.n; ++i) {
    if (tv[i] >= 0) continue;
    for (int64_t j = 0; j < p.v; ++j) ASSERT_EQ(got[i * p.v + j], 0.0) << "ignored row " << i;
  }
}

// V = 259 over 3 shards of 87 is the padded split (valid 87, 87, 85); V = 4 over 3 shards of 2
// leaves the last shard all padding; 64 x 1001 over 2 shards runs the kernels in parallel.
INSTANTIATE_TEST_SUITE_P(Shards, VocabParallelTest,
                         ::testing::Values(ShardCase{1, 1, 1, 1.0f}, ShardCase{5, 13, 1, 3.0f},
                                           ShardCase{5, 13, 2, 3.0f}, ShardCase{7, 7, 3, 1.0f},
                                           ShardCase{4, 4, 3, 2.0f}, ShardCase{16, 259, 3, 4.0f},
                                           ShardCase{16, 259, 2, 100.0f}, ShardCase{9, 259, 3, 50.0f},
                                           ShardCase{64, 1001, 2, 10.0f}),
                         [](const ::testing::TestParamInfo<ShardCase>& test) {
                           return fmt::format("N{}_V{}_R{}_scale{}", test.param.n, test.param.v, test.param.r,
                                              static_cast<int>(test.param.logit_scale));
                         });

TEST(VocabParallelCrossEntropy, ErrorsNameOpShapesAndValues) {
  const Tensor logits = random_tensor({4, 7}, 1);
  const Tensor targets = random_ints({4}, 2, 0, 7);
  const Tensor partial = Tensor::empty({4, 3}, DType::kF32);
  const Tensor narrow = Tensor::empty({4, 2}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_partial_fwd(logits, targets, 0, 7, narrow); }),
            "cross_entropy_partial_fwd: partial has shape (4, 2) but logits has shape (4, 7); "
            "expected partial of shape (4, 3)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_partial_fwd(logits, targets, 0, 8, partial); }),
            "cross_entropy_partial_fwd: valid_cols=8 must be in [0, 7], the columns of logits of shape (4, 7)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_partial_fwd(logits, targets, -1, 7, partial); }),
            "cross_entropy_partial_fwd: vocab_start=-1 must be >= 0");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_partial_fwd(logits, targets, 0, 7, random_ints({4, 3}, 3, 0, 2)); }),
            "cross_entropy_partial_fwd: partial must be f32, got i32 with shape (4, 3)");

  const Tensor lse = Tensor::empty({4}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, logits, 7, 8); }),
            "cross_entropy_bwd: valid_cols=8 must be in [0, 7], the columns of logits of shape (4, 7)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_bwd(logits, targets, lse, 1.0f, logits, 7, -1); }),
            "cross_entropy_bwd: valid_cols=-1 (the logits are the whole vocabulary) needs vocab_start=0, got 7");

  const Tensor losses = Tensor::empty({4}, DType::kF32);
  const Tensor partials = random_tensor({2, 4, 3}, 4);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(random_tensor({2, 3, 3}, 5), targets, 7, losses, lse); }),
            "cross_entropy_combine: partials has shape (2, 3, 3) but targets has shape (4); "
            "expected partials of shape (2, 4, 3)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(random_tensor({2, 4, 2}, 5), targets, 7, losses, lse); }),
            "cross_entropy_combine: partials has shape (2, 4, 2) but targets has shape (4); "
            "expected partials of shape (2, 4, 3)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(partial, targets, 7, losses, lse); }),
            "cross_entropy_combine: partials must have 3 dims, got shape (4, 3)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(Tensor::empty({0, 4, 3}, DType::kF32), targets, 7, losses,
                                                      lse); }),
            "cross_entropy_combine: partials has shape (0, 4, 3); expected the partials of at least one shard");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(partials, targets, 7, Tensor::empty({3}, DType::kF32), lse); }),
            "cross_entropy_combine: losses has shape (3) but targets has shape (4); expected losses of shape (4)");
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(partials, targets, 0, losses, lse); }),
            "cross_entropy_combine: vocab_size=0 must be >= 1");

  // The real vocabulary bounds the targets, not the padded one nor any shard's columns.
  std::vector<int32_t> values(8, 3);
  values[5] = 259;
  const Tensor bad = Tensor::from_ints({8}, values);
  const Tensor partials8 = random_tensor({3, 8, 3}, 6);
  const Tensor losses8 = Tensor::empty({8}, DType::kF32), lse8 = Tensor::empty({8}, DType::kF32);
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(partials8, bad, 259, losses8, lse8); }),
            "cross_entropy_combine: target 259 at position 5 is outside the vocabulary [0, 259)");
  bad.data<int32_t>()[5] = 258;
  EXPECT_EQ(error_of([&] { ops::cross_entropy_combine(partials8, bad, 259, losses8, lse8); }), "<no error>");
}

}  // namespace
}  // namespace moeforge
