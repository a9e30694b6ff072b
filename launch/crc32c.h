// CRC-32C (Castagnoli), the checksum of TFRecord framing in TensorBoard event files.
//
// crc32c() is the standard reflected CRC with polynomial 0x82F63B78, initial value and final xor
// 0xFFFFFFFF ("123456789" -> 0xE3069283). masked_crc32c() is TFRecord's masking: a CRC stored
// next to the data it covers is rotated and offset so that computing the CRC of a string that
// itself contains CRCs does not degenerate. Pure functions; thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace moeforge {

uint32_t crc32c(const void* data, std::size_t size);
inline uint32_t crc32c(std::string_view bytes) { return crc32c(bytes.data(), bytes.size()); }

// ((crc >> 15) | (crc << 17)) + 0xa282ead8, in 32-bit arithmetic.
inline uint32_t masked_crc32c(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

}  // namespace moeforge
