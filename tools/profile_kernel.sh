#!/usr/bin/env bash
# tools/profile_kernel.sh - where the flash kernel's instructions go: callgrind instruction counts
# per micro-kernel (this VM has no hardware counters, so perf can only sample time).
#
#   tools/profile_kernel.sh [L H D [causal]]     default: 1024 2 64 0 (one thread)
#
# Valgrind 3.19 cannot run AVX-512 code, so the driver (tools/profile/flash_driver.cpp) is built
# for AVX2 + FMA (the 16-register micro-kernel tiles); the instruction mix of the AVX-512 build is
# the same per packet. The micro-kernels are marked noinline in a copy of include/ so that each
# gets its own line in the profile; the driver prints its time with and without that change, so
# the cost of the calls can be seen to be small. Only the kernel is counted (callgrind
# --toggle-collect), the 4 calls the driver makes. Needs valgrind (apt-get install valgrind).
set -euo pipefail

cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "profile_kernel.sh: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
args=("${1:-1024}" "${2:-2}" "${3:-64}" "${4:-0}" 1)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r include "$work/include"
sed -i -E 's/^EIGEN_STRONG_INLINE (void score_rows|T max_of|T exp_sum_row|void pv_rows)/__attribute__((noinline)) \1/;
           s/^void (pack_keys|pack_panels)/__attribute__((noinline)) void \1/' "$work/include/attn/detail/microkernel.hpp"

flags=(-std=c++17 -O3 -g -DNDEBUG -mavx2 -mfma -mno-avx512f -I/usr/include/eigen3 -pthread)
g++ "${flags[@]}" -Iinclude tools/profile/flash_driver.cpp -o "$work/inlined"
g++ "${flags[@]}" -I"$work/include" tools/profile/flash_driver.cpp -o "$work/split"
echo "as built:            $("$work/inlined" "${args[@]}")"
echo "micro-kernels split: $("$work/split" "${args[@]}")"

valgrind --tool=callgrind --collect-atstart=no --toggle-collect='void attn::detail::attention_flash<float>(*' --callgrind-out-file="$work/cg.out" "$work/split" "${args[@]}" >/dev/null 2>&1
callgrind_annotate "$work/cg.out" 2>/dev/null | python3 -c '
import re, sys, collections
parts = ["score_rows", "pv_tile", "pv_rows", "exp_sum_row", "max_of", "pack_", "mask_row"]
count, total = collections.Counter(), 0
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+\S+?:(.*)", line)
    if not m or "PROGRAM TOTALS" in line:
        continue
    n, name = int(m.group(1).replace(",", "")), m.group(2).split("(")[0]
    part = next((p for p in parts if p in name), "the rest (block loop, fills, scalar tails)")
    label = {"pv_tile": "P.V (pv_tile, pv_rows)", "pv_rows": "P.V (pv_tile, pv_rows)", "pack_": "packing K (pack_keys)"}
    count[label.get(part, part)] += n
    total += n
print(f"callgrind, {total / 1e6:.0f} M instructions:")
for part, n in count.most_common():
    print(f"  {part:46s} {n / 1e6:8.1f} M  {100 * n / total:5.1f} %")
'
