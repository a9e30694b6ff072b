#include "checkpoint/byte_vocab.h"

#include <fmt/format.h>

#include "data/byte_tokenizer.h"
#include "runtime/error.h"

namespace moeforge::checkpoint {

std::string byte_unicode(uint8_t b) {
  // Printable bytes map to themselves; the other 68 (0x00-0x20, 0x7F-0xA0, 0xAD), in order, to
  // U+0100, U+0101, ... (GPT-2's bytes_to_unicode).
  const auto printable = [](int x) { return (x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE); };
  uint32_t cp = b;
  if (!printable(b)) {
    cp = 0x100;
    for (int x = 0; x < b; ++x) cp += printable(x) ? 0 : 1;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {  // every code point here is below U+0800: two UTF-8 bytes
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

std::vector<std::string> byte_vocab_tokens(int64_t vocab_size) {
  MOE_CHECK(vocab_size >= data::kVocabSize,
            "the byte-level tokenizer needs a vocabulary of at least {} tokens, the model has {}", data::kVocabSize,
            vocab_size);
  std::vector<std::string> out;
  for (int b = 0; b < 256; ++b) out.push_back(byte_unicode(static_cast<uint8_t>(b)));
  for (const int32_t id : {data::kBos, data::kEos, data::kPad}) out.push_back(data::token_name(id));
  for (int64_t i = data::kVocabSize; i < vocab_size; ++i) out.push_back(fmt::format("<unused_{}>", i));
  return out;
}

nlohmann::ordered_json tokenizer_json(int64_t vocab_size) {
  const std::vector<std::string> tokens = byte_vocab_tokens(vocab_size);
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  for (size_t i = 256; i < tokens.size(); ++i)
    added.push_back({{"id", i}, {"content", tokens[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  // No regex split: every byte is a token whatever the pre-tokenizer, and without the split the
  // byte sequence of the text is exactly what the model sees.
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false},
                        {"use_regex", false}};
  j["post_processor"] = nullptr;
  j["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  j["model"] = {{"type", "BPE"},           {"dropout", nullptr},      {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},       {"byte_fallback", false},  {"ignore_merges", false},
                {"vocab", vocab},          {"merges", nlohmann::ordered_json::array()}};
  return j;
}

nlohmann::ordered_json tokenizer_config_json(int64_t max_seq_len) {
  nlohmann::ordered_json j;
  j["tokenizer_class"] = "PreTrainedTokenizerFast";
  j["bos_token"] = data::token_name(data::kBos);
  j["eos_token"] = data::token_name(data::kEos);
  j["pad_token"] = data::token_name(data::kPad);
  j["add_bos_token"] = false;
  j["add_eos_token"] = false;
  j["clean_up_tokenization_spaces"] = false;
  j["model_max_length"] = max_seq_len;
  return j;
}

nlohmann::ordered_json special_tokens_map_json() {
  return {{"bos_token", data::token_name(data::kBos)},
          {"eos_token", data::token_name(data::kEos)},
          {"pad_token", data::token_name(data::kPad)}};
}

}  // namespace moeforge::checkpoint
