// The chunk-level machinery of the shard files, in plain C++ (no HDF5), so that the unit tests
// check exactly what the writer and reader run (tests/checkpoint/test_chunks.cpp):
//  - fletcher32: HDF5's Fletcher-32 (its filter H5Z_FILTER_FLETCHER32 appends it, little-endian,
//    to each chunk), bit-identical to the library's definition but summing a block at a time;
//  - ChunkGrid: the chunks of a chunked dataset and those a box of it touches;
//  - copy_box: a sub-box of one row-major array into another (contiguous runs memcpy'd);
//  - ordered_parallel: a bounded producer pool with in-order consumption, which lets worker
//    threads checksum and copy chunks while the one thread that may call HDF5 writes them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace moeforge::checkpoint {

// Fletcher-32 of `bytes` exactly as HDF5 defines it (big-endian 16-bit words, sums reduced every
// 360 words, an odd trailing byte as the high byte of a last word).
uint32_t fletcher32(std::span<const uint8_t> bytes);

// The same checksum over bytes that arrive in pieces (a chunk read partly into its destination,
// partly into a scratch buffer). Every piece but the last must have an even length.
class Fletcher32 {
 public:
  void update(std::span<const uint8_t> bytes);
  uint32_t value() const;

 private:
  uint32_t s1_ = 0, s2_ = 0;
  uint32_t in_block_ = 0;  // words summed since the last 360-word reduction
  bool odd_ = false;       // a piece of odd length was given (it must have been the last)
  uint8_t odd_byte_ = 0;
};

// Whether the box of `count` at any offset of a row-major array of `shape` is one contiguous
// run of elements: leading dims of count 1, then one dim of any count, then whole dims.
bool contiguous_box(std::span<const int64_t> shape, std::span<const int64_t> count);

// The chunks of a dataset of `shape` chunked by `chunk` (same rank; edge chunks extend past the
// dataset, as HDF5 stores them: full size, the part outside the dataset zero-filled).
class ChunkGrid {
 public:
  ChunkGrid(std::vector<int64_t> shape, std::vector<int64_t> chunk);

  int rank() const { return static_cast<int>(shape_.size()); }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& chunk() const { return chunk_; }
  int64_t chunk_elements() const;
  // Origins (element coordinates) of the chunks that intersect the box [offset, offset + count),
  // in row-major order of the chunk grid. An empty box touches no chunk.
  std::vector<std::vector<int64_t>> touching(std::span<const int64_t> offset, std::span<const int64_t> count) const;
  // All chunks, row-major.
  std::vector<std::vector<int64_t>> all() const;

 private:
  std::vector<int64_t> shape_, chunk_;
};

// Copies the box of `count` elements at src_offset of a row-major f32 array of src_shape into the
// row-major array of dst_shape at dst_offset. All four have the same rank; boxes must fit.
void copy_box(const float* src, std::span<const int64_t> src_shape, std::span<const int64_t> src_offset,
              float* dst, std::span<const int64_t> dst_shape, std::span<const int64_t> dst_offset,
              std::span<const int64_t> count);

// Threads for checkpoint I/O: $MOEFORGE_IO_THREADS when set (>= 1), else 8.
int io_threads();

// Runs produce(i) for every i in [0, n) on up to `threads` worker threads, never more than
// `window` items ahead of the consumer, and consume(i) on the calling thread in increasing i once
// produce(i) has returned (so consume may call a library that is not thread-safe, and item i may
// use slot i % window of caller-owned buffers). produce must be safe to run concurrently for
// distinct i. The first exception from either stops the remaining work, joins the workers and is
// rethrown. threads <= 1 or n <= 1 runs everything on the caller.
void ordered_parallel(int64_t n, int threads, int64_t window, const std::function<void(int64_t)>& produce,
                      const std::function<void(int64_t)>& consume);

}  // namespace moeforge::checkpoint
