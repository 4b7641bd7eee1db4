"""The documentation pages: their numbers, snippets and coverage of the public API.

docs/hessian-structure.md quotes numbers printed by
docs/examples/linear_structure.py. These tests run the script, recompute
what it prints from the harness's ``linear`` case, and check that the page
quotes the script's current output, that its code snippets run, and that
docs/api.md documents every name in ``hutch.__all__``.
"""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import hutch
from hutch import validate
from hutch._cases import linear_case

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "examples" / "linear_structure.py"
STRUCTURE_PAGE = ROOT / "docs" / "hessian-structure.md"
API_PAGE = ROOT / "docs" / "api.md"

# The script prints matrix entries with six decimals and traces with twelve significant digits.
ENTRY_TOLERANCE = 5e-7
TRACE_RTOL = 1e-11
NUMBER = re.compile(r"(?<![\w.])[-−]?\d[\d,]*\.\d+(?:e[-+]?\d+)?")


@pytest.fixture(scope="module")
def output() -> str:
    """Standard output of the example script, run as a user runs it."""
    completed = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.fixture(scope="module")
def reference():
    """The harness's linear case, its operator, dense Hessian and nested blocks."""
    case = linear_case(seed=0, device=torch.device("cpu"), dtype=torch.float64)
    (x, y), = case.data
    op = hutch.HessianOperator(case.model, case.loss_fn, case.data)
    params = {name: p.detach() for name, p in case.model.named_parameters()}

    def loss(params):
        return F.cross_entropy(functional_call(case.model, params, (x,)), y)

    nested = torch.func.hessian(loss)(params)
    z = functional_call(case.model, params, (x,))[0]
    return {"op": op, "dense": op.to_dense(), "nested": nested, "x": x[0], "p": torch.softmax(z, dim=0)}


def read_matrix(output: str, label: str) -> torch.Tensor:
    """Return the rows of numbers printed on the lines after the line ``label``."""
    lines = output.splitlines()
    assert label in lines, f"the script printed no line {label!r}"
    rows = []
    for line in lines[lines.index(label) + 1 :]:
        if not line.startswith("   "):
            break
        rows.append([float(value) for value in line.split()])
    return torch.tensor(rows, dtype=torch.float64)


def read_value(output: str, label: str) -> str:
    """Return what follows ``label = `` on the script's line that starts with ``label``."""
    for line in output.splitlines():
        if line.startswith(label) and " = " in line:
            return line.rsplit(" = ", 1)[1]
    raise AssertionError(f"the script printed no line starting with {label!r}")


def markdown_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


def test_script_dense_matrix_matches_operator(output, reference):
    printed = read_matrix(output, "op.to_dense()")

    assert printed.shape == (6, 6)
    assert torch.allclose(printed, reference["dense"], rtol=0, atol=ENTRY_TOLERANCE)


def test_script_blocks_match_func_hessian(output, reference):
    nested = reference["nested"]
    for a in nested:
        for b in nested[a]:
            assert read_value(output, f'H["{a}"]["{b}"].shape') == str(tuple(nested[a][b].shape))

    printed_weight = read_matrix(output, 'H["weight"]["weight"].reshape(4, 4)')
    printed_cross = read_matrix(output, 'H["weight"]["bias"].reshape(4, 2)')
    printed_bias = read_matrix(output, 'H["bias"]["bias"]')
    assert torch.allclose(printed_weight, nested["weight"]["weight"].reshape(4, 4), rtol=0, atol=ENTRY_TOLERANCE)
    assert torch.allclose(printed_cross, nested["weight"]["bias"].reshape(4, 2), rtol=0, atol=ENTRY_TOLERANCE)
    assert torch.allclose(printed_bias, nested["bias"]["bias"], rtol=0, atol=ENTRY_TOLERANCE)


def test_script_index_example_matches_dense(output, reference):
    dense, nested = reference["dense"], reference["nested"]
    by_index = float(read_value(output, 'H["weight"]["bias"][0, 1, 1]'))
    by_flat_index = float(read_value(output, "dense[1, 5]"))

    assert by_index == pytest.approx(float(nested["weight"]["bias"][0, 1, 1]), abs=ENTRY_TOLERANCE)
    assert by_flat_index == pytest.approx(float(dense[1, 5]), abs=ENTRY_TOLERANCE)


def test_script_layout_matches_operator(output, reference):
    op = reference["op"]

    assert read_value(output, "op.layout") == repr(op.layout)
    assert read_value(output, "op.shape") == str(op.shape)


def test_script_traces_match_operator(output, reference):
    op, dense = reference["op"], reference["dense"]
    weight_trace = float(torch.trace(op.layout.block(dense, "weight", "weight").reshape(4, 4)))
    bias_trace = float(torch.trace(op.layout.block(dense, "bias", "bias")))
    total = float(torch.trace(dense))

    assert float(read_value(output, "trace of the weight block")) == pytest.approx(weight_trace, rel=TRACE_RTOL)
    assert float(read_value(output, "trace of the bias block")) == pytest.approx(bias_trace, rel=TRACE_RTOL)
    assert float(read_value(output, "sum of the two")) == pytest.approx(total, rel=TRACE_RTOL)
    assert float(read_value(output, "hutch.exact_trace(op)")) == pytest.approx(total, rel=TRACE_RTOL)
    assert float(read_value(output, "tr(A) (1 + |x|^2)")) == pytest.approx(total, rel=TRACE_RTOL)


def test_script_closed_form_matches_operator(output, reference):
    p, x, dense = reference["p"], reference["x"], reference["dense"]
    A = torch.diag(p) - torch.outer(p, p)

    assert torch.allclose(read_matrix(output, "p = softmax(z)")[0], p, rtol=0, atol=ENTRY_TOLERANCE)
    assert torch.allclose(read_matrix(output, "A = diag(p) - p p^T"), A, rtol=0, atol=ENTRY_TOLERANCE)
    assert float(read_value(output, "|x|^2")) == pytest.approx(float(x @ x), rel=TRACE_RTOL)
    assert read_value(output, "rank of op.to_dense()").startswith("1.07015")
    assert "rank of op.to_dense() = 1," in output
    assert int(torch.linalg.matrix_rank(dense)) == 1


def test_script_estimates_match_estimators(output, reference):
    op = reference["op"]

    assert read_value(output, "hutch.hutchinson(op, 4, seed=0)") == str(hutch.hutchinson(op, 4, seed=0))
    printed_hutchpp = float(read_value(output, "hutch.hutchpp(op, 4, seed=0).value"))
    assert printed_hutchpp == pytest.approx(hutch.hutchpp(op, 4, seed=0).value, rel=TRACE_RTOL)


def test_structure_page_quotes_current_output(output):
    quoted = markdown_blocks(STRUCTURE_PAGE, "text")[-1]

    assert quoted == output, (
        "the output quoted at the end of docs/hessian-structure.md differs from what "
        "docs/examples/linear_structure.py prints now; rerun the script and paste its output"
    )


def test_structure_page_numbers_come_from_script(output):
    page = STRUCTURE_PAGE.read_text(encoding="utf-8")
    validate_block = markdown_blocks(STRUCTURE_PAGE, "text")[-2]
    text = re.sub(r"torch \d+\.\d+\.\d+", "", page.replace(validate_block, ""))
    # Numbers in code are inputs; numbers in code comments are quoted results.
    for block in markdown_blocks(STRUCTURE_PAGE, "python"):
        comments = [line.split("#", 1)[1] for line in block.splitlines() if "#" in line]
        text = text.replace(block, "\n".join(comments))
    printed = {number.replace("−", "-") for number in NUMBER.findall(output)}

    quoted = {number.replace("−", "-") for number in NUMBER.findall(text)}
    assert quoted, "found no decimal numbers in docs/hessian-structure.md"
    assert sorted(quoted - printed) == []


def test_structure_page_snippets_run():
    namespace: dict = {}
    for block in markdown_blocks(STRUCTURE_PAGE, "python"):
        exec(compile(block, str(STRUCTURE_PAGE), "exec"), namespace)

    assert set(namespace["H"]) == {"weight", "bias"}


def test_structure_page_validate_lines_current(capsys, reference):
    quoted = markdown_blocks(STRUCTURE_PAGE, "text")[-2]
    status = validate.main(["--cases", "linear", "--estimators", "hutchinson", "--quiet"])
    printed = capsys.readouterr().out
    exact_trace = float(torch.trace(reference["dense"]))

    assert status == 0
    for line in quoted.splitlines():
        assert line in printed.splitlines(), f"hutch validate --cases linear no longer prints {line!r}"
    for value in re.findall(r"exact trace \(.*\) = (\S+)", printed):
        assert float(value) == pytest.approx(exact_trace, rel=TRACE_RTOL)
        assert value in STRUCTURE_PAGE.read_text(encoding="utf-8")


def test_api_page_names_every_public_name():
    page = API_PAGE.read_text(encoding="utf-8")
    headings = set(re.findall(r"^#+ `(\w+)`", page, flags=re.M))

    assert sorted(set(hutch.__all__) - headings) == [], "docs/api.md lacks a section for these names"


def test_api_page_examples_pass_doctest():
    # Fence lines would otherwise read as the expected output of the example above them.
    text = re.sub(r"^```.*$", "", API_PAGE.read_text(encoding="utf-8"), flags=re.M)
    test = doctest.DocTestParser().get_doctest(text, {}, "docs/api.md", str(API_PAGE), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)

    assert runner.tries > 0
    assert runner.failures == 0, "an example in docs/api.md failed; its report is in the captured output"


def test_readme_snippets_run_in_sequence():
    """The README's Python blocks, pasted one after the other, run and give finite estimates."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    # The low-memory block reuses the first block's data, so both estimate the same Hessian's trace.
    assert namespace["est"].method == "hutchinson"
    assert namespace["est"].num_matvecs == 100
    assert torch.isfinite(torch.tensor(namespace["est"].value))
