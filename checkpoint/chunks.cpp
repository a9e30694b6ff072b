#include "checkpoint/chunks.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "runtime/error.h"

namespace moeforge::checkpoint {

void Fletcher32::update(std::span<const uint8_t> bytes) {
  MOE_CHECK(!odd_, "Fletcher32::update: only the last piece may have an odd length");
  const uint8_t* d = bytes.data();
  size_t words = bytes.size() / 2;
  // HDF5 adds word after word: s1 += w; s2 += s1, and folds both sums to 17 bits every 360
  // words. Over a run of n words that is s1 += Σ w_j and s2 += n * s1 + Σ (n - j) w_j; all
  // arithmetic is uint32 and wraps exactly as the word-by-word loop would, so the result is
  // bit-identical while the sums over a run vectorise.
  while (words > 0) {
    // The rest of the current 360-word block.
    const uint32_t n = static_cast<uint32_t>(std::min<size_t>(words, 360 - in_block_));
    words -= n;
    uint32_t a = 0, b = 0;
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t w = (static_cast<uint32_t>(d[2 * j]) << 8) | d[2 * j + 1];
      a += w;
      b += (n - j) * w;
    }
    d += 2 * static_cast<size_t>(n);
    s2_ += n * s1_ + b;
    s1_ += a;
    in_block_ += n;
    if (in_block_ == 360) {
      s1_ = (s1_ & 0xffff) + (s1_ >> 16);
      s2_ = (s2_ & 0xffff) + (s2_ >> 16);
      in_block_ = 0;
    }
  }
  if (bytes.size() % 2 != 0) {
    odd_ = true;
    odd_byte_ = *d;
  }
}

uint32_t Fletcher32::value() const {
  uint32_t s1 = s1_, s2 = s2_;
  if (in_block_ > 0) {  // HDF5 reduces after the last, partial block too
    s1 = (s1 & 0xffff) + (s1 >> 16);
    s2 = (s2 & 0xffff) + (s2 >> 16);
  }
  if (odd_) {
    s1 += static_cast<uint32_t>(odd_byte_) << 8;
    s2 += s1;
    s1 = (s1 & 0xffff) + (s1 >> 16);
    s2 = (s2 & 0xffff) + (s2 >> 16);
  }
  s1 = (s1 & 0xffff) + (s1 >> 16);
  s2 = (s2 & 0xffff) + (s2 >> 16);
  return (s2 << 16) | s1;
}

uint32_t fletcher32(std::span<const uint8_t> bytes) {
  Fletcher32 f;
  f.update(bytes);
  return f.value();
}

bool contiguous_box(std::span<const int64_t> shape, std::span<const int64_t> count) {
  const size_t r = count.size();
  size_t d = 0;
  while (d < r && count[d] == 1) ++d;
  if (d < r) ++d;  // the one dim of any count
  for (; d < r; ++d)
    if (count[d] != shape[d]) return false;
  return true;
}

ChunkGrid::ChunkGrid(std::vector<int64_t> shape, std::vector<int64_t> chunk)
    : shape_(std::move(shape)), chunk_(std::move(chunk)) {
  MOE_CHECK(shape_.size() == chunk_.size(), "ChunkGrid: shape of rank {} but chunk of rank {}", shape_.size(),
            chunk_.size());
  for (const int64_t c : chunk_) MOE_CHECK(c >= 1, "ChunkGrid: chunk dims must be >= 1");
}

int64_t ChunkGrid::chunk_elements() const {
  int64_t n = 1;
  for (const int64_t c : chunk_) n *= c;
  return n;
}

std::vector<std::vector<int64_t>> ChunkGrid::touching(std::span<const int64_t> offset,
                                                      std::span<const int64_t> count) const {
  const int r = rank();
  MOE_CHECK(static_cast<int>(offset.size()) == r && static_cast<int>(count.size()) == r,
            "ChunkGrid::touching: a box of rank {} in a dataset of rank {}", offset.size(), r);
  std::vector<int64_t> first(r), last(r);  // chunk indices, inclusive
  for (int d = 0; d < r; ++d) {
    if (count[d] <= 0) return {};
    MOE_CHECK(offset[d] >= 0 && offset[d] + count[d] <= shape_[d], "ChunkGrid::touching: box outside the dataset");
    first[d] = offset[d] / chunk_[d];
    last[d] = (offset[d] + count[d] - 1) / chunk_[d];
  }
  std::vector<std::vector<int64_t>> out;
  std::vector<int64_t> idx = first;
  for (;;) {
    std::vector<int64_t>& origin = out.emplace_back(r);
    for (int d = 0; d < r; ++d) origin[d] = idx[d] * chunk_[d];
    int d = r - 1;
    for (; d >= 0; --d) {
      if (++idx[d] <= last[d]) break;
      idx[d] = first[d];
    }
    if (d < 0) break;
  }
  return out;
}

std::vector<std::vector<int64_t>> ChunkGrid::all() const {
  std::vector<int64_t> zero(shape_.size(), 0);
  return touching(zero, shape_);
}

void copy_box(const float* src, std::span<const int64_t> src_shape, std::span<const int64_t> src_offset,
              float* dst, std::span<const int64_t> dst_shape, std::span<const int64_t> dst_offset,
              std::span<const int64_t> count) {
  const int r = static_cast<int>(count.size());
  for (int d = 0; d < r; ++d)
    if (count[d] <= 0) return;
  if (r == 0) {
    *dst = *src;
    return;
  }
  // Fold the innermost dims into one contiguous run while both arrays are whole along them.
  int inner = r - 1;
  int64_t run = count[r - 1];
  while (inner > 0 && count[inner] == src_shape[inner] && count[inner] == dst_shape[inner]) {
    --inner;
    run *= count[inner];
  }
  // Row-major strides of both arrays.
  std::vector<int64_t> ss(r, 1), ds(r, 1);
  for (int d = r - 2; d >= 0; --d) {
    ss[d] = ss[d + 1] * src_shape[d + 1];
    ds[d] = ds[d + 1] * dst_shape[d + 1];
  }
  std::vector<int64_t> idx(static_cast<size_t>(inner), 0);  // over dims [0, inner)
  for (;;) {
    int64_t so = 0, dof = 0;
    for (int d = 0; d < inner; ++d) {
      so += (src_offset[d] + idx[d]) * ss[d];
      dof += (dst_offset[d] + idx[d]) * ds[d];
    }
    so += src_offset[inner] * ss[inner];
    dof += dst_offset[inner] * ds[inner];
    std::memcpy(dst + dof, src + so, static_cast<size_t>(run) * sizeof(float));
    int d = inner - 1;
    for (; d >= 0; --d) {
      if (++idx[d] < count[d]) break;
      idx[d] = 0;
    }
    if (d < 0) break;
  }
}

int io_threads() {
  if (const char* env = std::getenv("MOEFORGE_IO_THREADS")) {
    const long n = std::strtol(env, nullptr, 10);
    MOE_CHECK(n >= 1, "MOEFORGE_IO_THREADS must be an integer >= 1, got '{}'", env);
    return static_cast<int>(n);
  }
  // 8 whatever the core count: with direct I/O a worker mostly waits in pread, and several
  // requests in flight are what keep a disk busy (cold resumes of the 1.3 GB bench checkpoint on
  // a 2-core VM: 4 threads 1.05-1.26 s, 8 threads 0.94-1.08 s, 16 threads 1.25-1.51 s).
  return 8;
}

void ordered_parallel(int64_t n, int threads, int64_t window, const std::function<void(int64_t)>& produce,
                      const std::function<void(int64_t)>& consume) {
  MOE_CHECK(window >= 1, "ordered_parallel: window must be >= 1");
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) {
      produce(i);
      consume(i);
    }
    return;
  }
  std::mutex mu;
  std::condition_variable cv;
  int64_t next = 0;      // the next item a worker takes
  int64_t consumed = 0;  // items the caller has consumed
  std::vector<char> ready(static_cast<size_t>(window), 0);
  bool stop = false;
  std::exception_ptr error;
  const auto worker = [&] {
    for (;;) {
      int64_t i = 0;
      {
        std::unique_lock lock(mu);
        cv.wait(lock, [&] { return stop || next >= n || next < consumed + window; });
        if (stop || next >= n) return;
        i = next++;
      }
      try {
        produce(i);
      } catch (...) {
        std::lock_guard lock(mu);
        if (!error) error = std::current_exception();
        stop = true;
        cv.notify_all();
        return;
      }
      std::lock_guard lock(mu);
      ready[static_cast<size_t>(i % window)] = 1;
      cv.notify_all();
    }
  };
  std::vector<std::thread> pool;
  const int64_t workers = std::min<int64_t>({threads, n, window});
  for (int64_t t = 0; t < workers; ++t) pool.emplace_back(worker);
  const auto finish = [&] {
    {
      std::lock_guard lock(mu);
      stop = true;
    }
    cv.notify_all();
    for (std::thread& t : pool) t.join();
  };
  for (int64_t i = 0; i < n; ++i) {
    {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return stop || ready[static_cast<size_t>(i % window)] != 0; });
      if (error) break;
      ready[static_cast<size_t>(i % window)] = 0;
    }
    try {
      consume(i);
    } catch (...) {
      std::lock_guard lock(mu);
      if (!error) error = std::current_exception();
      break;
    }
    std::lock_guard lock(mu);
    consumed = i + 1;
    cv.notify_all();
  }
  finish();
  if (error) std::rethrow_exception(error);
}

}  // namespace moeforge::checkpoint
