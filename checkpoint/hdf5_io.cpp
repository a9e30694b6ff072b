#include "checkpoint/hdf5_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <atomic>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>

#include <fmt/format.h>

#include "checkpoint/chunks.h"
#include "checkpoint/placement.h"
#include "runtime/error.h"

namespace moeforge::checkpoint {

namespace {

// Chunks of about this many bytes: large enough for sequential I/O, small enough that a reader
// of a part of a block (another TP/EP layout) reads and checksums little beyond its part.
constexpr int64_t kChunkBytes = int64_t{4} << 20;

// Closes an HDF5 identifier when it goes out of scope (also when a check throws).
struct H5Handle {
  H5Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  ~H5Handle() {
    if (id >= 0) close(id);
  }
  hid_t id;
  herr_t (*close)(hid_t);
};

void silence_hdf5() {
  static std::once_flag once;
  std::call_once(once, [] { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); });
}

herr_t collect_innermost(unsigned n, const H5E_error2_t* e, void* out) {
  // Walking upward from the innermost error: keep the first description (the most specific one).
  auto* text = static_cast<std::string*>(out);
  if (n == 0 && e->desc && *e->desc) *text = fmt::format("{} (in {})", e->desc, e->func_name ? e->func_name : "?");
  return 0;
}

std::vector<hsize_t> to_hsize(std::span<const int64_t> v) { return {v.begin(), v.end()}; }

// Chunk dims: whole trailing dims, as many leading rows as fit in kChunkBytes (at least one);
// when one row alone is too large, the same rule one dimension further in.
std::vector<hsize_t> chunk_dims(std::span<const int64_t> shape) {
  std::vector<hsize_t> chunk(shape.begin(), shape.end());
  int64_t inner = 4;  // bytes per element
  for (size_t d = shape.size(); d-- > 0;) inner *= std::max<int64_t>(shape[d], 1);
  for (size_t d = 0; d < shape.size(); ++d) {
    inner /= std::max<int64_t>(shape[d], 1);  // bytes of one index of dim d
    const int64_t rows = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(inner, 1), 1, std::max<int64_t>(shape[d], 1));
    chunk[d] = static_cast<hsize_t>(rows);
    if (inner <= kChunkBytes) break;
  }
  return chunk;
}

void write_string_attr(hid_t obj, const char* name, const std::string& value, const std::string& where) {
  const hid_t type = MOE_H5_CHECK(H5Tcopy(H5T_C_S1), where);
  MOE_H5_CHECK(H5Tset_size(type, std::max<size_t>(value.size(), 1)), where);
  const hid_t space = MOE_H5_CHECK(H5Screate(H5S_SCALAR), where);
  const hid_t attr = MOE_H5_CHECK(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), where);
  std::string padded = value.empty() ? std::string(1, '\0') : value;
  MOE_H5_CHECK(H5Awrite(attr, type, padded.data()), where);
  H5Aclose(attr);
  H5Sclose(space);
  H5Tclose(type);
}

void write_ints_attr(hid_t obj, const char* name, const std::vector<int64_t>& value, const std::string& where) {
  const hsize_t n = value.size();
  const hid_t space = MOE_H5_CHECK(H5Screate_simple(1, &n, nullptr), where);
  const hid_t attr = MOE_H5_CHECK(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), where);
  MOE_H5_CHECK(H5Awrite(attr, H5T_NATIVE_INT64, value.data()), where);
  H5Aclose(attr);
  H5Sclose(space);
}

std::string read_string_attr(hid_t obj, const char* name, const std::string& where) {
  const hid_t attr = MOE_H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT), where);
  const hid_t type = MOE_H5_CHECK(H5Aget_type(attr), where);
  std::string value(H5Tget_size(type), '\0');
  MOE_H5_CHECK(H5Aread(attr, type, value.data()), where);
  H5Tclose(type);
  H5Aclose(attr);
  value.resize(std::strlen(value.c_str()));
  return value;
}

std::vector<int64_t> read_ints_attr(hid_t obj, const char* name, const std::string& where) {
  const hid_t attr = MOE_H5_CHECK(H5Aopen(obj, name, H5P_DEFAULT), where);
  const hid_t space = MOE_H5_CHECK(H5Aget_space(attr), where);
  std::vector<int64_t> value(static_cast<size_t>(MOE_H5_CHECK(H5Sget_simple_extent_npoints(space), where)));
  MOE_H5_CHECK(H5Aread(attr, H5T_NATIVE_INT64, value.data()), where);
  H5Sclose(space);
  H5Aclose(attr);
  return value;
}

herr_t collect_dataset(hid_t, const char* name, const H5O_info_t* info, void* out) {
  if (info->type == H5O_TYPE_DATASET) static_cast<std::vector<std::string>*>(out)->push_back(name);
  return 0;
}

}  // namespace

namespace detail {

std::string h5_error_text() {
  std::string text;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_innermost, &text);
  H5Eclear2(H5E_DEFAULT);
  return text.empty() ? std::string("no HDF5 error description") : text;
}

void h5_failed(const char* statement, const std::string& where, const char* file, int line) {
  const std::string text = h5_error_text();
  throw Error(fmt::format("{}: HDF5 error: {} [{}]", where, text, statement), fmt::format("{}:{}", file, line));
}

}  // namespace detail

H5File H5File::create(const std::string& path) {
  silence_hdf5();
  // The HDF5 1.10 file format: its superblock, object headers and chunk indexes (fixed arrays)
  // carry checksums of their own, so together with Fletcher-32 on the chunks every byte a load
  // reads is checked. Readers need HDF5 >= 1.10 (h5py has bundled it since 2018).
  // The driver and alignment of checkpoint/direct_io.h: chunk data written with O_DIRECT.
  const H5Handle fapl(shard_file_access_plist(), H5Pclose);
  MOE_H5_CHECK(H5Pset_libver_bounds(fapl.id, H5F_LIBVER_V110, H5F_LIBVER_V110), path);
  const hid_t id = MOE_H5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id), path);
  return H5File(id, path);
}

H5File H5File::open(const std::string& path) {
  silence_hdf5();
  MOE_CHECK(std::filesystem::exists(path), "{}: shard file is missing", path);
  const hid_t id = MOE_H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path);
  return H5File(id, path);
}

H5File::H5File(H5File&& other) noexcept
    : id_(other.id_), fd_(other.fd_), dfd_(other.dfd_), path_(std::move(other.path_)), slots_(std::move(other.slots_)) {
  other.id_ = H5I_INVALID_HID;
  other.fd_ = -1;
  other.dfd_ = -2;
}

H5File& H5File::operator=(H5File&& other) noexcept {
  if (this != &other) {
    if (id_ >= 0) H5Fclose(id_);
    if (fd_ >= 0) ::close(fd_);
    if (dfd_ >= 0) ::close(dfd_);
    id_ = other.id_;
    fd_ = other.fd_;
    dfd_ = other.dfd_;
    path_ = std::move(other.path_);
    slots_ = std::move(other.slots_);
    other.id_ = H5I_INVALID_HID;
    other.fd_ = -1;
    other.dfd_ = -2;
  }
  return *this;
}

H5File::~H5File() {
  if (id_ >= 0) H5Fclose(id_);
  if (fd_ >= 0) ::close(fd_);
  if (dfd_ >= 0) ::close(dfd_);
}

std::string H5File::where(const std::string& dataset) const { return fmt::format("{}: dataset {}", path_, dataset); }

void H5File::write(const std::string& dataset, const float* data, std::span<const int64_t> shape,
                   const BlockAttrs& attrs) {
  const std::string w = where(dataset);
  const int rank = static_cast<int>(shape.size());
  const std::vector<hsize_t> dims = to_hsize(shape);
  const std::vector<hsize_t> chunk = chunk_dims(shape);
  const H5Handle space(MOE_H5_CHECK(H5Screate_simple(rank, dims.data(), nullptr), w), H5Sclose);
  const H5Handle dcpl(MOE_H5_CHECK(H5Pcreate(H5P_DATASET_CREATE), w), H5Pclose);
  MOE_H5_CHECK(H5Pset_chunk(dcpl.id, rank, chunk.data()), w);
  MOE_H5_CHECK(H5Pset_fletcher32(dcpl.id), w);
  // Every element is written right away: no fill-value pass over the chunks first.
  MOE_H5_CHECK(H5Pset_fill_time(dcpl.id, H5D_FILL_TIME_NEVER), w);
  const H5Handle lcpl(MOE_H5_CHECK(H5Pcreate(H5P_LINK_CREATE), w), H5Pclose);
  MOE_H5_CHECK(H5Pset_create_intermediate_group(lcpl.id, 1), w);
  const H5Handle ds(
      MOE_H5_CHECK(H5Dcreate2(id_, dataset.c_str(), H5T_IEEE_F32LE, space.id, lcpl.id, dcpl.id, H5P_DEFAULT), w),
      H5Dclose);
  // The chunks as the Fletcher-32 filter would store them (the chunk, zero-padded past the
  // dataset's edge, then its checksum, little-endian), made on worker threads and written in
  // order by this thread with H5Dwrite_chunk: the checksums and copies of the next chunks are
  // computed while the current one is written.
  const ChunkGrid grid(std::vector<int64_t>(shape.begin(), shape.end()), std::vector<int64_t>(chunk.begin(), chunk.end()));
  const std::vector<std::vector<int64_t>> origins = grid.all();
  const size_t chunk_bytes = static_cast<size_t>(grid.chunk_elements()) * sizeof(float);
  const int threads = io_threads();
  const int64_t window = 2 * static_cast<int64_t>(threads);
  // The chunk buffers live as long as the file, so the datasets after the first reuse memory
  // they already touched.
  std::vector<AlignedBuffer>& slots = slots_;
  slots.resize(std::max(slots.size(), static_cast<size_t>(std::min<int64_t>(window, std::ssize(origins)))));
  const auto produce = [&](int64_t i) {
    AlignedBuffer& buf = slots[static_cast<size_t>(i % window)];
    buf.resize(chunk_bytes + 4);
    const std::vector<int64_t>& origin = origins[static_cast<size_t>(i)];
    std::vector<int64_t> count(static_cast<size_t>(rank)), zero(static_cast<size_t>(rank), 0);
    bool partial = false;
    for (int d = 0; d < rank; ++d) {
      count[d] = std::min(grid.chunk()[d], shape[d] - origin[d]);
      partial = partial || count[d] < grid.chunk()[d];
    }
    float* f = reinterpret_cast<float*>(buf.data());
    if (partial) std::memset(f, 0, chunk_bytes);
    copy_box(data, shape, origin, f, grid.chunk(), zero, count);
    const uint32_t sum = fletcher32({buf.data(), chunk_bytes});
    for (int b = 0; b < 4; ++b) buf.data()[chunk_bytes + b] = static_cast<uint8_t>(sum >> (8 * b));
  };
  const auto consume = [&](int64_t i) {
    const AlignedBuffer& buf = slots[static_cast<size_t>(i % window)];
    const std::vector<hsize_t> origin = to_hsize(origins[static_cast<size_t>(i)]);
    MOE_H5_CHECK(H5Dwrite_chunk(ds.id, H5P_DEFAULT, 0, origin.data(), buf.size(), buf.data()), w);
  };
  ordered_parallel(std::ssize(origins), threads, window, produce, consume);
  write_string_attr(ds.id, "name", attrs.name, w);
  write_string_attr(ds.id, "kind", attrs.kind, w);
  write_ints_attr(ds.id, "global_shape", attrs.global_shape, w);
  write_ints_attr(ds.id, "offset", attrs.offset, w);
}

std::vector<int64_t> H5File::f32_shape(const std::string& dataset) const {
  const std::string w = where(dataset);
  MOE_CHECK(H5Lexists(id_, dataset.c_str(), H5P_DEFAULT) > 0, "{}: no such dataset in the shard file", w);
  const hid_t ds = MOE_H5_CHECK(H5Dopen2(id_, dataset.c_str(), H5P_DEFAULT), w);
  const hid_t type = MOE_H5_CHECK(H5Dget_type(ds), w);
  const bool f32 = H5Tget_class(type) == H5T_FLOAT && H5Tget_size(type) == 4;
  const std::string found = fmt::format("{} of {} bytes", H5Tget_class(type) == H5T_FLOAT ? "float" : "non-float",
                                        H5Tget_size(type));
  H5Tclose(type);
  const hid_t space = MOE_H5_CHECK(H5Dget_space(ds), w);
  const int rank = MOE_H5_CHECK(H5Sget_simple_extent_ndims(space), w);
  std::vector<hsize_t> dims(static_cast<size_t>(rank));
  MOE_H5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr), w);
  H5Sclose(space);
  H5Dclose(ds);
  MOE_CHECK(f32, "{}: holds {} elements, expected f32", w, found);
  return {dims.begin(), dims.end()};
}

void H5File::read(const std::string& dataset, std::span<const int64_t> src_offset, std::span<const int64_t> count,
                  float* dst, std::span<const int64_t> dst_shape, std::span<const int64_t> dst_offset,
                  ChunkReads* batch) const {
  const std::string w = where(dataset);
  const int rank = static_cast<int>(count.size());
  const H5Handle ds(MOE_H5_CHECK(H5Dopen2(id_, dataset.c_str(), H5P_DEFAULT), w), H5Dclose);
  if (!read_chunks(ds.id, w, src_offset, count, dst, dst_shape, dst_offset, batch)) {
    // Not a dataset of ours (another layout or filter): HDF5 reads and scatters it.
    const H5Handle fspace(MOE_H5_CHECK(H5Dget_space(ds.id), w), H5Sclose);
    const std::vector<hsize_t> fstart = to_hsize(src_offset), n = to_hsize(count);
    MOE_H5_CHECK(H5Sselect_hyperslab(fspace.id, H5S_SELECT_SET, fstart.data(), nullptr, n.data(), nullptr), w);
    const std::vector<hsize_t> mdims = to_hsize(dst_shape), mstart = to_hsize(dst_offset);
    const H5Handle mspace(MOE_H5_CHECK(H5Screate_simple(rank, mdims.data(), nullptr), w), H5Sclose);
    MOE_H5_CHECK(H5Sselect_hyperslab(mspace.id, H5S_SELECT_SET, mstart.data(), nullptr, n.data(), nullptr), w);
    const herr_t rc = H5Dread(ds.id, H5T_NATIVE_FLOAT, mspace.id, fspace.id, H5P_DEFAULT, dst);
    const std::string error = rc < 0 ? detail::h5_error_text() : std::string();
    MOE_CHECK(rc >= 0, "{}: read failed (a checksum error means the file is damaged): HDF5 error: {}", w, error);
  }
}

namespace {

// One chunk of a read: where it lies in the file, and where its part of the requested box goes.
struct ChunkJob {
  const std::string* where;  // "<file>: dataset <name>", for messages (owned by the batch)
  int fd = -1, dfd = -1;     // buffered and O_DIRECT descriptors (dfd -1: page cache only)
  uint64_t addr = 0;         // file offset of the stored chunk (data, then its 4-byte checksum)
  size_t chunk_bytes = 0;    // the chunk's data bytes (full chunk, padding included)
  std::vector<int64_t> origin, chunk, in_chunk, at, n;  // chunk origin and dims; box inside it; place in dst
  std::vector<int64_t> dst_shape;
  float* dst = nullptr;
  bool one_run = false;      // the chunk's data lands in one run of dst, at element `linear`
  int64_t linear = 0;
  size_t data_bytes = 0;     // for one_run: the bytes of the chunk inside the dataset
};

void check_sum(const ChunkJob& j, const Fletcher32& f, const uint8_t* stored_le) {
  uint32_t stored = 0;
  for (int b = 0; b < 4; ++b) stored |= static_cast<uint32_t>(stored_le[b]) << (8 * b);
  MOE_CHECK(stored == f.value(),
            "{}: the chunk at {} fails its Fletcher-32 checksum (stored {:08x}, computed {:08x}): the file is damaged",
            *j.where, box_shape_str(j.origin), stored, f.value());
}

// Reads `bytes` at `from` into `to` through the page cache, in pieces small enough to stay in
// the core's cache while the checksum (when given) reads them again: one pass over memory.
void read_buffered(const ChunkJob& j, uint8_t* to, size_t bytes, uint64_t from, Fletcher32* sum) {
  constexpr size_t kPiece = size_t{256} << 10;  // even, as Fletcher32 needs
  for (size_t piece = 0; piece < bytes; piece += kPiece) {
    const size_t len = std::min(kPiece, bytes - piece);
    size_t done = 0;
    while (done < len) {
      const ssize_t r = ::pread(j.fd, to + piece + done, len - done, static_cast<off_t>(from + piece + done));
      if (r < 0 && errno == EINTR) continue;
      MOE_CHECK(r > 0, "{}: reading the chunk at {} failed: {}", *j.where, box_shape_str(j.origin),
                r == 0 ? std::string("the file ends early (truncated?)") : std::string(std::strerror(errno)));
      done += static_cast<size_t>(r);
    }
    if (sum) sum->update({to + piece, len});
  }
}

// Direct I/O: the whole aligned span around `bytes` at `from` into `buf` with one O_DIRECT read;
// returns where the requested bytes start in it. A file system that takes the O_DIRECT open but
// refuses the transfer (EINVAL) gets the same span through the page cache.
const uint8_t* read_direct(const ChunkJob& j, AlignedBuffer& buf, size_t bytes, uint64_t from) {
  const uint64_t start = from & ~uint64_t{kDirectAlign - 1};
  const size_t head = static_cast<size_t>(from - start);
  const size_t span = (head + bytes + kDirectAlign - 1) & ~(kDirectAlign - 1);
  buf.resize(span);
  size_t done = 0;
  int use = j.dfd;
  while (done < head + bytes) {
    const ssize_t r = ::pread(use, buf.data() + done, span - done, static_cast<off_t>(start + done));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EINVAL && use == j.dfd) {
      use = j.fd;
      continue;
    }
    MOE_CHECK(r > 0, "{}: reading the chunk at {} failed: {}", *j.where, box_shape_str(j.origin),
              r == 0 ? std::string("the file ends early (truncated?)") : std::string(std::strerror(errno)));
    if (use == j.dfd) count_direct_read(r);
    done += static_cast<size_t>(r);
  }
  return buf.data() + head;
}

// Reads, checks and places one chunk; `buf` is the calling worker's scratch.
void run_chunk_job(const ChunkJob& j, AlignedBuffer& buf) {
  uint8_t* to = reinterpret_cast<uint8_t*>(j.dst + j.linear);
  if (j.dfd >= 0) {
    const uint8_t* stored = read_direct(j, buf, j.chunk_bytes + 4, j.addr);
    if (j.one_run) {
      // Checksummed and copied out a cache-sized piece at a time: one pass over memory.
      constexpr size_t kPiece = size_t{256} << 10;  // even, as Fletcher32 needs
      Fletcher32 f;
      for (size_t piece = 0; piece < j.chunk_bytes; piece += kPiece) {
        const size_t len = std::min(kPiece, j.chunk_bytes - piece);
        f.update({stored + piece, len});
        if (piece < j.data_bytes) std::memcpy(to + piece, stored + piece, std::min(len, j.data_bytes - piece));
      }
      check_sum(j, f, stored + j.chunk_bytes);
      return;
    }
    if (reinterpret_cast<uintptr_t>(stored) % alignof(float) != 0) {  // a chunk at an odd address
      std::memmove(buf.data(), stored, j.chunk_bytes + 4);
      stored = buf.data();
    }
    Fletcher32 f;
    f.update({stored, j.chunk_bytes});
    check_sum(j, f, stored + j.chunk_bytes);
    copy_box(reinterpret_cast<const float*>(stored), j.chunk, j.in_chunk, j.dst, j.dst_shape, j.at, j.n);
    return;
  }
  if (j.one_run) {
    // The chunk's data read straight into place (no copy), the zero padding past the dataset's
    // edge and the checksum into the scratch.
    buf.resize(j.chunk_bytes - j.data_bytes + 4);
    Fletcher32 f;
    read_buffered(j, to, j.data_bytes, j.addr, &f);
    read_buffered(j, buf.data(), buf.size(), j.addr + j.data_bytes, nullptr);
    f.update({buf.data(), buf.size() - 4});
    check_sum(j, f, buf.data() + buf.size() - 4);
    return;
  }
  buf.resize(j.chunk_bytes + 4);
  Fletcher32 f;
  read_buffered(j, buf.data(), j.chunk_bytes, j.addr, &f);
  read_buffered(j, buf.data() + j.chunk_bytes, 4, j.addr + j.chunk_bytes, nullptr);
  check_sum(j, f, buf.data() + j.chunk_bytes);
  copy_box(reinterpret_cast<const float*>(buf.data()), j.chunk, j.in_chunk, j.dst, j.dst_shape, j.at, j.n);
}

// Runs jobs on the I/O threads, each worker with its own scratch buffer.
void run_chunk_jobs(const std::vector<ChunkJob>& jobs) {
  static std::atomic<uint64_t> runs{0};
  const uint64_t run = ++runs;
  const int threads = io_threads();
  std::mutex mu;
  std::vector<std::unique_ptr<AlignedBuffer>> scratch;
  const auto produce = [&](int64_t i) {
    thread_local AlignedBuffer* mine = nullptr;
    thread_local uint64_t mine_run = 0;
    if (mine_run != run) {  // first job of this run on this thread: a buffer for the run
      std::lock_guard lock(mu);
      scratch.push_back(std::make_unique<AlignedBuffer>());
      mine = scratch.back().get();
      mine_run = run;
    }
    run_chunk_job(jobs[static_cast<size_t>(i)], *mine);
  };
  ordered_parallel(std::ssize(jobs), threads, 2 * static_cast<int64_t>(threads), produce, [](int64_t) {});
}

}  // namespace

struct ChunkReads::Jobs {
  std::deque<std::string> where;  // stable addresses for ChunkJob::where
  std::vector<ChunkJob> jobs;
  std::vector<std::string> files;  // the file of each job
};

ChunkReads::ChunkReads() : jobs_(std::make_unique<Jobs>()) {}
ChunkReads::~ChunkReads() = default;

int64_t ChunkReads::pending() const { return std::ssize(jobs_->jobs); }

void ChunkReads::run(const std::function<void(const std::string& file)>& on_error) {
  try {
    run_chunk_jobs(jobs_->jobs);
  } catch (const Error& e) {
    // The failing job's file: its path is the message's prefix.
    for (const std::string& f : jobs_->files)
      if (std::string_view(e.what()).find(f) != std::string_view::npos) {
        on_error(f);
        break;
      }
    jobs_->jobs.clear();
    jobs_->files.clear();
    throw;
  }
  jobs_->jobs.clear();
  jobs_->files.clear();
}

bool H5File::read_chunks(hid_t ds, const std::string& w, std::span<const int64_t> src_offset,
                         std::span<const int64_t> count, float* dst, std::span<const int64_t> dst_shape,
                         std::span<const int64_t> dst_offset, ChunkReads* batch) const {
  const int rank = static_cast<int>(count.size());
  // Only the layout this file writes: chunked f32 little-endian with Fletcher-32 as the one filter.
  const H5Handle dcpl(MOE_H5_CHECK(H5Dget_create_plist(ds), w), H5Pclose);
  if (H5Pget_layout(dcpl.id) != H5D_CHUNKED || H5Pget_nfilters(dcpl.id) != 1) return false;
  unsigned flags = 0;
  size_t nvalues = 0;
  if (H5Pget_filter2(dcpl.id, 0, &flags, &nvalues, nullptr, 0, nullptr, nullptr) != H5Z_FILTER_FLETCHER32) {
    H5Eclear2(H5E_DEFAULT);
    return false;
  }
  {
    const H5Handle type(MOE_H5_CHECK(H5Dget_type(ds), w), H5Tclose);
    if (H5Tequal(type.id, H5T_IEEE_F32LE) <= 0) return false;
  }
  const H5Handle space(MOE_H5_CHECK(H5Dget_space(ds), w), H5Sclose);
  MOE_CHECK(H5Sget_simple_extent_ndims(space.id) == rank, "{}: a box of rank {} read from a dataset of rank {}", w,
            rank, H5Sget_simple_extent_ndims(space.id));
  std::vector<hsize_t> dims(static_cast<size_t>(rank)), chunk(static_cast<size_t>(rank));
  MOE_H5_CHECK(H5Sget_simple_extent_dims(space.id, dims.data(), nullptr), w);
  MOE_CHECK(H5Pget_chunk(dcpl.id, rank, chunk.data()) == rank, "{}: cannot read the chunk dims", w);
  const ChunkGrid grid({dims.begin(), dims.end()}, {chunk.begin(), chunk.end()});
  const std::vector<std::vector<int64_t>> origins = grid.touching(src_offset, count);
  const size_t chunk_bytes = static_cast<size_t>(grid.chunk_elements()) * sizeof(float);

  ChunkReads local;
  ChunkReads& reads = batch ? *batch : local;
  reads.jobs_->where.push_back(w);
  const std::string* where_text = &reads.jobs_->where.back();
  const int fd = raw_fd();
  const int dfd = direct_fd();
  // Where each chunk lies in the file (HDF5, on this thread); the reads, checksums and copies
  // then run on worker threads with pread.
  for (const std::vector<int64_t>& origin : origins) {
    const std::vector<hsize_t> o = to_hsize(origin);
    unsigned mask = 0;
    haddr_t addr = HADDR_UNDEF;
    hsize_t size = 0;
    MOE_H5_CHECK(H5Dget_chunk_info_by_coord(ds, o.data(), &mask, &addr, &size), w);
    MOE_CHECK(addr != HADDR_UNDEF, "{}: the chunk at {} was never written (the file is incomplete)", w,
              box_shape_str(origin));
    MOE_CHECK(mask == 0 && size == chunk_bytes + 4,
              "{}: the chunk at {} is stored as {} bytes with filter mask {}, expected {} bytes checksummed: the file "
              "is damaged",
              w, box_shape_str(origin), size, mask, chunk_bytes + 4);
    ChunkJob j;
    j.where = where_text;
    j.fd = fd;
    j.dfd = dfd;
    j.addr = addr;
    j.chunk_bytes = chunk_bytes;
    j.origin = origin;
    j.chunk = grid.chunk();
    j.dst = dst;
    j.dst_shape.assign(dst_shape.begin(), dst_shape.end());
    j.in_chunk.resize(static_cast<size_t>(rank));
    j.at.resize(static_cast<size_t>(rank));
    j.n.resize(static_cast<size_t>(rank));
    // The part of the request inside this chunk, and the chunk's part inside the dataset.
    bool whole = true, prefix = true;
    int64_t valid = 1;
    for (int d = 0; d < rank; ++d) {
      const int64_t lo = std::max(origin[d], src_offset[d]);
      const int64_t hi = std::min(origin[d] + grid.chunk()[d], src_offset[d] + count[d]);
      j.in_chunk[d] = lo - origin[d];
      j.at[d] = dst_offset[d] + lo - src_offset[d];
      j.n[d] = hi - lo;
      const int64_t inside = std::min(grid.chunk()[d], static_cast<int64_t>(dims[d]) - origin[d]);
      whole = whole && j.n[d] == inside;
      prefix = prefix && (d == 0 || inside == grid.chunk()[d]);
      valid *= inside;
    }
    j.one_run = whole && prefix && contiguous_box(dst_shape, j.n);
    if (j.one_run) {
      for (int d = 0; d < rank; ++d) j.linear = j.linear * dst_shape[d] + j.at[d];
      j.data_bytes = static_cast<size_t>(valid) * sizeof(float);
    }
    reads.jobs_->jobs.push_back(std::move(j));
    reads.jobs_->files.push_back(path_);
  }
  if (!batch) local.run([](const std::string&) {});
  return true;
}

int H5File::direct_fd() const {
  if (dfd_ == -2) dfd_ = open_direct_read(path_.c_str());
  return dfd_;
}

int H5File::raw_fd() const {
  if (fd_ < 0) {
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    MOE_CHECK(fd_ >= 0, "{}: cannot open for reading: {}", path_, std::strerror(errno));
  }
  return fd_;
}

BlockAttrs H5File::attrs(const std::string& dataset) const {
  const std::string w = where(dataset);
  const hid_t ds = MOE_H5_CHECK(H5Dopen2(id_, dataset.c_str(), H5P_DEFAULT), w);
  BlockAttrs a;
  a.name = read_string_attr(ds, "name", w);
  a.kind = read_string_attr(ds, "kind", w);
  a.global_shape = read_ints_attr(ds, "global_shape", w);
  a.offset = read_ints_attr(ds, "offset", w);
  H5Dclose(ds);
  return a;
}

std::vector<std::string> H5File::datasets() const {
  std::vector<std::string> names;
  MOE_H5_CHECK(H5Ovisit(id_, H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &names), path_);
  std::sort(names.begin(), names.end());
  return names;
}

void H5File::start_writeback() const {
  void* handle = nullptr;
  if (H5Fget_vfd_handle(id_, H5P_DEFAULT, &handle) < 0 || handle == nullptr) {
    H5Eclear2(H5E_DEFAULT);
    return;
  }
  // The default (sec2) driver's handle is a pointer to the file descriptor.
  ::sync_file_range(*static_cast<const int*>(handle), 0, 0, SYNC_FILE_RANGE_WRITE);
}

void H5File::close() {
  if (id_ < 0) return;
  const hid_t id = id_;
  id_ = H5I_INVALID_HID;
  MOE_H5_CHECK(H5Fclose(id), path_);
}

}  // namespace moeforge::checkpoint
