// torch's CPU uniform_ is one serial loop over its mt19937 engine (about 2 ns a float on this
// class of machine: half a millisecond for a [1024, 256] mask, a quarter of a fast training
// step). The engine's output is a fixed function of its state, so the same stream can be made
// 5-10x faster with SIMD: the twist of a 624-word block vectorises (its dependencies are 227
// and 397 words apart) and so does the tempering. Same state in, same bits out, same state
// out: a mask drawn here is the mask torch.rand(...) < keep would have drawn.
#include "dropout.h"

#include "cpu_features.h"

#include <cstring>
#include <stdexcept>
#include <string>

// 32-byte vectors passed between always-inline helpers: GCC notes an ABI change that cannot
// matter here (nothing with these types crosses a translation unit).
#pragma GCC diagnostic ignored "-Wpsabi"

namespace moefast {
namespace {

constexpr int kN = 624;  // MERSENNE_STATE_N
constexpr int kM = 397;  // MERSENNE_STATE_M
constexpr uint32_t kMatrixA = 0x9908b0dfu;
constexpr uint32_t kUpper = 0x80000000u;
constexpr uint32_t kLower = 0x7fffffffu;

// CPUGeneratorImplState's legacy pod: int64 seed, int32 left, int32 seeded, uint64 next,
// uint64 state[624], then the normal-sample cache (not read or written here).
constexpr size_t kLeftOffset = 8;
constexpr size_t kSeededOffset = 12;
constexpr size_t kNextOffset = 16;
constexpr size_t kWordsOffset = 24;

struct Engine {
  uint32_t words[kN];
  int32_t left;
  uint64_t next;
};

MOEFAST_INLINE uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ ((v & 1u) ? kMatrixA : 0u);
}

MOEFAST_INLINE uint32_t temper(uint32_t y) {
  y ^= (y >> 11);
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  y ^= (y >> 18);
  return y;
}

typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));

MOEFAST_INLINE U32x8 load8(const uint32_t* p) {
  U32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MOEFAST_INLINE void store8(void* p, U32x8 v) { std::memcpy(p, &v, sizeof v); }

MOEFAST_INLINE U32x8 twist8(U32x8 u, U32x8 v) {
  const U32x8 odd = -(v & 1u);  // all ones where v is odd
  return (((u & kUpper) | (v & kLower)) >> 1) ^ (odd & kMatrixA);
}

// at::mt19937's next_state(), in three ranges whose reads never meet the same pass's writes
// inside one 8-word step: [0, 227) reads p[j + 397] (old); [227, 623) reads p[j - 227] (written
// at least 227 words earlier); the last word wraps to p[0].
MOEFAST_INLINE void next_state(uint32_t* p) {
  int j = 0;
  for (; j + 8 <= kN - kM; j += 8) store8(p + j, load8(p + j + kM) ^ twist8(load8(p + j), load8(p + j + 1)));
  for (; j < kN - kM; ++j) p[j] = p[j + kM] ^ twist(p[j], p[j + 1]);
  for (; j + 8 <= kN - 1; j += 8) {
    store8(p + j, load8(p + j + kM - kN) ^ twist8(load8(p + j), load8(p + j + 1)));
  }
  for (; j < kN - 1; ++j) p[j] = p[j + kM - kN] ^ twist(p[j], p[j + 1]);
  p[kN - 1] = p[kM - 1] ^ twist(p[kN - 1], p[0]);
}

// Emits `count` draws from words[first, first + count): temper, keep the low 24 bits (float32's
// digits, as at::uniform_real_distribution<float> does), compare, write scale or 0.
MOEFAST_INLINE void emit(const uint32_t* words, float* out, int64_t count, uint32_t keep_below,
                         float scale) {
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &scale, sizeof scale_bits);
  // Draws and keep_below are below 2^25, so a signed compare is the unsigned one.
  const I32x8 below = reinterpret_cast<I32x8>(U32x8{} + keep_below);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    U32x8 y = load8(words + i);
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    const I32x8 draw = reinterpret_cast<I32x8>(y & 0xffffffu);
    const U32x8 keep = reinterpret_cast<U32x8>(draw < below);
    store8(out + i, keep & scale_bits);
  }
  for (; i < count; ++i) out[i] = (temper(words[i]) & 0xffffffu) < keep_below ? scale : 0.0f;
}

// The draw loop of at::mt19937::operator() taken a run at a time: each call decrements left and
// twists when it reaches 0 (so word 623 of a block is never output, as in torch), then returns
// words[next++].
MOEFAST_INLINE void draw(Engine& e, float* out, int64_t n, uint32_t keep_below, float scale) {
  while (n > 0) {
    if (e.left == 1) {  // this draw would take left to 0: twist first, as torch does
      next_state(e.words);
      e.left = kN + 1;
      e.next = 0;
    }
    const int64_t run = n < e.left - 1 ? n : e.left - 1;
    emit(e.words + e.next, out, run, keep_below, scale);
    e.next += static_cast<uint64_t>(run);
    e.left -= static_cast<int32_t>(run);
    out += run;
    n -= run;
  }
}

#ifdef MOEFAST_AVX2_CLONES
__attribute__((target("avx2"))) void draw_avx2(Engine& e, float* out, int64_t n, uint32_t keep_below,
                                               float scale) {
  draw(e, out, n, keep_below, scale);
}
#endif

void draw_baseline(Engine& e, float* out, int64_t n, uint32_t keep_below, float scale) {
  draw(e, out, n, keep_below, scale);
}

}  // namespace

void dropout_mask_from_torch_state(uint8_t* state, size_t state_bytes, float* out, int64_t n,
                                   uint32_t keep_below, float scale) {
  if (state_bytes != kTorchCpuRngStateBytes) {
    throw std::invalid_argument("a torch CPU generator state has " +
                                std::to_string(kTorchCpuRngStateBytes) + " bytes, got " +
                                std::to_string(state_bytes));
  }
  if (n < 0) throw std::invalid_argument("the mask size must be >= 0, got " + std::to_string(n));
  if (keep_below > (1u << 24)) {
    throw std::invalid_argument("keep_below must lie in [0, 2^24], got " + std::to_string(keep_below));
  }
  Engine e;
  int32_t seeded;
  std::memcpy(&e.left, state + kLeftOffset, sizeof e.left);
  std::memcpy(&seeded, state + kSeededOffset, sizeof seeded);
  std::memcpy(&e.next, state + kNextOffset, sizeof e.next);
  // The checks at::mt19937::is_valid makes when torch loads a state.
  if (seeded != 1 || e.left < 1 || e.left > kN || e.next > static_cast<uint64_t>(kN)) {
    throw std::invalid_argument("not a valid torch CPU generator state (seeded=" +
                                std::to_string(seeded) + ", left=" + std::to_string(e.left) +
                                ", next=" + std::to_string(e.next) + ")");
  }
  if (e.next + static_cast<uint64_t>(e.left) - 1 > static_cast<uint64_t>(kN)) {
    // Draws read words[next, next + left - 1): beyond the block torch would read past its array.
    throw std::invalid_argument("not a valid torch CPU generator state (next + left > 625)");
  }
  for (int i = 0; i < kN; ++i) {
    uint64_t w;
    std::memcpy(&w, state + kWordsOffset + 8 * static_cast<size_t>(i), sizeof w);
    e.words[i] = static_cast<uint32_t>(w);
  }
#ifdef MOEFAST_AVX2_CLONES
  if (use_avx2_clones()) {
    draw_avx2(e, out, n, keep_below, scale);
  } else {
    draw_baseline(e, out, n, keep_below, scale);
  }
#else
  draw_baseline(e, out, n, keep_below, scale);
#endif
  std::memcpy(state + kLeftOffset, &e.left, sizeof e.left);
  std::memcpy(state + kNextOffset, &e.next, sizeof e.next);
  for (int i = 0; i < kN; ++i) {
    const uint64_t w = e.words[i];
    std::memcpy(state + kWordsOffset + 8 * static_cast<size_t>(i), &w, sizeof w);
  }
}

}  // namespace moefast
