// The byte-level tokenizer (data/byte_tokenizer.h) as the open ecosystem's tokenizers see it
// (shared/formats.md §4.2, option A): a byte-level BPE with no merges. Token b < 256 is the GPT-2
// byte-to-unicode character of byte b, so the `tokenizers` library and llama.cpp's gpt2 tokenizer
// map every byte of a text to the id moeforge gives it; ids 256..258 are the specials <bos>,
// <eos>, <pad>; a vocabulary larger than 259 gets <unused_N> control tokens for the rest.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moeforge::checkpoint {

// The UTF-8 text of the GPT-2 byte-to-unicode character of byte b.
std::string byte_unicode(uint8_t b);
// The token strings of ids 0..vocab_size-1 (vocab_size >= 259).
std::vector<std::string> byte_vocab_tokens(int64_t vocab_size);

// tokenizer.json (tokenizers library), tokenizer_config.json and special_tokens_map.json.
nlohmann::ordered_json tokenizer_json(int64_t vocab_size);
nlohmann::ordered_json tokenizer_config_json(int64_t max_seq_len);
nlohmann::ordered_json special_tokens_map_json();

}  // namespace moeforge::checkpoint
