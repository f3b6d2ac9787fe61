#!/usr/bin/env bash
# tools/fuzz.sh - build the libFuzzer targets (fuzz/) with clang 14 in build-fuzz/ and fuzz each
# for a bounded time; exits non-zero on any crash, leak, sanitizer report, timeout or broken
# promise (fuzz/*.cpp say what each target checks).
#
#   tools/fuzz.sh              30 s per target (CI)
#   tools/fuzz.sh 600          10 minutes per target
#   tools/fuzz.sh 60 attention_fuzz
#
# Each target starts from its seed corpus fuzz/corpus/<target>/, which it only reads; what it
# finds goes to a temporary working corpus, deleted afterwards. A failing input is kept as
# build-fuzz/artifacts/<target>/crash-* (or leak-*, timeout-*, oom-*): replay it with
#   build-fuzz/fuzz/<target> <file>
# and, once the bug is fixed, add it to the corpus as fuzz/corpus/<target>/regress_<what>.
set -euo pipefail

usage() {
  echo "usage: $0 [seconds per target] [target...]" >&2
  exit 2
}

seconds=30
if [[ $# -gt 0 ]]; then
  [[ $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
  seconds=$1
  shift
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(safetensors_fuzz attention_fuzz)

cd "$(dirname "$0")/.."
tools/deps.sh fuzz

dir=build-fuzz
# -O1 with assertions (no NDEBUG): Eigen's index checks and ATTN_ASSERT stay on; fuzz/CMakeLists.txt
# adds the sanitizers and -g1.
cmake -S . -B "$dir" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1" -DATTN_BUILD_FUZZERS=ON \
  -DATTN_BUILD_TESTS=OFF -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF -DATTN_INSTALL=OFF
cmake --build "$dir" -j "$(nproc)" --target "${targets[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The targets run side by side, one per core (each libFuzzer process is single-threaded), and
# are reported in order once all have finished.
pids=()
for t in "${targets[@]}"; do
  corpus=fuzz/corpus/$t
  [[ -d $corpus ]] || { echo "fuzz.sh: no seed corpus $corpus" >&2; exit 2; }
  artifacts=$dir/artifacts/$t
  mkdir -p "$work/$t" "$artifacts"
  echo "== $t: $seconds s"
  # The working corpus first: libFuzzer writes new inputs to the first directory only. Leaks are
  # failures (-detect_leaks); one input may take 10 s and 2 GB; -error_exitcode is libFuzzer's
  # default 77 for every failure kind, also a timeout or an out-of-memory.
  "$dir/fuzz/$t" "$work/$t" "$corpus" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -detect_leaks=1 -error_exitcode=77 -timeout_exitcode=77 -artifact_prefix="$artifacts/" \
    -print_final_stats=1 >"$work/$t.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!targets[@]}"; do
  t=${targets[$i]}
  if ! wait "${pids[$i]}"; then
    tail -n 60 "$work/$t.log" >&2
    echo "fuzz.sh: $t FAILED; the input is in $dir/artifacts/$t/" >&2
    status=1
  else
    echo "== $t"
    grep -E '^(#[0-9]+.*DONE|Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$work/$t.log" || true
    echo "fuzz.sh: $t: no failure, $(find "$work/$t" -type f | wc -l) new inputs"
  fi
done
exit $status
