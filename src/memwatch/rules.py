"""Early-warning rules: turn a series of probe metrics into events.

A monitor probes a training run every so often and gets metric values keyed ``"probe/metric"``
(e.g. ``"regurgitation/mem_fraction"``) at a training step. A :class:`RuleEngine` holds the rules
and their per-rule state, and :meth:`RuleEngine.observe` returns the :class:`Event` objects one
probe result triggers. Four rule types exist:

* ``threshold``: fires when ``metric op value`` holds for ``for`` consecutive probes of that metric,
  then stays quiet until the condition stops holding (re-arm), so a sustained breach is one event.
* ``first``: fires the first time ``metric op value`` holds, once per run (e.g. the first sample that
  regurgitates a training image).
* ``trend``: fits a least-squares line to the last ``window`` points of the metric against step and
  fires when the forecast crossing of ``value`` lies within ``horizon`` steps of the current step
  while the metric has not crossed yet. It re-arms when the forecast leaves the horizon or the
  metric crosses.
* ``forecast``: reads a forecast step (``metric``, e.g. ``forecast/onset``) and the early edge of its
  band (``<metric>_low``) and fires when that edge lies within ``horizon_share`` x the current step
  (or within ``horizon`` steps, whichever is larger) of the current step. It re-arms when a later
  forecast lies beyond the horizon again; a probe without a forecast (NaN) changes nothing. The
  adaptive cadence (:mod:`memwatch.cadence`) reads the same band, and the probe's ``slope_t`` (the
  precursor's trend in standard errors; >= 0 means it is not approaching).

Missing metrics (the probe did not run) and NaN values are not evaluated: they neither breach nor
reset a counter. ``message`` is a template for :meth:`str.format_map` and may use ``{value}``,
``{threshold}``, ``{step}``, ``{forecast_step}`` (trend and forecast rules), ``{forecast_low}`` and
``{forecast_high}`` (forecast rules), ``{metric}``, ``{rule}``, ``{op}``, ``{severity}``, ``{keep}``
(the front-end's advice on what to keep: the last clean checkpoint) and ``{evidence[KEY]}``, a field of
the probe's evidence (the forecast probe's ``{evidence[closest_images]}``: the training images the
samples come closest to).

Example (YAML)::

    - name: regurgitation-high
      type: threshold
      metric: regurgitation/mem_fraction
      op: ">"
      value: 0.05
      for: 2
      severity: critical
      message: "mem_fraction {value:.3f} > {threshold} at step {step}"
    - name: first-regurgitated-image
      type: first
      metric: regurgitation/distinct_memorized
      op: ">"
      value: 0
      severity: warning
      message: "step {step}: a sample regurgitates a training image"
    - name: membership-rising
      type: trend
      metric: membership/mia_auc
      op: ">="
      value: 0.6
      window: 5
      min_points: 3
      horizon: 2000
      severity: info
      message: "membership AUC {value:.3f} is forecast to reach {threshold} at step {forecast_step}"
    - name: onset-forecast
      type: forecast
      metric: forecast/onset
      horizon_share: 0.5
      severity: warning
      message: "step {step}: copying forecast at step {forecast_step}; keep {keep}"

Quote the operators (``">"``): a bare ``>`` starts a YAML folded block. Write small numbers as
``1.0e-3``: PyYAML reads ``1e-3`` as text, and :func:`parse_rules` says so.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memwatch.errors import MemwatchError

#: The rule type that reads a forecast and its band (see the module docstring).
FORECAST = "forecast"
RULE_TYPES = ("threshold", "first", "trend", FORECAST)
# Ordered from least to most severe; the CLI's --fail-on compares against this order.
SEVERITIES = ("info", "warning", "critical")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}
# Defaults below come from the alert spec in the product issue ("early-warning rules").
DEFAULT_FOR = 1  # one breaching probe is enough unless the rule asks for more
DEFAULT_WINDOW = 5  # points in the trend fit: recent enough to follow a change in slope
DEFAULT_MIN_POINTS = 3  # two points always fit a line exactly; three give the fit some support

REQUIRED = ("name", "type", "metric", "severity", "message")
#: Settings every rule type but ``forecast`` needs: the comparison.
COMPARISON = ("op", "value")
#: Optional settings of every rule: where its threshold comes from (shown in the audit report).
OPTIONAL = ("source",)
# Settings each type accepts beyond REQUIRED and OPTIONAL; anything else is a typo and is rejected.
EXTRA_SETTINGS = {
    "threshold": (*COMPARISON, "for"),
    "first": COMPARISON,
    "trend": (*COMPARISON, "window", "min_points", "horizon"),
    "forecast": ("horizon", "horizon_share"),
}
TEMPLATE_FIELDS = ("value", "threshold", "step", "forecast_step", "forecast_low", "forecast_high", "metric", "rule",
                   "op", "severity", "keep", "evidence")  # fmt: skip
#: Template fields only some rule types fill.
TYPE_FIELDS = {"forecast_step": ("trend", "forecast"), "forecast_low": ("forecast",), "forecast_high": ("forecast",)}
STATE_VERSION = 1


@dataclass(frozen=True)
class Rule:
    """One validated rule (build with :func:`parse_rules`).

    Attributes:
        name: unique rule name; events and engine state refer to it.
        type: ``threshold``, ``first`` or ``trend``.
        metric: ``"probe/metric"`` key the rule watches.
        severity: ``info``, ``warning`` or ``critical``.
        message: :meth:`str.format_map` template for the event message.
        op: comparison operator, one of ``>``, ``>=``, ``<``, ``<=`` (forecast rules: ``<=``).
        value: the threshold (forecast rules: ``horizon_share``).
        consecutive: YAML ``for``: consecutive breaching probes a threshold rule needs.
        window: trend rules: number of most recent points in the least-squares fit.
        min_points: trend rules: fewest points before a forecast is made.
        horizon: trend rules: fire when the forecast crossing is at most this many steps ahead;
            forecast rules: the smallest horizon in steps (default 0).
        horizon_share: forecast rules: the horizon as a share of the current step.
        source: where the threshold comes from (a paper, or why this value), if stated.
    """

    name: str
    type: str
    metric: str
    severity: str
    message: str
    op: str
    value: float
    consecutive: int = DEFAULT_FOR
    window: int = DEFAULT_WINDOW
    min_points: int = DEFAULT_MIN_POINTS
    horizon: float | None = None
    horizon_share: float | None = None
    source: str | None = None

    @property
    def probe(self) -> str:
        """The probe part of :attr:`metric` (before the first ``/``); keys the evidence dict."""
        return self.metric.split("/", 1)[0]

    def holds(self, value: float) -> bool:
        """Whether ``value op threshold`` holds (the metric has crossed)."""
        return OPS[self.op](value, self.value)

    def to_dict(self) -> dict[str, Any]:
        """The rule in its YAML shape (only the settings its type uses), e.g. for a report.

        Example:
            >>> parse_rules([r.to_dict() for r in rules]) == rules  # doctest: +SKIP
            True
        """
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "metric": self.metric,
            "severity": self.severity,
            "message": self.message,
        }
        if self.type != "forecast":
            out.update(op=self.op, value=self.value)
        if self.type == "threshold":
            out["for"] = self.consecutive
        elif self.type == "trend":
            out.update(window=self.window, min_points=self.min_points, horizon=self.horizon)
        elif self.type == "forecast":
            out["horizon_share"] = self.horizon_share
            if self.horizon:
                out["horizon"] = self.horizon
        if self.source is not None:
            out["source"] = self.source
        return out


@dataclass
class Event:
    """What a rule reports when it fires.

    Attributes:
        step: training step of the probe that triggered the event.
        rule: name of the rule.
        severity: the rule's severity.
        metric: ``"probe/metric"`` key.
        value: the metric's value at ``step``.
        threshold: the rule's threshold.
        forecast_step: trend and forecast rules: forecast step of the crossing (rounded); else ``None``.
        message: the rule's message template, filled in.
        evidence: the probe's evidence passed to :meth:`RuleEngine.observe` (seeds, training ids...).
    """

    step: int
    rule: str
    severity: str
    metric: str
    value: float
    threshold: float
    forecast_step: int | None
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON and the store.

        Example:
            >>> json.dumps(event.to_dict())  # doctest: +SKIP
            '{"step": 300, "rule": "regurgitation-high", ...}'
        """
        return {
            "step": self.step,
            "rule": self.rule,
            "severity": self.severity,
            "metric": self.metric,
            "value": self.value,
            "threshold": self.threshold,
            "forecast_step": self.forecast_step,
            "message": self.message,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        """Inverse of :meth:`to_dict` (rebuilds events read back from the store; other keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in known and k != "evidence"}
        return cls(**kept, evidence=dict(data.get("evidence") or {}))


def severity_at_least(severity: str, minimum: str) -> bool:
    """Whether ``severity`` ranks at or above ``minimum`` (info < warning < critical).

    Args:
        severity: the severity to test.
        minimum: the lowest severity that counts (e.g. the CLI's ``--fail-on``).

    Example:
        >>> severity_at_least("critical", "warning")
        True
        >>> severity_at_least("info", "warning")
        False
    """
    for label, s in (("severity", severity), ("minimum severity", minimum)):
        if s not in SEVERITIES:
            raise MemwatchError(f"{label} {s!r} is unknown: use one of {', '.join(SEVERITIES)}")
    return SEVERITIES.index(severity) >= SEVERITIES.index(minimum)


def forecast_crossing(steps: Sequence[float], values: Sequence[float], threshold: float, op: str) -> float | None:
    """Step at which the least-squares line through ``(steps, values)`` reaches ``threshold``.

    The line must move toward the threshold in the direction of ``op``: upward for ``>``/``>=``,
    downward for ``<``/``<=``. The result may lie before the last step when the fitted line is
    already past the threshold.

    Args:
        steps: training steps (x), finite.
        values: metric values (y), finite, same length as ``steps``.
        threshold: the value to cross.
        op: ``>``, ``>=``, ``<`` or ``<=``.

    Returns:
        The forecast step as a float, or ``None`` with fewer than two distinct steps, a zero slope,
        or a slope pointing away from the threshold.

    Example:
        >>> round(forecast_crossing([100, 200, 300], [0.1, 0.2, 0.3], 0.5, ">"), 6)
        500.0
    """
    if op not in OPS:
        raise ValueError(f"op {op!r} is unknown: use one of {', '.join(OPS)}")
    x = np.asarray(steps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"steps and values must be 1-D and equally long, got {x.shape} and {y.shape}")
    if x.size < 2:
        return None
    # Closed-form least squares on centred data: exact for exactly linear input and better
    # conditioned than polyfit's Vandermonde system when steps are large (1e5+).
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        return None
    slope = float(dx @ (y - y.mean())) / sxx
    rising = op in (">", ">=")
    if slope == 0.0 or (slope > 0) != rising:
        return None
    return float(x.mean() + (threshold - y.mean()) / slope)


# --------------------------------------------------------------------------------------------
# Parsing and validation


def parse_rules(raw: list[dict[str, Any]] | None, source: str = "config") -> list[Rule]:
    """Validate rules read from YAML (a list of dicts) and build :class:`Rule` objects.

    Args:
        raw: the parsed YAML list; ``None`` (an empty YAML section) gives no rules.
        source: where the rules came from (a file name or setting), used in error messages.

    Returns:
        The rules, in the given order.

    Raises:
        MemwatchError: naming the rule (by name, and index), the setting and what is allowed.

    Example:
        >>> raw = yaml.safe_load(open("memwatch.yaml"))["rules"]  # doctest: +SKIP
        >>> rules = parse_rules(raw, "memwatch.yaml")  # doctest: +SKIP
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise MemwatchError(f"{source}: rules must be a YAML list of rules, got {type(raw).__name__}")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        rule = _parse_rule(item, index, source)
        if rule.name in seen:
            raise MemwatchError(
                f"{source}: rule {rule.name!r} (rules[{index}]): setting 'name' is used twice: names must be unique"
            )
        seen.add(rule.name)
        rules.append(rule)
    return rules


def _parse_rule(item: Any, index: int, source: str) -> Rule:
    """Validate one rule dict; errors name the rule by name when it has one, else by index."""
    where = f"{source}: rule rules[{index}]"
    if not isinstance(item, dict):
        raise MemwatchError(f"{where}: each rule must be a mapping of settings, got {type(item).__name__}")
    name = item.get("name")
    if isinstance(name, str) and name.strip():
        where = f"{source}: rule {name!r} (rules[{index}])"

    def fail(setting: str, problem: str) -> MemwatchError:
        return MemwatchError(f"{where}: setting {setting!r} {problem}")

    for key in REQUIRED:
        if key not in item or item[key] is None:
            raise fail(key, f"is missing: every rule needs {', '.join(REQUIRED)}")
    if not (isinstance(name, str) and name.strip()):
        raise fail("name", f"must be a non-empty string, got {name!r}")
    rtype = item["type"]
    if rtype not in RULE_TYPES:
        raise fail("type", f"is {rtype!r}: use one of {', '.join(RULE_TYPES)}")
    allowed = REQUIRED + OPTIONAL + EXTRA_SETTINGS[rtype]
    for key in item:
        if key not in allowed:
            raise fail(key, f"is not known for a {rtype} rule: allowed settings are {', '.join(allowed)}")
    metric = item["metric"]
    if not isinstance(metric, str) or not re.fullmatch(r"[^/\s]+/\S+", metric):
        raise fail("metric", f"is {metric!r}: write it as 'probe/metric', e.g. 'regurgitation/mem_fraction'")
    severity = item["severity"]
    if severity not in SEVERITIES:
        raise fail("severity", f"is {severity!r}: use one of {', '.join(SEVERITIES)}")

    kwargs: dict[str, Any] = {}
    if rtype == "forecast":
        kwargs.update(_forecast_settings(item, fail))
    else:
        for key in COMPARISON:
            if key not in item or item[key] is None:
                raise fail(key, f"is missing: a {rtype} rule needs {', '.join(COMPARISON)}")
        op = item["op"]
        if op not in OPS:
            raise fail("op", f"is {op!r}: use one of {', '.join(OPS)} (quoted in YAML)")
        kwargs.update(op=op, value=_number(item["value"], fail("value", _number_problem(item["value"]))))
    if rtype == "threshold":
        kwargs["consecutive"] = _count(item.get("for", DEFAULT_FOR), 1, fail, "for")
    elif rtype == "trend":
        window = _count(item.get("window", DEFAULT_WINDOW), 2, fail, "window")
        min_points = _count(item.get("min_points", DEFAULT_MIN_POINTS), 2, fail, "min_points")
        if min_points > window:
            raise fail("min_points", f"is {min_points} but window is {window}: min_points must be <= window")
        if "horizon" not in item or item["horizon"] is None:
            raise fail("horizon", "is missing: a trend rule needs horizon (steps ahead to warn about)")
        horizon = _number(item["horizon"], fail("horizon", _number_problem(item["horizon"])))
        if horizon <= 0:
            raise fail("horizon", f"is {horizon}: it must be a positive number of steps")
        kwargs.update(window=window, min_points=min_points, horizon=horizon)

    message = item["message"]
    if not isinstance(message, str):
        raise fail("message", f"must be a string, got {type(message).__name__}")
    source = item.get("source")
    if source is not None and not isinstance(source, str):
        raise fail("source", f"must be a string (where the threshold comes from), got {type(source).__name__}")
    kwargs["source"] = source
    _check_template(message, rtype, fail)
    return Rule(name=name, type=rtype, metric=metric, severity=severity, message=message, **kwargs)


def _forecast_settings(item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError]) -> dict[str, Any]:
    """``horizon_share`` (required, > 0) and ``horizon`` (optional, >= 0 steps) of a forecast rule."""
    share = item.get("horizon_share")
    if share is None:
        raise fail("horizon_share", "is missing: a forecast rule warns when the forecast lies within "
                   "horizon_share x the current step (e.g. 0.5)")  # fmt: skip
    share = _number(share, fail("horizon_share", _number_problem(share)))
    if share <= 0:
        raise fail("horizon_share", f"is {share}: it must be positive")
    horizon = item.get("horizon", 0)
    horizon = _number(horizon, fail("horizon", _number_problem(horizon)))
    if horizon < 0:
        raise fail("horizon", f"is {horizon}: it must be a number of steps >= 0")
    return {"op": "<=", "value": share, "horizon_share": share, "horizon": horizon}


def _number_problem(raw: Any) -> str:
    """Why ``raw`` is not a usable number, with the PyYAML ``1e-3`` pitfall spelled out."""
    if isinstance(raw, str):
        try:
            float(raw)
        except ValueError:
            pass
        else:
            return f"is the text {raw!r}: YAML read it as a string; write a number such as 1.0e-3 (with a dot)"
    return f"is {raw!r}: it must be a finite number"


def _number(raw: Any, error: MemwatchError) -> float:
    """``raw`` as a finite float; bools and strings are rejected (YAML ``yes`` is not a number)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise error
    return float(raw)


def _count(raw: Any, minimum: int, fail: Callable[[str, str], MemwatchError], setting: str) -> int:
    """``raw`` as an int of at least ``minimum``."""
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise fail(setting, f"is {raw!r}: it must be a whole number >= {minimum}")
    return raw


def _check_template(message: str, rtype: str, fail: Callable[[str, str], MemwatchError]) -> None:
    """Reject placeholders that could never be filled, so a typo shows at load time, not in an alert."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(message) if f is not None]
    except ValueError as exc:
        raise fail("message", f"is not a valid template ({exc}): write {{{{ and }}}} for literal braces") from None
    for f in fields:
        root = re.split(r"[.\[]", f, maxsplit=1)[0]
        if root not in TEMPLATE_FIELDS:
            raise fail("message", f"uses {{{f}}}: placeholders are {', '.join(TEMPLATE_FIELDS)}")
        if root in TYPE_FIELDS and rtype not in TYPE_FIELDS[root]:
            raise fail("message", f"uses {{{root}}}, which only {' and '.join(TYPE_FIELDS[root])} rules have")


class _KeepMissing(dict):
    """format_map mapping that leaves unknown placeholders as written instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _render(template: str, values: dict[str, Any]) -> str:
    """Fill ``template``; on any formatting error return it unfilled rather than lose the event."""
    try:
        return template.format_map(_KeepMissing(values))
    except (ValueError, KeyError, IndexError, AttributeError, TypeError):
        return template


def _finite(raw: float | None, default: float) -> float:
    """``raw`` as a float when it is a finite number, else ``default``."""
    if raw is None:
        return default
    value = float(raw)
    return value if math.isfinite(value) else default


# --------------------------------------------------------------------------------------------
# Engine


@dataclass
class _RuleState:
    """Mutable per-rule state.

    ``armed`` is whether the rule may fire: threshold and trend rules disarm on firing and re-arm
    when the condition clears; a first rule never re-arms. ``streak`` counts consecutive breaching
    probes (threshold); ``history`` keeps the last ``window`` ``(step, value)`` points (trend).
    """

    streak: int = 0
    armed: bool = True
    history: list[tuple[int, float]] = field(default_factory=list)


class RuleEngine:
    """Evaluates rules on each probe result and keeps their state between probes.

    Args:
        rules: validated rules (from :func:`parse_rules`).

    Example:
        >>> engine = RuleEngine(parse_rules(yaml.safe_load(text)))  # doctest: +SKIP
        >>> for event in engine.observe(1000, {"regurgitation/mem_fraction": 0.08}):  # doctest: +SKIP
        ...     print(event.severity, event.message)
    """

    def __init__(self, rules: Sequence[Rule]):
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise MemwatchError("rule names must be unique: the engine keeps its state per rule name")
        self.rules: list[Rule] = list(rules)
        self._state: dict[str, _RuleState] = {r.name: _RuleState() for r in self.rules}

    def observe(
        self,
        step: int,
        metrics: Mapping[str, float | None],
        evidence: Mapping[str, Mapping[str, Any]] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> list[Event]:
        """Feed one probe result; return the events it triggers, in rule order.

        Args:
            step: training step of the probed snapshot.
            metrics: ``"probe/metric"`` -> value. Metrics absent (or ``None``) are not evaluated;
                NaN values are skipped: they neither breach nor reset a counter.
            evidence: ``"probe"`` -> details (sample seeds, training ids); an event for metric
                ``"p/m"`` carries ``evidence["p"]``.
            context: further message fields from the front-end (``keep``).

        Example:
            >>> engine.observe(500, {"membership/mia_auc": 0.58}, {"membership": {"n": 9}})  # doctest: +SKIP
            [Event(step=500, rule='membership-rising', ..., forecast_step=640, ...)]
        """
        step = int(step)
        evidence = evidence or {}
        events: list[Event] = []
        for rule in self.rules:
            raw = metrics.get(rule.metric)
            if raw is None:
                continue
            value = float(raw)
            if math.isnan(value):
                continue
            state = self._state[rule.name]
            band: dict[str, Any] = {}
            if rule.type == "threshold":
                fired, forecast = self._threshold(rule, state, value), None
            elif rule.type == "first":
                fired, forecast = self._first(rule, state, value), None
            elif rule.type == "trend":
                fired, forecast = self._trend(rule, state, step, value)
            else:
                low, high = (_finite(metrics.get(f"{rule.metric}_{edge}"), value) for edge in ("low", "high"))
                fired, forecast = self._forecast(rule, state, step, value, low), round(value)
                band = {"forecast_low": round(low), "forecast_high": round(high)}
            if fired:
                fill = {"keep": "the last checkpoint saved before this step", **(context or {}), **band}
                events.append(self._event(rule, step, value, forecast, evidence.get(rule.probe, {}), fill))
        return events

    @staticmethod
    def _threshold(rule: Rule, state: _RuleState, value: float) -> bool:
        if not rule.holds(value):
            state.streak, state.armed = 0, True
            return False
        state.streak += 1
        if state.armed and state.streak >= rule.consecutive:
            state.armed = False
            return True
        return False

    @staticmethod
    def _first(rule: Rule, state: _RuleState, value: float) -> bool:
        if state.armed and rule.holds(value):
            state.armed = False
            return True
        return False

    @staticmethod
    def _trend(rule: Rule, state: _RuleState, step: int, value: float) -> tuple[bool, int | None]:
        # A step at or before the last one means the run resumed from an earlier checkpoint:
        # the later points describe a trajectory that no longer exists, so drop them.
        state.history = [p for p in state.history if p[0] < step]
        if math.isfinite(value):  # an infinite point would make the fit meaningless
            state.history.append((step, value))
            del state.history[: -rule.window]
        if rule.holds(value):
            state.armed = True  # crossed: the threshold rule's job now; warn again on a new approach
            return False, None
        if len(state.history) < rule.min_points:
            return False, None
        steps, values = zip(*state.history, strict=True)
        forecast = forecast_crossing(steps, values, rule.value, rule.op)
        assert rule.horizon is not None  # parse_rules guarantees it for trend rules
        # A forecast before the current step (fitted line already past the threshold while the
        # latest value is not) is an overdue crossing: the most urgent case, so it counts as within.
        if forecast is None or forecast - step > rule.horizon:
            state.armed = True
            return False, None
        if state.armed:
            state.armed = False
            return True, round(forecast)
        return False, None

    @staticmethod
    def _forecast(rule: Rule, state: _RuleState, step: int, value: float, low: float) -> bool:
        horizon = max(rule.horizon or 0.0, (rule.horizon_share or 0.0) * step)
        if low - step > horizon:
            state.armed = True
            return False
        if state.armed:
            state.armed = False
            return True
        return False

    @staticmethod
    def _event(
        rule: Rule,
        step: int,
        value: float,
        forecast: int | None,
        evidence: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Event:
        fill = {
            **(extra or {}),
            "evidence": evidence,
            "value": value,
            "threshold": rule.value,
            "step": step,
            "forecast_step": forecast,
            "metric": rule.metric,
            "rule": rule.name,
            "op": rule.op,
            "severity": rule.severity,
        }
        threshold = rule.value
        if rule.type == "forecast":  # the horizon in steps at this step
            threshold = max(rule.horizon or 0.0, (rule.horizon_share or 0.0) * step)
            fill["threshold"] = threshold
        return Event(
            step=step,
            rule=rule.name,
            severity=rule.severity,
            metric=rule.metric,
            value=value,
            threshold=threshold,
            forecast_step=forecast,
            message=_render(rule.message, fill),
            evidence=dict(evidence),
        )

    def state(self) -> dict[str, Any]:
        """JSON-serialisable per-rule state, so a restarted front-end can resume counters.

        Example:
            >>> Path("rules_state.json").write_text(json.dumps(engine.state()))  # doctest: +SKIP
        """
        return {
            "version": STATE_VERSION,
            "rules": {
                r.name: {
                    "type": r.type,
                    "metric": r.metric,
                    "streak": s.streak,
                    "armed": s.armed,
                    "history": [[st, v] for st, v in s.history],
                }
                for r in self.rules
                for s in [self._state[r.name]]
            },
        }

    def load_state(self, data: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state`.

        Rules absent from ``data``, or whose type or metric changed since, start fresh; entries for
        rules no longer configured are ignored (the config may change between restarts).

        Args:
            data: a dict from :meth:`state` (e.g. read back from JSON).

        Raises:
            MemwatchError: when ``data`` is not a rule-engine state.

        Example:
            >>> engine.load_state(json.loads(Path("rules_state.json").read_text()))  # doctest: +SKIP
        """
        where = "rule engine state"
        if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
            raise MemwatchError(f"{where}: expected a dict with version {STATE_VERSION} from RuleEngine.state()")
        saved = data.get("rules")
        if not isinstance(saved, Mapping):
            raise MemwatchError(f"{where}: 'rules' must map rule names to their state")
        restored: dict[str, _RuleState] = {}
        for rule in self.rules:
            entry = saved.get(rule.name)
            if not isinstance(entry, Mapping) or (entry.get("type"), entry.get("metric")) != (
                rule.type,
                rule.metric,
            ):
                restored[rule.name] = _RuleState()
                continue
            try:
                history = [(int(st), float(v)) for st, v in entry.get("history", [])]
                restored[rule.name] = _RuleState(
                    streak=int(entry["streak"]), armed=bool(entry["armed"]), history=history
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise MemwatchError(f"{where}: entry for rule {rule.name!r} is malformed ({exc})") from None
        self._state = restored
