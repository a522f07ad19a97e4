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
# Nothing else is suppressed: no ASan or UBSan suppression file is used. pytest captures only
# Python-level output (--capture=sys), so a report the runtime writes to fd 2 reaches the log
# even from a passing test (with fd capture, UBSan's reports vanished with the passing test's
# output); the whole output goes to BUILD_DIR/sanitize.log, and any report in it fails the run.
# UBSan keeps going after a report, so that a run lists them all.
set -euo pipefail
build_dir=$(cd "$1" && pwd)
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
log="$build_dir/sanitize.log"
cxx=${CXX:-g++}
asan=$("$cxx" -print-file-name=libasan.so)
stdcxx=$("$cxx" -print-file-name=libstdc++.so)
status=0
LD_PRELOAD="$asan $stdcxx" \
ASAN_OPTIONS="detect_leaks=0" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=0" \
MOEFAST_EXT_DIR="$build_dir" MOEFAST_EXPECT_ASAN=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" \
  "$root/.venv/bin/python" -m pytest -q --capture=sys -p moefast_sanitized "$@" > "$log" 2>&1 || status=$?
tail -n 5 "$log"
reports=$(grep -cE "runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log" || true)
if [ "$reports" -ne 0 ]; then
  echo "make sanitize: $reports sanitizer report line(s); the reports:" >&2
  grep -E -A 12 "runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed" "$log" >&2 || true
  echo "(full output: $log)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "make sanitize: the tests failed under the sanitizers (exit $status; full output: $log)" >&2
  exit "$status"
fi
echo "make sanitize: no ASan or UBSan report (full output: $log)"
