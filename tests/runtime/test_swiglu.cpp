// Tests swiglu_fwd / swiglu_bwd (runtime/ops_dense.cpp, runtime/cpu/swiglu.cpp): the forward
// against silu(gate) * up in double, the backward against finite differences, gates of large
// magnitude (finite, correct values, no NaN), and the argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "runtime/ops.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

using testing::expect_close;
using testing::random_tensor;
using testing::to_double;

using testing::error_of;

std::vector<double> ref_swiglu(const std::vector<double>& gate, const std::vector<double>& up) {
  std::vector<double> out(gate.size());
  for (size_t i = 0; i < gate.size(); ++i) out[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
  return out;
}

struct Grads {
  std::vector<double> dgate, dup;
};

// Central differences of L = sum(swiglu(gate, up) * g).
Grads fd_swiglu(const std::vector<double>& gate, const std::vector<double>& up, const std::vector<double>& g) {
  return {testing::finite_diff([&](const std::vector<double>& gp) { return testing::dot(ref_swiglu(gp, up), g); },
                               gate),
          testing::finite_diff([&](const std::vector<double>& upp) { return testing::dot(ref_swiglu(gate, upp), g); },
                               up)};
}

std::string shape_name(const ::testing::TestParamInfo<Shape>& test) {
  std::string name;
  for (int64_t d : test.param.dims()) {
    if (!name.empty()) name += "x";
    name += std::to_string(d);
  }
  return name;
}

class SwigluTest : public ::testing::TestWithParam<Shape> {};

TEST_P(SwigluTest, ForwardMatchesDouble) {
  const Shape shape = GetParam();
  const Tensor gate = random_tensor(shape, 1, 6.0f);
  const Tensor up = random_tensor(shape, 2);
  const Tensor out = Tensor::empty(shape, DType::kF32);
  ops::swiglu_fwd(gate, up, out);
  expect_close(out, ref_swiglu(to_double(gate), to_double(up)), 1e-5, 1e-6, "swiglu_fwd");
}

INSTANTIATE_TEST_SUITE_P(Shapes, SwigluTest,
                         ::testing::Values(Shape{1, 1}, Shape{3, 13}, Shape{5, 37}, Shape{2, 3, 7}, Shape{128, 300}),
                         shape_name);

// Finite differences cost O(numel^2): small shapes only.
class SwigluGradTest : public ::testing::TestWithParam<Shape> {};

TEST_P(SwigluGradTest, BackwardMatchesFiniteDifferences) {
  const Shape shape = GetParam();
  const Tensor gate = random_tensor(shape, 3, 4.0f);
  const Tensor up = random_tensor(shape, 4);
  const Tensor g = random_tensor(shape, 5);
  const Grads fd = fd_swiglu(to_double(gate), to_double(up), to_double(g));
  const Tensor dgate = random_tensor(shape, 6), dup = random_tensor(shape, 7);  // both written
  ops::swiglu_bwd(gate, up, g, dgate, dup);
  expect_close(dgate, fd.dgate, 1e-4, 1e-5, "swiglu_bwd dgate");
  expect_close(dup, fd.dup, 1e-4, 1e-5, "swiglu_bwd dup");
}

INSTANTIATE_TEST_SUITE_P(Shapes, SwigluGradTest,
                         ::testing::Values(Shape{1, 1}, Shape{3, 13}, Shape{5, 37}, Shape{2, 3, 7}), shape_name);

TEST(Swiglu, LargeGatesStayFiniteAndCorrect) {
  const std::vector<float> gates{-1000.0f, -100.0f, -88.0f, -30.0f, -20.0f, 20.0f, 30.0f, 88.0f, 100.0f, 1000.0f};
  const Shape shape{2, 5};
  const Tensor gate = Tensor::from_floats(shape, gates);
  const Tensor up = random_tensor(shape, 1);
  const Tensor g = random_tensor(shape, 2);
  const Tensor out = Tensor::empty(shape, DType::kF32);
  const Tensor dgate = Tensor::empty(shape, DType::kF32), dup = Tensor::empty(shape, DType::kF32);
  ops::swiglu_fwd(gate, up, out);
  ops::swiglu_bwd(gate, up, g, dgate, dup);
  for (float v : out.to_floats()) EXPECT_TRUE(std::isfinite(v));
  for (float v : dgate.to_floats()) EXPECT_TRUE(std::isfinite(v));
  for (float v : dup.to_floats()) EXPECT_TRUE(std::isfinite(v));
  expect_close(out, ref_swiglu(to_double(gate), to_double(up)), 1e-6, 1e-12, "swiglu_fwd at large |gate|");
  const Grads fd = fd_swiglu(to_double(gate), to_double(up), to_double(g));
  expect_close(dgate, fd.dgate, 1e-5, 1e-8, "swiglu_bwd dgate at large |gate|");
  expect_close(dup, fd.dup, 1e-5, 1e-8, "swiglu_bwd dup at large |gate|");
}

TEST(Swiglu, ArgumentErrors) {
  const Tensor gate = random_tensor({4, 6}, 1);
  const Tensor up = random_tensor({4, 6}, 2);
  EXPECT_EQ(error_of([&] { ops::swiglu_fwd(gate, random_tensor({4, 5}, 3), Tensor::empty({4, 6}, DType::kF32)); }),
            "swiglu_fwd: up has shape (4, 5) but gate has shape (4, 6); expected up of shape (4, 6)");
  EXPECT_EQ(error_of([&] { ops::swiglu_fwd(gate, up, Tensor::empty({6, 4}, DType::kF32)); }),
            "swiglu_fwd: out has shape (6, 4) but gate has shape (4, 6); expected out of shape (4, 6)");
  EXPECT_EQ(error_of([&] {
              ops::swiglu_bwd(gate, up, gate, Tensor::empty({4, 6}, DType::kF32), Tensor::empty({24}, DType::kF32));
            }),
            "swiglu_bwd: dup has shape (24) but gate has shape (4, 6); expected dup of shape (4, 6)");
  EXPECT_EQ(error_of([&] { ops::swiglu_fwd(gate, Tensor::zeros({4, 6}, DType::kI32), gate); }),
            "swiglu_fwd: up is i32 but gate is f32; they must have the same dtype");
}

}  // namespace
}  // namespace moeforge
