"""The one memorization chart a reader takes in at a glance (``headline.png``, and the report's first plot).

What is drawn comes from the probes' metric declarations (:class:`~memwatch.core.probe.Metric`), never from
probe names: a probe that declares a metric's role appears here without an edit. Against training step,
one panel per declared panel (the main one, ``memorization``, first), each with

* its ``share`` metrics (the share of samples that copy a training image: ``regurgitation/mem_fraction``;
  on the faces panel, faces that are a training person, or a blend of two);
* its ``precursor`` metrics with their thresholds (the closest seeds' d1/d2 falling towards 1/3; the
  closest approach of any face to a training person rising towards the verification threshold);
* its ``forecast`` metric: the latest forecast made before the onset, as a band on the step axis;
* on a second axis its ``separability`` metrics (membership AUC; chance at the threshold), else its
  ``count`` metrics (people leaked);
* the warnings (vertical lines by severity) and the onset (the first value above 0 of the panel's onset
  metric: the first copy, the first identity leak); on the main panel also the last clean probe (before
  any warning or copy), with the newest checkpoint saved by then when it is known.

A panel other than the main one is drawn only when one of its metrics has a value. The detail grid
(``curves.png``) keeps every other metric.

Example:
    >>> fig = headline_figure(data)  # doctest: +SKIP
    >>> fig.axes[0].get_title()  # doctest: +SKIP
    'run demo: memorization'
"""

from __future__ import annotations

import itertools
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memwatch.core.declared import Declarations
from memwatch.core.probe import MAIN_PANEL
from memwatch.store.history import RunHistory
from memwatch.views.plotting import default_style, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SIZE_IN = (9.0, 5.6)
PANEL_HEIGHT_IN = 4.2  # each panel after the main one
SEVERITY_COLOURS = {"info": "tab:gray", "warning": "tab:orange", "critical": "tab:red"}
#: How the known panels are titled and their left axis named (another panel is titled by its name).
PANELS = {
    MAIN_PANEL: ("run {run}: memorization", "share of samples / d1/d2"),
    "faces": (
        "faces: training people reproduced (leak) or blended (interpolation)",
        "share of generated faces / similarity",
    ),
}
SHARE_STYLES = (("o-", "tab:red"), ("D-", "tab:orange"), ("v-", "tab:pink"), ("P-", "tab:olive"))
PRECURSOR_STYLES = (("s--", "tab:brown"), ("x--", "tab:cyan"))
RIGHT_STYLES = (("^-", "tab:purple"), ("*-", "tab:green"))
LEGEND_WIDTH = 52  # characters per legend line


def key_steps(data: RunHistory, declared: Declarations | None = None) -> dict[str, int | None]:
    """The onset (first probe with a copying sample), the first warning, and the last clean probe (the last
    probed step before both).

    Example:
        >>> key_steps(RunHistory("r"))
        {'onset': None, 'first_warning': None, 'last_clean': None}
    """
    declared = declared or Declarations.of_config(data.config)
    onset = panel_onset(data, declared, MAIN_PANEL)[0]
    warned = [int(e["step"]) for e in data.events if e.get("severity") in ("warning", "critical") and e.get("step")]
    first_warning = min(warned, default=None)
    ends = [s for s in (onset, first_warning) if s is not None]
    stop = min(ends) if ends else math.inf
    clean = [s for s in data.steps if s < stop]
    return {"onset": onset, "first_warning": first_warning, "last_clean": max(clean) if clean and ends else None}


def panel_onset(data: RunHistory, declared: Declarations, panel: str) -> tuple[int | None, str]:
    """The first step at which a panel's onset metric is above 0, and what it is called (on the main panel the
    per-sample rows count too: a memorized sample is a copy)."""
    found: list[tuple[int, str]] = []
    for key in declared.onset_keys(panel):
        steps = [s for s, v in data.metrics.get(key, {}).items() if math.isfinite(v) and v > 0]
        if steps:
            found.append((min(steps), declared.metrics[key].onset))
    if panel == MAIN_PANEL:
        memorized = [int(r["step"]) for r in data.seeds if r.get("memorized")]
        if memorized:
            found.append((min(memorized), "first copy"))
    return min(found) if found else (None, "")


def headline_figure(data: RunHistory, last_clean_checkpoint: Path | None = None) -> Figure:
    """The memorization chart of one run (see the module docstring).

    Args:
        data: from :func:`memwatch.core.declared.load_run`.
        last_clean_checkpoint: the newest checkpoint folder saved by the last clean probe, if known.
    """
    declared = Declarations.of_config(data.config)
    keys = key_steps(data, declared)
    panels = [p for p in declared.panels() if p == MAIN_PANEL or _has_values(data, declared, p)]
    with default_style():
        fig = new_figure(SIZE_IN[0], SIZE_IN[1] + PANEL_HEIGHT_IN * (len(panels) - 1))
        axes: list[Any] = []
        first = None
        for i, panel in enumerate(panels):
            ax = fig.add_subplot(len(panels), 1, i + 1, sharex=first)
            first = first or ax
            axes += _panel(ax, panel, data, declared)
            if panel == MAIN_PANEL and keys["last_clean"] is not None:
                where = f" ({last_clean_checkpoint.name} on disk)" if last_clean_checkpoint else ""
                ax.axvline(keys["last_clean"], color="tab:green", linewidth=1.6, linestyle="-.",
                           label=f"last clean probe: step {keys['last_clean']}{where}")  # fmt: skip
        legend: dict[str, Any] = {}
        for a in axes:  # one legend for all panels (a warning drawn on several is listed once)
            for handle, label in zip(*a.get_legend_handles_labels(), strict=True):
                legend.setdefault(label, handle)
        if legend:  # below the chart, so it hides no curve
            # long labels wrapped, so that three columns fit the figure's width however many curves there are
            labels = [textwrap.fill(label, LEGEND_WIDTH) for label in legend]
            fig.legend(list(legend.values()), labels, fontsize="x-small", loc="outside lower center", ncols=3)
    return fig


def _has_values(data: RunHistory, declared: Declarations, panel: str) -> bool:
    keys = [
        k for role in ("share", "precursor", "count", "separability") for k in declared.keys(role=role, panel=panel)
    ]
    return any(math.isfinite(v) for k in keys for v in data.metrics.get(k, {}).values())


def _panel(ax: Any, panel: str, data: RunHistory, declared: Declarations) -> list[Any]:
    """One panel: its shares, precursors with thresholds, forecast band, right-axis metrics, events and onset."""
    title, ylabel = PANELS.get(panel, (panel, "share / value"))
    ax.set_title(title.format(run=data.run))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    drawn = False
    for key, (style, colour) in zip(declared.keys(role="share", panel=panel), SHARE_STYLES, strict=False):
        drawn |= _series(ax, data.metrics.get(key), style, colour, declared.metrics[key].title)
    thresholds: set[float] = set()
    for key, style in zip(declared.keys(role="precursor", panel=panel), itertools.cycle(PRECURSOR_STYLES)):
        if _series(ax, data.metrics.get(key), *style, declared.metrics[key].title):
            drawn = True
            threshold = _latest_threshold(data, declared, key)
            if threshold is not None and threshold not in thresholds:  # precursors sharing a threshold: one line
                thresholds.add(threshold)
                ax.axhline(threshold, color=style[1], linewidth=0.8, linestyle=":",
                           label=f"{declared.metrics[key].title.split(':')[0]} threshold {threshold:.3g}")  # fmt: skip
    onset, name = panel_onset(data, declared, panel)
    for key in declared.keys(role="forecast", panel=panel):
        _forecast(ax, data.metrics, key, onset)
    right = ax.twinx()
    drawn |= _right_axis(right, panel, data, declared)
    _events(ax, data)
    if onset is not None:
        label = f"onset: {name} at step {onset}" if panel == MAIN_PANEL else f"{name} at step {onset}"
        ax.axvline(onset, color="black", linewidth=1.6, label=label)
    if not drawn:
        ax.text(0.5, 0.5, "no results of probes that declare what this chart shows", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    return [ax, right]


def _right_axis(right: Any, panel: str, data: RunHistory, declared: Declarations) -> bool:
    """Separability (chance at its threshold) on the right axis, else counts; hidden when neither has values."""
    separability = declared.keys(role="separability", panel=panel)
    drawn = False
    if separability:
        right.set_ylim(0.4, 1.02)
        for key, style in zip(separability, itertools.cycle(RIGHT_STYLES)):
            m = declared.metrics[key]
            if _series(right, data.metrics.get(key), *style, f"{m.title} (right axis)"):
                drawn = True
                chance = declared.threshold(key)
                right.set_ylabel(f"separability (AUC; {chance:g} = chance)" if chance is not None else m.title)
                if chance is not None:
                    right.axhline(chance, color=style[1], linewidth=0.6, linestyle=":")
    else:
        counts = declared.keys(role="count", panel=panel)
        values = [v for k in counts for v in data.metrics.get(k, {}).values() if math.isfinite(v)]
        titles = []
        for key, style in zip(counts, itertools.cycle(RIGHT_STYLES)):
            m = declared.metrics[key]
            if _series(right, data.metrics.get(key), *style, f"{m.title} (right axis)"):
                drawn = True
                titles.append(m.title)
        if titles:  # several counts share the axis: the legend names each
            right.set_ylabel(titles[0] if len(titles) == 1 else "count")
        right.set_ylim(-0.1, max(values, default=1.0) + 0.5)
    if not drawn:  # no such results: no empty axis
        right.set_visible(False)
    return drawn


def _latest_threshold(data: RunHistory, declared: Declarations, key: str) -> float | None:
    """A precursor's threshold at the latest probe that gives one (a threshold another metric holds may change)."""
    probe = key.split("/", 1)[0]
    for step in reversed(data.steps):
        values = {k: v[step] for k, v in data.metrics.items() if k.startswith(probe + "/") and step in v}
        if key not in values:
            continue
        t = declared.threshold(key, values)
        if t is not None and math.isfinite(t):
            return t
    return None


def _series(ax: Any, series: Mapping[int, float] | None, style: str, colour: str, label: str) -> bool:
    """Plot one metric (non-finite values are gaps); False when it has no finite value."""
    if not series or not any(math.isfinite(v) for v in series.values()):
        return False
    values = [v if math.isfinite(v) else math.nan for v in series.values()]
    ax.plot(list(series), values, style, color=colour, markersize=3, linewidth=1.2, label=label)
    return True


def _forecast(ax: Any, metrics: Mapping[str, Mapping[int, float]], key: str, onset_step: int | None) -> None:
    """The latest finite forecast made before the onset (after it, the forecast is just "now"): its band on the
    step axis and its step."""
    onset = metrics.get(key, {})
    finite = [s for s, v in onset.items() if math.isfinite(v) and (onset_step is None or s < onset_step)]
    if not finite:
        return
    last = max(finite)
    low = metrics.get(f"{key}_low", {}).get(last, math.nan)
    high = metrics.get(f"{key}_high", {}).get(last, math.nan)
    what = "onset forecast" if key.endswith("/onset") else f"{key.split('/', 1)[1]} forecast"
    if math.isfinite(low) and math.isfinite(high):
        ax.axvspan(low, high, color="tab:blue", alpha=0.12, label=f"{what} at step {last}: {low:.0f}-{high:.0f}")
    ax.axvline(onset[last], color="tab:blue", linewidth=1, linestyle="--", label=f"forecast {onset[last]:.0f}")


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
