#!/usr/bin/env bash
# tools/deps.sh - install the Debian packages attn needs, if any are missing.
#
#   tools/deps.sh build   compiler, CMake, Eigen: enough to use the headers and build the examples
#   tools/deps.sh test    + GoogleTest, nlohmann-json, Google Benchmark, Python and Open MPI (tools/test.sh
#                           builds the benchmarks too, so that they always compile; attn/dist's tests
#                           run under mpirun)
#   tools/deps.sh bench   + Google Benchmark and Python (tools/run.sh prints the results table)
#   tools/deps.sh torch   + libtorch, OpenBLAS (libtorch's BLAS at its best) and matplotlib:
#                           only tools/bench_torch.sh asks for it; the tests never need libtorch
#   tools/deps.sh lint    + clang-tidy (14 on Debian 12), cppcheck, nlohmann-json and Open MPI's headers
#                           (attn/io/ and attn/dist/ are linted too): tools/lint.sh
#   tools/deps.sh fuzz    + clang 14 with its compiler-rt (libFuzzer, ASan, UBSan) and nlohmann-json:
#                           tools/fuzz.sh
#
# Several groups may be given at once. Silent when everything is installed. As root it runs
# `apt-get update` and `apt-get install`; otherwise it prints the command to run and exits 1.
set -euo pipefail

usage() {
  echo "usage: $0 build|test|bench|torch|lint|fuzz [...]" >&2
  exit 2
}

build_pkgs=(cmake g++ make libeigen3-dev)
test_pkgs=("${build_pkgs[@]}" googletest libgtest-dev nlohmann-json3-dev libbenchmark-dev python3 libopenmpi-dev
  openmpi-bin)
bench_pkgs=("${build_pkgs[@]}" libbenchmark-dev python3)
# Debian's libtorch calls whatever libblas.so.3 the alternatives system points at: the reference
# BLAS unless an optimised one is installed. OpenBLAS's OpenMP build shares libtorch's libgomp
# threads instead of starting a second pool on the same cores.
torch_pkgs=("${bench_pkgs[@]}" libtorch-dev libopenblas0-openmp python3-matplotlib)
lint_pkgs=("${build_pkgs[@]}" nlohmann-json3-dev clang-tidy cppcheck libopenmpi-dev)
fuzz_pkgs=("${build_pkgs[@]}" nlohmann-json3-dev clang-14 libclang-rt-14-dev)

[[ $# -gt 0 ]] || usage
wanted=()
for group in "$@"; do
  case $group in
    build) wanted+=("${build_pkgs[@]}") ;;
    test) wanted+=("${test_pkgs[@]}") ;;
    bench) wanted+=("${bench_pkgs[@]}") ;;
    torch) wanted+=("${torch_pkgs[@]}") ;;
    lint) wanted+=("${lint_pkgs[@]}") ;;
    fuzz) wanted+=("${fuzz_pkgs[@]}") ;;
    *) usage ;;
  esac
done

missing=()
for pkg in "${wanted[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  if [[ $status != "install ok installed" && " ${missing[*]} " != *" $pkg "* ]]; then
    missing+=("$pkg")
  fi
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

install=(apt-get install -y --no-install-recommends "${missing[@]}")
if [[ $(id -u) -ne 0 ]]; then
  echo "attn needs these Debian packages: ${missing[*]}" >&2
  echo "install them with:" >&2
  echo "  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive ${install[*]}" >&2
  exit 1
fi

echo "deps.sh: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${install[@]}"
