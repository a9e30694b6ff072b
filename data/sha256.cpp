#include "data/sha256.h"

#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "runtime/error.h"

namespace moeforge::data {

struct Sha256::State {
  EVP_MD_CTX* ctx = nullptr;
  bool finished = false;
};

Sha256::Sha256() : state_(std::make_unique<State>()) {
  state_->ctx = EVP_MD_CTX_new();
  MOE_CHECK(state_->ctx != nullptr && EVP_DigestInit_ex(state_->ctx, EVP_sha256(), nullptr) == 1,
            "sha256: OpenSSL could not initialise a SHA-256 context");
}

Sha256::~Sha256() { EVP_MD_CTX_free(state_->ctx); }

void Sha256::update(std::span<const uint8_t> bytes) {
  MOE_CHECK(!state_->finished, "sha256: update() after hex()");
  MOE_CHECK(EVP_DigestUpdate(state_->ctx, bytes.data(), bytes.size()) == 1, "sha256: EVP_DigestUpdate failed");
}

std::string Sha256::hex() {
  MOE_CHECK(!state_->finished, "sha256: hex() called twice");
  state_->finished = true;
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  MOE_CHECK(EVP_DigestFinal_ex(state_->ctx, digest, &len) == 1 && len == 32, "sha256: EVP_DigestFinal_ex failed");
  std::string out;
  out.reserve(64);
  for (unsigned int i = 0; i < len; ++i) out += fmt::format("{:02x}", digest[i]);
  return out;
}

std::string sha256_hex(std::span<const uint8_t> bytes) {
  Sha256 h;
  h.update(bytes);
  return h.hex();
}

std::string sha256_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  MOE_CHECK(f != nullptr, "{}: cannot open: {}", path, std::strerror(errno));
  Sha256 h;
  std::vector<uint8_t> buf(1 << 20);
  size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), f)) > 0) h.update({buf.data(), n});
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  MOE_CHECK(!failed, "{}: read error while hashing", path);
  return h.hex();
}

}  // namespace moeforge::data
