"""Measurement plumbing shared by the benchmark scripts.

Each configuration (one workload, one method) runs in its own Python
process, so its peak memory is its own and a crash or an out-of-memory
error ends only that configuration. The child process:

1. builds the workload and runs the method once on ``warmup_matvecs``
   probes (kernels loaded, lazy initialization done);
2. returns freed heap memory to the operating system, resets the peak,
   and records the baseline;
3. times ``repeats`` runs of the method on ``num_matvecs`` probes, each
   after a timing of ``unit_gradients`` plain gradients (scaled to
   ``num_matvecs``), with ``torch.cuda.synchronize`` around each run on a
   GPU; the cost is the ratio of the two medians;
4. reports the peak memory above the baseline: the resident set's high-water
   mark (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU, or
   ``torch.cuda.max_memory_allocated`` on a GPU.

On the CPU the child's address space is capped (``RLIMIT_AS``) so that a
method that would exhaust the machine fails with an allocation error
instead.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULT_PREFIX = "BENCHMARK-RESULT "


# --- environment -------------------------------------------------------------


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def environment(device: str, threads: int | None) -> dict:
    """Describe the machine and software that produced a result file."""
    import torch

    import hutch
    from paths import PEERS, peer_version

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hutch": hutch.__version__,
        "device": device,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "peers": {module: peer_version(module) for module, _ in PEERS.values()},
    }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True
        )
        info["hutch_commit"] = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["hutch_commit"] = None
    return info


def describe_machine(env: dict) -> str:
    where = env["gpu"] if env["gpu"] else f"{env['cpu']}, {env['cpu_count']} cores, torch threads {env['threads']}"
    return f"{where}; torch {env['torch']}, Python {env['python']}, hutch {env['hutch']} ({env['hutch_commit']})"


# --- memory ------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def release_freed_memory() -> None:
    """Collect garbage and hand the freed C heap back to the OS, so it does not hide later peaks."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the current process above a baseline taken at :meth:`reset`."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0
        self.source = None

    def reset(self) -> None:
        import torch

        release_freed_memory()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.source = "torch.cuda.max_memory_allocated"
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _status_kib("VmRSS") * 1024
            self.source = "VmHWM after clear_refs"
        except (OSError, TypeError):
            # Without a resettable high-water mark, the lifetime peak is all there is.
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.source = "ru_maxrss (lifetime peak)"

    def extra_bytes(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.source.startswith("VmHWM"):
            return _status_kib("VmHWM") * 1024 - self.baseline
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline


def limit_address_space(extra_gib: float) -> None:
    """Cap the process's virtual memory at its current size plus ``extra_gib``."""
    current = _status_kib("VmSize")
    if current is None or extra_gib <= 0:
        return
    limit = current * 1024 + int(extra_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in str(error) or "out of memory" in str(error).lower()
    )


# --- one configuration, in a child process --------------------------------------


def run_in_child(spec: dict, timeout: float, script: list[str] | None = None, extra_env: dict | None = None) -> dict:
    """Run one configuration in a fresh Python process and return its result record.

    ``script`` is the command line between the interpreter and the spec. By
    default it is this module, whose ``child_main`` measures ``spec``. The
    child prints its record on a line starting with ``RESULT_PREFIX``.
    """
    command = [sys.executable] + (script or [str(BENCH_DIR / "common.py")]) + [json.dumps(spec)]
    python_path = os.pathsep.join([str(BENCH_DIR), str(REPO_DIR), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=python_path, **(extra_env or {}))
    if spec.get("malloc_mmap_threshold"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(spec["malloc_mmap_threshold"])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout", "error": f"no result within {timeout:.0f} s"}

    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    status = "killed" if done.returncode < 0 else "failed"
    return {
        **spec,
        "status": status,
        "error": f"exit code {done.returncode} after {time.perf_counter() - started:.0f} s: " + " | ".join(tail),
    }


def _measure(spec: dict) -> dict:
    import torch

    import paths
    import workloads

    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    workload = workloads.build(spec["workload"], device=device, dtype=dtype, seed=spec["seed"])
    method = paths.method_table()[spec["method"]]
    record = {**spec, "num_params": workload.num_params, "gradient_bytes": workload.gradient_bytes}

    def synchronize():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    unit = paths.gradients
    unit_count = spec.get("unit_gradients") or spec["num_matvecs"]
    if spec["warmup_matvecs"] > 0:
        method(workload, spec["warmup_matvecs"], spec["seed"] + 1, spec["chunk"])
        unit(workload, 1, spec["seed"], None)
    memory = PeakMemory(device)
    memory.reset()

    # Each timed run follows a timing of plain gradients in the same process,
    # so their ratio holds up when other processes load the machine for a
    # while. A gradient's peak memory is below any product's.
    times, unit_times = [], []
    for _ in range(spec["repeats"]):
        synchronize()
        start = time.perf_counter()
        unit(workload, unit_count, spec["seed"], None)
        synchronize()
        unit_times.append((time.perf_counter() - start) * spec["num_matvecs"] / unit_count)

        start = time.perf_counter()
        value, info = method(workload, spec["num_matvecs"], spec["seed"], spec["chunk"])
        synchronize()
        times.append(time.perf_counter() - start)

    extra = memory.extra_bytes()
    record.update(
        # Load average over the last minute at the end of the timed runs; above
        # the thread count, other processes competed for the cores.
        load_average=os.getloadavg()[0],
        status="ok",
        value=value,
        info=info,
        times_s=times,
        time_s=statistics.median(times),
        unit_times_s=unit_times,
        unit_time_s=statistics.median(unit_times),
        # The tables use cost_in_gradients() below, the ratio of the minima.
        cost_in_gradients=statistics.median(times) / statistics.median(unit_times),
        peak_extra_bytes=extra,
        peak_extra_gradients=extra / workload.gradient_bytes,
        memory_source=memory.source,
    )
    return record


def _accuracy(spec: dict) -> dict:
    """Relative error of every product path against double backward, in float64."""
    import torch

    import paths
    import workloads

    workload = workloads.build(spec["workload"], device=spec["device"], dtype=torch.float64, seed=spec["seed"])
    Z = next(paths.probe_blocks(workload, spec["num_matvecs"], spec["seed"], spec["num_matvecs"]))
    reference = paths.RAW_PATHS[paths.REFERENCE_PATH](workload)(Z)
    norms = reference.norm(dim=1)

    errors, failures = {}, {}
    for name, build in paths.product_builders(workload).items():
        try:
            HZ = build()(Z)
            errors[name] = float(((HZ - reference).norm(dim=1) / norms).max())
        except Exception as error:  # a path that cannot run here is reported, not fatal
            failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return {**spec, "status": "ok", "relative_error": errors, "failures": failures}


def child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    warnings.simplefilter("ignore")
    if not spec["device"].startswith("cuda"):
        limit_address_space(spec.get("memory_limit_gib", 0))
    try:
        record = _accuracy(spec) if spec.get("kind") == "accuracy" else _measure(spec)
    except Exception as error:
        status = "out of memory" if is_out_of_memory(error) else "failed"
        release_freed_memory()
        record = {
            **spec,
            "status": status,
            "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
        }
        traceback.print_exc()
    print(RESULT_PREFIX + json.dumps(record), flush=True)


# --- output ------------------------------------------------------------------


def cost_in_gradients(record: dict) -> float:
    """Return the fastest timed run over the fastest timing of as many gradients.

    On a shared machine other processes only ever add time, so the minimum
    of each series is the steadiest estimate of the undisturbed cost; the
    median-based ratio is kept in the record as ``cost_in_gradients``.
    """
    return min(record["times_s"]) / min(record["unit_times_s"])


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def new_payload(env: dict, args) -> dict:
    """Start a result file's content: the environment, the command-line arguments, no results yet."""
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"environment": env, "args": arguments, "results": []}


def save_results(payload: dict, out: Path, stem: str, to_markdown) -> None:
    """Write ``payload`` as ``out/stem.json`` and its tables as ``out/stem.md``."""
    write_json(out / f"{stem}.json", payload)
    (out / f"{stem}.md").write_text(to_markdown(payload))


def render_results(path: Path, to_markdown) -> int:
    """Rewrite the markdown tables of the result file ``path`` without measuring, and print them."""
    markdown = to_markdown(json.loads(path.read_text()))
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    child_main(sys.argv[1:])
