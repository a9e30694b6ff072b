// Tests data/token_shard.cpp: the byte layout the writer produces (checked field by field, not
// through the reader), writer/reader round trips with u16 and u32 tokens, windows read through
// the memory map, every validation error with its exact message, and TokenDataset's
// concatenation of a directory's shards (order, windows across shard boundaries, errors).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "data/token_shard.h"
#include "temp_dir.h"

namespace moeforge::data {
namespace {

using moeforge::testing::error_of;
using moeforge::testing::read_file;
using moeforge::testing::TempDir;
using moeforge::testing::write_file;

std::vector<int32_t> random_tokens(size_t n, int32_t vocab, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(gen);
  return t;
}

template <class T>
T read_le(const std::string& bytes, size_t offset) {
  T v{};
  std::memcpy(&v, bytes.data() + offset, sizeof(T));
  return v;
}

template <class T>
void patch(const std::string& path, size_t offset, T value) {
  std::string bytes = read_file(path);
  ASSERT_LE(offset + sizeof(T), bytes.size());
  std::memcpy(bytes.data() + offset, &value, sizeof(T));
  write_file(path, bytes);
}

// Three documents of 10, 0 and 40 tokens, then one of the rest.
std::vector<uint64_t> offsets_for(uint64_t n) { return {0, 10, 10, 50, n}; }

void check_round_trip(const std::string& path, int64_t vocab, int expected_bpt) {
  const size_t n = 1001;
  const std::vector<int32_t> tokens = random_tokens(n, static_cast<int32_t>(vocab), 7);
  std::vector<int32_t> with_max = tokens;
  with_max[500] = static_cast<int32_t>(vocab - 1);  // the largest id must survive the narrowing
  const std::vector<uint64_t> offsets = offsets_for(n);
  write_shard(path, with_max, offsets, vocab);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  // The raw layout, read without the reader.
  const std::string bytes = read_file(path);
  ASSERT_EQ(bytes.size(), 32 + 8 * offsets.size() + expected_bpt * n);
  EXPECT_EQ(bytes.substr(0, 8), "MOEFTOKS");
  EXPECT_EQ(read_le<uint32_t>(bytes, 8), 1u);
  EXPECT_EQ(read_le<uint32_t>(bytes, 12), static_cast<uint32_t>(expected_bpt));
  EXPECT_EQ(read_le<uint64_t>(bytes, 16), n);
  EXPECT_EQ(read_le<uint64_t>(bytes, 24), offsets.size() - 1);
  for (size_t d = 0; d < offsets.size(); ++d) EXPECT_EQ(read_le<uint64_t>(bytes, 32 + 8 * d), offsets[d]);
  const size_t tok0 = 32 + 8 * offsets.size();
  for (size_t i = 0; i < n; ++i) {
    const int64_t got =
        expected_bpt == 2 ? read_le<uint16_t>(bytes, tok0 + 2 * i) : read_le<uint32_t>(bytes, tok0 + 4 * i);
    ASSERT_EQ(got, with_max[i]) << i;
  }

  const TokenShard shard(path, vocab);
  EXPECT_EQ(shard.path(), path);
  EXPECT_EQ(shard.bytes_per_token(), expected_bpt);
  ASSERT_EQ(shard.size(), static_cast<int64_t>(n));
  ASSERT_EQ(shard.num_documents(), 4);
  for (int64_t d = 0; d < 4; ++d) {
    EXPECT_EQ(shard.document(d).begin, static_cast<int64_t>(offsets[d]));
    EXPECT_EQ(shard.document(d).end, static_cast<int64_t>(offsets[d + 1]));
  }
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(shard.token(static_cast<int64_t>(i)), with_max[i]) << i;
  // Windows at the edges and in the middle, including empty and whole-shard ones.
  for (auto [start, len] :
       std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {0, 1001}, {1000, 1}, {333, 257}, {7, 0}, {1001, 0}}) {
    std::vector<int32_t> out(static_cast<size_t>(len) + 1, -5);
    shard.copy(start, len, out.data());
    for (int64_t i = 0; i < len; ++i) ASSERT_EQ(out[i], with_max[start + i]) << start << "+" << i;
    EXPECT_EQ(out[len], -5) << "copy wrote past the window";
  }
  EXPECT_EQ(error_of([&] { shard.copy(1000, 2, with_max.data()); }),
            path + ": window of 2 tokens at 1000 outside the shard's 1001 tokens");
  EXPECT_EQ(error_of([&] { shard.document(4); }), path + ": document 4 out of range [0, 4)");
}

TEST(TokenShard, RoundTripU16) {
  TempDir dir;
  check_round_trip(dir / "byte.bin", 259, 2);
}

TEST(TokenShard, RoundTripU32) {
  TempDir dir;
  check_round_trip(dir / "big.bin", 70000, 4);
}

TEST(TokenShard, WidthBoundary) {
  EXPECT_EQ(shard_bytes_per_token(259), 2);
  EXPECT_EQ(shard_bytes_per_token(65536), 2);  // ids 0..65535 fit in u16
  EXPECT_EQ(shard_bytes_per_token(65537), 4);
  TempDir dir;
  check_round_trip(dir / "edge.bin", 65536, 2);
}

TEST(TokenShard, EmptyShard) {
  TempDir dir;
  const std::vector<uint64_t> offsets = {0};
  write_shard(dir / "empty.bin", {}, offsets, 259);
  const TokenShard shard(dir / "empty.bin", 259);
  EXPECT_EQ(shard.size(), 0);
  EXPECT_EQ(shard.num_documents(), 0);
  EXPECT_EQ(read_file(dir / "empty.bin").size(), 40u);
}

TEST(TokenShard, MoveKeepsTheMapping) {
  TempDir dir;
  const std::vector<int32_t> tokens = {1, 2, 3};
  write_shard(dir / "s.bin", tokens, std::vector<uint64_t>{0, 3}, 259);
  TokenShard a(dir / "s.bin", 259);
  TokenShard b(std::move(a));
  EXPECT_EQ(b.token(2), 3);
  TokenShard c(dir / "s.bin", 259);
  c = std::move(b);
  EXPECT_EQ(c.token(1), 2);
}

TEST(TokenShard, WriterRejectsBadInput) {
  TempDir dir;
  const std::string p = dir / "w.bin";
  const std::vector<int32_t> tokens = {1, 2, 300, 4};
  EXPECT_EQ(error_of([&] { write_shard(p, tokens, std::vector<uint64_t>{0, 4}, 259); }),
            p + ": token at index 2 is 300, outside the vocabulary [0, 259)");
  const std::vector<int32_t> ok = {1, 2, 3, 4};
  EXPECT_EQ(error_of([&] { write_shard(p, ok, std::vector<uint64_t>{0, 3}, 259); }),
            p + ": document offsets must start at 0 and end at the token count 4");
  EXPECT_EQ(error_of([&] { write_shard(p, ok, std::vector<uint64_t>{0, 3, 2, 4}, 259); }),
            p + ": document offsets decrease at document 1: 3 then 2");
  EXPECT_EQ(error_of([&] { write_shard(p, ok, std::vector<uint64_t>{0, 4}, 0); }),
            p + ": vocab size must be in [1, 2^31], got 0");
  EXPECT_FALSE(std::filesystem::exists(p));
  const std::string nodir = dir / "no/such/dir/w.bin";
  EXPECT_EQ(error_of([&] { write_shard(nodir, ok, std::vector<uint64_t>{0, 4}, 259); }),
            nodir + ".tmp: cannot create: No such file or directory");
}

// ---- validation on open ------------------------------------------------------------------------

class CorruptShard : public ::testing::Test {
 protected:
  void SetUp() override {
    tokens_ = random_tokens(100, 259, 3);
    write_shard(path_, tokens_, offsets_for(100), 259);
    size_ = read_file(path_).size();
    ASSERT_EQ(size_, 32u + 8 * 5 + 2 * 100);
  }
  std::string open_error(int64_t vocab = 259) const {
    return error_of([&] { TokenShard s(path_, vocab); });
  }

  TempDir dir_;
  const std::string path_ = dir_ / "shard_00000.bin";
  std::vector<int32_t> tokens_;
  size_t size_ = 0;
};

TEST_F(CorruptShard, ValidFileOpens) { EXPECT_EQ(open_error(), "<no error>"); }

TEST_F(CorruptShard, TruncatedByOneByte) {
  std::filesystem::resize_file(path_, size_ - 1);
  EXPECT_EQ(open_error(), path_ + ": truncated: header says 272 bytes, file has 271");
}

TEST_F(CorruptShard, OneTrailingByte) {
  write_file(path_, read_file(path_) + "x");
  EXPECT_EQ(open_error(), path_ + ": trailing bytes: header says 272 bytes, file has 273");
}

TEST_F(CorruptShard, ShorterThanHeader) {
  std::filesystem::resize_file(path_, 20);
  EXPECT_EQ(open_error(), path_ + ": truncated: file has 20 bytes, shorter than the 32-byte header");
  std::filesystem::resize_file(path_, 0);
  EXPECT_EQ(open_error(), path_ + ": truncated: file has 0 bytes, shorter than the 32-byte header");
}

TEST_F(CorruptShard, WrongMagic) {
  patch<char>(path_, 0, 'X');
  EXPECT_EQ(open_error(), path_ + ": not a moeforge token shard (bad magic)");
  write_file(path_, "hello");  // a short foreign file
  EXPECT_EQ(open_error(), path_ + ": not a moeforge token shard (bad magic)");
  write_file(path_, "First Citizen:\nBefore we proceed any further, hear me speak.\n");
  EXPECT_EQ(open_error(), path_ + ": not a moeforge token shard (bad magic)");
}

TEST_F(CorruptShard, BadVersion) {
  patch<uint32_t>(path_, 8, 2);
  EXPECT_EQ(open_error(), path_ + ": unsupported token shard version 2 (this build reads version 1)");
}

TEST_F(CorruptShard, BadBytesPerToken) {
  patch<uint32_t>(path_, 12, 3);
  EXPECT_EQ(open_error(), path_ + ": bad bytes-per-token 3 (expected 2 or 4)");
  // Declaring u32 for a u16 body changes the implied size.
  patch<uint32_t>(path_, 12, 4);
  EXPECT_EQ(open_error(), path_ + ": truncated: header says 472 bytes, file has 272");
}

TEST_F(CorruptShard, HeaderCountsBeyond64Bits) {
  // 2 * 2^63 token bytes: the implied size needs more than 64 bits and must not wrap around.
  patch<uint64_t>(path_, 16, uint64_t{1} << 63);
  EXPECT_EQ(open_error(), path_ + ": truncated: header says 18446744073709551688 bytes, file has 272");
}

TEST_F(CorruptShard, NonMonotonicOffsets) {
  patch<uint64_t>(path_, 32 + 8 * 2, 5);  // offsets 0, 10, 5, 50, 100
  EXPECT_EQ(open_error(), path_ + ": document offsets decrease at document 1: 10 then 5");
}

TEST_F(CorruptShard, LastOffsetNotTokenCount) {
  patch<uint64_t>(path_, 32 + 8 * 4, 99);
  EXPECT_EQ(open_error(), path_ + ": last document offset is 99, expected the token count 100");
}

TEST_F(CorruptShard, FirstOffsetNotZero) {
  patch<uint64_t>(path_, 32, 1);
  EXPECT_EQ(open_error(), path_ + ": document 0 starts at token 1, expected 0");
}

TEST_F(CorruptShard, TokenOutsideVocabulary) {
  patch<uint16_t>(path_, 32 + 8 * 5 + 2 * 17, 300);
  EXPECT_EQ(open_error(), path_ + ": token at index 17 is 300, outside the vocabulary [0, 259)");
}

TEST_F(CorruptShard, OpenedWithSmallerVocabulary) {
  int64_t first = -1;
  for (size_t i = 0; i < tokens_.size() && first < 0; ++i) {
    if (tokens_[i] >= 100) first = static_cast<int64_t>(i);
  }
  ASSERT_GE(first, 0);
  EXPECT_EQ(open_error(100), path_ + ": token at index " + std::to_string(first) + " is " +
                                 std::to_string(tokens_[first]) + ", outside the vocabulary [0, 100)");
}

TEST_F(CorruptShard, MissingFileAndDirectory) {
  const std::string missing = dir_ / "nope.bin";
  EXPECT_EQ(error_of([&] { TokenShard s(missing, 259); }),
            missing + ": cannot open token shard: No such file or directory");
  EXPECT_EQ(error_of([&] { TokenShard s(dir_.str(), 259); }), dir_.str() + ": not a regular file");
}

TEST(TokenShard, TokenErrorInLaterBlockNamesItsIndex) {
  // The vocab check scans 64K-token blocks; the index must still be exact in a later block.
  TempDir dir;
  std::vector<int32_t> tokens(200000, 5);
  write_shard(dir / "s.bin", tokens, std::vector<uint64_t>{0, 200000}, 70000);
  patch<uint32_t>(dir / "s.bin", 32 + 16 + 4 * 150001, 70000);
  EXPECT_EQ(error_of([&] { TokenShard s(dir / "s.bin", 70000); }),
            (dir / "s.bin") + ": token at index 150001 is 70000, outside the vocabulary [0, 70000)");
}

// ---- TokenDataset ------------------------------------------------------------------------------

TEST(TokenDataset, ConcatenatesShardsInNameOrder) {
  TempDir dir;
  // Written out of order, one of them empty, plus files the dataset must ignore.
  const std::vector<int32_t> a = random_tokens(37, 259, 1), b = random_tokens(5, 259, 2), c = random_tokens(64, 259, 3);
  write_shard(dir / "shard_00002.bin", c, std::vector<uint64_t>{0, 30, 64}, 259);
  write_shard(dir / "shard_00000.bin", a, std::vector<uint64_t>{0, 37}, 259);
  write_shard(dir / "shard_00001.bin", {}, std::vector<uint64_t>{0}, 259);
  write_shard(dir / "shard_00003.bin", b, std::vector<uint64_t>{0, 5}, 259);
  write_file(dir / "shard_00004.bin.tmp", "partial");
  write_file(dir / "notes.txt", "not a shard");
  std::vector<int32_t> stream = a;
  stream.insert(stream.end(), c.begin(), c.end());
  stream.insert(stream.end(), b.begin(), b.end());

  const TokenDataset ds(dir.str(), 259);
  EXPECT_EQ(ds.dir(), dir.str());
  ASSERT_EQ(ds.shards().size(), 4u);
  EXPECT_EQ(ds.shards()[1].size(), 0);
  ASSERT_EQ(ds.size(), static_cast<int64_t>(stream.size()));
  for (int64_t i = 0; i < ds.size(); ++i) ASSERT_EQ(ds.token(i), stream[i]) << i;
  // Every window of every length up to the whole stream, across all shard boundaries.
  std::vector<int32_t> out(stream.size() + 1);
  for (int64_t start = 0; start <= ds.size(); ++start) {
    for (int64_t len = 0; start + len <= ds.size(); len += 7) {
      out[len] = -9;
      ds.copy(start, len, out.data());
      ASSERT_TRUE(std::equal(out.begin(), out.begin() + len, stream.begin() + start)) << start << "+" << len;
      ASSERT_EQ(out[len], -9);
    }
  }
  EXPECT_EQ(error_of([&] { ds.copy(100, 7, out.data()); }),
            dir.str() + ": window of 7 tokens at 100 outside the dataset's 106 tokens");
}

TEST(TokenDataset, Errors) {
  TempDir dir;
  EXPECT_EQ(error_of([&] { TokenDataset ds(dir.str(), 259); }),
            dir.str() + ": no token shards (shard_*.bin); run `moeforge data prepare`");
  const std::string missing = dir / "train";
  EXPECT_EQ(error_of([&] { TokenDataset ds(missing, 259); }),
            missing + ": no such directory; run `moeforge data prepare`");
  // A corrupt shard in the directory fails the whole dataset with that shard's message.
  write_shard(dir / "shard_00000.bin", std::vector<int32_t>{1, 2}, std::vector<uint64_t>{0, 2}, 259);
  write_file(dir / "shard_00001.bin", "garbage!");
  EXPECT_EQ(error_of([&] { TokenDataset ds(dir.str(), 259); }),
            (dir / "shard_00001.bin") + ": not a moeforge token shard (bad magic)");
}

}  // namespace
}  // namespace moeforge::data
