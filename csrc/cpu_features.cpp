#include "cpu_features.h"

#include <cstdlib>

namespace moefast {

bool use_avx2_clones() {
#ifdef MOEFAST_AVX2_CLONES
  static const bool chosen = [] {
    const char* disable = std::getenv("MOEFAST_DISABLE_AVX2");
    const bool disabled = disable != nullptr && disable[0] != '\0' && disable[0] != '0';
    return !disabled && __builtin_cpu_supports("avx2");
  }();
  return chosen;
#else
  return false;
#endif
}

}  // namespace moefast
