#include "data/prepare.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <span>

#include "data/byte_tokenizer.h"
#include "data/sha256.h"
#include "data/token_shard.h"
#include "runtime/error.h"

namespace moeforge::data {

namespace {

namespace fs = std::filesystem;

constexpr size_t kChunkBytes = size_t{1} << 20;
// Shard names are zero-padded to 5 digits so that name order is stream order.
constexpr int64_t kMaxShards = 100000;

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

FilePtr open_input(const std::string& path) {
  std::error_code ec;
  MOE_CHECK(!fs::is_directory(path, ec), "{}: is a directory, expected a text file", path);
  std::FILE* f = std::fopen(path.c_str(), "rb");
  MOE_CHECK(f != nullptr, "{}: cannot open input file: {}", path, std::strerror(errno));
  return FilePtr(f);
}

// An input file checked before anything is written, with its train/val cut.
struct Source {
  std::string path;
  int64_t bytes = 0;
  int64_t cut = 0;  // bytes [0, cut) train, [cut, bytes) validation
};

// The validation part starts at the first line start at or after bytes - floor(F * bytes).
// floor keeps at least one byte of a non-empty file in training; moving the cut forward (never
// back) keeps the validation part at most F of the file.
int64_t find_cut(std::FILE* f, const std::string& path, int64_t bytes, double val_fraction) {
  const int64_t nominal = bytes - static_cast<int64_t>(std::floor(val_fraction * static_cast<double>(bytes)));
  if (nominal >= bytes) return bytes;
  MOE_CHECK(std::fseek(f, static_cast<long>(nominal - 1), SEEK_SET) == 0, "{}: seek failed: {}", path,
            std::strerror(errno));
  std::vector<char> buf(64 * 1024);
  int64_t pos = nominal - 1;  // file offset of buf[0]
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) {
    for (size_t i = 0; i < n; ++i) {
      if (buf[i] == '\n') return pos + static_cast<int64_t>(i) + 1;
    }
    pos += static_cast<int64_t>(n);
  }
  MOE_CHECK(!std::ferror(f), "{}: read error", path);
  return bytes;
}

// Streams documents into OUT/<split>/shard_NNNNN.bin files of at most max_tokens each.
class ShardSequenceWriter {
 public:
  ShardSequenceWriter(fs::path dir, int64_t max_tokens) : dir_(std::move(dir)), max_tokens_(max_tokens) {}

  void begin_document() {
    if (static_cast<int64_t>(buffer_.size()) == max_tokens_) flush();
    starts_.push_back(buffer_.size());
    open_ = true;
    ++documents_;
  }

  void append(std::span<const int32_t> tokens) {
    while (!tokens.empty()) {
      // Flushing only when more tokens arrive keeps a document that ends exactly at a shard
      // boundary from leaving an empty continuation document in the next shard.
      if (static_cast<int64_t>(buffer_.size()) == max_tokens_) flush();
      const size_t n = std::min(tokens.size(), static_cast<size_t>(max_tokens_) - buffer_.size());
      buffer_.insert(buffer_.end(), tokens.begin(), tokens.begin() + static_cast<std::ptrdiff_t>(n));
      tokens = tokens.subspan(n);
      tokens_ += static_cast<int64_t>(n);
    }
  }

  void end_document() { open_ = false; }

  // Writes the last, partly filled shard and returns the manifest entries of all shards.
  nlohmann::ordered_json finish(const fs::path& out_dir) {
    if (!buffer_.empty()) flush();
    nlohmann::ordered_json shards = nlohmann::ordered_json::array();
    // The digest is of the bytes on disk, read back after the rename, not of our buffer.
    for (const Written& w : written_) {
      shards.push_back({{"file", fs::relative(w.path, out_dir).generic_string()},
                        {"tokens", w.tokens},
                        {"documents", w.documents},
                        {"sha256", sha256_file(w.path.string())}});
    }
    return shards;
  }

  SplitSummary summary() const { return {tokens_, documents_, static_cast<int64_t>(written_.size())}; }

 private:
  struct Written {
    fs::path path;
    int64_t tokens;
    int64_t documents;
  };

  void flush() {
    const int64_t index = static_cast<int64_t>(written_.size());
    MOE_CHECK(index < kMaxShards, "{}: more than {} shards; raise the tokens per shard", dir_.string(), kMaxShards);
    std::vector<uint64_t> offsets(starts_.begin(), starts_.end());
    offsets.push_back(buffer_.size());
    const fs::path path = dir_ / fmt::format("shard_{:05d}.bin", index);
    write_shard(path.string(), buffer_, offsets, kVocabSize);
    written_.push_back({path, static_cast<int64_t>(buffer_.size()), static_cast<int64_t>(starts_.size())});
    buffer_.clear();
    starts_.clear();
    if (open_) starts_.push_back(0);  // the open document continues in the next shard
  }

  fs::path dir_;
  int64_t max_tokens_;
  std::vector<int32_t> buffer_;   // (<= max_tokens) tokens of the shard being filled
  std::vector<uint64_t> starts_;  // start of each document in buffer_
  bool open_ = false;
  int64_t tokens_ = 0;
  int64_t documents_ = 0;
  std::vector<Written> written_;
};

// Removes shard_*.bin (and interrupted .tmp) files of an earlier run.
void remove_stale_shards(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return;
  std::vector<fs::path> stale;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with("shard_") && (name.ends_with(".bin") || name.ends_with(".bin.tmp"))) stale.push_back(e.path());
  }
  MOE_CHECK(!ec, "{}: cannot list directory: {}", dir.string(), ec.message());
  for (const fs::path& p : stale) {
    fs::remove(p, ec);
    MOE_CHECK(!ec, "{}: cannot remove stale shard: {}", p.string(), ec.message());
  }
}

void create_dir(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  MOE_CHECK(!ec && fs::is_directory(dir), "{}: cannot create output directory: {}", dir.string(),
            ec ? ec.message() : "a file of that name exists");
}

}  // namespace

PrepareSummary prepare(const PrepareOptions& options) {
  MOE_CHECK(!options.inputs.empty(), "data prepare: no input files");
  MOE_CHECK(!options.output_dir.empty(), "data prepare: no output directory");
  MOE_CHECK(options.val_fraction >= 0.0 && options.val_fraction < 1.0,
            "data prepare: val_fraction must be in [0, 1), got {}", options.val_fraction);
  MOE_CHECK(options.max_tokens_per_shard >= 1, "data prepare: max tokens per shard must be >= 1, got {}",
            options.max_tokens_per_shard);
  const double F = options.val_fraction;

  // Check every input before writing anything.
  std::vector<Source> sources;
  for (const std::string& path : options.inputs) {
    FilePtr f = open_input(path);
    MOE_CHECK(std::fseek(f.get(), 0, SEEK_END) == 0, "{}: seek failed: {}", path, std::strerror(errno));
    const int64_t bytes = std::ftell(f.get());
    MOE_CHECK(bytes >= 0, "{}: cannot determine the file size: {}", path, std::strerror(errno));
    MOE_CHECK(bytes > 0, "{}: input file is empty: no training text", path);
    sources.push_back({path, bytes, F > 0.0 ? find_cut(f.get(), path, bytes, F) : bytes});
  }
  if (F > 0.0) {
    bool any_val = false;
    for (const Source& s : sources) any_val |= s.cut < s.bytes;
    MOE_CHECK(any_val,
              "data prepare: val_fraction {} gives an empty validation split: no input has a line starting in its "
              "last {} of bytes",
              F, F);
  }

  const fs::path out(options.output_dir);
  create_dir(out / "train");
  remove_stale_shards(out / "train");
  remove_stale_shards(out / "val");
  std::error_code ec;
  fs::remove(out / "manifest.json", ec);
  MOE_CHECK(!ec, "{}: cannot remove the old manifest: {}", (out / "manifest.json").string(), ec.message());
  if (F > 0.0) create_dir(out / "val");

  ShardSequenceWriter train(out / "train", options.max_tokens_per_shard);
  ShardSequenceWriter val(out / "val", options.max_tokens_per_shard);
  const int32_t bos = kBos, eos = kEos;
  nlohmann::ordered_json source_entries = nlohmann::ordered_json::array();
  PrepareSummary summary;
  std::vector<char> chunk(kChunkBytes);
  for (const Source& s : sources) {
    FilePtr f = open_input(s.path);
    Sha256 digest;
    train.begin_document();
    train.append({&bos, 1});
    int64_t pos = 0;
    size_t n = 0;
    while ((n = std::fread(chunk.data(), 1, chunk.size(), f.get())) > 0) {
      MOE_CHECK(pos + static_cast<int64_t>(n) <= s.bytes, "{}: file grew while being read", s.path);
      digest.update({reinterpret_cast<const uint8_t*>(chunk.data()), n});
      const std::vector<int32_t> ids = encode({chunk.data(), n});
      const std::span<const int32_t> all(ids);
      // The chunk's bytes before the cut go to training, the rest to validation.
      const size_t n_train = static_cast<size_t>(std::clamp<int64_t>(s.cut - pos, 0, static_cast<int64_t>(n)));
      train.append(all.first(n_train));
      if (pos + static_cast<int64_t>(n_train) == s.cut && n_train > 0) {
        train.append({&eos, 1});
        train.end_document();
      }
      if (n_train < n) {
        if (pos + static_cast<int64_t>(n_train) == s.cut) {
          val.begin_document();
          val.append({&bos, 1});
        }
        val.append(all.subspan(n_train));
      }
      pos += static_cast<int64_t>(n);
    }
    MOE_CHECK(!std::ferror(f.get()), "{}: read error: {}", s.path, std::strerror(errno));
    MOE_CHECK(pos == s.bytes, "{}: file changed while being read ({} bytes, then {})", s.path, s.bytes, pos);
    if (s.cut < s.bytes) {
      val.append({&eos, 1});
      val.end_document();
    }
    const int64_t train_tokens = s.cut + 2;
    const int64_t val_tokens = s.cut < s.bytes ? s.bytes - s.cut + 2 : 0;
    source_entries.push_back({{"path", s.path},
                              {"bytes", s.bytes},
                              {"sha256", digest.hex()},
                              {"train_tokens", train_tokens},
                              {"val_tokens", val_tokens}});
    summary.input_bytes += s.bytes;
  }
  summary.input_files = static_cast<int64_t>(sources.size());

  nlohmann::ordered_json manifest;
  manifest["format"] = "moeforge-token-shards";
  manifest["shard_version"] = kShardVersion;
  manifest["tokenizer"] = {{"name", kByteTokenizerName}, {"vocab_size", kVocabSize},
                           {"bos", kBos},                {"eos", kEos},
                           {"pad", kPad}};
  manifest["val_fraction"] = F;
  manifest["max_tokens_per_shard"] = options.max_tokens_per_shard;
  manifest["sources"] = source_entries;
  auto split_entry = [&](ShardSequenceWriter& w, SplitSummary& s) {
    nlohmann::ordered_json shards = w.finish(out);
    s = w.summary();
    return nlohmann::ordered_json{{"tokens", s.tokens}, {"documents", s.documents}, {"shards", shards}};
  };
  manifest["train"] = split_entry(train, summary.train);
  if (F > 0.0) manifest["val"] = split_entry(val, summary.val);

  const fs::path manifest_path = out / "manifest.json";
  const fs::path tmp = out / "manifest.json.tmp";
  {
    std::ofstream os(tmp);
    os << manifest.dump(2) << "\n";
    os.close();
    MOE_CHECK(os.good(), "{}: cannot write", tmp.string());
  }
  fs::rename(tmp, manifest_path, ec);
  MOE_CHECK(!ec, "{}: cannot rename {} into place: {}", manifest_path.string(), tmp.string(), ec.message());
  summary.manifest_path = manifest_path.string();
  return summary;
}

}  // namespace moeforge::data
