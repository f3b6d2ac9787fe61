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

Python 3 standard library only.
"""

import argparse
import json
import os
import statistics
import sys

BEGIN = "<!-- bench_table:begin -->"
END = "<!-- bench_table:end -->"

# Name parts Google Benchmark appends that describe the run, not the shape.
RUN_OPTIONS = {"iterations", "min_time", "min_warmup_time", "repeats", "threads",
               "real_time", "manual_time", "process_time"}
KERNEL_TITLES = {"linear": "Linear", "sdpa": "SDPA", "mha": "MHA"}
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
REFERENCE = "attn"


class Run:
    """One benchmark's result: seconds per iteration, FLOP/s (or None), or an error."""

    def __init__(self, seconds=None, flops=None, error=None):
        self.seconds, self.flops, self.error = seconds, flops, error


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
    return Run(seconds=seconds, flops=entry.get("flops"))


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


def write_into(path, text):
    block = f"{BEGIN}\n{text}{END}\n"
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(block)
        return
    with open(path, encoding="utf-8") as f:
        old = f.read()
    start, stop = old.find(BEGIN), old.find(END)
    if start < 0 or stop < start:
        sys.exit(f"bench_table.py: {path} has no {BEGIN} ... {END} section; not overwriting it")
    rest = old[stop + len(END):]
    with open(path, "w", encoding="utf-8") as f:
        f.write(old[:start] + block + ("\n" + rest.lstrip("\n") if rest.strip() else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Google Benchmark JSON -> markdown table (attn vs baseline).")
    parser.add_argument("json", nargs="+", help="--benchmark_out JSON files from bench/")
    parser.add_argument("--out", help="file whose bench_table section is replaced with the table")
    args = parser.parse_args(argv)
    rows, contexts = load(args.json)
    if not rows:
        sys.exit("bench_table.py: no benchmarks named KERNEL/TYPE/IMPL/... in " + ", ".join(args.json))
    text = render(rows, contexts)
    sys.stdout.write(text)
    if args.out:
        write_into(args.out, text)


if __name__ == "__main__":
    main()
