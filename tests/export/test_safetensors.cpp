// Tests checkpoint/safetensors.cpp: the writer's layout (reference order, 8-aligned data, format
// metadata), write/read round trips in F32/F16/BF16, and the reader's rejection of malformed
// files — each rule of shared/formats.md §1.4 with the message that names it.
#include <gtest/gtest.h>

#include <cstring>

#include "checkpoint/safetensors.h"
#include "runtime/half.h"
#include "tests/data/temp_dir.h"

namespace moeforge::checkpoint {
namespace {

using testing::error_of;

// A file of an 8-byte length (the header's, or `n` when given), the header text, then `data`.
std::string file_bytes(const std::string& header, const std::string& data, int64_t n = -1) {
  const uint64_t len = n >= 0 ? static_cast<uint64_t>(n) : header.size();
  std::string out(8, '\0');
  std::memcpy(out.data(), &len, 8);
  return out + header + data;
}

class Safetensors : public ::testing::Test {
 protected:
  // The error opening a file with these bytes ("<no error>" when it opens).
  std::string open_error(const std::string& bytes) {
    testing::write_file(path(), bytes);
    return error_of([&] { SafetensorsReader r(path()); });
  }
  std::string path() const { return dir_ / "m.safetensors"; }
  testing::TempDir dir_;
};

TEST_F(Safetensors, WriterLaysOutLikeTheReferenceAndReadsBack) {
  const std::vector<float> a{1.5f, -2.0f, 3.25f, 0.0f, 1e-8f, 65504.0f};
  const std::vector<float> b{0.1f, 0.2f};
  {
    SafetensorsWriter w(path(), {{.name = "b.half", .dtype = "F16", .shape = {2}},
                                 {.name = "a", .dtype = "F32", .shape = {2, 3}},
                                 {.name = "c.bf", .dtype = "BF16", .shape = {1, 2}},
                                 {.name = "s", .dtype = "F32", .shape = {}}},
                        {{"format", "pt"}});
    // Larger alignment first, then by name: F32 a, s, then the 16-bit b.half, c.bf.
    ASSERT_EQ(w.layout()[0].name, "a");
    EXPECT_EQ(w.layout()[1].name, "s");
    EXPECT_EQ(w.layout()[2].name, "b.half");
    EXPECT_EQ(w.layout()[3].name, "c.bf");
    EXPECT_EQ(error_of([&] { w.write("s", encode_floats(b, "F32")); }),
              path() + ": expected tensor a next (layout order), got s");
    w.write("a", encode_floats(a, "F32"));
    w.write("s", encode_floats(std::vector<float>{7.0f}, "F32"));
    EXPECT_EQ(error_of([&] { w.write("b.half", encode_floats(a, "F16")); }),
              path() + ": tensor b.half has 12 bytes, its shape and dtype need 4");
    w.write("b.half", encode_floats(b, "F16"));
    w.write("c.bf", encode_floats(b, "BF16"));
    w.close();
  }
  const std::string bytes = testing::read_file(path());
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  EXPECT_EQ(bytes.size(), 8 + n + 24 + 4 + 4 + 4);

  const SafetensorsReader r(path());
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(r.read_floats(r.find("a")), a);
  EXPECT_EQ(r.read_floats(r.find("s")), std::vector<float>{7.0f});
  EXPECT_EQ(r.read_floats(r.find("b.half")),
            (std::vector<float>{f16_bits_to_float(float_to_f16_bits(0.1f)), f16_bits_to_float(float_to_f16_bits(0.2f))}));
  EXPECT_EQ(r.read_floats(r.find("c.bf"))[1], bf16_bits_to_float(float_to_bf16_bits(0.2f)));
  EXPECT_EQ(r.find("c.bf").shape, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(error_of([&] { r.find("zz"); }), path() + ": no tensor named zz");
}

TEST_F(Safetensors, UnfinishedWriteLeavesNoFile) {
  {
    SafetensorsWriter w(path(), {{.name = "a", .dtype = "F32", .shape = {1}}}, {});
  }
  EXPECT_FALSE(std::filesystem::exists(path()));
  EXPECT_FALSE(std::filesystem::exists(path() + ".tmp"));
}

TEST_F(Safetensors, EmptyAndZeroSizedTensorsAreValid) {
  EXPECT_EQ(open_error(file_bytes("{}", "")), "<no error>");
  EXPECT_EQ(open_error(file_bytes(R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]},)"
                                  R"("x":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}}  )",
                                  "ab")),
            "<no error>");
}

// The rejected files. Each entry: what is wrong, the bytes, and a part of the message.
struct Bad {
  const char* what;
  std::string bytes;
  std::string message;
};

TEST_F(Safetensors, RejectsMalformedFilesWithClearErrors) {
  const std::string ok_entry = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string data8(8, '\x01');
  const std::vector<Bad> cases = {
      {"shorter than the length field", "abc", "header too small: the file has 3 bytes"},
      {"huge header length", file_bytes("{}", "", int64_t{1} << 40), "header too large: its length is 1099511627776 bytes, the limit is 100000000"},
      {"header length past the end", file_bytes("{}", "", 100), "header length 100 runs past the end of the file (10 bytes)"},
      {"not JSON", file_bytes("{not json}", ""), "the header is not valid UTF-8 JSON"},
      {"invalid UTF-8", file_bytes("{\"a\xff\":1}", ""), "the header is not valid UTF-8 JSON"},
      {"does not start with {", file_bytes("[1, 2]", ""), "the header must start with '{', found byte 0x5b"},
      {"unknown dtype", file_bytes(R"({"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", data8), "tensor a: unknown dtype 'F33'"},
      {"negative dim", file_bytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8), "tensor a: shape must be an array of non-negative integers"},
      {"fractional dim", file_bytes(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", data8), "shape must be an array of non-negative integers"},
      {"shape/size mismatch", file_bytes(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8), "tensor a: data_offsets [0, 8] hold 8 bytes, shape [3] of F32 needs 12"},
      {"overlapping offsets", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, 'x')), "tensor b: data_offsets [4, 12] overlap another tensor (the previous tensor ends at 8)"},
      {"gap between tensors", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", std::string(20, 'x')), "tensor b: data_offsets [12, 20] leave a gap"},
      {"first tensor not at 0", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, 'x')), "tensor a: data_offsets [4, 12] leave a gap"},
      {"duplicate tensor names", file_bytes("{" + ok_entry + "," + ok_entry + "}", data8), "duplicate key 'a' in the header"},
      {"duplicate field in an entry", file_bytes(R"({"a":{"dtype":"F32","dtype":"F16","shape":[2],"data_offsets":[0,8]}})", data8), "duplicate key 'dtype'"},
      {"trailing bytes", file_bytes("{" + ok_entry + "}", data8 + "extra"), "the tensors end at byte 70 but the file has 75 bytes (trailing bytes)"},
      {"truncated data", file_bytes("{" + ok_entry + "}", "1234"), "the tensors end at byte 70 but the file has 66 bytes (truncated)"},
      {"end before begin", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data8), "tensor a: data_offsets [8, 0] end before they begin"},
      {"three offsets", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", data8), "tensor a: data_offsets must be two non-negative integers"},
      {"missing shape", file_bytes(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", data8), "tensor a: needs dtype, shape and data_offsets"},
      {"unknown field", file_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"strides":[1]}})", data8), "tensor a: unknown field 'strides'"},
      {"non-string metadata", file_bytes(R"({"__metadata__":{"format":1},)" + ok_entry + "}", data8), "__metadata__ value of 'format' must be a string, got 1"},
      {"element count overflow", file_bytes(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", data8), "tensor a: element count of shape [4294967296,4294967296] overflows"},
      {"byte count overflow", file_bytes(R"({"a":{"dtype":"F64","shape":[2305843009213693952,2],"data_offsets":[0,8]}})", data8), "overflows"},
      {"entry not an object", file_bytes(R"({"a":[1,2]})", ""), "tensor a: expected an object with dtype, shape and data_offsets, got array"},
      {"sub-byte dtype, odd bits", file_bytes(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}})", "x"), "3 elements of F4 are not a whole number of bytes"},
  };
  ASSERT_GE(cases.size(), 20u);
  for (const Bad& c : cases) {
    const std::string err = open_error(c.bytes);
    EXPECT_NE(err.find(c.message), std::string::npos) << c.what << ": got \"" << err << "\"";
    EXPECT_TRUE(err.starts_with(path())) << c.what << ": the message must name the file: " << err;
  }
}

TEST_F(Safetensors, ReadFloatsRefusesOtherDtypes) {
  testing::write_file(path(), file_bytes(R"({"i":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", "abcd"));
  const SafetensorsReader r(path());
  EXPECT_EQ(error_of([&] { r.read_floats(r.find("i")); }),
            path() + ": tensor i is I32; moeforge imports F32, F16 and BF16");
}

}  // namespace
}  // namespace moeforge::checkpoint
