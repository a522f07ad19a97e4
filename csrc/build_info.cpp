#include "build_info.h"

namespace moefast {

std::string core_build_info() {
  std::string info = "opt=" MOEFAST_CORE_OPT;
#if defined(__OPTIMIZE__) && !defined(__OPTIMIZE_SIZE__)
  info += ";optimize=speed";
#elif defined(__OPTIMIZE_SIZE__)
  info += ";optimize=size";
#else
  info += ";optimize=none";
#endif
#if defined(__clang__)
  info += ";compiler=clang-" __clang_version__;
#elif defined(__GNUC__)
  info += ";compiler=gcc-" __VERSION__;
#endif
  return info;
}

}  // namespace moefast
