"""Early-warning rules: turn a series of probe metrics into events.

A monitor probes a training run every so often and gets metric values keyed ``"probe/metric"``
(e.g. ``"regurgitation/mem_fraction"``) at a training step. A :class:`RuleEngine` holds the rules
and their per-rule state, and :meth:`RuleEngine.observe` returns the :class:`Event` objects one
probe result triggers. Each rule type is one class in :mod:`memwatch.signals.rules.types` (the base,
parsing and the engine are in :mod:`memwatch.signals.rules.base`). Four rule types exist:

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
  (or within ``horizon`` steps, whichever is larger) of the current step, at ``for`` consecutive
  forecasts (default 1). It re-arms when a later
  forecast lies beyond the horizon again; a probe without a forecast (NaN) changes nothing. The
  adaptive cadence (:mod:`memwatch.core.cadence`) reads the same band, and the probe's ``slope_t`` (the
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

from memwatch.signals.rules.base import (
    COMMON_FIELDS,
    OPS,
    RULE_TYPES,
    SEVERITIES,
    Event,
    Rule,
    RuleEngine,
    RuleState,
    forecast_crossing,
    parse_rules,
    rule_type,
    severity_at_least,
    template_fields,
)
from memwatch.signals.rules.types import FirstRule, ForecastRule, ThresholdRule, TrendRule

#: The rule type that reads a forecast and its band.
FORECAST = ForecastRule.kind

__all__ = [
    "COMMON_FIELDS",
    "FORECAST",
    "OPS",
    "RULE_TYPES",
    "SEVERITIES",
    "Event",
    "FirstRule",
    "ForecastRule",
    "Rule",
    "RuleEngine",
    "RuleState",
    "ThresholdRule",
    "TrendRule",
    "forecast_crossing",
    "parse_rules",
    "rule_type",
    "severity_at_least",
    "template_fields",
]
