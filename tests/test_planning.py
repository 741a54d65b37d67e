"""`memwatch forecast`: the onset of a full run predicted from pilot runs' stores (real SQLite stores)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from memwatch.cli import main
from memwatch.core.probe import ProbeResult
from memwatch.errors import MemwatchError
from memwatch.store import STORE_NAME, Store
from memwatch.views.planning import fit_onset_law, pilot_from_store


def pilot(
    root: Path, name: str, n: int, fractions: dict[int, float], forecasts: dict[int, float] | None = None
) -> Path:
    """A pilot run's store: regurgitation mem_fraction (and forecast/onset) at each probed step."""
    folder = root / name / "memwatch"
    folder.mkdir(parents=True)
    with Store(folder / STORE_NAME) as store:
        run = store.ensure_run(name, config={}, reference={"n": n})
        for step, fraction in fractions.items():
            snap = store.add_snapshot(run, step, weights_sha256=f"{name}-{step}")
            store.write_result(snap, ProbeResult("regurgitation", {"mem_fraction": fraction}), config_hash="c")
            if forecasts and step in forecasts:
                store.write_result(snap, ProbeResult("forecast", {"onset": forecasts[step]}), config_hash="f")
    return root / name


def test_onset_law_recovered_from_pilots_and_the_cli_prints_and_writes_it(tmp_path: Path, capsys) -> None:
    # onset = 100 + 90 n, measured at a 50-step cadence
    pilots = []
    for n in (8, 16, 32):
        for k, jitter in enumerate((-50, 50)):
            onset = 100 + 90 * n + jitter
            steps = range(50, onset + 200, 50)
            pilots.append(pilot(tmp_path, f"n{n}-{k}", n, {s: (0.1 if s >= onset else 0.0) for s in steps}))
    measured = pilot_from_store(pilots[0])
    assert (measured.n, measured.onset_step, measured.source) == (8, 800.0, "measured")
    out = tmp_path / "plan.json"
    assert main(["forecast", *map(str, pilots), "--n", "64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "for n=64, onset at step" in printed and printed.count("pilot ") == 6
    plan = json.loads(out.read_text())
    assert plan["slope"] == pytest.approx(90, rel=0.05) and plan["low"] < 100 + 90 * 64 < plan["high"]
    assert plan["r2"] > 0.99


def test_a_pilot_stopped_before_onset_contributes_its_forecast_and_one_without_either_is_named(tmp_path: Path) -> None:
    short = pilot(tmp_path, "short", 32, {500: 0.0, 1000: 0.0}, forecasts={500: math.nan, 1000: 3000.0})
    p = pilot_from_store(short)
    assert (p.onset_step, p.source) == (3000.0, "forecast")
    none = pilot_from_store(pilot(tmp_path, "none", 64, {500: 0.0}))
    assert (none.onset_step, none.source) == (None, "none")
    with pytest.raises(MemwatchError, match="at least 3 pilot runs with an onset"):
        fit_onset_law([p, none], target_n=128)


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["forecast", str(tmp_path / "missing"), "--n", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    assert main(["forecast", str(tmp_path), "--n", "64", "--onset-fraction", "2"]) == 2
    assert "--onset-fraction" in capsys.readouterr().err
