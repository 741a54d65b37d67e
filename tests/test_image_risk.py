"""Per-image trajectories and risk ranking on constructed series: a known crossing is recovered,
a flat or receding image is never at risk, copied images come first."""

from __future__ import annotations

import math

from memwatch.signals.image_risk import image_trajectories, rank_images

STEPS = list(range(100, 700, 100))


def rows(image: str, seed: int, ratios: list[float], steps: list[int] = STEPS) -> list[dict]:
    return [
        {"seed": seed, "step": s, "nn1": image, "ratio": r, "d1": r / 10, "sample": f"seed-{seed}"}
        for s, r in zip(steps, ratios, strict=True)
    ]


def test_a_geometric_approach_is_forecast_at_its_crossing() -> None:
    # log-linear fall: ratio = 0.9 * q**k per probe reaches 1/3 at a known step
    q = 0.9
    ratios = [0.9 * q**k for k in range(len(STEPS))]
    k_cross = math.log((1 / 3) / 0.9) / math.log(q)
    expected = STEPS[0] + 100 * k_cross
    (risk,) = rank_images(image_trajectories(rows("a.png", 0, ratios)))
    assert risk.at_risk and risk.first_copy_step is None
    assert abs(risk.forecast_step - expected) < 1.0
    assert risk.ratio_now == ratios[-1] and risk.ratio_min == ratios[-1] and risk.min_step == STEPS[-1]


def test_flat_noisy_or_receding_images_are_never_at_risk() -> None:
    flat = [0.8, 0.82, 0.79, 0.81, 0.8, 0.82]
    receding = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75]
    risks = rank_images(image_trajectories(rows("flat.png", 0, flat) + rows("away.png", 1, receding)))
    assert not any(r.at_risk for r in risks)
    assert [r.training_id for r in risks] == ["away.png", "flat.png"]  # by the closest recent approach


def test_the_closest_sample_counts_and_gaps_are_not_values() -> None:
    # two seeds near the same image: the smaller ratio is its approach; an image skipped at a probe has a gap
    data = rows("a.png", 0, [0.9, 0.8, 0.7, 0.6, 0.5, 0.45]) + rows("a.png", 1, [0.95] * 6)
    data += rows("b.png", 2, [0.7, 0.6], steps=[100, 300])
    traj = image_trajectories(data)
    assert [a.ratio for a in traj["a.png"].values()] == [0.9, 0.8, 0.7, 0.6, 0.5, 0.45]
    assert list(traj["b.png"]) == [100, 300]
    risks = {r.training_id: r for r in rank_images(traj)}
    assert math.isnan(risks["b.png"].ratio_now)  # no sample was nearest to it at the latest probe
    assert not risks["b.png"].at_risk  # two points are no trend


def test_copied_first_then_forecast_then_the_rest() -> None:
    data = rows("late.png", 0, [0.9, 0.85, 0.8, 0.5, 0.3, 0.2])  # copied at 500
    data += rows("early.png", 1, [0.9, 0.3, 0.2, 0.2, 0.2, 0.2])  # copied at 200
    data += rows("coming.png", 2, [0.9 * 0.9**k for k in range(6)])  # forecast only
    data += rows("far.png", 3, [0.9] * 6)
    risks = rank_images(image_trajectories(data))
    assert [r.training_id for r in risks] == ["early.png", "late.png", "coming.png", "far.png"]
    assert [r.rank for r in risks] == [1, 2, 3, 4]
    assert [r.first_copy_step for r in risks[:2]] == [200, 500]
    assert risks[0].row()["at_risk"] == 1 and risks[3].row()["forecast_step"] is None


def test_duplicated_images_come_first_among_those_without_evidence() -> None:
    rows = [{"seed": 0, "step": s, "nn1": "a.png", "ratio": r, "d1": r / 10} for s, r in
            [(100, 0.9), (200, 0.7), (300, 0.55), (400, 0.45)]]  # fmt: skip
    rows += [{"seed": k, "step": s, "nn1": i, "ratio": r, "d1": 0.1} for k, (i, r) in enumerate(
        [("b.png", 0.9), ("c.png", 0.8), ("e.png", 0.85)], 1) for s in (100, 200, 300, 400)]  # fmt: skip
    traj = image_trajectories(rows)
    plain = [r.training_id for r in rank_images(traj)]
    assert plain == ["a.png", "c.png", "e.png", "b.png"]
    # The analysis found e.png twice and d.png (which no sample came nearest to) three times.
    risks = rank_images(traj, training_copies={"d.png": 3, "d_copy.png": 3, "d_copy2.png": 3, "e.png": 2})
    ranked = [(r.training_id, r.training_copies) for r in risks]
    assert ranked[:3] == [("a.png", 1), ("d.png", 3), ("d_copy.png", 3)]  # evidence first, then the prior
    assert ranked[4:] == [("e.png", 2), ("c.png", 1), ("b.png", 1)]
    assert risks[1].row()["ratio_min"] != risks[1].row()["ratio_min"] and not risks[1].at_risk  # NaN: never approached
