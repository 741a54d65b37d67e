"""Memorization curves: CSV tables and plots drawn from a run's history (:mod:`memwatch.store.history`).

Everything here is a view over the store (DESIGN.md: "curves, warnings and reports are views over
it"), so the files can be rebuilt at any time, also while training still writes the store. This
module only draws and writes:

* ``headline.png``: the one memorization chart (:mod:`memwatch.views.headline`): copying, its precursor and
  forecast, membership separability, warnings, onset and the last clean probe;
* ``metrics.csv`` / ``curves.png``: every ``probe/metric`` against training step (the grid leaves out
  metrics that are constant or never finite, and names them in its title), with each rule's
  threshold and the alert events (vertical lines by severity; trend forecasts as dotted lines); a
  forecast rule's metric (``forecast/onset``) is drawn with its band, the line "onset = now", the
  rule's horizon and the at-risk span from its first warning;
* ``seeds.csv`` / ``seeds.png``: per fixed probe seed, the d1/d2 ratio at every regurgitation probe,
  so the step at which a seed "snaps" onto a training image is visible;
* ``training_images.csv``: each training image ever regurgitated, when it first was and by which seeds;
* ``image_risk.csv`` / ``images.png``: each training image's closest approach by any sample at every
  probe, ranked by how soon it is (or was) copied (:mod:`memwatch.signals.image_risk`), the most at risk on top;
* ``events.csv``: the alert events.

Floats in the CSV files are written with :func:`repr` (the shortest text that reads back as the same
float), so nothing is lost to rounding. Plots use matplotlib's Agg backend with its default style,
fixed figure sizes and no date or version in the PNG, so the same store always gives the same bytes.

Example:
    >>> paths = write_curves("out/")  # doctest: +SKIP
    >>> print(format_written(paths))  # doctest: +SKIP
    wrote 8 files to out/memwatch/curves: metrics.csv curves.png seeds.csv seeds.png training_images.csv ...
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memwatch.core.declared import load_run
from memwatch.output import ensure_folder, write_output
from memwatch.signals.image_risk import ImageRisk, image_trajectories, rank_images
from memwatch.signals.rules import FORECAST, SEVERITIES
from memwatch.snapshots.checkpoints import last_clean_checkpoint
from memwatch.store import Store
from memwatch.store.history import RunHistory, find_store, training_images
from memwatch.views.headline import SEVERITY_COLOURS, headline_figure, key_steps
from memwatch.views.plotting import default_style, new_figure, png_bytes

if TYPE_CHECKING:  # matplotlib is imported inside the functions that draw: `import memwatch` stays light
    from matplotlib.figure import Figure

CURVES_SUBDIR = "curves"

METRICS_CSV = "metrics.csv"
CURVES_PNG = "curves.png"
HEADLINE_PNG = "headline.png"
SEEDS_CSV = "seeds.csv"
SEEDS_PNG = "seeds.png"
TRAINING_IMAGES_CSV = "training_images.csv"
IMAGES_PNG = "images.png"
IMAGE_RISK_CSV = "image_risk.csv"
EVENTS_CSV = "events.csv"

SEED_COLUMNS = ("seed", "step", "nn1", "ratio", "d1", "similarity", "memorized")
TRAINING_IMAGE_COLUMNS = ("training_id", "first_step", "first_seeds", "total_hits")
IMAGE_RISK_COLUMNS = tuple(ImageRisk("").row())
EVENT_COLUMNS = ("step", "rule", "severity", "metric", "value", "threshold", "forecast_step", "message")

# Plot layout. Sizes are fixed (not fitted to the screen) so output is reproducible byte for byte.
PANEL_SIZE_IN = (4.0, 3.0)  # one metric panel, inches
GRID_COLUMNS = 3  # panels per row in curves.png
HEATMAP_WIDTH_IN = 10.0
HEATMAP_ROW_IN = 0.3  # height per seed row; the figure grows with the seed count, within the bounds below
HEATMAP_HEIGHT_IN = (3.5, 30.0)
# Beyond this many seeds (rows) or steps (columns) the heatmap labels every k-th one, so labels do not
# overlap: rows get HEATMAP_ROW_IN each; step labels share HEATMAP_WIDTH_IN.
MAX_SEED_LABELS = 40
MAX_STEP_LABELS = 15
IMAGE_ROWS = 30  # training images drawn in images.png (the most at risk); image_risk.csv lists all


# ---------------------------------------------------------------------------------------------
# Writing


def write_curves(run_dir: str | Path, out_dir: str | Path | None = None, *, run: str | None = None) -> dict[str, Path]:
    """Write the curve tables and plots of one run.

    Args:
        run_dir: folder with the store (see :func:`find_store`).
        out_dir: where to write; default ``<folder of the store>/curves/``.
        run: run name; default the most recently created run in the store.

    Returns:
        File name -> path, for ``headline.png``, ``metrics.csv``, ``curves.png``, ``seeds.csv``, ``seeds.png``,
        ``training_images.csv``, ``images.png``, ``image_risk.csv`` and ``events.csv`` (all written even
        for a run without regurgitation results: the seed tables then hold just their header).

    Raises:
        MemwatchError: no store, no run, or an unknown run name.

    Example:
        >>> paths = write_curves("out/", run="sd-faces")  # doctest: +SKIP
        >>> paths["metrics.csv"]  # doctest: +SKIP
        PosixPath('out/memwatch/curves/metrics.csv')
    """
    store_path = find_store(run_dir)
    with Store(store_path, readonly=True) as store:
        data = load_run(store, run)
    out = ensure_folder(Path(out_dir) if out_dir is not None else store_path.parent / CURVES_SUBDIR, "--out")

    steps = data.steps
    columns = list(data.metrics)
    metric_rows = [[step, *(data.metrics[c].get(step, "") for c in columns)] for step in steps]
    pics = training_images(data.seeds)
    risks = rank_images(image_trajectories(data.seeds), threshold=data.mem_ratio, training_copies=data.training_copies)
    clean = key_steps(data)["last_clean"]
    checkpoint = last_clean_checkpoint(store_path.parent.parent, clean) if clean is not None else None
    files: dict[str, bytes] = {
        HEADLINE_PNG: png_bytes(headline_figure(data, checkpoint)),
        METRICS_CSV: _csv(["step", *columns], metric_rows),
        CURVES_PNG: png_bytes(curves_figure(data)),
        SEEDS_CSV: _csv(SEED_COLUMNS, [[r[c] for c in SEED_COLUMNS] for r in data.seeds]),
        SEEDS_PNG: png_bytes(seeds_figure(data)),
        TRAINING_IMAGES_CSV: _csv(
            TRAINING_IMAGE_COLUMNS,
            [[i["training_id"], i["first_step"], " ".join(map(str, i["first_seeds"])), i["total_hits"]] for i in pics],
        ),
        IMAGES_PNG: png_bytes(images_figure(data, risks)),
        IMAGE_RISK_CSV: _csv(IMAGE_RISK_COLUMNS, [list(r.row().values()) for r in risks]),
        EVENTS_CSV: _csv(EVENT_COLUMNS, [[e.get(c) for c in EVENT_COLUMNS] for e in data.events]),
    }
    return {name: write_output(out / name, content, "--out") for name, content in files.items()}


def format_written(paths: Mapping[str, Path]) -> str:
    """One line for the CLI: how many files were written, where, and their names.

    Example:
        >>> format_written({"metrics.csv": Path("out/curves/metrics.csv"), "curves.png": Path("out/curves/curves.png")})
        'wrote 2 files to out/curves: metrics.csv curves.png'
    """
    folders = {p.parent for p in paths.values()}
    where = str(folders.pop()) if len(folders) == 1 else "several folders"
    return f"wrote {len(paths)} files to {where}: {' '.join(p.name for p in paths.values())}"


def _cell(value: Any) -> str:
    """CSV text of one value: '' for None, repr for floats (exact round trip; 'nan' for undefined)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # "\n" on every platform: same bytes everywhere
    writer.writerow(header)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return buf.getvalue().encode("utf-8")


def curves_figure(data: RunHistory) -> Figure:
    """One panel per ``probe/metric`` against training step, with rule thresholds and events.

    Each rule's threshold is a dashed horizontal line (coloured by the rule's severity); each event
    is a vertical line at its step on its metric's panel (info grey, warning orange, critical red);
    a trend event adds a dotted line from its point to ``(forecast_step, threshold)`` and a
    diamond at the forecast. Panels are in a grid of :data:`GRID_COLUMNS` columns, sorted by name.

    Args:
        data: from :func:`memwatch.store.history.load_history`.

    Returns:
        The figure; its axes are the panels, titled ``probe/metric`` (one placeholder panel
        titled ``no metrics`` when the run has none).

    Example:
        >>> [ax.get_title() for ax in curves_figure(data).axes]  # doctest: +SKIP
        ['membership/mia_auc', 'regurgitation/mem_fraction']
    """
    bands = _band_metrics(data)
    # "m@ema" is drawn on m's panel; a forecast's band edges on its forecast's panel
    names = [n for n in dict.fromkeys(n.split("@", 1)[0] for n in data.metrics) if n not in bands]
    flat = {n: _flat(data, n) for n in names}
    left_out = [f"{n} ({why})" for n, why in flat.items() if why]
    names = [n for n in names if not flat[n]]
    n = max(1, len(names))
    ncols = min(GRID_COLUMNS, n)
    nrows = math.ceil(n / ncols)
    with default_style():
        fig = new_figure(PANEL_SIZE_IN[0] * ncols, PANEL_SIZE_IN[1] * nrows)
        title = f"run {data.run}: metrics by training step"
        if left_out:  # named, so nothing silently disappears
            title += "\nnot drawn: " + ", ".join(left_out[:8]) + (" ..." if len(left_out) > 8 else "")
        fig.suptitle(title, fontsize="medium" if left_out else "large")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[n:]:
            fig.delaxes(ax)  # a partly filled last row: the figure's axes are exactly the panels
        if not names:
            axes[0].set_title("no metrics")
            note = "no probe results in this run"
            axes[0].text(0.5, 0.5, note, ha="center", va="center", transform=axes[0].transAxes)
            return fig
        for ax, name in zip(axes, names, strict=False):
            _metric_panel(ax, name, data)
    return fig


def _flat(data: RunHistory, name: str) -> str:
    """Why a metric's panel would say nothing: ``"no finite value"`` or ``"constant <v>"``; else empty."""
    values = [v for m, series in data.metrics.items() if m == name or m.startswith(name + "@")
              for v in series.values() if math.isfinite(v)]  # fmt: skip
    if not values:
        return "no finite value"
    # a metric measured once in a longer run (the identity gallery's size) draws no curve either
    if min(values) == max(values) and (len(values) > 1 or len(data.steps) > 1):
        return f"constant {values[0]:g}"
    return ""


def _band_metrics(data: RunHistory) -> set[str]:
    """``<metric>_low`` / ``_high`` of every forecast rule's metric: drawn as that metric's band."""
    return {f"{r['metric']}_{edge}" for r in data.rules if r.get("type") == FORECAST for edge in ("low", "high")}


def _forecast_panel(ax: Any, rule: Mapping[str, Any], data: RunHistory) -> None:
    """A forecast's band, the line ``forecast = step`` (onset now) and the rule's horizon line."""
    low, high = data.metrics.get(f"{rule['metric']}_low", {}), data.metrics.get(f"{rule['metric']}_high", {})
    steps = [s for s in low if s in high and math.isfinite(low[s]) and math.isfinite(high[s])]
    if steps:
        ax.fill_between(steps, [low[s] for s in steps], [high[s] for s in steps], color="tab:blue", alpha=0.15,
                        label="forecast band")  # fmt: skip
    xs = list(data.metrics.get(rule["metric"], {}))
    if xs:
        share = float(rule.get("horizon_share") or 0)
        ax.plot(xs, xs, "-", color="black", linewidth=0.8, label="now (onset reached)")
        colour = SEVERITY_COLOURS.get(rule.get("severity"), "black")
        ax.plot(xs, [x * (1 + share) for x in xs], "--", color=colour, linewidth=1,
                label=f"{rule.get('name', 'rule')}: within {share:g} x step")  # fmt: skip
        fired = [e["step"] for e in data.events if e.get("rule") == rule.get("name") and e.get("step") is not None]
        if fired:  # at risk from the first forecast warning on (the report's 'at-risk' verdict)
            ax.axvspan(min(fired), max(xs), color=colour, alpha=0.08, label="at risk")
    ax.set_ylabel("forecast step", fontsize="small")


def _metric_panel(ax: Any, name: str, data: RunHistory) -> None:
    series = data.metrics.get(name, {})
    steps = list(series)
    # Infinite values would wreck the axis limits; they stay in metrics.csv and are gaps here, like NaN.
    values = [v if math.isfinite(v) else math.nan for v in series.values()]
    ax.set_title(name, fontsize="medium")
    ax.set_xlabel("training step", fontsize="small")
    ax.tick_params(labelsize="x-small")
    ax.grid(True, alpha=0.3)
    # Markers: a single probe, or a point between two NaNs, is still visible.
    ax.plot(steps, values, "o-", color="tab:blue", markersize=3, linewidth=1.2, label="_nolegend_")
    for other in (n for n in data.metrics if n.startswith(name + "@")):  # another kind of weights: its own series
        points = data.metrics[other]
        finite = [v if math.isfinite(v) else math.nan for v in points.values()]
        values += finite
        kind = other.split("@", 1)[1]
        ax.plot(list(points), finite, "s--", color="tab:purple", markersize=4, linewidth=1, label=f"{kind} weights")
    if not any(math.isfinite(v) for v in values):
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, fontsize="small")
    for rule in data.rules:
        if rule["metric"] != name:
            continue
        if rule.get("type") == FORECAST:
            _forecast_panel(ax, rule, data)
            continue
        colour = SEVERITY_COLOURS.get(rule.get("severity"), "black")
        label = f"{rule.get('name', 'rule')} {rule.get('op', '')} {float(rule['value']):g}"
        ax.axhline(float(rule["value"]), linestyle="--", linewidth=1, color=colour, label=label)
    labelled: set[str] = set()
    types = {r.get("name"): r.get("type") for r in data.rules}
    for e in data.events:
        if e.get("metric") != name or e.get("step") is None:
            continue
        severity = e.get("severity")
        colour = SEVERITY_COLOURS.get(severity, "black")
        label = f"{severity} event" if severity not in labelled else "_nolegend_"
        labelled.add(severity)
        ax.axvline(e["step"], color=colour, linewidth=1.2, alpha=0.8, label=label)
        trend = types.get(e.get("rule")) == "trend"  # a forecast rule's threshold is a horizon, not a value
        if trend and e.get("forecast_step") is not None and e.get("threshold") is not None:
            fx, fy = e["forecast_step"], e["threshold"]
            if e.get("value") is not None and math.isfinite(e["value"]):
                ax.plot([e["step"], fx], [e["value"], fy], ":", color=colour, linewidth=1.2, label="_nolegend_")
            flabel = "forecast crossing" if "forecast" not in labelled else "_nolegend_"
            labelled.add("forecast")
            ax.plot([fx], [fy], marker="D", linestyle="none", color=colour, markersize=5, label=flabel)
    if ax.get_legend_handles_labels()[0]:
        order = {s: i for i, s in enumerate(SEVERITIES)}
        handles, labels = ax.get_legend_handles_labels()
        # Thresholds first, then events from least to most severe: the same order on every panel.
        pairs = sorted(zip(handles, labels, strict=True), key=lambda hl: order.get(hl[1].removesuffix(" event"), -1))
        ax.legend([h for h, _ in pairs], [lab for _, lab in pairs], fontsize="x-small", loc="best")


def seeds_figure(data: RunHistory) -> Figure:
    """Heatmap of d1/d2 per probe seed (rows) and regurgitation probe step (columns).

    The colour scale is centred on the memorization threshold (red below: copies), which is marked
    on the colorbar; memorized cells are outlined in black, and each seed's first memorized cell is
    annotated with the training image it copies, so the step at which a seed snaps is visible.

    Args:
        data: from :func:`memwatch.store.history.load_history`.

    Returns:
        The figure: the heatmap axes (titled ``regurgitation: d1/d2 per seed``) and its colorbar,
        or a single placeholder axes when the run has no regurgitation results.

    Example:
        >>> seeds_figure(data).axes[0].get_title()  # doctest: +SKIP
        'regurgitation: d1/d2 per seed'
    """
    import numpy as np
    from matplotlib.patches import Patch

    labels = list(dict.fromkeys(_row_label(r) for r in data.seeds))  # rows arrive sorted by seed
    steps = sorted({r["step"] for r in data.seeds})
    height = min(max(1.5 + HEATMAP_ROW_IN * len(labels), HEATMAP_HEIGHT_IN[0]), HEATMAP_HEIGHT_IN[1])
    with default_style():
        fig = new_figure(HEATMAP_WIDTH_IN, height)
        ax = fig.add_subplot()
        ax.set_title("regurgitation: d1/d2 per seed")  # d1, d2: distance to nearest, 2nd-nearest training image
        fig.suptitle(f"run {data.run}")
        if not labels:
            ax.text(0.5, 0.5, "no regurgitation results in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return fig
        row_of = {label: i for i, label in enumerate(labels)}
        col_of = {step: j for j, step in enumerate(steps)}
        grid = np.full((len(labels), len(steps)), np.nan)
        cells: dict[tuple[int, int], dict[str, Any]] = {}
        for r in data.seeds:  # a later result for the same seed and step overwrites an earlier one
            i, j = row_of[_row_label(r)], col_of[r["step"]]
            cells[(i, j)] = r
            ratio = r.get("ratio")
            grid[i, j] = ratio if ratio is not None and math.isfinite(ratio) else np.nan
        t = data.mem_ratio
        first = {}
        for (i, j), r in sorted(cells.items()):
            if r.get("memorized") and r.get("nn1") is not None:
                first.setdefault(i, (j, str(r["nn1"])))
        memorized = [ij for ij, r in cells.items() if r.get("memorized")]
        _ratio_grid(fig, ax, grid, t, memorized, {(j, i): name for i, (j, name) in first.items()})
        ax.set_xticks(*_ticks(steps, MAX_STEP_LABELS))
        ax.set_yticks(*_ticks(labels, MAX_SEED_LABELS))
        ax.tick_params(labelsize="x-small")
        ax.set_xlabel("training step (regurgitation probe)")
        ax.set_ylabel("probe seed")
        fig.legend(
            handles=[Patch(facecolor="none", edgecolor="black", label=f"memorized (d1/d2 < {t:.3g})")],
            loc="outside lower left",  # constrained layout reserves room below the axes
            fontsize="x-small",
            frameon=False,
        )
    return fig


def images_figure(data: RunHistory, risks: Sequence[ImageRisk], top: int = IMAGE_ROWS) -> Figure:
    """Heatmap of each training image's closest approach (d1/d2) per regurgitation probe, most at risk on top.

    Args:
        data: from :func:`memwatch.store.history.load_history`.
        risks: from :func:`memwatch.signals.image_risk.rank_images`, ranked.
        top: rows drawn (the ``top`` images most at risk).

    Returns:
        The figure (axes titled ``training images: closest approach per probe``); a placeholder axes when
        the run has no regurgitation results. Row labels give the rank, the id and when it was (or is
        forecast to be) copied; grey cells: no sample was nearest to that image at that probe.

    Example:
        >>> images_figure(data, rank_images(image_trajectories(data.seeds))).axes[0].get_title()  # doctest: +SKIP
        'training images: closest approach per probe'
    """
    import numpy as np

    shown = list(risks[:top])
    steps = sorted({r["step"] for r in data.seeds})
    height = min(max(1.5 + HEATMAP_ROW_IN * len(shown), HEATMAP_HEIGHT_IN[0]), HEATMAP_HEIGHT_IN[1])
    with default_style():
        fig = new_figure(HEATMAP_WIDTH_IN, height)
        ax = fig.add_subplot()
        ax.set_title("training images: closest approach per probe")
        fig.suptitle(f"run {data.run}: the {len(shown)} of {len(risks)} images most at risk, first on top")
        if not shown:
            ax.text(0.5, 0.5, "no regurgitation results in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return fig
        col_of = {step: j for j, step in enumerate(steps)}
        grid = np.full((len(shown), len(steps)), np.nan)
        for i, risk in enumerate(shown):
            for step, approach in risk.trajectory.items():
                grid[i, col_of[step]] = approach.ratio
        copied = [
            (i, col_of[s]) for i, r in enumerate(shown) for s, a in r.trajectory.items() if a.ratio < data.mem_ratio
        ]
        _ratio_grid(fig, ax, grid, data.mem_ratio, copied, {})
        ax.set_xticks(*_ticks(steps, MAX_STEP_LABELS))
        ax.set_yticks(*_ticks([_risk_label(r) for r in shown], MAX_SEED_LABELS))
        ax.tick_params(labelsize="x-small")
        ax.set_xlabel("training step (regurgitation probe)")
        ax.set_ylabel("training image (rank, id)")
    return fig


def _risk_label(r: ImageRisk) -> str:
    if r.first_copy_step is not None:
        return f"{r.rank}. {r.training_id} (copied at {r.first_copy_step})"
    if math.isfinite(r.forecast_step):
        return f"{r.rank}. {r.training_id} (forecast {r.forecast_step:.0f})"
    return f"{r.rank}. {r.training_id}"


def _ratio_grid(
    fig: Figure,
    ax: Any,
    grid: Any,
    t: float,
    memorized: Iterable[tuple[int, int]],
    notes: Mapping[tuple[int, int], str],
) -> None:
    """Draw a d1/d2 grid: diverging colours centred on the threshold ``t`` (red below: copies), which the
    colorbar marks; ``memorized`` cells (row, column) outlined; ``notes`` ((column, row) -> text) beside cells."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.patches import Rectangle

    finite = grid[np.isfinite(grid)]
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    # Centre the diverging map on the threshold; fall back to a plain scale if it is outside [0, vmax].
    norm = TwoSlopeNorm(vcenter=t, vmin=0.0, vmax=vmax) if 0 < t < vmax else Normalize(0.0, vmax)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="lightgrey")  # grey: no value at that step
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    cbar = fig.colorbar(image, ax=ax, label="d1 / d2")
    cbar.ax.axhline(t, color="black", linewidth=2)
    cbar.set_ticks(sorted({0.0, t, vmax}))
    cbar.set_ticklabels([f"{v:.3g} mem_ratio" if v == t else f"{v:.3g}" for v in sorted({0.0, t, vmax})])
    for i, j in sorted(memorized):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    for (j, i), text in sorted(notes.items()):
        ax.annotate(
            text,
            (j, i),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize="x-small",
            va="center",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.8, "linewidth": 0},
            annotation_clip=True,
        )


def _row_label(row: Mapping[str, Any]) -> str:
    return str(row["seed"]) if row.get("seed") is not None else str(row.get("sample"))


def _ticks(values: Sequence[Any], most: int) -> tuple[list[int], list[str]]:
    """Tick positions and labels for heatmap cells, thinned to at most ``most`` labels."""
    every = max(1, math.ceil(len(values) / most))
    positions = list(range(0, len(values), every))
    return positions, [str(values[p]) for p in positions]
