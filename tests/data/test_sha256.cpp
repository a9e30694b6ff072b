// Tests data/sha256.cpp against the FIPS 180-2 example digests (one block, empty, two blocks,
// one million 'a'), incrementally in uneven pieces and from a file, plus its error messages.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "data/sha256.h"
#include "temp_dir.h"

namespace moeforge::data {
namespace {

using moeforge::testing::error_of;
using moeforge::testing::TempDir;

std::span<const uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(Sha256, KnownDigests) {
  EXPECT_EQ(sha256_hex(bytes_of("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(bytes_of("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex(bytes_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, IncrementalAndFileMatchOneMillionA) {
  const std::string a(1000000, 'a');
  const std::string want = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";
  Sha256 h;
  size_t pos = 0;
  for (size_t piece : {1u, 63u, 64u, 65u, 4096u, 123457u}) {
    h.update(bytes_of(std::string_view(a).substr(pos, piece)));
    pos += piece;
  }
  h.update(bytes_of(std::string_view(a).substr(pos)));
  EXPECT_EQ(h.hex(), want);

  TempDir dir;
  moeforge::testing::write_file(dir / "a.txt", a);
  EXPECT_EQ(sha256_file(dir / "a.txt"), want);
}

TEST(Sha256, Errors) {
  TempDir dir;
  const std::string missing = dir / "missing.txt";
  EXPECT_EQ(error_of([&] { sha256_file(missing); }), missing + ": cannot open: No such file or directory");
  Sha256 h;
  h.hex();
  EXPECT_EQ(error_of([&] { h.hex(); }), "sha256: hex() called twice");
  EXPECT_EQ(error_of([&] { h.update(bytes_of("x")); }), "sha256: update() after hex()");
}

}  // namespace
}  // namespace moeforge::data
