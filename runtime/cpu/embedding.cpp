// CPU embedding lookup and its scatter-add backward.
//
// The backward is deterministic without atomics: the positions are bucketed by id (a stable
// counting sort), and each vocabulary row is then owned by one thread, which adds its positions'
// gradients in ascending position order — the order a serial loop would use.
#include <cstring>
#include <string_view>
#include <vector>

#include "runtime/cpu/dense.h"

namespace moeforge::cpu {
namespace {

// The ids live in the tensor's memory, so only the kernel can check them (before any thread
// starts: an exception must not leave an OpenMP region).
void check_ids(std::string_view op, const int32_t* ids, int64_t n, int64_t v) {
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(ids[i] >= 0 && ids[i] < v, "{}: id {} at position {} is outside the vocabulary [0, {})", op, ids[i], i,
              v);
  }
}

}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out) {
  const int32_t* pid = ids.data<int32_t>();
  const float* pt = table.data<float>();
  float* po = out.data<float>();
  const int64_t n = ids.numel();
  const int64_t v = table.dim(0);
  const int64_t c = table.dim(1);
  check_ids("embedding_fwd", pid, n, v);
#pragma omp parallel for schedule(static) if (n * c > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(po + i * c, pt + static_cast<int64_t>(pid[i]) * c, static_cast<size_t>(c) * sizeof(float));
  }
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable) {
  const int32_t* pid = ids.data<int32_t>();
  const float* pd = dout.data<float>();
  float* pt = dtable.data<float>();
  const int64_t n = ids.numel();
  const int64_t v = dtable.dim(0);
  const int64_t c = dtable.dim(1);
  check_ids("embedding_bwd", pid, n, v);

  // Positions of id u are order[start[u] .. start[u+1]), ascending.
  std::vector<int64_t> start(static_cast<size_t>(v) + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++start[pid[i] + 1];
  for (int64_t u = 0; u < v; ++u) start[u + 1] += start[u];
  std::vector<int64_t> order(static_cast<size_t>(n));
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[next[pid[i]]++] = i;
  }

  // Dynamic schedule: frequent tokens own many more positions than rare ones.
#pragma omp parallel for schedule(dynamic, 64) if (n * c > (1 << 16))
  for (int64_t u = 0; u < v; ++u) {
    float* dst = pt + u * c;
    for (int64_t k = start[u]; k < start[u + 1]; ++k) {
      const float* src = pd + order[k] * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace moeforge::cpu
