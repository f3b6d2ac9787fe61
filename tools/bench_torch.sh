#!/usr/bin/env bash
# tools/bench_torch.sh - attn against libtorch: build bench/torch_bench in build-torch/, run it on
# 1 thread and on all cores, then write the per-shape tables into bench/RESULTS.md (the
# bench_table_torch section, tools/bench_table.py) and the plot bench/attention_gflops.png
# (tools/bench_plot.py). A full run also runs the decoding step against libtorch
# (decode_torch_bench) on the same thread counts.
#
#   tools/bench_torch.sh                           the full run (about 10 minutes on 2 cores)
#   tools/bench_torch.sh --benchmark_filter=mha    a partial run: Google Benchmark arguments are
#                                                  passed on, and then nothing under bench/ is
#                                                  touched; table and plot stay in build-torch/
#
# Installs libtorch-dev, OpenBLAS and matplotlib first (tools/deps.sh torch). Its own build
# directory, so it never reconfigures tools/test.sh's build/. The sgemm peak the tables and the
# plot divide by is the fastest sgemm row of the same run (OpenBLAS through libtorch, or Eigen);
# ATTN_SGEMM_PEAK_1T and ATTN_SGEMM_PEAK_2T (GFLOP/s) override it.
# ATTN_BENCH_TORCH_BIG=1 also runs libtorch on the shapes whose scores need more than 8 GiB.
set -euo pipefail

cd "$(dirname "$0")/.."
tools/deps.sh torch

dir=build-torch
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DATTN_SANITIZE=OFF -DATTN_BUILD_TESTS=OFF \
  -DATTN_BUILD_EXAMPLES=OFF -DATTN_BUILD_BENCHMARKS=ON -DATTN_BENCH_TORCH=ON
cmake --build "$dir" -j "$(nproc)" --target torch_bench decode_torch_bench
[[ -x $dir/bench/torch_bench ]] || { echo "bench_torch.sh: $dir/bench/torch_bench was not built" >&2; exit 1; }

# torch_bench re-executes itself with OMP_WAIT_POLICY=PASSIVE when it is unset (see its header).
threads=(1)
[[ $(nproc) -gt 1 ]] && threads+=("$(nproc)")
results=()
for n in "${threads[@]}"; do
  json="$dir/bench/torch_bench_${n}t.json"
  echo
  echo "== $dir/bench/torch_bench, $n thread(s)"
  ATTN_BENCH_THREADS=$n "$dir/bench/torch_bench" --benchmark_out="$json" --benchmark_out_format=json "$@"
  results+=("$json")
done

# The decoding step against libtorch (bench/decode_bench.cpp built with libtorch), full runs only:
# printed and kept as JSON; bench/RESULTS.md's "Decoding step" section quotes it by hand.
if [[ $# -eq 0 ]]; then
  for n in "${threads[@]}"; do
    echo
    echo "== $dir/bench/decode_torch_bench, $n thread(s)"
    ATTN_BENCH_THREADS=$n "$dir/bench/decode_torch_bench" --benchmark_filter='S:4096/D:128' --benchmark_repetitions=3 \
      --benchmark_out="$dir/bench/decode_torch_bench_${n}t.json" --benchmark_out_format=json
  done
fi

peaks=()
[[ -n ${ATTN_SGEMM_PEAK_1T:-} ]] && peaks+=(--peak-1t "$ATTN_SGEMM_PEAK_1T")
[[ -n ${ATTN_SGEMM_PEAK_2T:-} ]] && peaks+=(--peak-2t "$ATTN_SGEMM_PEAK_2T")
if [[ $# -eq 0 ]]; then
  table_out=(--out bench/RESULTS.md)
  plot=bench/attention_gflops.png
else
  table_out=()
  plot=$dir/bench/attention_gflops.png
fi

echo
python3 tools/bench_table.py "${results[@]}" ${peaks[@]+"${peaks[@]}"} ${table_out[@]+"${table_out[@]}"}

# The plot needs matplotlib; Debian's python3-matplotlib belongs to /usr/bin/python3, which is not
# always the python3 first on PATH.
python=python3
python3 -c "import matplotlib" 2>/dev/null || python=/usr/bin/python3
"$python" tools/bench_plot.py "${results[@]}" ${peaks[@]+"${peaks[@]}"} --out "$plot"
