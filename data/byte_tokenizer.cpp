#include "data/byte_tokenizer.h"

#include "runtime/error.h"

namespace moeforge::data {

std::vector<int32_t> encode(std::string_view text) {
  std::vector<int32_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string decode(std::span<const int32_t> ids) {
  std::string out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id >= 0 && id < 256) {
      out.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    } else if (id < 0 || id >= kVocabSize) {
      MOE_THROW("decode: token id {} at position {} is outside the byte vocabulary [0, {})", id, i, kVocabSize);
    }
  }
  return out;
}

std::string token_name(int32_t id) {
  switch (id) {
    case kBos: return "<bos>";
    case kEos: return "<eos>";
    case kPad: return "<pad>";
    default: break;
  }
  MOE_CHECK(id >= 0 && id < 256, "token_name: token id {} is outside the byte vocabulary [0, {})", id, kVocabSize);
  if (id >= 0x20 && id < 0x7f) return fmt::format("'{}'", static_cast<char>(id));
  return fmt::format("<0x{:02X}>", id);
}

}  // namespace moeforge::data
