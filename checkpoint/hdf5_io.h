// HDF5 shard files: one file per writing rank, one dataset per stored tensor block.
//
// A dataset is an f32 (little-endian IEEE) array with chunked layout and the Fletcher-32 filter,
// so every chunk carries its own checksum and a damaged chunk fails its read with an error that
// names the file, the dataset and the chunk. The chunks are made and checked by our own code
// (checkpoint/chunks.h) on worker threads — H5Dwrite_chunk writes them as the filter would have
// stored them, and reads take each chunk's address from HDF5 and pread it — so checksums and
// copies run in parallel while HDF5 itself is called from one thread; any file HDF5 can read
// (another writer's layout or filters) still loads through H5Dread. Each dataset carries attributes describing the block in model
// coordinates: `name` (canonical tensor name), `kind` ("param", "exp_avg", "exp_avg_sq"),
// `global_shape` and `offset` (int64 arrays, same rank as the block).
//
// Every HDF5 call goes through MOE_H5_CHECK; a failure throws moeforge::Error naming the file,
// the dataset and HDF5's own description of the innermost error (e.g. "data corrupted" for a
// Fletcher-32 mismatch). HDF5's automatic error printing is turned off.
//
// Threads: the serial HDF5 library is not thread-safe. moeforge calls HDF5 from one thread at a
// time (the chunk workers never call it) (a background save owns it until it finishes; load and inspect run while no save is in
// flight — checkpoint/save.h enforces this by joining the writer first).
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "checkpoint/direct_io.h"

namespace moeforge::checkpoint {

namespace detail {
// The description of the innermost error on HDF5's error stack, then clears the stack.
std::string h5_error_text();
[[noreturn]] void h5_failed(const char* statement, const std::string& where, const char* file, int line);
}  // namespace detail

// Checks an HDF5 return value (negative means failure) and yields it; `where` names the file
// and dataset for the message.
#define MOE_H5_CHECK(stmt, where)                                                              \
  ([&]() {                                                                                     \
    const auto moe_h5_rc_ = (stmt);                                                            \
    if (moe_h5_rc_ < 0) [[unlikely]] ::moeforge::checkpoint::detail::h5_failed(#stmt, (where), __FILE__, __LINE__); \
    return moe_h5_rc_;                                                                         \
  }())

// The description a dataset carries.
struct BlockAttrs {
  std::string name;
  std::string kind;
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offset;
};

// Chunk reads queued from any number of datasets and files (H5File::read with a batch), run
// together on the I/O threads: a model has many tensors of a few chunks each, and reading them
// one tensor at a time would leave the disk with a request or two in flight at every tensor's
// end. Reads of other layouts (HDF5's own H5Dread) are not queued; they happen in read().
class ChunkReads {
 public:
  ChunkReads();
  ~ChunkReads();
  ChunkReads(const ChunkReads&) = delete;
  ChunkReads& operator=(const ChunkReads&) = delete;

  int64_t pending() const;
  // Runs every queued read. On the first failure (a damaged chunk, a read error) the rest stop,
  // on_error gets the path of the failing read's file, and the error is rethrown. The batch is
  // empty afterwards either way.
  void run(const std::function<void(const std::string& path)>& on_error);

 private:
  friend class H5File;
  struct Jobs;
  std::unique_ptr<Jobs> jobs_;
};

class H5File {
 public:
  // Creates (truncating) a shard file for writing.
  static H5File create(const std::string& path);
  // Opens an existing shard file read-only; a missing file throws naming it.
  static H5File open(const std::string& path);

  H5File(H5File&& other) noexcept;
  H5File& operator=(H5File&& other) noexcept;
  H5File(const H5File&) = delete;
  H5File& operator=(const H5File&) = delete;
  ~H5File();

  const std::string& path() const { return path_; }

  // Writes `data`, a row-major block of `shape`, as dataset `dataset` (intermediate groups are
  // created), chunked with Fletcher-32, with the attributes `attrs`.
  void write(const std::string& dataset, const float* data, std::span<const int64_t> shape, const BlockAttrs& attrs);

  // The shape of a dataset; throws naming file and dataset unless it is f32.
  std::vector<int64_t> f32_shape(const std::string& dataset) const;
  // Reads the box [src_offset, src_offset + count) of the dataset into `dst`, a row-major
  // buffer of shape dst_shape, at dst_offset. With a batch, the chunk reads of a dataset in this
  // file's own layout are only queued (their addresses looked up now): they run, and dst is
  // filled, at batch->run(), which must come while this file is open.
  void read(const std::string& dataset, std::span<const int64_t> src_offset, std::span<const int64_t> count,
            float* dst, std::span<const int64_t> dst_shape, std::span<const int64_t> dst_offset,
            ChunkReads* batch = nullptr) const;
  BlockAttrs attrs(const std::string& dataset) const;
  // Every dataset's path in the file ("param/embed.weight", ...), sorted.
  std::vector<std::string> datasets() const;

  // Asks the kernel to start writing the file's dirty pages to disk now, without waiting for
  // them (Linux sync_file_range): the disk then works while the next datasets are checksummed
  // and copied, and the fsync after close() finds little left to write. Best effort.
  void start_writeback() const;

  // Flushes and closes; errors surface here rather than in the destructor.
  void close();

 private:
  H5File(hid_t id, std::string path) : id_(id), path_(std::move(path)) {}
  std::string where(const std::string& dataset) const;
  // read() of a dataset in this file's own layout: chunk addresses from HDF5, then the chunks
  // read with pread, checksummed and scattered on worker threads. False (nothing read) for any
  // other layout, which HDF5 then reads itself.
  bool read_chunks(hid_t ds, const std::string& where, std::span<const int64_t> src_offset,
                   std::span<const int64_t> count, float* dst, std::span<const int64_t> dst_shape,
                   std::span<const int64_t> dst_offset, ChunkReads* batch) const;
  // A plain read-only descriptor of the file for the chunk reads, opened on first use.
  int raw_fd() const;
  // The same with O_DIRECT (checkpoint/direct_io.h), or -1 where direct I/O is off or refused.
  int direct_fd() const;

  hid_t id_ = H5I_INVALID_HID;
  mutable int fd_ = -1;
  mutable int dfd_ = -2;  // -2: not tried yet
  std::string path_;
  mutable std::vector<AlignedBuffer> slots_;  // chunk buffers, reused by every write and read
};

}  // namespace moeforge::checkpoint
