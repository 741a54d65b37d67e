"""Forecast the onset of memorization from precursors measured before it.

Before the first generated sample copies a training image, the fixed-seed samples approach the
training set: each seed's ratio ``d1/d2`` (distance to the nearest training image over the distance
to the second nearest) falls towards the memorization threshold 1/3 (Gu et al. 2023; Bonnaire et
al. 2025). The closest seeds' ratios are a precursor of the first copies: :func:`precursor` takes a low
quantile of them (the smallest) and, so that one noisy sample moves it less, the geometric mean of it and the
next closest (``closest``). :func:`forecast_onset` fits a straight line to that precursor (in log
space, where the approach to zero is steady) over the last few probes and returns the step at which
the line reaches the threshold, with a band from the fit's uncertainty.

A flat or noisy series gives *no* forecast: the line's fall must be significant (one-sided 95%), the
band's early edge must lie ahead of the current step (unless the precursor is already within its noise of
the threshold), and the crossing may lie at most ``max_extrapolation`` times the fit's own span ahead: a
slow drift far from the threshold, as in runs that never memorize, is not extrapolated into a warning.

Two fits are offered (``method``): least squares (``ols``: the slope at least ``t`` standard errors below
zero; the band from the inverse prediction's standard error), and the robust ``theil_sen`` line: Sen's
(1968) median of pairwise slopes with its 95% interval, the fall tested by the Mann-Kendall test (Kendall's
tau of the series against step, exact one-sided p <= 0.05), the band from the slope's interval. On few,
noisy points the robust fit is not pulled by one outlying probe.

Example:
    >>> steps = [200, 400, 600]
    >>> ratios = [{0: 0.80, 1: 0.90}, {0: 0.60, 1: 0.85}, {0: 0.45, 1: 0.80}]
    >>> f = forecast_onset(list(zip(steps, ratios)), quantile=0.0)
    >>> 800 < f.onset < 1000, f.low <= f.onset <= f.high
    (True, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from memwatch.errors import MemwatchError

#: The fits :func:`forecast_onset` offers.
METHODS = ("ols", "theil_sen")
#: The fewest probes a line is fitted through: a forecast needs this many sample probes before it can warn.
MIN_POINTS = 3

#: One-sided 95% quantiles of Student's t by degrees of freedom (1..10); 1.645 (normal) beyond.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)


def sparse_samples_message(sampled: Sequence[int]) -> str:
    """What a run with too few sample probes for a forecast cannot tell, and what to change (the summary's log line
    and the report's ``probes-sparse`` limitation).

    Args:
        sampled: the steps at which samples were drawn (at most :data:`MIN_POINTS` of them).

    Example:
        >>> sparse_samples_message([100, 1500])[:50]
        'samples were drawn at 2 step(s) only (100, 1500): '
    """
    return (
        f"samples were drawn at {len(sampled)} step(s) only ({', '.join(map(str, sampled))}): the onset forecast needs "
        f"{MIN_POINTS} sample probes before it can warn, and a copy made between two of them is seen only at the "
        "later one; in a training loop, raise cadence.budget (the probes' share of the training's work) or watch "
        "the saved checkpoints with memwatch watch; probing checkpoints, save them more often"
    )


def t95(dof: int) -> float:
    """One-sided 95% Student-t quantile for ``dof`` degrees of freedom.

    Example:
        >>> t95(2), t95(50)
        (2.92, 1.645)
    """
    if dof < 1:
        return math.inf
    return _T95[dof - 1] if dof <= len(_T95) else 1.645


@dataclass
class LineFit:
    """A least-squares line ``y = intercept + slope * (x - x_mean)`` and its uncertainty.

    Attributes:
        slope, intercept, x_mean: the line.
        sigma: residual standard deviation (0 for an exact fit).
        sxx: sum of squared centred x.
        n: number of points.
    """

    slope: float
    intercept: float
    x_mean: float
    sigma: float
    sxx: float
    n: int

    @property
    def slope_se(self) -> float:
        return self.sigma / math.sqrt(self.sxx)

    @property
    def slope_t(self) -> float:
        """The slope in standard errors (+-inf for an exact, sloped fit; 0 for a flat one)."""
        if self.slope == 0:
            return 0.0
        return self.slope / self.slope_se if self.sigma > 0 else math.copysign(math.inf, self.slope)

    def falls(self) -> bool:
        """Whether the line falls significantly (one-sided 95%)."""
        return self.slope < 0 and self.slope_t <= -t95(self.n - 2)

    def crossing(self, y: float) -> float:
        """The x at which the line reaches ``y`` (inf for a flat line)."""
        return self.x_mean + (y - self.intercept) / self.slope if self.slope else math.inf

    def crossing_se(self, y: float) -> float:
        """Standard error of :meth:`crossing` (delta method; Draper & Smith, inverse prediction)."""
        x0 = self.crossing(y)
        if not math.isfinite(x0):
            return math.inf
        var_y = self.sigma**2 * (1.0 / self.n + (x0 - self.x_mean) ** 2 / self.sxx)
        return math.sqrt(var_y) / abs(self.slope)


def fit_line(x: Sequence[float], y: Sequence[float]) -> LineFit | None:
    """Least squares on centred data; None with fewer than 3 points or one distinct x.

    Example:
        >>> fit = fit_line([0, 1, 2], [1.0, 3.0, 5.0])
        >>> fit.slope, fit.crossing(7.0), fit.sigma
        (2.0, 3.0, 0.0)
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(xa.size)
    if n < MIN_POINTS:
        return None
    x_mean = float(xa.mean())
    dx = xa - x_mean
    sxx = float(dx @ dx)
    if sxx == 0.0:
        return None
    slope = float(dx @ (ya - ya.mean())) / sxx
    intercept = float(ya.mean())
    resid = ya - (intercept + slope * dx)
    sigma = math.sqrt(float(resid @ resid) / (n - 2))
    return LineFit(slope, intercept, x_mean, sigma, sxx, n)


class TrendFit(Protocol):
    """What a forecast needs of a fitted line: its fall's significance and where it crosses a value."""

    n: int

    @property
    def slope_t(self) -> float: ...

    def falls(self) -> bool: ...

    def crossing(self, y: float) -> float: ...

    def crossing_band(self, y: float) -> tuple[float, float]: ...

    def noise(self) -> float: ...


def _crossing_band_ols(fit: LineFit, y: float) -> tuple[float, float]:
    x0, half = fit.crossing(y), t95(fit.n - 2) * fit.crossing_se(y)
    return x0 - half, x0 + half


@dataclass
class TheilSenFit:
    """Sen's robust line through ``(x, y)``: the median of the pairwise slopes, its 95% interval, and the
    Mann-Kendall test of a fall (Kendall's tau against x, exact one-sided p-value).

    Example:
        >>> fit = theil_sen_fit([0, 1, 2, 3, 4, 5], [5.0, 4.1, 3.0, 2.2, 0.9, 0.1])
        >>> fit.falls(), round(fit.crossing(0.0), 1), round(fit.p_fall, 4)
        (True, 5.1, 0.0014)
    """

    slope: float
    intercept: float  # at x = 0
    low_slope: float
    high_slope: float
    p_fall: float
    mad: float
    x_med: float
    y_med: float
    n: int

    @property
    def slope_t(self) -> float:
        """A signed strength of the trend for the cadence (negative = falling): the z of the one-sided p."""
        from statistics import NormalDist

        p = min(max(self.p_fall, 1e-12), 1 - 1e-12)
        return NormalDist().inv_cdf(p)

    def falls(self) -> bool:
        return self.slope < 0 and self.p_fall <= 0.05

    def crossing(self, y: float) -> float:
        return (y - self.intercept) / self.slope if self.slope else math.inf

    def crossing_band(self, y: float) -> tuple[float, float]:
        """Where the steepest and the shallowest slopes of the interval, through the median point, reach ``y``."""

        def at(slope: float) -> float:
            return self.x_med + (y - self.y_med) / slope if slope < 0 else math.inf

        return min(at(self.low_slope), at(self.high_slope)), max(at(self.low_slope), at(self.high_slope))

    def noise(self) -> float:
        return self.mad


def theil_sen_fit(x: Sequence[float], y: Sequence[float]) -> TheilSenFit | None:
    """:class:`TheilSenFit` of the points; None with fewer than 3 points or one distinct x."""
    try:
        from scipy.stats import kendalltau, theilslopes
    except ImportError:  # scipy is not among memwatch's own dependencies: only this option needs it
        raise MemwatchError("the forecast method 'theil_sen' needs scipy: pip install scipy, or use 'ols'") from None

    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.size < MIN_POINTS or np.ptp(xa) == 0:
        return None
    res = theilslopes(ya, xa, alpha=0.90)  # a two-sided 90% interval: one-sided 95% each way, as the OLS band
    # the exact null distribution of tau holds without ties (Kendall 1970); with ties, the normal approximation
    exact = xa.size <= 50 and np.unique(xa).size == xa.size and np.unique(ya).size == ya.size
    tau = kendalltau(xa, ya, alternative="less", method="exact" if exact else "asymptotic")
    p = float(tau.pvalue) if math.isfinite(tau.pvalue) else 1.0
    resid = ya - (res.intercept + res.slope * xa)
    mad = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    return TheilSenFit(float(res.slope), float(res.intercept), float(res.low_slope), float(res.high_slope), p, mad,
                       float(np.median(xa)), float(np.median(ya)), int(xa.size))  # fmt: skip


def fit_trend(x: Sequence[float], y: Sequence[float], method: str = "ols") -> TrendFit | None:
    """The line of ``method`` (one of :data:`METHODS`) through the points, or None with too few of them."""
    if method == "theil_sen":
        return theil_sen_fit(x, y)
    if method != "ols":
        raise ValueError(f"forecast method {method!r} is unknown: use one of {', '.join(METHODS)}")
    fit = fit_line(x, y)
    return _OlsTrend(fit) if fit is not None else None


@dataclass
class _OlsTrend:
    """:class:`LineFit` seen as a :class:`TrendFit`."""

    fit: LineFit

    @property
    def n(self) -> int:
        return self.fit.n

    @property
    def slope_t(self) -> float:
        return self.fit.slope_t

    def falls(self) -> bool:
        return self.fit.falls()

    def crossing(self, y: float) -> float:
        return self.fit.crossing(y)

    def crossing_band(self, y: float) -> tuple[float, float]:
        return _crossing_band_ols(self.fit, y)

    def noise(self) -> float:
        return self.fit.sigma


@dataclass
class OnsetForecast:
    """The forecast made at one probe.

    Attributes:
        step: the step of the latest probe.
        value: the precursor's value at ``step`` (the ratio quantile).
        onset: the step at which the precursor is expected to reach the threshold; NaN when no
            significant approach is seen; ``step`` itself when it is already there.
        low, high: the band (``onset`` -/+ t x its standard error, one-sided 95% each).
        slope_t: the fall's significance (slope / its standard error; negative = falling).
        per_seed: seed -> its own forecast crossing (NaN if that seed shows no significant approach).
    """

    step: int
    value: float
    onset: float = math.nan
    low: float = math.nan
    high: float = math.nan
    slope_t: float = math.nan
    per_seed: dict[int, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """The ``forecast/...`` metrics: ``onset``, ``onset_low``, ``onset_high``, ``steps_to_onset``
        (from ``step``), ``precursor`` (the quantile's value), ``slope_t`` and ``seeds_approaching``."""
        approaching = sum(1 for v in self.per_seed.values() if math.isfinite(v))
        return {
            "onset": self.onset,
            "onset_low": self.low,
            "onset_high": self.high,
            "steps_to_onset": self.onset - self.step,
            "precursor": self.value,
            "slope_t": self.slope_t,
            "seeds_approaching": float(approaching),
        }


def _log(v: float) -> float:
    return math.log(max(v, 1e-6))


def precursor(ratios: Sequence[float], quantile: float = 0.0, closest: int = 1) -> float:
    """The precursor of one probe: the ``quantile`` of the seeds' ratios and, with ``closest`` > 1, the geometric
    mean of it and the ``closest - 1`` ratios just above it, so that one seed's noisy sample moves it less.

    Example:
        >>> precursor([0.9, 0.4, 0.6, 0.8]), round(precursor([0.9, 0.4, 0.6, 0.8], closest=2), 3)
        (0.4, 0.49)
    """
    ordered = np.sort(np.asarray(ratios, dtype=np.float64))
    value = float(np.quantile(ordered, quantile))
    if closest <= 1:
        return value
    tail = [value, *ordered[ordered > value][: closest - 1].tolist()]
    return math.exp(sum(_log(v) for v in tail) / len(tail))


def forecast_onset(
    trajectory: Sequence[tuple[int, Mapping[int, float]]],
    *,
    threshold: float = 1 / 3,
    quantile: float = 0.0,
    closest: int = 1,
    window: int = 6,
    max_extrapolation: float = 2.0,
    method: str = "ols",
) -> OnsetForecast:
    """Forecast when a low quantile of the per-seed ratios reaches ``threshold``.

    Args:
        trajectory: ``(step, {seed: ratio})`` per probe, oldest first; the last entry is now.
            Seeds missing at a probe are left out of that probe's quantile; NaN ratios are ignored.
        threshold: the memorization threshold of the ratio (1/3).
        quantile: which quantile over the seeds is forecast (0: the smallest ratio, the first copy; over 32
            seeds 1/31 is the second smallest: two copies, the onset of 5% of the samples copying).
        closest: the precursor is the geometric mean of the quantile and the ``closest - 1`` ratios just
            above it (:func:`precursor`; 1: the quantile alone).
        window: the most recent probes in the fit (at least 3 are needed).
        max_extrapolation: the line is trusted at most this many times its own span (first to last
            probe in the fit) beyond the last probe; a crossing further out is no forecast.
        method: the line's fit, one of :data:`METHODS`.

    Returns:
        The :class:`OnsetForecast`; its ``onset`` is NaN when there is no significant approach.
    """
    points = []
    for step, ratios in trajectory:
        vals = [v for v in ratios.values() if math.isfinite(v)]
        if vals:
            points.append((int(step), precursor(vals, quantile, closest)))
    if not points:
        return OnsetForecast(step=int(trajectory[-1][0]) if trajectory else 0, value=math.nan)
    step, value = points[-1]
    out = OnsetForecast(step=step, value=value)
    if value < threshold:
        out.onset = out.low = out.high = float(step)
        return out
    recent = points[-window:]
    fit = fit_trend([s for s, _ in recent], [_log(v) for _, v in recent], method)
    out.per_seed = _per_seed(trajectory[-window:], threshold, method)
    if fit is None:
        return out
    out.slope_t = fit.slope_t
    if not fit.falls():
        return out
    crossing = fit.crossing(_log(threshold))
    low, high = fit.crossing_band(_log(threshold))
    # A band that reaches back to now says nothing, unless the precursor is already within its own
    # noise of the threshold: then the onset is imminent whatever the line says.
    near = _log(value) - _log(threshold) <= 2 * fit.noise()
    if low <= step and not near:
        return out
    span = recent[-1][0] - recent[0][0]
    if crossing - step > max_extrapolation * span:  # a short trend says little about a far future
        return out
    onset = max(crossing, float(step))
    out.onset, out.low, out.high = onset, max(min(low, onset), float(step)), max(high, onset)
    return out


def _per_seed(
    trajectory: Sequence[tuple[int, Mapping[int, float]]], threshold: float, method: str = "ols"
) -> dict[int, float]:
    """Each seed's own forecast crossing (NaN without a significant fall)."""
    seeds = sorted({s for _, ratios in trajectory for s in ratios})
    out: dict[int, float] = {}
    for seed in seeds:
        pts = [(st, r[seed]) for st, r in trajectory if seed in r and math.isfinite(r[seed])]
        fit = fit_trend([s for s, _ in pts], [_log(v) for _, v in pts], method)
        out[seed] = max(fit.crossing(_log(threshold)), float(pts[-1][0])) if fit and fit.falls() else math.nan
    return out
