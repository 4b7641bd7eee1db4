"""Print every number quoted in docs/hessian-structure.md.

The model, input and target are those of the ``linear`` case of
``hutch validate`` (``nn.Linear(2, 2)`` in float64 after
``torch.manual_seed(0)``, one input from a generator seeded with 0, target
class 1), so the traces printed here are the ones
``hutch validate --cases linear`` prints. The script checks that claim, and
each closed form it quotes, with assertions.

Run it from the repository root::

    python docs/examples/linear_structure.py

Matrices are printed with six decimals and traces with twelve significant
digits, as ``hutch validate`` prints them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import hutch
from hutch._cases import linear_case

# Agreement required between two computations of the same float64 quantity.
TOLERANCE = 1e-12


def format_number(value: float) -> str:
    # Adding 0.0 turns a negative zero into a positive one, so signs print the same everywhere.
    return f"{float(value) + 0.0: .6f}"


def print_matrix(label: str, matrix: torch.Tensor) -> None:
    """Print ``label`` and then one line per row of a 1-D or 2-D tensor."""
    print(label)
    rows = matrix.reshape(1, -1) if matrix.ndim == 1 else matrix
    for row in rows:
        print("   " + " ".join(format_number(v) for v in row))


def print_check(label: str, difference: float) -> None:
    """Print that two computations agree, and stop the script if they do not."""
    assert difference < TOLERANCE, f"{label}: max |difference| = {difference:.3g}"
    print(f"{label}: max |difference| < {TOLERANCE:.0e}")


def build_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Return the model, input and target of ``hutch validate --cases linear``."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    x = torch.rand(1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([1])
    return model, x, y


def check_same_as_harness(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    case = linear_case(seed=0, device=torch.device("cpu"), dtype=torch.float64)
    (case_x, case_y), = case.data
    for name, p in case.model.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name
    assert torch.equal(case_x, x)
    assert torch.equal(case_y, y)


def main() -> None:
    model, x, y = build_case()
    check_same_as_harness(model, x, y)

    # The loss as a function of a dict of parameters.
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    print("== the case")
    print_matrix("W = weight", params["weight"])
    print_matrix("b = bias", params["bias"])
    print_matrix("x", x[0])
    print(f"y = {y.item()}")
    z = functional_call(model, params, (x,))[0]
    p = torch.softmax(z, dim=0)
    print_matrix("z = W x + b", z)
    print_matrix("p = softmax(z)", p)
    print(f"L = {loss(params).item():.12g}")

    # torch.func.hessian of a function of a dict returns a dict of dicts.
    H = torch.func.hessian(loss)(params)
    print()
    print("== torch.func.hessian(loss)(params)")
    for a in H:
        for b in H[a]:
            print(f'H["{a}"]["{b}"].shape = {tuple(H[a][b].shape)}')
    print_matrix('H["bias"]["bias"]', H["bias"]["bias"])
    print_matrix('H["weight"]["weight"].reshape(4, 4)', H["weight"]["weight"].reshape(4, 4))
    print_matrix('H["weight"]["bias"].reshape(4, 2)', H["weight"]["bias"].reshape(4, 2))
    print(f'H["weight"]["bias"][0, 1, 1] = d2L / dW_01 db_1 = {format_number(H["weight"]["bias"][0, 1, 1])}')

    # hutch's flat layout: named_parameters() order, each parameter row-major.
    op = hutch.HessianOperator(model, F.cross_entropy, (x, y))
    print()
    print("== the flat layout")
    print(f"op.shape = {op.shape}")
    print(f"op.layout = {op.layout}")
    pieces = op.split(torch.arange(6.0, dtype=torch.float64))
    print_matrix('op.split(arange(6))["weight"]', pieces["weight"])
    print_matrix('op.split(arange(6))["bias"]', pieces["bias"])
    print_matrix("op.flatten(params)", op.flatten(params))

    # The flat (P, P) matrix and the nested blocks contain the same numbers.
    dense = op.to_dense()
    print()
    print("== the flat (P, P) Hessian")
    print_matrix("op.to_dense()", dense)
    nested = op.layout.to_nested(dense)
    print_check(
        "op.layout.to_nested(dense) vs torch.func.hessian",
        max(float((nested[a][b] - H[a][b]).abs().max()) for a in H for b in H[a]),
    )
    print_check("op.layout.from_nested(H) vs op.to_dense()", float((op.layout.from_nested(H) - dense).abs().max()))
    print_check(
        'op.layout.block(dense, "weight", "bias") vs H["weight"]["bias"]',
        float((op.layout.block(dense, "weight", "bias") - H["weight"]["bias"]).abs().max()),
    )
    weight, bias = op.layout.slot("weight"), op.layout.slot("bias")
    row, col = weight.offset + 0 * 2 + 1, bias.offset + 1
    print(f"dense[{row}, {col}] = {format_number(dense[row, col])}")

    # The trace is the sum of the diagonal blocks' traces.
    print()
    print("== the trace")
    weight_diagonal = torch.diagonal(H["weight"]["weight"].reshape(4, 4))
    bias_diagonal = torch.diagonal(H["bias"]["bias"])
    print_matrix('diagonal of H["weight"]["weight"].reshape(4, 4)', weight_diagonal)
    print_matrix('diagonal of H["bias"]["bias"]', bias_diagonal)
    print(f"trace of the weight block = {weight_diagonal.sum().item():.12g}")
    print(f"trace of the bias block   = {bias_diagonal.sum().item():.12g}")
    print(f"sum of the two            = {(weight_diagonal.sum() + bias_diagonal.sum()).item():.12g}")
    print(f"torch.trace(op.to_dense()) = {torch.trace(dense).item():.12g}")
    print(f"hutch.exact_trace(op)      = {hutch.exact_trace(op):.12g}")

    # Selecting one parameter gives its diagonal block as an operator of its own.
    weight_op = hutch.HessianOperator(model, F.cross_entropy, (x, y), params=["weight"])
    print(f'hutch.HessianOperator(..., params=["weight"]).shape = {weight_op.shape}')
    print_check(
        'its to_dense() vs H["weight"]["weight"].reshape(4, 4)',
        float((weight_op.to_dense() - H["weight"]["weight"].reshape(4, 4)).abs().max()),
    )

    # The closed form: the Hessian of cross-entropy in the logits is
    # A = diag(p) - p p^T, and z is linear in (W, b), so H = J^T A J.
    print()
    print("== the closed form")
    A = torch.diag(p) - torch.outer(p, p)
    xs = x[0]
    print_matrix("A = diag(p) - p p^T", A)
    closed_forms = [
        ('kron(A, x x^T) vs H["weight"]["weight"].reshape(4, 4)', torch.kron(A, torch.outer(xs, xs)), H["weight"]["weight"]),
        ('kron(A, x[:, None]) vs H["weight"]["bias"].reshape(4, 2)', torch.kron(A, xs[:, None]), H["weight"]["bias"]),
        ('kron(A, x[None, :]) vs H["bias"]["weight"].reshape(2, 4)', torch.kron(A, xs[None, :]), H["bias"]["weight"]),
        ('A vs H["bias"]["bias"]', A, H["bias"]["bias"]),
    ]
    for label, closed_form, block in closed_forms:
        print_check(label, float((closed_form - block.reshape(closed_form.shape)).abs().max()))

    # J = dz/dtheta in the flat order: dz_i/dW_kl = delta_ik x_l and dz_i/db_k = delta_ik.
    identity = torch.eye(2, dtype=torch.float64)
    J = torch.cat([torch.kron(identity, xs[None, :]), identity], dim=1)
    print_check("J^T A J vs op.to_dense()", float((J.T @ A @ J - dense).abs().max()))
    tr_A = float(torch.trace(A))
    x_squared = float(xs @ xs)
    print(f"tr(A) = 1 - |p|^2 = {tr_A:.12g}")
    print(f"|x|^2 = {x_squared:.12g}")
    print(f"tr(A) |x|^2       = {tr_A * x_squared:.12g}")
    print(f"tr(A) (1 + |x|^2) = {tr_A * (1 + x_squared):.12g}")
    eigenvalues = torch.linalg.eigvalsh(dense)
    rank = int((eigenvalues.abs() > TOLERANCE * eigenvalues.abs().max()).sum())
    print(f"rank of op.to_dense() = {rank}, largest eigenvalue = {eigenvalues.max().item():.12g}")

    # Cost of the dense matrix, and two estimators that never form it.
    print()
    print("== cost")
    print(f"P = {op.num_params}: P^2 = {op.num_params**2} entries, P = {op.num_params} HVPs for op.to_dense()")
    for num_params in (10**5, 10**6):
        print(f"P = {num_params:,}: the float32 matrix takes {4 * num_params**2 / 2**30:,.1f} GiB")
    print(f"hutch.hutchinson(op, 4, seed=0) = {hutch.hutchinson(op, 4, seed=0)}")
    print(f"hutch.hutchpp(op, 4, seed=0).value = {hutch.hutchpp(op, 4, seed=0).value:.12g}")


if __name__ == "__main__":
    main()
