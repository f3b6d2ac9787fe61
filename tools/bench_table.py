#!/usr/bin/env python3
"""Turn attn's Google Benchmark JSON into a markdown table: attn against the baseline, per shape.

    python3 tools/bench_table.py linear.json attention.json [--out bench/RESULTS.md]

The inputs are what `linear_bench` / `attention_bench --benchmark_out=FILE
--benchmark_out_format=json` (or `--benchmark_format=json` on stdout) write. Benchmarks are named
KERNEL/TYPE/IMPL/ARG:VALUE/..., e.g. mha/f32/attn/B:1/L:128/E:768/H:12/causal:0; one row pairs
the IMPLs (attn, baseline) of one KERNEL, TYPE and set of arguments.

Times are wall-clock time per iteration (attn runs threads; the baseline one); GFLOP/s
comes from the benchmarks' "flops" rate counter. speed-up = baseline time / attn time, so above 1
means attn is faster. With --benchmark_repetitions the median is used.

The table always goes to stdout. With --out FILE it also replaces the text between the lines
<!-- bench_table:begin --> and <!-- bench_table:end --> in FILE, keeping the rest of it; a FILE
that does not exist yet is created holding just the table.

torch_bench JSON (its context names torch_version; tools/bench_torch.sh makes one per thread
count) gets its own tables instead, one per shape: every implementation (attn, attn_batched,
reference, torch_*) at every thread count, with GFLOP/s as a fraction of an sgemm peak
(--peak-1t, --peak-2t; n threads otherwise count n times --peak-1t), the speed against the
fastest libtorch implementation at the same thread count, and peak memory. --out puts them
between <!-- bench_table_torch:begin --> and <!-- bench_table_torch:end -->. Both kinds of
JSON may be given in one call; each goes to its own section.

Python 3 standard library only.
"""

import argparse
import json
import os
import statistics
import sys

BEGIN = "<!-- bench_table:begin -->"
END = "<!-- bench_table:end -->"
TORCH_BEGIN = "<!-- bench_table_torch:begin -->"
TORCH_END = "<!-- bench_table_torch:end -->"

# Name parts Google Benchmark appends that describe the run, not the shape.
RUN_OPTIONS = {"iterations", "min_time", "min_warmup_time", "repeats", "threads",
               "real_time", "manual_time", "process_time"}
KERNEL_TITLES = {"linear": "Linear", "sdpa": "SDPA", "mha": "MHA", "sgemm": "sgemm"}
MEMORY_COUNTERS = ("peak_MiB", "base_MiB", "inputs_MiB")
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
REFERENCE = "attn"


class Run:
    """One benchmark's result: seconds per iteration, FLOP/s (or None), memory counters, or an error."""

    def __init__(self, seconds=None, flops=None, error=None, memory=None):
        self.seconds, self.flops, self.error = seconds, flops, error
        self.memory = memory or {}


def parse_name(name):
    """'mha/f32/attn/B:1/L:128/min_time:0.200' -> ('mha', 'f32', 'attn', (('B', '1'), ('L', '128')))."""
    parts = name.split("/")
    if len(parts) < 3:
        return None
    kernel, dtype, impl = parts[:3]
    args = []
    for part in parts[3:]:
        key, _, value = part.partition(":")
        if key not in RUN_OPTIONS:
            args.append((key, value))
    return kernel, dtype, impl, tuple(args)


def entry_run(entry):
    if entry.get("error_occurred"):
        return Run(error=entry.get("error_message", "error"))
    seconds = entry["real_time"] * UNIT_SECONDS[entry.get("time_unit", "ns")]  # wall clock: attn runs threads
    return Run(seconds=seconds, flops=entry.get("flops"),
               memory={k: entry[k] for k in MEMORY_COUNTERS if k in entry})


def load(paths):
    """Returns (rows, contexts): rows maps (kernel, dtype, args) -> {impl: Run}, in first-seen order."""
    rows, contexts = {}, []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # missing, or cut short by an aborted run
            sys.exit(f"bench_table.py: cannot read {path}: {e}")
        contexts.append((path, data.get("context", {})))
        iterations, medians = {}, {}
        for entry in data.get("benchmarks", []):
            name = entry.get("run_name", entry["name"])
            if entry.get("run_type") == "aggregate":
                if entry.get("aggregate_name") == "median":
                    medians[name] = entry_run(entry)
            else:
                iterations.setdefault(name, []).append(entry_run(entry))
        for name in list(iterations) + [n for n in medians if n not in iterations]:
            parsed = parse_name(name)
            if parsed is None:
                continue
            kernel, dtype, impl, args = parsed
            if name in medians:
                run = medians[name]
            else:
                runs = iterations[name]
                ok = [r for r in runs if r.error is None]
                if ok:  # repetitions without aggregates: the median repetition
                    ok.sort(key=lambda r: r.seconds)
                    run = ok[(len(ok) - 1) // 2]
                else:
                    run = runs[0]
            rows.setdefault((kernel, dtype, args), {})[impl] = run
    return rows, contexts


def fmt_time(seconds):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            v = seconds / scale
            digits = 0 if v >= 100 else 1 if v >= 10 else 2
            return f"{v:.{digits}f} {unit}"
    return "?"


def fmt_shape(args):
    words = []
    for key, value in args:
        if key == "causal":
            if value not in ("", "0"):
                words.append("causal")
        else:
            words.append(f"{key}={value}")
    return " ".join(words)


def cell(run):
    """(time, GFLOP/s) cells for one implementation."""
    if run is None:
        return "-", "-"
    if run.error is not None:
        return "error", "-"
    gflops = f"{run.flops / 1e9:.1f}" if run.flops is not None else "-"
    return fmt_time(run.seconds), gflops


def speedup(attn, other):
    if attn is None or other is None or attn.error or other.error or not attn.seconds:
        return "-"
    return f"{other.seconds / attn.seconds:.2f}x"


def table(rows):
    impls = []
    for runs in rows.values():
        for impl in runs:
            if impl not in impls:
                impls.append(impl)
    others = [i for i in impls if i != REFERENCE]
    shown = ([REFERENCE] if REFERENCE in impls else []) + others

    header = ["kernel", "type", "shape"]
    for impl in shown:
        header += [impl, f"{impl} GFLOP/s"]
    if REFERENCE in impls:
        header += ["speed-up" if len(others) == 1 else f"speed-up vs {o}" for o in others]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for (kernel, dtype, args), runs in rows.items():
        line = [KERNEL_TITLES.get(kernel, kernel), dtype, fmt_shape(args)]
        for impl in shown:
            line += cell(runs.get(impl))
        if REFERENCE in impls:
            line += [speedup(runs.get(REFERENCE), runs.get(o)) for o in others]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def describe(contexts):
    """One line per input file: when, where, and how it was built."""
    lines = []
    for path, c in contexts:
        load_avg = ", ".join(f"{x:.2f}" for x in c.get("load_avg", []))
        bits = [f"`{os.path.basename(c.get('executable', path))}`", c.get("date", "?"),
                f"{c.get('num_cpus', '?')} CPUs at {c.get('mhz_per_cpu', '?')} MHz",
                f"load average {load_avg or '?'}"]
        if "eigen_version" in c:
            bits.append(f"Eigen {c['eigen_version']} ({c.get('eigen_simd', '?')}), "
                        f"Eigen {c.get('eigen_threads', '?')} thread(s), attn {c.get('attn_threads', '?')}")
        if "compiler" in c:
            bits.append(c["compiler"])
        lines.append("- " + "; ".join(bits))
        if c.get("attn_build", "release") != "release":
            lines.append(f"- **WARNING: {path}: {c['attn_build']}**")
    return "\n".join(lines)


def render(rows, contexts):
    return (table(rows) + "\n\nTimes are wall-clock time per call; speed-up = baseline time / attn time "
            "(above 1: attn is faster).\n\n" + describe(contexts) + "\n")


# --- torch_bench: attn against libtorch -------------------------------------------------------

TORCH_IMPL_NOTES = {
    "attn": "attn's public API (SDPA: one forward_into per head)",
    "attn_batched": "attn's kernel on all heads in one call (as MultiHeadAttention runs it)",
    "reference": "attn's plain-loop reference, one thread",
    "torch_matmul": "matmul, softmax, matmul",
    "torch_sdpa": "at::_scaled_dot_product_attention",
    "torch_mha": "torch::nn::MultiheadAttention",
    "torch_native_mha": "at::_native_multi_head_attention",
    "torch_mm": "at::mm (libtorch's BLAS)",
    "eigen": "Eigen's GEMM (what attn builds on)",
}


def is_torch_json(context):
    return "torch_version" in context


def file_threads(context):
    try:
        return int(context.get("attn_threads", 0))
    except ValueError:
        return 0


def load_torch(paths):
    """Returns (shapes, contexts): shapes maps (kernel, dtype, args) -> {(impl, threads): Run}."""
    shapes, contexts = {}, []
    for path in paths:
        rows, ctx = load([path])
        contexts += ctx
        threads = file_threads(ctx[0][1])
        for key, runs in rows.items():
            for impl, run in runs.items():
                shapes.setdefault(key, {})[(impl, threads)] = run
    return shapes, contexts


def measured_peaks(shapes):
    """threads -> the fastest sgemm row's GFLOP/s at that thread count (torch_mm or Eigen), so that
    every "of sgemm peak" figure is a ratio between two measurements of one run."""
    peaks = {}
    for (kernel, _, _), runs in shapes.items():
        if kernel != "sgemm":
            continue
        for (_, t), run in runs.items():
            if run.error is None and run.flops:
                peaks[t] = max(peaks.get(t, 0.0), run.flops / 1e9)
    return peaks


def sgemm_peak(threads, peaks):
    """GFLOP/s that `threads` threads' sgemm reaches: the option for that count, else n x one thread's."""
    return peaks.get(threads) or peaks[1] * threads


def fmt_ms(seconds):
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def torch_shape_table(runs, peaks):
    impls, threads = [], sorted({t for _, t in runs})
    for impl, _ in runs:
        if impl not in impls:
            impls.append(impl)
    best = {}  # threads -> fastest libtorch time
    for (impl, t), run in runs.items():
        if impl.startswith("torch") and run.error is None and run.seconds:
            best[t] = min(best.get(t, run.seconds), run.seconds)
    lines = ["| implementation | threads | time ms | GFLOP/s | of sgemm peak | vs libtorch best | peak MiB "
             "| above base MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for t in threads:
        for impl in impls:
            run = runs.get((impl, t))
            if run is None:
                continue
            if run.error is not None:
                note = run.error if run.error.startswith("skipped") else f"error: {run.error}"
                if note not in notes:
                    notes.append(note)
                lines.append(f"| {impl} | {t} | {note.split(':')[0]} [{notes.index(note) + 1}] | - | - | - | - | - |")
                continue
            gflops = run.flops / 1e9 if run.flops else None
            mem = run.memory
            peak = f"{mem['peak_MiB']:.0f}" if "peak_MiB" in mem else "-"
            above = f"{mem['peak_MiB'] - mem['base_MiB']:.0f}" if "peak_MiB" in mem and "base_MiB" in mem else "-"
            lines.append("| " + " | ".join([
                impl, str(t), fmt_ms(run.seconds),
                f"{gflops:.1f}" if gflops is not None else "-",
                f"{100 * gflops / sgemm_peak(t, peaks):.0f} %" if gflops is not None else "-",
                f"{best[t] / run.seconds:.2f}x" if t in best else "-",
                peak, above]) + " |")
    return "\n".join(lines), notes


def inputs_mib(runs):
    values = [r.memory["inputs_MiB"] for (impl, _), r in runs.items()
              if "inputs_MiB" in r.memory and not impl.startswith("torch")]
    values = values or [r.memory["inputs_MiB"] for r in runs.values() if "inputs_MiB" in r.memory]
    return min(values) if values else None


def describe_torch(contexts):
    lines = [describe(contexts)]
    seen = set()
    for _, c in contexts:
        bits = (f"libtorch {c.get('torch_version', '?')}", f"BLAS {c.get('torch_blas', '?')}",
                f"CPU capability {c.get('torch_cpu_capability', '?')}",
                f"OMP_WAIT_POLICY {c.get('omp_wait_policy', '?')}")
        line = "- " + "; ".join(bits)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def render_torch(shapes, contexts, peaks):
    out = []
    for (kernel, dtype, args), runs in shapes.items():
        title = f"{KERNEL_TITLES.get(kernel, kernel)} {dtype} {fmt_shape(args)}"
        mib = inputs_mib(runs)
        out.append(f"**{title}**" + (f" (inputs {mib:.1f} MiB)" if mib is not None else ""))
        out.append("")
        table_text, notes = torch_shape_table(runs, peaks)
        out.append(table_text)
        for i, note in enumerate(notes):
            out.append(f"\n[{i + 1}] {note}")
        out.append("")
    peak_text = ", ".join(f"{t} thread{'s' if t > 1 else ''} {p:g}" for t, p in sorted(peaks.items()))
    out.append(
        "Times are wall-clock time per call. *of sgemm peak*: GFLOP/s over an sgemm peak of " + peak_text
        + " GFLOP/s (the fastest sgemm row of this run unless given with --peak-1t/--peak-2t). *vs libtorch best*: the fastest "
        "libtorch implementation's time at the same thread count over this row's time (above 1: faster "
        "than libtorch). *peak MiB*: the process's peak RSS (VmHWM, reset before each benchmark); "
        "*above base*: peak minus the RSS before the benchmark's inputs existed (inputs, outputs, "
        "workspace). Causal rows count the full L*S FLOPs (effective GFLOP/s).")
    used = [i for i in TORCH_IMPL_NOTES if any(i == impl for runs in shapes.values() for impl, _ in runs)]
    out.append("")
    out.append("; ".join(f"`{i}`: {TORCH_IMPL_NOTES[i]}" for i in used) + ".")
    out.append("")
    out.append(describe_torch(contexts))
    return "\n".join(out) + "\n"


def write_into(path, text, begin=BEGIN, end=END):
    block = f"{begin}\n{text}{end}\n"
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(block)
        return
    with open(path, encoding="utf-8") as f:
        old = f.read()
    start, stop = old.find(begin), old.find(end)
    if start < 0 or stop < start:
        sys.exit(f"bench_table.py: {path} has no {begin} ... {end} section; not overwriting it")
    rest = old[stop + len(end):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(old[:start] + block + ("\n" + rest.lstrip("\n") if rest.strip() else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Google Benchmark JSON -> markdown table (attn vs baseline).")
    parser.add_argument("json", nargs="+", help="--benchmark_out JSON files from bench/")
    parser.add_argument("--out",
                        help="file whose bench_table (and bench_table_torch) section is replaced with the table")
    parser.add_argument("--peak-1t", type=float,
                        help="sgemm GFLOP/s on 1 thread (torch_bench tables; default: the run's own sgemm rows)")
    parser.add_argument("--peak-2t", type=float,
                        help="sgemm GFLOP/s on 2 threads (torch_bench tables; default: the run's own sgemm rows)")
    args = parser.parse_args(argv)
    torch_paths, other_paths = [], []
    for path in args.json:
        _, contexts = load([path])
        (torch_paths if is_torch_json(contexts[0][1]) else other_paths).append(path)
    if other_paths:
        rows, contexts = load(other_paths)
        if not rows:
            sys.exit("bench_table.py: no benchmarks named KERNEL/TYPE/IMPL/... in " + ", ".join(other_paths))
        text = render(rows, contexts)
        sys.stdout.write(text)
        if args.out:
            write_into(args.out, text)
    if torch_paths:
        shapes, contexts = load_torch(torch_paths)
        if not shapes:
            sys.exit("bench_table.py: no benchmarks named KERNEL/TYPE/IMPL/... in " + ", ".join(torch_paths))
        peaks = measured_peaks(shapes)
        peaks.update({t: p for t, p in ((1, args.peak_1t), (2, args.peak_2t)) if p})
        if 1 not in peaks:
            sys.exit("bench_table.py: no sgemm rows on 1 thread in the torch JSON; pass --peak-1t")
        text = render_torch(shapes, contexts, peaks)
        sys.stdout.write(("\n" if other_paths else "") + text)
        if args.out:
            write_into(args.out, text, TORCH_BEGIN, TORCH_END)


if __name__ == "__main__":
    main()
