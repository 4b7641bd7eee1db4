"""The validation harness: all cases pass, and each kind of failure is reported."""

import json
import math
import subprocess
import sys

import pytest
import torch

import hutch
from hutch import validate
from hutch.result import TraceEstimate


def test_harness_all_cases_exit_zero(tmp_path, capsys):
    path = tmp_path / "report.json"
    status = validate.main(["--matvecs", "60", "--json", str(path), "--quiet"])
    output = capsys.readouterr().out

    assert status == 0
    assert "OK: 3 cases" in output
    document = json.loads(path.read_text())
    assert document["ok"] is True
    assert [case["name"] for case in document["cases"]] == ["linear", "mlp", "cnn"]
    for case in document["cases"]:
        assert case["exact_max_rel_diff"] < 1e-9
        assert {row["method"] for row in case["estimates"]} == {
            "hutchinson", "hutchpp", "xtrace", "adaptive (rtol 0.05)"
        }
        for row in case["estimates"]:
            assert row["z"] <= validate.Z_LIMIT
        for row in case["block_estimates"]:
            assert row["z"] <= validate.Z_LIMIT
        assert case["diagonal"]["fraction_within"] >= 0.9


def test_linear_case_reports_nested_blocks(capsys):
    status = validate.main(["--cases", "linear", "--quiet"])
    output = capsys.readouterr().out

    assert status == 0
    assert "weight/weight (2, 2, 2, 2)" in output
    assert "weight/bias (2, 2, 2)" in output
    assert "bias/weight (2, 2, 2)" in output
    assert "bias/bias (2, 2)" in output
    assert "func.hessian" in output


def test_linear_case_trace_matches_func_hessian():
    case = validate.CASES["linear"](0, torch.device("cpu"), torch.float64)
    inputs, targets = case.data[0]
    params = {name: p.detach() for name, p in case.model.named_parameters()}

    def loss(p):
        return case.loss_fn(torch.func.functional_call(case.model, p, (inputs,)), targets)

    nested = torch.func.hessian(loss)(params)
    expected = float(
        torch.trace(nested["weight"]["weight"].reshape(4, 4)) + torch.trace(nested["bias"]["bias"])
    )
    op = hutch.HessianOperator(case.model, case.loss_fn, case.data)

    assert hutch.exact_trace(op) == pytest.approx(expected, rel=1e-12)


def test_biased_estimate_fails(monkeypatch, capsys):
    def biased(A, num_matvecs, **kwargs):
        exact = hutch.exact_trace(A)
        return TraceEstimate(exact + 1.0, 0.01, num_matvecs, "biased", num_matvecs)

    monkeypatch.setitem(validate.ESTIMATORS, "hutchinson", biased)
    status = validate.main(["--cases", "linear", "--estimators", "hutchinson", "--quiet"])
    output = capsys.readouterr().out

    assert status == 1
    assert "FAILED" in output
    assert "linear: hutchinson gave" in output
    assert "standard errors from the exact trace" in output


def test_biased_block_trace_fails(monkeypatch, capsys):
    original = validate.checks.hutch.block_traces

    def shifted(op, num_matvecs, **kwargs):
        parts = original(op, num_matvecs, **kwargs)
        first = next(iter(parts))
        estimate = parts[first]
        parts._estimates[first] = TraceEstimate(
            estimate.value + 1.0, 0.01, estimate.num_matvecs, estimate.method, estimate.num_samples
        )
        return parts

    monkeypatch.setattr(validate.checks.hutch, "block_traces", shifted)
    status = validate.main(["--cases", "linear", "--quiet"])
    output = capsys.readouterr().out

    assert status == 1
    assert "block trace of module" in output
    assert "block traces sum to" in output


def test_wrong_diagonal_fails(monkeypatch, capsys):
    def wrong(op, num_matvecs, **kwargs):
        return hutch.DiagonalEstimate(
            values=torch.full((op.num_params,), 100.0, dtype=op.dtype),
            std_error=torch.full((op.num_params,), 0.01, dtype=op.dtype),
            num_matvecs=num_matvecs, method="wrong", num_samples=num_matvecs,
        )

    monkeypatch.setattr(validate.checks.hutch, "diagonal", wrong)
    status = validate.main(["--cases", "linear", "--quiet"])
    output = capsys.readouterr().out

    assert status == 1
    assert "diagonal estimate: only 0.0% of entries" in output


def test_disagreeing_exact_paths_fail(monkeypatch, capsys):
    original = validate.double_backward_diagonal

    def perturbed(op, progress, chunk=32):
        return original(op, progress, chunk) * 1.001

    monkeypatch.setattr(validate, "double_backward_diagonal", perturbed)
    status = validate.main(["--cases", "linear", "--quiet"])
    output = capsys.readouterr().out

    assert status == 1
    assert "linear: exact paths disagree" in output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases", "resnet"], "--cases: unknown or empty entries"),
        (["--estimators", "magic"], "--estimators: unknown or empty entries"),
        (["--matvecs", "2"], "--matvecs must be at least 4"),
        (["--seed", "-1"], "--seed must be non-negative"),
        (["--device", "nonsense"], "is not a torch device"),
        (["--threads", "0"], "--threads must be a positive int"),
    ],
)
def test_bad_options_exit_two(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        validate.main(argv + ["--quiet"])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_without_gpu_exits_two(capsys):
    with pytest.raises(SystemExit) as raised:
        validate.main(["--device", "cuda", "--quiet"])
    assert raised.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_float32_run_passes(capsys):
    status = validate.main(["--cases", "linear", "--dtype", "float32", "--quiet"])
    assert status == 0


def test_module_entry_point_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "hutch.validate", "--cases", "linear", "--json", "-", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["ok"] is True
    assert math.isfinite(document["cases"][0]["exact_trace"])


def test_cli_validate_subcommand_runs(capsys):
    from hutch import cli

    status = cli.main(["validate", "--cases", "linear", "--quiet"])
    assert status == 0
    assert "OK: 1 case;" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_harness_on_cuda(capsys):
    assert validate.main(["--device", "cuda", "--quiet"]) == 0
