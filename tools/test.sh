#!/usr/bin/env bash
# tools/test.sh - build attn and run every test (unit, PyTorch fixtures, ODR, the three consumer
# projects); exits with ctest's status.
#
#   tools/test.sh              Release build in build/: tests, benchmarks and examples, then ctest
#   tools/test.sh --sanitize   Debug build in build-asan/ with clang 14 and
#                              -fsanitize=address,undefined: tests only (benchmarks under a
#                              sanitizer would measure the sanitizer)
#   tools/test.sh --tsan       -O1 build in build-tsan/ of only the ThreadSanitizer variants of the
#                              threaded tests (target tsan_tests, ctest names tsan.*; see
#                              tests/CMakeLists.txt); a data race fails the test
#
# Extra arguments after `--` go to ctest, e.g. `tools/test.sh -- -R Linear`.
set -euo pipefail

usage() {
  echo "usage: $0 [--sanitize | --tsan] [-- <ctest arguments>...]" >&2
  exit 2
}

sanitize=0
tsan=0
ctest_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --sanitize) sanitize=1 ;;
    --tsan) tsan=1 ;;
    --) shift; ctest_args=("$@"); break ;;
    -h | --help) usage ;;
    *) usage ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
tools/deps.sh test

jobs=$(nproc)
[[ $sanitize -eq 1 && $tsan -eq 1 ]] && usage  # TSan does not mix with ASan
if [[ $tsan -eq 1 ]]; then
  # -O1 with assertions (the targets add -g1): TSan's instrumentation dominates the run time, and
  # -O1 compiles fastest of the levels that do not leave Eigen crawling.
  dir=build-tsan
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1" \
    -DATTN_SANITIZE=OFF -DATTN_TSAN_TESTS=ON \
    -DATTN_BUILD_TESTS=ON -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF
  cmake --build "$dir" -j "$jobs" --target tsan_tests
  cd "$dir"
  # Stop at the first report, with both stacks of a lock-order inversion. The differential test's
  # random cases are for threads here, not numerics (the other builds run all of them): a sixth.
  export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
  export ATTN_DIFF_CASES=${ATTN_DIFF_CASES:-100}
  exec ctest --output-on-failure -j "$jobs" -R '^tsan[.]' "${ctest_args[@]}"
elif [[ $sanitize -eq 1 ]]; then
  # clang 14, Debug with line tables only (-g1): the sanitizers' stacks name files and lines. clang
  # compiles these -O0 tests in 0.6 of g++'s time (this stage was a third of CI), its UBSan checks
  # more (null-pointer offsets), and a second compiler reads every test; the Release build is g++.
  tools/deps.sh fuzz  # clang-14 and its sanitizer runtimes
  dir=build-asan
  cmake -S . -B "$dir" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-g1" \
    -DATTN_SANITIZE=ON \
    -DATTN_BUILD_TESTS=ON -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF
else
  dir=build
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DATTN_SANITIZE=OFF \
    -DATTN_BUILD_TESTS=ON -DATTN_BUILD_BENCHMARKS=ON -DATTN_BUILD_EXAMPLES=ON
fi
cmake --build "$dir" -j "$jobs"

cd "$dir"
exec ctest --output-on-failure -j "$jobs" "${ctest_args[@]}"
