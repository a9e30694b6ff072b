// Tests data/prepare.cpp: the train/validation cut (at a line start, including a cut that
// falls exactly on the reader's 1 MiB chunk boundary), BOS/EOS framing of every document, the
// stream the shards hold (read back through TokenDataset), splitting into many shards with
// per-shard document indexes, the manifest (sha256 of a source checked against the FIPS value
// for "abc", shard digests, counts), removal of stale shards, and every input error.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "data/byte_tokenizer.h"
#include "data/prepare.h"
#include "data/sha256.h"
#include "data/token_shard.h"
#include "temp_dir.h"

namespace moeforge::data {
namespace {

namespace fs = std::filesystem;
using moeforge::testing::error_of;
using moeforge::testing::read_file;
using moeforge::testing::TempDir;
using moeforge::testing::write_file;

std::vector<int32_t> stream_of(const std::string& dir) {
  const TokenDataset ds(dir, kVocabSize);
  std::vector<int32_t> out(static_cast<size_t>(ds.size()));
  ds.copy(0, ds.size(), out.data());
  return out;
}

// BOS + bytes + EOS for each text, concatenated.
std::vector<int32_t> framed(const std::vector<std::string>& docs) {
  std::vector<int32_t> out;
  for (const std::string& d : docs) {
    out.push_back(kBos);
    for (unsigned char c : d) out.push_back(c);
    out.push_back(kEos);
  }
  return out;
}

nlohmann::json read_manifest(const std::string& out) {
  return nlohmann::json::parse(read_file(out + "/manifest.json"));
}

TEST(Prepare, SplitsAtLineStartAndFramesDocuments) {
  TempDir dir;
  // 20 bytes, F = 0.3: floor(6) bytes nominally, cut at 14 lands inside "cccc\n" and moves
  // forward to the next line start, 15. "abc" has no room for validation (floor(0.9) = 0).
  const std::string lines = "aaaa\nbbbb\ncccc\ndddd\n";
  write_file(dir / "lines.txt", lines);
  write_file(dir / "abc.txt", "abc");
  const std::string out = dir / "out";
  const PrepareSummary s = prepare({{dir / "lines.txt", dir / "abc.txt"}, out, 0.3});

  EXPECT_EQ(s.input_files, 2);
  EXPECT_EQ(s.input_bytes, 23);
  EXPECT_EQ(s.train.tokens, 17 + 5);
  EXPECT_EQ(s.train.documents, 2);
  EXPECT_EQ(s.train.shards, 1);
  EXPECT_EQ(s.val.tokens, 7);
  EXPECT_EQ(s.val.documents, 1);
  EXPECT_EQ(s.val.shards, 1);
  EXPECT_EQ(s.manifest_path, out + "/manifest.json");

  EXPECT_EQ(stream_of(out + "/train"), framed({"aaaa\nbbbb\ncccc\n", "abc"}));
  EXPECT_EQ(stream_of(out + "/val"), framed({"dddd\n"}));
  const TokenShard train(out + "/train/shard_00000.bin", kVocabSize);
  ASSERT_EQ(train.num_documents(), 2);
  EXPECT_EQ(train.document(0).begin, 0);
  EXPECT_EQ(train.document(0).end, 17);
  EXPECT_EQ(train.document(1).begin, 17);
  EXPECT_EQ(train.document(1).end, 22);
  EXPECT_EQ(train.token(0), kBos);
  EXPECT_EQ(train.token(16), kEos);
  EXPECT_EQ(train.token(17), kBos);
  EXPECT_EQ(train.token(21), kEos);

  const nlohmann::json m = read_manifest(out);
  EXPECT_EQ(m["tokenizer"]["name"], "byte");
  EXPECT_EQ(m["tokenizer"]["vocab_size"], 259);
  EXPECT_EQ(m["tokenizer"]["bos"], 256);
  EXPECT_EQ(m["tokenizer"]["eos"], 257);
  EXPECT_EQ(m["val_fraction"], 0.3);
  ASSERT_EQ(m["sources"].size(), 2u);
  const nlohmann::json& l = m["sources"][0];
  EXPECT_EQ(l["path"], dir / "lines.txt");
  EXPECT_EQ(l["bytes"], 20);
  EXPECT_EQ(l["train_tokens"], 17);
  EXPECT_EQ(l["val_tokens"], 7);
  const nlohmann::json& a = m["sources"][1];
  EXPECT_EQ(a["bytes"], 3);
  EXPECT_EQ(a["sha256"], "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");  // FIPS 180-2 "abc"
  EXPECT_EQ(a["train_tokens"], 5);
  EXPECT_EQ(a["val_tokens"], 0);

  EXPECT_EQ(m["train"]["tokens"], 22);
  EXPECT_EQ(m["train"]["documents"], 2);
  ASSERT_EQ(m["train"]["shards"].size(), 1u);
  const nlohmann::json& sh = m["train"]["shards"][0];
  EXPECT_EQ(sh["file"], "train/shard_00000.bin");
  EXPECT_EQ(sh["tokens"], 22);
  EXPECT_EQ(sh["documents"], 2);
  EXPECT_EQ(sh["sha256"], sha256_file(out + "/train/shard_00000.bin"));
  EXPECT_EQ(m["val"]["shards"][0]["file"], "val/shard_00000.bin");
  EXPECT_EQ(m["val"]["shards"][0]["tokens"], 7);
  EXPECT_FALSE(fs::exists(out + "/manifest.json.tmp"));
}

TEST(Prepare, NoValidationWhenFractionIsZero) {
  TempDir dir;
  write_file(dir / "a.txt", "one\ntwo\n");
  const PrepareSummary s = prepare({{dir / "a.txt"}, dir / "out", 0.0});
  EXPECT_EQ(s.val.tokens, 0);
  EXPECT_EQ(s.val.shards, 0);
  EXPECT_FALSE(fs::exists(dir / "out/val"));
  EXPECT_EQ(stream_of(dir / "out/train"), framed({"one\ntwo\n"}));
  EXPECT_FALSE(read_manifest(dir / "out").contains("val"));
}

// Documents cross shard boundaries; each shard's index must hold exactly the parts of the
// documents that overlap it.
TEST(Prepare, ManySmallShards) {
  TempDir dir;
  write_file(dir / "a.txt", "aaaa\nbbbb\ncccc\n");  // 17 tokens
  write_file(dir / "b.txt", "xyz");                 // 5 tokens
  write_file(dir / "c.txt", "q\n");                 // 4 tokens
  const std::string out = dir / "out";
  const int64_t per_shard = 4;
  const PrepareSummary s = prepare({{dir / "a.txt", dir / "b.txt", dir / "c.txt"}, out, 0.0, per_shard});
  const std::vector<int64_t> doc_bounds = {0, 17, 22, 26};
  EXPECT_EQ(s.train.tokens, 26);
  EXPECT_EQ(s.train.documents, 3);
  ASSERT_EQ(s.train.shards, 7);  // ceil(26 / 4)
  EXPECT_EQ(stream_of(out + "/train"), framed({"aaaa\nbbbb\ncccc\n", "xyz", "q\n"}));

  const nlohmann::json m = read_manifest(out);
  for (int64_t k = 0; k < s.train.shards; ++k) {
    const std::string name = fmt::format("train/shard_{:05d}.bin", k);
    const TokenShard shard(out + "/" + name, kVocabSize);
    const int64_t lo = k * per_shard, hi = std::min<int64_t>(lo + per_shard, 26);
    EXPECT_EQ(shard.size(), hi - lo);
    // Reference: intersections of [lo, hi) with each document, shifted to shard coordinates.
    std::vector<std::pair<int64_t, int64_t>> want;
    for (size_t d = 0; d + 1 < doc_bounds.size(); ++d) {
      const int64_t b = std::max(lo, doc_bounds[d]), e = std::min(hi, doc_bounds[d + 1]);
      if (b < e) want.emplace_back(b - lo, e - lo);
    }
    ASSERT_EQ(shard.num_documents(), static_cast<int64_t>(want.size())) << name;
    for (size_t d = 0; d < want.size(); ++d) {
      EXPECT_EQ(shard.document(static_cast<int64_t>(d)).begin, want[d].first) << name << " doc " << d;
      EXPECT_EQ(shard.document(static_cast<int64_t>(d)).end, want[d].second) << name << " doc " << d;
    }
    EXPECT_EQ(m["train"]["shards"][k]["file"], name);
    EXPECT_EQ(m["train"]["shards"][k]["tokens"], hi - lo);
    EXPECT_EQ(m["train"]["shards"][k]["documents"], want.size());
  }
}

// 131072 lines of 16 bytes = 2 MiB and F = 0.5 put the nominal cut exactly on a line start
// that is also the end of prepare's first 1 MiB read; F = 0.3 puts it inside the second chunk.
TEST(Prepare, CutAtAndAfterTheChunkBoundary) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 131072; ++i) text += fmt::format("{:015x}\n", i * 2654435761u);
  ASSERT_EQ(text.size(), size_t{1} << 21);
  write_file(dir / "big.txt", text);
  for (double f : {0.5, 0.3}) {
    const std::string out = dir / fmt::format("out{}", f);
    const PrepareSummary s = prepare({{dir / "big.txt"}, out, f, 300000});
    // Independent cut: first line start at or after size - floor(f * size).
    size_t cut = text.size() - static_cast<size_t>(std::floor(f * static_cast<double>(text.size())));
    while (text[cut - 1] != '\n') ++cut;
    if (f == 0.5) {
      EXPECT_EQ(cut, size_t{1} << 20);
    }
    EXPECT_EQ(stream_of(out + "/train"), framed({text.substr(0, cut)})) << f;
    EXPECT_EQ(stream_of(out + "/val"), framed({text.substr(cut)})) << f;
    EXPECT_EQ(s.train.shards, static_cast<int64_t>((cut + 2 + 299999) / 300000));
    const nlohmann::json m = read_manifest(out);
    EXPECT_EQ(m["sources"][0]["sha256"], sha256_file(dir / "big.txt"));
    EXPECT_EQ(m["sources"][0]["train_tokens"], cut + 2);
    EXPECT_EQ(m["sources"][0]["val_tokens"], text.size() - cut + 2);
  }
}

TEST(Prepare, RerunRemovesStaleShards) {
  TempDir dir;
  write_file(dir / "a.txt", "aaaa\nbbbb\ncccc\ndddd\n");
  const std::string out = dir / "out";
  prepare({{dir / "a.txt"}, out, 0.3, 3});
  ASSERT_TRUE(fs::exists(out + "/train/shard_00005.bin"));
  ASSERT_TRUE(fs::exists(out + "/val/shard_00000.bin"));
  write_file(out + "/train/shard_00099.bin.tmp", "interrupted");
  const PrepareSummary s = prepare({{dir / "a.txt"}, out, 0.0});
  EXPECT_EQ(s.train.shards, 1);
  EXPECT_FALSE(fs::exists(out + "/train/shard_00001.bin"));
  EXPECT_FALSE(fs::exists(out + "/train/shard_00099.bin.tmp"));
  EXPECT_FALSE(fs::exists(out + "/val/shard_00000.bin"));
  EXPECT_EQ(stream_of(out + "/train"), framed({"aaaa\nbbbb\ncccc\ndddd\n"}));
}

TEST(Prepare, Errors) {
  TempDir dir;
  write_file(dir / "ok.txt", "line\nline\n");
  write_file(dir / "empty.txt", "");
  write_file(dir / "one_line.txt", "no newline at all");
  const std::string out = dir / "out";
  const std::string missing = dir / "missing.txt";
  EXPECT_EQ(error_of([&] { prepare({{}, out, 0.1}); }), "data prepare: no input files");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt"}, out, 1.0}); }),
            "data prepare: val_fraction must be in [0, 1), got 1");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt"}, out, -0.25}); }),
            "data prepare: val_fraction must be in [0, 1), got -0.25");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt"}, out, 0.1, 0}); }),
            "data prepare: max tokens per shard must be >= 1, got 0");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt"}, "", 0.1}); }), "data prepare: no output directory");
  // Inputs are checked before anything is written: a bad second input leaves no output.
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt", missing}, out, 0.1}); }),
            missing + ": cannot open input file: No such file or directory");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt", dir.str()}, out, 0.1}); }),
            dir.str() + ": is a directory, expected a text file");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt", dir / "empty.txt"}, out, 0.0}); }),
            (dir / "empty.txt") + ": input file is empty: no training text");
  EXPECT_EQ(error_of([&] { prepare({{dir / "one_line.txt"}, out, 0.2}); }),
            "data prepare: val_fraction 0.2 gives an empty validation split: no input has a line starting in its "
            "last 0.2 of bytes");
  EXPECT_FALSE(fs::exists(out));
  // The output path is an existing file.
  write_file(dir / "file_out", "x");
  EXPECT_EQ(error_of([&] { prepare({{dir / "ok.txt"}, dir / "file_out", 0.0}); }),
            (dir / "file_out/train") + ": cannot create output directory: Not a directory");
}

}  // namespace
}  // namespace moeforge::data
