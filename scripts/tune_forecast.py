#!/usr/bin/env python
"""Tune the onset forecast and the cadence on the dense ground truth of ``bench_warnings.py`` runs.

Each run folder's ``truth.json`` holds, every 50 steps, every seed's d1/d2 (64 seeds, the monitor's sampler),
the monitor's 32 seeds sampled with fewer DDIM steps (``ratios_fast``) and the membership losses. The
monitor's probes are the first 32 seeds, so its warnings can be replayed for any forecast setting and any
cadence that probes on dense steps, without training again. The replay uses memwatch's own forecaster
(:func:`memwatch.signals.forecast.forecast_onset`), rule engine and adaptive cadence with its work budget;
the work is the monitor's own count (denoiser evaluations, :class:`memwatch.core.cadence.WorkMeter`) for
``bench_warnings.py``'s recipe: a training step of 32 images, a sample probe of 32 seeds x DDIM steps, a
membership probe of (members + 32 held-out images) x 4 timesteps.

Tune on the tuning seeds, report on others: ``bench_warnings.py --tune --no-monitor --out runs/tune``, then
this script on that folder, set the defaults, then ``bench_warnings.py`` (reporting seeds, with the monitor).

    python scripts/tune_forecast.py runs/tune --json runs/tune/grid.json
    python scripts/tune_forecast.py runs/tune --diagnose      # fast vs full samples, membership as a gate

The tuning truth of the current defaults is kept in ``docs/data/tune`` (``--export``: each run's
``truth.json`` without the nearest-image names, gzipped, 30 kB a run), so the defaults can be re-tuned and
checked without training again: ``python scripts/tune_forecast.py docs/data/tune``.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import memwatch.core.cadence as cadence_module
from memwatch.core.cadence import TRAINING_PASS_WORK, Cadence, CadenceSettings
from memwatch.probes.membership import MembershipConfig
from memwatch.probes.regurgitation import MEM_RATIO
from memwatch.sampling.plan import SamplingSettings
from memwatch.signals.forecast import forecast_onset, precursor
from memwatch.signals.rules import RuleEngine, parse_rules

MONITOR_SEEDS = 32
TRAIN_BATCH = 32  # bench_warnings.py's recipe
HOLDOUT = 32
DENSE = 50


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the forecast's settings and the cadence's (the rule's horizon is replayed beside)."""

    method: str = "ols"
    quantile: float = 0.0  # of the seeds' ratios (0: the smallest; 0.05: when 5% of the samples copy)
    closest: int = 1  # the precursor: the geometric mean of the quantile and the closest - 1 ratios above it
    consecutive: int = 1  # the rule's ``for``: forecasts within the horizon in a row before a warning
    window: int = 6
    max_extrapolation: float = 2.0
    every: int = 100
    fast: bool = False  # the precursor (and the copies) from the fast samples
    budget: float | None = 0.03
    membership_every: int = 50
    free_share: float = 0.5  # the most of the budget the sampling-free probes take (cadence.SAMPLING_FREE_SHARE)
    gap_share: float | None = None  # a warning when members' loss is this share below the holdout's (None: no rule)
    gap_for: int = 2  # ... on this many membership probes in a row


def precursor_series(
    truth: dict[str, Any], fast: bool, quantile: float, closest: int = 1
) -> tuple[list[float], list[int]]:
    """Per dense step: the precursor of the monitor's seeds' ratios (as the forecast takes it), and how
    many of them are copies."""
    rows = truth["ratios_fast"] if fast else [r[:MONITOR_SEEDS] for r in truth["ratios"]]
    values, copies = [], []
    for ratios in rows:
        finite = [r for r in ratios if r is not None and math.isfinite(r)]
        values.append(precursor(finite, quantile, closest) if finite else math.nan)
        copies.append(sum(r < MEM_RATIO for r in finite))
    return values, copies


_FORECASTS: dict[tuple, tuple[float, float, float]] = {}


def _forecast(points: tuple[tuple[int, float], ...], s: Setting) -> tuple[float, float, float]:
    """(onset, low, slope_t) of the forecast on these points (one precomputed quantile per step), cached."""
    key = (points, s.method, s.window, s.max_extrapolation)
    if key not in _FORECASTS:
        f = forecast_onset([(st, {0: v}) for st, v in points], quantile=0.0, window=s.window,
                           max_extrapolation=s.max_extrapolation, method=s.method)  # fmt: skip
        _FORECASTS[key] = (f.onset, f.low, f.slope_t)
    return _FORECASTS[key]


def replay(run: dict[str, Any], s: Setting, horizons: tuple[float, ...] = (0.5,)) -> dict[str, Any]:
    """The monitor's probed steps and first warnings on one run, replayed from its dense truth, for each of
    the forecast rule's ``horizons`` (``horizon_share``: the rule does not change when probes run)."""
    truth, n = run["truth"], run["n"]
    steps = truth["steps"]
    fast_steps = truth.get("fast_steps", 10)
    values, copies = precursor_series(truth, s.fast, s.quantile, s.closest)
    at = {st: i for i, st in enumerate(steps)}
    per_step = TRAIN_BATCH * TRAINING_PASS_WORK
    sample_work = MONITOR_SEEDS * (fast_steps if s.fast else SamplingSettings().inference_steps)
    member_work = (min(n, MembershipConfig().num_members) + HOLDOUT) * len(MembershipConfig().timesteps)
    engines = {h: RuleEngine(parse_rules([
        {"name": "first", "type": "first", "metric": "regurgitation/distinct_memorized", "op": ">", "value": 0,
         "severity": "warning", "message": "m"},
        {"name": "forecast", "type": "forecast", "metric": "forecast/onset", "horizon_share": h,
         "for": s.consecutive, "severity": "warning", "message": "m"},
        *([{"name": "gap", "type": "threshold", "metric": "membership/loss_gap_share", "op": ">=",
            "value": s.gap_share, "for": s.gap_for, "severity": "warning", "message": "m"}]
          if s.gap_share is not None else []),
    ])) for h in horizons}  # fmt: skip
    cadence_module.SAMPLING_FREE_SHARE = s.free_share
    cadence = Cadence(CadenceSettings(adaptive=True, budget=s.budget))
    trajectory: list[tuple[int, float]] = []
    first: dict[float, dict[str, int]] = {h: {} for h in horizons}
    probed: list[int] = []
    low, receding = math.nan, False
    for step in range(1, steps[-1] + 1):
        cadence.tick(per_step * step)
        if step not in at:
            continue
        ran: dict[str, tuple[int, bool]] = {}
        work = 0
        if s.membership_every and cadence.due("membership", step, every=s.membership_every, sample_probe=False):
            ran["membership"] = (s.membership_every, False)
            work += member_work
            m = truth["membership"][at[step]]
            share = {"membership/loss_gap_share": (m["loss_holdout"] - m["loss_member"]) / m["loss_holdout"]}
            for h, engine in engines.items():
                for e in engine.observe(step, share):
                    first[h].setdefault(e.rule, step)
        if cadence.due("regurgitation", step, every=s.every, sample_probe=True):
            ran["regurgitation"] = (s.every, True)
            work += sample_work
            probed.append(step)
            i = at[step]
            trajectory.append((step, values[i]))
            onset, low, slope_t = _forecast(tuple(trajectory[-s.window :]), s)
            receding = math.isfinite(slope_t) and slope_t >= 0
            metrics = {"forecast/onset": onset, "forecast/onset_low": low,
                       "regurgitation/distinct_memorized": float(copies[i])}  # fmt: skip
            for h, engine in engines.items():
                for e in engine.observe(step, metrics):
                    first[h].setdefault(e.rule, step)
        if ran:
            cadence.probed(0.0, sampled="regurgitation" in ran, work=work)
            cadence.schedule(step, ran, low, receding)
            for name in ran:  # the replay can only probe where the truth was measured: the next dense step
                cadence.next_due[name] = math.ceil(cadence.next_due[name] / DENSE) * DENSE
    return {"first": first, "probed": probed, "work_share": cadence.work_share()}


def evaluate(runs: list[dict[str, Any]], s: Setting, horizons: tuple[float, ...] = (0.5,)) -> list[dict[str, Any]]:
    """Leads, misses and false alarms of one setting over the runs, one row per horizon."""
    replays = [(run, replay(run, s, horizons)) for run in runs]
    rows = []
    for h in horizons:
        leads, misses, false_alarms, shares, probes_before = [], [], [], [], []
        for run, r in replays:
            warning = min(r["first"][h].values()) if r["first"][h] else None
            onset = run["onset_step"]
            shares.append(r["work_share"])
            if onset is None:
                if warning is not None:
                    false_alarms.append(f"n{run['n']}-s{run['seed']}@{warning}")
            else:
                probes_before.append(sum(p < onset for p in r["probed"]))
                if warning is None or warning >= onset:
                    misses.append(f"n{run['n']}-s{run['seed']}")
                else:
                    leads.append((onset - warning) / onset)
        rows.append({
            **asdict(s),
            "horizon_share": h,
            "median_lead_fraction": round(statistics.median(leads), 4) if leads else None,
            "min_lead_fraction": round(min(leads), 4) if leads else None,
            "misses": misses,
            "false_alarms": false_alarms,
            "max_work_share": round(max(shares), 4),
            "min_probes_before_onset": min(probes_before, default=None),
        })  # fmt: skip
    return rows


def _evaluate(args: tuple[list[dict[str, Any]], Setting]) -> list[dict[str, Any]]:
    return evaluate(*args, horizons=HORIZONS)


#: the settings replayed (each with every horizon_share of HORIZONS)
GRID = {
    "method": ["ols", "theil_sen"],
    "quantile": [0.0, 1 / 31, 0.05, 0.1],
    "window": [4, 5, 6, 8],
    "max_extrapolation": [1.0, 1.5, 2.0, 3.0],
    "every": [100, 200],
    "fast": [False, True],
}
HORIZONS = (0.25, 0.5, 1.0)


#: The forecast settings compared for robustness, and the cadence perturbations each is replayed under: a
#: setting whose warnings depend on exactly which steps the cadence probes is luck, not a default.
ROBUST_GRID = {"closest": [1, 2, 3], "consecutive": [1, 2], "window": [6, 8], "max_extrapolation": [1.5, 2.0]}
ROBUST_HORIZONS = (0.5, 0.75, 1.0)
#: ``--gap``: the membership-gap warning beside the default forecast (closest 2, window 8, <= 1.5x span)
GAP_GRID = {
    "closest": [2],
    "window": [8],
    "max_extrapolation": [1.5],
    "gap_share": [None, 0.25, 0.3, 0.35, 0.4],
    "gap_for": [1, 2, 3],
}
PERTURBATIONS = {"budget": [0.015, 0.02, 0.025, 0.03], "free_share": [0.25, 0.5]}


def robust(runs: list[dict[str, Any]], jobs: int, grid: dict[str, list[Any]] = ROBUST_GRID) -> list[dict[str, Any]]:
    """Each forecast setting of ``grid`` x :data:`ROBUST_HORIZONS` (fast samples, every 100) replayed under
    every cadence of :data:`PERTURBATIONS`: its false alarms and misses summed over them (and which runs
    they were), and its leads."""
    forecasts = [dict(zip(grid, v, strict=True)) for v in itertools.product(*grid.values())]
    cadences = [dict(zip(PERTURBATIONS, v, strict=True)) for v in itertools.product(*PERTURBATIONS.values())]
    settings = [Setting(fast=True, **f, **c) for f in forecasts for c in cadences]
    with ProcessPoolExecutor(jobs) as pool:
        rows = [r for rs in pool.map(_evaluate_one, [(runs, x) for x in settings], chunksize=2) for r in rs]
    out = []
    for f in (dict(f, horizon_share=h) for f in forecasts for h in ROBUST_HORIZONS):
        mine = [r for r in rows if all(r[k] == v for k, v in f.items())]
        leads = [r["median_lead_fraction"] for r in mine if r["median_lead_fraction"] is not None]
        lows = [r["min_lead_fraction"] for r in mine if r["min_lead_fraction"] is not None]
        out.append({**f, "false_alarms": sum(len(r["false_alarms"]) for r in mine),
                    "misses": sum(len(r["misses"]) for r in mine), "cadences": len(mine),
                    "alarmed": sorted({a.split("@")[0] for r in mine for a in r["false_alarms"]}),
                    "missed": sorted({m for r in mine for m in r["misses"]}),
                    "median_lead_fraction": round(statistics.median(leads), 4) if leads else None,
                    "min_lead_fraction": min(lows, default=None)})  # fmt: skip
    return sorted(out, key=lambda r: (r["false_alarms"] + r["misses"], -(r["median_lead_fraction"] or 0)))


def _evaluate_one(args: tuple[list[dict[str, Any]], Setting]) -> list[dict[str, Any]]:
    return evaluate(*args, horizons=ROBUST_HORIZONS)


def diagnose(runs: list[dict[str, Any]]) -> None:
    """Does the fast precursor track the full one, and does membership lead the onset?"""
    from scipy.stats import spearmanr

    print("run        onset  1st-copy(full/fast)  rho(full,fast) of q0.05       mia>=0.6  gap>=25%")
    for run in runs:
        t = run["truth"]
        full, cf = precursor_series(t, False, 0.05)
        fast, cq = precursor_series(t, True, 0.05)
        ok = [(a, b) for a, b in zip(full, fast, strict=True) if math.isfinite(a) and math.isfinite(b)]
        rho = spearmanr([a for a, _ in ok], [b for _, b in ok]).statistic if len(ok) > 2 else math.nan
        first_full = next((st for st, c in zip(t["steps"], cf, strict=True) if c), None)
        first_fast = next((st for st, c in zip(t["steps"], cq, strict=True) if c), None)
        mia = next((st for st, m in zip(t["steps"], t["membership"], strict=True) if m["mia_auc"] >= 0.6), None)
        gap = next((st for st, m in zip(t["steps"], t["membership"], strict=True)
                    if m["loss_holdout"] > 1.25 * m["loss_member"]), None)  # fmt: skip
        print(f"n{run['n']:<4} s{run['seed']:<4} {run['onset_step']!s:>6}  {first_full!s:>6}/{first_fast!s:<6}"
              f"       {rho:5.2f}                           {mia!s:>6}  {gap!s:>6}")  # fmt: skip


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """The runs of a ``bench_warnings.py --out`` folder (``*/truth.json``) or of an ``--export`` folder
    (``*.json.gz``), in name order."""
    files = sorted(folder.glob("*/truth.json"))
    if files:
        return [json.loads(f.read_text()) for f in files]
    return [json.loads(gzip.decompress(f.read_bytes())) for f in sorted(folder.glob("*.json.gz"))]


def export_runs(runs: list[dict[str, Any]], folder: Path) -> None:
    """Write each run's record and truth, less what the replay does not read, as ``<name>.json.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    for run in runs:
        truth = {k: v for k, v in run["truth"].items() if k != "nn1"}
        for key in ("ratios", "ratios_fast"):
            truth[key] = [[None if r is None else round(r, 4) for r in row] for row in truth[key]]
        data = json.dumps({**run, "truth": truth}, separators=(",", ":"), sort_keys=True).encode()
        # mtime=0: the same runs give the same bytes
        (folder / f"n{run['n']:04d}-s{run['seed']}.json.gz").write_bytes(gzip.compress(data, 9, mtime=0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="a bench_warnings.py --out folder")
    p.add_argument("--json", default=None, help="write every grid point's result here")
    p.add_argument("--diagnose", action="store_true", help="fast vs full samples and membership, no grid")
    p.add_argument("--budget", type=float, default=0.03, help="the cadence budget replayed (work share)")
    p.add_argument("--robust", action="store_true", help="forecast settings under perturbed cadences (ROBUST_GRID)")
    p.add_argument("--gap", action="store_true", help="--robust for the membership-gap warning (GAP_GRID)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--export", default=None, help="write the runs' truth here, compact (e.g. docs/data/tune)")
    args = p.parse_args(argv)
    runs = load_runs(Path(args.runs))
    print(f"{len(runs)} runs: {sum(r['onset_step'] is not None for r in runs)} with onset")
    if args.export:
        export_runs(runs, Path(args.export))
        return 0
    if args.diagnose:
        diagnose(runs)
        return 0
    if args.robust or args.gap:
        table = robust(runs, args.jobs, GAP_GRID if args.gap else ROBUST_GRID)
        for r in table:
            print(json.dumps(r))
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=1) + "\n")
        return 0
    settings = [Setting(**dict(zip(GRID, values, strict=True)), budget=args.budget)
                for values in itertools.product(*GRID.values())]  # fmt: skip
    with ProcessPoolExecutor(args.jobs) as pool:
        grid = [row for rows in pool.map(_evaluate, [(runs, s) for s in settings], chunksize=4) for row in rows]
    ok = [g for g in grid if not g["false_alarms"] and not g["misses"]]
    ok.sort(key=lambda g: -(g["median_lead_fraction"] or 0))
    print(f"{len(ok)} of {len(grid)} settings without a miss or a false alarm")
    for g in (ok or sorted(grid, key=lambda g: len(g["false_alarms"]) + len(g["misses"])))[:20]:
        print(json.dumps(g))
    if args.json:
        Path(args.json).write_text(json.dumps(grid, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
