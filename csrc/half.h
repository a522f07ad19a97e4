#pragma once
// Half-precision table storage: exact conversions to fp32, stochastic rounding back, and the
// counter-based hash that draws the rounding bits. Integer arithmetic only (besides one exact
// multiply by a power of two), so every SIMD clone gives the same bits as the scalar code.
//
// Specification: moefast/reference/embedding_optim.py (stochastic_round, rounding_bits).
#include <cstdint>
#include <cstring>

namespace moefast {
namespace half {

// ---------------------------------------------------------------------------------------------
// Exact conversions to fp32

// bf16 is the upper half of an fp32: a shift.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp16 -> fp32 without F16C (the baseline clone): the exponent and mantissa shifted into place
// read as an fp32 that is 2^-112 times the value (normal and subnormal fp16 alike), times 2^112
// (exact: a power of two, and the result is a normal fp32). Inf and NaN keep their payload, with
// NaN quietened as F16C's vcvtph2ps does, so that both give the same bits.
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  uint32_t bits = em << 13;
  if (em >= 0x7c00u) {
    bits |= 0x7f800000u | (em > 0x7c00u ? 0x00400000u : 0u);
  } else {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    f *= 0x1p112f;
    std::memcpy(&bits, &f, sizeof f);
  }
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Stochastic rounding of an fp32 to a half type. `r` holds uniform random bits; the magnitude
// rounds away from zero with probability (dropped part) / (the half type's spacing there), so
// the expected result is the fp32 value (unbiased), for either sign. A value past the largest
// finite half may round to infinity, as it would with round-to-nearest. NaN stays NaN.

inline uint16_t round_bf16(float x, uint64_t r) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7fc0u);
  // a <= 0x7f800000, so a + 0xffff cannot reach the sign bit; infinity stays infinity.
  return static_cast<uint16_t>(sign | ((a + static_cast<uint32_t>(r & 0xffffu)) >> 16));
}

inline uint16_t round_f16(float x, uint64_t r) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  const uint32_t e = a >> 23;  // biased fp32 exponent
  if (e >= 113) {
    // fp16's normal range (2^-14 and up): drop 13 of the 23 mantissa bits; a carry moves into
    // the exponent, as rounding up into the next binade should.
    const uint32_t t = (a + static_cast<uint32_t>(r & 0x1fffu)) >> 13;  // (e << 10) | mantissa
    if (t >= (143u << 10)) return static_cast<uint16_t>(sign | 0x7c00u);  // past 65504: infinity
    return static_cast<uint16_t>(sign | (t - (112u << 10)));
  }
  // fp16 subnormals: multiples of 2^-24. The value is m * 2^(max(e, 1) - 150), that is
  // m / 2^drop multiples of 2^-24.
  const uint64_t m = (a & 0x7fffffu) | (e != 0 ? 0x800000u : 0u);
  const uint32_t drop = 126u - (e != 0 ? e : 1u);  // 14 .. 125
  if (drop >= 64) return static_cast<uint16_t>(sign);  // below 2^-64 of a spacing: 0
  const uint64_t mask = (uint64_t{1} << drop) - 1;
  const uint64_t q = m >> drop;
  const uint64_t up = (r & mask) < (m & mask) ? 1 : 0;
  return static_cast<uint16_t>(sign | static_cast<uint32_t>(q + up));  // 0x400: smallest normal
}

// ---------------------------------------------------------------------------------------------
// Counter-based rounding bits: a function of (seed, table, row, step, column) only, never of a
// generator's position, so an update rounds the same at any thread count, on every
// data-parallel rank and after a resume. splitmix64's finaliser, chained.

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Once per table and call.
inline uint64_t table_key(uint64_t seed, uint64_t table) { return mix64(mix64(seed ^ kGolden) ^ table); }

// Once per updated row; `step` is what changes from one update of the row to the next.
inline uint64_t row_key(uint64_t table_key, uint64_t row, uint64_t step) {
  return mix64(mix64(table_key ^ row) + step);
}

// The 64 random bits of one element.
inline uint64_t element_bits(uint64_t row_key, uint64_t column) {
  return mix64(row_key + (column + 1) * kGolden);
}

}  // namespace half
}  // namespace moefast
