// Helpers shared by the unit tests: seeded random tensors, double-precision copies, normwise
// comparisons, and central finite differences for checking hand-written backward passes.
//
// The finite-difference recipe every backward test follows: write the op's forward as a naive
// double-precision reference f(x); form the scalar L = sum(f(x) * g) for a random g; take
// dL/dx by central differences of the double reference; run our f32 backward with dout = g and
// compare. Differencing the double reference (not our f32 kernel) keeps the check exact to ~1e-9.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace moeforge::testing {

// Uniform in [-scale, scale), deterministic in seed.
Tensor random_tensor(const Shape& shape, uint64_t seed, float scale = 1.0f);
// Uniform integers in [lo, hi) as i32.
Tensor random_ints(const Shape& shape, uint64_t seed, int32_t lo, int32_t hi);

std::vector<double> to_double(const Tensor& t);
Tensor from_double(const Shape& shape, const std::vector<double>& v);

// ||got - want|| / max(||want||, tiny): the normalised error used across the tests.
double rel_error(const std::vector<double>& got, const std::vector<double>& want);
double rel_error(const Tensor& got, const std::vector<double>& want);
double max_abs_error(const std::vector<double>& got, const std::vector<double>& want);

// Asserts (gtest) that got matches want: normwise relative error <= rtol and every element
// within atol + rtol * |want|.
void expect_close(const Tensor& got, const std::vector<double>& want, double rtol, double atol,
                  const std::string& what);
void expect_close(const std::vector<double>& got, const std::vector<double>& want, double rtol, double atol,
                  const std::string& what);

// Central differences of a scalar function at x, step h per element.
std::vector<double> finite_diff(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
                                double h = 1e-6);

// sum_i a[i] * b[i]
double dot(const std::vector<double>& a, const std::vector<double>& b);

// .npy files (format 1.0, little-endian f4 / i4, C order): the exchange format with the Python
// reference implementations in tests/reference/.
void write_npy(const std::string& path, const Tensor& t);
Tensor read_npy(const std::string& path);

// The message of the moeforge::Error that f() throws, or "<no error>".
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

// Runs a shell command; its exit code (-1 if it did not exit normally) and what it printed on
// stdout (append 2>&1 to the command to capture stderr too).
struct CommandResult {
  int exit_code = -1;
  std::string output;
};
CommandResult run_command(const std::string& command);

// Path of a file in the source tree (MOEFORGE_SOURCE_DIR is set by ctest).
std::string source_path(const std::string& relative);

}  // namespace moeforge::testing
