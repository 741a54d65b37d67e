"""The rule types, one class each: what a rule of that type accepts, when it fires, and what its event says.

A new type is one class here (or in your own module, imported before the config is read): a
:class:`~memwatch.signals.rules.base.Rule` subclass with ``kind``, ``settings`` (the YAML keys it accepts),
``fills`` (message fields it fills), :meth:`parse_settings`, :meth:`observe` and :meth:`own_settings`,
registered with :func:`~memwatch.signals.rules.base.rule_type`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.signals.rules.base import (
    Rule,
    RuleState,
    comparison,
    count,
    finite,
    forecast_crossing,
    number,
    number_problem,
    rule_type,
)

# Defaults below come from the alert spec in the product issue ("early-warning rules").
DEFAULT_FOR = 1  # one breaching probe is enough unless the rule asks for more
DEFAULT_WINDOW = 5  # points in the trend fit: recent enough to follow a change in slope
DEFAULT_MIN_POINTS = 3  # two points always fit a line exactly; three give the fit some support


@rule_type
@dataclass(frozen=True)
class ThresholdRule(Rule):
    """``threshold``: fires when ``metric op value`` holds for ``for`` consecutive probes of the metric, then
    stays quiet until the condition stops holding (re-arm), so a sustained breach is one event.

    Attributes:
        consecutive: YAML ``for``: consecutive breaching probes needed.
    """

    kind = "threshold"
    settings = ("op", "value", "for")

    consecutive: int = DEFAULT_FOR

    @classmethod
    def parse_settings(cls, item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError]) -> dict[str, Any]:
        return {**comparison(item, fail, cls.kind), "consecutive": count(item.get("for", DEFAULT_FOR), 1, fail, "for")}

    def observe(self, state: RuleState, step: int, value: float, metrics: Mapping[str, float | None]) -> dict | None:
        if not self.holds(value):
            state.streak, state.armed = 0, True
            return None
        state.streak += 1
        if state.armed and state.streak >= self.consecutive:
            state.armed = False
            return {"forecast_step": None}
        return None

    def own_settings(self) -> dict[str, Any]:
        return {"op": self.op, "value": self.value, "for": self.consecutive}


@rule_type
@dataclass(frozen=True)
class FirstRule(Rule):
    """``first``: fires the first time ``metric op value`` holds, once per run (e.g. the first sample that
    regurgitates a training image)."""

    kind = "first"
    settings = ("op", "value")

    @classmethod
    def parse_settings(cls, item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError]) -> dict[str, Any]:
        return comparison(item, fail, cls.kind)

    def observe(self, state: RuleState, step: int, value: float, metrics: Mapping[str, float | None]) -> dict | None:
        if state.armed and self.holds(value):
            state.armed = False
            return {"forecast_step": None}
        return None


@rule_type
@dataclass(frozen=True)
class TrendRule(Rule):
    """``trend``: fits a least-squares line to the last ``window`` points of the metric against step and fires
    when the forecast crossing of ``value`` lies within ``horizon`` steps of the current step while the
    metric has not crossed yet. It re-arms when the forecast leaves the horizon or the metric crosses.

    Attributes:
        window: the most recent points in the least-squares fit.
        min_points: fewest points before a forecast is made.
        horizon: fire when the forecast crossing is at most this many steps ahead.
    """

    kind = "trend"
    settings = ("op", "value", "window", "min_points", "horizon")
    fills = ("forecast_step",)

    window: int = DEFAULT_WINDOW
    min_points: int = DEFAULT_MIN_POINTS
    horizon: float = 0.0

    @classmethod
    def parse_settings(cls, item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError]) -> dict[str, Any]:
        out = comparison(item, fail, cls.kind)
        window = count(item.get("window", DEFAULT_WINDOW), 2, fail, "window")
        min_points = count(item.get("min_points", DEFAULT_MIN_POINTS), 2, fail, "min_points")
        if min_points > window:
            raise fail("min_points", f"is {min_points} but window is {window}: min_points must be <= window")
        if "horizon" not in item or item["horizon"] is None:
            raise fail("horizon", "is missing: a trend rule needs horizon (steps ahead to warn about)")
        horizon = number(item["horizon"], fail("horizon", number_problem(item["horizon"])))
        if horizon <= 0:
            raise fail("horizon", f"is {horizon}: it must be a positive number of steps")
        return {**out, "window": window, "min_points": min_points, "horizon": horizon}

    def observe(self, state: RuleState, step: int, value: float, metrics: Mapping[str, float | None]) -> dict | None:
        # A step at or before the last one means the run resumed from an earlier checkpoint:
        # the later points describe a trajectory that no longer exists, so drop them.
        state.history = [p for p in state.history if p[0] < step]
        if math.isfinite(value):  # an infinite point would make the fit meaningless
            state.history.append((step, value))
            del state.history[: -self.window]
        if self.holds(value):
            state.armed = True  # crossed: the threshold rule's job now; warn again on a new approach
            return None
        if len(state.history) < self.min_points:
            return None
        steps, values = zip(*state.history, strict=True)
        forecast = forecast_crossing(steps, values, self.value, self.op)
        # A forecast before the current step (fitted line already past the threshold while the
        # latest value is not) is an overdue crossing: the most urgent case, so it counts as within.
        if forecast is None or forecast - step > self.horizon:
            state.armed = True
            return None
        if state.armed:
            state.armed = False
            return {"forecast_step": round(forecast)}
        return None

    def own_settings(self) -> dict[str, Any]:
        return {"op": self.op, "value": self.value, "window": self.window, "min_points": self.min_points,
                "horizon": self.horizon}  # fmt: skip


@rule_type
@dataclass(frozen=True)
class ForecastRule(Rule):
    """``forecast``: reads a forecast step (``metric``, e.g. ``forecast/onset``) and the early edge of its band
    (``<metric>_low``) and fires when that edge lies within ``horizon_share`` x the current step (or within
    ``horizon`` steps, whichever is larger) of the current step. It re-arms when a later forecast lies beyond
    the horizon again; a probe without a forecast (NaN) changes nothing. With ``for`` (default 1) the edge must
    lie within the horizon at that many consecutive forecasts: one noisy probe does not warn. The adaptive cadence
    (:mod:`memwatch.core.cadence`) reads the same band, and the probe's ``slope_t`` (the precursor's trend in
    standard errors; >= 0 means it is not approaching).

    Attributes:
        horizon_share: the horizon as a share of the current step (also its ``value``).
        horizon: the smallest horizon in steps (default 0).
        consecutive: YAML ``for``: consecutive forecasts within the horizon needed.
    """

    kind = "forecast"
    settings = ("horizon", "horizon_share", "for")
    fills = ("forecast_step", "forecast_low", "forecast_high")

    horizon_share: float = 0.0
    horizon: float = 0.0
    consecutive: int = DEFAULT_FOR

    @classmethod
    def parse_settings(cls, item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError]) -> dict[str, Any]:
        share = item.get("horizon_share")
        if share is None:
            raise fail("horizon_share", "is missing: a forecast rule warns when the forecast lies within "
                       "horizon_share x the current step (e.g. 0.5)")  # fmt: skip
        share = number(share, fail("horizon_share", number_problem(share)))
        if share <= 0:
            raise fail("horizon_share", f"is {share}: it must be positive")
        horizon = item.get("horizon", 0)
        horizon = number(horizon, fail("horizon", number_problem(horizon)))
        if horizon < 0:
            raise fail("horizon", f"is {horizon}: it must be a number of steps >= 0")
        consecutive = count(item.get("for", DEFAULT_FOR), 1, fail, "for")
        return {"op": "<=", "value": share, "horizon_share": share, "horizon": horizon, "consecutive": consecutive}

    def threshold_at(self, step: int) -> float:
        """The horizon in steps at this step."""
        return max(self.horizon, self.horizon_share * step)

    def observe(self, state: RuleState, step: int, value: float, metrics: Mapping[str, float | None]) -> dict | None:
        low, high = (finite(metrics.get(f"{self.metric}_{edge}"), value) for edge in ("low", "high"))
        if low - step > self.threshold_at(step):
            state.streak, state.armed = 0, True
            return None
        state.streak += 1
        if state.armed and state.streak >= self.consecutive:
            state.armed = False
            return {"forecast_step": round(value), "forecast_low": round(low), "forecast_high": round(high)}
        return None

    def own_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"horizon_share": self.horizon_share}
        if self.horizon:
            out["horizon"] = self.horizon
        if self.consecutive != DEFAULT_FOR:
            out["for"] = self.consecutive
        return out
