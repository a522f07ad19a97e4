#pragma once
#include <string>

namespace moefast {

// How the hot static library was compiled: lets a test prove it is -O3 and not nanobind's -Os.
std::string core_build_info();

}  // namespace moefast
