"""``memwatch data``: planted exact and near duplicates in real photos are all found, and nothing else."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance

from memwatch.cli import main
from memwatch.embedders.pixel import PixelEmbedder
from memwatch.refset import load_reference_set
from memwatch.training_set import analyse_training_set

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "assets" / "demo" / "control").glob("*.png"))[::8]  # 48 distinct public-domain crops


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, list[set[str]], list[set[str]]]:
    """48 distinct photos plus planted copies; returns the folder, the exact groups and the near groups."""
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
    assert "Carlini" in doc["near_threshold_source"] and doc["embedder"]["resolution"] == 32
    # every distinct image has its nearest neighbour; a planted copy's nearest is its original
    nearest = {r["id"]: r for r in doc["nearest"]}
    assert len(nearest) == doc["distinct"] and nearest["d_upscaled.png"]["nearest"] == PHOTOS[3].name
    assert "2 near-duplicate group(s)" in capsys.readouterr().out


def test_a_stricter_threshold_keeps_only_the_closest_copies(planted) -> None:
    data, exact, _ = planted
    strict = analyse_training_set(load_reference_set(data), PixelEmbedder(32), near_threshold=0.9999)
    assert {frozenset(g.ids) for g in strict.duplicate_groups if g.kind == "exact"} == {frozenset(g) for g in exact}
    assert not [g for g in strict.duplicate_groups if g.kind == "near"]


def test_an_isolated_image_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    textures = [p for p in sorted(PHOTOS[0].parent.glob("*.png")) if p.name.endswith(("cell.png", "gravel.png"))]
    for p in textures[:24]:  # crops of two micrographs and a gravel photo: close to each other
        shutil.copy(p, data / p.name)
    Image.new("RGB", (32, 32), (255, 0, 255)).save(data / "magenta.png")  # far from every one of them
    result = analyse_training_set(load_reference_set(data), PixelEmbedder(32))
    assert result.isolated[0] == "magenta.png" and not result.duplicate_groups
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
