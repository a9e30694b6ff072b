// The token-shard file format, its writer, a memory-mapped reader, and TokenDataset: a
// directory of shards read as one token stream.
//
// File layout (all integers little-endian):
//
//   offset  size                 field
//   0       8                    magic "MOEFTOKS"
//   8       4   u32              version (kShardVersion = 1)
//   12      4   u32              bytes per token: 2 (u16) or 4 (u32)
//   16      8   u64              token_count
//   24      8   u64              doc_count
//   32      8 * (doc_count + 1)  u64 document start offsets (token indices); the first is 0 and
//                                the last is token_count, so document d is [off[d], off[d+1])
//   ...     bpt * token_count    the tokens
//
// The header is 32 bytes and the offsets are u64, so the token array starts 8-byte aligned and
// the mapped file can be read in place. The vocabulary size is not stored: it belongs to the
// tokenizer (recorded in the manifest), and the reader is told it so that a shard made for
// another vocabulary fails on open instead of indexing past an embedding table.
//
// The reader validates strictly on open (magic, version, token width, exact file size,
// document offsets, every token < vocab) and then never fails on reads within bounds. A
// TokenShard is immutable after open; concurrent reads from many threads are safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moeforge::data {

inline constexpr char kShardMagic[8] = {'M', 'O', 'E', 'F', 'T', 'O', 'K', 'S'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr uint64_t kShardHeaderBytes = 32;

// Tokens stored as u16 when every id of the vocabulary fits, else u32.
int shard_bytes_per_token(int64_t vocab_size);

// Writes one shard: to `path + ".tmp"`, flushed and fsync'd, then renamed over `path`, so a
// crash never leaves a half-written file under the final name. `doc_offsets` holds
// doc_count + 1 entries with the layout's invariants; every token must be in [0, vocab_size).
void write_shard(const std::string& path, std::span<const int32_t> tokens, std::span<const uint64_t> doc_offsets,
                 int64_t vocab_size);

// Token range [begin, end) of one document.
struct DocumentRange {
  int64_t begin = 0;
  int64_t end = 0;
};

// A read-only memory map of one shard, validated on open.
class TokenShard {
 public:
  TokenShard(const std::string& path, int64_t vocab_size);
  ~TokenShard();
  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const std::string& path() const { return path_; }
  int bytes_per_token() const { return bytes_per_token_; }
  int64_t size() const { return token_count_; }
  int64_t num_documents() const { return doc_count_; }
  DocumentRange document(int64_t d) const;

  int32_t token(int64_t i) const;
  // Copies tokens [start, start + len) into out[0, len).
  void copy(int64_t start, int64_t len, int32_t* out) const;

 private:
  void unmap();

  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  int bytes_per_token_ = 0;
  int64_t token_count_ = 0;
  int64_t doc_count_ = 0;
  const uint64_t* offsets_ = nullptr;  // (doc_count + 1)
  const void* tokens_ = nullptr;       // (token_count) u16 or u32
};

// Every shard_*.bin of a directory, in file-name order, as one concatenated token stream.
// Windows may cross shard boundaries. Immutable after construction; reads are thread-safe.
class TokenDataset {
 public:
  TokenDataset(const std::string& dir, int64_t vocab_size);

  const std::string& dir() const { return dir_; }
  int64_t size() const { return total_tokens_; }
  const std::vector<TokenShard>& shards() const { return shards_; }

  int32_t token(int64_t i) const;
  // Copies tokens [start, start + len) of the stream into out[0, len).
  void copy(int64_t start, int64_t len, int32_t* out) const;

 private:
  std::string dir_;
  std::vector<TokenShard> shards_;
  std::vector<int64_t> starts_;  // (num_shards + 1) stream index of each shard's first token
  int64_t total_tokens_ = 0;
};

}  // namespace moeforge::data
