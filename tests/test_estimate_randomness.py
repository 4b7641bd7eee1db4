"""Every estimator fixes a dropout model's randomness from its own seed and records the HVP path."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import hutch


def dropout_model() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    return model.train()


def data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(20, 6, generator=generator, dtype=torch.float64), torch.arange(20) % 3


ESTIMATES = {
    "hutchinson": lambda op, seed: hutch.hutchinson(op, 10, seed=seed),
    "hutchpp": lambda op, seed: hutch.hutchpp(op, 12, seed=seed),
    "xtrace": lambda op, seed: hutch.xtrace(op, 12, seed=seed),
    "adaptive": lambda op, seed: hutch.adaptive_trace(op, rtol=0.5, max_matvecs=40, seed=seed),
    "diagonal": lambda op, seed: hutch.diagonal(op, 10, seed=seed),
}


@pytest.mark.parametrize("name", sorted(ESTIMATES))
def test_estimate_reproducible_from_seed(name):
    model = dropout_model()
    estimate = ESTIMATES[name]

    first = estimate(hutch.HessianOperator(model, F.cross_entropy, data()), 7)
    second = estimate(hutch.HessianOperator(model, F.cross_entropy, data()), 7)

    if name == "diagonal":
        assert torch.equal(first.values, second.values)
    else:
        assert first.value == second.value
    assert first.info["hvp_path"] in hutch.operator.HVP_PATHS


@pytest.mark.parametrize("name", sorted(ESTIMATES))
def test_estimate_global_rng_untouched(name):
    model = dropout_model()
    op = hutch.HessianOperator(model, F.cross_entropy, data())
    state = torch.get_rng_state()

    ESTIMATES[name](op, 3)

    assert torch.equal(torch.get_rng_state(), state)
