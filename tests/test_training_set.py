"""``memwatch data``: planted exact and near duplicates in real photos are all found, and nothing else."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance
from support.schema import schema_errors

from memwatch.cli import main
from memwatch.data.refset import load_reference_set
from memwatch.data.training_set import analyse_training_set
from memwatch.embedders.pixel import PixelEmbedder
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.store import Store
from memwatch.views.report import build_report, render_html

ROOT = Path(__file__).resolve().parents[1]
CONTROL = sorted((ROOT / "assets" / "demo" / "control").glob("*.png"))
# One crop of each of the 14 public-domain photos: distinct. (Two crops of one photo are often windows that
# overlap almost entirely: near duplicates by design.)
PHOTOS = list({p.stem.split("_", 1)[1]: p for p in reversed(CONTROL)}.values())


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, list[set[str]], list[set[str]]]:
    """14 distinct photos plus planted copies; returns the folder, the exact groups and the near groups."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for p in PHOTOS:
        shutil.copy(p, data / p.name)
    a, b, c, d = (p.name for p in PHOTOS[:4])
    # exact: the same bytes under other names, one in a subfolder
    shutil.copy(data / a, data / "sub" / "copy_of_a.png")
    shutil.copy(data / a, data / "copy2_of_a.png")
    shutil.copy(data / b, data / "sub" / "b_again.png")
    # near: re-encoded as JPEG, brightened by 3%, resized up and saved again
    Image.open(data / c).convert("RGB").save(data / "c_reencoded.jpg", quality=90)
    ImageEnhance.Brightness(Image.open(data / c).convert("RGB")).enhance(1.03).save(data / "sub" / "c_bright.png")
    im = Image.open(data / d).convert("RGB")
    im.resize((im.width * 2, im.height * 2), Image.BICUBIC).save(data / "d_upscaled.png")
    exact = [{a, "sub/copy_of_a.png", "copy2_of_a.png"}, {b, "sub/b_again.png"}]
    near = [{c, "c_reencoded.jpg", "sub/c_bright.png"}, {d, "d_upscaled.png"}]
    return data, exact, near


def test_planted_duplicates_are_all_found_and_nothing_else(planted, tmp_path: Path, capsys) -> None:
    data, exact, near = planted
    out = tmp_path / "out" / "data.json"
    assert main(["data", str(data), "--json", str(out), "--no-cache"]) == 0
    doc = json.loads(out.read_text())
    assert doc["n"] == len(PHOTOS) + 6 and doc["distinct"] == len(PHOTOS) + 3
    groups = {(g["kind"], frozenset(g["ids"])) for g in doc["duplicate_groups"]}
    assert groups == {("exact", frozenset(g)) for g in exact} | {("near", frozenset(g)) for g in near}
    assert all(g["min_similarity"] >= doc["near_threshold"] for g in doc["duplicate_groups"])
    assert doc["exact_duplicate_images"] == 3 and doc["near_duplicate_groups"] == 2
    assert "aligning shift and zoom" in doc["near_threshold_source"] and doc["embedder"]["resolution"] == 32
    # every distinct image has its nearest neighbour; a planted copy's nearest is its original
    nearest = {r["id"]: r for r in doc["nearest"]}
    assert len(nearest) == doc["distinct"] and nearest["d_upscaled.png"]["nearest"] == PHOTOS[3].name
    assert "2 near-duplicate group(s)" in capsys.readouterr().out


def test_a_threshold_no_copy_reaches_leaves_the_exact_groups_only(planted) -> None:
    data, exact, _ = planted
    strict = analyse_training_set(load_reference_set(data), PixelEmbedder(32), near_threshold=1.0)
    assert {frozenset(g.ids) for g in strict.duplicate_groups if g.kind == "exact"} == {frozenset(g) for g in exact}
    assert not [g for g in strict.duplicate_groups if g.kind == "near"]


def test_an_isolated_image_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    textures = [p for p in CONTROL if p.name.endswith(("cell.png", "gravel.png"))]
    for p in textures[:24]:  # crops of a micrograph and a gravel photo: close to each other
        shutil.copy(p, data / p.name)
    Image.new("RGB", (32, 32), (255, 0, 255)).save(data / "magenta.png")  # far from every one of them
    result = analyse_training_set(load_reference_set(data), PixelEmbedder(32))
    assert result.isolated[0] == "magenta.png"
    assert not [g for g in result.duplicate_groups if "magenta.png" in g.ids]  # flat: never a near duplicate
    assert len(result.isolated) <= 3  # beyond Tukey's fence: a few at most, not a share of the set


def test_unreadable_files_are_skipped_and_named(planted, tmp_path: Path) -> None:
    data, _, _ = planted
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "d.json"
    assert main(["data", str(data), "--json", str(out), "--no-cache"]) == 0
    doc = json.loads(out.read_text())
    assert [s["path"] for s in doc["skipped"]] == [str(data / "broken.png")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "/no/such/folder"], "REFERENCE /no/such/folder does not exist"),
        (["data", "{data}", "--near-threshold", "1.5"], "--near-threshold 1.5"),
        (["data", "{data}", "--embedder", "clip", "--resolution", "16"], "--resolution applies to --embedder pixel"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(planted, argv, message, capsys) -> None:
    data, _, _ = planted
    assert main([a.format(data=data) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# The analysis made by the monitor and memwatch probe, kept in the store and shown in the report


@pytest.fixture
def duplicated(train_holdout) -> tuple[Path, Path]:
    """Eight 16 px training images plus an exact copy of one and a 3% brighter copy of another."""
    train, holdout = train_holdout
    shutil.copy(train / "img000.png", train / "img000_copy.png")
    ImageEnhance.Brightness(Image.open(train / "img001.png").convert("RGB")).enhance(1.03).save(train / "img001_b.png")
    return train, holdout


def _monitor_run(train: Path, holdout: Path, out: Path, steps: int = 4) -> dict:
    from accelerate import Accelerator
    from support.models import FAST_MONITOR
    from support.models import train as train_loop

    acc = Accelerator(cpu=True)
    config = {**FAST_MONITOR, "run_name": "r"}
    with MemorizationMonitor(acc, config, reference=train, holdout=holdout, output_dir=out) as m:
        train_loop(acc, train, steps, monitor=m)
    return json.loads((out / "summary.json").read_text())


def test_the_monitor_analyses_the_training_set_once_and_the_report_shows_it(duplicated, tmp_path: Path) -> None:
    train, holdout = duplicated
    out = tmp_path / "mw"
    summary = _monitor_run(train, holdout, out)
    counts = summary["training_set"]
    assert (counts["n"], counts["distinct"], counts["exact_duplicate_images"], counts["near_duplicate_groups"]) == (
        10, 9, 1, 1,
    )  # fmt: skip
    assert summary["timings"]["training_set"] > 0 and not summary["failed_probes"]
    with Store(out / "memwatch.sqlite") as store:
        stored = store.training_set(store.run_id("r"))
    groups = {(g["kind"], tuple(g["ids"])) for g in stored["analysis"]["duplicate_groups"]}
    assert groups == {("exact", ("img000.png", "img000_copy.png")), ("near", ("img001.png", "img001_b.png"))}
    first = stored["created_at"]

    # The same run resumed on unchanged data reuses the stored analysis.
    again = _monitor_run(train, holdout, out, steps=5)
    assert again["training_set"] == counts and "training_set" not in again["timings"]
    with Store(out / "memwatch.sqlite") as store:
        assert store.training_set(store.run_id("r"))["created_at"] == first

    report = build_report(out)
    assert not schema_errors(report)
    section = report["training_set"]
    assert section["status"] == "analysed" and section["matches_reference"]
    assert {tuple(g["ids"]) for g in section["duplicate_groups"]} == {g[1] for g in groups}
    copies = {r["training_id"]: r["training_copies"] for r in report["evidence"]["at_risk_images"]}
    doubled = ("img000.png", "img001.png", "img001_b.png")  # the exact copy is one content with img000.png
    assert {i for i, c in copies.items() if c == 2} == set(doubled) and set(copies.values()) == {1, 2}
    page = render_html(report)
    assert "Training set: duplicates and isolated images" in page and "img000_copy.png" in page


def test_a_failed_analysis_is_recorded_and_probing_goes_on(duplicated, tmp_path: Path, monkeypatch) -> None:
    import memwatch.data.training_set

    def broken(*args, **kwargs):
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(memwatch.data.training_set, "analyse_training_set", broken)  # a fault inside the analysis
    train, holdout = duplicated
    out = tmp_path / "mw"
    summary = _monitor_run(train, holdout, out)
    assert summary["training_set"] == {"error": "RuntimeError: disk vanished"}
    assert [f["probe"] for f in summary["failed_probes"]] == ["training_set"]
    with Store(out / "memwatch.sqlite") as store:
        run = store.run_id("r")
        assert {m["probe"] for m in store.metrics(run)} >= {"membership", "regurgitation"}  # the probes ran
        assert store.training_set(run)["error"] == "RuntimeError: disk vanished"
    report = build_report(out)
    assert report["training_set"]["status"] == "failed" and not schema_errors(report)
    assert any(x["code"] == "training-set-unanalysed" for x in report["limitations"])


def test_memwatch_probe_analyses_the_training_set_of_a_checkpoint_run(duplicated, tmp_path: Path) -> None:
    from support.models import train_unconditional_like

    train, _ = duplicated
    run = tmp_path / "run"
    train_unconditional_like(run, train, steps=2, every=2)
    cfg = tmp_path / "c.yaml"
    probes = {"membership": {"every": 0}, "regurgitation": {"every": 1, "num_samples": 2, "inference_steps": 2}}
    cfg.write_text(json.dumps({"reference": str(train), "run_name": "audit", "probes": probes}))
    assert main(["probe", str(run), "--config", str(cfg)]) == 0
    with Store(run / "memwatch" / "memwatch.sqlite") as store:
        analysis = store.training_set(store.run_id("audit"))["analysis"]
    assert analysis["n"] == 10 and analysis["exact_duplicate_images"] == 1 and analysis["near_duplicate_groups"] == 1
