#!/usr/bin/env bash
# tools/fuzz.sh - build the libFuzzer targets (fuzz/) with clang 14 in build-fuzz/ and fuzz each
# for a bounded time; exits non-zero on any crash, leak, sanitizer report, timeout or broken
# promise (fuzz/*.cpp say what each target checks).
#
#   tools/fuzz.sh                          20 s per fast target (all but attention_fuzz_large), from
#                                          the committed corpora: a smoke run
#   tools/fuzz.sh 600                      10 minutes per fast target
#   tools/fuzz.sh 60 attention_fuzz        one target
#   tools/fuzz.sh --campaign               30 minutes per target, every target (attention_fuzz_large
#                                          too), then merges what each found into fuzz/corpus/
#   tools/fuzz.sh --campaign 3600 dist_fuzz
#
# The corpora are committed: fuzz/corpus/<target>/ holds the seeds (tools/gen_fuzz_corpus.py
# writes those of safetensors_fuzz and attention_fuzz; regress_* reproduce fixed bugs) and the
# inputs earlier campaigns kept (named by their SHA-1). A short run starts from them and only reads
# them: what it finds goes to a temporary working corpus, deleted afterwards. A campaign runs the
# targets two at a time (one per core), then keeps, of what it found, only the inputs that reach
# code the corpus does not (libFuzzer's -merge=1), so the corpus grows by what is new; commit
# fuzz/corpus/ afterwards. attention_fuzz_large (large shapes, slower) starts from
# attention_fuzz's corpus as well as its own.
#
# A failing input is kept as build-fuzz/artifacts/<target>/crash-* (or leak-*, timeout-*, oom-*):
# replay it with
#   build-fuzz/fuzz/<target> <file>
# and, once the bug is fixed, add it to the corpus as fuzz/corpus/<target>/regress_<what>.
set -euo pipefail

usage() {
  echo "usage: $0 [--campaign] [seconds per target] [target...]" >&2
  exit 2
}

campaign=0
if [[ ${1:-} == --campaign ]]; then
  campaign=1
  shift
fi
seconds=$((campaign ? 1800 : 20))
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  [[ $1 -gt 0 ]] || usage
  seconds=$1
  shift
fi
targets=("$@")
fast_targets=(safetensors_fuzz checkpoint_fuzz attention_fuzz serving_fuzz dist_fuzz)
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=("${fast_targets[@]}")
  [[ $campaign -eq 0 ]] || targets+=(attention_fuzz_large)
fi

cd "$(dirname "$0")/.."
tools/deps.sh fuzz

dir=build-fuzz
# -O1 with assertions (no NDEBUG): Eigen's index checks and ATTN_ASSERT stay on; fuzz/CMakeLists.txt
# adds the sanitizers and -g1.
cmake -S . -B "$dir" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1" -DATTN_BUILD_FUZZERS=ON \
  -DATTN_BUILD_TESTS=OFF -DATTN_BUILD_BENCHMARKS=OFF -DATTN_BUILD_EXAMPLES=OFF -DATTN_INSTALL=OFF
cmake --build "$dir" -j "$(nproc)" --target "${targets[@]}"

# The committed corpus directories a target starts from; the first is the one a campaign grows.
corpora() {
  echo "fuzz/corpus/$1"
  [[ $1 != *_large ]] || echo "fuzz/corpus/${1%_large}"
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Runs target $1 for $seconds into $work/$1, logging to $work/$1.log.
run() {
  local t=$1 artifacts=$dir/artifacts/$1
  local dirs
  mapfile -t dirs < <(corpora "$t")
  mkdir -p "$work/$t" "$artifacts" "${dirs[0]}"
  # The working corpus first: libFuzzer writes new inputs to the first directory only. Leaks are
  # failures (-detect_leaks); one input may take 10 s and 2 GB; -error_exitcode is libFuzzer's
  # default 77 for every failure kind, also a timeout or an out-of-memory.
  "$dir/fuzz/$t" "$work/$t" "${dirs[@]}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -detect_leaks=1 -error_exitcode=77 -timeout_exitcode=77 -artifact_prefix="$artifacts/" \
    -print_final_stats=1 >"$work/$t.log" 2>&1
}
# What a finished run reports: its rate and size, and, in a campaign, the inputs it adds.
report() {
  local t=$1
  echo "== $t"
  grep -E '^(#[0-9]+.*(INITED|DONE)|Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb)' \
    "$work/$t.log" || true
  if [[ $campaign -eq 1 ]]; then
    local dirs before
    mapfile -t dirs < <(corpora "$t")
    before=$(find "${dirs[0]}" -type f | wc -l)
    "$dir/fuzz/$t" -merge=1 "${dirs[0]}" "$work/$t" >"$work/$t.merge.log" 2>&1
    echo "fuzz.sh: $t: no failure; ${dirs[0]} grew from $before to $(find "${dirs[0]}" -type f | wc -l) inputs"
  else
    echo "fuzz.sh: $t: no failure, $(find "$work/$t" -type f | wc -l) new inputs (not kept)"
  fi
}

# Two targets at a time, one per core (each libFuzzer process is single-threaded); each pair is
# reported once both have finished.
status=0
jobs=$(nproc)
for ((i = 0; i < ${#targets[@]}; i += jobs)); do
  batch=("${targets[@]:i:jobs}")
  pids=()
  for t in "${batch[@]}"; do
    echo "== $t: $seconds s"
    run "$t" &
    pids+=($!)
  done
  for j in "${!batch[@]}"; do
    t=${batch[$j]}
    if ! wait "${pids[$j]}"; then
      tail -n 60 "$work/$t.log" >&2
      echo "fuzz.sh: $t FAILED; the input is in $dir/artifacts/$t/" >&2
      status=1
    else
      report "$t"
    fi
  done
done
exit $status
