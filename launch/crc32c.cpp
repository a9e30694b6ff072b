// CRC-32C with one 256-entry table (a byte per step). Event records are tens of bytes, so the
// 4-8x of slicing-by-8 or SSE4.2's crc32 instruction would buy nothing measurable here.
#include "launch/crc32c.h"

#include <array>

namespace moeforge {
namespace {

constexpr uint32_t kPolyReflected = 0x82F63B78u;

// table[b] = CRC register after shifting byte b through the reflected LFSR eight times.
constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1u) ? kPolyReflected : 0u);
    table[b] = crc;
  }
  return table;
}

constexpr std::array<uint32_t, 256> kTable = make_table();

}  // namespace

uint32_t crc32c(const void* data, std::size_t size) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  uint32_t crc = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < size; ++i) crc = (crc >> 8) ^ kTable[(crc ^ bytes[i]) & 0xFFu];
  return crc ^ 0xFFFFFFFFu;
}

}  // namespace moeforge
