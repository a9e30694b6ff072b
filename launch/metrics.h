// Training metrics on disk: TensorBoard event files and a JSONL log holding the same numbers.
//
// TensorBoardWriter writes TensorFlow's event format, so stock TensorBoard reads it: a file
// events.out.tfevents.<unix time>.<host>.<pid>.moeforge of TFRecords, each
//   u64 length (LE) | u32 masked_crc32c(length bytes) | data | u32 masked_crc32c(data)
// whose data is a serialised Event (launch/tensorboard_event.proto). The first Event carries
// file_version "brain.Event:2"; every later one a single float32 scalar.
//
// JsonlWriter appends one JSON value per line and flushes each line, so a reader (or a crash)
// never sees half a record and a resumed run continues the same file.
//
// MetricsLogger writes one step to both: tag "train/loss" in TensorBoard is key "train/loss" of
// that step's JSONL line. JSONL keeps the double; TensorBoard stores float(value), exactly the
// float32 rounding of the JSONL number. JSON has no NaN or infinity: a non-finite value is null
// in JSONL and NaN/inf in TensorBoard.
//
// Only the process that owns the files (rank 0) creates these; none of them is thread-safe.
// Every failure to create, write or flush a file throws moeforge::Error naming the file.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>

namespace moeforge {

namespace detail {
struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;
}  // namespace detail

class TensorBoardWriter {
 public:
  // Creates `dir` (and its parents) when missing and a new event file in it. A file of that
  // name already existing is an error rather than being overwritten.
  explicit TensorBoardWriter(const std::filesystem::path& dir);

  // Appends an Event {wall_time, step, summary {tag, simple_value = float(value)}}. Buffered:
  // flush() (or destruction, which cannot report errors) makes it visible to readers.
  void scalar(std::string_view tag, int64_t step, double value, double wall_time);
  void flush();

  const std::filesystem::path& path() const { return path_; }

 private:
  void write_record(const std::string& data);

  std::filesystem::path path_;
  detail::FilePtr file_;
};

class JsonlWriter {
 public:
  // Opens `path` for appending, creating its parent directory when missing.
  explicit JsonlWriter(const std::filesystem::path& path);

  // Writes `record` compactly on one line and flushes. Invalid UTF-8 in strings is replaced by
  // U+FFFD rather than failing a training step over a log line.
  void write(const nlohmann::json& record);

  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  detail::FilePtr file_;
};

class MetricsLogger {
 public:
  // An empty path turns that output off (logging.tensorboard / logging.jsonl = false).
  MetricsLogger(const std::filesystem::path& tensorboard_dir, const std::filesystem::path& jsonl_path);

  // Writes one step: a scalar per entry of `metrics` to TensorBoard (tag = name) and the line
  // {"step": step, "wall_time": wall_time, name: value, ...} to JSONL; flushes both before
  // returning. Names are non-empty and neither "step" nor "wall_time"; step >= 0.
  // wall_time is seconds since the Unix epoch.
  void log(int64_t step, double wall_time, const std::map<std::string, double>& metrics);

  // Empty when that output is off.
  std::filesystem::path event_file() const { return tensorboard_ ? tensorboard_->path() : std::filesystem::path(); }
  std::filesystem::path jsonl_file() const { return jsonl_ ? jsonl_->path() : std::filesystem::path(); }

 private:
  std::unique_ptr<TensorBoardWriter> tensorboard_;
  std::unique_ptr<JsonlWriter> jsonl_;
};

}  // namespace moeforge
