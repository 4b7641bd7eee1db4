"""Cost of one Hessian-vector product, in gradients, per HVP path and probes per block.

The vectorized paths (``raw:vmap-jvp``, ``raw:double-backward-batched`` and
hutch's operator through its ``batch_size``) run once for each block size in
``--chunks``. The per-probe loops (``raw:jvp-loop``, ``raw:linearize``,
``raw:double-backward``) run once. Each configuration is one Hutchinson trace of
``--num-matvecs`` products in its own process, as in ``compare.py``; the
cost of one product is its time divided by the time of as many gradients
timed alternately with it,
and the memory is the peak above the workload, in gradients' bytes.

Usage::

    python benchmarks/product_cost.py --workloads mlp,cnn,transformer --chunks 1,10,50
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import common
import paths
import workloads

logger = logging.getLogger("hutch.benchmarks")

VECTORIZED = ("raw:vmap-jvp", "raw:double-backward-batched")
LOOPS = ("raw:jvp-loop", "raw:linearize", "raw:double-backward")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,transformer",
                        help=f"comma-separated subset of {','.join(workloads.WORKLOAD_NAMES)}")
    parser.add_argument("--chunks", default="1,10,50", help="comma-separated probes per vectorized block")
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--num-matvecs", type=int, default=50, help="products per timed run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workloads and the probes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's")
    parser.add_argument("--memory-limit-gib", type=float, default=10.0,
                        help="CPU only: address space a configuration may add before it fails as out of memory")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a configuration is stopped")
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results",
                        help="folder for product-cost-<device>.json and .md")
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.chunks = [int(c) for c in args.chunks.split(",")]
    return args


def configurations(chunks: list[int]) -> list[tuple[str, int | None]]:
    """Return (method, chunk) pairs: gradients, the loops once, vectorized paths per chunk."""
    hutch_paths = [m for m in paths.method_table() if m.startswith("hutch:") and m != "hutch:auto"]
    pairs = [("gradients", None)] + [(m, None) for m in LOOPS]
    for chunk in chunks:
        pairs += [(m, chunk) for m in VECTORIZED + tuple(hutch_paths)]
    return pairs


def to_markdown(payload: dict) -> str:
    parts = [f"Machine: {common.describe_machine(payload['environment'])}.", "",
             "Cost of one product in gradients (peak memory above the workload in gradients, in brackets):", ""]
    for result in payload["results"]:
        chunks = sorted({r["chunk"] for r in result["records"] if r["chunk"] is not None})
        methods = []
        for r in result["records"]:
            if r["method"] != "gradients" and r["method"] not in methods:
                methods.append(r["method"])
        rows = []
        for method in methods:
            cells = []
            for chunk in [None] + chunks:
                record = next((r for r in result["records"] if r["method"] == method and r["chunk"] == chunk), None)
                if record is None:
                    cells.append("-")
                elif record["status"] != "ok":
                    cells.append(record["status"])
                else:
                    cells.append(f"{common.cost_in_gradients(record):.2f} ({record['peak_extra_gradients']:.0f})")
            rows.append([method] + cells)
        header = ["method", "per probe"] + [f"block of {c}" for c in chunks]
        parts += [f"{result['workload']}: {workloads.DESCRIPTIONS[result['workload']]}", "",
                  common.markdown_table(header, rows), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    env = common.environment(args.device, args.threads)
    payload = common.new_payload(env, args)
    stem = f"product-cost-{args.device.replace(':', '')}"

    for name in args.workloads:
        records = []
        for method, chunk in configurations(args.chunks):
            spec = {"workload": name, "method": method, "chunk": chunk, "device": args.device,
                    "num_matvecs": args.num_matvecs, "repeats": args.repeats,
                    "warmup_matvecs": min(chunk or 2, args.num_matvecs), "seed": args.seed,
                    "threads": args.threads, "memory_limit_gib": args.memory_limit_gib}
            logger.info("%s: %s, chunk %s", name, method, chunk)
            records.append(common.run_in_child(spec, args.timeout))
        payload["results"].append({"workload": name, "records": records})
        common.save_results(payload, args.out, stem, to_markdown)
    print(to_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
