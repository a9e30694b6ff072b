#include "tests/testing.h"

#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

namespace moeforge::testing {

Tensor random_tensor(const Shape& shape, uint64_t seed, float scale) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  Tensor t = Tensor::empty(shape, DType::kF32);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

Tensor random_ints(const Shape& shape, uint64_t seed, int32_t lo, int32_t hi) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> dist(lo, hi - 1);
  Tensor t = Tensor::empty(shape, DType::kI32);
  int32_t* p = t.data<int32_t>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

std::vector<double> to_double(const Tensor& t) {
  const std::vector<float> f = t.to_floats();
  return {f.begin(), f.end()};
}

Tensor from_double(const Shape& shape, const std::vector<double>& v) {
  std::vector<float> f(v.begin(), v.end());
  return Tensor::from_floats(shape, f);
}

double rel_error(const std::vector<double>& got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

double rel_error(const Tensor& got, const std::vector<double>& want) { return rel_error(to_double(got), want); }

double max_abs_error(const std::vector<double>& got, const std::vector<double>& want) {
  double m = 0.0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) m = std::max(m, std::abs(got[i] - want[i]));
  return m;
}

void expect_close(const std::vector<double>& got, const std::vector<double>& want, double rtol, double atol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what << ": size";
  EXPECT_LE(rel_error(got, want), rtol) << what << ": normwise relative error";
  int reported = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = atol + rtol * std::abs(want[i]);
    if (!(std::abs(got[i] - want[i]) <= tol) && reported++ < 5) {
      ADD_FAILURE() << what << ": element " << i << " is " << got[i] << ", expected " << want[i] << " (tol "
                    << tol << ")";
    }
  }
}

void expect_close(const Tensor& got, const std::vector<double>& want, double rtol, double atol,
                  const std::string& what) {
  expect_close(to_double(got), want, rtol, atol, what);
}

std::vector<double> finite_diff(const std::function<double(const std::vector<double>&)>& f, std::vector<double> x,
                                double h) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) s += a[i] * b[i];
  return s;
}

void write_npy(const std::string& path, const Tensor& t) {
  MOE_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kI32, "write_npy({}): only f32 and i32, got {}", path,
            t.str());
  std::string shape = "(";
  for (int i = 0; i < t.ndim(); ++i) shape += std::to_string(t.dim(i)) + (t.ndim() == 1 ? "," : (i + 1 < t.ndim() ? ", " : ""));
  shape += ")";
  std::string header = std::string("{'descr': '") + (t.dtype() == DType::kF32 ? "<f4" : "<i4") +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad with spaces so that magic (6) + version (2) + length (2) + header ends on a 64-byte boundary.
  const size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  MOE_CHECK(f.good(), "write_npy: cannot open {}", path);
  f.write("\x93NUMPY\x01\x00", 8);
  const uint16_t len = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(t.raw_data()), static_cast<std::streamsize>(t.nbytes()));
  MOE_CHECK(f.good(), "write_npy: failed writing {}", path);
}

Tensor read_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  MOE_CHECK(f.good(), "read_npy: cannot open {}", path);
  char magic[8];
  f.read(magic, 8);
  MOE_CHECK(f.good() && std::memcmp(magic, "\x93NUMPY", 6) == 0, "read_npy: {} is not a .npy file", path);
  uint32_t len = 0;
  if (magic[6] == 1) {
    uint16_t l16 = 0;
    f.read(reinterpret_cast<char*>(&l16), 2);
    len = l16;
  } else {
    f.read(reinterpret_cast<char*>(&len), 4);
  }
  std::string header(len, '\0');
  f.read(header.data(), len);
  const bool is_f4 = header.find("'<f4'") != std::string::npos;
  const bool is_i4 = header.find("'<i4'") != std::string::npos;
  MOE_CHECK(is_f4 || is_i4, "read_npy: {}: only <f4 and <i4 are supported, header {}", path, header);
  MOE_CHECK(header.find("'fortran_order': False") != std::string::npos, "read_npy: {}: Fortran order", path);
  const size_t open = header.find('(', header.find("'shape'"));
  const size_t close = header.find(')', open);
  std::vector<int64_t> dims;
  std::string inner = header.substr(open + 1, close - open - 1);
  size_t pos = 0;
  while (pos < inner.size()) {
    const size_t comma = inner.find(',', pos);
    const std::string item = inner.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.find_first_of("0123456789") != std::string::npos) dims.push_back(std::stoll(item));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  Tensor t = Tensor::empty(Shape(std::span<const int64_t>(dims.data(), dims.size())), is_f4 ? DType::kF32 : DType::kI32);
  f.read(static_cast<char*>(t.raw_data()), static_cast<std::streamsize>(t.nbytes()));
  MOE_CHECK(f.good(), "read_npy: {} is truncated", path);
  return t;
}

CommandResult run_command(const std::string& command) {
  CommandResult r;
  std::FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf{};
  for (size_t n; (n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0;) r.output.append(buf.data(), n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string source_path(const std::string& relative) {
  const char* root = std::getenv("MOEFORGE_SOURCE_DIR");
  return std::string(root ? root : ".") + "/" + relative;
}

}  // namespace moeforge::testing
