// CPU embedding lookup and its scatter-add backward, for a whole table or one vocab-parallel shard
// (rows [vocab_start, vocab_start + Vl) of the vocabulary).
//
// The backward is deterministic without atomics: the positions are bucketed by their row in the
// table (a stable counting sort; ids of other shards are dropped), and each table row is then
// owned by one thread, which adds its positions' gradients in ascending position order — the
// order a serial loop would use.
#include <cstring>
#include <string_view>
#include <vector>

#include "runtime/cpu/dense.h"

namespace moeforge::cpu {
namespace {

// The ids live in the tensor's memory, so only the kernel can check them (before any thread
// starts: an exception must not leave an OpenMP region). Every id must be a real token, also
// those another shard owns.
void check_ids(std::string_view op, const int32_t* ids, int64_t n, int64_t vocab_size) {
  for (int64_t i = 0; i < n; ++i) {
    MOE_CHECK(ids[i] >= 0 && ids[i] < vocab_size, "{}: id {} at position {} is outside the vocabulary [0, {})", op,
              ids[i], i, vocab_size);
  }
}

}  // namespace

void embedding_fwd(const Tensor& ids, const Tensor& table, const Tensor& out, int64_t vocab_start,
                   int64_t vocab_size) {
  const int32_t* pid = ids.data<int32_t>();
  const float* pt = table.data<float>();
  float* po = out.data<float>();
  const int64_t n = ids.numel();
  const int64_t rows = table.dim(0);
  const int64_t c = table.dim(1);
  check_ids("embedding_fwd", pid, n, vocab_size);
#pragma omp parallel for schedule(static) if (n * c > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = pid[i] - vocab_start;
    if (r >= 0 && r < rows) {
      std::memcpy(po + i * c, pt + r * c, static_cast<size_t>(c) * sizeof(float));
    } else {
      std::memset(po + i * c, 0, static_cast<size_t>(c) * sizeof(float));
    }
  }
}

void embedding_bwd(const Tensor& ids, const Tensor& dout, const Tensor& dtable, int64_t vocab_start,
                   int64_t vocab_size) {
  const int32_t* pid = ids.data<int32_t>();
  const float* pd = dout.data<float>();
  float* pt = dtable.data<float>();
  const int64_t n = ids.numel();
  const int64_t rows = dtable.dim(0);
  const int64_t c = dtable.dim(1);
  check_ids("embedding_bwd", pid, n, vocab_size);

  // Positions of table row r are order[start[r] .. start[r+1]), ascending.
  std::vector<int64_t> start(static_cast<size_t>(rows) + 1, 0);
  const auto row_of = [&](int64_t i) { return pid[i] - vocab_start; };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = row_of(i);
    if (r >= 0 && r < rows) ++start[r + 1];
  }
  for (int64_t r = 0; r < rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(static_cast<size_t>(start[rows]));
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = row_of(i);
      if (r >= 0 && r < rows) order[next[r]++] = i;
    }
  }

  // Dynamic schedule: frequent tokens own many more positions than rare ones.
#pragma omp parallel for schedule(dynamic, 64) if (start[rows] * c > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = pt + r * c;
    for (int64_t k = start[r]; k < start[r + 1]; ++k) {
      const float* src = pd + order[k] * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) dst[j] += src[j];
    }
  }
}

}  // namespace moeforge::cpu
