"""The validation harness: exact and estimated Hessian traces, side by side.

For each case (a model, a loss and data) the harness computes the exact
trace of the loss Hessian along independent paths and checks that they
agree. Then it runs each estimator and checks that its value lies within a
band of its own standard error around the exact trace. Run it as ``hutch validate``
or ``python -m hutch.validate``; ``--help`` lists the options.

Exact paths:

- ``dense``: the flat (P, P) Hessian from forward-over-reverse products
  (``torch.func.jvp`` of ``torch.func.grad``) with the identity's columns;
  its trace. The operator is forced onto that path here, whatever
  ``hvp="auto"`` would choose, so that it differs from the next one.
- ``double-backward``: the diagonal from reverse-over-reverse products
  (``torch.autograd.grad`` of a ``create_graph=True`` gradient), an
  automatic-differentiation path that shares no code with the operator's
  products.
- ``func.hessian``: for models of at most 64 parameters, ``torch.func.hessian``
  of the loss as a function of the parameter dict, whose nested blocks are
  assembled into the flat matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import hutch
from hutch import _validate_checks as checks
from hutch._cases import CASES, Case
from hutch.operator import HessianOperator

# An estimate fails when it lies farther than this many of its own standard
# errors from the exact trace.
Z_LIMIT = 5.0
# Report label of each exact path.
EXACT_PATH_LABELS = {
    "dense": "dense, forward-over-reverse",
    "double-backward": "diagonal, double backward",
    "func.hessian": "torch.func.hessian blocks",
}
# Largest model for which the torch.func.hessian path runs.
FUNC_HESSIAN_MAX_PARAMS = 64
# Estimators the harness runs, by name.
ESTIMATORS: dict[str, Callable] = {
    "hutchinson": hutch.hutchinson,
    "hutchpp": hutch.hutchpp,
    "xtrace": hutch.xtrace,
}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class CaseReport:
    """Results and failures of one harness case."""

    name: str
    description: str
    num_params: int
    notes: list[str]
    exact_paths: dict[str, dict[str, float]] = field(default_factory=dict)
    exact_trace: float = math.nan
    exact_max_rel_diff: float = 0.0
    estimates: list[dict[str, Any]] = field(default_factory=list)
    blocks: Optional[dict[str, Any]] = None
    block_estimates: list[dict[str, Any]] = field(default_factory=list)
    diagonal: Optional[dict[str, Any]] = None
    hvp_path: Optional[str] = None
    hvp_fallback: Optional[str] = None
    failures: list[str] = field(default_factory=list)


class Progress:
    """Writes progress of long steps to stderr; overwrites one line on a terminal."""

    def __init__(self, stream=sys.stderr, quiet: bool = False):
        self.stream = stream
        self.quiet = quiet
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._last = 0.0

    def step(self, label: str, done: int, total: int) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if done < total and now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        text = f"  {label}: {done}/{total}"
        if self.tty:
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{text}\033[K{end}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unit_columns(n: int, start: int, stop: int, dtype, device) -> torch.Tensor:
    E = torch.zeros(n, stop - start, dtype=dtype, device=device)
    E[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
    return E


def dense_hessian(op: HessianOperator, progress: Progress) -> torch.Tensor:
    """Build the flat Hessian column block by column block, reporting progress."""
    n = op.num_params
    H = torch.empty(n, n, dtype=op.dtype, device=op.device)
    step = op.batch_size
    for start in range(0, n, step):
        stop = min(start + step, n)
        H[:, start:stop] = op.matmat(_unit_columns(n, start, stop, op.dtype, op.device))
        progress.step("dense Hessian, columns", stop, n)
    return H


def double_backward_diagonal(op: HessianOperator, progress: Progress, chunk: int = 32) -> torch.Tensor:
    """Compute the Hessian's diagonal with reverse-over-reverse autograd products.

    The loss over all batches is rebuilt with ``torch.autograd`` on detached
    copies of the parameters, so the model itself is not touched.
    """
    params = {name: p.detach().clone().requires_grad_(True) for name, p in op._current_params().items()}
    fixed = {name: t.clone() for name, t in op._fixed_tensors().items()}
    n = op.num_params
    diagonal = torch.zeros(n, dtype=op.dtype, device=op.device)
    total = 0

    source = op._data._source
    num_batches = len(source) if hasattr(source, "__len__") else "?"
    for index, (inputs, targets, num_samples) in enumerate(op._batches()):
        weight = num_samples if op.reduction == "mean" else 1
        total += num_samples
        loss = op.batch_loss(params, fixed, inputs, targets)
        gradient = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        flat_gradient = torch.cat([g.reshape(-1) for g in gradient])
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            E = _unit_columns(n, start, stop, op.dtype, op.device).T
            rows = torch.autograd.grad(
                flat_gradient, list(params.values()), grad_outputs=E, retain_graph=True,
                is_grads_batched=True,
            )
            block = torch.cat([r.reshape(stop - start, -1) for r in rows], dim=1)
            diagonal[start:stop] += weight * block[torch.arange(stop - start), torch.arange(start, stop)]
            progress.step(f"double-backward diagonal, data batch {index + 1} of {num_batches}, columns", stop, n)
        del gradient, flat_gradient, loss

    if op.reduction == "mean":
        diagonal /= total
    return diagonal


def func_hessian(op: HessianOperator) -> torch.Tensor:
    """Assemble the flat Hessian from ``torch.func.hessian``'s nested blocks."""
    params = op._current_params()
    fixed = op._fixed_tensors()
    H = torch.zeros(op.shape, dtype=op.dtype, device=op.device)
    total = 0
    for inputs, targets, num_samples in op._batches():
        weight = num_samples if op.reduction == "mean" else 1
        total += num_samples
        nested = torch.func.hessian(lambda p: op.batch_loss(p, fixed, inputs, targets))(params)
        H += weight * op.layout.from_nested(nested)
    if op.reduction == "mean":
        H /= total
    return H


def _relative_difference(a: float, b: float) -> float:
    scale = max(abs(a), abs(b), 1e-300)
    return abs(a - b) / scale


def run_exact(op: HessianOperator, report: CaseReport, progress: Progress) -> torch.Tensor:
    """Compute the exact trace along each path, record whether they agree, and return the exact diagonal."""
    timed: dict[str, dict[str, float]] = {}

    start = time.perf_counter()
    H = dense_hessian(op, progress)
    _synchronize(op.device)
    timed["dense"] = {"trace": float(torch.trace(H)), "seconds": time.perf_counter() - start}
    symmetry = float(torch.linalg.matrix_norm(H - H.T) / torch.linalg.matrix_norm(H).clamp_min(1e-300))

    start = time.perf_counter()
    diagonal = double_backward_diagonal(op, progress)
    _synchronize(op.device)
    timed["double-backward"] = {"trace": float(diagonal.sum()), "seconds": time.perf_counter() - start}
    diagonal_gap = float((torch.diagonal(H) - diagonal).abs().max() / diagonal.abs().max().clamp_min(1e-300))

    if op.num_params <= FUNC_HESSIAN_MAX_PARAMS:
        start = time.perf_counter()
        H_func = func_hessian(op)
        _synchronize(op.device)
        timed["func.hessian"] = {"trace": float(torch.trace(H_func)), "seconds": time.perf_counter() - start}
        report.blocks = _describe_blocks(op, H)
        matrix_gap = float((H - H_func).abs().max() / H_func.abs().max().clamp_min(1e-300))
    else:
        matrix_gap = 0.0

    reference = timed["dense"]["trace"]
    traces = [path["trace"] for path in timed.values()]
    report.exact_paths = timed
    report.exact_trace = reference
    report.exact_max_rel_diff = max(
        [_relative_difference(t, reference) for t in traces] + [diagonal_gap, matrix_gap, symmetry]
    )
    rtol = checks.exact_rtol(op.dtype)
    if report.exact_max_rel_diff > rtol:
        traces_text = ", ".join(f"{k}={v['trace']:.12g}" for k, v in timed.items())
        report.failures.append(
            f"{report.name}: exact paths disagree: traces {traces_text}; "
            f"max relative difference {report.exact_max_rel_diff:.2e} (diagonals {diagonal_gap:.2e}, "
            f"func.hessian matrix {matrix_gap:.2e}, asymmetry {symmetry:.2e}) exceeds {rtol:.0e}"
        )
    return torch.diagonal(H).clone()


def _describe_blocks(op: HessianOperator, H: torch.Tensor) -> dict[str, Any]:
    """Shapes of torch.func.hessian's nested blocks and each diagonal block's trace."""
    shapes = {f"{a}/{b}": list(op.layout.block(H, a, b).shape) for a in op.layout.names for b in op.layout.names}
    block_traces = {}
    for slot in op.layout:
        square = op.layout.block(H, slot.name, slot.name).reshape(slot.numel, slot.numel)
        block_traces[slot.name] = float(torch.trace(square))
    return {"shapes": shapes, "diagonal_block_traces": block_traces}


def run_estimators(
    op: HessianOperator, report: CaseReport, methods: list[str], num_matvecs: int, seed: int
) -> None:
    """Run each estimator once and check it against the exact trace."""
    for method in methods:
        estimator = ESTIMATORS[method]
        start = time.perf_counter()
        estimate = estimator(op, num_matvecs, seed=seed)
        _synchronize(op.device)
        seconds = time.perf_counter() - start

        error = estimate.value - report.exact_trace
        z = checks.z_score(estimate.value, report.exact_trace, estimate.std_error, checks.exact_rtol(op.dtype))
        report.estimates.append(
            {
                "method": method,
                "value": estimate.value,
                "std_error": estimate.std_error,
                "rel_error": abs(error) / max(abs(report.exact_trace), 1e-300),
                "z": z,
                "num_matvecs": estimate.num_matvecs,
                "exact": estimate.exact,
                "seconds": seconds,
                "seed": estimate.seed,
                "hvp_path": estimate.info.get("hvp_path", getattr(op, "hvp_path", None)),
            }
        )
        if not z <= Z_LIMIT:
            report.failures.append(
                f"{report.name}: {method} gave {estimate.value:.6g} ± {estimate.std_error:.3g}, "
                f"{z:.1f} standard errors from the exact trace {report.exact_trace:.6g} "
                f"(limit {Z_LIMIT:g})"
            )


def validate_case(
    case: Case, methods: list[str], num_matvecs: int, seed: int, progress: Progress
) -> CaseReport:
    op = HessianOperator(case.model, case.loss_fn, case.data)
    report = CaseReport(case.name, case.description, op.num_params, list(case.notes))
    progress.message(f"[{case.name}] exact trace of a {op.num_params} x {op.num_params} Hessian")
    forward_op = HessianOperator(case.model, case.loss_fn, case.data, hvp="forward-over-reverse")
    exact_diagonal = run_exact(forward_op, report, progress)
    progress.message(f"[{case.name}] estimators: {', '.join(methods)} at {num_matvecs} matvecs")
    run_estimators(op, report, methods, num_matvecs, seed)

    progress.message(f"[{case.name}] tolerance stop, per-module traces and the diagonal")
    row, failures = checks.check_adaptive(op, report.exact_trace, 10 * num_matvecs, seed, Z_LIMIT)
    report.estimates.append(row)
    report.block_estimates, block_failures = checks.check_blocks(op, exact_diagonal, num_matvecs, seed, Z_LIMIT)
    report.diagonal, diagonal_failures = checks.check_diagonal(op, exact_diagonal, num_matvecs, seed)
    for failure in failures + block_failures + diagonal_failures:
        report.failures.append(f"{case.name}: {failure}")
    report.hvp_path = op.hvp_path
    report.hvp_fallback = op.hvp_fallback
    return report


def format_report(report: CaseReport) -> str:
    """Render one case as a plain-text table."""
    lines = [f"== {report.name}: {report.description}"]
    lines += [f"   {note}" for note in report.notes]
    lines.append(f"   parameters P = {report.num_params}")
    path = report.hvp_path or "none"
    if report.hvp_fallback:
        path += f" (forward-over-reverse failed in {report.hvp_fallback})"
    lines.append(f"   Hessian-vector products of the estimators: {path}")
    for path, values in report.exact_paths.items():
        lines.append(f"   exact trace ({EXACT_PATH_LABELS.get(path, path):<27}) = {values['trace']:.12g}   [{values['seconds']:.2f} s]")
    lines.append(f"   exact paths agree to a relative difference of {report.exact_max_rel_diff:.1e}")
    if report.blocks is not None:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in report.blocks["shapes"].items())
        lines.append(f"   torch.func.hessian blocks: {shapes}")
        parts = " + ".join(f"{v:.6g} ({k})" for k, v in report.blocks["diagonal_block_traces"].items())
        lines.append(f"   trace = sum of the diagonal blocks' traces = {parts}")

    header = f"   {'estimator':<20} {'value ± std. error':>28} {'rel. error':>10} {'|z|':>6} {'matvecs':>8} {'time':>8}"
    lines += ["", header, "   " + "-" * (len(header) - 3)]
    for row in report.estimates:
        value = f"{row['value']:.6g} ± {row['std_error']:.2g}" if not row["exact"] else f"{row['value']:.6g} (exact)"
        lines.append(
            f"   {row['method']:<20} {value:>28} {row['rel_error']:>10.2e} {row['z']:>6.2f} "
            f"{row['num_matvecs']:>8d} {row['seconds']:>7.2f}s"
        )
    if report.block_estimates:
        lines += ["", f"   {'module':<12} {'exact trace':>14} {'estimate ± std. error':>28} {'|z|':>6}"]
        for row in report.block_estimates:
            value = f"{row['value']:.6g} (exact)" if row["std_error"] == 0 else f"{row['value']:.6g} ± {row['std_error']:.2g}"
            lines.append(f"   {row['block']:<12} {row['exact']:>14.6g} {value:>28} {row['z']:>6.2f}")
    if report.diagonal is not None:
        d = report.diagonal
        lines.append(
            f"\n   diagonal ({d['method']}, {d['num_matvecs']} matvecs): relative error "
            f"{d['rel_error']:.2e}, {d['fraction_within']:.1%} of entries within "
            f"{checks.DIAGONAL_Z:g} standard errors   [{d['seconds']:.2f} s]\n"
            "   (single entries need many more probes than the trace; the check is that "
            "each entry's error matches its own standard error)"
        )
    return "\n".join(lines)


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hutch validate", description=__doc__.split("\n\n")[0])
    parser.description = (
        "Compare exact and estimated Hessian traces on a toy layer and on digits "
        "classifiers. Exits 1 when exact paths disagree, when a trace, tolerance-stop "
        f"or per-module estimate lies more than {Z_LIMIT:g} standard errors from the exact "
        f"value, or when fewer than {checks.DIAGONAL_MIN_FRACTION:.0%} of the diagonal "
        f"estimate's entries lie within {checks.DIAGONAL_Z:g} standard errors of the exact diagonal; "
        "exits 2 on invalid options."
    )
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated cases to run, from {', '.join(CASES)} (default: all)")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help=f"comma-separated estimators, from {', '.join(ESTIMATORS)} (default: all)")
    parser.add_argument("--matvecs", type=int, default=100, help="Hessian-vector products each estimator spends (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed for model initialization, training and probes (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device to run on, such as cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float64", choices=sorted(DTYPES), help="floating-point type of models and data (default: float64)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH; '-' writes JSON alone to standard output and the tables to standard error")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; 1 is often much faster on a machine shared with other jobs (default: torch's own)")
    parser.add_argument("--quiet", action="store_true", help="do not report progress on standard error")
    return parser


def _parse_list(value: str, allowed, option: str, parser: argparse.ArgumentParser) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        parser.error(f"{option}: unknown or empty entries {unknown or value!r}; choose from {', '.join(allowed)}")
    return items


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the harness for parsed arguments; return the exit status."""
    cases = _parse_list(args.cases, CASES, "--cases", parser)
    methods = _parse_list(args.estimators, ESTIMATORS, "--estimators", parser)
    if args.matvecs < 4:
        parser.error(f"--matvecs must be at least 4 (Hutch++'s minimum); got {args.matvecs}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative; got {args.seed}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available in this torch build or machine; use --device cpu")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive int; got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    progress = Progress(quiet=args.quiet)
    # With --json -, standard output carries only the JSON document.
    out = sys.stderr if args.json == "-" else sys.stdout

    reports = []
    for name in cases:
        progress.message(f"[{name}] building the model and data")
        case = CASES[name](args.seed, device, dtype)
        report = validate_case(case, methods, args.matvecs, args.seed, progress)
        reports.append(report)
        print(format_report(report) + "\n", file=out, flush=True)

    failures = [failure for report in reports for failure in report.failures]
    if args.json:
        _write_json(args, reports, failures)
    if failures:
        print("FAILED:", file=out)
        for failure in failures:
            print(f"  - {failure}", file=out)
        return 1
    cases_text = "1 case" if len(reports) == 1 else f"{len(reports)} cases"
    print(f"OK: {cases_text}; exact paths agree, every trace and module trace lies within {Z_LIMIT:g} standard errors of the exact value, and the diagonal estimate is consistent with the exact diagonal", file=out)
    return 0


def _write_json(args: argparse.Namespace, reports: list[CaseReport], failures: list[str]) -> None:
    document = {
        "hutch_version": hutch.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "matvecs": args.matvecs,
        "z_limit": Z_LIMIT,
        "cases": [report.__dict__ for report in reports],
        "failures": failures,
        "ok": not failures,
    }
    text = json.dumps(document, indent=2, default=str)
    if args.json == "-":
        print(text)
    else:
        with open(args.json, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args, parser)


if __name__ == "__main__":
    sys.exit(main())
