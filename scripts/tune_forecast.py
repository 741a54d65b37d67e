#!/usr/bin/env python
"""Tune the onset forecast's defaults on the dense ground truth of ``bench_warnings.py`` runs.

Each run folder's ``truth.json`` holds every seed's d1/d2 at every dense step (64 seeds, every 50
steps, the monitor's own sampler settings). The monitor's probes are the first 32 of those seeds, so
its warnings can be replayed for any forecast setting and any cadence that falls on dense steps,
without training again. The replay uses memwatch's own forecaster (:func:`memwatch.signals.forecast.forecast_onset`),
rule engine and adaptive cadence (without the time budget).

Tune on some seeds, report on others: run ``bench_warnings.py --no-monitor --seeds 100 101`` for the
tuning runs, tune here, set the defaults, then run the benchmark on seeds 0-2 with the monitor.

    python scripts/tune_forecast.py runs/tune --json runs/tune/grid.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from memwatch.core.cadence import Cadence, CadenceSettings
from memwatch.signals.forecast import forecast_onset
from memwatch.signals.rules import RuleEngine, parse_rules

MONITOR_SEEDS = 32


def replay(
    truth: dict[str, Any],
    *,
    quantile: float,
    window: int,
    horizon_share: float,
    adaptive: bool,
    every: int,
    max_extrapolation: float,
) -> dict:
    """The monitor's first warnings on one run, replayed from its dense truth."""
    steps = truth["steps"]
    ratios = {s: r[:MONITOR_SEEDS] for s, r in zip(steps, truth["ratios"], strict=True)}
    dense = steps[1] - steps[0] if len(steps) > 1 else 50
    rules = parse_rules(
        [
            {"name": "first", "type": "first", "metric": "regurgitation/distinct_memorized", "op": ">", "value": 0,
             "severity": "warning", "message": "m"},
            {"name": "forecast", "type": "forecast", "metric": "forecast/onset", "horizon_share": horizon_share,
             "severity": "warning", "message": "m"},
        ]
    )  # fmt: skip
    engine = RuleEngine(rules)
    cadence = Cadence(CadenceSettings(adaptive=adaptive, budget=None))
    trajectory: list[tuple[int, dict[int, float]]] = []
    first: dict[str, int] = {}
    for step in steps:
        if not cadence.due("regurgitation", step, every=every, sample_probe=True):
            continue
        now = dict(enumerate(ratios[step]))
        trajectory.append((step, now))
        f = forecast_onset(trajectory[-window:], quantile=quantile, window=window, max_extrapolation=max_extrapolation)
        metrics = {f"forecast/{k}": v for k, v in f.metrics().items()}
        metrics["regurgitation/distinct_memorized"] = float(sum(r < 1 / 3 for r in now.values()))
        for e in engine.observe(step, metrics):
            first.setdefault(e.rule, step)
        if adaptive:
            nxt = cadence.schedule(step, {"regurgitation": every}, f.low, math.isfinite(f.slope_t) and f.slope_t >= 0)
            # the replay can only probe where the truth was measured: the next dense step
            cadence.next_due["regurgitation"] = math.ceil(nxt["regurgitation"] / dense) * dense
    return first


def evaluate(runs: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    leads, misses, false_alarms = [], 0, 0
    for run in runs:
        first = replay(run["truth"], **settings)
        warning = min(first.values()) if first else None
        onset = run["onset_step"]
        if onset is None:
            false_alarms += warning is not None
        elif warning is None or warning >= onset:
            misses += 1
        else:
            leads.append((onset - warning) / onset)
    return {
        "median_lead_fraction": statistics.median(leads) if leads else None,
        "min_lead_fraction": min(leads) if leads else None,
        "misses": misses,
        "false_alarms": false_alarms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="a bench_warnings.py --out folder")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs = [json.loads(f.read_text()) for f in sorted(Path(args.runs).glob("*/truth.json"))]
    print(f"{len(runs)} runs: {sum(r['onset_step'] is not None for r in runs)} with onset")
    grid = []
    space = itertools.product(
        [0.0, 0.1, 0.2], [4, 5, 6], [0.25, 0.5, 1.0], [False, True], [100, 200], [1.0, 1.5, 2.0, 3.0]
    )
    for q, w, h, a, e, x in space:
        result = evaluate(runs, quantile=q, window=w, horizon_share=h, adaptive=a, every=e, max_extrapolation=x)
        grid.append({"quantile": q, "window": w, "horizon_share": h, "adaptive": a, "every": e,
                     "max_extrapolation": x, **result})  # fmt: skip
    ok = [g for g in grid if g["false_alarms"] == 0 and g["misses"] == 0]
    ok.sort(key=lambda g: -(g["median_lead_fraction"] or 0))
    for g in (ok or grid)[:15]:
        print(g)
    if args.json:
        Path(args.json).write_text(json.dumps(grid, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
