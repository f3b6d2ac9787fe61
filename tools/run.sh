#!/usr/bin/env bash
# tools/run.sh - build attn in Release, run the quickstart example, then both benchmark suites,
# and print the markdown table of attn against its baselines (tools/bench_table.py).
#
#   tools/run.sh [<Google Benchmark arguments>...]   e.g. tools/run.sh --benchmark_filter=mha
#
# The raw results stay in build/bench/linear_bench.json and build/bench/attention_bench.json
# (where the bench_results target writes them too).
set -euo pipefail

cd "$(dirname "$0")/.."
tools/deps.sh test bench

dir=build
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DATTN_SANITIZE=OFF \
  -DATTN_BUILD_TESTS=ON -DATTN_BUILD_BENCHMARKS=ON -DATTN_BUILD_EXAMPLES=ON
# The same configuration as tools/test.sh (so the two never undo each other in build/); only the
# targets of the main job are built here.
cmake --build "$dir" -j "$(nproc)" --target quickstart masks linear_bench attention_bench

echo
echo "== $dir/examples/quickstart"
"$dir/examples/quickstart"

results=()
for suite in linear_bench attention_bench; do
  json="$dir/bench/$suite.json"
  echo
  echo "== $dir/bench/$suite"
  "$dir/bench/$suite" --benchmark_out="$json" --benchmark_out_format=json "$@"
  results+=("$json")
done

echo
python3 tools/bench_table.py "${results[@]}"
