#pragma once
// Run-time choice between a kernel's baseline build and its AVX2 and AVX-512 clones, shared by
// every kernel.
//
// The shipped build targets baseline x86-64 / aarch64 (no -march); hot loops get an AVX2 clone
// (`__attribute__((target(MOEFAST_TARGET_AVX2)))`) and some an AVX-512 clone where
// MOEFAST_AVX2_CLONES is defined, picked at run time.

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEFAST_AVX2_CLONES 1
#endif

// F16C comes with AVX2 on every x86-64 CPU that has both (the clone converts fp16 tables with
// it); no FMA in either target, so a * b + c rounds twice in every clone, as in the baseline.
#define MOEFAST_TARGET_AVX2 "avx2,f16c"
// AVX-512 DQ for the half tables' rounding hash: its 64-bit lane multiplies (vpmullq) are
// emulated by three 32-bit ones without it. Every AVX-512 CPU with BW and VL has DQ.
#define MOEFAST_TARGET_AVX512 "avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq"

// Forced inlining into the clones: a function is compiled for the target of the function it is
// inlined into, so the clone's loops compile with AVX2 only if they are inlined.
#define MOEFAST_INLINE __attribute__((always_inline)) inline

namespace moefast {

// True when the AVX2 clones should run: an x86-64 CPU with AVX2 and F16C, unless
// MOEFAST_DISABLE_AVX2 is set to anything but 0 (tests compare the clones bit for bit).
// Decided once per process; always false where there are no clones.
bool use_avx2_clones();

// True when the AVX-512 clones should run: use_avx2_clones() and a CPU with AVX-512 F, BW, VL
// and DQ, unless MOEFAST_DISABLE_AVX512 is set to anything but 0. Decided once per process.
bool use_avx512_clones();

}  // namespace moefast
