// The nanobind module moefast._C: bindings only; the logic lives in the other csrc/ files.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "build_info.h"

namespace nb = nanobind;

NB_MODULE(_C, m) {
  m.doc() = "moefast native CPU kernels (sparse embedding engine).";
  m.def("core_build_info", &moefast::core_build_info,
        "How the hot static library was compiled, e.g. 'opt=-O3;optimize=speed;...'.");
}
