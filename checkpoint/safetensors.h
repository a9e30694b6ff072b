// safetensors files (shared/formats.md §1): a streaming writer and a strict reader.
//
// Layout: u64 LE header length N, N bytes of JSON header, then the data buffer. Header entries
// are {"dtype", "shape", "data_offsets": [begin, end)} relative to the data buffer, plus an
// optional "__metadata__" map of strings.
//
// Writer: the caller declares every tensor up front; the writer lays them out as the reference
// writer does (by dtype alignment, largest first, then by name; header padded with spaces to a
// multiple of 8, so every tensor is aligned to its element size), writes the header into
// `<path>.tmp`, and then takes the tensors' bytes one at a time in layout order. close() checks
// that every byte was written, fsyncs and renames the file into place. Memory: one tensor.
//
// Reader: opening a file applies every rule of formats.md §1.4 before any tensor is read — file
// at least 8 bytes, N <= 100,000,000 and inside the file, a UTF-8 JSON object whose first byte is
// '{', no duplicate keys at any level, entries with exactly dtype / shape / data_offsets, a known
// dtype, non-negative integer dims, element and byte counts computed with overflow checks and
// equal to end - begin, entries sorted by offset covering [0, data length) with no gap, overlap
// or trailing byte. Every failure is a moeforge::Error naming the file and the tensor. No
// allocation is larger than the file: the header is read only after its length is checked, and
// a tensor's bytes only after its extent is.
//
// Threads: a reader or writer is used from one thread.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace moeforge::checkpoint {

inline constexpr uint64_t kSafetensorsMaxHeader = 100'000'000;

// Bits per element of a safetensors dtype name ("F32" -> 32); 0 for an unknown name.
int safetensors_dtype_bits(const std::string& dtype);

// f32 values encoded as "F32", "F16" or "BF16" little-endian bytes (16-bit: round to nearest
// even); and back.
std::vector<uint8_t> encode_floats(std::span<const float> values, const std::string& dtype);
std::vector<float> decode_floats(std::span<const uint8_t> bytes, const std::string& dtype);

struct SafetensorsTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // data_offsets, relative to the data buffer
  int64_t numel() const;
};

class SafetensorsWriter {
 public:
  // Declares the file's tensors (unique names; begin/end are ignored and computed) and writes its
  // header to `<path>.tmp`. metadata: the "__metadata__" map (HF loaders want {"format": "pt"}).
  SafetensorsWriter(std::string path, std::vector<SafetensorsTensor> tensors,
                    const std::map<std::string, std::string>& metadata);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The tensors with their offsets, in the order write() takes them.
  const std::vector<SafetensorsTensor>& layout() const { return layout_; }
  // The next tensor's bytes: `name` must be layout()[i] for the i-th call, of its exact size.
  void write(const std::string& name, std::span<const uint8_t> bytes);
  // Checks every tensor was written, fsyncs and renames the file to its final path.
  void close();

 private:
  std::string path_, tmp_;
  std::vector<SafetensorsTensor> layout_;
  size_t next_ = 0;
  std::ofstream os_;
  bool closed_ = false;
};

class SafetensorsReader {
 public:
  // Opens and validates the whole header (see above); throws naming the file and the rule.
  explicit SafetensorsReader(std::string path);

  const std::string& path() const { return path_; }
  // Every tensor, in offset order.
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The tensor named `name`; throws naming the file when there is none.
  const SafetensorsTensor& find(const std::string& name) const;
  bool contains(const std::string& name) const;

  std::vector<uint8_t> read_bytes(const SafetensorsTensor& t) const;
  // The tensor's values as f32 (F32, F16, BF16; any other dtype throws naming it).
  std::vector<float> read_floats(const SafetensorsTensor& t) const;

 private:
  std::string path_;
  uint64_t data_start_ = 0;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moeforge::checkpoint
