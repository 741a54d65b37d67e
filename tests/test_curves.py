"""Tests for memwatch.views.curves: CSV tables and plots drawn from a real store."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from PIL import Image

from memwatch.core.declared import load_run
from memwatch.core.probe import ProbeResult
from memwatch.errors import MemwatchError
from memwatch.store import Store
from memwatch.store.history import RunHistory, find_store, load_history, training_images
from memwatch.views import curves, plotting
from memwatch.views.curves import curves_figure, format_written, seeds_figure, write_curves
from memwatch.views.headline import headline_figure, key_steps

MEM_RATIO = 0.3  # not the default 1/3, so the test sees that the run's own setting is used
RULES = [
    {
        "name": "first-regurgitation",
        "type": "first",
        "metric": "regurgitation/distinct_memorized",
        "op": ">",
        "value": 0,
        "severity": "warning",
        "message": "first copy at {step}",
    },
    {
        "name": "mem-rising",
        "type": "trend",
        "metric": "regurgitation/mem_fraction",
        "op": ">=",
        "value": 0.5,
        "window": 4,
        "min_points": 2,
        "horizon": 500,
        "severity": "warning",
        "message": "forecast {forecast_step}",
    },
    {
        "name": "mem-high",
        "type": "threshold",
        "metric": "regurgitation/mem_fraction",
        "op": ">=",
        "value": 0.5,
        "severity": "critical",
        "message": "high",
    },
]
CONFIG = {"rules": RULES, "probes": {"regurgitation": {"mem_ratio": MEM_RATIO}}}

REG_STEPS = (100, 200, 300, 400, 500)
MEMBERSHIP_AUC = {50: 0.5, 100: 0.1 + 0.2, 200: 2 / 3, 300: math.nan}  # 0.1 + 0.2 is not 0.3: repr must keep it
# seed -> {step: training id it copies}; every other (seed, step) is a non-copy.
SNAPS = {
    0: {200: "img_004.png", 400: "img_001.png", 500: "img_001.png"},
    1: {300: "img_007.png", 400: "img_007.png", 500: "img_007.png"},
    2: {200: "img_004.png", 500: "img_007.png"},
    3: {400: "img_002.png", 500: "img_002.png"},
}
SEEDS = sorted(SNAPS)


def _ratio(seed: int, step: int) -> float:
    """Copies sit well under MEM_RATIO, the others well above; distinct values per cell."""
    base = 0.05 if step in SNAPS[seed] else 0.6
    return base + seed / 100 + step / 100_000


def _regurgitation(step: int) -> ProbeResult:
    matches = []
    for seed in SEEDS:
        copied = SNAPS[seed].get(step)
        ratio = _ratio(seed, step)
        matches.append(
            {
                "sample": f"seed-{seed:06d}",
                "seed": seed,
                # A non-copy's nearest neighbour is some other image; it must not count as a hit.
                "nn1": copied or f"img_{(seed + step // 100) % 10:03d}.png",
                "d1": ratio * 2.0,
                "d2": 2.0,
                "ratio": ratio,
                "similarity": 1.0 - ratio,
                "memorized": copied is not None,
            }
        )
    hits = [m for m in matches if m["memorized"]]
    return ProbeResult(
        "regurgitation",
        metrics={
            "mem_fraction": len(hits) / len(SEEDS),
            "distinct_memorized": float(len({m["nn1"] for m in hits})),
        },
        matches=matches,
    )


def _build_store(path: Path, *, name: str = "demo", created_at: float = 1000.0) -> Path:
    with Store(path) as store:
        run = store.ensure_run(name, config=CONFIG, created_at=created_at)
        for step in sorted(set(REG_STEPS) | set(MEMBERSHIP_AUC)):
            snap = store.add_snapshot(run, step)
            if step in MEMBERSHIP_AUC:
                result = ProbeResult("membership", metrics={"mia_auc": MEMBERSHIP_AUC[step]})
                store.write_result(snap, result, config_hash="m")
            if step in REG_STEPS:
                store.write_result(snap, _regurgitation(step), config_hash="r")
        store.add_event(
            run,
            {
                "step": 300,
                "rule": "mem-rising",
                "severity": "warning",
                "metric": "regurgitation/mem_fraction",
                "value": 0.25,
                "threshold": 0.5,
                "forecast_step": 450,
                "message": "mem_fraction 0.250 is forecast to reach 0.5 at step 450",
            },
        )
        store.add_event(
            run,
            {
                "step": 400,
                "rule": "mem-high",
                "severity": "critical",
                "metric": "regurgitation/mem_fraction",
                "value": 0.75,
                "threshold": 0.5,
                "message": "step 400: 75% of samples, critical",  # a comma: the CSV must quote it
            },
        )
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A training output dir with the store at memwatch/memwatch.sqlite (the monitor's layout)."""
    _build_store(tmp_path / "out" / "memwatch" / "memwatch.sqlite")
    return tmp_path / "out"


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_metrics_csv_exact_with_blank_cells_for_probes_that_did_not_run(run_dir: Path) -> None:
    paths = write_curves(run_dir)
    expected = (
        "step,membership/mia_auc,regurgitation/distinct_memorized,regurgitation/mem_fraction\n"
        "50,0.5,,\n"
        "100,0.30000000000000004,0.0,0.0\n"
        "200,0.6666666666666666,1.0,0.5\n"
        "300,nan,1.0,0.25\n"
        "400,,3.0,0.75\n"
        "500,,3.0,1.0\n"
    )
    assert paths["metrics.csv"].read_text(encoding="utf-8") == expected
    assert float(_rows(paths["metrics.csv"])[2][1]) == 0.1 + 0.2  # exact round trip


def test_seeds_csv_rows_sorted_by_seed_then_step(run_dir: Path) -> None:
    rows = _rows(write_curves(run_dir)["seeds.csv"])
    assert rows[0] == ["seed", "step", "nn1", "ratio", "d1", "similarity", "memorized"]
    body = rows[1:]
    assert [(int(r[0]), int(r[1])) for r in body] == [(s, t) for s in SEEDS for t in REG_STEPS]
    by_key = {(int(r[0]), int(r[1])): r for r in body}
    seed1_300 = by_key[(1, 300)]
    assert seed1_300[2] == "img_007.png" and seed1_300[6] == "1"
    assert float(seed1_300[3]) == _ratio(1, 300) and float(seed1_300[4]) == _ratio(1, 300) * 2.0
    assert float(seed1_300[5]) == 1.0 - _ratio(1, 300)
    assert by_key[(1, 200)][6] == "0" and by_key[(3, 300)][6] == "0"
    assert sum(r[6] == "1" for r in body) == sum(len(v) for v in SNAPS.values())


def test_training_images_first_step_seeds_and_hits(run_dir: Path) -> None:
    rows = _rows(write_curves(run_dir)["training_images.csv"])
    assert rows == [
        ["training_id", "first_step", "first_seeds", "total_hits"],
        ["img_004.png", "200", "0 2", "2"],
        ["img_007.png", "300", "1", "4"],
        ["img_001.png", "400", "0", "2"],  # ties at 400 sort by id
        ["img_002.png", "400", "3", "2"],
    ]


def test_image_risk_ranks_copied_images_by_first_copy(run_dir: Path) -> None:
    rows = _rows(write_curves(run_dir)["image_risk.csv"])
    header, body = rows[0], rows[1:]
    ranked = [(r[header.index("training_id")], r[header.index("first_copy_step")]) for r in body]
    # the run's own threshold (0.3) decides a copy: the same order as training_images.csv
    expected = [("img_004.png", "200"), ("img_007.png", "300"), ("img_001.png", "400"), ("img_002.png", "400")]
    assert ranked[:4] == expected
    assert [r[header.index("rank")] for r in body] == [str(i) for i in range(1, len(body) + 1)]


def test_images_figure_puts_the_most_at_risk_on_top(run_dir: Path) -> None:
    from memwatch.signals.image_risk import image_trajectories, rank_images

    with Store(find_store(run_dir)) as store:
        data = load_history(store)
    risks = rank_images(image_trajectories(data.seeds), threshold=data.mem_ratio)
    fig = curves.images_figure(data, risks, top=2)
    ax = fig.axes[0]
    assert ax.get_title() == "training images: closest approach per probe"
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "1. img_004.png (copied at 200)",
        "2. img_007.png (copied at 300)",
    ]
    outlined = {(round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in ax.patches}  # (column, row) of copies
    assert outlined == {(1, 0), (2, 1), (3, 1), (4, 1)}  # img_004 copied at 200, img_007 from 300 on


def test_training_images_helper_ignores_non_memorized_rows() -> None:
    rows = [
        {"seed": 5, "step": 100, "nn1": "a.png", "memorized": 0},
        {"seed": 5, "step": 200, "nn1": "a.png", "memorized": 1},
        {"seed": 1, "step": 200, "nn1": "a.png", "memorized": 1},
        {"seed": 1, "step": 100, "nn1": "b.png", "memorized": None},
    ]
    expected = {"training_id": "a.png", "first_step": 200, "first_seeds": [1, 5], "total_hits": 2}
    assert training_images(rows) == [expected]


def test_events_csv(run_dir: Path) -> None:
    rows = _rows(write_curves(run_dir)["events.csv"])
    assert rows == [
        ["step", "rule", "severity", "metric", "value", "threshold", "forecast_step", "message"],
        ["300", "mem-rising", "warning", "regurgitation/mem_fraction", "0.25", "0.5", "450",
         "mem_fraction 0.250 is forecast to reach 0.5 at step 450"],
        ["400", "mem-high", "critical", "regurgitation/mem_fraction", "0.75", "0.5", "",
         "step 400: 75% of samples, critical"],
    ]  # fmt: skip


def test_pngs_are_valid_with_one_panel_per_metric(run_dir: Path) -> None:
    paths = write_curves(run_dir)
    with Image.open(paths["curves.png"]) as im:
        im.load()
        # Three metrics: one row of three panels, each PANEL_SIZE_IN at DPI.
        assert im.format == "PNG"
        assert im.size == (
            round(3 * curves.PANEL_SIZE_IN[0] * plotting.DPI),
            round(curves.PANEL_SIZE_IN[1] * plotting.DPI),
        )
        assert "Software" not in im.info
    with Image.open(paths["seeds.png"]) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] == round(curves.HEATMAP_WIDTH_IN * plotting.DPI)


def test_curves_figure_draws_thresholds_events_and_forecast(run_dir: Path) -> None:
    from matplotlib.colors import to_rgba

    with Store(find_store(run_dir)) as store:
        data = load_history(store)
    fig = curves_figure(data)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["membership/mia_auc", "regurgitation/distinct_memorized", "regurgitation/mem_fraction"]
    panels = dict(zip(titles, fig.axes, strict=True))

    def lines(ax, style):
        return [ln for ln in ax.get_lines() if ln.get_linestyle() == style]

    mem = panels["regurgitation/mem_fraction"]
    thresholds = lines(mem, "--")
    assert sorted(float(ln.get_ydata()[0]) for ln in thresholds) == [0.5, 0.5]  # trend and threshold rule
    verticals = {float(ln.get_xdata()[0]): ln.get_color() for ln in lines(mem, "-") if len(set(ln.get_xdata())) == 1}
    assert to_rgba(verticals[300]) == to_rgba("tab:orange")  # warning
    assert to_rgba(verticals[400]) == to_rgba("tab:red")  # critical
    (forecast,) = lines(mem, ":")
    assert list(forecast.get_xdata()) == [300, 450] and list(forecast.get_ydata()) == [0.25, 0.5]
    legend = [t.get_text() for t in mem.get_legend().get_texts()]
    assert {"warning event", "critical event", "forecast crossing", "mem-high >= 0.5"} <= set(legend)

    distinct = panels["regurgitation/distinct_memorized"]
    assert [float(ln.get_ydata()[0]) for ln in lines(distinct, "--")] == [0.0]
    assert distinct.get_legend() is not None and len(lines(distinct, ":")) == 0
    assert panels["membership/mia_auc"].get_legend() is None  # no rule, no event on this metric


def test_seeds_figure_marks_memorized_cells_and_first_copy(run_dir: Path) -> None:
    from matplotlib.patches import Rectangle

    with Store(find_store(run_dir)) as store:
        data = load_run(store)
    assert data.mem_ratio == MEM_RATIO
    fig = seeds_figure(data)
    heat = fig.axes[0]
    assert heat.get_title() == "regurgitation: d1/d2 per seed"
    grid = heat.get_images()[0].get_array()
    assert grid.shape == (len(SEEDS), len(REG_STEPS))
    assert grid[1, 2] == pytest.approx(_ratio(1, 300))
    outlined = {
        (round(p.get_y() + 0.5), round(p.get_x() + 0.5))
        for p in heat.patches
        if isinstance(p, Rectangle) and not p.fill
    }
    assert outlined == {(s, REG_STEPS.index(t)) for s in SEEDS for t in SNAPS[s]}
    notes = {(t.get_text(), t.xy) for t in heat.texts}
    assert notes == {("img_004.png", (1, 0)), ("img_007.png", (2, 1)), ("img_004.png", (1, 2)), ("img_002.png", (3, 3))}
    colorbar = fig.axes[1]
    assert any(t.get_text() == f"{MEM_RATIO:.3g} mem_ratio" for t in colorbar.get_yticklabels())
    assert any(list(ln.get_ydata()) == [MEM_RATIO, MEM_RATIO] for ln in colorbar.get_lines())


def test_running_twice_gives_identical_bytes(run_dir: Path, tmp_path: Path) -> None:
    first = write_curves(run_dir, tmp_path / "a")
    second = write_curves(run_dir, tmp_path / "b")
    assert list(first) == [
        "headline.png",
        "metrics.csv",
        "curves.png",
        "seeds.csv",
        "seeds.png",
        "training_images.csv",
        "images.png",
        "image_risk.csv",
        "events.csv",
    ]
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_default_out_dir_is_beside_the_store_and_summary_line(run_dir: Path) -> None:
    paths = write_curves(run_dir)
    folder = run_dir / "memwatch" / "curves"
    assert {p.parent for p in paths.values()} == {folder}
    assert format_written(paths) == (
        f"wrote 9 files to {folder}: headline.png metrics.csv curves.png seeds.csv seeds.png training_images.csv "
        "images.png image_risk.csv events.csv"
    )
    assert not list(folder.glob(".*.tmp"))


def test_run_without_regurgitation_single_point_and_nan(tmp_path: Path) -> None:
    metrics = {"mia_auc": 0.55, "loss_gap": math.nan, "tpr_at_1fpr": 0.0, "auc_t50": math.inf}
    with Store(tmp_path / "memwatch.sqlite") as store:
        run = store.ensure_run("mia-only", config={})
        store.write_result(store.add_snapshot(run, 10), ProbeResult("membership", metrics), config_hash="m")
    paths = write_curves(tmp_path)
    assert paths["metrics.csv"].read_text() == (
        "step,membership/auc_t50,membership/loss_gap,membership/mia_auc,membership/tpr_at_1fpr\n10,inf,nan,0.55,0.0\n"
    )
    assert paths["seeds.csv"].read_text() == "seed,step,nn1,ratio,d1,similarity,memorized\n"
    assert paths["training_images.csv"].read_text() == "training_id,first_step,first_seeds,total_hits\n"
    assert paths["events.csv"].read_text() == "step,rule,severity,metric,value,threshold,forecast_step,message\n"
    (header,) = paths["image_risk.csv"].read_text().splitlines()  # no image was approached: the header only
    assert header.startswith("rank,training_id,at_risk,first_copy_step,copies,forecast_step,")
    with Image.open(paths["seeds.png"]) as im:
        im.load()
    with Image.open(paths["curves.png"]) as im:
        im.load()  # two panels: the metrics never finite (NaN, inf) are named, not drawn
        assert im.size == (
            round(2 * curves.PANEL_SIZE_IN[0] * plotting.DPI),
            round(1 * curves.PANEL_SIZE_IN[1] * plotting.DPI),
        )
    with Image.open(paths["headline.png"]) as im:
        im.load()
    with Store(tmp_path / "memwatch.sqlite") as store:
        data = load_history(store)
    fig = curves_figure(data)
    assert [ax.get_title() for ax in fig.axes] == ["membership/mia_auc", "membership/tpr_at_1fpr"]
    assert "not drawn: membership/auc_t50 (no finite value), membership/loss_gap (no finite value)" in (
        fig._suptitle.get_text()
    )
    assert [ax.get_title() for ax in seeds_figure(data).axes] == ["regurgitation: d1/d2 per seed"]


def test_find_store_both_layouts_and_missing(tmp_path: Path) -> None:
    flat = _build_store(tmp_path / "flat" / "memwatch.sqlite")
    nested = _build_store(tmp_path / "train" / "memwatch" / "memwatch.sqlite")
    assert find_store(tmp_path / "flat") == flat
    assert find_store(tmp_path / "train") == nested
    assert find_store(flat) == flat
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemwatchError, match=r"no memwatch store in .*empty: looked for .*memwatch\.sqlite"):
        find_store(tmp_path / "empty")
    with pytest.raises(MemwatchError, match="does not exist"):
        write_curves(tmp_path / "nowhere")
    assert not (tmp_path / "empty" / "memwatch.sqlite").exists()  # looking never creates a store


def test_run_selection_default_newest_and_unknown_name_lists_runs(tmp_path: Path) -> None:
    path = _build_store(tmp_path / "memwatch.sqlite", name="newer", created_at=2000.0)
    with Store(path) as store:
        # Inserted later (higher id) but created earlier: the default must still be "newer".
        old = store.ensure_run("older", config={}, created_at=1000.0)
        store.write_result(store.add_snapshot(old, 7), ProbeResult("membership", {"mia_auc": 0.5}), config_hash="m")
    assert write_curves(tmp_path)["metrics.csv"].read_text().splitlines()[1].startswith("50,")
    assert write_curves(tmp_path, run="older")["metrics.csv"].read_text() == "step,membership/mia_auc\n7,0.5\n"
    with pytest.raises(MemwatchError, match=r"no run 'nope': its runs are 'newer', 'older'"):
        write_curves(tmp_path, run="nope")


def test_store_without_runs_is_an_error(tmp_path: Path) -> None:
    Store(tmp_path / "memwatch.sqlite").close()
    with pytest.raises(MemwatchError, match="has no runs yet"):
        write_curves(tmp_path)


def test_later_result_wins_when_a_step_has_two(tmp_path: Path) -> None:
    with Store(tmp_path / "memwatch.sqlite") as store:
        run = store.ensure_run("r", config={})
        live = store.add_snapshot(run, 5, kind="live")
        ckpt = store.add_snapshot(run, 5, kind="checkpoint", path="out/checkpoint-5")
        # The store lists a step's rows by kind (checkpoint before live): write the live one first,
        # so "later-written wins" and "last listed wins" disagree.
        store.write_result(live, ProbeResult("membership", {"mia_auc": 0.25}), config_hash="m")
        store.write_result(ckpt, ProbeResult("membership", {"mia_auc": 0.75}), config_hash="m")
    assert write_curves(tmp_path)["metrics.csv"].read_text() == "step,membership/mia_auc\n5,0.75\n"


def test_constant_panels_are_named_not_drawn_and_the_headline_marks_the_key_steps() -> None:
    steps = [100, 200, 300, 400]
    data = RunHistory(
        run="r",
        metrics={
            "regurgitation/mem_fraction": dict(zip(steps, [0.0, 0.0, 0.1, 0.3], strict=True)),
            "regurgitation/sim_max": dict(zip(steps, [0.7, 0.8, 0.9, 0.95], strict=True)),
            "regurgitation/extracted_fraction": dict.fromkeys(steps, 0.0),
            "forecast/precursor": dict(zip(steps, [0.9, 0.6, 0.3, 0.2], strict=True)),
            "forecast/onset": {100: math.nan, 200: 320.0, 300: 300.0, 400: 400.0},
            "forecast/onset_low": {200: 280.0, 300: 300.0, 400: 400.0},
            "forecast/onset_high": {200: 400.0, 300: 300.0, 400: 400.0},
            "membership/mia_auc": dict(zip(steps, [0.5, 0.55, 0.7, 0.8], strict=True)),
        },
        events=[{"step": 200, "rule": "onset-forecast", "severity": "warning", "metric": "forecast/onset"}],
        seeds=[
            {"seed": 0, "step": s, "nn1": "a.png", "ratio": r, "memorized": r < 1 / 3}
            for s, r in zip(steps, [0.9, 0.6, 0.3, 0.2], strict=True)
        ],  # fmt: skip
    )
    grid = curves_figure(data)
    titles = [ax.get_title() for ax in grid.axes]
    assert "regurgitation/extracted_fraction" not in titles and "regurgitation/sim_max" in titles
    assert "regurgitation/extracted_fraction (constant 0)" in grid._suptitle.get_text()

    assert key_steps(data) == {"onset": 300, "first_warning": 200, "last_clean": 100}
    fig = headline_figure(data, Path("run/checkpoint-100"))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "onset: first copy at step 300" in labels
    assert "last clean probe: step 100 (checkpoint-100 on disk)" in labels
    assert "warning: onset-forecast (first at 200)" in labels
    # the forecast shown is the latest made before the onset (after it, onset is simply "now")
    assert "membership AUC (right axis)" in labels and "onset forecast at step 200: 280-400" in labels
