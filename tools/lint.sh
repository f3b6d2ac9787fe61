#!/usr/bin/env bash
# tools/lint.sh - static analysis of attn's headers; exits non-zero on any finding.
#
#   tools/lint.sh               clang-tidy and cppcheck, side by side
#   tools/lint.sh clang-tidy    one of them
#   tools/lint.sh cppcheck
#
# clang-tidy (checks in .clang-tidy) runs on tools/lint_tu.cpp, which includes every header and
# instantiates every public template for float and double; diagnostics are kept to include/attn/
# (Eigen's, nlohmann's and the standard library's headers are not ours to fix). A header under
# include/attn/ that the translation unit does not reach fails the run: add it to lint_tu.cpp.
# cppcheck reads every header under include/ itself, without Eigen (it reads the library's code,
# not Eigen's); tools/cppcheck-suppressions.xml lists the findings that are known false positives,
# each with its reason (inline `cppcheck-suppress` comments are not honoured: every suppression is
# in that one file). Both tools come from tools/deps.sh lint (Debian 12: clang-tidy 14,
# cppcheck 2.10). About two minutes on 2 cores.
set -euo pipefail

usage() {
  echo "usage: $0 [clang-tidy|cppcheck]" >&2
  exit 2
}
run_tidy=1
run_cppcheck=1
case ${1:-} in
  "") ;;
  clang-tidy) run_cppcheck=0 ;;
  cppcheck) run_tidy=0 ;;
  *) usage ;;
esac
[[ $# -le 1 ]] || usage

cd "$(dirname "$0")/.."
tools/deps.sh lint

eigen=${EIGEN3_INCLUDE_DIR:-/usr/include/eigen3}
[[ -f $eigen/Eigen/Core ]] || { echo "lint.sh: Eigen not found in $eigen (set EIGEN3_INCLUDE_DIR)" >&2; exit 1; }
# The flags of attn's own builds, with x86-64-v3 (AVX2, FMA) vectors on x86 so that the SIMD paths
# of the micro-kernels are the ones analysed; asserts stay on (the analyzer trusts them).
flags=(-std=c++17 -Iinclude -isystem "$eigen" -pthread)
[[ $(uname -m) == x86_64 ]] && flags+=(-mavx2 -mfma)
# attn/dist/ includes mpi.h: MPI's include directories, as its compiler wrapper reports them.
for dir in $(mpicxx --showme:incdirs); do flags+=(-isystem "$dir"); done
tu=tools/lint_tu.cpp
status=0

# cppcheck's part; prints its findings and returns non-zero on any.
cppcheck_headers() {
  local status=0
  echo "== $(cppcheck --version) on include/"
  start=$SECONDS
  # Eigen's and the platform's headers are left out: cppcheck would spend its time in them.
  # Two configurations, named: the Linux x86-64 build (g++, mmap, FMA/F16C, AVX-512 and its bf16
  # dot) and the portable one (no mmap, no compiler or CPU macros, with ATTN_EXTERN_TEMPLATES and
  # Eigen's no-malloc check). Left to itself cppcheck tries up to 12 combinations of every macro a
  # header tests: 155 s on 2 cores against 40 s for these two, which reach every branch we ship.
  mapfile -t headers < <(find include -name '*.hpp' | sort)
  configs=("-D__GNUC__=12 -D__linux__ -D__unix__ -D__FMA__ -D__F16C__ -DEIGEN_VECTORIZE_AVX512 -D__AVX512BF16__ -DMADV_HUGEPAGE=14 -DMADV_DONTNEED=4"
           "-DATTN_EXTERN_TEMPLATES -DATTN_IO_NO_MMAP -DEIGEN_RUNTIME_NO_MALLOC")
  for config in "${configs[@]}"; do
    read -ra defines <<<"$config"
    cppcheck --quiet --language=c++ --std=c++17 -Iinclude "${defines[@]}" \
      --enable=warning,style,performance,portability \
      --suppress-xml=tools/cppcheck-suppressions.xml \
      --error-exitcode=1 -j "$(nproc)" "${headers[@]}" || status=1
  done
  echo "cppcheck: $((SECONDS - start)) s"
  return $status
}

# With both tools, cppcheck runs beside clang-tidy (which uses one core) and its report follows.
cppcheck_log=
if [[ $run_cppcheck -eq 1 && $run_tidy -eq 1 ]]; then
  cppcheck_log=$(mktemp)
  trap 'rm -f "$cppcheck_log"' EXIT
  cppcheck_headers >"$cppcheck_log" 2>&1 &
  cppcheck_pid=$!
fi

if [[ $run_tidy -eq 1 ]]; then
  # Every header must be reached from the translation unit, or its code would go unchecked.
  reached=$(g++ "${flags[@]}" -MM "$tu" | tr ' \\' '\n\n' | grep -E '^include/attn/.*\.hpp$' | sort -u)
  unreached=$(comm -23 <(find include/attn -name '*.hpp' | sort) <(echo "$reached"))
  if [[ -n $unreached ]]; then
    echo "lint.sh: $tu does not include these headers (add them, and instantiate their templates):" >&2
    echo "$unreached" | sed 's/^/  /' >&2
    status=1
  fi

  tidy=$(command -v clang-tidy || command -v clang-tidy-14)
  echo "== $("$tidy" --version | grep -o 'LLVM version [0-9.]*' | sed 's/LLVM/clang-tidy/') on $tu"
  start=$SECONDS
  # (clang's "N warnings generated" counts the diagnostics it dropped outside include/attn/.)
  "$tidy" --quiet "$tu" -- "${flags[@]}" 2> >(grep -v '^[0-9]* warnings\? generated\.$' >&2) || status=1
  echo "clang-tidy: $((SECONDS - start)) s"
fi

if [[ $run_cppcheck -eq 1 ]]; then
  if [[ -n $cppcheck_log ]]; then
    wait "$cppcheck_pid" || status=1
    cat "$cppcheck_log"
  else
    cppcheck_headers || status=1
  fi
fi

exit $status
