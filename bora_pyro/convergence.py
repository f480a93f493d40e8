"""When a fit has converged: the trend of the ELBO within its noise, and why a fit stopped.

A step's ELBO is a one-batch estimate: its noise (different documents each step, and the guide's
draws) dwarfs the late gain of a step. Over the last ``window`` steps, with ELBO values
``y_t`` at steps ``t``, the least-squares line ``y ≈ a + b·t`` gives

    slope b,   noise sd s = sd of the residuals,   se(b) = s / sqrt(Σ_t (t − t̄)²).

The ELBO is *flat* when ``b ≤ 2·se(b)``: no rise the noise cannot explain (over a window of W
steps this is a total rise below ~7·s/√W, 0.5 s at W = 200); it is *rising* when ``b > 2·se(b)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

#: What stopped a fit: validation patience ran out, the ELBO went flat, the step cap was reached.
STOPPED_BY = ("patience", "elbo", "cap")
#: Fewest steps whose trend is read (fewer: neither flat nor rising can be told).
MIN_TREND_STEPS = 10
SIGNIFICANCE = 2.0  #: standard errors a slope must exceed to count as a rise


def default_window(eval_every: int) -> int:
    """Steps over which the ELBO's trend is read: two validation intervals, at least 100 steps."""
    return max(100, 2 * eval_every)


@dataclass
class ElboTrend:
    """The ELBO's trend over its last ``steps`` values (see the module docstring).

    Attributes:
        final: the fitted line's value at the last step (the smoothed final ELBO).
        slope_per_100_steps: 100·b.
        noise_sd: s, the per-step noise of the ELBO estimate around the line.
        rising: b > 2·se(b).
        converged: a full window was read and it is not rising.
    """

    final: float
    slope_per_100_steps: float
    noise_sd: float
    steps: int
    rising: bool
    converged: bool

    def to_json(self) -> dict:
        return {"converged": self.converged, "final": self.final, "slope_per_100_steps": self.slope_per_100_steps,
                "noise_sd": self.noise_sd, "window": self.steps, "rising": self.rising}


def elbo_trend(elbos: Sequence[float], window: int) -> ElboTrend | None:
    """The trend of the last ``window`` ELBO values (all of them when fewer); None for fewer than
    :data:`MIN_TREND_STEPS` or non-finite values."""
    values = list(elbos[-window:])
    count = len(values)
    if count < MIN_TREND_STEPS or not all(math.isfinite(v) for v in values):
        return None
    mean_t, mean_y = (count - 1) / 2, sum(values) / count
    spread_t = sum((t - mean_t) ** 2 for t in range(count))
    slope = sum((t - mean_t) * (y - mean_y) for t, y in enumerate(values)) / spread_t
    residuals = [y - mean_y - slope * (t - mean_t) for t, y in enumerate(values)]
    noise_sd = math.sqrt(sum(r * r for r in residuals) / (count - 2))
    rising = slope > SIGNIFICANCE * noise_sd / math.sqrt(spread_t)
    return ElboTrend(final=mean_y + slope * (count - 1 - mean_t), slope_per_100_steps=100 * slope,
                     noise_sd=noise_sd, steps=count, rising=rising, converged=count >= window and not rising)


def cap_warning(steps: int, trend: ElboTrend | None, validation_best_at_end: bool) -> str | None:
    """The one-line warning for a fit the step cap stopped while still improving, or None."""
    reasons = []
    if validation_best_at_end:
        reasons.append("its validation perplexity was best at the last check")
    if trend is not None and trend.rising:
        reasons.append(f"its ELBO still rose {trend.slope_per_100_steps:.4g} per 100 steps (noise sd {trend.noise_sd:.4g})")
    if not reasons:
        return None
    return (f"the fit reached its step cap ({steps} steps) while still improving: {' and '.join(reasons)}; "
            "it has not converged: give it more steps (--steps/--epochs) or a larger learning rate")
