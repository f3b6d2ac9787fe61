// tools/ort_decode.js - times ONNX Runtime's CPU decode step (com.microsoft.GroupQueryAttention,
// one new token) with onnxruntime-node; run by tools/ort_decode.sh, which installs the package
// and writes the models (tools/ort_decode_models.py).
//
//   node ort_decode.js check --models DIR --threads T --out CASE.json
//       runs the small check case (B = 2 with different cache lengths, H = 4, Hkv = 2, D = 128,
//       S_max = 64) and dumps inputs, ORT's output and the cache as ORT left it, for
//       `ort_decode_models.py --check CASE.json` (numpy reference)
//   node --expose-gc ort_decode.js time --models DIR --threads T [--heads 32:32,32:8]
//       [--S 2048,4096,8192,16384] [--B 1,8] [--iters 20] [--warmup 3] [--cold-mib 256]
//       [--share 1|0] [--max-cache-mib M]
//       one line per (heads, kv_heads, S, B): ms_median and ms_min of the GroupQueryAttention
//       kernel over --iters timed calls after --warmup, GB/s of K and V (kv_heads*S*D*4*2 bytes
//       per batch entry) at the median; run_ms, the median wall time of the whole session.run
//       seen from JavaScript; sets (buffer sets rotated); in_place (see below). Rows whose K and
//       V (one buffer set) exceed --max-cache-mib are skipped, with a comment line.
//
// What is timed. The kernel's time comes from ORT's own profiler (session option enableProfiling:
// the `<node>_kernel_time` event of each run, i.e. the op's Compute call, microseconds), one
// fresh session per row. session.run's wall time is not the op's: onnxruntime-node (1.30,
// tensor_helper.cc, "TODO: optimize memory") copies every output into a new JavaScript
// ArrayBuffer after the run, pre-allocated ones included, so each call also allocates and
// writes a copy of present_key and present_value - twice the cache's bytes, plus page faults.
// run_ms shows that overhead; it is not ORT's decode step and is not what the table compares.
//
// Past/present share buffer: the cache is [B, Hkv, S_max = S, D] and the same onnxruntime
// Tensor is passed as input past_key and as pre-allocated output present_key (likewise value);
// onnxruntime-node hands the caller's buffer to ORT as the output, so the kernel, which sets
// past_present_share_buffer when the past and present pointers are equal, reads the cache in
// place and writes only the new token's row (at position seqlens_k = S - 1). Checked: after the
// warm-up the new key and value must be in the caller's buffers at row S - 1 (in_place), and
// `--share 0` times the other mode for comparison (rows `ort/gqa_noshare/...`): past of S - 1
// rows, present allocated by ORT, which zeroes it and copies past into it on every call.
//
// Cold cache: each timed call reads a different buffer set than the one before, rotating over
// ceil(cold-mib / bytes of one set's K and V) sets (at least 1): with the default 256 MiB (8x a
// 32 MiB L3) a set of 16 MiB (8 kv heads x 2048 keys) rotates over 16 sets, one of 256 MiB or
// more is read in full between two reads of itself anyway. (The copies onnxruntime-node makes
// after each call, freed before the next, pass through the cache too; they only make it colder.)
'use strict';

const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

function parseArgs(argv) {
  const a = {
    mode: argv[0], models: null, threads: 1, heads: '32:32,32:8', S: '2048,4096,8192,16384', B: '1,8',
    iters: 20, warmup: 3, coldMib: 256, D: 128, out: null, share: 1, maxCacheMib: Infinity,
  };
  for (let i = 1; i < argv.length; i += 2) {
    const k = argv[i], v = argv[i + 1];
    if (v === undefined) throw new Error(`missing value for ${k}`);
    switch (k) {
      case '--models': a.models = v; break;
      case '--threads': a.threads = parseInt(v, 10); break;
      case '--heads': a.heads = v; break;
      case '--S': a.S = v; break;
      case '--B': a.B = v; break;
      case '--iters': a.iters = parseInt(v, 10); break;
      case '--warmup': a.warmup = parseInt(v, 10); break;
      case '--cold-mib': a.coldMib = parseFloat(v); break;
      case '--head-dim': a.D = parseInt(v, 10); break;
      case '--out': a.out = v; break;
      case '--share': a.share = parseInt(v, 10); break;
      case '--max-cache-mib': a.maxCacheMib = parseFloat(v); break;
      default: throw new Error(`unknown option ${k}`);
    }
  }
  if (a.warmup < 1) throw new Error('--warmup must be at least 1 (the in-place check needs a run)');
  if (!['check', 'time'].includes(a.mode) || !a.models) {
    throw new Error('usage: ort_decode.js check|time --models DIR --threads T [...] (see the top of the file)');
  }
  return a;
}

function sessionOptions(threads) {
  return {
    executionProviders: ['cpu'],
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    graphOptimizationLevel: 'all',
    enableCpuMemArena: true,
    extra: {session: {intra_op: {allow_spinning: '0'}}},  // session.intra_op.allow_spinning = "0"
  };
}

// Deterministic pseudo-random floats in [-1, 1) (xorshift32), so runs are comparable.
function makeRng(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5; x >>>= 0;
    return x / 2147483648 - 1;
  };
}

function randomArray(n, rng, scale = 1) {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = scale * rng();
  return a;
}

// A large cache filled from a 1 Mi-float random block (copied with set(): filling gigabytes with
// Math-level code would take longer than the timing), each copy offset by a few floats so heads
// and rows differ.
function fillLarge(n, rng) {
  const blockLen = 1 << 20;
  const block = randomArray(blockLen + 64, rng);
  const a = new Float32Array(n);
  let shift = 0;
  for (let off = 0; off < n; off += blockLen) {
    const len = Math.min(blockLen, n - off);
    a.set(block.subarray(shift, shift + len), off);
    shift = (shift + 7) % 64;
  }
  return a;
}

function modelPath(dir, H, Hkv, D) {
  return path.join(dir, `gqa_H${H}_Hkv${Hkv}_D${D}.onnx`);
}

// One buffer set: the inputs of one decode step and the fetches binding present to past.
// share = false: the other mode, past holds S - 1 rows and ORT allocates present (S rows) and
// copies past into it on every call (fetches by name).
function makeSet(B, H, Hkv, D, S, seqlens, rng, large, share = true) {
  const rows = share ? S : S - 1;
  const cacheLen = B * Hkv * rows * D;
  const pk = new ort.Tensor('float32', large ? fillLarge(cacheLen, rng) : randomArray(cacheLen, rng), [B, Hkv, rows, D]);
  const pv = new ort.Tensor('float32', large ? fillLarge(cacheLen, rng) : randomArray(cacheLen, rng), [B, Hkv, rows, D]);
  const feeds = {
    query: new ort.Tensor('float32', randomArray(B * H * D, rng), [B, 1, H * D]),
    key: new ort.Tensor('float32', randomArray(B * Hkv * D, rng, 2), [B, 1, Hkv * D]),
    value: new ort.Tensor('float32', randomArray(B * Hkv * D, rng, 2), [B, 1, Hkv * D]),
    past_key: pk,
    past_value: pv,
    seqlens_k: new ort.Tensor('int32', Int32Array.from(seqlens), [B]),
    total_sequence_length: new ort.Tensor('int32', Int32Array.of(Math.max(...seqlens) + 1), []),
  };
  const fetches = share ? {
    output: new ort.Tensor('float32', new Float32Array(B * H * D), [B, 1, H * D]),
    present_key: pk,
    present_value: pv,
  } : ['output', 'present_key', 'present_value'];
  return {feeds, fetches, pk, pv};
}

// True when ORT wrote batch entry b's new key and value into the caller's cache buffers, at row
// seqlens_k[b] of every kv head: the proof that present shared past's buffer.
function writtenInPlace(set, B, Hkv, D, S, seqlens) {
  for (const [cache, fresh] of [[set.pk.data, set.feeds.key.data], [set.pv.data, set.feeds.value.data]]) {
    for (let b = 0; b < B; b++) {
      for (let g = 0; g < Hkv; g++) {
        const row = ((b * Hkv + g) * S + seqlens[b]) * D;
        for (let d = 0; d < D; d++) {
          if (cache[row + d] !== fresh[(b * Hkv + g) * D + d]) return false;
        }
      }
    }
  }
  return true;
}

async function runCheck(a) {
  const B = 2, H = 4, Hkv = 2, D = a.D, S = 64;
  const seqlens = [S - 1, 40];  // 64 and 41 keys: per-entry lengths, one shorter than the buffer
  const session = await ort.InferenceSession.create(modelPath(a.models, H, Hkv, D), sessionOptions(a.threads));
  const set = makeSet(B, H, Hkv, D, S, seqlens, makeRng(12345), false);
  const before = {past_key: Array.from(set.pk.data), past_value: Array.from(set.pv.data)};
  const res = await session.run(set.feeds, set.fetches);
  const shared = writtenInPlace(set, B, Hkv, D, S, seqlens);
  const sameObject = res.present_key.data.buffer === set.pk.data.buffer;
  const f = set.feeds;
  const c = {
    B, H, Hkv, D, S_max: S, seqlens_k: seqlens, threads: a.threads,
    query: Array.from(f.query.data), key: Array.from(f.key.data), value: Array.from(f.value.data),
    past_key: before.past_key, past_value: before.past_value,
    ort_output: Array.from(res.output.data),
    ort_past_key_after: Array.from(set.pk.data), ort_past_value_after: Array.from(set.pv.data),
    shared_in_place: shared, present_is_past_buffer: sameObject,
  };
  fs.writeFileSync(a.out, JSON.stringify(c));
  console.log(`check: B=${B} H=${H} Hkv=${Hkv} D=${D} S_max=${S} seqlens_k=${seqlens} threads=${a.threads}: ` +
              `new K/V written into the past buffer: ${shared ? 'yes' : 'NO'}`);
  await session.release();
  return shared ? 0 : 1;
}

function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : 0.5 * (s[m - 1] + s[m]);
}

// The GroupQueryAttention node's own times, from ORT's profiler: one `<node>_kernel_time` event
// (microseconds) per session.run, in order.
function kernelTimesMs(profDir, prefix) {
  const files = fs.readdirSync(profDir).filter((f) => f.startsWith(prefix + '_') && f.endsWith('.json'));
  if (files.length !== 1) throw new Error(`expected one profile ${prefix}_*.json in ${profDir}, found ${files.length}`);
  const file = path.join(profDir, files[0]);
  const events = JSON.parse(fs.readFileSync(file, 'utf8'));
  fs.unlinkSync(file);
  return events.filter((e) => e.cat === 'Node' && e.args && e.args.op_name === 'GroupQueryAttention' &&
                              e.name.endsWith('_kernel_time'))
      .sort((x, y) => x.ts - y.ts)
      .map((e) => e.dur / 1e3);
}

async function runTime(a) {
  const pairs = a.heads.split(',').map((p) => p.split(':').map((x) => parseInt(x, 10)));
  const Ss = a.S.split(',').map((x) => parseInt(x, 10));
  const Bs = a.B.split(',').map((x) => parseInt(x, 10));
  const D = a.D;
  const share = a.share !== 0;
  const op = share ? 'gqa' : 'gqa_noshare';
  const gc = typeof global.gc === 'function' ? global.gc : () => {};
  const profDir = fs.mkdtempSync(path.join(require('os').tmpdir(), 'ort_decode_prof_'));
  process.on('exit', () => fs.rmSync(profDir, {recursive: true, force: true}));
  console.log(`# onnxruntime-node ${require('onnxruntime-node/package.json').version}, CPU EP, ` +
              `intraOpNumThreads ${a.threads}, spinning off, graph optimizations all, fp32, D ${D}, ` +
              `${share ? 'past/present share buffer' : 'separate present (ORT allocates it, copies past)'}, ` +
              `${a.warmup} warm-up + ${a.iters} timed calls, cold (rotating >= ${a.coldMib} MiB of K+V)`);
  console.log(`# ${'row'.padEnd(56)} ${'ms_median'.padStart(9)} ${'ms_min'.padStart(8)} ${'GB/s'.padStart(6)} ` +
              `${'run_ms'.padStart(8)} ${'sets'.padStart(4)} in_place`);
  let status = 0;
  let rowNo = 0;
  for (const [H, Hkv] of pairs) {
    for (const B of Bs) {
      for (const S of Ss) {
        const bytes = B * Hkv * S * D * 4 * 2;  // K and V, once
        const name = `ort/${op}/f32/H:${H}/Hkv:${Hkv}/S:${S}/D:${D}/B:${B}/threads:${a.threads}`;
        if (bytes > a.maxCacheMib * 1048576) {
          console.log(`# ${name}: skipped, K+V ${bytes / 1048576} MiB > --max-cache-mib ${a.maxCacheMib}`);
          continue;
        }
        const prefix = `row${rowNo++}`;
        const opts = Object.assign(sessionOptions(a.threads), {enableProfiling: true, profileFilePrefix: path.join(profDir, prefix)});
        const session = await ort.InferenceSession.create(modelPath(a.models, H, Hkv, D), opts);
        const nsets = Math.max(1, Math.ceil(a.coldMib * 1048576 / bytes));
        const seqlens = new Array(B).fill(S - 1);
        const rng = makeRng(1000 + S + 31 * B + 7 * H + Hkv);
        let sets = [];
        for (let i = 0; i < nsets; i++) sets.push(makeSet(B, H, Hkv, D, S, seqlens, rng, true, share));
        let k = 0;
        let inPlace = true;
        const runTimes = [];
        for (let i = 0; i < a.warmup + a.iters; i++) {
          const s = sets[k];
          k = (k + 1) % nsets;
          const t0 = process.hrtime.bigint();
          let res = await session.run(s.feeds, s.fetches);
          const t1 = process.hrtime.bigint();
          if (i >= a.warmup) runTimes.push(Number(t1 - t0) / 1e6);
          // the sets run in the warm-up must hold the new token's K and V at row S - 1
          if (i === a.warmup - 1 && share &&
              !sets.slice(0, Math.min(a.warmup, nsets)).every((x) => writtenInPlace(x, B, Hkv, D, S, seqlens))) {
            inPlace = false;
            status = 1;
            console.log(`# ${prefix}: ORT did not write the new K/V into the caller's cache buffer`);
          }
          res = null;  // onnxruntime-node's copies of present_key/value: free them before the next call
          gc();
        }
        session.endProfiling();
        await session.release();
        const kt = kernelTimesMs(profDir, prefix);
        if (kt.length !== a.warmup + a.iters) throw new Error(`${prefix}: ${kt.length} kernel events, expected ${a.warmup + a.iters}`);
        const times = kt.slice(a.warmup);
        const med = median(times), min = Math.min(...times);
        console.log(`${name.padEnd(58)} ${med.toFixed(3).padStart(9)} ${min.toFixed(3).padStart(8)} ` +
                    `${(bytes / (med * 1e6)).toFixed(1).padStart(6)} ${median(runTimes).toFixed(1).padStart(8)} ` +
                    `${String(nsets).padStart(4)} ${(share ? (inPlace ? 'yes' : 'NO') : '-').padStart(8)}`);
        sets = null;
        gc();
      }
    }
  }
  return status;
}

(async () => {
  const a = parseArgs(process.argv.slice(2));
  process.exitCode = a.mode === 'check' ? await runCheck(a) : await runTime(a);
})().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exitCode = 2;
});
