#include "cpu_features.h"

#include <cstdlib>

namespace moefast {
namespace {

[[maybe_unused]] bool disabled(const char* variable) {
  const char* value = std::getenv(variable);
  return value != nullptr && value[0] != '\0' && value[0] != '0';
}

}  // namespace

bool use_avx2_clones() {
#ifdef MOEFAST_AVX2_CLONES
  static const bool chosen = [] {
    return !disabled("MOEFAST_DISABLE_AVX2") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("f16c");
  }();
  return chosen;
#else
  return false;
#endif
}

bool use_avx512_clones() {
#ifdef MOEFAST_AVX2_CLONES
  static const bool chosen = [] {
    return use_avx2_clones() && !disabled("MOEFAST_DISABLE_AVX512") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return chosen;
#else
  return false;
#endif
}

}  // namespace moefast
