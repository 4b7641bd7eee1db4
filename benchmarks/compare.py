"""Time and memory of a Hutchinson trace: hutch, raw HVP paths and peer libraries, side by side.

For each workload this runs, each configuration in its own process and all
in one invocation of this script:

- ``gradients``: ``num_matvecs`` plain gradients, the unit of time;
- ``hutch:*``: :func:`hutch.hutchinson` on a :class:`hutch.HessianOperator`,
  once per value of the operator's ``hvp`` keyword, and once as
  ``hutch:low-memory`` with the data in micro-batches and a memory budget of
  a few gradients;
- ``raw:*``: the candidate HVP paths of ``paths.py``;
- ``peer:*``: PyHessian, curvlinops and hessian-eigenthings, when installed
  (``pip install -e ".[bench]"``).

Every method spends the same ``num_matvecs`` Rademacher probes from the same
seed. Each of ``repeats`` timed runs, after one warm-up, follows a timing of
``num_matvecs`` gradients in the same process. Cost is the fastest run over
the fastest gradient timing. Memory is the peak above the
workload's own footprint, divided by one gradient's bytes. A last pass checks
each product path against double backward in float64.

Usage::

    python benchmarks/compare.py --workloads mlp,cnn,transformer --repeats 5
    python benchmarks/compare.py --workloads resnet18 --repeats 1 --resnet18-matvecs 100
    python benchmarks/compare.py --device cuda   # GPU variant, same tables

On Linux, glibc keeps freed blocks below its mmap threshold for reuse, and
raises that threshold as large blocks are freed, so the resident set also
counts memory that no tensor holds. ``--malloc-mmap-threshold 65536`` fixes
the threshold in every measuring process, so freed tensors go back to the
operating system and the peak tracks live memory; each table names the
setting that produced it.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

import common
import paths
import workloads

logger = logging.getLogger("hutch.benchmarks")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOAD_NAMES),
                        help=f"comma-separated subset of {','.join(workloads.WORKLOAD_NAMES)}")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names or prefixes (hutch, raw, peer); default: all")
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median reported)")
    parser.add_argument("--num-matvecs", type=int, default=100, help="Hessian-vector products per trace")
    parser.add_argument("--resnet18-matvecs", type=int, default=None,
                        help="products per trace on resnet18; default: --num-matvecs")
    parser.add_argument("--resnet18-repeats", type=int, default=None,
                        help="timed runs on resnet18; default: --repeats")
    parser.add_argument("--resnet18-threads", type=int, default=None,
                        help="torch threads on resnet18; default: --threads")
    parser.add_argument("--resnet18-unit-gradients", type=int, default=20,
                        help="gradients timed before each resnet18 run, scaled to its matvecs")
    parser.add_argument("--warmup-matvecs", type=int, default=10, help="products in the untimed warm-up run")
    parser.add_argument("--resnet18-warmup-matvecs", type=int, default=2,
                        help="products in the untimed warm-up run on resnet18")
    parser.add_argument("--chunk", type=int, default=10, help="probes per vectorized block for chunked raw paths")
    parser.add_argument("--accuracy-probes", type=int, default=3,
                        help="probes for the float64 check against double backward; 0 skips it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workloads and the probes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's")
    parser.add_argument("--memory-limit-gib", type=float, default=10.0,
                        help="CPU only: address space a configuration may add before it fails as out of memory")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None,
                        help="bytes; sets glibc's MALLOC_MMAP_THRESHOLD_ in every measuring process, so "
                             "freed large blocks go back to the OS and the resident set tracks live memory")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a configuration is stopped")
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results",
                        help="folder for compare-<device>.json and compare-<device>.md")
    parser.add_argument("--tag", default="",
                        help="suffix of the output file names, as in compare-<device>-<tag>.json")
    parser.add_argument("--render", type=Path, default=None,
                        help="write the markdown tables of this result JSON file beside it, and measure nothing")
    args = parser.parse_args(argv)
    args.workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = sorted(set(args.workloads) - set(workloads.WORKLOAD_NAMES))
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; choose from {list(workloads.WORKLOAD_NAMES)}")
    return args


def selected_methods(filters: str) -> list[str]:
    """Return the method names starting with one of the comma-separated ``filters``, always with ``gradients``."""
    names = list(paths.method_table())
    if not filters:
        return names
    prefixes = [f.strip() for f in filters.split(",") if f.strip()]
    return [n for n in names if n == "gradients" or any(n.startswith(prefix) for prefix in prefixes)]


def peer_installed(method: str) -> bool:
    module = paths.PEERS[method][0]
    return importlib.util.find_spec(module) is not None


def run_workload(name: str, methods: list[str], args) -> dict:
    is_large = name == "resnet18"
    num_matvecs = (args.resnet18_matvecs if is_large and args.resnet18_matvecs else args.num_matvecs)
    repeats = (args.resnet18_repeats if is_large and args.resnet18_repeats else args.repeats)
    base = {
        "workload": name, "device": args.device, "num_matvecs": num_matvecs, "repeats": repeats,
        "warmup_matvecs": min(args.resnet18_warmup_matvecs if is_large else args.warmup_matvecs, num_matvecs), "seed": args.seed,
        "threads": (args.resnet18_threads or args.threads) if is_large else args.threads,
        "memory_limit_gib": args.memory_limit_gib,
        "unit_gradients": min(args.resnet18_unit_gradients, num_matvecs) if is_large else num_matvecs,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
    }
    records = []

    for method in methods:
        if method.startswith("peer:") and not peer_installed(method):
            records.append({**base, "method": method, "status": "not installed",
                            "error": 'install the peers with pip install -e ".[bench]"'})
            continue
        chunk = args.chunk if method.startswith("raw:") else None
        logger.info("%s: %s", name, method)
        record = common.run_in_child({**base, "method": method, "chunk": chunk}, args.timeout)
        records.append(record)
        logger.info("  %s %s", record["status"], f"{record.get('time_s', 0):.2f} s" if record["status"] == "ok" else record.get("error", ""))

        # curvlinops multiplies all probes in one vmap. When that does not fit, the
        # estimate is rerun in calls of --chunk probes and reported as a workaround.
        if method == "peer:curvlinops" and record["status"] != "ok":
            logger.info("%s: %s in calls of %d probes", name, method, args.chunk)
            retry = common.run_in_child({**base, "method": method, "chunk": args.chunk}, args.timeout)
            retry["workaround"] = f"{num_matvecs // args.chunk} calls of {args.chunk} probes"
            records.append(retry)

    accuracy = None
    if args.accuracy_probes > 0:
        logger.info("%s: float64 agreement with double backward", name)
        accuracy = common.run_in_child(
            {"kind": "accuracy", "workload": name, "device": args.device, "num_matvecs": args.accuracy_probes,
             "seed": args.seed, "memory_limit_gib": args.memory_limit_gib}, args.timeout)
    return {"workload": name, "description": workloads.DESCRIPTIONS[name], "records": records, "accuracy": accuracy}


# --- tables ------------------------------------------------------------------


def label(record: dict) -> str:
    return record["method"] + (" (workaround)" if record.get("workaround") else "")


def ratio_cell(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"]
    return f"{common.cost_in_gradients(record):.2f} ({min(record['times_s']):.2f} s)"


def memory_cell(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"]
    return f"{record['peak_extra_gradients']:.1f} ({record['peak_extra_bytes'] / 2**20:.0f} MiB)"


def to_markdown(payload: dict) -> str:
    results = payload["results"]
    names = [r["workload"] for r in results]
    methods = []
    for result in results:
        for record in result["records"]:
            if label(record) not in methods:
                methods.append(label(record))
    by_label = {r["workload"]: {label(rec): rec for rec in r["records"]} for r in results}

    parts = [f"Machine: {common.describe_machine(payload['environment'])}.", ""]
    matvecs = "; ".join(
        f"{r['workload']} {r['records'][0]['num_matvecs']} matvecs x {r['records'][0]['repeats']} repeats, "
        f"torch threads {r['records'][0]['threads'] or 'default'}" for r in results)
    threshold = payload["args"].get("malloc_mmap_threshold")
    allocator = (f"; glibc MALLOC_MMAP_THRESHOLD_={threshold}" if threshold
                 else "; glibc's default allocator settings")
    parts += [f"Budget: {matvecs}; seed {payload['args']['seed']}{allocator}.", ""]

    parts += ["Time of one Hutchinson trace over the time of as many gradients, timed alternately in "
              "the same process, fastest run of each (seconds of the fastest trace in brackets):", ""]
    rows = [[m] + [ratio_cell(by_label[n][m]) if m in by_label[n] else "-" for n in names] for m in methods]
    parts += [common.markdown_table(["method"] + names, rows), ""]

    parts += ["Peak memory above the model and data, in units of one gradient's bytes (MiB in brackets):", ""]
    rows = [[m] + [memory_cell(by_label[n][m]) if m in by_label[n] else "-" for n in names] for m in methods]
    parts += [common.markdown_table(["method"] + names, rows), ""]

    parts += ["hutch's cost over PyHessian's, both in gradients, measured in the same run:", ""]
    rows = []
    for m in methods:
        if not m.startswith("hutch:"):
            continue
        cells = []
        for n in names:
            ours, peer = by_label[n].get(m), by_label[n].get("peer:pyhessian")
            ok = ours and peer and ours["status"] == "ok" and peer["status"] == "ok"
            cells.append(f"{common.cost_in_gradients(ours) / common.cost_in_gradients(peer):.2f}" if ok else "-")
        rows.append([m] + cells)
    parts += [common.markdown_table(["method"] + names, rows), ""]

    parts += ["Trace estimates (each method draws its probes its own way from the same seed):", ""]
    rows = [[m] + [f"{by_label[n][m]['value']:.5g}" if m in by_label[n] and by_label[n][m]["status"] == "ok" and m != "gradients" else "-" for n in names]
            for m in methods if m != "gradients"]
    parts += [common.markdown_table(["method"] + names, rows), ""]

    paths_seen = []
    for r in results:
        for key in (r["accuracy"] or {}).get("relative_error", {}):
            if key not in paths_seen:
                paths_seen.append(key)
    if paths_seen:
        parts += ["Largest relative error of H z against double backward in float64:", ""]
    rows = []
    for key in paths_seen:
        cells = []
        for r in results:
            acc = r["accuracy"] or {}
            if key in acc.get("relative_error", {}):
                cells.append(f"{acc['relative_error'][key]:.1e}")
            else:
                cells.append(acc.get("failures", {}).get(key, "-"))
        rows.append([key] + cells)
    if paths_seen:
        parts += [common.markdown_table(["path"] + names, rows), ""]

    notes = []
    for r in results:
        for record in r["records"]:
            if record["status"] != "ok":
                notes.append(f"- {r['workload']}, {label(record)}: {record['status']}: {record.get('error', '')}")
            if record.get("rerun"):
                notes.append(f"- {r['workload']}, {label(record)}: {record['rerun']}")
            if record.get("workaround"):
                notes.append(f"- {r['workload']}, {label(record)}: {record['workaround']}")
            hvp = (record.get("info") or {}).get("hvp_path")
            if hvp:
                settings = record["info"].get("settings")
                notes.append(f"- {r['workload']}, {record['method']}: operator reported hvp_path={hvp!r}, "
                             f"batch_size={record['info'].get('batch_size')}" + (f"; {settings}" if settings else ""))
    if notes:
        parts += ["Notes:", ""] + notes + [""]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.render is not None:
        return common.render_results(args.render, to_markdown)

    methods = selected_methods(args.methods)
    env = common.environment(args.device, args.threads)
    logger.info("%s", common.describe_machine(env))

    payload = common.new_payload(env, args)
    stem = f"compare-{args.device.replace(':', '')}" + (f"-{args.tag}" if args.tag else "")
    for name in args.workloads:
        payload["results"].append(run_workload(name, methods, args))
        # Written after every workload, so an interrupted run keeps what it measured.
        common.save_results(payload, args.out, stem, to_markdown)
    print(to_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
