#pragma once
// Run-time choice between a kernel's baseline build and its AVX2 clone, shared by every kernel.
//
// The shipped build targets baseline x86-64 / aarch64 (no -march); hot loops get an AVX2 clone
// (`__attribute__((target("avx2")))`) where MOEFAST_AVX2_CLONES is defined, picked at run time.

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEFAST_AVX2_CLONES 1
#endif

// Forced inlining into the clones: a function is compiled for the target of the function it is
// inlined into, so the clone's loops compile with AVX2 only if they are inlined.
#define MOEFAST_INLINE __attribute__((always_inline)) inline

namespace moefast {

// True when the AVX2 clones should run: an x86-64 CPU with AVX2, unless MOEFAST_DISABLE_AVX2
// is set to anything but 0 (tests compare the two clones bit for bit). Decided once per process;
// always false where there are no clones.
bool use_avx2_clones();

}  // namespace moefast
