// GGUF v3 files (shared/formats.md §3): a streaming writer, a strict reader, and the ggml tensor
// encodings moeforge exports (F32, F16, BF16, Q8_0, Q4_0).
//
// Layout: magic "GGUF", u32 version 3, u64 tensor count, u64 key-value count, the key-values,
// the tensor infos (name, dims with ne[0] fastest, ggml type, offset), zero padding to the
// alignment, then the data: each tensor at its offset, in info order, padded to the alignment.
//
// Writer: metadata and tensor infos are declared first; write_header() computes the offsets
// (each the running sum of the previous tensors' padded sizes) and writes everything before the
// data into `<path>.tmp`; write_tensor() then takes each tensor's bytes in info order; close()
// checks completeness, fsyncs and renames. Memory: one tensor.
//
// Reader: validates what ggml's gguf.cpp does — magic, version 3, counts that fit the file,
// unique non-empty keys, known value types, no nested arrays, strings and arrays bounded by the
// rest of the file, a UINT32 power-of-two general.alignment, unique tensor names shorter than
// 64 bytes, at most 4 dims, known types, ne[0] a multiple of the block size, element counts
// without overflow, offsets equal to the padded running sum, and data inside the file. Every
// failure is a moeforge::Error naming the file and the key or tensor. No allocation is larger
// than the file.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace moeforge::checkpoint {

enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ8_0 = 8, kBF16 = 30 };
// "f32", "f16", "q4_0", "q8_0", "bf16" (the --type names); parse throws on anything else.
const char* ggml_type_name(GgmlType t);
GgmlType parse_ggml_type(const std::string& name);
// Elements per block and bytes per block.
int64_t ggml_block_size(GgmlType t);
int64_t ggml_type_size(GgmlType t);
// Bytes of a row-major tensor of n elements, n a multiple of the block size.
int64_t ggml_nbytes(GgmlType t, int64_t n);

// f32 values encoded as type t (ggml's reference quantizers for Q8_0 / Q4_0; blocks run over
// consecutive values, so n must be a multiple of the block size); and decoded back.
std::vector<uint8_t> ggml_encode(std::span<const float> values, GgmlType t);
std::vector<float> ggml_decode(std::span<const uint8_t> bytes, GgmlType t);

enum class GgufType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12
};

// A metadata value: integers of every width in `i` (a UINT64 past INT64_MAX keeps its bit
// pattern), FLOAT32/FLOAT64 in `f`, BOOL in `i` (0 or 1), STRING in `s`, ARRAY in `array`.
struct GgufValue {
  GgufType type = GgufType::kU32;
  int64_t i = 0;
  double f = 0.0;
  std::string s;
  GgufType elem_type = GgufType::kU32;  // for arrays
  std::vector<GgufValue> array;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] fastest: row-major shape (d0, ..., dn-1) is ne (dn-1, ..., d0)
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;      // relative to the data section
  int64_t numel() const;
  int64_t nbytes() const { return ggml_nbytes(type, numel()); }
};

class GgufWriter {
 public:
  explicit GgufWriter(std::string path, uint32_t alignment = 32);
  ~GgufWriter();
  GgufWriter(const GgufWriter&) = delete;
  GgufWriter& operator=(const GgufWriter&) = delete;

  void add_u32(const std::string& key, uint32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_string(const std::string& key, const std::string& v);
  void add_strings(const std::string& key, const std::vector<std::string>& v);
  void add_i32s(const std::string& key, const std::vector<int32_t>& v);
  void add_f32s(const std::string& key, const std::vector<float>& v);
  // Declares a tensor; data follows in declaration order.
  void add_tensor(const std::string& name, std::vector<int64_t> ne, GgmlType type);

  void write_header();
  // The next declared tensor's bytes (exact size).
  void write_tensor(const std::string& name, std::span<const uint8_t> bytes);
  void close();

 private:
  void add(const std::string& key, GgufValue v);

  std::string path_, tmp_;
  uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<GgufTensorInfo> tensors_;
  size_t next_ = 0;
  uint64_t written_ = 0;  // bytes of the data section so far
  std::ofstream os_;
  bool header_done_ = false, closed_ = false;
};

class GgufReader {
 public:
  // Reads and validates the header and tensor infos (see above).
  explicit GgufReader(std::string path);

  const std::map<std::string, GgufValue>& metadata() const { return kv_; }
  const GgufValue& get(const std::string& key) const;  // throws naming a missing key
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo& tensor(const std::string& name) const;
  uint32_t alignment() const { return alignment_; }
  uint64_t data_start() const { return data_start_; }

  std::vector<uint8_t> read_bytes(const GgufTensorInfo& t) const;
  std::vector<float> read_floats(const GgufTensorInfo& t) const;  // decoded to f32

 private:
  std::string path_;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensorInfo> tensors_;
  uint32_t alignment_ = 32;
  uint64_t data_start_ = 0;
};

}  // namespace moeforge::checkpoint
