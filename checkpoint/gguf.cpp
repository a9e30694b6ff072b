#include "checkpoint/gguf.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "checkpoint/files.h"
#include "runtime/error.h"
#include "runtime/half.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

static_assert(std::endian::native == std::endian::little, "GGUF I/O assumes a little-endian host");

namespace {
constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kVersion = 3;
constexpr size_t kMaxName = 64;          // GGML_MAX_NAME: names must be shorter
constexpr uint64_t kMaxArray = uint64_t{1} << 30;
constexpr int kQK = 32;                  // Q8_0 / Q4_0 block

uint64_t align_up(uint64_t x, uint64_t a) { return x + (a - x % a) % a; }
}  // namespace

const char* ggml_type_name(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return "f32";
    case GgmlType::kF16: return "f16";
    case GgmlType::kQ4_0: return "q4_0";
    case GgmlType::kQ8_0: return "q8_0";
    case GgmlType::kBF16: return "bf16";
  }
  return "?";
}

GgmlType parse_ggml_type(const std::string& name) {
  for (const GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0})
    if (name == ggml_type_name(t)) return t;
  MOE_THROW("unknown GGUF tensor type '{}'; expected one of f32, f16, bf16, q8_0, q4_0", name);
}

int64_t ggml_block_size(GgmlType t) { return t == GgmlType::kQ4_0 || t == GgmlType::kQ8_0 ? kQK : 1; }

int64_t ggml_type_size(GgmlType t) {
  switch (t) {
    case GgmlType::kF32: return 4;
    case GgmlType::kF16:
    case GgmlType::kBF16: return 2;
    case GgmlType::kQ4_0: return 2 + kQK / 2;
    case GgmlType::kQ8_0: return 2 + kQK;
  }
  return 0;
}

int64_t ggml_nbytes(GgmlType t, int64_t n) { return n / ggml_block_size(t) * ggml_type_size(t); }

std::vector<uint8_t> ggml_encode(std::span<const float> x, GgmlType t) {
  const auto n = static_cast<int64_t>(x.size());
  MOE_CHECK(n % ggml_block_size(t) == 0, "ggml_encode: {} values are not whole {} blocks of {}", n,
            ggml_type_name(t), ggml_block_size(t));
  std::vector<uint8_t> out(static_cast<size_t>(ggml_nbytes(t, n)));
  uint8_t* o = out.data();
  const auto put16 = [](uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); };
  switch (t) {
    case GgmlType::kF32: std::memcpy(o, x.data(), out.size()); break;
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) put16(o + 2 * i, float_to_f16_bits(x[i]));
      break;
    case GgmlType::kBF16:
      for (int64_t i = 0; i < n; ++i) put16(o + 2 * i, float_to_bf16_bits(x[i]));
      break;
    case GgmlType::kQ8_0:  // quantize_row_q8_0_ref: d = amax / 127, q = round(x / d)
      for (int64_t b = 0; b < n / kQK; ++b, o += 34) {
        const float* v = x.data() + b * kQK;
        float amax = 0.0f;
        for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(v[j]));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put16(o, float_to_f16_bits(d));
        for (int j = 0; j < kQK; ++j) o[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(v[j] * id)));
      }
      break;
    case GgmlType::kQ4_0:  // quantize_row_q4_0_ref: d = (signed absmax) / -8, nibbles split in halves
      for (int64_t b = 0; b < n / kQK; ++b, o += 18) {
        const float* v = x.data() + b * kQK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < kQK; ++j)
          if (std::fabs(v[j]) > amax) {
            amax = std::fabs(v[j]);
            max = v[j];
          }
        const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        put16(o, float_to_f16_bits(d));
        for (int j = 0; j < kQK / 2; ++j) {
          const auto lo = std::min<uint8_t>(15, static_cast<uint8_t>(static_cast<int8_t>(v[j] * id + 8.5f)));
          const auto hi = std::min<uint8_t>(15, static_cast<uint8_t>(static_cast<int8_t>(v[j + kQK / 2] * id + 8.5f)));
          o[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
        }
      }
      break;
  }
  return out;
}

std::vector<float> ggml_decode(std::span<const uint8_t> bytes, GgmlType t) {
  const int64_t blocks = static_cast<int64_t>(bytes.size()) / ggml_type_size(t);
  MOE_CHECK(blocks * ggml_type_size(t) == static_cast<int64_t>(bytes.size()),
            "ggml_decode: {} bytes are not whole {} blocks", bytes.size(), ggml_type_name(t));
  std::vector<float> out(static_cast<size_t>(blocks * ggml_block_size(t)));
  const uint8_t* p = bytes.data();
  const auto get16 = [](const uint8_t* q) {
    uint16_t v = 0;
    std::memcpy(&v, q, 2);
    return v;
  };
  switch (t) {
    case GgmlType::kF32: std::memcpy(out.data(), p, bytes.size()); break;
    case GgmlType::kF16:
      for (size_t i = 0; i < out.size(); ++i) out[i] = f16_bits_to_float(get16(p + 2 * i));
      break;
    case GgmlType::kBF16:
      for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_bits_to_float(get16(p + 2 * i));
      break;
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < blocks; ++b, p += 34) {
        const float d = f16_bits_to_float(get16(p));
        for (int j = 0; j < kQK; ++j) out[b * kQK + j] = static_cast<float>(static_cast<int8_t>(p[2 + j])) * d;
      }
      break;
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < blocks; ++b, p += 18) {
        const float d = f16_bits_to_float(get16(p));
        for (int j = 0; j < kQK / 2; ++j) {
          out[b * kQK + j] = static_cast<float>((p[2 + j] & 15) - 8) * d;
          out[b * kQK + j + kQK / 2] = static_cast<float>((p[2 + j] >> 4) - 8) * d;
        }
      }
      break;
  }
  return out;
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (const int64_t d : ne) n *= d;
  return n;
}

// ---- writer ----------------------------------------------------------------------------------

namespace {

void put_bytes(std::string& out, const void* p, size_t n) { out.append(static_cast<const char*>(p), n); }
template <class T>
void put(std::string& out, T v) {
  put_bytes(out, &v, sizeof(T));
}
void put_string(std::string& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out += s;
}

void put_value(std::string& out, const GgufValue& v) {
  switch (v.type) {
    case GgufType::kU32: put<uint32_t>(out, static_cast<uint32_t>(v.i)); break;
    case GgufType::kI32: put<int32_t>(out, static_cast<int32_t>(v.i)); break;
    case GgufType::kF32: put<float>(out, static_cast<float>(v.f)); break;
    case GgufType::kBool: put<uint8_t>(out, v.i ? 1 : 0); break;
    case GgufType::kString: put_string(out, v.s); break;
    case GgufType::kArray:
      put<uint32_t>(out, static_cast<uint32_t>(v.elem_type));
      put<uint64_t>(out, v.array.size());
      for (const GgufValue& e : v.array) put_value(out, e);
      break;
    default: MOE_THROW("GGUF writer: value type {} is not written by moeforge", static_cast<uint32_t>(v.type));
  }
}

}  // namespace

GgufWriter::GgufWriter(std::string path, uint32_t alignment)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), alignment_(alignment) {
  MOE_CHECK(alignment_ >= 8 && std::has_single_bit(alignment_), "{}: GGUF alignment {} must be a power of two >= 8",
            path_, alignment_);
  if (alignment_ != 32) add_u32("general.alignment", alignment_);
}

GgufWriter::~GgufWriter() {
  if (closed_) return;
  os_.close();
  std::error_code ec;
  fs::remove(tmp_, ec);
}

void GgufWriter::add(const std::string& key, GgufValue v) {
  MOE_CHECK(!header_done_, "{}: metadata {} added after the header was written", path_, key);
  MOE_CHECK(!key.empty(), "{}: empty metadata key", path_);
  for (const auto& [k, value] : kv_) MOE_CHECK(k != key, "{}: metadata key {} set twice", path_, key);
  kv_.emplace_back(key, std::move(v));
}

namespace {
GgufValue value_of(GgufType type, int64_t i = 0, double f = 0.0, std::string s = {}) {
  GgufValue v;
  v.type = type;
  v.i = i;
  v.f = f;
  v.s = std::move(s);
  return v;
}
GgufValue array_of(GgufType elem) {
  GgufValue v = value_of(GgufType::kArray);
  v.elem_type = elem;
  return v;
}
}  // namespace

void GgufWriter::add_u32(const std::string& key, uint32_t v) { add(key, value_of(GgufType::kU32, v)); }
void GgufWriter::add_f32(const std::string& key, float v) { add(key, value_of(GgufType::kF32, 0, v)); }
void GgufWriter::add_bool(const std::string& key, bool v) { add(key, value_of(GgufType::kBool, v ? 1 : 0)); }
void GgufWriter::add_string(const std::string& key, const std::string& v) {
  add(key, value_of(GgufType::kString, 0, 0.0, v));
}
void GgufWriter::add_strings(const std::string& key, const std::vector<std::string>& v) {
  GgufValue a = array_of(GgufType::kString);
  for (const std::string& s : v) a.array.push_back(value_of(GgufType::kString, 0, 0.0, s));
  add(key, std::move(a));
}
void GgufWriter::add_i32s(const std::string& key, const std::vector<int32_t>& v) {
  GgufValue a = array_of(GgufType::kI32);
  for (const int32_t x : v) a.array.push_back(value_of(GgufType::kI32, x));
  add(key, std::move(a));
}
void GgufWriter::add_f32s(const std::string& key, const std::vector<float>& v) {
  GgufValue a = array_of(GgufType::kF32);
  for (const float x : v) a.array.push_back(value_of(GgufType::kF32, 0, x));
  add(key, std::move(a));
}

void GgufWriter::add_tensor(const std::string& name, std::vector<int64_t> ne, GgmlType type) {
  MOE_CHECK(!header_done_, "{}: tensor {} added after the header was written", path_, name);
  MOE_CHECK(!name.empty() && name.size() < kMaxName, "{}: tensor name '{}' must have 1 to {} bytes", path_, name,
            kMaxName - 1);
  MOE_CHECK(!ne.empty() && ne.size() <= 4, "{}: tensor {} has {} dims, GGUF allows 1 to 4", path_, name, ne.size());
  MOE_CHECK(ne[0] % ggml_block_size(type) == 0, "{}: tensor {}: ne[0] = {} is not a multiple of the {} block ({})",
            path_, name, ne[0], ggml_type_name(type), ggml_block_size(type));
  for (const GgufTensorInfo& t : tensors_) MOE_CHECK(t.name != name, "{}: tensor {} declared twice", path_, name);
  tensors_.push_back({.name = name, .ne = std::move(ne), .type = type});
}

void GgufWriter::write_header() {
  MOE_CHECK(!header_done_, "{}: header written twice", path_);
  std::string out;
  put<uint32_t>(out, kMagic);
  put<uint32_t>(out, kVersion);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kv_.size());
  for (const auto& [key, value] : kv_) {
    put_string(out, key);
    put<uint32_t>(out, static_cast<uint32_t>(value.type));
    put_value(out, value);
  }
  uint64_t offset = 0;
  for (GgufTensorInfo& t : tensors_) {
    t.offset = offset;
    offset += align_up(static_cast<uint64_t>(t.nbytes()), alignment_);
    put_string(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.ne.size()));
    for (const int64_t d : t.ne) put<uint64_t>(out, static_cast<uint64_t>(d));
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, t.offset);
  }
  out.append(align_up(out.size(), alignment_) - out.size(), '\0');
  os_.open(tmp_, std::ios::binary | std::ios::trunc);
  MOE_CHECK(os_.good(), "{}: cannot create: {}", tmp_, std::strerror(errno));
  os_.write(out.data(), static_cast<std::streamsize>(out.size()));
  MOE_CHECK(os_.good(), "{}: write failed", tmp_);
  header_done_ = true;
}

void GgufWriter::write_tensor(const std::string& name, std::span<const uint8_t> bytes) {
  MOE_CHECK(header_done_, "{}: tensor {} written before the header", path_, name);
  MOE_CHECK(next_ < tensors_.size() && tensors_[next_].name == name, "{}: expected tensor {} next, got {}", path_,
            next_ < tensors_.size() ? tensors_[next_].name : std::string("none"), name);
  const GgufTensorInfo& t = tensors_[next_];
  MOE_CHECK(static_cast<int64_t>(bytes.size()) == t.nbytes(), "{}: tensor {} has {} bytes, expected {}", path_, name,
            bytes.size(), t.nbytes());
  os_.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  const std::string pad(align_up(bytes.size(), alignment_) - bytes.size(), '\0');
  os_.write(pad.data(), static_cast<std::streamsize>(pad.size()));
  MOE_CHECK(os_.good(), "{}: write failed", tmp_);
  ++next_;
}

void GgufWriter::close() {
  MOE_CHECK(header_done_ && next_ == tensors_.size(), "{}: closed after {} of {} tensors", path_, next_,
            tensors_.size());
  os_.close();
  MOE_CHECK(!os_.fail(), "{}: close failed", tmp_);
  commit_file(tmp_, path_);
  closed_ = true;
}

// ---- reader ----------------------------------------------------------------------------------

namespace {

// Bounds-checked sequential reads of the file's header part.
class Cursor {
 public:
  Cursor(const std::string& path, uint64_t size) : path_(path), size_(size), is_(path, std::ios::binary) {
    MOE_CHECK(is_.good(), "{}: cannot open: {}", path, std::strerror(errno));
  }
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  void need(uint64_t n, const std::string& what) const {
    MOE_CHECK(n <= remaining(), "{}: truncated: {} needs {} bytes at offset {}, the file has {} left", path_, what, n,
              pos_, remaining());
  }
  template <class T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T v{};
    is_.read(reinterpret_cast<char*>(&v), sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& what) {
    const auto n = get<uint64_t>(what + " (length)");
    need(n, what);
    std::string s(n, '\0');
    is_.read(s.data(), static_cast<std::streamsize>(n));
    pos_ += n;
    return s;
  }

 private:
  std::string path_;
  uint64_t size_, pos_ = 0;
  std::ifstream is_;
};

// Smallest encoding of one element of a type (strings: their u64 length).
uint64_t min_size(GgufType t) {
  switch (t) {
    case GgufType::kU8: case GgufType::kI8: case GgufType::kBool: return 1;
    case GgufType::kU16: case GgufType::kI16: return 2;
    case GgufType::kU32: case GgufType::kI32: case GgufType::kF32: return 4;
    default: return 8;
  }
}

GgufValue read_value(Cursor& c, GgufType type, const std::string& path, const std::string& key) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufType::kU8: v.i = c.get<uint8_t>(key); break;
    case GgufType::kI8: v.i = c.get<int8_t>(key); break;
    case GgufType::kU16: v.i = c.get<uint16_t>(key); break;
    case GgufType::kI16: v.i = c.get<int16_t>(key); break;
    case GgufType::kU32: v.i = c.get<uint32_t>(key); break;
    case GgufType::kI32: v.i = c.get<int32_t>(key); break;
    case GgufType::kU64: v.i = static_cast<int64_t>(c.get<uint64_t>(key)); break;
    case GgufType::kI64: v.i = c.get<int64_t>(key); break;
    case GgufType::kF32: v.f = c.get<float>(key); break;
    case GgufType::kF64: v.f = c.get<double>(key); break;
    case GgufType::kBool:
      v.i = c.get<uint8_t>(key);
      MOE_CHECK(v.i <= 1, "{}: key {}: a BOOL must be 0 or 1, got {}", path, key, v.i);
      break;
    case GgufType::kString: v.s = c.string(key); break;
    case GgufType::kArray: {
      const auto et = c.get<uint32_t>(key + " (array type)");
      MOE_CHECK(et <= 12, "{}: key {}: unknown array element type {}", path, key, et);
      v.elem_type = static_cast<GgufType>(et);
      MOE_CHECK(v.elem_type != GgufType::kArray, "{}: key {}: nested arrays are not supported", path, key);
      const auto n = c.get<uint64_t>(key + " (array length)");
      MOE_CHECK(n <= kMaxArray && n <= c.remaining() / min_size(v.elem_type),
                "{}: key {}: array of {} elements does not fit the file ({} bytes left, limit {} elements)", path, key,
                n, c.remaining(), kMaxArray);
      v.array.reserve(n);
      for (uint64_t i = 0; i < n; ++i) v.array.push_back(read_value(c, v.elem_type, path, key));
      break;
    }
  }
  return v;
}

}  // namespace

GgufReader::GgufReader(std::string path) : path_(std::move(path)) {
  std::error_code ec;
  const uint64_t size = fs::file_size(path_, ec);
  MOE_CHECK(!ec, "{}: cannot read: {}", path_, ec.message());
  Cursor c(path_, size);
  const auto magic = c.get<uint32_t>("the magic");
  MOE_CHECK(magic == kMagic, "{}: not a GGUF file (magic 0x{:08x}, expected 0x{:08x} \"GGUF\")", path_, magic, kMagic);
  const auto version = c.get<uint32_t>("the version");
  MOE_CHECK(version == kVersion, "{}: GGUF version {}, this reader reads version 3", path_, version);
  const auto n_tensors = c.get<uint64_t>("the tensor count");
  const auto n_kv = c.get<uint64_t>("the key-value count");
  // Every key-value takes at least 13 bytes and every tensor info 24: bounded by the file.
  MOE_CHECK(n_kv <= c.remaining() / 13, "{}: {} key-values cannot fit in {} bytes", path_, n_kv, c.remaining());
  MOE_CHECK(n_tensors <= c.remaining() / 24, "{}: {} tensor infos cannot fit in {} bytes", path_, n_tensors,
            c.remaining());
  for (uint64_t i = 0; i < n_kv; ++i) {
    const std::string key = c.string(fmt::format("key {}", i));
    MOE_CHECK(!key.empty(), "{}: key-value {} has an empty key", path_, i);
    MOE_CHECK(!kv_.count(key), "{}: duplicate key {}", path_, key);
    const auto type = c.get<uint32_t>(key + " (type)");
    MOE_CHECK(type <= 12, "{}: key {}: unknown value type {}", path_, key, type);
    kv_[key] = read_value(c, static_cast<GgufType>(type), path_, key);
  }
  if (const auto it = kv_.find("general.alignment"); it != kv_.end()) {
    MOE_CHECK(it->second.type == GgufType::kU32, "{}: general.alignment must be UINT32", path_);
    MOE_CHECK(it->second.i > 0 && std::has_single_bit(static_cast<uint64_t>(it->second.i)),
              "{}: general.alignment {} is not a power of two", path_, it->second.i);
    alignment_ = static_cast<uint32_t>(it->second.i);
  }
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = c.string(fmt::format("tensor info {} name", i));
    MOE_CHECK(!t.name.empty() && t.name.size() < kMaxName, "{}: tensor {}: name '{}' must have 1 to {} bytes", path_,
              i, t.name.substr(0, 80), kMaxName - 1);
    MOE_CHECK(names.insert(t.name).second, "{}: duplicate tensor name {}", path_, t.name);
    const auto n_dims = c.get<uint32_t>(t.name + " dims");
    MOE_CHECK(n_dims >= 1 && n_dims <= 4, "{}: tensor {} has {} dims, GGUF allows 1 to 4", path_, t.name, n_dims);
    int64_t numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const auto ne = c.get<uint64_t>(t.name + " ne");
      MOE_CHECK(ne <= static_cast<uint64_t>(INT64_MAX), "{}: tensor {}: ne[{}] = {} is negative as int64", path_,
                t.name, d, ne);
      MOE_CHECK(!__builtin_mul_overflow(numel, static_cast<int64_t>(ne), &numel),
                "{}: tensor {}: element count overflows", path_, t.name);
      t.ne.push_back(static_cast<int64_t>(ne));
    }
    const auto type = c.get<uint32_t>(t.name + " type");
    MOE_CHECK(type == 0 || type == 1 || type == 2 || type == 8 || type == 30,
              "{}: tensor {}: ggml type {} is not one of F32 (0), F16 (1), Q4_0 (2), Q8_0 (8), BF16 (30)", path_,
              t.name, type);
    t.type = static_cast<GgmlType>(type);
    MOE_CHECK(t.ne[0] % ggml_block_size(t.type) == 0, "{}: tensor {}: ne[0] = {} is not a multiple of the {} block {}",
              path_, t.name, t.ne[0], ggml_type_name(t.type), ggml_block_size(t.type));
    t.offset = c.get<uint64_t>(t.name + " offset");
    tensors_.push_back(std::move(t));
  }
  data_start_ = align_up(c.pos(), alignment_);
  uint64_t expected = 0;
  for (const GgufTensorInfo& t : tensors_) {
    MOE_CHECK(t.offset == expected,
              "{}: tensor {}: offset {}, expected {} (data must follow the tensor infos' order, each padded to {})",
              path_, t.name, t.offset, expected, alignment_);
    expected += align_up(static_cast<uint64_t>(t.nbytes()), alignment_);
    MOE_CHECK(data_start_ + expected <= size, "{}: truncated: tensor {} ends at byte {}, the file has {}", path_,
              t.name, data_start_ + expected, size);
  }
}

const GgufValue& GgufReader::get(const std::string& key) const {
  const auto it = kv_.find(key);
  MOE_CHECK(it != kv_.end(), "{}: no metadata key {}", path_, key);
  return it->second;
}

const GgufTensorInfo& GgufReader::tensor(const std::string& name) const {
  for (const GgufTensorInfo& t : tensors_)
    if (t.name == name) return t;
  MOE_THROW("{}: no tensor named {}", path_, name);
}

std::vector<uint8_t> GgufReader::read_bytes(const GgufTensorInfo& t) const {
  std::vector<uint8_t> out(static_cast<size_t>(t.nbytes()));
  std::ifstream is(path_, std::ios::binary);
  is.seekg(static_cast<std::streamoff>(data_start_ + t.offset));
  is.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  MOE_CHECK(is.good() || out.empty(), "{}: read of tensor {} failed", path_, t.name);
  return out;
}

std::vector<float> GgufReader::read_floats(const GgufTensorInfo& t) const { return ggml_decode(read_bytes(t), t.type); }

}  // namespace moeforge::checkpoint
