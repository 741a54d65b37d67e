"""Tests for memwatch.signals.rules: rule parsing, the three rule types, state round trip."""

from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import pytest
import yaml

from memwatch.errors import MemwatchError
from memwatch.signals import rules as rules_mod
from memwatch.signals.rules import (
    Event,
    RuleEngine,
    forecast_crossing,
    parse_rules,
    severity_at_least,
)

METRIC = "regurgitation/mem_fraction"


def rule(**overrides):
    """A valid threshold rule dict, with overrides."""
    base = {
        "name": "mem-high",
        "type": "threshold",
        "metric": METRIC,
        "op": ">",
        "value": 0.05,
        "severity": "critical",
        "message": "{metric} = {value} > {threshold} at step {step}",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def trend_rule(**overrides):
    base = rule(
        name="auc-rising",
        type="trend",
        metric="membership/mia_auc",
        op=">",
        value=0.5,
        horizon=250,
        message="crossing at {forecast_step}",
    )
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def run(engine, series, metric=METRIC):
    """Feed ``[(step, value), ...]``; return the steps at which events fired."""
    fired = []
    for step, value in series:
        fired += [e.step for e in engine.observe(step, {metric: value})]
    return fired


# ---------------------------------------------------------------- parsing


def test_docstring_yaml_example_parses():
    doc = rules_mod.__doc__
    tail = doc.split("Example (YAML)::\n", 1)[1].splitlines()
    block = []
    for line in tail:
        if line and not line.startswith("    "):
            break
        block.append(line)
    parsed = parse_rules(yaml.safe_load(textwrap.dedent("\n".join(block))), "docstring")
    assert [r.type for r in parsed] == ["threshold", "first", "trend", "forecast"]
    assert parsed[0].consecutive == 2 and parsed[2].horizon == 2000.0
    # to_dict gives back the YAML shape, which parses to the same rules.
    assert parse_rules([r.to_dict() for r in parsed]) == parsed


def test_defaults_applied():
    (t,) = parse_rules([rule()])
    (tr,) = parse_rules([trend_rule()])
    assert t.consecutive == 1 and t.probe == "regurgitation"
    assert (tr.window, tr.min_points) == (5, 3)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (rule(type="spike"), ["'mem-high'", "'type'", "threshold, first, trend"]),
        (rule(op="=>"), ["'mem-high'", "'op'", ">, >=, <, <="]),
        (rule(severity="fatal"), ["'mem-high'", "'severity'", "info, warning, critical"]),
        (rule(metric="mem_fraction"), ["'mem-high'", "'metric'", "probe/metric"]),
        (rule(value="high"), ["'mem-high'", "'value'", "finite number"]),
        (rule(value="1e-3"), ["'mem-high'", "'value'", "1.0e-3"]),
        (rule(value=float("nan")), ["'mem-high'", "'value'"]),
        (rule(value=True), ["'mem-high'", "'value'"]),
        (rule(severity=...), ["'mem-high'", "'severity'", "missing"]),
        (rule(name=...), ["rules[0]", "'name'", "missing"]),
        (rule(**{"for": 0}), ["'mem-high'", "'for'", ">= 1"]),
        (rule(**{"for": 2.5}), ["'mem-high'", "'for'", "whole number"]),
        (rule(horizon=100), ["'mem-high'", "'horizon'", "allowed settings"]),
        (rule(message="{vaule}"), ["'mem-high'", "'message'", "{vaule}", "placeholders are"]),
        (rule(message="at {forecast_step}"), ["'mem-high'", "'message'", "trend"]),
        (rule(message="brace {"), ["'mem-high'", "'message'", "literal braces"]),
        (trend_rule(horizon=...), ["'auc-rising'", "'horizon'", "missing"]),
        (trend_rule(horizon=-5), ["'auc-rising'", "'horizon'", "positive"]),
        (trend_rule(window=3, min_points=4), ["'auc-rising'", "'min_points'", "window"]),
        (trend_rule(window=1), ["'auc-rising'", "'window'", ">= 2"]),
        ("not a dict", ["rules[0]", "mapping"]),
    ],
)
def test_validation_errors_name_rule_and_setting(raw, expected):
    with pytest.raises(MemwatchError) as info:
        parse_rules([raw], source="memwatch.yaml")
    msg = str(info.value)
    assert msg.startswith("memwatch.yaml: ")
    assert "\n" not in msg
    for part in expected:
        assert part in msg


def test_validation_duplicate_names_and_second_rule_index():
    with pytest.raises(MemwatchError, match=r"rules\[1\].*'name'.*unique"):
        parse_rules([rule(), rule()])
    with pytest.raises(MemwatchError, match=r"rules\[1\].*'op'"):
        parse_rules([rule(), rule(name="other", op="==")])


def test_parse_rules_empty_and_not_a_list():
    assert parse_rules(None) == []
    with pytest.raises(MemwatchError, match="list"):
        parse_rules({"rules": [rule()]}, "cfg.yaml")


def test_severity_at_least():
    assert severity_at_least("critical", "warning")
    assert severity_at_least("warning", "warning")
    assert not severity_at_least("info", "warning")
    assert severity_at_least("info", "info")
    with pytest.raises(MemwatchError, match="info, warning, critical"):
        severity_at_least("warning", "severe")


# ---------------------------------------------------------------- threshold


def test_threshold_fires_on_breach_and_not_on_flat_series():
    engine = RuleEngine(parse_rules([rule()]))
    assert run(engine, [(s, 0.01) for s in range(0, 1000, 100)]) == []
    (event,) = engine.observe(1000, {METRIC: 0.08}, {"regurgitation": {"seeds": [3, 7]}})
    assert (event.step, event.value, event.threshold, event.severity) == (1000, 0.08, 0.05, "critical")
    assert event.forecast_step is None
    assert event.evidence == {"seeds": [3, 7]}
    assert event.message == f"{METRIC} = 0.08 > 0.05 at step 1000"


def test_threshold_for_three_needs_three_consecutive_breaches():
    engine = RuleEngine(parse_rules([rule(**{"for": 3})]))
    # two breaches, a break (resets), then three breaches: fires on the third of those.
    series = [(1, 0.1), (2, 0.1), (3, 0.0), (4, 0.1), (5, 0.1), (6, 0.1)]
    assert run(engine, series) == [6]


def test_threshold_sustained_breach_is_one_event_and_rearms():
    engine = RuleEngine(parse_rules([rule()]))
    series = [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.01), (5, 0.1), (6, 0.1)]
    assert run(engine, series) == [1, 5]


def test_threshold_boundary_ops():
    engine = RuleEngine(parse_rules([rule(op=">="), rule(name="low", op="<", value=0.05)]))
    events = engine.observe(1, {METRIC: 0.05})
    assert [e.rule for e in events] == ["mem-high"]


def test_nan_and_missing_metric_skip_without_resetting():
    engine = RuleEngine(parse_rules([rule(**{"for": 2})]))
    assert engine.observe(1, {METRIC: 0.1}) == []
    assert engine.observe(2, {METRIC: float("nan")}) == []  # not a breach, not a reset
    assert engine.observe(3, {"membership/mia_auc": 0.9}) == []  # probe did not run
    assert engine.observe(4, {METRIC: None}) == []
    assert [e.step for e in engine.observe(5, {METRIC: 0.1})] == [5]
    # NaN alone never fires.
    engine = RuleEngine(parse_rules([rule()]))
    assert run(engine, [(s, math.nan) for s in range(5)]) == []


# ---------------------------------------------------------------- first


def test_first_fires_exactly_once():
    first = rule(name="first-copy", type="first", metric="regurgitation/distinct_memorized", op=">", value=0)
    engine = RuleEngine(parse_rules([first]))
    series = [(1, 0), (2, 0), (3, 1), (4, 2), (5, 0), (6, 3)]
    assert run(engine, series, "regurgitation/distinct_memorized") == [3]


def test_first_silent_on_flat_series():
    first = rule(name="first-copy", type="first", metric="regurgitation/distinct_memorized", op=">", value=0)
    engine = RuleEngine(parse_rules([first]))
    assert run(engine, [(s, 0) for s in range(10)], "regurgitation/distinct_memorized") == []


# ---------------------------------------------------------------- trend


def test_forecast_recovers_linear_crossing():
    steps = np.arange(100, 400, 50)
    assert forecast_crossing(steps, 0.001 * steps, 0.5, ">") == pytest.approx(500.0, abs=1e-6)
    # large steps, offset and a falling series with op '<'
    steps = np.arange(200_000, 200_500, 100)
    values = 0.9 - 2e-4 * (steps - 200_000)
    assert forecast_crossing(steps, values, 0.5, "<=") == pytest.approx(202_000.0, abs=1e-6)


def test_forecast_none_for_flat_away_or_degenerate():
    assert forecast_crossing([1, 2, 3], [0.2, 0.2, 0.2], 0.5, ">") is None
    assert forecast_crossing([1, 2, 3], [0.3, 0.2, 0.1], 0.5, ">") is None
    assert forecast_crossing([1, 2, 3], [0.1, 0.2, 0.3], 0.0, "<") is None
    assert forecast_crossing([5, 5, 5], [0.1, 0.2, 0.3], 0.5, ">") is None
    assert forecast_crossing([5], [0.1], 0.5, ">") is None
    with pytest.raises(ValueError):
        forecast_crossing([1, 2], [0.1, 0.2], 0.5, "==")


def test_forecast_matches_polyfit_on_noisy_series():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 1000, 100, dtype=float)
    values = 0.0004 * steps + 0.1 + rng.normal(0, 0.01, steps.size)
    slope, intercept = np.polyfit(steps, values, 1)
    assert forecast_crossing(steps, values, 0.7, ">") == pytest.approx((0.7 - intercept) / slope, rel=1e-9)


def test_trend_fires_only_within_horizon():
    metric = "membership/mia_auc"
    engine = RuleEngine(parse_rules([trend_rule(horizon=100)]))
    # y = 0.001 * step crosses 0.5 at step 500
    events = []
    for step in (100, 200, 300, 400):
        events += engine.observe(step, {metric: 0.001 * step}, {"membership": {"n": 8}})
    (event,) = events
    assert event.step == 400  # at 300 the crossing is 200 steps ahead: outside the horizon
    assert event.forecast_step == 500
    assert event.message == "crossing at 500"
    assert event.evidence == {"n": 8}

    wide = RuleEngine(parse_rules([trend_rule(horizon=250)]))
    assert run(wide, [(s, 0.001 * s) for s in (100, 200, 300, 400)], metric) == [300]


def test_trend_needs_min_points():
    engine = RuleEngine(parse_rules([trend_rule(horizon=10_000, min_points=4)]))
    assert run(engine, [(s, 0.001 * s) for s in (100, 200, 300, 400)], "membership/mia_auc") == [400]


def test_trend_silent_on_flat_and_decreasing_series():
    metric = "membership/mia_auc"
    flat = RuleEngine(parse_rules([trend_rule(horizon=10_000)]))
    assert run(flat, [(s, 0.45) for s in range(100, 1100, 100)], metric) == []
    falling = RuleEngine(parse_rules([trend_rule(horizon=10_000)]))
    assert run(falling, [(s, 0.49 - 0.0001 * s) for s in range(100, 1100, 100)], metric) == []


def test_trend_silent_once_crossed_and_rearms():
    metric = "membership/mia_auc"
    engine = RuleEngine(parse_rules([trend_rule(horizon=150, window=3)]))
    series = [
        (100, 0.30),
        (200, 0.40),
        (300, 0.45),  # forecast 400-ish: fires
        (400, 0.48),  # still within horizon: no second event
        (500, 0.60),  # crossed: silent, re-arms
        (600, 0.40),
        (700, 0.20),  # falling: forecast gone
        (800, 0.30),
        (900, 0.40),  # approaching again (fit over 700..900 crosses at 1000): fires again
        (1000, 0.45),
    ]
    assert run(engine, series, metric) == [300, 900]


def test_trend_window_uses_recent_points():
    # Old flat points would pull the slope down; window=3 follows the recent climb.
    metric = "membership/mia_auc"
    series = [(s, 0.1) for s in (100, 200, 300)] + [(400, 0.2), (500, 0.3), (600, 0.4)]
    narrow = RuleEngine(parse_rules([trend_rule(horizon=100, window=3)]))
    assert run(narrow, series, metric) == [600]
    wide = RuleEngine(parse_rules([trend_rule(horizon=100, window=6)]))
    assert run(wide, series, metric) == []


def test_trend_drops_points_after_a_resume_from_earlier_step():
    metric = "membership/mia_auc"
    engine = RuleEngine(parse_rules([trend_rule(horizon=100, min_points=3)]))
    assert run(engine, [(100, 0.1), (200, 0.2), (300, 0.3)], metric) == []
    # Resumed at 200: points 200 and 300 are gone, so only two points remain: no forecast.
    assert run(engine, [(200, 0.2)], metric) == []
    assert engine.state()["rules"]["auc-rising"]["history"] == [[100, 0.1], [200, 0.2]]


# ---------------------------------------------------------------- messages, events, state


def test_message_safe_fallback():
    (r,) = parse_rules([rule(message="{value:.3f} over {threshold:.2f}")])
    (event,) = RuleEngine([r]).observe(7, {METRIC: 0.08123})
    assert event.message == "0.081 over 0.05"
    # A format spec that does not suit the value falls back to the raw template, keeping the event.
    (r,) = parse_rules([rule(message="step {step:.2q}")])
    (event,) = RuleEngine([r]).observe(7, {METRIC: 0.08})
    assert event.message == "step {step:.2q}"


def test_event_to_dict_json_round_trip():
    engine = RuleEngine(parse_rules([trend_rule(horizon=250)]))
    events = []
    for s in (100, 200, 300):
        events += engine.observe(s, {"membership/mia_auc": 0.001 * s}, {"membership": {"ids": ["a"]}})
    (event,) = events
    data = json.loads(json.dumps(event.to_dict()))
    assert data["forecast_step"] == 500 and data["evidence"] == {"ids": ["a"]}
    assert Event.from_dict(data) == event


def test_state_round_trip_continues_counting():
    specs = [
        rule(**{"for": 3}),
        rule(name="first-copy", type="first", metric="regurgitation/distinct_memorized", value=0),
        trend_rule(horizon=150),
    ]
    engine = RuleEngine(parse_rules(specs))
    for step in (100, 200, 300):
        engine.observe(
            step,
            {METRIC: 0.1, "regurgitation/distinct_memorized": 1, "membership/mia_auc": 0.001 * step},
        )
    # for=3 has fired at 300 and first has fired; break the threshold streak, then two breaches.
    engine.observe(400, {METRIC: 0.0})
    engine.observe(500, {METRIC: 0.1})
    engine.observe(600, {METRIC: 0.1})
    saved = json.loads(json.dumps(engine.state()))

    resumed = RuleEngine(parse_rules(specs))
    resumed.load_state(saved)
    assert resumed.state() == saved
    events = resumed.observe(700, {METRIC: 0.1, "regurgitation/distinct_memorized": 5, "membership/mia_auc": 0.42})
    # third consecutive breach fires; first does not fire again; trend still has 4 points
    # (100..300 and 700) and the crossing at ~821 is within 150 steps.
    assert sorted(e.rule for e in events) == ["auc-rising", "mem-high"]

    fresh = RuleEngine(parse_rules(specs))
    events = fresh.observe(700, {METRIC: 0.1, "regurgitation/distinct_memorized": 5, "membership/mia_auc": 0.42})
    assert [e.rule for e in events] == ["first-copy"]  # without the state, counting starts over


def test_load_state_resets_changed_rules_and_rejects_garbage():
    engine = RuleEngine(parse_rules([rule(**{"for": 2})]))
    engine.observe(1, {METRIC: 0.1})
    saved = engine.state()
    changed = RuleEngine(parse_rules([rule(**{"for": 2}, metric="regurgitation/copy_fraction")]))
    changed.load_state(saved)
    assert changed.state()["rules"]["mem-high"]["streak"] == 0
    with pytest.raises(MemwatchError, match="state"):
        engine.load_state({"rules": {}})
    bad = json.loads(json.dumps(saved))
    bad["rules"]["mem-high"]["streak"] = "many"
    with pytest.raises(MemwatchError, match="'mem-high'"):
        engine.load_state(bad)


def test_trend_rearms_when_metric_crosses():
    # The forecast stays within the (wide) horizon throughout, so only the crossing at 400 re-arms:
    # after dipping back below, the rising fit warns again.
    engine = RuleEngine(parse_rules([trend_rule(horizon=10_000, window=3)]))
    series = [(100, 0.30), (200, 0.40), (300, 0.45), (400, 0.60), (500, 0.49)]
    assert run(engine, series, "membership/mia_auc") == [300, 500]
