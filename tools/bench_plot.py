#!/usr/bin/env python3
"""Draw attn against libtorch: attention-core GFLOP/s against sequence length, from torch_bench JSON.

    python3 tools/bench_plot.py torch_1t.json torch_2t.json [--out bench/attention_gflops.png]

One panel per JSON file (per thread count), one line per implementation (attn, attn_batched,
torch_matmul, torch_sdpa, reference) over the sweep torch_bench runs for the plot: the core with
B = 1, 12 heads of D = 64, S = L, no mask, at L = 128 ... 4096 (and beyond where attn alone runs).
x: L on a log2 axis; y: GFLOP/s (4*H*L*S*D per call over wall-clock time). The dashed line is the
sgemm peak (--peak-1t, --peak-2t as in tools/bench_table.py); the dotted one, where the run has it,
the sgemm rate libtorch's BLAS reached in the same run (at::mm, N = 2048).

Needs matplotlib (Debian: python3-matplotlib, for /usr/bin/python3). Names and JSON are read with
tools/bench_table.py's parser.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_table  # noqa: E402  (tools/ is not a package)

SWEEP = {"B": "1", "H": "12", "D": "64", "causal": "0"}
STYLES = {  # implementation -> (label, matplotlib format)
    "attn": ("attn (public API, per head)", "o-"),
    "attn_batched": ("attn (all heads in one call)", "s-"),
    "torch_matmul": ("libtorch matmul/softmax/matmul", "^-"),
    "torch_sdpa": ("libtorch _scaled_dot_product_attention", "v-"),
    "reference": ("attn reference loops (1 thread)", "x:"),
}


def sweep_points(shapes):
    """{(impl, threads): [(L, GFLOP/s), ...]} for the sweep's shapes, sorted by L."""
    points = {}
    for (kernel, _dtype, args), runs in shapes.items():
        a = dict(args)
        if kernel != "sdpa" or any(a.get(k) != v for k, v in SWEEP.items()) or a.get("L") != a.get("S"):
            continue
        for (impl, threads), run in runs.items():
            if run.error is None and run.flops:
                points.setdefault((impl, threads), []).append((int(a["L"]), run.flops / 1e9))
    for series in points.values():
        series.sort()
    return points


def measured_sgemm(shapes, threads):
    for (kernel, _dtype, _args), runs in shapes.items():
        run = runs.get(("torch_mm", threads))
        if kernel == "sgemm" and run is not None and run.error is None and run.flops:
            return run.flops / 1e9
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="torch_bench JSON -> GFLOP/s against sequence length (PNG).")
    parser.add_argument("json", nargs="+", help="torch_bench --benchmark_out JSON files, one per thread count")
    parser.add_argument("--out", default="bench/attention_gflops.png", help="PNG to write")
    parser.add_argument("--peak-1t", type=float, help="sgemm GFLOP/s on 1 thread (default: the run's sgemm rows)")
    parser.add_argument("--peak-2t", type=float, help="sgemm GFLOP/s on 2 threads (default: the run's sgemm rows)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("bench_plot.py: needs matplotlib (Debian: apt-get install python3-matplotlib, "
                 "then run this with /usr/bin/python3)")

    shapes, contexts = bench_table.load_torch(args.json)
    points = sweep_points(shapes)
    threads = sorted({t for _, t in points})
    if not threads:
        sys.exit("bench_plot.py: no core sweep (sdpa B=1 H=12 D=64, S=L) in " + ", ".join(args.json))
    peaks = bench_table.measured_peaks(shapes)
    peaks.update({t: p for t, p in ((1, args.peak_1t), (2, args.peak_2t)) if p})
    if 1 not in peaks:
        sys.exit("bench_plot.py: no sgemm rows on 1 thread in " + ", ".join(args.json) + "; pass --peak-1t")

    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 5.4), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], threads):
        for impl in list(STYLES) + sorted({i for i, _ in points if i not in STYLES}):
            series = points.get((impl, t))
            if not series:
                continue
            label, fmt = STYLES.get(impl, (impl, ".-"))
            ax.plot([x for x, _ in series], [y for _, y in series], fmt, label=label)
        # The two sgemm lines differ per panel: labelled in place, not in the shared legend.
        peak = bench_table.sgemm_peak(t, peaks)
        ax.axhline(peak, linestyle="--", color="grey")
        ax.annotate(f"sgemm peak {peak:g}", (0.99, peak), xycoords=("axes fraction", "data"), ha="right",
                    va="bottom", fontsize="small", color="dimgrey").set_in_layout(False)
        sgemm = measured_sgemm(shapes, t)
        if sgemm is not None and abs(sgemm - peak) > 0.5:
            ax.axhline(sgemm, linestyle=":", color="grey")
            ax.annotate(f"libtorch sgemm, this run: {sgemm:.0f}", (0.99, sgemm), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize="small", color="dimgrey").set_in_layout(False)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (= S)")
        ax.set_title(f"{t} thread{'s' if t > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0, max([peak] + [y for (_, n), series in points.items() if n == t for _, y in series]) * 1.1)
    axes[0][0].set_ylabel("GFLOP/s (4·H·L·S·D per call)")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(5, len(handles)),
               fontsize="small", frameon=False)
    c = contexts[0][1]
    fig.suptitle(f"Attention core, fp32, B=1, 12 heads, D=64\nattn {c.get('attn_version', '?')} against "
                 f"libtorch {c.get('torch_version', '?')}, {c.get('num_cpus', '?')} CPUs, {c.get('date', '?')[:10]}",
                 fontsize="medium")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below
    fig.savefig(args.out, dpi=110)
    print(f"bench_plot.py: wrote {args.out}")


if __name__ == "__main__":
    main()
