// SHA-256 digests (OpenSSL libcrypto) as lowercase hex, for the data manifest: every source
// file and every shard is recorded with its digest so a later run can tell exactly which bytes
// it trained on.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace moeforge::data {

// Incremental digest: update() any number of times, then hex() once.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(std::span<const uint8_t> bytes);
  // The 64-character lowercase hex digest; the object cannot be updated afterwards.
  std::string hex();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

std::string sha256_hex(std::span<const uint8_t> bytes);
// Digest of a whole file, read in chunks; a missing or unreadable file throws naming it.
std::string sha256_file(const std::string& path);

}  // namespace moeforge::data
