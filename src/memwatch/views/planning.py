"""Plan a run before it is trained: predict the onset step for the full training set from pilot runs.

Memorization begins later the larger the training set: the onset step grows linearly with the number
of training images n, while the step at which samples become good does not (Bonnaire et al., NeurIPS
2025; Favero et al. 2025). A few short pilot runs on subsets of different size, each watched by
memwatch, give ``(n, onset step)`` points; a straight line through them predicts the onset for the full
set, with a prediction interval.

A pilot's onset is the first probed step at which the share of copying samples (the main panel's
``share`` metric its probes declare: ``regurgitation/mem_fraction``) reached ``onset_fraction`` (measured);
a pilot stopped before that contributes its last onset forecast (the main panel's ``forecast`` metric:
``forecast/onset``), marked as such; a pilot with neither is left out and named.

Example:
    >>> pilots = [Pilot("a", "r", n, s, "measured") for n, s in [(8, 800), (16, 1500), (16, 1700), (32, 3100)]]
    >>> plan = fit_onset_law(pilots, target_n=64)
    >>> 5000 < plan.onset < 7000 and plan.low < plan.onset < plan.high
    True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memwatch.core.declared import Declarations
from memwatch.core.probe import MAIN_PANEL
from memwatch.errors import MemwatchError
from memwatch.signals.forecast import fit_line, t95

log = logging.getLogger("memwatch")

#: mem_fraction at which a pilot counts as memorizing: the warning benchmark's onset definition.
ONSET_FRACTION = 0.05


@dataclass
class Pilot:
    """One pilot run: its store, size and onset.

    Attributes:
        store: the store file.
        run: the run's name.
        n: training images.
        onset_step: the onset step, or None.
        source: ``"measured"``, ``"forecast"`` or ``"none"``.
        created_at: when the run was created (with its name, what identifies it, also in a copied store).
    """

    store: str
    run: str
    n: int
    onset_step: float | None
    source: str
    created_at: float | None = None


@dataclass
class OnsetPlan:
    """The predicted onset for ``target_n`` training images.

    Attributes:
        target_n: the full training set's size.
        onset: predicted onset step.
        low, high: the 90% prediction interval (one-sided 95% each side).
        slope, intercept: the fitted line ``onset = intercept + slope * n``.
        r2: its coefficient of determination on the pilots.
        pilots: the pilots used (and those left out, with source "none").
    """

    target_n: int
    onset: float
    low: float
    high: float
    slope: float
    intercept: float
    r2: float
    pilots: list[Pilot] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("onset", "low", "high", "slope", "intercept", "r2"):
            out[key] = round(out[key], 4) if math.isfinite(out[key]) else None
        return out


def pilot_from_store(path: str | Path, *, run: str | None = None, onset_fraction: float = ONSET_FRACTION) -> Pilot:
    """Read one pilot's size and onset from its store.

    Args:
        path: the run folder, its ``memwatch/`` folder or the store file.
        run: run name (default: the most recent run in the store).
        onset_fraction: ``mem_fraction`` at which the pilot counts as memorizing.
    """
    from memwatch.store import Store
    from memwatch.store.history import find_store, load_history

    store_path = find_store(path)
    with Store(store_path, readonly=True) as store:
        history = load_history(store, run)
    n = (history.info.get("reference") or {}).get("n")
    if not isinstance(n, int) or n < 1:
        raise MemwatchError(f"{store_path}: run {history.run!r} records no training-set size: not a memwatch pilot")
    created = history.info.get("created_at")
    declared = Declarations.of_config(history.config)
    shares, onsets = (declared.keys(role=role, panel=MAIN_PANEL) for role in ("share", "forecast"))
    fractions = history.metrics.get(shares[0], {}) if shares else {}
    measured = [step for step, v in sorted(fractions.items()) if math.isfinite(v) and v >= onset_fraction]
    if measured:
        return Pilot(str(store_path), history.run, n, float(measured[0]), "measured", created)
    onset = history.metrics.get(onsets[0], {}) if onsets else {}
    forecasts = [v for _, v in sorted(onset.items()) if math.isfinite(v)]
    if forecasts:
        return Pilot(str(store_path), history.run, n, forecasts[-1], "forecast", created)
    return Pilot(str(store_path), history.run, n, None, "none", created)


def fit_onset_law(pilots: Sequence[Pilot], *, target_n: int) -> OnsetPlan:
    """Fit ``onset = intercept + slope * n`` to the pilots and predict the onset at ``target_n``.

    The fit is a forecast only when it says what the law says: onset later for more images. Pilots whose
    onset does not grow with n (a slope not above zero within its 90% interval) give no forecast, as do too
    few pilots or sizes, and a prediction before step 0.

    Raises:
        MemwatchError: fewer than 3 pilots with an onset, fewer than 2 sizes among them, an onset that does not
            grow with n, or a predicted onset below 0 (each said in one line).
    """
    used = [p for p in pilots if p.onset_step is not None]
    sizes = {p.n for p in used}
    if len(used) < 3 or len(sizes) < 2:
        raise MemwatchError(
            f"memwatch forecast needs at least 3 pilot runs with an onset, on at least 2 training-set sizes; got "
            f"{len(used)} on {len(sizes)} size(s): train longer pilots, or more sizes"
        )
    fit = fit_line([p.n for p in used], [float(p.onset_step) for p in used])  # type: ignore[arg-type]
    assert fit is not None
    slope_half = t95(fit.n - 2) * fit.sigma / math.sqrt(fit.sxx) if fit.n > 2 else math.inf
    if not fit.slope - slope_half > 0:
        raise MemwatchError(
            f"the pilots' onsets do not grow with the training-set size (slope {fit.slope:.2f} +- {slope_half:.2f} "
            "steps per image, 90%): no forecast can be made from them; check that each pilot is a subset of the "
            "same data trained the same way, or add pilots of other sizes"
        )
    onset = fit.intercept + fit.slope * (target_n - fit.x_mean)
    if onset <= 0:
        raise MemwatchError(
            f"the line through the pilots puts the onset for n={target_n} at step {onset:.0f}, before training "
            "starts: no forecast can be made; add pilots closer to that size"
        )
    half = t95(fit.n - 2) * fit.sigma * math.sqrt(1 + 1 / fit.n + (target_n - fit.x_mean) ** 2 / fit.sxx)
    ys = [float(p.onset_step) for p in used]  # type: ignore[arg-type]
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = fit.sigma**2 * (fit.n - 2)
    return OnsetPlan(
        target_n=target_n,
        onset=onset,
        low=onset - half,
        high=onset + half,
        slope=fit.slope,
        intercept=fit.intercept - fit.slope * fit.x_mean,
        r2=1 - ss_res / ss_tot if ss_tot > 0 else math.nan,
        pilots=list(pilots),
    )


def forecast_from_stores(
    paths: Sequence[str | Path], *, target_n: int, onset_fraction: float = ONSET_FRACTION
) -> OnsetPlan:
    """:func:`fit_onset_law` over the pilots read from ``paths`` (one run per store: its latest).

    Example:
        >>> plan = forecast_from_stores(["pilots/n8", "pilots/n16", "pilots/n32"], target_n=128)  # doctest: +SKIP
    """
    if target_n < 1:
        raise MemwatchError(f"--n {target_n}: the full training set's size must be a positive number of images")
    pilots: dict[tuple[str, str], Pilot] = {}
    for path in paths:  # a run given twice (its folder and its store file, or a copy of its store) counts once
        pilot = pilot_from_store(path, onset_fraction=onset_fraction)
        key = (pilot.run, str(pilot.created_at))
        if key in pilots:
            log.warning("%s is the pilot %s given again (%s): counted once", path, pilot.run, pilots[key].store)
        pilots.setdefault(key, pilot)
    return fit_onset_law(list(pilots.values()), target_n=target_n)
