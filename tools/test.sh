#!/usr/bin/env bash
# tools/test.sh - build attn and run every test (unit, PyTorch fixtures, ODR, the three consumer
# projects); exits with ctest's status.
#
#   tools/test.sh              Release build in build/: tests, benchmarks and examples, then ctest
#   tools/test.sh --sanitize   Debug build in build-asan/ with -fsanitize=address,undefined: tests
#                              only (benchmarks under a sanitizer would measure the sanitizer)
#
# Extra arguments after `--` go to ctest, e.g. `tools/test.sh -- -R Linear`.
set -euo pipefail

usage() {
  echo "usage: $0 [--sanitize] [-- <ctest arguments>...]" >&2
  exit 2
}

sanitize=0
ctest_args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --sanitize) sanitize=1 ;;
    --) shift; ctest_args=("$@"); break ;;
    -h | --help) usage ;;
    *) usage ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
tools/deps.sh test

jobs=$(nproc)
if [[ $sanitize -eq 1 ]]; then
  dir=build-asan
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Debug -DATTN_SANITIZE=ON \
    -DATTN_BUILD_TESTS=ON -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF
else
  dir=build
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DATTN_SANITIZE=OFF \
    -DATTN_BUILD_TESTS=ON -DATTN_BUILD_BENCHMARKS=ON -DATTN_BUILD_EXAMPLES=ON
fi
cmake --build "$dir" -j "$jobs"

cd "$dir"
exec ctest --output-on-failure -j "$jobs" "${ctest_args[@]}"
