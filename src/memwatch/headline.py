"""The one memorization chart a reader takes in at a glance (``headline.png``, and the report's first plot).

Against training step, on one figure:

* the share of samples that copy a training image (``regurgitation/mem_fraction``, d1/d2 < 1/3) and, when
  the forecast probe ran, its precursor (the closest seeds' d1/d2, ``forecast/precursor``) falling towards
  the threshold 1/3 at which copying begins, with the latest onset forecast as a band on the step axis;
* membership separability (``membership/mia_auc``; 0.5 is chance) on a second axis;
* the warnings (vertical lines by severity), the onset (the first probe with a copying sample) and the
  last clean probe (before any warning or copy), with the newest checkpoint saved by then when it is known;
* for runs with the identity probe, a second panel on the same steps: the share of generated faces that
  are training people (leak) and that blend two of them (interpolation), the number of people leaked
  (right axis), and the precursor of a leak, the closest approach of any face to a training person
  (``identity/identity_sim_max``), rising towards the verification threshold.

The detail grid (``curves.png``) keeps every other metric; this chart only draws what it names.

Example:
    >>> fig = headline_figure(data)  # doctest: +SKIP
    >>> fig.axes[0].get_title()  # doctest: +SKIP
    'run demo: memorization'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memwatch.history import RunHistory

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COPYING = "regurgitation/mem_fraction"
PRECURSOR = "forecast/precursor"
ONSET = "forecast/onset"
SEPARABILITY = "membership/mia_auc"
LEAKS = "identity/identity_leak_rate"
SIZE_IN = (9.0, 5.6)
FACES_HEIGHT_IN = 4.2
SEVERITY_COLOURS = {"info": "tab:gray", "warning": "tab:orange", "critical": "tab:red"}


def key_steps(data: RunHistory) -> dict[str, int | None]:
    """The onset (first probe with a copying sample), the first warning, and the last clean probe (the last
    probed step before both).

    Example:
        >>> key_steps(RunHistory("r"))
        {'onset': None, 'first_warning': None, 'last_clean': None}
    """
    onset = min((int(r["step"]) for r in data.seeds if r.get("memorized")), default=None)
    warned = [int(e["step"]) for e in data.events if e.get("severity") in ("warning", "critical") and e.get("step")]
    first_warning = min(warned, default=None)
    ends = [s for s in (onset, first_warning) if s is not None]
    stop = min(ends) if ends else math.inf
    clean = [s for s in data.steps if s < stop]
    return {"onset": onset, "first_warning": first_warning, "last_clean": max(clean) if clean and ends else None}


def headline_figure(data: RunHistory, last_clean_checkpoint: Path | None = None) -> Figure:
    """The memorization chart of one run (see the module docstring).

    Args:
        data: from :func:`memwatch.history.load_history`.
        last_clean_checkpoint: the newest checkpoint folder saved by the last clean probe, if known.
    """
    from memwatch.curves import _default_style, _new_figure

    keys = key_steps(data)
    faces = any(math.isfinite(v) for v in data.metrics.get(LEAKS, {}).values())
    with _default_style():
        fig = _new_figure(SIZE_IN[0], SIZE_IN[1] + (FACES_HEIGHT_IN if faces else 0.0))
        ax = fig.add_subplot(2, 1, 1) if faces else fig.add_subplot()
        ax.set_title(f"run {data.run}: memorization")
        ax.set_xlabel("training step")
        ax.set_ylabel("share of samples / d1/d2")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        drawn = _series(ax, data.metrics.get(COPYING), "o-", "tab:red", "copying: share of samples with d1/d2 < 1/3")
        precursor = _series(ax, data.metrics.get(PRECURSOR), "s--", "tab:brown",
                            "precursor: closest seeds' d1/d2")  # fmt: skip
        if precursor:
            ax.axhline(data.mem_ratio, color="tab:brown", linewidth=0.8, linestyle=":",
                       label=f"copying threshold d1/d2 = {data.mem_ratio:.2f}")  # fmt: skip
        _forecast(ax, data.metrics, keys["onset"])
        right = ax.twinx()
        right.set_ylim(0.4, 1.02)
        right.set_ylabel("membership separability (AUC; 0.5 = chance)")
        auc = _series(right, data.metrics.get(SEPARABILITY), "^-", "tab:purple", "membership AUC (right axis)")
        if auc:
            right.axhline(0.5, color="tab:purple", linewidth=0.6, linestyle=":")
        else:  # no membership results: no empty axis
            right.set_visible(False)
        _events(ax, data)
        if keys["onset"] is not None:
            ax.axvline(keys["onset"], color="black", linewidth=1.6, label=f"onset: first copy at step {keys['onset']}")
        if keys["last_clean"] is not None:
            where = f" ({last_clean_checkpoint.name} on disk)" if last_clean_checkpoint else ""
            ax.axvline(keys["last_clean"], color="tab:green", linewidth=1.6, linestyle="-.",
                       label=f"last clean probe: step {keys['last_clean']}{where}")  # fmt: skip
        if not (drawn or precursor or auc):
            ax.text(0.5, 0.5, "no regurgitation, forecast or membership results", ha="center", va="center",
                    transform=ax.transAxes)  # fmt: skip
        axes = [ax, right]
        if faces:
            axes += _faces_panel(fig.add_subplot(2, 1, 2, sharex=ax), data)
        legend: dict[str, Any] = {}
        for a in axes:  # one legend for both panels (a warning drawn on both is listed once)
            for handle, label in zip(*a.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        if legend:  # below the chart, so it hides no curve
            fig.legend(list(legend.values()), list(legend), fontsize="x-small", loc="outside lower center", ncols=3)
    return fig


def _faces_panel(ax: Any, data: RunHistory) -> list[Any]:
    """Identity leakage and blending over training, the people leaked, and the leak precursor."""
    m = data.metrics
    ax.set_title("faces: training people reproduced (leak) or blended (interpolation)")
    ax.set_xlabel("training step")
    ax.set_ylabel("share of generated faces / similarity")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    _series(ax, m.get(LEAKS), "o-", "tab:red", "identity leak rate: faces that are a training person")
    _series(ax, m.get("identity/identity_interpolation_rate"), "D-", "tab:orange",
            "identity interpolation rate: faces that blend two people")  # fmt: skip
    if _series(ax, m.get("identity/identity_sim_max"), "s--", "tab:brown",
               "precursor: closest approach of any face to a training person"):  # fmt: skip
        thresholds = [v for v in m.get("identity/identity_threshold", {}).values() if math.isfinite(v)]
        if thresholds:
            ax.axhline(thresholds[-1], color="tab:brown", linewidth=0.8, linestyle=":",
                       label=f"verification threshold {thresholds[-1]:.3f}")  # fmt: skip
    leaks = [s for s, v in m.get("identity/identities_leaked", {}).items() if math.isfinite(v) and v > 0]
    if leaks:
        ax.axvline(min(leaks), color="black", linewidth=1.6, label=f"first identity leak at step {min(leaks)}")
    right = ax.twinx()
    right.set_ylabel("people leaked")
    _series(right, m.get("identity/identities_leaked"), "^-", "tab:purple", "people leaked (right axis)")
    people = [v for v in m.get("identity/gallery_identities", {}).values() if math.isfinite(v)]
    right.set_ylim(-0.1, max(people, default=1.0) + 0.5)
    _events(ax, data)
    return [ax, right]


def _series(ax: Any, series: Mapping[int, float] | None, style: str, colour: str, label: str) -> bool:
    """Plot one metric (non-finite values are gaps); False when it has no finite value."""
    if not series or not any(math.isfinite(v) for v in series.values()):
        return False
    values = [v if math.isfinite(v) else math.nan for v in series.values()]
    ax.plot(list(series), values, style, color=colour, markersize=3, linewidth=1.2, label=label)
    return True


def _forecast(ax: Any, metrics: Mapping[str, Mapping[int, float]], onset_step: int | None) -> None:
    """The latest finite onset forecast made before the onset (after it, the forecast is just "now"): its
    band on the step axis and its step."""
    onset = metrics.get(ONSET, {})
    finite = [s for s, v in onset.items() if math.isfinite(v) and (onset_step is None or s < onset_step)]
    if not finite:
        return
    last = max(finite)
    low = metrics.get(f"{ONSET}_low", {}).get(last, math.nan)
    high = metrics.get(f"{ONSET}_high", {}).get(last, math.nan)
    if math.isfinite(low) and math.isfinite(high):
        ax.axvspan(
            low, high, color="tab:blue", alpha=0.12, label=f"onset forecast at step {last}: {low:.0f}-{high:.0f}"
        )
    ax.axvline(onset[last], color="tab:blue", linewidth=1, linestyle="--", label=f"forecast onset {onset[last]:.0f}")


def _events(ax: Any, data: RunHistory) -> None:
    """Each warning and critical rule where it first fired (info events, and later firings, are left to
    the detail grid)."""
    seen: set[str] = set()
    for e in sorted(data.events, key=lambda e: e.get("step") or 0):
        severity = e.get("severity")
        if severity not in ("warning", "critical") or e.get("step") is None or e.get("rule") in seen:
            continue
        seen.add(e.get("rule"))
        label = f"{severity}: {e.get('rule')} (first at {e['step']})"
        ax.axvline(e["step"], color=SEVERITY_COLOURS[severity], linewidth=1.2, alpha=0.8, label=label)
