"""The result every probe returns, whatever it measured.

A probe takes a snapshot (a live model or samples) and returns a :class:`ProbeResult`: named
scalar metrics, optional per-sample match rows, optional per-item rows (e.g. per-example losses)
and timings. Front-ends write it to the store in one transaction and log the metrics; nothing in a
result depends on which front-end produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProbeResult:
    """Output of one probe on one snapshot.

    Attributes:
        probe: probe name, e.g. ``"regurgitation"`` or ``"membership"``.
        metrics: metric name -> value (floats; NaN where undefined).
        matches: per-sample rows (regurgitation): ``sample``, ``seed``, ``nn1``, ``d1``, ``d2``,
            ``ratio``, ``similarity``, ``extraction``, ``memorized``, ``copied``, ``extracted``.
        items: other per-item rows a probe wants kept (e.g. per-example losses).
        timings: seconds spent per phase (``sampling``, ``embedding``, ``search``...).
        evidence: paths of evidence files written for this result.
    """

    probe: str
    metrics: dict[str, float]
    matches: list[dict[str, Any]] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)
