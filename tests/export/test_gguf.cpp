// Tests checkpoint/gguf.cpp: ggml encodings against the reference quantizers' rules (hand-checked
// blocks and error bounds), a write/read round trip with alignment and metadata types, and the
// reader's rejection of malformed files with messages naming the key or tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "checkpoint/gguf.h"
#include "runtime/half.h"
#include "tests/data/temp_dir.h"
#include "tests/testing.h"

namespace moeforge::checkpoint {
namespace {

using testing::error_of;

TEST(GgmlEncode, Q8_0BlockMatchesTheReferenceQuantizer) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 12) * 0.25f;  // amax 4.75 at j = 31
  const std::vector<uint8_t> b = ggml_encode(x, GgmlType::kQ8_0);
  ASSERT_EQ(b.size(), 34u);
  uint16_t d = 0;
  std::memcpy(&d, b.data(), 2);
  EXPECT_EQ(d, float_to_f16_bits(4.75f / 127.0f));
  EXPECT_EQ(static_cast<int8_t>(b[2 + 31]), 127);
  EXPECT_EQ(static_cast<int8_t>(b[2 + 0]), static_cast<int8_t>(std::roundf(-3.0f / (4.75f / 127.0f))));
  const std::vector<float> y = ggml_decode(b, GgmlType::kQ8_0);
  for (int j = 0; j < 32; ++j) EXPECT_LE(std::fabs(y[j] - x[j]), 4.75f / 254.0f + 4.75f * 1e-3f) << j;
}

TEST(GgmlEncode, Q4_0BlockSplitsNibblesInHalves) {
  std::vector<float> x(32, 0.0f);
  x[0] = -8.0f;  // the largest magnitude, negative: d = -8 / -8 = 1
  x[16] = 3.0f;
  x[5] = 7.0f;
  const std::vector<uint8_t> b = ggml_encode(x, GgmlType::kQ4_0);
  ASSERT_EQ(b.size(), 18u);
  uint16_t d = 0;
  std::memcpy(&d, b.data(), 2);
  EXPECT_EQ(f16_bits_to_float(d), 1.0f);
  EXPECT_EQ(b[2 + 0], (0 | (11 << 4)));  // element 0 -> 0 (low nibble), element 16 -> 3 + 8 (high)
  EXPECT_EQ(b[2 + 5] & 15, 15);          // 7 + 8
  const std::vector<float> y = ggml_decode(b, GgmlType::kQ4_0);
  EXPECT_EQ(y[0], -8.0f);
  EXPECT_EQ(y[16], 3.0f);
  EXPECT_EQ(y[5], 7.0f);
}

TEST(GgmlEncode, RandomValuesStayWithinTheBlockBounds) {
  const Tensor t = testing::random_tensor({4096}, 5, 3.0f);
  const std::vector<float> x = t.to_floats();
  for (const GgmlType type : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0, GgmlType::kQ4_0}) {
    const std::vector<uint8_t> b = ggml_encode(x, type);
    EXPECT_EQ(static_cast<int64_t>(b.size()), ggml_nbytes(type, 4096)) << ggml_type_name(type);
    const std::vector<float> y = ggml_decode(b, type);
    for (size_t blk = 0; blk < x.size() / 32; ++blk) {
      float amax = 0.0f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[blk * 32 + j]));
      for (int j = 0; j < 32; ++j) {
        const size_t i = blk * 32 + j;
        switch (type) {
          case GgmlType::kF32: ASSERT_EQ(y[i], x[i]); break;
          case GgmlType::kF16: ASSERT_EQ(y[i], f16_bits_to_float(float_to_f16_bits(x[i]))); break;
          case GgmlType::kBF16: ASSERT_EQ(y[i], bf16_bits_to_float(float_to_bf16_bits(x[i]))); break;
          case GgmlType::kQ8_0: ASSERT_LE(std::fabs(y[i] - x[i]), amax * (1.0f / 254 + 1e-3f)) << i; break;
          case GgmlType::kQ4_0: ASSERT_LE(std::fabs(y[i] - x[i]), amax * (1.0f / 8 + 1e-3f)) << i; break;
        }
      }
    }
  }
  EXPECT_NE(error_of([] { ggml_encode(std::vector<float>(33), GgmlType::kQ8_0); }).find("not whole q8_0 blocks"),
            std::string::npos);
}

class Gguf : public ::testing::Test {
 protected:
  std::string path() const { return dir_ / "m.gguf"; }
  std::string open_error(const std::string& bytes) {
    testing::write_file(path(), bytes);
    return error_of([&] { GgufReader r(path()); });
  }
  testing::TempDir dir_;
};

TEST_F(Gguf, WritesAndReadsBack) {
  std::vector<float> a(64), b(6);
  for (int i = 0; i < 64; ++i) a[i] = 0.01f * static_cast<float>(i - 30);
  for (int i = 0; i < 6; ++i) b[i] = static_cast<float>(i);
  {
    GgufWriter w(path());
    w.add_string("general.architecture", "llama");
    w.add_u32("llama.block_count", 3);
    w.add_f32("llama.rope.freq_base", 1e6f);
    w.add_bool("tokenizer.ggml.add_bos_token", true);
    w.add_strings("tokenizer.ggml.tokens", {"a", "\xc4\xa0", ""});
    w.add_i32s("tokenizer.ggml.token_type", {1, 1, 3});
    w.add_tensor("q", {32, 2}, GgmlType::kQ8_0);
    w.add_tensor("b", {3, 2}, GgmlType::kF32);
    EXPECT_EQ(error_of([&] { w.add_tensor("b", {3}, GgmlType::kF32); }), path() + ": tensor b declared twice");
    EXPECT_NE(error_of([&] { w.add_tensor("x", {3}, GgmlType::kQ4_0); }).find("ne[0] = 3 is not a multiple of the q4_0"),
              std::string::npos);
    w.write_header();
    w.write_tensor("q", ggml_encode(a, GgmlType::kQ8_0));
    w.write_tensor("b", ggml_encode(b, GgmlType::kF32));
    w.close();
  }
  const GgufReader r(path());
  EXPECT_EQ(r.get("general.architecture").s, "llama");
  EXPECT_EQ(r.get("llama.block_count").type, GgufType::kU32);
  EXPECT_EQ(r.get("llama.block_count").i, 3);
  EXPECT_EQ(r.get("llama.rope.freq_base").f, 1e6);
  EXPECT_EQ(r.get("tokenizer.ggml.add_bos_token").i, 1);
  EXPECT_EQ(r.get("tokenizer.ggml.tokens").array.at(1).s, "\xc4\xa0");
  EXPECT_EQ(r.get("tokenizer.ggml.token_type").elem_type, GgufType::kI32);
  EXPECT_EQ(r.data_start() % 32, 0u);
  EXPECT_EQ(r.tensor("b").offset, 96u);  // 68 bytes of q8_0 padded to 96
  EXPECT_EQ(r.read_floats(r.tensor("b")), b);
  EXPECT_EQ(r.read_floats(r.tensor("q")), ggml_decode(ggml_encode(a, GgmlType::kQ8_0), GgmlType::kQ8_0));
  EXPECT_EQ(error_of([&] { r.get("nope"); }), path() + ": no metadata key nope");
}

// Hand-built GGUF bytes.
class Bytes {
 public:
  Bytes& u32(uint32_t v) { return raw(&v, 4); }
  Bytes& u64(uint64_t v) { return raw(&v, 8); }
  Bytes& u8(uint8_t v) { return raw(&v, 1); }
  Bytes& str(const std::string& s) {
    u64(s.size());
    s_ += s;
    return *this;
  }
  Bytes& header(uint64_t tensors, uint64_t kvs) { return u32(0x46554747).u32(3).u64(tensors).u64(kvs); }
  Bytes& kv_u32(const std::string& k, uint32_t v) { return str(k).u32(4).u32(v); }
  // A tensor info: name, dims, type, offset.
  Bytes& info(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    str(name).u32(static_cast<uint32_t>(ne.size()));
    for (const uint64_t d : ne) u64(d);
    return u32(type).u64(offset);
  }
  Bytes& pad(size_t align) {
    s_.append((align - s_.size() % align) % align, '\0');
    return *this;
  }
  Bytes& zeros(size_t n) {
    s_.append(n, '\0');
    return *this;
  }
  std::string s() const { return s_; }

 private:
  Bytes& raw(const void* p, size_t n) {
    s_.append(static_cast<const char*>(p), n);
    return *this;
  }
  std::string s_;
};

struct Bad {
  const char* what;
  std::string bytes;
  std::string message;
};

TEST_F(Gguf, RejectsMalformedFilesWithClearErrors) {
  const std::string ok = Bytes().header(1, 1).kv_u32("k", 1).info("t", {4}, 0, 0).pad(32).zeros(32).s();
  ASSERT_EQ(open_error(ok), "<no error>");
  std::string bad_magic = ok;
  bad_magic[0] = 'X';
  std::string v2 = ok;
  v2[4] = 2;
  const std::vector<Bad> cases = {
      {"empty file", "", "truncated: the magic needs 4 bytes"},
      {"bad magic", bad_magic, "not a GGUF file (magic 0x46554758"},
      {"version 2", v2, "GGUF version 2, this reader reads version 3"},
      {"truncated header", ok.substr(0, 20), "truncated: the key-value count needs 8 bytes"},
      {"huge tensor count", Bytes().header(uint64_t{1} << 60, 0).s(), "1152921504606846976 tensor infos cannot fit in 0 bytes"},
      {"huge kv count", Bytes().header(0, uint64_t{1} << 40).s(), "key-values cannot fit"},
      {"duplicate key", Bytes().header(0, 2).kv_u32("k", 1).kv_u32("k", 2).s(), "duplicate key k"},
      {"empty key", Bytes().header(0, 1).kv_u32("", 1).s(), "key-value 0 has an empty key"},
      {"unknown value type", Bytes().header(0, 1).str("k").u32(13).u32(0).s(), "key k: unknown value type 13"},
      {"nested array", Bytes().header(0, 1).str("k").u32(9).u32(9).u64(0).s(), "key k: nested arrays are not supported"},
      {"huge array", Bytes().header(0, 1).str("k").u32(9).u32(4).u64(uint64_t{1} << 50).zeros(8).s(), "key k: array of 1125899906842624 elements does not fit the file"},
      {"string past the end", Bytes().header(0, 1).str("k").u32(8).u64(1000).zeros(4).s(), "truncated: k needs 1000 bytes"},
      {"bool not 0/1", Bytes().header(0, 1).str("k").u32(7).u8(2).s(), "key k: a BOOL must be 0 or 1, got 2"},
      {"alignment not UINT32", Bytes().header(0, 1).str("general.alignment").u32(10).u64(32).s(), "general.alignment must be UINT32"},
      {"alignment not a power of two", Bytes().header(0, 1).kv_u32("general.alignment", 24).s(), "general.alignment 24 is not a power of two"},
      {"duplicate tensor name", Bytes().header(2, 0).info("t", {4}, 0, 0).info("t", {4}, 0, 32).pad(32).zeros(64).s(), "duplicate tensor name t"},
      {"name too long", Bytes().header(1, 0).info(std::string(64, 'n'), {4}, 0, 0).pad(32).zeros(32).s(), "must have 1 to 63 bytes"},
      {"five dims", Bytes().header(1, 0).info("t", {1, 1, 1, 1, 1}, 0, 0).pad(32).zeros(32).s(), "tensor t has 5 dims, GGUF allows 1 to 4"},
      {"unknown ggml type", Bytes().header(1, 0).info("t", {32}, 3, 0).pad(32).zeros(32).s(), "tensor t: ggml type 3 is not one of"},
      {"ne[0] not whole blocks", Bytes().header(1, 0).info("t", {30}, 8, 0).pad(32).zeros(64).s(), "tensor t: ne[0] = 30 is not a multiple of the q8_0 block 32"},
      {"element count overflow", Bytes().header(1, 0).info("t", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0).s(), "tensor t: element count overflows"},
      {"negative ne", Bytes().header(1, 0).info("t", {~uint64_t{0}}, 0, 0).s(), "ne[0] = 18446744073709551615 is negative as int64"},
      {"offset out of order", Bytes().header(2, 0).info("a", {4}, 0, 32).info("b", {4}, 0, 0).pad(32).zeros(64).s(), "tensor a: offset 32, expected 0"},
      {"data truncated", Bytes().header(1, 0).info("t", {64}, 0, 0).pad(32).zeros(100).s(), "truncated: tensor t ends at byte"},
  };
  ASSERT_GE(cases.size(), 20u);
  for (const Bad& c : cases) {
    const std::string err = open_error(c.bytes);
    EXPECT_NE(err.find(c.message), std::string::npos) << c.what << ": got \"" << err << "\"";
    EXPECT_TRUE(err.starts_with(path())) << c.what << ": the message must name the file: " << err;
  }
}

}  // namespace
}  // namespace moeforge::checkpoint
