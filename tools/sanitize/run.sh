#!/usr/bin/env bash
# Runs tests against the ASan + UBSan build of moefast's extensions (`make sanitize`).
#
#   tools/sanitize/run.sh BUILD_DIR TEST_PATH...
#
# CPython and torch are not instrumented, so:
# - libasan is preloaded (its runtime must come first), and libstdc++ with it: otherwise ASan
#   resolves its __cxa_throw interceptor before any C++ library is loaded and aborts at the
#   first C++ exception ("CHECK failed: real___cxa_throw != 0").
# - detect_leaks=0: CPython and torch keep allocations until exit by design; a leak report would
#   be theirs, not moefast's.
# Nothing else is suppressed: no ASan or UBSan suppression file is used. Reports go to
# BUILD_DIR/logs (pytest's capture would swallow a report printed by a dying process); any
# report fails the run, and UBSan keeps going after one so that a run lists them all.
set -euo pipefail
build_dir=$(cd "$1" && pwd)
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
logs="$build_dir/logs"
rm -rf "$logs"
mkdir -p "$logs"
cxx=${CXX:-g++}
asan=$("$cxx" -print-file-name=libasan.so)
stdcxx=$("$cxx" -print-file-name=libstdc++.so)
status=0
LD_PRELOAD="$asan $stdcxx" \
ASAN_OPTIONS="detect_leaks=0:log_path=$logs/asan" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0:log_path=$logs/ubsan" \
MOEFAST_EXT_DIR="$build_dir" MOEFAST_EXPECT_ASAN=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  "$root/.venv/bin/python" -m pytest -q -p moefast_sanitized "$@" || status=$?
if compgen -G "$logs/*" > /dev/null; then
  echo "make sanitize: sanitizer reports (in $logs):" >&2
  cat "$logs"/* >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "make sanitize: the tests failed under the sanitizers (exit $status)" >&2
  exit "$status"
fi
echo "make sanitize: no ASan or UBSan report"
