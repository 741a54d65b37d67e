"""The base of warning rules: a rule, the event it raises, parsing and checking rules, and the engine.

A rule type is one class (:mod:`memwatch.signals.rules.types`): a :class:`Rule` subclass, registered with
:func:`rule_type`, that parses its own settings (:meth:`Rule.parse_settings`), judges each new value
(:meth:`Rule.observe`), and writes itself back as YAML (:meth:`Rule.to_dict`). Everything else here is
shared: the settings every rule has, message templates, the engine that keeps each rule's state and
turns firings into :class:`Event` objects.
"""

from __future__ import annotations

import dataclasses
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from memwatch.errors import MemwatchError

# Ordered from least to most severe; the CLI's --fail-on compares against this order.
SEVERITIES = ("info", "warning", "critical")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}
REQUIRED = ("name", "type", "metric", "severity", "message")
#: Optional settings of every rule: where its threshold comes from (shown in the audit report).
OPTIONAL = ("source",)
#: Template fields every rule fills; a rule type adds its own (:attr:`Rule.fills`).
COMMON_FIELDS = ("value", "threshold", "step", "metric", "rule", "op", "severity", "keep", "evidence")
STATE_VERSION = 1

#: type name -> rule class, in the order the types were registered.
RULE_TYPES: dict[str, type[Rule]] = {}


def rule_type(cls: type[Rule]) -> type[Rule]:
    """Register a rule class under its ``kind`` (a class decorator).

    Example:
        >>> sorted(RULE_TYPES)
        ['first', 'forecast', 'threshold', 'trend']
    """
    RULE_TYPES[cls.kind] = cls
    return cls


def template_fields() -> tuple[str, ...]:
    """Every placeholder a rule message may use (the common ones, then those some types fill)."""
    extra = [f for cls in RULE_TYPES.values() for f in cls.fills if f not in COMMON_FIELDS]
    return COMMON_FIELDS + tuple(dict.fromkeys(extra))


@dataclass(frozen=True)
class Rule:
    """One validated rule (build with :func:`parse_rules`); each type is a subclass.

    Attributes:
        name: unique rule name; events and engine state refer to it.
        type: the rule type (the class's ``kind``).
        metric: ``"probe/metric"`` key the rule watches.
        severity: ``info``, ``warning`` or ``critical``.
        message: :meth:`str.format_map` template for the event message.
        op: comparison operator, one of ``>``, ``>=``, ``<``, ``<=``.
        value: the threshold.
        source: where the threshold comes from (a paper, or why this value), if stated.
    """

    #: the ``type`` a config names
    kind: ClassVar[str] = ""
    #: settings this type accepts beyond :data:`REQUIRED` and :data:`OPTIONAL`
    settings: ClassVar[tuple[str, ...]] = ()
    #: template fields this type fills beyond :data:`COMMON_FIELDS`
    fills: ClassVar[tuple[str, ...]] = ()

    name: str
    type: str
    metric: str
    severity: str
    message: str
    op: str = ">="
    value: float = 0.0
    source: str | None = None

    @property
    def probe(self) -> str:
        """The probe part of :attr:`metric` (before the first ``/``); keys the evidence dict."""
        return self.metric.split("/", 1)[0]

    def holds(self, value: float) -> bool:
        """Whether ``value op threshold`` holds (the metric has crossed)."""
        return OPS[self.op](value, self.value)

    @classmethod
    def parse_settings(cls, item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError]) -> dict[str, Any]:
        """This type's own settings from a rule's YAML mapping, validated (errors through ``fail``)."""
        return {}

    def observe(
        self, state: RuleState, step: int, value: float, metrics: Mapping[str, float | None]
    ) -> dict[str, Any] | None:
        """Judge one new value: None, or the message fields of the event to raise (``forecast_step`` and what
        else the type fills)."""
        raise NotImplementedError(f"{type(self).__name__}.observe")

    def threshold_at(self, step: int) -> float:
        """The threshold an event raised at ``step`` reports."""
        return self.value

    def own_settings(self) -> dict[str, Any]:
        """This type's settings in their YAML shape (see :meth:`to_dict`)."""
        return {"op": self.op, "value": self.value}

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
            **self.own_settings(),
        }
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

    @classmethod
    def intervention(
        cls,
        kind: str,
        step: int | None,
        images: Sequence[str],
        detail: Mapping[str, Any],
        *,
        message: str = "",
        error: str | None = None,
    ) -> Event:
        """The ``info`` event that puts a change to training on the record (``intervention-<kind>``).

        Example:
            >>> Event.intervention("reweight", 300, ["a.png"], {"weight": 0.0}).message
            'intervention reweight'
        """
        text = message or (f"intervention {kind} failed: {error}" if error else f"intervention {kind}")
        return cls(step=step if step is not None else -1, rule=f"intervention-{kind}", severity="info",
                   metric=f"intervention/{kind}", value=float(len(images)), threshold=math.nan,
                   forecast_step=None, message=text,
                   evidence={"images": list(images)[:50], "detail": dict(detail), "error": error})  # fmt: skip

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
    cls = RULE_TYPES.get(rtype) if isinstance(rtype, str) else None
    if cls is None:
        raise fail("type", f"is {rtype!r}: use one of {', '.join(RULE_TYPES)}")
    allowed = REQUIRED + OPTIONAL + cls.settings
    for key in item:
        if key not in allowed:
            raise fail(key, f"is not known for a {rtype} rule: allowed settings are {', '.join(allowed)}")
    metric = item["metric"]
    if not isinstance(metric, str) or not re.fullmatch(r"[^/\s]+/\S+", metric):
        raise fail("metric", f"is {metric!r}: write it as 'probe/metric', e.g. 'regurgitation/mem_fraction'")
    severity = item["severity"]
    if severity not in SEVERITIES:
        raise fail("severity", f"is {severity!r}: use one of {', '.join(SEVERITIES)}")
    kwargs = cls.parse_settings(item, fail)
    message = item["message"]
    if not isinstance(message, str):
        raise fail("message", f"must be a string, got {type(message).__name__}")
    rule_source = item.get("source")
    if rule_source is not None and not isinstance(rule_source, str):
        raise fail("source", f"must be a string (where the threshold comes from), got {type(rule_source).__name__}")
    _check_template(message, cls, fail)
    return cls(name=name, type=rtype, metric=metric, severity=severity, message=message, source=rule_source, **kwargs)


def comparison(item: Mapping[str, Any], fail: Callable[[str, str], MemwatchError], rtype: str) -> dict[str, Any]:
    """``op`` and ``value`` of a rule that compares a metric with a threshold."""
    for key in ("op", "value"):
        if key not in item or item[key] is None:
            raise fail(key, f"is missing: a {rtype} rule needs op, value")
    op = item["op"]
    if op not in OPS:
        raise fail("op", f"is {op!r}: use one of {', '.join(OPS)} (quoted in YAML)")
    return {"op": op, "value": number(item["value"], fail("value", number_problem(item["value"])))}


def number_problem(raw: Any) -> str:
    """Why ``raw`` is not a usable number, with the PyYAML ``1e-3`` pitfall spelled out."""
    if isinstance(raw, str):
        try:
            float(raw)
        except ValueError:
            pass
        else:
            return f"is the text {raw!r}: YAML read it as a string; write a number such as 1.0e-3 (with a dot)"
    return f"is {raw!r}: it must be a finite number"


def number(raw: Any, error: MemwatchError) -> float:
    """``raw`` as a finite float; bools and strings are rejected (YAML ``yes`` is not a number)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise error
    return float(raw)


def count(raw: Any, minimum: int, fail: Callable[[str, str], MemwatchError], setting: str) -> int:
    """``raw`` as an int of at least ``minimum``."""
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise fail(setting, f"is {raw!r}: it must be a whole number >= {minimum}")
    return raw


def _check_template(message: str, cls: type[Rule], fail: Callable[[str, str], MemwatchError]) -> None:
    """Reject placeholders that could never be filled, so a typo shows at load time, not in an alert."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(message) if f is not None]
    except ValueError as exc:
        raise fail("message", f"is not a valid template ({exc}): write {{{{ and }}}} for literal braces") from None
    for f in fields:
        root = re.split(r"[.\[]", f, maxsplit=1)[0]
        if root not in template_fields():
            raise fail("message", f"uses {{{f}}}: placeholders are {', '.join(template_fields())}")
        if root not in COMMON_FIELDS and root not in cls.fills:
            having = [t for t, c in RULE_TYPES.items() if root in c.fills]
            raise fail("message", f"uses {{{root}}}, which only {' and '.join(having)} rules have")


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


def finite(raw: float | None, default: float) -> float:
    """``raw`` as a float when it is a finite number, else ``default``."""
    if raw is None:
        return default
    value = float(raw)
    return value if math.isfinite(value) else default


# --------------------------------------------------------------------------------------------
# Engine


@dataclass
class RuleState:
    """Mutable per-rule state.

    ``armed`` is whether the rule may fire: threshold and trend rules disarm on firing and re-arm
    when the condition clears; a first rule never re-arms. ``streak`` counts consecutive breaching
    probes (threshold, forecast); ``history`` keeps the last ``window`` ``(step, value)`` points (trend).
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
        self._state: dict[str, RuleState] = {r.name: RuleState() for r in self.rules}

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
            fired = rule.observe(self._state[rule.name], step, value, metrics)
            if fired is not None:
                fill = {"keep": "the last checkpoint saved before this step", **(context or {}), **fired}
                events.append(_event(rule, step, value, evidence.get(rule.probe, {}), fill))
        return events

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
        restored: dict[str, RuleState] = {}
        for rule in self.rules:
            entry = saved.get(rule.name)
            if not isinstance(entry, Mapping) or (entry.get("type"), entry.get("metric")) != (
                rule.type,
                rule.metric,
            ):
                restored[rule.name] = RuleState()
                continue
            try:
                history = [(int(st), float(v)) for st, v in entry.get("history", [])]
                restored[rule.name] = RuleState(
                    streak=int(entry["streak"]), armed=bool(entry["armed"]), history=history
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise MemwatchError(f"{where}: entry for rule {rule.name!r} is malformed ({exc})") from None
        self._state = restored


def _event(rule: Rule, step: int, value: float, evidence: Mapping[str, Any], fill: Mapping[str, Any]) -> Event:
    """The event ``rule`` raises at ``step``, its message filled."""
    threshold = rule.threshold_at(step)
    forecast = fill.get("forecast_step")
    fields = {
        **fill,
        "evidence": evidence,
        "value": value,
        "threshold": threshold,
        "step": step,
        "metric": rule.metric,
        "rule": rule.name,
        "op": rule.op,
        "severity": rule.severity,
    }
    return Event(
        step=step,
        rule=rule.name,
        severity=rule.severity,
        metric=rule.metric,
        value=value,
        threshold=threshold,
        forecast_step=forecast,
        message=_render(rule.message, fields),
        evidence=dict(evidence),
    )
