"""The result type shared by every trace estimator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from scipy import stats


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error and cost.

    ``float(estimate)`` gives ``value``, so a result can be used where a
    number is expected.

    Attributes:
        value: The estimate of the trace.
        std_error: Estimated standard error of ``value``, from the sample
            variance of the probe terms; 0 when the value is exact, ``nan``
            when there were too few probe terms to estimate it.
        num_matvecs: Matrix-vector products spent, counting one per column
            of every block passed to ``matmat``.
        method: Name of the estimator that produced the value.
        num_samples: Number of independent probe terms behind ``std_error``.
        exact: Whether ``value`` is the exact trace (the budget covered the
            dimension), up to floating-point rounding.
        seed: The seed the probes were drawn from, or ``None`` when the
            caller passed a ``torch.Generator``.
        info: Estimator-specific details, such as the Hutch++ budget split.
    """

    value: float
    std_error: float
    num_matvecs: int
    method: str
    num_samples: int
    exact: bool = False
    seed: Optional[int] = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __float__(self) -> float:
        return self.value

    def confidence_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Return a two-sided confidence interval for the trace.

        The interval is ``value ± t * std_error`` with ``t`` the quantile of
        Student's t distribution with ``num_samples - 1`` degrees of freedom,
        which accounts for the standard error itself being estimated from the
        probes. It relies on the central limit theorem, so it is approximate
        for few probes and heavy-tailed probe terms.

        Args:
            level: Coverage probability, strictly between 0 and 1.

        Raises:
            ValueError: If ``level`` is not in (0, 1).
        """
        if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
            raise ValueError(
                f"level must be a probability strictly between 0 and 1; got {level!r}. "
                "Use, for example, level=0.95"
            )
        if self.exact or self.std_error == 0.0:
            return (self.value, self.value)
        if self.num_samples < 2 or math.isnan(self.std_error):
            return (-math.inf, math.inf)
        t = float(stats.t.ppf(0.5 + level / 2.0, df=self.num_samples - 1))
        return (self.value - t * self.std_error, self.value + t * self.std_error)

    def relative_error(self, reference: float) -> float:
        """Return ``|value - reference| / |reference|``."""
        return abs(self.value - reference) / abs(reference)

    def __str__(self) -> str:
        if self.exact:
            return f"{self.value:.6g} (exact, {self.num_matvecs} matvecs)"
        details = f"{self.method}, {self.num_matvecs} matvecs"
        if self.info.get("converged") is False:
            details += ", tolerance not met"
        return f"{self.value:.6g} ± {self.std_error:.2g} ({details})"
