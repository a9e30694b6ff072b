#include "checkpoint/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <filesystem>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "checkpoint/files.h"
#include "runtime/error.h"
#include "runtime/half.h"

namespace moeforge::checkpoint {

namespace fs = std::filesystem;

// Both the file formats and our tensors are little-endian; a big-endian host would need swaps.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

int safetensors_dtype_bits(const std::string& dtype) {
  static const std::map<std::string, int> bits = {
      {"BOOL", 8},   {"U8", 8},         {"I8", 8},          {"F8_E5M2", 8},     {"F8_E4M3", 8}, {"F8_E8M0", 8},
      {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8}, {"I16", 16},   {"U16", 16},        {"F16", 16},    {"BF16", 16},
      {"I32", 32},   {"U32", 32},       {"F32", 32},        {"C64", 64},        {"F64", 64},    {"I64", 64},
      {"U64", 64},   {"F4", 4},         {"F6_E2M3", 6},     {"F6_E3M2", 6}};
  const auto it = bits.find(dtype);
  return it == bits.end() ? 0 : it->second;
}

std::vector<uint8_t> encode_floats(std::span<const float> values, const std::string& dtype) {
  std::vector<uint8_t> out;
  if (dtype == "F32") {
    out.resize(values.size() * 4);
    std::memcpy(out.data(), values.data(), out.size());
    return out;
  }
  MOE_CHECK(dtype == "F16" || dtype == "BF16", "encode_floats: dtype must be F32, F16 or BF16, got {}", dtype);
  out.resize(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = dtype == "F16" ? float_to_f16_bits(values[i]) : float_to_bf16_bits(values[i]);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

std::vector<float> decode_floats(std::span<const uint8_t> bytes, const std::string& dtype) {
  std::vector<float> out;
  if (dtype == "F32") {
    out.resize(bytes.size() / 4);
    std::memcpy(out.data(), bytes.data(), out.size() * 4);
    return out;
  }
  MOE_CHECK(dtype == "F16" || dtype == "BF16", "decode_floats: dtype must be F32, F16 or BF16, got {}", dtype);
  out.resize(bytes.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    uint16_t h = 0;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    out[i] = dtype == "F16" ? f16_bits_to_float(h) : bf16_bits_to_float(h);
  }
  return out;
}

int64_t SafetensorsTensor::numel() const {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

// ---- writer ----------------------------------------------------------------------------------

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<SafetensorsTensor> tensors,
                                     const std::map<std::string, std::string>& metadata)
    : path_(std::move(path)), tmp_(path_ + ".tmp"), layout_(std::move(tensors)) {
  std::set<std::string> names;
  for (const SafetensorsTensor& t : layout_) {
    MOE_CHECK(names.insert(t.name).second, "{}: tensor {} is declared twice", path_, t.name);
    MOE_CHECK(t.name != "__metadata__", "{}: a tensor cannot be named __metadata__", path_);
    MOE_CHECK(safetensors_dtype_bits(t.dtype) % 8 == 0 && safetensors_dtype_bits(t.dtype) > 0,
              "{}: tensor {}: unsupported dtype {}", path_, t.name, t.dtype);
  }
  // The reference writer's order: larger element alignment first, then by name.
  std::sort(layout_.begin(), layout_.end(), [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
    const int aa = safetensors_dtype_bits(a.dtype), bb = safetensors_dtype_bits(b.dtype);
    return aa != bb ? aa > bb : a.name < b.name;
  });
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (SafetensorsTensor& t : layout_) {
    t.begin = offset;
    t.end = offset + static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(safetensors_dtype_bits(t.dtype) / 8);
    offset = t.end;
    header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {t.begin, t.end}}};
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data buffer then starts 8-aligned
  const uint64_t n = text.size();
  os_.open(tmp_, std::ios::binary | std::ios::trunc);
  MOE_CHECK(os_.good(), "{}: cannot create: {}", tmp_, std::strerror(errno));
  os_.write(reinterpret_cast<const char*>(&n), 8);
  os_.write(text.data(), static_cast<std::streamsize>(text.size()));
  MOE_CHECK(os_.good(), "{}: write failed", tmp_);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (closed_) return;
  os_.close();
  std::error_code ec;
  fs::remove(tmp_, ec);  // an unfinished file never appears under the final name
}

void SafetensorsWriter::write(const std::string& name, std::span<const uint8_t> bytes) {
  MOE_CHECK(next_ < layout_.size(), "{}: tensor {} written after all {} declared tensors", path_, name,
            layout_.size());
  const SafetensorsTensor& t = layout_[next_];
  MOE_CHECK(t.name == name, "{}: expected tensor {} next (layout order), got {}", path_, t.name, name);
  MOE_CHECK(bytes.size() == t.end - t.begin, "{}: tensor {} has {} bytes, its shape and dtype need {}", path_, name,
            bytes.size(), t.end - t.begin);
  os_.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  MOE_CHECK(os_.good(), "{}: write failed", tmp_);
  ++next_;
}

void SafetensorsWriter::close() {
  MOE_CHECK(next_ == layout_.size(), "{}: closed after {} of {} tensors", path_, next_, layout_.size());
  os_.close();
  MOE_CHECK(!os_.fail(), "{}: close failed", tmp_);
  commit_file(tmp_, path_);
  closed_ = true;
}

// ---- reader ----------------------------------------------------------------------------------

namespace {

using json = nlohmann::json;

// a * b, or false on uint64 overflow.
bool mul_checked(uint64_t a, uint64_t b, uint64_t& out) { return !__builtin_mul_overflow(a, b, &out); }

// Parses the header; duplicate keys at any depth are an error (nlohmann keeps the last one).
json parse_header(const std::string& path, const std::string& text) {
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  const json::parser_callback_t track = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) keys.emplace_back();
    if (event == json::parse_event_t::object_end) keys.pop_back();
    if (event == json::parse_event_t::key && !keys.back().insert(parsed.get<std::string>()).second &&
        duplicate.empty())
      duplicate = parsed.get<std::string>();
    return true;
  };
  json header;
  try {
    header = json::parse(text, track);
  } catch (const json::exception& e) {
    MOE_THROW("{}: the header is not valid UTF-8 JSON: {}", path, e.what());
  }
  MOE_CHECK(duplicate.empty(), "{}: duplicate key '{}' in the header", path, duplicate);
  return header;
}

SafetensorsTensor parse_entry(const std::string& path, const std::string& name, const json& v) {
  MOE_CHECK(v.is_object(), "{}: tensor {}: expected an object with dtype, shape and data_offsets, got {}", path, name,
            v.type_name());
  for (const auto& [key, value] : v.items())
    MOE_CHECK(key == "dtype" || key == "shape" || key == "data_offsets", "{}: tensor {}: unknown field '{}'", path,
              name, key);
  MOE_CHECK(v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
            "{}: tensor {}: needs dtype, shape and data_offsets", path, name);
  SafetensorsTensor t;
  t.name = name;
  MOE_CHECK(v["dtype"].is_string(), "{}: tensor {}: dtype must be a string", path, name);
  t.dtype = v["dtype"].get<std::string>();
  MOE_CHECK(safetensors_dtype_bits(t.dtype) > 0, "{}: tensor {}: unknown dtype '{}'", path, name, t.dtype);
  MOE_CHECK(v["shape"].is_array(), "{}: tensor {}: shape must be an array of non-negative integers", path, name);
  for (const json& d : v["shape"]) {
    MOE_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX),
              "{}: tensor {}: shape must be an array of non-negative integers, got {}", path, name, v["shape"].dump());
    t.shape.push_back(d.get<int64_t>());
  }
  const json& off = v["data_offsets"];
  MOE_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
            "{}: tensor {}: data_offsets must be two non-negative integers, got {}", path, name, off.dump());
  t.begin = off[0].get<uint64_t>();
  t.end = off[1].get<uint64_t>();
  MOE_CHECK(t.end >= t.begin, "{}: tensor {}: data_offsets [{}, {}] end before they begin", path, name, t.begin,
            t.end);
  uint64_t n = 1, bits = 0;
  for (const int64_t d : t.shape)
    MOE_CHECK(mul_checked(n, static_cast<uint64_t>(d), n), "{}: tensor {}: element count of shape {} overflows",
              path, name, v["shape"].dump());
  MOE_CHECK(mul_checked(n, static_cast<uint64_t>(safetensors_dtype_bits(t.dtype)), bits),
            "{}: tensor {}: byte count of shape {} overflows", path, name, v["shape"].dump());
  MOE_CHECK(bits % 8 == 0, "{}: tensor {}: {} elements of {} are not a whole number of bytes", path, name, n, t.dtype);
  MOE_CHECK(t.end - t.begin == bits / 8,
            "{}: tensor {}: data_offsets [{}, {}] hold {} bytes, shape {} of {} needs {}", path, name, t.begin, t.end,
            t.end - t.begin, v["shape"].dump(), t.dtype, bits / 8);
  return t;
}

}  // namespace

SafetensorsReader::SafetensorsReader(std::string path) : path_(std::move(path)) {
  std::error_code ec;
  const uint64_t file_size = fs::file_size(path_, ec);
  MOE_CHECK(!ec, "{}: cannot read: {}", path_, ec.message());
  MOE_CHECK(file_size >= 8, "{}: header too small: the file has {} bytes, a safetensors file starts with an 8-byte "
            "header length", path_, file_size);
  std::ifstream is(path_, std::ios::binary);
  MOE_CHECK(is.good(), "{}: cannot open: {}", path_, std::strerror(errno));
  uint64_t n = 0;
  is.read(reinterpret_cast<char*>(&n), 8);
  MOE_CHECK(n <= kSafetensorsMaxHeader, "{}: header too large: its length is {} bytes, the limit is {}", path_, n,
            kSafetensorsMaxHeader);
  MOE_CHECK(n <= file_size - 8, "{}: header length {} runs past the end of the file ({} bytes)", path_, n, file_size);
  std::string text(n, '\0');
  is.read(text.data(), static_cast<std::streamsize>(n));
  MOE_CHECK(is.good(), "{}: read of the {}-byte header failed", path_, n);
  MOE_CHECK(!text.empty() && text[0] == '{', "{}: the header must start with '{{', found {}", path_,
            text.empty() ? std::string("nothing") : fmt::format("byte 0x{:02x}", static_cast<uint8_t>(text[0])));
  const json header = parse_header(path_, text);
  MOE_CHECK(header.is_object(), "{}: the header must be a JSON object", path_);
  data_start_ = 8 + n;

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      MOE_CHECK(value.is_object(), "{}: __metadata__ must map strings to strings", path_);
      for (const auto& [mk, mv] : value.items()) {
        MOE_CHECK(mv.is_string(), "{}: __metadata__ value of '{}' must be a string, got {}", path_, mk, mv.dump());
        metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    tensors_.push_back(parse_entry(path_, key, value));
  }
  std::sort(tensors_.begin(), tensors_.end(), [](const SafetensorsTensor& a, const SafetensorsTensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (const SafetensorsTensor& t : tensors_) {
    MOE_CHECK(t.begin == expected,
              "{}: tensor {}: data_offsets [{}, {}] {} (the previous tensor ends at {}); tensors must tile the data "
              "buffer without gaps or overlap",
              path_, t.name, t.begin, t.end, t.begin < expected ? "overlap another tensor" : "leave a gap", expected);
    expected = t.end;
    index_[t.name] = static_cast<size_t>(&t - tensors_.data());
  }
  MOE_CHECK(data_start_ + expected == file_size,
            "{}: the tensors end at byte {} but the file has {} bytes{}", path_, data_start_ + expected, file_size,
            data_start_ + expected < file_size ? " (trailing bytes)" : " (truncated)");
}

const SafetensorsTensor& SafetensorsReader::find(const std::string& name) const {
  const auto it = index_.find(name);
  MOE_CHECK(it != index_.end(), "{}: no tensor named {}", path_, name);
  return tensors_[it->second];
}

bool SafetensorsReader::contains(const std::string& name) const { return index_.count(name) > 0; }

std::vector<uint8_t> SafetensorsReader::read_bytes(const SafetensorsTensor& t) const {
  std::vector<uint8_t> out(t.end - t.begin);
  std::ifstream is(path_, std::ios::binary);
  is.seekg(static_cast<std::streamoff>(data_start_ + t.begin));
  is.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size()));
  MOE_CHECK(is.good() || out.empty(), "{}: read of tensor {} ({} bytes at {}) failed (file changed while open?)", path_,
            t.name, out.size(), data_start_ + t.begin);
  return out;
}

std::vector<float> SafetensorsReader::read_floats(const SafetensorsTensor& t) const {
  MOE_CHECK(t.dtype == "F32" || t.dtype == "F16" || t.dtype == "BF16",
            "{}: tensor {} is {}; moeforge imports F32, F16 and BF16", path_, t.name, t.dtype);
  return decode_floats(read_bytes(t), t.dtype);
}

}  // namespace moeforge::checkpoint
