"""Draw the figures of docs/benchmarks.md from the JSON files in benchmarks/results.

Each figure is made only from committed result files, so anyone can redraw
them, or draw a GPU run's, without measuring again:

- ``compare-<device>.json`` gives ``compare-time-<device>.png`` (cost of a
  trace in gradients) and ``compare-memory-<device>.png`` (peak memory in
  gradients);
- ``product-cost-<device>.json`` gives ``product-cost-<device>.png`` (cost of
  one product against the probes per block).

``estimator_accuracy.py`` draws its own figure.

Usage::

    python benchmarks/plot.py            # every result file found
    python benchmarks/plot.py --results benchmarks/results --figures docs/figures
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import cost_in_gradients  # noqa: E402

COLORS = {"gradients": "0.6", "hutch": "tab:blue", "raw": "tab:green", "peer": "tab:orange"}


def family(method: str) -> str:
    return method.split(":")[0]


def label(record: dict) -> str:
    return record["method"] + (" (workaround)" if record.get("workaround") else "")


def plot_compare(payload: dict, key, xlabel: str, path: Path) -> None:
    """Draw one horizontal bar panel per workload of ``key(record)``, with failures written as text."""
    results = payload["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.8), sharey=True, squeeze=False)
    labels = []
    for result in results:
        for record in result["records"]:
            if label(record) not in labels:
                labels.append(label(record))

    for ax, result in zip(axes[0], results):
        by_label = {label(r): r for r in result["records"]}
        for y, name in enumerate(labels):
            record = by_label.get(name)
            if record is None:
                continue
            if record["status"] != "ok":
                ax.text(1.0, y, record["status"], va="center", fontsize=8, color="tab:red")
                continue
            value = key(record)
            ax.barh(y, value, color=COLORS[family(record["method"])])
            ax.text(value, y, f" {value:.2g}", va="center", fontsize=7)
        ax.set_xscale("log")
        values = [key(r) for r in result["records"] if r["status"] == "ok"]
        ax.set_xlim(min(0.3, min(values, default=1) / 1.5), max(values, default=1) * 3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(result["workload"], fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.axvline(1.0, color="0.3", linewidth=0.8, linestyle=":")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(machine_line(payload), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_product_cost(payload: dict, path: Path) -> None:
    results = payload["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results):
        ok = [r for r in result["records"] if r["status"] == "ok" and r["method"] != "gradients"]
        for index, method in enumerate(dict.fromkeys(r["method"] for r in ok)):
            records = sorted((r for r in ok if r["method"] == method), key=lambda r: r["chunk"] or 0)
            color = f"C{index}"
            if records[0]["chunk"] is None:
                ax.axhline(cost_in_gradients(records[0]), color=color, linestyle="--", linewidth=1, label=f"{method} (per probe)")
            else:
                marker = "o" if method.startswith("hutch") else "s"
                ax.plot([r["chunk"] for r in records], [cost_in_gradients(r) for r in records],
                        marker=marker, color=color, label=method, alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("probes per block")
        ax.set_ylabel("one product, in gradients")
        ax.set_title(result["workload"], fontsize=10)
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.suptitle(machine_line(payload), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_line(payload: dict) -> str:
    env = payload["environment"]
    threads = sorted({str(r.get("threads") or env["threads"]) for res in payload.get("results", []) for r in res.get("records", [])})
    where = env["gpu"] or f"{env['cpu']}, {env['cpu_count']} cores, threads {'/'.join(threads) or env['threads']}"
    return f"{where}; torch {env['torch']}; hutch {env['hutch']} ({env.get('hutch_commit')})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results", help="folder of result JSON files")
    parser.add_argument("--figures", type=Path, default=BENCH_DIR.parent / "docs" / "figures",
                        help="folder the PNG files are written to")
    args = parser.parse_args(argv)
    args.figures.mkdir(parents=True, exist_ok=True)

    written = []
    for source in sorted(args.results.glob("*.json")):
        payload = json.loads(source.read_text())
        stem = source.stem
        if stem.startswith("compare-"):
            device = stem.removeprefix("compare-")
            plot_compare(payload, cost_in_gradients, "trace time / time of as many gradients",
                         args.figures / f"compare-time-{device}.png")
            plot_compare(payload, lambda r: r["peak_extra_gradients"], "peak extra memory / one gradient's bytes",
                         args.figures / f"compare-memory-{device}.png")
            written += [f"compare-time-{device}.png", f"compare-memory-{device}.png"]
        elif stem.startswith("product-cost-"):
            plot_product_cost(payload, args.figures / f"{stem}.png")
            written.append(f"{stem}.png")
    for name in written:
        print(args.figures / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
