#include "data/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <utility>

#include "runtime/error.h"

namespace moeforge::data {

// The format is little-endian and the reader uses the mapped bytes in place; a big-endian port
// would byte-swap in write_shard() and in the validation pass.
static_assert(std::endian::native == std::endian::little, "token shards are read in place: little-endian hosts only");

namespace {

constexpr int64_t kMaxVocab = int64_t{std::numeric_limits<int32_t>::max()} + 1;  // ids are int32

void check_vocab(int64_t vocab_size, const std::string& where) {
  MOE_CHECK(vocab_size >= 1 && vocab_size <= kMaxVocab, "{}: vocab size must be in [1, 2^31], got {}", where,
            vocab_size);
}

class File {
 public:
  File(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
    MOE_CHECK(f_ != nullptr, "{}: cannot create: {}", path_, std::strerror(errno));
  }
  ~File() {
    if (f_) std::fclose(f_);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  void write(const void* data, size_t bytes) {
    MOE_CHECK(std::fwrite(data, 1, bytes, f_) == bytes, "{}: write failed: {}", path_, std::strerror(errno));
  }
  // Flush, fsync and close: the data is on disk before the caller renames the file.
  void close() {
    MOE_CHECK(std::fflush(f_) == 0 && ::fsync(::fileno(f_)) == 0, "{}: flush failed: {}", path_,
              std::strerror(errno));
    const int rc = std::fclose(f_);
    f_ = nullptr;
    MOE_CHECK(rc == 0, "{}: close failed: {}", path_, std::strerror(errno));
  }

 private:
  std::string path_;
  std::FILE* f_;
};

template <class T>
void write_tokens(File& file, std::span<const int32_t> tokens) {
  std::vector<T> buf(std::min<size_t>(tokens.size(), size_t{1} << 16));
  for (size_t i = 0; i < tokens.size(); i += buf.size()) {
    const size_t n = std::min(buf.size(), tokens.size() - i);
    for (size_t j = 0; j < n; ++j) buf[j] = static_cast<T>(tokens[i + j]);
    file.write(buf.data(), n * sizeof(T));
  }
}

// Index of the first token >= vocab_size, or -1. Scans in blocks with a branch-free max (which
// vectorises) and only looks for the exact index inside a failing block.
template <class T>
int64_t first_out_of_vocab(const T* tokens, int64_t n, int64_t vocab_size) {
  constexpr int64_t kBlock = 1 << 16;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T max = 0;
    for (int64_t i = b; i < e; ++i) max = std::max(max, tokens[i]);
    if (static_cast<int64_t>(max) < vocab_size) continue;
    for (int64_t i = b; i < e; ++i) {
      if (static_cast<int64_t>(tokens[i]) >= vocab_size) return i;
    }
  }
  return -1;
}

}  // namespace

int shard_bytes_per_token(int64_t vocab_size) { return vocab_size <= 65536 ? 2 : 4; }

void write_shard(const std::string& path, std::span<const int32_t> tokens, std::span<const uint64_t> doc_offsets,
                 int64_t vocab_size) {
  check_vocab(vocab_size, path);
  MOE_CHECK(!doc_offsets.empty() && doc_offsets.front() == 0 && doc_offsets.back() == tokens.size(),
            "{}: document offsets must start at 0 and end at the token count {}", path, tokens.size());
  for (size_t d = 1; d < doc_offsets.size(); ++d) {
    MOE_CHECK(doc_offsets[d - 1] <= doc_offsets[d], "{}: document offsets decrease at document {}: {} then {}",
              path, d - 1, doc_offsets[d - 1], doc_offsets[d]);
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    MOE_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size, "{}: token at index {} is {}, outside the vocabulary [0, {})",
              path, i, tokens[i], vocab_size);
  }

  const uint32_t bpt = static_cast<uint32_t>(shard_bytes_per_token(vocab_size));
  const uint64_t header[3] = {tokens.size(), doc_offsets.size() - 1, 0};
  const std::string tmp = path + ".tmp";
  {
    File file(tmp);
    file.write(kShardMagic, sizeof(kShardMagic));
    file.write(&kShardVersion, 4);
    file.write(&bpt, 4);
    file.write(header, 16);
    file.write(doc_offsets.data(), doc_offsets.size_bytes());
    if (bpt == 2) {
      write_tokens<uint16_t>(file, tokens);
    } else {
      write_tokens<uint32_t>(file, tokens);
    }
    file.close();
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  MOE_CHECK(!ec, "{}: cannot rename {} into place: {}", path, tmp, ec.message());
}

// ---- TokenShard --------------------------------------------------------------------------------

TokenShard::TokenShard(const std::string& path, int64_t vocab_size) : path_(path) {
  check_vocab(vocab_size, path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  MOE_CHECK(fd >= 0, "{}: cannot open token shard: {}", path, std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    MOE_THROW("{}: not a regular file", path);
  }
  map_bytes_ = static_cast<size_t>(st.st_size);
  if (map_bytes_ > 0) {
    map_ = ::mmap(nullptr, map_bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      MOE_THROW("{}: mmap failed: {}", path, std::strerror(err));
    }
  } else {
    ::close(fd);
  }
  // From here on the destructor does not run if we throw, so unmap on every failure.
  try {
    const auto* bytes = static_cast<const uint8_t*>(map_);
    const size_t magic_len = std::min(map_bytes_, sizeof(kShardMagic));
    MOE_CHECK(magic_len == 0 || std::memcmp(bytes, kShardMagic, magic_len) == 0,
              "{}: not a moeforge token shard (bad magic)", path);
    MOE_CHECK(map_bytes_ >= kShardHeaderBytes, "{}: truncated: file has {} bytes, shorter than the {}-byte header",
              path, map_bytes_, kShardHeaderBytes);

    uint32_t version = 0, bpt = 0;
    uint64_t token_count = 0, doc_count = 0;
    std::memcpy(&version, bytes + 8, 4);
    std::memcpy(&bpt, bytes + 12, 4);
    std::memcpy(&token_count, bytes + 16, 8);
    std::memcpy(&doc_count, bytes + 24, 8);
    MOE_CHECK(version == kShardVersion, "{}: unsupported token shard version {} (this build reads version {})", path,
              version, kShardVersion);
    MOE_CHECK(bpt == 2 || bpt == 4, "{}: bad bytes-per-token {} (expected 2 or 4)", path, bpt);

    // 128-bit arithmetic: a corrupt header can claim counts whose byte size overflows 64 bits.
    __extension__ using u128 = unsigned __int128;
    const u128 expected = u128{kShardHeaderBytes} + u128{8} * (u128{doc_count} + 1) + u128{bpt} * token_count;
    const u128 actual = map_bytes_;
    MOE_CHECK(expected <= actual, "{}: truncated: header says {} bytes, file has {}", path, expected, map_bytes_);
    MOE_CHECK(expected >= actual, "{}: trailing bytes: header says {} bytes, file has {}", path, expected, map_bytes_);

    bytes_per_token_ = static_cast<int>(bpt);
    token_count_ = static_cast<int64_t>(token_count);
    doc_count_ = static_cast<int64_t>(doc_count);
    offsets_ = reinterpret_cast<const uint64_t*>(bytes + kShardHeaderBytes);
    tokens_ = bytes + kShardHeaderBytes + 8 * (doc_count + 1);

    MOE_CHECK(offsets_[0] == 0, "{}: document 0 starts at token {}, expected 0", path, offsets_[0]);
    for (int64_t d = 0; d < doc_count_; ++d) {
      MOE_CHECK(offsets_[d] <= offsets_[d + 1], "{}: document offsets decrease at document {}: {} then {}", path, d,
                offsets_[d], offsets_[d + 1]);
    }
    MOE_CHECK(offsets_[doc_count_] == token_count, "{}: last document offset is {}, expected the token count {}",
              path, offsets_[doc_count_], token_count);

    const int64_t bad = bpt == 2 ? first_out_of_vocab(static_cast<const uint16_t*>(tokens_), token_count_, vocab_size)
                                 : first_out_of_vocab(static_cast<const uint32_t*>(tokens_), token_count_, vocab_size);
    MOE_CHECK(bad < 0, "{}: token at index {} is {}, outside the vocabulary [0, {})", path, bad, token(bad),
              vocab_size);
  } catch (...) {
    unmap();
    throw;
  }
}

TokenShard::~TokenShard() { unmap(); }

void TokenShard::unmap() {
  if (map_) ::munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

TokenShard::TokenShard(TokenShard&& other) noexcept { *this = std::move(other); }

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_bytes_ = std::exchange(other.map_bytes_, 0);
    bytes_per_token_ = std::exchange(other.bytes_per_token_, 0);
    token_count_ = std::exchange(other.token_count_, 0);
    doc_count_ = std::exchange(other.doc_count_, 0);
    offsets_ = std::exchange(other.offsets_, nullptr);
    tokens_ = std::exchange(other.tokens_, nullptr);
  }
  return *this;
}

DocumentRange TokenShard::document(int64_t d) const {
  MOE_CHECK(d >= 0 && d < doc_count_, "{}: document {} out of range [0, {})", path_, d, doc_count_);
  return {static_cast<int64_t>(offsets_[d]), static_cast<int64_t>(offsets_[d + 1])};
}

int32_t TokenShard::token(int64_t i) const {
  MOE_CHECK(i >= 0 && i < token_count_, "{}: token index {} out of range [0, {})", path_, i, token_count_);
  return bytes_per_token_ == 2 ? static_cast<const uint16_t*>(tokens_)[i]
                               : static_cast<int32_t>(static_cast<const uint32_t*>(tokens_)[i]);
}

void TokenShard::copy(int64_t start, int64_t len, int32_t* out) const {
  MOE_CHECK(start >= 0 && len >= 0 && start <= token_count_ - len,
            "{}: window of {} tokens at {} outside the shard's {} tokens", path_, len, start, token_count_);
  if (bytes_per_token_ == 2) {
    const uint16_t* src = static_cast<const uint16_t*>(tokens_) + start;
    for (int64_t i = 0; i < len; ++i) out[i] = src[i];
  } else {
    // Validated on open: every token < vocab <= 2^31, so the u32 -> i32 copy is exact.
    std::memcpy(out, static_cast<const uint32_t*>(tokens_) + start, static_cast<size_t>(len) * 4);
  }
}

// ---- TokenDataset ------------------------------------------------------------------------------

TokenDataset::TokenDataset(const std::string& dir, int64_t vocab_size) : dir_(dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  MOE_CHECK(fs::is_directory(dir, ec), "{}: no such directory; run `moeforge data prepare`", dir);
  std::vector<std::string> names;
  for (const fs::directory_entry& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    std::error_code file_ec;
    if (name.starts_with("shard_") && name.ends_with(".bin") && e.is_regular_file(file_ec)) names.push_back(name);
  }
  MOE_CHECK(!ec, "{}: cannot list directory: {}", dir, ec.message());
  MOE_CHECK(!names.empty(), "{}: no token shards (shard_*.bin); run `moeforge data prepare`", dir);
  std::sort(names.begin(), names.end());

  starts_.push_back(0);
  for (const std::string& name : names) {
    shards_.emplace_back((fs::path(dir) / name).string(), vocab_size);
    total_tokens_ += shards_.back().size();
    starts_.push_back(total_tokens_);
  }
}

int32_t TokenDataset::token(int64_t i) const {
  int32_t t = 0;
  copy(i, 1, &t);
  return t;
}

void TokenDataset::copy(int64_t start, int64_t len, int32_t* out) const {
  MOE_CHECK(start >= 0 && len >= 0 && start <= total_tokens_ - len,
            "{}: window of {} tokens at {} outside the dataset's {} tokens", dir_, len, start, total_tokens_);
  // The shard holding `start`: the last one whose first token is <= start. Empty shards have
  // equal neighbouring starts and are never selected here; the loop below copies 0 from them.
  size_t k = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), start) - starts_.begin()) - 1;
  while (len > 0) {
    const int64_t local = start - starts_[k];
    const int64_t n = std::min(len, starts_[k + 1] - start);
    shards_[k].copy(local, n, out);
    out += n;
    start += n;
    len -= n;
    ++k;
  }
}

}  // namespace moeforge::data
