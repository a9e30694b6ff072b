#include "checkpoint/hdf5_io.h"

#include <fcntl.h>

#include <algorithm>
#include <filesystem>
#include <mutex>

#include <fmt/format.h>

#include "runtime/error.h"

namespace moeforge::checkpoint {

namespace {

// Chunks of about this many bytes: large enough for sequential I/O, small enough that a reader
// of a part of a block (another TP/EP layout) reads and checksums little beyond its part.
constexpr int64_t kChunkBytes = int64_t{4} << 20;

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
  const hid_t id = MOE_H5_CHECK(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), path);
  return H5File(id, path);
}

H5File H5File::open(const std::string& path) {
  silence_hdf5();
  MOE_CHECK(std::filesystem::exists(path), "{}: shard file is missing", path);
  const hid_t id = MOE_H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path);
  return H5File(id, path);
}

H5File::H5File(H5File&& other) noexcept : id_(other.id_), path_(std::move(other.path_)) { other.id_ = H5I_INVALID_HID; }

H5File& H5File::operator=(H5File&& other) noexcept {
  if (this != &other) {
    if (id_ >= 0) H5Fclose(id_);
    id_ = other.id_;
    path_ = std::move(other.path_);
    other.id_ = H5I_INVALID_HID;
  }
  return *this;
}

H5File::~H5File() {
  if (id_ >= 0) H5Fclose(id_);
}

std::string H5File::where(const std::string& dataset) const { return fmt::format("{}: dataset {}", path_, dataset); }

void H5File::write(const std::string& dataset, const float* data, std::span<const int64_t> shape,
                   const BlockAttrs& attrs) {
  const std::string w = where(dataset);
  const int rank = static_cast<int>(shape.size());
  const std::vector<hsize_t> dims = to_hsize(shape);
  const std::vector<hsize_t> chunk = chunk_dims(shape);
  const hid_t space = MOE_H5_CHECK(H5Screate_simple(rank, dims.data(), nullptr), w);
  const hid_t dcpl = MOE_H5_CHECK(H5Pcreate(H5P_DATASET_CREATE), w);
  MOE_H5_CHECK(H5Pset_chunk(dcpl, rank, chunk.data()), w);
  MOE_H5_CHECK(H5Pset_fletcher32(dcpl), w);
  // Every element is written right away: no fill-value pass over the chunks first.
  MOE_H5_CHECK(H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER), w);
  const hid_t lcpl = MOE_H5_CHECK(H5Pcreate(H5P_LINK_CREATE), w);
  MOE_H5_CHECK(H5Pset_create_intermediate_group(lcpl, 1), w);
  const hid_t ds = MOE_H5_CHECK(H5Dcreate2(id_, dataset.c_str(), H5T_IEEE_F32LE, space, lcpl, dcpl, H5P_DEFAULT), w);
  MOE_H5_CHECK(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), w);
  write_string_attr(ds, "name", attrs.name, w);
  write_string_attr(ds, "kind", attrs.kind, w);
  write_ints_attr(ds, "global_shape", attrs.global_shape, w);
  write_ints_attr(ds, "offset", attrs.offset, w);
  H5Dclose(ds);
  H5Pclose(lcpl);
  H5Pclose(dcpl);
  H5Sclose(space);
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
                  float* dst, std::span<const int64_t> dst_shape, std::span<const int64_t> dst_offset) const {
  const std::string w = where(dataset);
  const int rank = static_cast<int>(count.size());
  const hid_t ds = MOE_H5_CHECK(H5Dopen2(id_, dataset.c_str(), H5P_DEFAULT), w);
  const hid_t fspace = MOE_H5_CHECK(H5Dget_space(ds), w);
  const std::vector<hsize_t> fstart = to_hsize(src_offset), n = to_hsize(count);
  MOE_H5_CHECK(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, fstart.data(), nullptr, n.data(), nullptr), w);
  const std::vector<hsize_t> mdims = to_hsize(dst_shape), mstart = to_hsize(dst_offset);
  const hid_t mspace = MOE_H5_CHECK(H5Screate_simple(rank, mdims.data(), nullptr), w);
  MOE_H5_CHECK(H5Sselect_hyperslab(mspace, H5S_SELECT_SET, mstart.data(), nullptr, n.data(), nullptr), w);
  const herr_t rc = H5Dread(ds, H5T_NATIVE_FLOAT, mspace, fspace, H5P_DEFAULT, dst);
  // Taken before the closes below, which clear HDF5's error stack.
  const std::string error = rc < 0 ? detail::h5_error_text() : std::string();
  H5Sclose(mspace);
  H5Sclose(fspace);
  H5Dclose(ds);
  MOE_CHECK(rc >= 0, "{}: read failed (a checksum error means the file is damaged): HDF5 error: {}", w, error);
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
