#!/usr/bin/env bash
# tools/compile_time.sh - what one translation unit that uses attn costs to compile.
#
#   tools/compile_time.sh [N]                         N runs of each compile (default 3), medians
#   CXX=clang++ tools/compile_time.sh 5               another compiler
#   ATTN_BASELINE=/tmp/old/include tools/compile_time.sh
#       before/after: the same compiles against another attn's headers too, run alternately with
#       this tree's (so that both see the same machine load), side by side with their ratio
#
# Two translation units, each compiled with and without the opt-in ATTN_EXTERN_TEMPLATES:
#   quickstart   examples/quickstart/main.cpp: one MultiHeadAttention<float>
#   everything   tools/compile_time_all.cpp: every public module and attn/io, in float (and again
#                without attn/io, which ATTN_EXTERN_TEMPLATES does not cover)
# and, once, the file that ATTN_EXTERN_TEMPLATES users compile once per program (attn/instantiate.hpp:
# every kernel and module for float and double). Flags: -std=c++17 -O2 -march=native -DNDEBUG, Eigen
# as a system include (CXXFLAGS adds to them). For each: CPU seconds (user + sys: the number to
# compare, as a busy machine stretches the wall clock far more than the CPU time), wall seconds, and
# peak memory (/usr/bin/time's maximum resident set), each the median of N runs.
set -euo pipefail

n=${1:-3}
[[ $n =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [N]   (N: runs per compile, default 3)" >&2; exit 2; }
cd "$(dirname "$0")/.."
cxx=${CXX:-g++}
baseline=${ATTN_BASELINE:-}
eigen=${EIGEN3_INCLUDE_DIR:-/usr/include/eigen3}
[[ -x /usr/bin/time ]] || { echo "compile_time.sh: needs /usr/bin/time (Debian: apt-get install time)" >&2; exit 1; }
[[ -f $eigen/Eigen/Core ]] || { echo "compile_time.sh: Eigen not found in $eigen (set EIGEN3_INCLUDE_DIR)" >&2; exit 1; }
[[ -z $baseline || -f $baseline/attn/attn.hpp ]] || { echo "compile_time.sh: no attn/attn.hpp in $baseline" >&2; exit 1; }
# shellcheck disable=SC2206  # CXXFLAGS is a list of flags
flags=(-std=c++17 -O2 -march=native -DNDEBUG -isystem "$eigen" ${CXXFLAGS:-})
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# median of the numbers on stdin
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# compile TAG INCLUDE SOURCE [FLAGS...]: one timed compile, its "user sys wall KB" appended to $tmp/TAG
compile() {
  local tag=$1 include=$2 src=$3
  shift 3
  /usr/bin/time -o "$tmp/time" -f "%U %S %e %M" "$cxx" "${flags[@]}" -I"$include" "$@" -c "$src" -o "$tmp/out.o"
  cat "$tmp/time" >>"$tmp/$tag"
}

# stats TAG: "cpu wall MB", the medians of the runs in $tmp/TAG
stats() {
  echo "$(awk '{ print $1 + $2 }' "$tmp/$1" | median) $(awk '{ print $3 }' "$tmp/$1" | median)" \
    "$(awk '{ print $4 / 1024 }' "$tmp/$1" | median)"
}

# measure LABEL SOURCE [FLAGS...]: one table row, the medians of n compiles (and of n against the
# baseline, alternating: baseline first on even runs, this tree first on odd ones).
measure() {
  local label=$1 src=$2
  shift 2
  : >"$tmp/new"
  : >"$tmp/old"
  for ((i = 0; i < n; ++i)); do
    if [[ -n $baseline && $((i % 2)) -eq 0 ]]; then compile old "$baseline" "$src" "$@"; fi
    compile new include "$src" "$@"
    if [[ -n $baseline && $((i % 2)) -eq 1 ]]; then compile old "$baseline" "$src" "$@"; fi
  done
  # shellcheck disable=SC2046  # word splitting of stats' three numbers is the point
  if [[ -n $baseline ]]; then
    set -- $(stats old) $(stats new)
    printf '| %-48s | %7.1f | %7.1f | %8.0f | %7.1f | %7.1f | %8.0f | %5.2f |\n' "$label" "$@" "$(awk "BEGIN { print $4 / $1 }")"
  else
    set -- $(stats new)
    printf '| %-48s | %7.1f | %7.1f | %8.0f |\n' "$label" "$@"
  fi
}

echo "$("$cxx" --version | head -1); ${flags[*]}; median of $n${baseline:+; before: $baseline, after: include}"
echo
if [[ -n $baseline ]]; then
  printf '| %-48s | %7s | %7s | %8s | %7s | %7s | %8s | %5s |\n' "translation unit" "CPU s" "wall s" "peak MB" \
    "CPU s" "wall s" "peak MB" "CPU"
  printf '| %-48s | %7s | %7s | %8s | %7s | %7s | %8s | %5s |\n' "" "before" "before" "before" "after" "after" \
    "after" "ratio"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..50})" "---------" "---------" "----------" \
    "---------" "---------" "----------" "-------"
else
  printf '| %-48s | %7s | %7s | %8s |\n' "translation unit" "CPU s" "wall s" "peak MB"
  printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..50})" "---------" "---------" "----------"
fi
quickstart=examples/quickstart/main.cpp
[[ -f $quickstart ]] || quickstart=examples/quickstart.cpp
measure "quickstart" "$quickstart"
measure "quickstart, ATTN_EXTERN_TEMPLATES" "$quickstart" -DATTN_EXTERN_TEMPLATES
measure "everything" tools/compile_time_all.cpp
measure "everything, ATTN_EXTERN_TEMPLATES" tools/compile_time_all.cpp -DATTN_EXTERN_TEMPLATES
measure "everything but attn/io" tools/compile_time_all.cpp -DATTN_COMPILE_TIME_NO_IO
measure "everything but attn/io, ATTN_EXTERN_TEMPLATES" tools/compile_time_all.cpp -DATTN_COMPILE_TIME_NO_IO \
  -DATTN_EXTERN_TEMPLATES
# The price of the opt-in: its one instantiation file, compiled once per program.
echo
echo '#include <attn/instantiate.hpp>' >"$tmp/instantiate.cpp"
baseline=''
printf '| %-48s | %7s | %7s | %8s |\n' "compiled once per program" "CPU s" "wall s" "peak MB"
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..50})" "---------" "---------" "----------"
measure "attn/instantiate.hpp" "$tmp/instantiate.cpp"
