"""Two more ways to evaluate Hessian products, timed against double backward.

``compare.py`` and ``product_cost.py`` leave two ways of evaluating the
products of a Hutchinson trace untested. This script measures both, so the
project can state with numbers whether either would help:

- ``compiled-vmap-jvp``: ``torch.compile(f, dynamic=False)`` of
  ``f(params, T) = vmap(t -> jvp(grad(loss), (params,), (t,))[1])(T)``, the
  forward-over-reverse product ``H t`` for a block of ``--chunk`` probes.
  Compilation is paid once, on the first call, so the script reports it on
  its own. That is the time of the first call: Dynamo tracing, AOTAutograd,
  Inductor's code generation and C++ build, and one block of products. It is
  measured once with an empty Inductor cache and once with the cache that
  the first process left on disk. The steady-state cost counts only later
  calls.
- ``forward-over-forward``: the quadratic forms ``z^T H z`` themselves, as
  the second directional derivative
  ``jvp(p -> jvp(loss, (p,), (t,))[1], (params,), (t,))[1]`` under
  ``torch.no_grad()``, vmapped over blocks of ``--chunk`` probes. It keeps no
  reverse-mode graph, but its forward pass carries the first and second
  tangents of every probe in the block. It yields ``z^T H z`` and not
  ``H z``, so it can serve Hutchinson's estimator and no estimator that needs
  the products themselves (Hutch++, XTrace).
- ``raw:double-backward`` from ``paths.py``, the reference: one gradient
  graph built with ``create_graph=True``, then one second backward per probe.
  It runs in the same process as each candidate, so that every candidate is
  compared with the reference under the same conditions.

Each (workload, candidate) pair runs in a fresh Python process with its own
Inductor cache folder, so no compiled code, Dynamo cache or allocator state
carries over from one candidate to the next. In that process:

1. the candidate's first call on one block of probes is timed (for the
   compiled candidate this is its compile time), then the reference and one
   gradient run once untimed;
2. ``--repeats`` times: ``--matvecs`` plain gradients, then a Hutchinson
   trace of ``--matvecs`` probes through the candidate, then the same trace
   through the reference. The cost in gradients is the fastest trace over the
   fastest gradient timing, as in the other result files;
3. the peak memory above the workload of one more trace by each method,
   with ``common.PeakMemory``, in units of one gradient's bytes.

A separate process per candidate rebuilds the workload in float64 and
compares the candidate with the reference on the same ``--chunk`` probes:
``max_i ||H z_i - (H z_i)_ref|| / ||(H z_i)_ref||`` for the compiled
products and ``max_i |q_i - q_ref_i| / |q_ref_i|`` for the quadratic forms,
with ``q_ref_i = z_i^T (H z_i)_ref``. A candidate passes below 1e-10.

With the default fast path of ``nn.TransformerEncoderLayer`` in eval mode,
forward-mode AD through the transformer workload can reach the fused kernel
``aten::_transformer_encoder_layer_fwd``, which has no forward-AD formula.
Eagerly that raises NotImplementedError. Under ``torch.compile`` Dynamo
breaks the graph there and runs the function eagerly, so such a record is
marked "graph break" in the tables. A candidate that fails or breaks the
graph at that kernel is run again with the documented switch
``torch.backends.mha.set_fastpath_enabled(False)``, and both records are
kept.

Usage::

    python benchmarks/candidates.py [--workloads mlp,cnn,transformer] [--threads 1]
        [--matvecs 100] [--chunk 10] [--repeats 3] [--tag NAME]
    python benchmarks/candidates.py --workloads resnet18 --repeats 1 --matvecs 20 --tag resnet18
    python benchmarks/candidates.py --render benchmarks/results/candidates-cpu.json   # tables only

Results go to ``benchmarks/results/candidates-<device>[-<tag>].json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import common
import workloads

logger = logging.getLogger("hutch.benchmarks")

COMPILED = "compiled-vmap-jvp"
FORWARD_OVER_FORWARD = "forward-over-forward"
CANDIDATES = (COMPILED, FORWARD_OVER_FORWARD)
REFERENCE = "raw:double-backward"

# A candidate agrees with double backward when its largest relative error in float64 is below this.
TOLERANCE = 1e-10

# The fused kernel that the fast path of nn.TransformerEncoderLayer runs in eval mode.
FUSED_ENCODER_KERNEL = "_transformer_encoder_layer_fwd"


# --- the candidates -------------------------------------------------------------


def vmap_jvp_block(loss):
    """Return ``f(params, T)``: forward-over-reverse products ``H t`` for every probe ``t`` in the block ``T``.

    ``T`` maps each parameter name to a tensor of shape ``(k, *p.shape)``,
    and the result has the same layout.
    """
    from torch.func import grad, jvp, vmap

    gradient = grad(loss)

    def block(params, T):
        return vmap(lambda t: jvp(gradient, (params,), (t,))[1])(T)

    return block


def quadratic_form_block(loss):
    """Return ``f(params, T)``: ``z^T H z`` for every probe ``z`` in ``T``, shape ``(k,)``.

    ``z^T H z = d^2/ds^2 loss(params + s z)`` at ``s = 0``, the second
    directional derivative, evaluated as a forward-mode derivative of a
    forward-mode derivative. No reverse-mode graph is built, hence
    ``torch.no_grad()``.

    NOTE: in torch 2.13.0 the nested forward-mode derivative of
    ``F.layer_norm`` with respect to its input treats the normalization's
    mean and inverse standard deviation as constants, so ``z^T H z`` is wrong
    on models with layer normalization (the transformer workload here). With
    ``F.layer_norm`` replaced by the same formula in elementary ops, the
    transformer's quadratic forms agree with double backward to 3e-15 in
    float64. The float64 check reports the error, and nothing here corrects it.
    """
    import torch
    from torch.func import jvp, vmap

    def second_derivative(params, t):
        def directional_derivative(p):
            return jvp(loss, (p,), (t,))[1]

        return jvp(directional_derivative, (params,), (t,))[1]

    def block(params, T):
        with torch.no_grad():
            return vmap(lambda t: second_derivative(params, t))(T)

    return block


def compile_block(block):
    import torch

    return torch.compile(block, dynamic=False)


def candidate_trace(name: str, workload, block, params):
    """Return ``trace(num_matvecs, seed, chunk)``: the Hutchinson estimate through candidate ``name``.

    Like every method of ``paths.py``, one trace draws its probes in blocks
    of ``chunk`` and averages ``z^T H z``. Only the way the block's products
    or quadratic forms are evaluated differs.
    """
    import paths

    def trace(num_matvecs: int, seed: int, chunk: int) -> float:
        total = 0.0
        for Z in paths.probe_blocks(workload, num_matvecs, seed, chunk):
            T = paths.split_rows(workload, Z)
            if name == COMPILED:
                HZ = paths.flatten_rows(block(params, T), Z.shape[0])
                total += float((Z * HZ).sum())
            else:
                total += float(block(params, T).sum())
        return total / num_matvecs

    return trace


def build_candidate(name: str, workload):
    """Return the parameters and the candidate's block function on ``workload``, compiled where it is."""
    import paths

    params, loss = paths.functional_loss(workload)
    if name == COMPILED:
        return params, compile_block(vmap_jvp_block(loss))
    return params, quadratic_form_block(loss)


# --- one configuration, in a child process ----------------------------------------


def _prepare(spec: dict, dtype_name: str):
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.backends.mha.set_fastpath_enabled(spec["mha_fastpath"])
    return workloads.build(spec["workload"], device=spec["device"], dtype=getattr(torch, dtype_name), seed=spec["seed"])


def _short_reason(reason: str) -> str:
    """Cut Dynamo's graph-break message to its first two lines, without the dump of the call's arguments."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    text = ": ".join(lines[:2]).split("(*(")[0]
    return text[:300]


def _dynamo_counts() -> dict:
    """Return the counts of graphs compiled and of graph breaks seen by Dynamo in this process so far."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "graph_break_reasons": [_short_reason(reason) for reason in sorted(counters["graph_break"])[:5]],
    }


def _timed(run, synchronize) -> tuple[float, object]:
    synchronize()
    start = time.perf_counter()
    value = run()
    synchronize()
    return time.perf_counter() - start, value


def _peak(device: str, workload, run) -> dict:
    memory = common.PeakMemory(device)
    memory.reset()
    run()
    extra = memory.extra_bytes()
    return {"peak_extra_bytes": extra, "peak_extra_gradients": extra / workload.gradient_bytes, "memory_source": memory.source}


def _measure(spec: dict) -> dict:
    """Measure the first call, the cost and the peak memory of one candidate and of the reference."""
    import torch

    import paths

    device, N, chunk, seed = spec["device"], spec["num_matvecs"], spec["chunk"], spec["seed"]
    workload = _prepare(spec, "float32")
    record = {**spec, "num_params": workload.num_params, "gradient_bytes": workload.gradient_bytes}

    def synchronize():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    # Step 1: the candidate's first call on one block, which for the compiled
    # candidate includes tracing and code generation, then warm-ups.
    params, block = build_candidate(spec["candidate"], workload)
    T = paths.split_rows(workload, next(paths.probe_blocks(workload, chunk, seed + 1, chunk)))
    record["first_call_s"], _ = _timed(lambda: block(params, T), synchronize)
    if spec["candidate"] == COMPILED:
        record["dynamo"] = _dynamo_counts()
        record["inductor_compile_threads"] = torch._inductor.config.compile_threads
        # torch.compile without fullgraph=True runs what Dynamo cannot trace
        # eagerly. Such a record is kept, because that is what a user of this
        # call gets, and it is marked in the tables.
        record["graph_break"] = record["dynamo"]["graph_breaks"] > 0 or record["dynamo"]["unique_graphs"] == 0

    trace = candidate_trace(spec["candidate"], workload, block, params)
    reference = paths.raw_trace(REFERENCE)
    reference(workload, 1, seed + 1, 1)
    paths.gradients(workload, 1, seed, None)

    # Step 2: gradients, candidate and reference, alternately.
    # Both series share one list of gradient timings, the unit of both costs.
    candidate = {"times_s": [], "unit_times_s": []}
    ref = {"times_s": [], "unit_times_s": candidate["unit_times_s"]}
    for _ in range(spec["repeats"]):
        unit_time, _ = _timed(lambda: paths.gradients(workload, N, seed, None), synchronize)
        candidate["unit_times_s"].append(unit_time)
        elapsed, candidate["value"] = _timed(lambda: trace(N, seed, chunk), synchronize)
        candidate["times_s"].append(elapsed)
        elapsed, (ref["value"], _) = _timed(lambda: reference(workload, N, seed, chunk), synchronize)
        ref["times_s"].append(elapsed)
    gradient_s = min(candidate["unit_times_s"]) / N
    for series in (candidate, ref):
        series["cost_in_gradients"] = common.cost_in_gradients(series)

    # Step 3: peak memory of one more trace by each method.
    candidate.update(_peak(device, workload, lambda: trace(N, seed, chunk)))
    ref.update(_peak(device, workload, lambda: reference(workload, N, seed, chunk)))
    gradients_memory = _peak(device, workload, lambda: paths.gradients(workload, N, seed, None))

    record.update(
        status="ok",
        candidate_result=candidate,
        reference_result=ref,
        gradients_result=gradients_memory,
        gradient_s=gradient_s,
        first_call_in_gradients=record["first_call_s"] / gradient_s,
        # Load average over the last minute after the timed runs. Above the thread count, other processes competed.
        load_average=os.getloadavg()[0],
    )
    if spec["candidate"] == COMPILED:
        record["dynamo_after_timing"] = _dynamo_counts()
    return record


def _accuracy(spec: dict) -> dict:
    """Compute the candidate's largest relative error against double backward, in float64, on ``chunk`` probes."""
    import torch

    import paths

    workload = _prepare(spec, "float64")
    Z = next(paths.probe_blocks(workload, spec["chunk"], spec["seed"], spec["chunk"]))
    reference = paths.double_backward(workload)(Z)

    params, block = build_candidate(spec["candidate"], workload)
    result = block(params, paths.split_rows(workload, Z))
    if spec["candidate"] == COMPILED:
        HZ = paths.flatten_rows(result, Z.shape[0])
        errors = (HZ - reference).norm(dim=1) / reference.norm(dim=1)
    else:
        q_ref = (Z * reference).sum(dim=1)
        errors = (result - q_ref).abs() / q_ref.abs()
    max_error = float(errors.max())
    layer_norms = sum(isinstance(module, torch.nn.LayerNorm) for module in workload.model.modules())
    return {**spec, "status": "ok", "relative_error": max_error, "passes": max_error <= TOLERANCE,
            "probes": Z.shape[0], "layer_norm_modules": layer_norms}


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    warnings.simplefilter("ignore")
    if not spec["device"].startswith("cuda"):
        common.limit_address_space(spec.get("memory_limit_gib", 0))
    try:
        record = _accuracy(spec) if spec["kind"] == "accuracy" else _measure(spec)
    except Exception as error:
        status = "out of memory" if common.is_out_of_memory(error) else "failed"
        common.release_freed_memory()
        first_line = str(error).splitlines()[0][:300] if str(error) else ""
        record = {**spec, "status": status, "error": f"{type(error).__name__}: {first_line}"}
        traceback.print_exc()
    print(common.RESULT_PREFIX + json.dumps(record), flush=True)


def run_child(spec: dict, timeout: float, inductor_cache: str) -> dict:
    """Run one configuration in a fresh Python process with ``inductor_cache`` as Inductor's cache folder."""
    script = [str(Path(__file__).resolve()), "--child"]
    return common.run_in_child(spec, timeout, script, {"TORCHINDUCTOR_CACHE_DIR": inductor_cache})


# --- the parent process -----------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,transformer",
                        help=f"comma-separated subset of {','.join(workloads.WORKLOAD_NAMES)}; "
                             "resnet18 is left out by default because one of its gradients takes about a second")
    parser.add_argument("--candidates", default=",".join(CANDIDATES),
                        help=f"comma-separated subset of {','.join(CANDIDATES)}")
    # NOTE: only the CPU has run this script. The CUDA branch (synchronize, cuda memory counters) is untested.
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every measuring process")
    parser.add_argument("--matvecs", type=int, default=100,
                        help="probes per timed Hutchinson trace, and gradients per unit timing; a multiple of --chunk")
    parser.add_argument("--chunk", type=int, default=10,
                        help="probes per vmapped block, also the probes of the float64 check")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the fastest is reported")
    parser.add_argument("--warm-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the compiled candidate a second time, with the Inductor cache of the first run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workloads and the probes")
    parser.add_argument("--memory-limit-gib", type=float, default=10.0,
                        help="CPU only: address space a process may add before it fails as out of memory")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a process is stopped")
    parser.add_argument("--out", type=Path, default=common.BENCH_DIR / "results",
                        help="folder for candidates-<device>[-<tag>].json and .md")
    parser.add_argument("--tag", default="", help="suffix of the output file names, as in candidates-<device>-<tag>.json")
    parser.add_argument("--render", type=Path, default=None,
                        help="write the markdown tables of this result JSON file beside it, and measure nothing")
    args = parser.parse_args(argv)

    args.workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    unknown = sorted(set(args.workloads) - set(workloads.WORKLOAD_NAMES))
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; choose from {list(workloads.WORKLOAD_NAMES)}")
    args.candidates = [name.strip() for name in args.candidates.split(",") if name.strip()]
    unknown = sorted(set(args.candidates) - set(CANDIDATES))
    if unknown:
        parser.error(f"--candidates: unknown {unknown}; choose from {list(CANDIDATES)}")
    for option in ("threads", "matvecs", "chunk", "repeats"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1; got {getattr(args, option)}")
    # The compiled block has static shapes, so a smaller last block would compile a second time inside the timing.
    if args.matvecs % args.chunk:
        parser.error(f"--matvecs must be a multiple of --chunk; got --matvecs {args.matvecs} and --chunk {args.chunk}. "
                     f"Use for example --matvecs {args.matvecs - args.matvecs % args.chunk or args.chunk}")
    return args


def run_candidate(name: str, candidate: str, base: dict, args, cache_root: str) -> list[dict]:
    """Measure ``candidate`` on workload ``name``, retried without the MHA fast path where that blocks it.

    Returns the timing records (one per cache state, or per fast-path setting)
    each with its float64 check under ``accuracy``.
    """
    records = []
    for fastpath in (True, False):
        spec = {**base, "kind": "measure", "candidate": candidate, "mha_fastpath": fastpath}
        cache = tempfile.mkdtemp(prefix=f"{name}-{candidate}-", dir=cache_root)
        # Inductor's cache matters only to the compiled candidate: first empty, then as its first run left it.
        if candidate != COMPILED:
            states = [None]
        else:
            states = ["empty", "warm"] if args.warm_compile else ["empty"]

        measured = []
        for state in states:
            logger.info("%s: %s, Inductor cache %s, MHA fast path %s", name, candidate, state or "unused",
                        "on" if fastpath else "off")
            record = run_child({**spec, "inductor_cache": state}, args.timeout, cache)
            logger.info("  %s %s", record["status"], record.get("error", ""))
            measured.append(record)
            # A warm cache cannot speed up a function that Dynamo left to eager mode.
            if record["status"] != "ok" or record.get("graph_break"):
                break
        records += measured

        last = measured[-1]
        if any(record["status"] == "ok" for record in measured):
            logger.info("%s: %s, float64 check", name, candidate)
            accuracy = run_child({**spec, "kind": "accuracy"}, args.timeout,
                                 tempfile.mkdtemp(prefix=f"{name}-{candidate}-float64-", dir=cache_root))
            logger.info("  %s %s", accuracy["status"], accuracy.get("relative_error", accuracy.get("error", "")))
            for record in measured:
                if record["status"] == "ok":
                    record["accuracy"] = accuracy

        reasons = [last.get("error", "")] + (last.get("dynamo") or {}).get("graph_break_reasons", [])
        blocked = (last["status"] != "ok" or last.get("graph_break")) and any(
            FUSED_ENCODER_KERNEL in reason for reason in reasons)
        if not (fastpath and blocked):
            break
    return records


def run_workload(name: str, args, cache_root: str) -> dict:
    base = {"workload": name, "device": args.device, "threads": args.threads, "num_matvecs": args.matvecs,
            "chunk": args.chunk, "repeats": args.repeats, "seed": args.seed,
            "memory_limit_gib": args.memory_limit_gib}
    records = []
    for candidate in args.candidates:
        records += run_candidate(name, candidate, base, args, cache_root)
    return {"workload": name, "description": workloads.DESCRIPTIONS[name], "records": records}


# --- tables -------------------------------------------------------------------------


def label(record: dict) -> str:
    text = record["candidate"]
    if record["candidate"] == COMPILED:
        text += f", {record['inductor_cache']} Inductor cache"
    if not record["mha_fastpath"]:
        text += ", MHA fast path off"
    return text


def _columns(payload: dict):
    """Return the workloads, the record labels grouped by candidate, and each workload's records by label."""
    names = [result["workload"] for result in payload["results"]]
    labels = []
    for candidate in CANDIDATES:
        for result in payload["results"]:
            for record in result["records"]:
                if record["candidate"] == candidate and label(record) not in labels:
                    labels.append(label(record))
    by_label = {result["workload"]: {label(r): r for r in result["records"]} for result in payload["results"]}
    return names, labels, by_label


def _table(payload: dict, rows: list[tuple[str, str, object]]) -> str:
    """Return a table with one column per workload and one row per ``(row label, record label, cell)``.

    ``cell(record)`` formats an ok record, and other records show their
    status. A record label of None takes the workload's first ok record.
    """
    names, _, by_label = _columns(payload)
    lines = []
    for row_label, key, cell in rows:
        cells = []
        for name in names:
            if key is None:
                record = next((r for r in by_label[name].values() if r["status"] == "ok"), None)
            else:
                record = by_label[name].get(key)
            if record is None:
                cells.append("-")
            elif record["status"] != "ok":
                cells.append(record["status"])
            else:
                cells.append(cell(record))
        lines.append([row_label] + cells)
    return common.markdown_table(["method"] + names, lines)


def _marked(cell):
    """Wrap a cell formatter of a candidate's row so that it marks a compiled function that ran eagerly."""

    def marked_cell(record: dict) -> str:
        return cell(record) + (" (graph break)" if record.get("graph_break") else "")

    return marked_cell


def _cost(series: dict) -> str:
    return f"{common.cost_in_gradients(series):.2f} ({min(series['times_s']):.2f} s)"


def _memory(series: dict) -> str:
    return f"{series['peak_extra_gradients']:.0f} ({series['peak_extra_bytes'] / 2**20:.0f} MiB)"


def _accuracy_cell(record: dict) -> str:
    accuracy = record.get("accuracy") or {}
    if accuracy.get("status") != "ok":
        return f"check {accuracy.get('status', 'not run')}"
    verdict = "passes" if accuracy["passes"] else f"fails {TOLERANCE:.0e}"
    return f"{accuracy['relative_error']:.1e} ({verdict})"


def _break_even(record: dict) -> str:
    """Return the number of products after which the compiled candidate, compile included, overtakes double backward."""
    saved_s = (min(record["reference_result"]["times_s"]) - min(record["candidate_result"]["times_s"]))
    saved_s /= record["num_matvecs"]
    if saved_s <= 0:
        return "never"
    return f"{record['first_call_s'] / saved_s:,.0f}"


def _estimates(record: dict) -> str:
    return f"{record['candidate_result']['value']:.5g} / {record['reference_result']['value']:.5g}"


def _pairs(labels: list[str], format_series) -> list[tuple[str, str, object]]:
    """Return table rows for each candidate record and for the reference measured in the same process."""
    rows = []
    for key in labels:
        rows.append((key, key, _marked(lambda r: format_series(r["candidate_result"]))))
        rows.append((f"{REFERENCE}, same process as above", key, lambda r: format_series(r["reference_result"])))
    return rows


def to_markdown(payload: dict) -> str:
    _, labels, _ = _columns(payload)
    args = payload["args"]
    compiled = [key for key in labels if key.startswith(COMPILED)]

    parts = [f"Machine: {common.describe_machine(payload['environment'])}.", "",
             f"Budget: {args['matvecs']} products per trace in blocks of {args['chunk']}, fastest of "
             f"{args['repeats']} timed runs, torch threads {args['threads']}, seed {args['seed']}.", ""]
    loads = [r["load_average"] for result in payload["results"] for r in result["records"] if r["status"] == "ok"]
    if loads:
        parts += [f"The 1-minute load average after the timed runs of each process ranged from {min(loads):.1f} "
                  f"to {max(loads):.1f} on {payload['environment']['cpu_count']} cores.", ""]

    if compiled:
        parts += ["Compile time of compiled-vmap-jvp: seconds of the first call on one block of probes "
                  "(tracing, code generation and C++ build included), the same in gradients, and the number "
                  "of products after which the compiled path, compile included, is ahead of double backward:", ""]
        rows = []
        for key in compiled:
            rows += [(f"{key}: seconds", key, _marked(lambda r: f"{r['first_call_s']:.1f}")),
                     (f"{key}: gradients", key, _marked(lambda r: f"{r['first_call_in_gradients']:,.0f}")),
                     (f"{key}: break-even products", key, _marked(_break_even))]
        parts += [_table(payload, rows), ""]

    parts += ["Cost of one product (of one quadratic form for forward-over-forward) in gradients: the fastest "
              "trace over the fastest timing of as many gradients in the same process (seconds of the fastest "
              "trace in brackets). Each candidate row is followed by the reference timed in the same process:", ""]
    parts += [_table(payload, _pairs(labels, _cost)), ""]

    parts += ["Peak memory of one trace above the model and data, in gradients' bytes (MiB in brackets):", ""]
    gradients_row = ("gradients", None, lambda r: _memory(r["gradients_result"]))
    parts += [_table(payload, _pairs(labels, _memory) + [gradients_row]), ""]

    parts += [f"Largest relative error against {REFERENCE} in float64 on {args['chunk']} probes: "
              "||H z - H_ref z|| / ||H_ref z|| for products, |q - q_ref| / |q_ref| for quadratic forms:", ""]
    parts += [_table(payload, [(key, key, _marked(_accuracy_cell)) for key in labels]), ""]

    parts += ["Trace estimates in float32, candidate / reference, on the same probes:", ""]
    parts += [_table(payload, [(key, key, _marked(_estimates)) for key in labels]), ""]

    notes = []
    for result in payload["results"]:
        for record in result["records"]:
            where = f"- {result['workload']}, {label(record)}"
            if record["status"] != "ok":
                notes.append(f"{where}: {record['status']}: {record.get('error', '')}")
            accuracy = record.get("accuracy") or {}
            if accuracy and accuracy.get("status") != "ok":
                notes.append(f"{where}, float64 check: {accuracy['status']}: {accuracy.get('error', '')}")
            if accuracy.get("status") == "ok" and not accuracy["passes"] and accuracy.get("layer_norm_modules"):
                notes.append(f"{where}: fails the float64 check. The model has {accuracy['layer_norm_modules']} "
                             "nn.LayerNorm modules, and in torch 2.13.0 (checked there, this run used torch "
                             f"{payload['environment']['torch']}) the nested forward-mode derivative of F.layer_norm "
                             "treats the normalization's mean and inverse standard deviation as constants.")
            dynamo = record.get("dynamo_after_timing")
            if dynamo and (dynamo["graph_breaks"] or dynamo["unique_graphs"] != 1):
                notes.append(f"{where}: Dynamo compiled {dynamo['unique_graphs']} graphs with "
                             f"{dynamo['graph_breaks']} graph breaks; the rest ran eagerly. First reason: "
                             f"{dynamo['graph_break_reasons'][0] if dynamo['graph_break_reasons'] else 'none given'}")
    if notes:
        parts += ["Notes:", ""] + notes + [""]
    return "\n".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.render is not None:
        return common.render_results(args.render, to_markdown)

    env = common.environment(args.device, args.threads)
    logger.info("%s", common.describe_machine(env))

    payload = common.new_payload(env, args)
    stem = f"candidates-{args.device.replace(':', '')}" + (f"-{args.tag}" if args.tag else "")
    started = time.perf_counter()
    cache_root = tempfile.mkdtemp(prefix="hutch-candidates-inductor-")
    try:
        for name in args.workloads:
            payload["results"].append(run_workload(name, args, cache_root))
            payload["wall_s"] = time.perf_counter() - started
            # Written after every workload, so an interrupted run keeps what it measured.
            common.save_results(payload, args.out, stem, to_markdown)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    print(to_markdown(payload))
    return 0


if __name__ == "__main__":
    # run_child starts this script with ``--child SPEC_JSON`` for one measurement.
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2])
    else:
        sys.exit(main())
