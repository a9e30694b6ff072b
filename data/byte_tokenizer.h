// The byte-level tokenizer: every UTF-8 (or any other) byte is its own token, so any text
// round-trips exactly and there is nothing to train or ship. Ids 0..255 are the bytes; three
// special tokens follow. Documents are framed as BOS + bytes + EOS by `data prepare`; PAD is
// never written to shards and exists for batching variable-length prompts.
//
// All functions are pure and thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moeforge::data {

inline constexpr std::string_view kByteTokenizerName = "byte";
inline constexpr int32_t kBos = 256;
inline constexpr int32_t kEos = 257;
inline constexpr int32_t kPad = 258;
inline constexpr int32_t kVocabSize = 259;

// One id per byte of `text`, in order; no special tokens are added.
std::vector<int32_t> encode(std::string_view text);

// The bytes of `ids` as a string. BOS, EOS and PAD are dropped; an id outside [0, kVocabSize)
// throws an Error naming the id and its position.
std::string decode(std::span<const int32_t> ids);

// A short display name: "'a'" for printable ASCII (including space), "<0x0A>" for other bytes,
// "<bos>", "<eos>", "<pad>" for the specials. An id outside the vocabulary throws.
std::string token_name(int32_t id);

}  // namespace moeforge::data
