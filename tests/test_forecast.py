"""The onset forecast, its rule type, the holdout-loss turning point and the adaptive cadence, on constructed series."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from memwatch.core.cadence import SAMPLING_FREE_SHARE, Cadence, CadenceSettings
from memwatch.errors import MemwatchError
from memwatch.probes.membership import loss_turn
from memwatch.signals.forecast import fit_line, forecast_onset, precursor
from memwatch.signals.rules import RuleEngine, parse_rules

FORECAST_RULE = {
    "name": "onset-forecast",
    "type": "forecast",
    "metric": "forecast/onset",
    "horizon_share": 0.5,
    "severity": "warning",
    "message": "step {step}: onset at {forecast_step} ({forecast_low}-{forecast_high}); keep {keep}",
}


def approaching(steps: list[int], crossing: float, seeds: int = 32, noise: float = 0.0, seed: int = 0) -> list:
    """Per-seed ratios whose 10th percentile falls log-linearly from 0.9 at step 0 to 1/3 at ``crossing``."""
    rng = np.random.default_rng(seed)
    offsets = np.linspace(0.0, 0.6, seeds)  # seed i sits offsets[i] above the lowest, in log space
    out = []
    for step in steps:
        base = math.log(0.9) + (math.log(1 / 3) - math.log(0.9)) * step / crossing
        logs = base + offsets - np.quantile(offsets, 0.1) + rng.normal(0, noise, seeds)
        out.append((step, {i: float(math.exp(v)) for i, v in enumerate(logs)}))
    return out


def test_a_known_crossing_is_recovered_exactly_and_within_the_band_under_noise() -> None:
    exact = forecast_onset(approaching([200, 400, 600, 800], crossing=1500), quantile=0.1)
    assert [exact.onset, exact.low, exact.high] == pytest.approx([1500] * 3, rel=1e-4)
    assert exact.slope_t < -1e6  # an exact fit, up to rounding
    hits = 0
    for seed in range(20):
        f = forecast_onset(approaching([200, 400, 600, 800, 1000], crossing=1500, noise=0.03, seed=seed), quantile=0.1)
        assert math.isfinite(f.onset) and f.low <= f.onset <= f.high
        hits += f.low <= 1500 <= f.high
    assert hits >= 17  # a 90% band, roughly


def test_flat_or_receding_series_never_forecast() -> None:
    rng = np.random.default_rng(1)
    for trial in range(200):
        steps = [200 * (i + 1) for i in range(6)]
        flat = [(s, {k: float(v) for k, v in enumerate(rng.uniform(0.5, 0.95, 32))}) for s in steps]
        f = forecast_onset(flat)
        # noise alone is never a significant fall of the 10th percentile over 5 probes... or if it is, far off
        assert math.isnan(f.onset) or f.low - steps[-1] > 0.5 * steps[-1], trial
    receding = [(s, {0: 0.4 + s / 10000}) for s in (200, 400, 600)]
    assert math.isnan(forecast_onset(receding, quantile=0.0).onset)


def test_too_few_probes_no_forecast_and_a_copy_is_onset_now() -> None:
    two = approaching([200, 400], crossing=800)
    assert math.isnan(forecast_onset(two).onset)
    copied = [(200, {0: 0.8}), (400, {0: 0.2})]
    f = forecast_onset(copied, quantile=0.0)
    assert (f.onset, f.low, f.high) == (400.0, 400.0, 400.0)


def test_per_seed_forecasts_follow_each_seed() -> None:
    steps = [100, 200, 300]
    trajectory = [(s, {"a": 0.9 - s / 1000, "b": 0.9}) for s in steps]
    f = forecast_onset(trajectory, quantile=0.0)
    assert math.isfinite(f.per_seed["a"]) and math.isnan(f.per_seed["b"])
    assert f.metrics()["seeds_approaching"] == 1


def test_the_closest_seeds_together_move_less_for_one_noisy_seed_and_still_follow_an_approach() -> None:
    ratios = [0.80 + 0.004 * i for i in range(32)]
    dipped = [0.40, *ratios[1:]]  # one seed's sample comes close once
    assert precursor(ratios) == 0.80 and precursor(dipped) == 0.40
    assert precursor(dipped, closest=3) == pytest.approx((0.40 * 0.804 * 0.808) ** (1 / 3))
    assert precursor(dipped, quantile=1 / 31) == pytest.approx(0.804)  # the quantile, as before
    steps = [200, 400, 600, 800, 1000]
    one, three = (forecast_onset(approaching(steps, crossing=1500, noise=0.0), quantile=0.0, closest=k) for k in (1, 3))
    assert math.isfinite(one.onset) and math.isfinite(three.onset) and three.onset > one.onset  # later, not lost


def test_fit_line_needs_three_points() -> None:
    assert fit_line([1, 2], [1, 2]) is None and fit_line([1, 1, 1], [1, 2, 3]) is None


def test_forecast_rule_fires_within_its_horizon_once_and_rearms() -> None:
    engine = RuleEngine(parse_rules([FORECAST_RULE]))

    def observe(step: int, onset: float, low: float, high: float) -> list:
        m = {"forecast/onset": onset, "forecast/onset_low": low, "forecast/onset_high": high}
        return engine.observe(step, m, context={"keep": "checkpoint-500"})

    assert observe(400, 1000, 700, 1300) == []  # edge 300 steps ahead > 0.5 x 400
    (event,) = observe(600, 900, 850, 950)  # 250 <= 300
    assert event.forecast_step == 900 and event.threshold == 300
    assert event.message == "step 600: onset at 900 (850-950); keep checkpoint-500"
    assert observe(800, 900, 850, 950) == []  # still within: one event per approach
    assert observe(1000, math.nan, math.nan, math.nan) == []  # no forecast: nothing changes
    assert observe(1200, 3000, 2900, 3100) == []  # receded beyond the horizon: re-armed
    assert len(observe(1400, 1600, 1500, 1700)) == 1


def test_a_forecast_rule_with_for_needs_consecutive_forecasts_within_the_horizon() -> None:
    engine = RuleEngine(parse_rules([{**FORECAST_RULE, "for": 2}]))

    def fired(step: int, low: float) -> bool:
        m = {"forecast/onset": low + 50, "forecast/onset_low": low, "forecast/onset_high": low + 100}
        return bool(engine.observe(step, m))

    assert not fired(600, 800)  # within, once: one noisy probe does not warn
    assert not fired(700, 2000)  # beyond: the streak starts again
    assert not fired(800, 1000)
    assert not engine.observe(900, {"forecast/onset": math.nan})  # no forecast: neither counts nor resets
    assert fired(1000, 1200)  # the second consecutive forecast within the horizon
    assert not fired(1100, 1300)  # one event per approach
    (rule,) = parse_rules([{**FORECAST_RULE, "for": 2}])
    assert rule.to_dict()["for"] == 2 and parse_rules([rule.to_dict()]) == [rule]
    assert "for" not in parse_rules([FORECAST_RULE])[0].to_dict()  # the default keeps stored configs as they were


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"horizon_share": None}, "horizon_share' is missing"),
        ({"horizon_share": 0}, "must be positive"),
        ({"for": 0}, "'for' is 0: it must be a whole number >= 1"),
        ({"op": "<="}, "'op' is not known for a forecast rule"),
        ({"message": "{forecast_low}", "type": "threshold", "op": ">", "value": 1, "horizon_share": None},
         "only forecast rules have"),
    ],
)  # fmt: skip
def test_forecast_rules_are_validated(change: dict, error: str) -> None:
    rule = {k: v for k, v in {**FORECAST_RULE, **change}.items() if v is not None}
    with pytest.raises(MemwatchError, match=error):
        parse_rules([rule], "cfg.yaml")


def test_forecast_rule_round_trips_through_to_dict() -> None:
    (rule,) = parse_rules([FORECAST_RULE])
    assert parse_rules([rule.to_dict()]) == [rule]


def test_holdout_turning_point() -> None:
    def series(holdout: list[float], member: list[float]) -> dict:
        past = [{"step": 100 * (i + 1), "metrics": {"loss_holdout": h, "loss_member": m}}
                for i, (h, m) in enumerate(zip(holdout[:-1], member[:-1], strict=True))]  # fmt: skip
        return loss_turn(past, 100 * len(holdout), {"loss_holdout": holdout[-1], "loss_member": member[-1]})

    turning = series([0.30, 0.31, 0.32, 0.33], [0.30, 0.28, 0.26, 0.24])
    assert turning["holdout_turn"] == 1.0 and turning["holdout_slope"] > 0 > turning["member_slope"]
    both_fall = series([0.30, 0.29, 0.28, 0.27], [0.30, 0.28, 0.26, 0.24])
    assert both_fall["holdout_turn"] == 0.0
    assert math.isnan(series([0.3, 0.31], [0.3, 0.29])["holdout_turn"])  # two probes: no fit yet


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cadence_speeds_up_towards_the_forecast_and_slows_when_flat() -> None:
    c = Cadence(CadenceSettings(budget=None))
    reg = {"regurgitation": (200, True)}
    assert c.schedule(1000, reg, low=math.nan, receding=False) == {"regurgitation": 1200}
    assert c.schedule(1200, reg, low=math.nan, receding=True) == {"regurgitation": 1600}
    assert c.schedule(1600, reg, low=2000.0, receding=False) == {"regurgitation": 1700}
    assert c.schedule(1700, reg, low=1750.0, receding=False) == {"regurgitation": 1750}
    assert c.due("regurgitation", 1749, every=200, sample_probe=True) is False
    assert c.due("regurgitation", 1750, every=200, sample_probe=True) is True
    assert c.schedule(1750, reg, low=1750.0) == {"regurgitation": 1950}  # onset reached: the usual cadence
    assert c.schedule(1750, {"membership": (50, False)}) == {"membership": 1800}  # sampling-free: its every
    fixed = Cadence(CadenceSettings(adaptive=False))
    assert [s for s in range(1, 801) if fixed.due("regurgitation", s, every=200, sample_probe=True)] == [
        200, 400, 600, 800
    ]  # fmt: skip


@pytest.mark.parametrize("budget", [0.02, 0.05, 0.4])
def test_cadence_keeps_probing_within_its_budget(budget: float) -> None:
    """Training steps of 100 denoiser evaluations; sample probes of 3,000 (a forecast that keeps asking for the
    fastest cadence) and a sampling-free probe of 500 every 50 steps, which alone would be 10% of training."""
    clock = FakeClock()
    c = Cadence(CadenceSettings(budget=budget), clock)
    counts = {"regurgitation": 0, "membership": 0}
    for step in range(1, 40001):
        c.tick(100 * step)
        probes = (("regurgitation", 200, True), ("membership", 50, False))
        due = {name: (every, sample) for name, every, sample in probes if c.due(name, step, every=every,
                                                                                sample_probe=sample)}  # fmt: skip
        if due:
            work = 3000 * ("regurgitation" in due) + 500 * ("membership" in due)
            c.probed(0.0, sampled="regurgitation" in due, work=work)
            c.schedule(step, due, low=float(step), receding=False)
            for name in due:
                counts[name] += 1
    assert c.work_share() <= budget * 1.1
    assert c.work_share() >= budget * 0.6  # and it uses what it may
    training = 40000 * 100
    share = SAMPLING_FREE_SHARE
    most = 3000 / (200 * 100)  # the sample probe every 200 steps, its every: 15% of training
    assert counts["regurgitation"] * 3000 / training >= 0.8 * min((1 - share) * budget, most)  # sampling: the rest
    # the sampling-free probe (10% of training alone) is stretched only when that is over its share of the budget
    assert (counts["membership"] < 40000 / 50) == (budget * share < 0.1)


def test_the_cadence_follows_work_not_the_clock() -> None:
    """The same work at every step, on a fast machine and on a loaded one: the same probed steps."""

    def probed_steps(seconds_per_step: float) -> list[int]:
        clock = FakeClock()
        c = Cadence(CadenceSettings(budget=0.03), clock)
        steps = []
        for step in range(1, 5001):
            clock.now += seconds_per_step
            c.tick(96 * step)
            if c.due("regurgitation", step, every=100, sample_probe=True):
                clock.now += 50 * seconds_per_step  # the probe is slow too
                c.probed(50 * seconds_per_step, sampled=True, work=800)
                c.schedule(step, {"regurgitation": (100, True)}, low=float(step + 600), receding=False)
                steps.append(step)
        return steps

    assert probed_steps(0.01) == probed_steps(1.7) and len(probed_steps(0.01)) > 10


def test_without_counted_training_work_the_budget_falls_back_to_the_clock() -> None:
    """A model handed to step() that does no forward pass (an EMA copy) gives no training work: the budget is
    then kept on the wall clock, and the cadence says so (the summary's ``budget_unit``)."""
    clock = FakeClock()
    c = Cadence(CadenceSettings(budget=0.1), clock)
    steps = []
    for step in range(1, 2001):
        clock.now += 1.0  # a second of training per step
        c.tick(0)
        if c.due("regurgitation", step, every=100, sample_probe=True):
            clock.now += 50.0  # a probe takes 50 training steps' time: at 10%, one every 500 steps
            c.probed(50.0, sampled=True, work=800)
            c.schedule(step, {"regurgitation": (100, True)})
            steps.append(step)
    assert c.unit == "seconds" and math.isnan(c.work_share())
    assert 3 <= len(steps) <= 5 and c.overhead() <= 0.1 + 50 / 1500


def test_a_snapshot_with_only_a_forecast_warning_is_at_risk_not_clean(tmp_path: Path) -> None:
    from memwatch.core.config import load_config
    from memwatch.core.probe import ProbeResult
    from memwatch.signals.rules import Event
    from memwatch.store import STORE_NAME, Store
    from memwatch.views.report.build import build_report

    config = load_config(None).raw  # the default rules, onset-forecast among them
    forecast_rule = next(r for r in config["rules"] if r["type"] == "forecast")
    out = tmp_path / "memwatch"
    out.mkdir()
    with Store(out / STORE_NAME) as store:
        run = store.ensure_run("r", config=config, reference={"n": 4})
        for step, onset in ((200, math.nan), (400, 550.0), (600, 600.0)):
            snap = store.add_snapshot(run, step, kind="checkpoint", path=f"checkpoint-{step}", weights_sha256=f"{step}")
            store.write_result(snap, ProbeResult("forecast", {"onset": onset, "onset_low": onset}), config_hash="f")
            copies = 1.0 if step == 600 else 0.0
            store.write_result(snap, ProbeResult("regurgitation", {"distinct_memorized": copies}), config_hash="r")
            events = {
                400: (forecast_rule["name"], "forecast/onset"),
                600: ("first-regurgitation", "regurgitation/distinct_memorized"),
            }
            if step in events:
                rule, metric = events[step]
                e = Event(step, rule, "warning", metric, 1.0, 0.0, None, "m")
                store.add_event(run, {**e.to_dict(), "snapshot_id": snap})
    report = build_report(tmp_path)
    verdicts = {s["step"]: s["verdict"] for s in report["verdict"]["snapshots"]}
    assert verdicts == {200: "clean", 400: "at-risk", 600: "warning"}
    assert report["verdict"]["overall"]["last_clean_step"] == 200


def test_the_default_warning_names_the_training_images_the_samples_come_closest_to() -> None:
    from memwatch.core.probe import ProbeResult
    from memwatch.probes.forecast import ForecastProbe

    probe = ForecastProbe()
    items = [
        {"item": f"seed-{i}", "seed": i, "ratio": r, "nn1": nn1, "crossing": math.nan}
        for i, (r, nn1) in enumerate([(0.9, "far.png"), (0.41, "horse.png"), (0.45, "camera.png"), (0.42, "horse.png"),
                                      (None, None), (0.6, "rocket.png"), (0.7, "coffee.png")])
    ]  # fmt: skip
    metrics = {"onset": 900.0, "onset_low": 850.0, "onset_high": 950.0}
    evidence = probe.evidence(ProbeResult("forecast", metrics, items=items))
    assert evidence["closest_images"] == "horse.png (d1/d2 0.41), camera.png (d1/d2 0.45), rocket.png (d1/d2 0.60)"
    engine = RuleEngine(parse_rules(list(probe.default_rules)))
    m = {f"forecast/{k}": v for k, v in metrics.items()}
    (event,) = engine.observe(600, m, {"forecast": evidence}, context={"keep": "checkpoint-500"})
    assert "closest: horse.png (d1/d2 0.41), camera.png" in event.message and event.message.endswith("checkpoint-500")


def test_text_to_image_forecast_evidence_names_the_prompts_and_ranks_them_by_their_seeds_crossing() -> None:
    from memwatch.core.probe import ProbeResult
    from memwatch.probes.forecast import ForecastProbe

    rows = [  # prompt, ratio, nearest training image, the seed's forecast crossing
        ("a wide photo of a horse", 0.50, "horse.png", 1200.0),
        ("a wide photo of a horse", 0.38, "horse.png", math.nan),
        ("a close photo of coffee", 0.45, "coffee.png", 900.0),
        ("a photo of a cat", 0.30, "horse.png", math.nan),  # closest, but not approaching
        ("a photo of a cat", None, None, math.nan),
    ]
    items = [
        {"item": f"seed-{i}", "seed": i, "ratio": r, "nn1": nn1, "crossing": c, "prompt": p}
        for i, (p, r, nn1, c) in enumerate(rows)
    ]
    evidence = ForecastProbe().evidence(ProbeResult("forecast", {"onset": 900.0, "onset_low": 850.0,
                                                                 "onset_high": 950.0}, items=items))  # fmt: skip
    ranked = [(r["prompt"], r["ratio"], r["training_id"], r["crossing"]) for r in evidence["prompts_at_risk"]]
    assert ranked[:2] == [("a close photo of coffee", 0.45, "coffee.png", 900.0),
                          ("a wide photo of a horse", 0.38, "horse.png", 1200.0)]  # fmt: skip
    assert ranked[2][:3] == ("a photo of a cat", 0.30, "horse.png") and math.isnan(ranked[2][3])
    # the message's closest images say which prompt came closest to each
    assert evidence["closest_images"].startswith('horse.png (d1/d2 0.30, prompt "a photo of a cat"), coffee.png')
    assert evidence["closest"][0]["prompt"] == "a photo of a cat"


def test_theil_sen_without_scipy_says_what_to_install(monkeypatch):
    """scipy is not a dependency of memwatch: the robust fit alone needs it, and says so in one line."""
    import sys

    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import scipy.stats now raises ImportError
    with pytest.raises(MemwatchError, match="theil_sen' needs scipy"):
        forecast_onset([(s, {0: 1.0 - s / 1000}) for s in (100, 200, 300, 400)], threshold=0.5, method="theil_sen")
