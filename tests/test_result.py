"""TraceEstimate: conversion, Student-t confidence intervals, the exact case and level checks."""

import dataclasses
import math

import pytest
import torch

import hutch
from hutch import TraceEstimate


def estimate(**overrides):
    fields = dict(value=10.0, std_error=0.5, num_matvecs=10, method="hutchinson", num_samples=10)
    fields.update(overrides)
    return TraceEstimate(**fields)


def test_float_conversion():
    assert float(estimate(value=3.25)) == 3.25
    assert math.isclose(2.0 * float(estimate()), 20.0)


def test_interval_uses_student_t():
    # t quantiles from a printed table: t_{0.95, 9} = 1.833, t_{0.975, 4} = 2.776.
    low, high = estimate(num_samples=10).confidence_interval(0.9)
    assert high - 10.0 == pytest.approx(1.833 * 0.5, abs=1e-3)
    assert 10.0 - low == pytest.approx(high - 10.0, rel=1e-12)

    low, high = estimate(num_samples=5).confidence_interval()
    assert (high - low) / 2 == pytest.approx(2.776 * 0.5, abs=1e-3)


def test_interval_approaches_normal_for_many_samples():
    low, high = estimate(num_samples=100_000).confidence_interval(0.95)
    assert (high - low) / 2 == pytest.approx(1.95996 * 0.5, abs=1e-4)


def test_interval_widens_with_level():
    est = estimate()
    widths = [est.confidence_interval(level)[1] - est.confidence_interval(level)[0] for level in (0.5, 0.9, 0.99)]
    assert widths == sorted(widths)


def test_exact_interval_is_a_point():
    est = estimate(std_error=0.0, exact=True, num_samples=50)
    assert est.confidence_interval(0.99) == (10.0, 10.0)


def test_exact_estimator_result_interval():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    est = hutch.hutchinson(A, 5, seed=0)
    assert est.exact
    assert est.confidence_interval() == (15.0, 15.0)
    assert "exact" in str(est)


def test_interval_without_std_error_is_unbounded():
    assert estimate(std_error=math.nan, num_samples=1).confidence_interval() == (-math.inf, math.inf)
    assert estimate(num_samples=1).confidence_interval() == (-math.inf, math.inf)


@pytest.mark.parametrize("level", [0, 1, 1.0, -0.5, 1.5, math.nan, "0.95", None, True])
def test_rejects_bad_level(level):
    with pytest.raises(ValueError, match=r"level must be a probability strictly between 0 and 1; got .*level=0.95"):
        estimate().confidence_interval(level)


def test_relative_error():
    assert estimate(value=11.0).relative_error(10.0) == pytest.approx(0.1)
    assert estimate(value=-9.0).relative_error(-10.0) == pytest.approx(0.1)


def test_string_forms():
    assert str(estimate()) == "10 ± 0.5 (hutchinson, 10 matvecs)"
    assert str(estimate(exact=True, std_error=0.0)) == "10 (exact, 10 matvecs)"
    assert str(estimate(info={"converged": False})) == "10 ± 0.5 (hutchinson, 10 matvecs, tolerance not met)"
    assert str(estimate(info={"converged": True})) == "10 ± 0.5 (hutchinson, 10 matvecs)"


def test_frozen_and_info_not_compared():
    est = estimate(info={"a": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.value = 1.0
    assert est == estimate(info={"b": 2})
