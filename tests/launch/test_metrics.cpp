// Tests launch/crc32c.cpp and launch/metrics.cpp: CRC-32C against published vectors and a
// bitwise reference, TFRecord framing of the event file re-parsed here, the JSONL lines, the
// error messages, and, through tests/launch/tb_readback.py, TensorBoard's own reader agreeing
// with the JSONL log scalar for scalar plus every record's CRCs checked by the `crc32c` package.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "launch/crc32c.h"
#include "launch/metrics.h"
#include "launch/tensorboard_event.pb.h"
#include "runtime/error.h"
#include "tests/testing.h"

namespace moeforge {
namespace {

namespace fs = std::filesystem;

// ---- CRC-32C --------------------------------------------------------------------------------

// Bit at a time, straight from the definition: reflected polynomial 0x82F63B78.
uint32_t crc32c_bitwise(const std::vector<unsigned char>& bytes) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char b : bytes) {
    crc ^= b;
    for (int k = 0; k < 8; ++k) crc = (crc & 1u) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
  }
  return ~crc;
}

uint32_t crc_of(const std::vector<unsigned char>& bytes) { return crc32c(bytes.data(), bytes.size()); }

TEST(Crc32c, CheckValue) {
  EXPECT_EQ(crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(crc32c(""), 0u);
}

// RFC 3720 (iSCSI) appendix B.4.
TEST(Crc32c, Rfc3720Vectors) {
  std::vector<unsigned char> zeros(32, 0x00), ones(32, 0xFF), inc(32), dec(32);
  for (int i = 0; i < 32; ++i) {
    inc[i] = static_cast<unsigned char>(i);
    dec[i] = static_cast<unsigned char>(31 - i);
  }
  EXPECT_EQ(crc_of(zeros), 0x8A9136AAu);
  EXPECT_EQ(crc_of(ones), 0x62A8AB43u);
  EXPECT_EQ(crc_of(inc), 0x46DD794Eu);
  EXPECT_EQ(crc_of(dec), 0x113FDB5Cu);
  // An iSCSI SCSI Read(10) command PDU.
  const std::vector<unsigned char> pdu = {
      0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
      0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
      0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
  EXPECT_EQ(crc_of(pdu), 0xD9963A56u);
}

TEST(Crc32c, MatchesBitwiseReferenceOnRandomData) {
  std::mt19937 gen(7);
  for (size_t n : {1u, 2u, 3u, 7u, 8u, 9u, 63u, 64u, 65u, 255u, 1000u, 4097u}) {
    std::vector<unsigned char> bytes(n);
    for (auto& b : bytes) b = static_cast<unsigned char>(gen());
    EXPECT_EQ(crc_of(bytes), crc32c_bitwise(bytes)) << "n=" << n;
  }
}

// Masked values from tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c.
TEST(Crc32c, Masked) {
  EXPECT_EQ(masked_crc32c(0u), 0xA282EAD8u);
  EXPECT_EQ(masked_crc32c(crc32c("123456789")), 0xC78AB0E5u);
  EXPECT_EQ(masked_crc32c(0x8A9136AAu), 0x0FD7FFFAu);
  EXPECT_EQ(masked_crc32c(0xD9963A56u), 0x17309E04u);
}

// ---- files ----------------------------------------------------------------------------------

class MetricsFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "moeforge_test_metrics_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
};

struct Record {
  uint64_t length_field;
  uint32_t length_crc, data_crc;
  std::string data;
};

uint64_t get_le(const unsigned char* p, int nbytes) {
  uint64_t v = 0;
  for (int i = 0; i < nbytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

std::vector<Record> read_records(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  const std::string blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto* p = reinterpret_cast<const unsigned char*>(blob.data());
  std::vector<Record> records;
  size_t off = 0;
  while (off < blob.size()) {
    EXPECT_LE(off + 12, blob.size()) << "truncated header at " << off;
    if (off + 12 > blob.size()) break;
    Record r;
    r.length_field = get_le(p + off, 8);
    r.length_crc = static_cast<uint32_t>(get_le(p + off + 8, 4));
    EXPECT_LE(off + 12 + r.length_field + 4, blob.size()) << "truncated record at " << off;
    if (off + 12 + r.length_field + 4 > blob.size()) break;
    r.data = blob.substr(off + 12, r.length_field);
    r.data_crc = static_cast<uint32_t>(get_le(p + off + 12 + r.length_field, 4));
    records.push_back(r);
    off += 12 + r.length_field + 4;
  }
  return records;
}

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::ifstream f(path);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(f, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

// A few hundred scalars over four tags with irregular step sets; values cover 0, negatives,
// numbers float32 cannot hold exactly, float32 denormals and overflow, and NaN.
std::map<int64_t, std::map<std::string, double>> sample_run() {
  std::map<int64_t, std::map<std::string, double>> run;
  std::mt19937_64 gen(42);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t step = 0; step < 150; ++step) {
    auto& m = run[step];
    m["train/loss"] = 5.5 * std::exp(-0.01 * static_cast<double>(step)) + 0.1 * u(gen);
    m["train/lr"] = 3e-4 * std::min(1.0, static_cast<double>(step) / 20.0);  // 0 at step 0
    m["train/grad_norm"] = (u(gen) - 0.5) * 1e3;
    if (step % 10 == 9) m["val/loss"] = 0.1 + u(gen);
  }
  run[3]["train/grad_norm"] = 1e-40;  // float32 denormal
  run[4]["train/grad_norm"] = 1e39;   // beyond float32: inf in TensorBoard, a number in JSONL
  run[5]["train/grad_norm"] = std::numeric_limits<double>::quiet_NaN();
  run[6]["train/grad_norm"] = -std::numeric_limits<double>::infinity();
  return run;
}

double wall_time_of(int64_t step) { return 1.7e9 + 0.37 * static_cast<double>(step) + 1e-3; }

TEST_F(MetricsFiles, EventFileFramingAndContent) {
  const auto run = sample_run();
  fs::path event_file;
  size_t n_scalars = 0;
  {
    MetricsLogger logger(dir_ / "tb", dir_ / "logs" / "metrics.jsonl");
    event_file = logger.event_file();
    for (const auto& [step, metrics] : run) {
      logger.log(step, wall_time_of(step), metrics);
      n_scalars += metrics.size();
    }
  }
  EXPECT_EQ(event_file.parent_path(), dir_ / "tb");
  EXPECT_EQ(event_file.filename().string().rfind("events.out.tfevents.", 0), 0u) << event_file;

  const std::vector<Record> records = read_records(event_file);
  ASSERT_EQ(records.size(), 1 + n_scalars);
  for (size_t i = 0; i < records.size(); ++i) {
    const Record& r = records[i];
    unsigned char len[8];
    for (int b = 0; b < 8; ++b) len[b] = static_cast<unsigned char>(r.length_field >> (8 * b));
    EXPECT_EQ(r.length_crc, masked_crc32c(crc32c(len, 8))) << "record " << i;
    EXPECT_EQ(r.data_crc, masked_crc32c(crc32c(r.data))) << "record " << i;
  }

  tb::Event first;
  ASSERT_TRUE(first.ParseFromString(records[0].data));
  EXPECT_EQ(first.file_version(), "brain.Event:2");
  EXPECT_GT(first.wall_time(), 1.6e9);

  // Records follow the logger's order: steps ascending, tags in map order within a step.
  size_t i = 1;
  for (const auto& [step, metrics] : run) {
    for (const auto& [tag, value] : metrics) {
      tb::Event e;
      ASSERT_TRUE(e.ParseFromString(records[i].data)) << "record " << i;
      ASSERT_TRUE(e.has_summary());
      ASSERT_EQ(e.summary().value_size(), 1);
      const auto& v = e.summary().value(0);
      EXPECT_EQ(e.step(), step);
      EXPECT_EQ(e.wall_time(), wall_time_of(step));
      EXPECT_EQ(v.tag(), tag);
      EXPECT_TRUE(v.has_simple_value()) << "a 0 must still be present, step " << step << " " << tag;
      const float want = static_cast<float>(value);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(v.simple_value()));
      } else {
        EXPECT_EQ(v.simple_value(), want) << "step " << step << " " << tag;
      }
      ++i;
    }
  }

  const std::vector<nlohmann::json> lines = read_jsonl(dir_ / "logs" / "metrics.jsonl");
  ASSERT_EQ(lines.size(), run.size());
  auto it = run.begin();
  for (const auto& line : lines) {
    const auto& [step, metrics] = *it++;
    EXPECT_EQ(line.at("step").get<int64_t>(), step);
    EXPECT_EQ(line.at("wall_time").get<double>(), wall_time_of(step));
    EXPECT_EQ(line.size(), metrics.size() + 2);
    for (const auto& [tag, value] : metrics) {
      if (std::isfinite(value)) {
        EXPECT_EQ(line.at(tag).get<double>(), value) << "step " << step << " " << tag;  // bit-exact round trip
      } else {
        EXPECT_TRUE(line.at(tag).is_null()) << "step " << step << " " << tag;
      }
    }
  }
}

// The interpreter of the build tree's venv (scripts/test.sh creates <build>/pyenv with the PyPI
// packages tensorboard and crc32c); MOEFORGE_PYTHON overrides. Test executables live in
// <build>/tests/.
fs::path python_interpreter() {
  if (const char* env = std::getenv("MOEFORGE_PYTHON")) return env;
  return fs::read_symlink("/proc/self/exe").parent_path().parent_path() / "pyenv" / "bin" / "python";
}

TEST_F(MetricsFiles, TensorBoardReadsWhatJsonlHolds) {
  const fs::path python = python_interpreter();
  if (!fs::exists(python)) {
    GTEST_SKIP() << "no Python interpreter at " << python.string()
                 << " (scripts/test.sh creates <build>/pyenv with the PyPI packages tensorboard and crc32c;"
                    " or set MOEFORGE_PYTHON)";
  }
  const auto run = sample_run();
  size_t n_scalars = 0;
  {
    MetricsLogger logger(dir_ / "tb", dir_ / "metrics.jsonl");
    for (const auto& [step, metrics] : run) {
      logger.log(step, wall_time_of(step), metrics);
      n_scalars += metrics.size();
    }
  }
  const std::string cmd =
      fmt::format("'{}' '{}' --logdir '{}' --jsonl '{}' --expect-scalars {} 2>&1", python.string(),
                  testing::source_path("tests/launch/tb_readback.py"), (dir_ / "tb").string(),
                  (dir_ / "metrics.jsonl").string(), n_scalars);
  const testing::CommandResult r = testing::run_command(cmd);
  ASSERT_EQ(r.exit_code, 0) << cmd << "\n" << r.output;
  EXPECT_NE(r.output.find("tb_readback: OK"), std::string::npos) << r.output;
  std::printf("%s", r.output.c_str());
}

TEST_F(MetricsFiles, DestructionFlushes) {
  fs::path path;
  {
    TensorBoardWriter writer(dir_);
    path = writer.path();
    for (int step = 0; step < 200; ++step) writer.scalar("a", step, step * 0.5, 1.0 + step);
  }
  const auto records = read_records(path);
  ASSERT_EQ(records.size(), 201u);
  tb::Event last;
  ASSERT_TRUE(last.ParseFromString(records.back().data));
  EXPECT_EQ(last.step(), 199);
  EXPECT_EQ(last.summary().value(0).simple_value(), 99.5f);
}

TEST_F(MetricsFiles, JsonlAppends) {
  const fs::path path = dir_ / "m.jsonl";
  JsonlWriter(path).write({{"step", 1}});
  {
    JsonlWriter w(path);
    w.write({{"step", 2}, {"x", "caf\xc3\xa9"}});
    w.write({{"step", 3}, {"bad", "\xff"}});  // invalid UTF-8 is replaced, not fatal
  }
  std::ifstream f(path);
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{\"step\":1}\n{\"step\":2,\"x\":\"caf\xc3\xa9\"}\n{\"bad\":\"\xef\xbf\xbd\",\"step\":3}\n");
}

// ---- errors ---------------------------------------------------------------------------------

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no moeforge::Error)";
}

TEST_F(MetricsFiles, UnwritableLocationsNameThePath) {
  const fs::path file = dir_ / "plain_file";
  std::ofstream(file) << "x";
  EXPECT_EQ(error_of([&] { TensorBoardWriter w(file / "tb"); }),
            "cannot create TensorBoard log directory '" + (file / "tb").string() + "': Not a directory");
  EXPECT_EQ(error_of([&] { JsonlWriter w(file / "logs" / "m.jsonl"); }),
            "cannot create JSONL log directory '" + (file / "logs").string() + "': Not a directory");
  EXPECT_EQ(error_of([&] { JsonlWriter w(dir_); }),
            "cannot open JSONL log '" + dir_.string() + "' for appending: Is a directory");
  EXPECT_EQ(error_of([&] { MetricsLogger m(file, dir_ / "m.jsonl"); }),
            "cannot create TensorBoard log directory '" + file.string() + "': Not a directory");
}

TEST_F(MetricsFiles, BadMetricNamesWriteNothing) {
  MetricsLogger logger(dir_ / "tb", dir_ / "m.jsonl");
  EXPECT_EQ(error_of([&] { logger.log(1, 2.0, {{"a", 1.0}, {"step", 3.0}}); }),
            "metrics: invalid metric name 'step' (empty, \"step\" and \"wall_time\" are reserved)");
  EXPECT_EQ(error_of([&] { logger.log(1, 2.0, {{"", 1.0}}); }),
            "metrics: invalid metric name '' (empty, \"step\" and \"wall_time\" are reserved)");
  EXPECT_EQ(error_of([&] { logger.log(-1, 2.0, {{"a", 1.0}}); }), "metrics: step must be >= 0, got -1");
  EXPECT_EQ(fs::file_size(dir_ / "m.jsonl"), 0u);
  EXPECT_EQ(read_records(logger.event_file()).size(), 1u);  // only file_version
}

}  // namespace
}  // namespace moeforge
