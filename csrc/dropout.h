#pragma once
// Dropout masks drawn from torch's CPU random stream, bit for bit (spec: moefast.ops.dropout).
#include <cstddef>
#include <cstdint>

namespace moefast {

// The byte layout of torch.Generator.get_state() on CPU (at::CPUGeneratorImplState): a legacy
// pod holding the mt19937 state as 64-bit words, then the cached normal samples, untouched here.
constexpr size_t kTorchCpuRngStateBytes = 5056;

// Writes n dropout factors to out, drawing exactly what torch.rand(n) (float32) would draw from
// the generator whose get_state() bytes are `state`, and advances those bytes as torch.rand
// would: out[i] = scale if (24-bit draw i) < keep_below else 0. keep_below in [0, 2^24]: the
// number of 24-bit draws u with u * 2^-24 < keep. Throws std::invalid_argument on a state that
// torch would not accept (size, seeded flag, position); nothing is written then.
void dropout_mask_from_torch_state(uint8_t* state, size_t state_bytes, float* out, int64_t n,
                                   uint32_t keep_below, float scale);

}  // namespace moefast
