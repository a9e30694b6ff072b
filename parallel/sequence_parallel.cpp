#include "parallel/sequence_parallel.h"

#include <array>

namespace moeforge {

namespace {
Shape with_rows(const Shape& s, int64_t rows) {
  std::array<int64_t, Shape::kMaxDims> d{};
  for (int i = 0; i < s.ndim(); ++i) d[i] = s[i];
  d[0] = rows;
  return Shape(std::span<const int64_t>(d.data(), static_cast<size_t>(s.ndim())));
}
}  // namespace

Tensor gather_rows(Comm& tp, const Tensor& local) {
  if (tp.size() == 1) return local;
  const Tensor full = Tensor::empty(with_rows(local.shape(), local.dim(0) * tp.size()), local.dtype(), local.device());
  tp.all_gather(local, full);
  return full;
}

Tensor scatter_rows(Comm& tp, const Tensor& full) {
  if (tp.size() == 1) return full;
  MOE_CHECK(full.dim(0) % tp.size() == 0, "scatter_rows: {} rows do not split over {} {} ranks", full.dim(0),
            tp.size(), tp.name());
  const Tensor local = Tensor::empty(with_rows(full.shape(), full.dim(0) / tp.size()), full.dtype(), full.device());
  tp.reduce_scatter(full, local);
  return local;
}

}  // namespace moeforge
