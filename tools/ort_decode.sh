#!/usr/bin/env bash
# tools/ort_decode.sh - ONNX Runtime's CPU decode step as a peer of bench/decode_bench.
#
# Times com.microsoft.GroupQueryAttention (onnxruntime-node 1.30.0, CPU execution provider) on
# one new token against a KV cache in ORT's past/present share-buffer mode: fp32, head size 128,
# 32 query heads with 32 kv heads (MHA) and with 8 (GQA), S = 2048..16384 keys (the new one
# included), batch 1 and 8, intra-op threads 1 and 2 (one process each, spinning off, graph
# optimizations on). Before timing, each thread count runs a small case (B = 2 with different
# cache lengths, 4 heads / 2 kv heads, S_max = 64) against a numpy reference and prints the max
# abs error; the script stops if it is above 1e-4 of the output's magnitude.
#
# Output: one line per (op, heads, kv_heads, S, B, threads), named like decode_bench's rows:
#   ort/gqa/f32/H:32/Hkv:8/S:4096/D:128/B:1/threads:2   ms_median ms_min GB/s run_ms sets in_place
# ms_*: the GroupQueryAttention kernel's time per call, from ORT's profiler (onnxruntime-node's
# session.run adds a copy of every output into new JavaScript arrays - present_key/value included,
# twice the cache - which is run_ms, not ORT's decode step); GB/s: K and V bytes
# (kv_heads*S*128*4*2 per batch entry) over ms_median. Details: tools/ort_decode.js.
#
# Usage:
#   tools/ort_decode.sh [--threads "1 2"] [--S 2048,4096,8192,16384] [--B 1,8]
#                       [--heads 32:32,32:8] [--iters 20] [--warmup 3] [--noshare-S 4096]
#                       [--max-cache-mib 1024] [--attn BUILD_DIR]
#   --noshare-S LIST  also time the non-shared mode (ORT allocates present and copies past into
#                     it; rows ort/gqa_noshare/...) at these S, B = 1 ("" to skip)
#   --max-cache-mib M skip rows whose K+V exceed M MiB (default 1024: the B = 8, 32 kv head rows
#                     at S = 8192 and 16384). Not for memory alone: onnxruntime-node copies
#                     present_key/value into fresh JavaScript arrays after every call (outside
#                     the timed kernel), which at 4 GiB takes tens of seconds a call on a busy
#                     2-core machine; --max-cache-mib 4096 runs them all.
#   --attn BUILD_DIR  then run BUILD_DIR/bench/decode_bench on the same threads (its read rows,
#                     and its decode rows for the same shapes in every storage type), so ORT's
#                     rows and attn's come from one run of this script on one machine state
# Environment: ORT_DECODE_DIR (default build-ort/, ignored by git: node_modules, models),
#              PYTHON (default /usr/bin/python3, Debian's, which has python3-onnx).
# Installs what is missing (root or sudo): apt-get install python3-onnx python3-numpy nodejs npm;
# npm install --ignore-scripts onnxruntime-node@1.30.0 (its install script would fetch CUDA
# libraries; the CPU library ships in the package). Memory: a row holds its cache (all rotated
# sets: at least 256 MiB) plus onnxruntime-node's copy of one set; the largest (B = 8, 32 kv
# heads, S = 16384) 4 + 4 GiB. Not run by CI.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${ORT_DECODE_DIR:-$ROOT/build-ort}
PYTHON=${PYTHON:-/usr/bin/python3}
ORT_VERSION=1.30.0

THREADS="1 2"
S_LIST=2048,4096,8192,16384
B_LIST=1,8
HEADS=32:32,32:8
ITERS=20
WARMUP=3
NOSHARE_S=4096
MAX_CACHE_MIB=1024
ATTN_BUILD=
while [[ $# -gt 0 ]]; do
  case $1 in
    --threads) THREADS=$2; shift 2 ;;
    --S) S_LIST=$2; shift 2 ;;
    --B) B_LIST=$2; shift 2 ;;
    --heads) HEADS=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --noshare-S) NOSHARE_S=$2; shift 2 ;;
    --max-cache-mib) MAX_CACHE_MIB=$2; shift 2 ;;
    --attn) ATTN_BUILD=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "ort_decode.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [[ $apt_updated -eq 0 ]]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- dependencies -----------------------------------------------------------------------------
if ! "$PYTHON" -c 'import onnx, numpy' 2>/dev/null; then
  echo "# installing python3-onnx python3-numpy" >&2
  apt_install python3-onnx python3-numpy
  PYTHON=/usr/bin/python3
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "# installing nodejs npm" >&2
  apt_install nodejs npm
fi
mkdir -p "$DIR"
installed=$(node -p "try { require('$DIR/node_modules/onnxruntime-node/package.json').version } catch (e) { '' }")
if [[ $installed != "$ORT_VERSION" ]]; then
  echo "# npm install --ignore-scripts onnxruntime-node@$ORT_VERSION into $DIR" >&2
  [[ -f $DIR/package.json ]] || echo '{"private": true, "description": "tools/ort_decode.sh"}' >"$DIR/package.json"
  (cd "$DIR" && npm install --ignore-scripts --no-audit --no-fund "onnxruntime-node@$ORT_VERSION" >&2)
fi
export NODE_PATH=$DIR/node_modules

# --- models -----------------------------------------------------------------------------------
"$PYTHON" "$ROOT/tools/ort_decode_models.py" "$DIR/models" --heads "$HEADS,4:2" --head-dim 128 >/dev/null

# --- header -----------------------------------------------------------------------------------
echo "# tools/ort_decode.sh: ONNX Runtime $ORT_VERSION (onnxruntime-node, CPU EP) GroupQueryAttention decode step"
echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ); $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# node $(node --version); python $("$PYTHON" -c 'import onnx, numpy; print(f"onnx {onnx.__version__}, numpy {numpy.__version__}")')"

# --- correctness, then timing, one process per thread count ------------------------------------
for t in $THREADS; do
  case_json=$DIR/check_threads$t.json
  node "$ROOT/tools/ort_decode.js" check --models "$DIR/models" --threads "$t" --out "$case_json" | sed 's/^/# /'
  if ! result=$("$PYTHON" "$ROOT/tools/ort_decode_models.py" --check "$case_json"); then
    echo "# check FAILED against numpy (threads $t): $result" >&2
    exit 1
  fi
  echo "# check against numpy (threads $t): $result"
  rm -f "$case_json"
done
for t in $THREADS; do
  node --expose-gc "$ROOT/tools/ort_decode.js" time --models "$DIR/models" --threads "$t" \
    --heads "$HEADS" --S "$S_LIST" --B "$B_LIST" --iters "$ITERS" --warmup "$WARMUP" --max-cache-mib "$MAX_CACHE_MIB"
done
if [[ -n $NOSHARE_S ]]; then
  for t in $THREADS; do
    node --expose-gc "$ROOT/tools/ort_decode.js" time --models "$DIR/models" --threads "$t" \
      --heads "$HEADS" --S "$NOSHARE_S" --B 1 --iters "$ITERS" --warmup "$WARMUP" --share 0
  done
fi
if [[ -n $ATTN_BUILD ]]; then
  # decode_bench's rows are named B:/H:/Hkv:/L:/S:/D:; the same shapes as above, every storage type.
  s_alt=$(echo "$S_LIST" | tr ',' '|')
  for t in $THREADS; do
    echo "# attn: ATTN_BENCH_THREADS=$t $ATTN_BUILD/bench/decode_bench"
    ATTN_BENCH_THREADS=$t "$ATTN_BUILD/bench/decode_bench" \
      --benchmark_filter="^read/|^decode/.*/S:($s_alt)/" --benchmark_format=console 2>&1 | grep -v "^\*\*\*"
  done
fi
echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
