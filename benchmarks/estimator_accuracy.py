"""Relative error against matvecs for every trace estimator, and confidence-interval coverage.

Two kinds of matrix, each with an exactly known trace:

- Synthetic: ``U diag(lambda) U^T`` of size 2,000 with U Haar-random, for
  eigenvalues ``i^-2`` (fast decay), ``exp(-i/5)`` (exponential decay) and
  the alternating, slowly decaying, negative-trace profile ``indefinite`` of
  ``tests/spectra.py``.
- The digits MLP Hessian: the ``mlp`` case of ``hutch validate``, an MLP
  64-32-10 with biases (P = 2,410) trained for 150 full-batch Adam steps on
  all 1,797 of scikit-learn's bundled digits, in float64, loss
  ``cross_entropy`` over all samples. The exact trace comes from
  :func:`hutch.exact_trace` on the matrix-free operator; the estimators run
  on the dense Hessian from :meth:`hutch.HessianOperator.to_dense`, which
  gives the same estimates as the operator (checked on one seed) in a
  fraction of the time.

Each estimator runs over 30 seeds per budget; XNysTrace only on the PSD
matrices. Coverage is measured over 500 or more runs: at a fixed budget of
102 for Hutchinson, Hutch++ and XTrace, and for the tolerance-driven
:func:`hutch.adaptive_trace`.

Writes ``docs/data/estimator_accuracy.json`` (with the machine and
versions), ``docs/data/estimator_accuracy.md`` and, from the JSON,
``docs/figures/estimator_accuracy.png``.

Usage::

    python benchmarks/estimator_accuracy.py              # everything, 55 min on a shared 2-core machine
    python benchmarks/estimator_accuracy.py --plot-only  # redraw the figure from the JSON
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import common

REPO_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_DIR / "tests"))
from spectra import matrix_with_spectrum, spectrum  # noqa: E402

import hutch  # noqa: E402
from hutch._cases import mlp_case  # noqa: E402

JSON_PATH = REPO_DIR / "docs" / "data" / "estimator_accuracy.json"
TABLE_PATH = REPO_DIR / "docs" / "data" / "estimator_accuracy.md"
FIGURE_PATH = REPO_DIR / "docs" / "figures" / "estimator_accuracy.png"

SIZE = 2000
BUDGETS = [12, 24, 51, 102, 204, 408]
BAR_BUDGET = 102
ESTIMATORS = {
    "hutchinson": hutch.hutchinson,
    "hutchpp": hutch.hutchpp,
    "xtrace": hutch.xtrace,
    "xnystrace": hutch.xnystrace,
}
SYNTHETIC = {
    "fast": ("eigenvalues i^-2", True),
    "exp": ("eigenvalues exp(-i/5)", True),
    "indefinite": ("(-1)^i i^-0.3 - 0.05, negative trace", False),
}
COVERAGE_LEVEL = 0.95
# Tolerance-driven runs: matrix and rtol, chosen so that runs need a few
# hundred probes, well below the size at which they switch to the exact trace.
ADAPTIVE_CASES = {"digits": 0.05, "slow": 0.005, "indefinite": 0.01}


def digits_hessian() -> tuple[torch.Tensor, float, dict]:
    """Build the validation harness's digits MLP and return its dense Hessian, exact trace and spectrum facts."""
    case = mlp_case(seed=0, device=torch.device("cpu"), dtype=torch.float64)
    model, data = case.model, case.data

    op = hutch.HessianOperator(model, case.loss_fn, data)
    start = time.perf_counter()
    exact = hutch.exact_trace(op)
    H = op.to_dense()
    seconds = time.perf_counter() - start

    # The dense path must give the operator's estimates.
    from_operator = hutch.hutchinson(op, 20, seed=0).value
    from_dense = hutch.hutchinson(H, 20, seed=0).value
    assert math.isclose(from_operator, from_dense, rel_tol=1e-9), (from_operator, from_dense)

    eigenvalues = torch.linalg.eigvalsh((H + H.T) / 2).flip(0)
    facts = {
        "num_params": op.num_params,
        "model": case.description,
        "notes": case.notes,
        "exact_trace": exact,
        "trace_of_dense": float(torch.trace(H)),
        "top10_share_of_trace": float(eigenvalues[:10].sum() / exact),
        "num_negative_eigenvalues": int((eigenvalues < 0).sum()),
        "largest_eigenvalue": float(eigenvalues[0]),
        "smallest_eigenvalue": float(eigenvalues[-1]),
        "exact_and_dense_seconds": seconds,
    }
    return H, exact, facts


def error_sweep(A: torch.Tensor, exact: float, names: list[str], num_seeds: int) -> dict:
    """Relative errors per estimator and budget over seeds 0..num_seeds-1."""
    results = {}
    for name in names:
        per_budget = {}
        for budget in BUDGETS:
            errors = [ESTIMATORS[name](A, budget, seed=seed).relative_error(exact) for seed in range(num_seeds)]
            per_budget[str(budget)] = {
                "median": statistics.median(errors),
                "p25": _quantile(errors, 0.25),
                "p75": _quantile(errors, 0.75),
            }
        results[name] = per_budget
    return results


def fixed_coverage(A: torch.Tensor, exact: float, runs: int) -> dict:
    """Fraction of runs at the bar budget whose 95% interval contains the exact trace."""
    out = {}
    for name in ("hutchinson", "hutchpp", "xtrace"):
        covered = 0
        for seed in range(runs):
            low, high = ESTIMATORS[name](A, BAR_BUDGET, seed=seed).confidence_interval(COVERAGE_LEVEL)
            covered += low <= exact <= high
        out[name] = {"runs": runs, "coverage": covered / runs}
    return out


def adaptive_coverage(A: torch.Tensor, exact: float, rtol: float, runs: int) -> dict:
    out = {}
    for method in ("hutchinson", "hutchpp"):
        covered, spent, unconverged, exact_switches = 0, [], 0, 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", hutch.ToleranceWarning)
            for seed in range(runs):
                est = hutch.adaptive_trace(
                    A, rtol=rtol, confidence=COVERAGE_LEVEL, method=method, seed=seed, max_matvecs=4000
                )
                low, high = est.confidence_interval(COVERAGE_LEVEL)
                covered += low <= exact <= high or (est.exact and math.isclose(est.value, exact, rel_tol=1e-9))
                spent.append(est.num_matvecs)
                unconverged += not est.info["converged"]
                exact_switches += est.exact
        out[method] = {
            "runs": runs,
            "rtol": rtol,
            "coverage": covered / runs,
            "median_matvecs": statistics.median(spent),
            "unconverged": unconverged,
            "exact_switches": exact_switches,
        }
    return out


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def bars(results: dict) -> list[dict]:
    """The accuracy bars at 102 matvecs, each with the measured ratio and whether it holds."""
    def median(matrix: str, name: str) -> float:
        return results["errors"][matrix][name][str(BAR_BUDGET)]["median"]

    checks = [
        ("digits", "hutchpp", "hutchinson", 1.2, "Hutch++ <= 1.2 x Hutchinson"),
        ("digits", "xtrace", "hutchinson", 1.2, "XTrace <= 1.2 x Hutchinson"),
        ("fast", "hutchpp", "hutchinson", 1 / 30, "Hutch++ <= Hutchinson / 30"),
        ("fast", "xtrace", "hutchinson", 1 / 30, "XTrace <= Hutchinson / 30"),
        ("exp", "xtrace", "hutchpp", 1 / 10, "XTrace <= Hutch++ / 10"),
    ]
    rows = []
    for matrix, name, reference, limit, text in checks:
        ratio = median(matrix, name) / median(matrix, reference)
        rows.append({"matrix": matrix, "bar": text, "ratio": ratio, "limit": limit, "holds": ratio <= limit})
    return rows


def markdown(results: dict) -> str:
    lines = [f"Machine: {common.describe_machine(results['environment'])}.", ""]
    for matrix, sweep in results["errors"].items():
        lines.append(f"**{results['matrices'][matrix]}**: median relative error over {results['seeds']} seeds")
        lines.append("")
        header = ["estimator"] + [str(b) for b in BUDGETS]
        rows = [[name] + [f"{sweep[name][str(b)]['median']:.2e}" for b in BUDGETS] for name in sweep]
        lines += [common.markdown_table(header, rows), ""]

    lines.append(f"**Bars at {BAR_BUDGET} matvecs** (ratio of median relative errors)")
    lines.append("")
    rows = [[b["matrix"], b["bar"], f"{b['ratio']:.3g}", "yes" if b["holds"] else "no"] for b in results["bars"]]
    lines += [common.markdown_table(["matrix", "bar", "ratio", "holds"], rows), ""]

    lines.append(f"**Coverage of the {COVERAGE_LEVEL:.0%} interval**")
    lines.append("")
    rows = []
    for matrix, per_method in results["coverage"]["fixed"].items():
        for name, c in per_method.items():
            rows.append([matrix, f"{name}, {BAR_BUDGET} matvecs", str(c["runs"]), f"{c['coverage']:.3f}", "", ""])
    for matrix, per_method in results["coverage"]["adaptive"].items():
        for name, c in per_method.items():
            rows.append([
                matrix, f"adaptive {name}, rtol {c['rtol']}", str(c["runs"]), f"{c['coverage']:.3f}",
                f"{c['median_matvecs']:.0f}", f"{c['unconverged']} / {c['exact_switches']}",
            ])
    header = ["matrix", "estimator", "runs", "coverage", "median matvecs", "unconverged / exact"]
    lines += [common.markdown_table(header, rows), ""]
    return "\n".join(lines)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    matrices = list(results["errors"])
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), sharex=True)
    for ax, matrix in zip(axes, matrices):
        for name, per_budget in results["errors"][matrix].items():
            budgets = [int(b) for b in per_budget]
            medians = [per_budget[b]["median"] for b in per_budget]
            ax.plot(budgets, medians, marker="o", label=name)
            ax.fill_between(budgets, [v["p25"] for v in per_budget.values()],
                            [v["p75"] for v in per_budget.values()], alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(results["budgets"], [str(b) for b in results["budgets"]])
        ax.set_title(results["matrices"][matrix], fontsize=9)
        ax.set_xlabel("matvecs")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"relative error (median, 25-75% band, {results['seeds']} seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    FIGURE_PATH.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE_PATH, dpi=120)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=30, help="seeds per estimator and budget (default 30)")
    parser.add_argument("--runs", type=int, default=500, help="runs per coverage measurement (default 500)")
    parser.add_argument("--fixed-runs", type=int, default=1000, help="runs per fixed-budget coverage (default 1000)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON and exit")
    args = parser.parse_args(argv)

    if args.plot_only:
        plot(json.loads(JSON_PATH.read_text()))
        return

    torch.set_num_threads(args.threads)
    results = {
        "environment": common.environment("cpu", args.threads),
        "seeds": args.seeds,
        "budgets": BUDGETS,
        "matrices": {},
        "errors": {},
        "coverage": {"level": COVERAGE_LEVEL, "fixed": {}, "adaptive": {}},
    }
    matrices = {}
    for kind, (text, psd) in SYNTHETIC.items():
        eigenvalues = spectrum(kind, SIZE)
        matrices[kind] = (matrix_with_spectrum(eigenvalues, seed=0), float(eigenvalues.sum()), psd)
        results["matrices"][kind] = f"n = {SIZE}, {text}"

    H, exact, facts = digits_hessian()
    matrices["digits"] = (H, exact, False)
    results["digits_hessian"] = facts
    results["matrices"]["digits"] = f"digits MLP Hessian, P = {facts['num_params']:,}"
    print(f"digits Hessian: {facts}", flush=True)

    for matrix, (A, trace, psd) in matrices.items():
        start = time.perf_counter()
        names = [n for n in ESTIMATORS if psd or n != "xnystrace"]
        results["errors"][matrix] = error_sweep(A, trace, names, args.seeds)
        print(f"{matrix}: error sweep in {time.perf_counter() - start:.0f} s", flush=True)

    results["bars"] = bars(results)
    start = time.perf_counter()
    results["coverage"]["fixed"]["digits"] = fixed_coverage(H, exact, args.fixed_runs)
    print(f"fixed-budget coverage in {time.perf_counter() - start:.0f} s", flush=True)

    slow = spectrum("slow", SIZE)
    adaptive_matrices = {
        "digits": (H, exact),
        "slow": (matrix_with_spectrum(slow, seed=0), float(slow.sum())),
        "indefinite": matrices["indefinite"][:2],
    }
    results["matrices"]["slow"] = f"n = {SIZE}, eigenvalues i^-0.5"
    for matrix, rtol in ADAPTIVE_CASES.items():
        start = time.perf_counter()
        A, trace = adaptive_matrices[matrix]
        results["coverage"]["adaptive"][matrix] = adaptive_coverage(A, trace, rtol, args.runs)
        print(f"{matrix}: adaptive coverage in {time.perf_counter() - start:.0f} s", flush=True)

    common.write_json(JSON_PATH, results)
    TABLE_PATH.write_text(markdown(results))
    plot(results)
    print(TABLE_PATH.read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
