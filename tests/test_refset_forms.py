"""Reference sets stored the way training scripts read them: a Hugging Face dataset (by name from the local
cache, or a save_to_disk folder), parquet files and webdataset tar shards. Each form is built here from
the same images; every form must give the same pictures, captions, hashes and manifest-hash rule as the
image folder, and memwatch score / probe must run on them."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from support.images import write_images

from memwatch.cli import main
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.hashing import sha256_bytes

pa = pytest.importorskip("pyarrow", reason="the parquet and arrow forms need pyarrow (memwatch[data])")
pq = pytest.importorskip("pyarrow.parquet")

CAPTIONS = [f"photo number {i}" for i in range(6)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Six 16 px training images as plain files (the reference form the others must match)."""
    write_images(tmp_path / "images", list(range(6)), size=16)
    return tmp_path / "images"


def image_bytes(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))]


def write_shards(folder: Path, out: Path, per_shard: int = 4) -> Path:
    """Webdataset shards as img2dataset writes them: key.jpg|png, key.txt, key.json."""
    out.mkdir(parents=True)
    data = image_bytes(folder)
    for s in range(0, len(data), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, len(data))):
                meta = json.dumps({"caption": CAPTIONS[i], "key": f"{i:09d}"}).encode()
                for name, payload in ((f"{i:09d}.png", data[i]), (f"{i:09d}.txt", CAPTIONS[i].encode()),
                                      (f"{i:09d}.json", meta)):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return out


def write_parquet(folder: Path, path: Path, column: str = "image", row_group_size: int = 4) -> Path:
    """The datasets Image feature's layout: a struct of bytes and path, plus a text column."""
    structs = [{"bytes": b, "path": f"{i:03d}.png"} for i, b in enumerate(image_bytes(folder))]
    table = pa.table({column: structs, "text": CAPTIONS})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def assert_same_pictures(refs, folder: Path) -> None:
    """Same images (pixel for pixel once decoded), hashes of the same bytes, and the captions."""
    want = sorted(image_bytes(folder), key=sha256_bytes)
    got = sorted(refs.items, key=lambda it: it.sha256)
    assert [it.sha256 for it in got] == [sha256_bytes(b) for b in want]
    files = {sha256_bytes(p.read_bytes()): p for p in folder.glob("*.png")}
    for it in refs.items:
        assert torch.equal(load_image(it.source, 16), load_image(files[it.sha256], 16))
    assert sorted(it.caption for it in refs.items) == sorted(CAPTIONS)
    assert len(refs.manifest_sha256) == 64 and not refs.skipped


def test_webdataset_shards(folder: Path, tmp_path: Path) -> None:
    shards = write_shards(folder, tmp_path / "wds")
    refs = load_reference_set(shards)
    assert refs.ids[:2] == ["shard-00000.tar/000000000.png", "shard-00000.tar/000000001.png"]
    assert_same_pictures(refs, folder)
    one = load_reference_set(shards / "shard-00001.tar")  # one shard on its own
    assert one.ids == ["shard-00001.tar/000000004.png", "shard-00001.tar/000000005.png"]


def test_parquet_files_with_several_row_groups(folder: Path, tmp_path: Path) -> None:
    path = write_parquet(folder, tmp_path / "pq" / "train-00000.parquet", row_group_size=4)
    refs = load_reference_set(path.parent)
    assert refs.ids == [f"train-00000.parquet/{i:06d}" for i in range(6)]
    assert_same_pictures(refs, folder)
    # the same hashes and manifest as the folder whose ids they would be
    again = load_reference_set(path)
    assert again.manifest_sha256 == refs.manifest_sha256


def test_columns_are_named_like_the_scripts_flags(folder: Path, tmp_path: Path, capsys) -> None:
    path = write_parquet(folder, tmp_path / "pq" / "train.parquet", column="img")
    refs = load_reference_set(path, image_column="img", caption_column="text")
    assert_same_pictures(refs, folder)
    assert refs.summary()["columns"] == {"image_column": "img", "caption_column": "text"}
    assert main(["data", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no image column 'image'" in err and "--image-column" in err
    assert main(["data", str(path), "--image-column", "img", "--no-cache"]) == 0


datasets = pytest.importorskip("datasets", reason="Hugging Face dataset forms need datasets (memwatch[data])")


def hf_dataset(folder: Path):
    rows = {"image": [{"bytes": b, "path": None} for b in image_bytes(folder)], "text": CAPTIONS}
    return datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string")}))  # fmt: skip


def test_save_to_disk_dataset_and_dataset_dict(folder: Path, tmp_path: Path) -> None:
    ds = hf_dataset(folder)
    ds.save_to_disk(tmp_path / "ds")
    refs = load_reference_set(tmp_path / "ds")
    assert refs.ids[0].endswith("/000000") and len(refs) == 6
    assert_same_pictures(refs, folder)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "dd")
    split = load_reference_set(tmp_path / "dd")  # the train split; ids keep its folder
    assert split.ids == [f"train/{i}" for i in refs.ids]
    assert [it.sha256 for it in split.items] == [it.sha256 for it in refs.items]


def test_a_dataset_by_name_from_the_local_hub_cache(folder: Path, tmp_path: Path, monkeypatch) -> None:
    # The hub cache as huggingface_hub lays it out after a download: a snapshot of the dataset repo.
    hub = tmp_path / "hf" / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / "datasets--memwatch--tiny-photos"
    write_parquet(folder, repo / "snapshots" / revision / "data" / "train-00000-of-00001.parquet")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read when this process imported it
    refs = load_reference_set("hf:memwatch/tiny-photos")
    assert_same_pictures(refs, folder)
    assert refs.ids[0] == "data/train-00000-of-00001.parquet/000000"
    with pytest.raises(Exception, match="not in the local Hugging Face caches"):
        load_reference_set("hf:memwatch/not-downloaded")


def test_score_and_probe_run_on_a_saved_dataset_and_on_shards(folder: Path, tmp_path: Path) -> None:
    from support.models import train_unconditional_like

    hf_dataset(folder).save_to_disk(tmp_path / "ds")
    shards = write_shards(folder, tmp_path / "wds")
    samples = tmp_path / "samples"
    write_images(samples, [1, 4, 70], size=16)  # two copies of training images, one new image
    for reference in (tmp_path / "ds", shards):
        out = tmp_path / f"score-{reference.name}.json"
        assert main(["score", str(samples), str(reference), "--json", str(out), "--no-cache"]) == 0
        by_sample = {m["sample"]: m for m in json.loads(out.read_text())["matches"]}
        assert by_sample["img001.png"]["memorized"] and by_sample["img004.png"]["memorized"]
        assert not by_sample["img070.png"]["memorized"]
    from memwatch.views.report import build_report

    trained = tmp_path / "trained"
    train_unconditional_like(trained, folder, steps=2, every=2)
    probes = {"membership": {"every": 0}, "regurgitation": {"every": 1, "num_samples": 2, "inference_steps": 2}}
    for reference, prefix in ((tmp_path / "ds", "data-00000-of-00001.arrow/"), (shards, "shard-0000")):
        run = tmp_path / f"run-{reference.name}"
        shutil.copytree(trained, run)
        cfg = tmp_path / f"{reference.name}.yaml"
        cfg.write_text(json.dumps({"reference": str(reference), "run_name": "audit", "probes": probes}))
        assert main(["probe", str(run), "--config", str(cfg)]) == 0
        report = build_report(run)
        shown = [t for t in report["evidence"]["training_images"] if t["file_status"] == "ok"]
        assert shown and all(t["id"].startswith(prefix) and t["thumbnail"] for t in shown), reference
        assert report["training_set"]["n"] == 6
