// TensorBoard event files, JSONL, and the logger writing one step to both (see metrics.h).
#include "launch/metrics.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <ctime>
#include <nlohmann/json.hpp>
#include <system_error>

#include "launch/crc32c.h"
#include "launch/tensorboard_event.pb.h"
#include "runtime/error.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

std::string errno_message() { return std::generic_category().message(errno); }

void create_directories(const fs::path& dir, std::string_view what) {
  if (dir.empty()) return;
  std::error_code ec;
  fs::create_directories(dir, ec);
  MOE_CHECK(!ec, "cannot create {} directory '{}': {}", what, dir.string(), ec.message());
}

std::string hostname() {
  std::array<char, 256> name{};
  if (gethostname(name.data(), name.size() - 1) != 0) return "localhost";
  return name.data();
}

void put_le(unsigned char* out, uint64_t v, int nbytes) {
  for (int i = 0; i < nbytes; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

}  // namespace

// ---- TensorBoardWriter ------------------------------------------------------------------------

TensorBoardWriter::TensorBoardWriter(const fs::path& dir) {
  create_directories(dir, "TensorBoard log");
  // TensorFlow's name, events.out.tfevents.<%010d time>.<host>, is what TensorBoard globs for
  // ("tfevents" in the name); the pid keeps two runs started in the same second apart.
  path_ = dir / fmt::format("events.out.tfevents.{:010d}.{}.{}.moeforge", static_cast<int64_t>(std::time(nullptr)),
                            hostname(), static_cast<int64_t>(getpid()));
  // "x": fail instead of truncating an existing file of the same name.
  file_.reset(std::fopen(path_.c_str(), "wbx"));
  MOE_CHECK(file_ != nullptr, "cannot create TensorBoard event file '{}': {}", path_.string(), errno_message());

  tb::Event event;
  event.set_wall_time(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
  event.set_file_version("brain.Event:2");
  write_record(event.SerializeAsString());
  flush();
}

void TensorBoardWriter::scalar(std::string_view tag, int64_t step, double value, double wall_time) {
  tb::Event event;
  event.set_wall_time(wall_time);
  event.set_step(step);
  tb::Summary::Value* v = event.mutable_summary()->add_value();
  v->set_tag(std::string(tag));
  v->set_simple_value(static_cast<float>(value));
  write_record(event.SerializeAsString());
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::array<unsigned char, 12> header{};  // u64 length | u32 masked crc of those 8 bytes
  put_le(header.data(), data.size(), 8);
  put_le(header.data() + 8, masked_crc32c(crc32c(header.data(), 8)), 4);
  std::array<unsigned char, 4> footer{};  // u32 masked crc of the data
  put_le(footer.data(), masked_crc32c(crc32c(data)), 4);

  std::FILE* f = file_.get();
  const bool ok = std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
                  std::fwrite(data.data(), 1, data.size(), f) == data.size() &&
                  std::fwrite(footer.data(), 1, footer.size(), f) == footer.size();
  MOE_CHECK(ok, "cannot write TensorBoard event file '{}': {}", path_.string(), errno_message());
}

void TensorBoardWriter::flush() {
  MOE_CHECK(std::fflush(file_.get()) == 0, "cannot write TensorBoard event file '{}': {}", path_.string(),
            errno_message());
}

// ---- JsonlWriter ------------------------------------------------------------------------------

JsonlWriter::JsonlWriter(const fs::path& path) : path_(path) {
  create_directories(path_.parent_path(), "JSONL log");
  file_.reset(std::fopen(path_.c_str(), "ab"));
  MOE_CHECK(file_ != nullptr, "cannot open JSONL log '{}' for appending: {}", path_.string(), errno_message());
}

void JsonlWriter::write(const nlohmann::json& record) {
  std::string line = record.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  line.push_back('\n');
  const bool ok = std::fwrite(line.data(), 1, line.size(), file_.get()) == line.size() && std::fflush(file_.get()) == 0;
  MOE_CHECK(ok, "cannot write JSONL log '{}': {}", path_.string(), errno_message());
}

// ---- MetricsLogger ----------------------------------------------------------------------------

MetricsLogger::MetricsLogger(const fs::path& tensorboard_dir, const fs::path& jsonl_path) {
  if (!tensorboard_dir.empty()) tensorboard_ = std::make_unique<TensorBoardWriter>(tensorboard_dir);
  if (!jsonl_path.empty()) jsonl_ = std::make_unique<JsonlWriter>(jsonl_path);
}

void MetricsLogger::log(int64_t step, double wall_time, const std::map<std::string, double>& metrics) {
  MOE_CHECK(step >= 0, "metrics: step must be >= 0, got {}", step);
  nlohmann::json line = {{"step", step}, {"wall_time", wall_time}};
  // Validate everything before writing anything, so a bad call leaves both files untouched.
  for (const auto& [name, value] : metrics) {
    MOE_CHECK(!name.empty() && name != "step" && name != "wall_time",
              "metrics: invalid metric name '{}' (empty, \"step\" and \"wall_time\" are reserved)", name);
  }
  for (const auto& [name, value] : metrics) {
    if (tensorboard_) tensorboard_->scalar(name, step, value, wall_time);
    line[name] = value;
  }
  if (tensorboard_) tensorboard_->flush();
  if (jsonl_) jsonl_->write(line);
}

}  // namespace moeforge
