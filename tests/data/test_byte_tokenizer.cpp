// Tests data/byte_tokenizer.cpp: exact round trip of every byte value and of UTF-8 text, the
// special-token ids, their removal on decode, display names, and the out-of-vocabulary error.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "data/byte_tokenizer.h"
#include "temp_dir.h"

namespace moeforge::data {
namespace {

using moeforge::testing::error_of;

TEST(ByteTokenizer, VocabularyLayout) {
  EXPECT_EQ(kBos, 256);
  EXPECT_EQ(kEos, 257);
  EXPECT_EQ(kPad, 258);
  EXPECT_EQ(kVocabSize, 259);
  EXPECT_EQ(kByteTokenizerName, "byte");
}

TEST(ByteTokenizer, AllBytesRoundTrip) {
  std::string text;
  for (int b = 0; b < 256; ++b) text.push_back(static_cast<char>(b));
  text += text;  // every byte twice, including NUL in the middle
  const std::vector<int32_t> ids = encode(text);
  ASSERT_EQ(ids.size(), 512u);
  for (int i = 0; i < 512; ++i) EXPECT_EQ(ids[i], i % 256) << i;
  EXPECT_EQ(decode(ids), text);
}

TEST(ByteTokenizer, Utf8TextRoundTrip) {
  const std::string text = "h\xC3\xA9llo, \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x8C\x8D\n";  // "héllo, 世界 🌍\n"
  const std::vector<int32_t> ids = encode(text);
  // "h" + 2 ("é") + "llo, " + 3 + 3 (世界) + " " + 4 (🌍) + "\n" = 20: one id per byte, not per
  // code point.
  ASSERT_EQ(ids.size(), 20u);
  EXPECT_EQ(ids[0], 'h');
  EXPECT_EQ(ids[1], 0xC3);
  EXPECT_EQ(ids[2], 0xA9);
  EXPECT_EQ(ids[15], 0xF0);
  EXPECT_EQ(ids[19], '\n');
  EXPECT_EQ(decode(ids), text);
  EXPECT_TRUE(encode("").empty());
  EXPECT_EQ(decode(std::vector<int32_t>{}), "");
}

TEST(ByteTokenizer, SpecialsDroppedOnDecode) {
  const std::vector<int32_t> ids = {kBos, 'h', kPad, 'i', kEos, kBos, '!', kEos, kPad};
  EXPECT_EQ(decode(ids), "hi!");
}

TEST(ByteTokenizer, OutOfVocabularyIdIsAnError) {
  EXPECT_EQ(error_of([] { decode(std::vector<int32_t>{'a', 'b', 259}); }),
            "decode: token id 259 at position 2 is outside the byte vocabulary [0, 259)");
  EXPECT_EQ(error_of([] { decode(std::vector<int32_t>{-1}); }),
            "decode: token id -1 at position 0 is outside the byte vocabulary [0, 259)");
  EXPECT_EQ(error_of([] { token_name(1000); }), "token_name: token id 1000 is outside the byte vocabulary [0, 259)");
}

TEST(ByteTokenizer, TokenNames) {
  EXPECT_EQ(token_name('a'), "'a'");
  EXPECT_EQ(token_name(' '), "' '");
  EXPECT_EQ(token_name('~'), "'~'");
  EXPECT_EQ(token_name('\n'), "<0x0A>");
  EXPECT_EQ(token_name(0), "<0x00>");
  EXPECT_EQ(token_name(0x7F), "<0x7F>");
  EXPECT_EQ(token_name(0xE4), "<0xE4>");
  EXPECT_EQ(token_name(kBos), "<bos>");
  EXPECT_EQ(token_name(kEos), "<eos>");
  EXPECT_EQ(token_name(kPad), "<pad>");
}

}  // namespace
}  // namespace moeforge::data
