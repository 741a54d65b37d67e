"""Which training images are closest to being copied: per-image trajectories and a risk ranking.

Every regurgitation probe records, for each fixed-seed sample, its nearest training image ``nn1`` and
its ratio ``d1/d2``. Turned around, that gives each training image's *closest approach* at each probe:
the smallest d1/d2 (and d1) among the samples whose nearest neighbour it is. An image no sample is
nearest to has no value at that probe. A training image is copied when its closest approach falls
below the memorization threshold (1/3, Gu et al. 2023), so the same forecast as the run's onset
forecast (:func:`memwatch.signals.forecast.forecast_onset`), fitted to one image's trajectory, says when that
image is expected to be copied.

The ranking puts first the images already copied (earliest first; at the same step, the one copied by
more samples first), then those with a forecast (earliest forecast first), then the rest: the more
copies of an image the training set holds, the earlier (duplicated images are memorized first:
Carlini et al. 2023, Somepalli et al. 2023; the training-set analysis counts them), then by their
closest recent approach. Evidence from the run comes before the prior from the data set.

Example:
    >>> seeds = [
    ...     {"seed": 0, "step": s, "nn1": "a.png", "ratio": r, "d1": r / 10} for s, r in
    ...     [(100, 0.9), (200, 0.7), (300, 0.55), (400, 0.45)]
    ... ] + [{"seed": 1, "step": s, "nn1": "b.png", "ratio": 0.9, "d1": 0.1} for s in (100, 200, 300, 400)]
    >>> risks = rank_images(image_trajectories(seeds))
    >>> [(r.training_id, r.at_risk) for r in risks]
    [('a.png', True), ('b.png', False)]
    >>> 400 < risks[0].forecast_step < 800
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memwatch.signals.forecast import forecast_onset

#: Probes of one image's trajectory in its forecast (as the run's onset forecast).
WINDOW = 6
#: d1/d2 below which a sample copies a training image: Gu et al. 2023 (mem_ratio.py), Bonnaire et al. 2025
DEFAULT_RATIO = 1 / 3


@dataclass
class Approach:
    """A training image's closest approach by a generated sample at one probe.

    Attributes:
        ratio, d1, seed, sample, nn1, own_image: of the closest sample (``nn1``: its nearest training image;
            ``own_image``: whether that image's caption is the sample's prompt, text-to-image).
        ratios: d1/d2 of every sample whose nearest training image it is (ascending).
    """

    ratio: float
    d1: float
    seed: int | None
    sample: str | None
    ratios: list[float] = field(default_factory=list)
    nn1: str | None = None
    own_image: bool | None = None


@dataclass
class ImageRisk:
    """One training image's standing.

    Attributes:
        training_id: the image's id in the reference set.
        rank: 1 for the image most at risk.
        ratio_now: its closest approach at the latest probe (NaN: no sample was nearest to it then).
        ratio_min: its closest approach ever, with the step, seed and sample of it.
        first_copy_step: the first probe at which it was copied (closest approach below the threshold).
        copies: samples that copied it, over all probes (a duplicated image is copied by many).
        forecast_step: the step at which it is expected to be copied (NaN: no significant approach).
        training_copies: copies of it in the training set, itself included (None: not analysed).
        trajectory: step -> closest approach.
    """

    training_id: str
    rank: int = 0
    ratio_now: float = math.nan
    ratio_min: float = math.nan
    min_step: int | None = None
    min_seed: int | None = None
    min_sample: str | None = None
    first_copy_step: int | None = None
    copies: int = 0
    forecast_step: float = math.nan
    training_copies: int | None = None
    trajectory: dict[int, Approach] = field(default_factory=dict)

    @property
    def at_risk(self) -> bool:
        """Copied already, or forecast to be."""
        return self.first_copy_step is not None or math.isfinite(self.forecast_step)

    def row(self) -> dict[str, Any]:
        """The CSV / JSON row (no trajectory)."""
        return {
            "rank": self.rank,
            "training_id": self.training_id,
            "at_risk": int(self.at_risk),
            "first_copy_step": self.first_copy_step,
            "copies": self.copies,
            "forecast_step": None if not math.isfinite(self.forecast_step) else round(self.forecast_step),
            "ratio_now": self.ratio_now,
            "ratio_min": self.ratio_min,
            "ratio_min_step": self.min_step,
            "ratio_min_seed": self.min_seed,
            "ratio_min_sample": self.min_sample,
            "training_copies": self.training_copies,
        }


def image_trajectories(seeds: Iterable[Mapping[str, Any]], by: str = "nn1") -> dict[str, dict[int, Approach]]:
    """Each training image's closest approach at each probe, from the per-sample rows.

    Args:
        seeds: rows as in :attr:`memwatch.store.history.RunHistory.seeds` (``nn1``, ``step``, ``ratio``, ``d1``,
            ``seed``, ``sample``, ``prompt``); rows without a finite ratio or without ``by`` are ignored.
        by: the field that groups the samples: ``nn1`` (the training image they are nearest to) or, for a
            text-to-image model, ``prompt`` (each caption's closest approach to any training image).

    Returns:
        training id (or prompt) -> {step -> :class:`Approach`}, steps ascending.
    """
    out: dict[str, dict[int, Approach]] = {}
    for r in seeds:
        ratio, key = r.get("ratio"), r.get(by)
        if key is None or ratio is None or not math.isfinite(float(ratio)):
            continue
        step = int(r["step"])
        d1 = float(r["d1"]) if r.get("d1") is not None else math.nan
        steps = out.setdefault(str(key), {})
        best = steps.get(step)
        if best is None or float(ratio) < best.ratio:
            own = None if r.get("own_image") is None else bool(r["own_image"])
            ratios = best.ratios if best else []
            steps[step] = Approach(float(ratio), d1, r.get("seed"), r.get("sample"), ratios, r.get("nn1"), own)
        steps[step].ratios.append(float(ratio))
    for steps in out.values():
        for approach in steps.values():
            approach.ratios.sort()
    return {tid: dict(sorted(steps.items())) for tid, steps in sorted(out.items())}


def rank_images(
    trajectories: Mapping[str, Mapping[int, Approach]],
    *,
    threshold: float = DEFAULT_RATIO,
    steps: Iterable[int] | None = None,
    training_copies: Mapping[str, int] | None = None,
) -> list[ImageRisk]:
    """Rank training images by how soon they are (or were) copied.

    Args:
        trajectories: from :func:`image_trajectories`.
        threshold: the memorization threshold on d1/d2.
        steps: every probed step of the run (default: those in the trajectories); the latest one is "now".
        training_copies: training id -> copies in the training set (images in a duplicate group), from
            the training-set analysis (:attr:`memwatch.store.history.RunHistory.training_copies`); None: unknown.

    Returns:
        One :class:`ImageRisk` per image that any sample came nearest to, and per duplicated image,
        most at risk first.
    """
    all_steps = sorted(set(steps) if steps is not None else {s for t in trajectories.values() for s in t})
    now = all_steps[-1] if all_steps else None
    copies = dict(training_copies or {})
    risks = []
    for tid in sorted(set(trajectories) | {i for i, c in copies.items() if c > 1}):
        traj = trajectories.get(tid, {})
        risk = ImageRisk(training_id=tid, trajectory=dict(traj))
        risk.training_copies = None if training_copies is None else copies.get(tid, 1)
        risks.append(risk)
        if not traj:
            continue  # duplicated, but no sample came nearest to it yet
        best_step = min(traj, key=lambda s: (traj[s].ratio, s))
        best = traj[best_step]
        risk.ratio_min, risk.min_step, risk.min_seed, risk.min_sample = best.ratio, best_step, best.seed, best.sample
        risk.ratio_now = traj[now].ratio if now in traj else math.nan
        copied = [s for s, a in traj.items() if a.ratio < threshold]
        risk.first_copy_step = copied[0] if copied else None
        risk.copies = sum(1 for a in traj.values() for r in a.ratios if r < threshold)
        if risk.first_copy_step is None and now is not None:
            risk.forecast_step = _forecast(traj, all_steps, threshold)
    risks.sort(key=_order)
    for i, r in enumerate(risks, 1):
        r.rank = i
    return risks


def rank_prompts(
    seeds: Iterable[Mapping[str, Any]], *, threshold: float = DEFAULT_RATIO, steps: Iterable[int] | None = None
) -> list[dict[str, Any]]:
    """Rank a text-to-image run's prompts by how soon their samples copy (or copied) a training image: the
    ranking of :func:`rank_images` over each prompt's closest approach to *any* training image, since such a
    model memorizes caption by caption.

    Args:
        seeds: per-sample rows with ``prompt`` (and ``group``: ``member`` for training captions, ``holdout``);
            rows without a prompt are ignored, so an unconditional run gives ``[]``.
        threshold, steps: as for :func:`rank_images`.

    Returns:
        :meth:`ImageRisk.row` dicts with ``prompt`` in place of ``training_id``, plus ``group``,
        ``copies_image``: the training image its closest sample was nearest to (at its first copy, else at its
        closest approach), and ``own_image``: whether that is the image the prompt is the caption of (None:
        unknown).

    Example:
        >>> rows = [{"prompt": "a fox", "group": "member", "step": s, "seed": 0, "nn1": "fox.png", "ratio": r,
        ...          "d1": 0.1} for s, r in [(100, 0.6), (200, 0.3)]]
        >>> [(p["prompt"], p["first_copy_step"], p["copies_image"]) for p in rank_prompts(rows)]
        [('a fox', 200, 'fox.png')]
    """
    seeds = list(seeds)
    groups = {r["prompt"]: r.get("group") for r in seeds if r.get("prompt")}
    trajectories = image_trajectories(seeds, by="prompt")
    ranked = []
    for risk in rank_images(trajectories, threshold=threshold, steps=steps):
        row = risk.row()
        row["prompt"] = row.pop("training_id")
        row.pop("training_copies")
        at = risk.first_copy_step if risk.first_copy_step is not None else risk.min_step
        row["copies_image"] = risk.trajectory[at].nn1 if at is not None else None
        row["own_image"] = risk.trajectory[at].own_image if at is not None else None
        row["group"] = groups.get(row["prompt"])
        ranked.append(row)
    return ranked


def first_at_risk(
    trajectory: Mapping[int, Approach], steps: Sequence[int], *, threshold: float = DEFAULT_RATIO
) -> tuple[int | None, int | None]:
    """The first probe at which one image was at risk (copied, or forecast to be), and the first at which
    it was copied, replaying the run probe by probe (each forecast sees only the probes before it).

    Args:
        trajectory: the image's closest approaches (from :func:`image_trajectories`).
        steps: every probed step of the run, ascending.
        threshold: the memorization threshold on d1/d2.

    Example:
        >>> t = {s: Approach(r, r / 10, 0, "s0") for s, r in [(100, .9), (200, .7), (300, .55), (400, .3)]}
        >>> first_at_risk(t, [100, 200, 300, 400])
        (300, 400)
    """
    at_risk = None
    for k, step in enumerate(steps):
        a = trajectory.get(step)
        if a is not None and a.ratio < threshold:
            return (step if at_risk is None else at_risk), step
        if at_risk is None and math.isfinite(_forecast(trajectory, steps[: k + 1], threshold)):
            at_risk = step
    return at_risk, None


def _forecast(trajectory: Mapping[int, Approach], steps: Sequence[int], threshold: float) -> float:
    """The image's own onset forecast at the last of ``steps`` (NaN: none). Its series is taken over the
    run's recent probes: a probe where no sample came nearest to it is a gap, not a value."""
    recent = [(s, {0: trajectory[s].ratio} if s in trajectory else {}) for s in steps[-WINDOW:]]
    return forecast_onset(recent, threshold=threshold, window=WINDOW).onset


def _order(r: ImageRisk) -> tuple:
    if r.first_copy_step is not None:
        return (0, r.first_copy_step, -r.copies, _inf_if_nan(r.ratio_min), r.training_id)
    if math.isfinite(r.forecast_step):
        return (1, r.forecast_step, _inf_if_nan(r.ratio_min), r.training_id)
    recent = r.ratio_now if math.isfinite(r.ratio_now) else math.inf
    return (2, -(r.training_copies or 1), recent, _inf_if_nan(r.ratio_min), r.training_id)


def _inf_if_nan(x: float) -> float:
    """NaN (never approached) sorts last; NaN itself compares false both ways and would scramble a sort."""
    return math.inf if math.isnan(x) else x
