"""Reference sets inside files, as real tools write them and as careless or hostile users leave them: every
image read, every unreadable item skipped, counted and named (never a whole file for one bad row, never a
silent drop), names that are not UTF-8 carried through the store and the report."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from support.images import smooth_image, write_images

from memwatch.cli import main
from memwatch.data.refset import load_reference_set
from memwatch.hashing import sha256_bytes

pa = pytest.importorskip("pyarrow", reason="the parquet forms need pyarrow (memwatch[data])")
pq = pytest.importorskip("pyarrow.parquet")


def png(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(seed, size)).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str | bytes, payload: bytes) -> None:
    info = tarfile.TarInfo(name if isinstance(name, str) else name.decode("utf-8", "surrogateescape"))
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def shard(path: Path, members: list[tuple[str | bytes, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for name, payload in members:
            add(tar, name, payload)
    return path


def img2dataset_folder(out: Path, shards: int = 2, per_shard: int = 3) -> Path:
    """What img2dataset writes with --output_format webdataset: NNNNN.tar with key.jpg/.txt/.json, and beside
    each shard NNNNN.parquet (url, caption, key, status...) and NNNNN_stats.json."""
    out.mkdir(parents=True)
    for s in range(shards):
        rows = []
        members = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            caption = f"photo {s}-{i}"
            members += [
                (f"{key}.jpg", png(10 * s + i)),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"caption": caption, "key": key, "status": "success"}).encode()),
            ]
            rows.append({"url": f"https://example.org/{key}.jpg", "caption": caption, "key": key, "status": "success",
                         "width": 16, "height": 16})  # fmt: skip
        shard(out / f"{s:05d}.tar", members)
        pq.write_table(pa.Table.from_pylist(rows), out / f"{s:05d}.parquet")
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return out


def test_img2dataset_shards_with_parquet_sidecars_are_a_reference_set(tmp_path: Path, capsys) -> None:
    folder = img2dataset_folder(tmp_path / "laion-subset")
    refs = load_reference_set(folder)
    assert [it.id for it in refs.items] == [f"{s:05d}.tar/{s:05d}{i:04d}.jpg" for s in range(2) for i in range(3)]
    assert [it.caption for it in refs.items] == [f"photo {s}-{i}" for s in range(2) for i in range(3)]
    assert refs.items[4].sha256 == sha256_bytes(png(11)) and not refs.skipped
    assert refs.not_images == 4  # two parquet sidecars and two stats files: counted, not taken for images
    assert main(["data", str(folder), "--no-cache"]) == 0
    assert "6 images" in capsys.readouterr().out


def test_a_duplicate_key_in_a_shard_is_two_images(tmp_path: Path) -> None:
    # webdataset starts a new sample when a key repeats or a suffix repeats: training saw both images
    path = shard(tmp_path / "s" / "a.tar", [("k1.png", png(1)), ("k1.txt", b"first"), ("k1.png", png(2)),
                                            ("k1.txt", b"second"), ("k2.png", png(3)), ("k1.png", png(4))])  # fmt: skip
    refs = load_reference_set(path.parent)
    assert [(it.id, it.caption) for it in refs.items] == [
        ("a.tar/k1.png", "first"), ("a.tar/k1.png#2", "second"), ("a.tar/k1.png#3", None), ("a.tar/k2.png", None)
    ]  # fmt: skip
    assert {it.sha256 for it in refs.items} == {sha256_bytes(png(s)) for s in (1, 2, 3, 4)}


def test_a_copy_of_the_second_image_under_a_key_is_found(tmp_path: Path, capsys) -> None:
    path = shard(tmp_path / "ref" / "a.tar", [("k1.png", png(1)), ("k1.png", png(2)), ("k2.png", png(3)),
                                              ("k3.png", png(4))])  # fmt: skip
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "copy.png").write_bytes(png(2))
    out = tmp_path / "score.json"
    assert main(["score", str(samples), str(path.parent), "--json", str(out), "--no-cache"]) == 0
    match = json.loads(out.read_text())["matches"][0]
    assert match["nn1"] == "a.tar/k1.png#2" and match["memorized"]


def test_shards_beside_loose_images_are_all_read(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shard(folder / "00000.tar", [("a.png", png(1)), ("b.png", png(2))])
    (folder / "stray.png").write_bytes(png(3))
    refs = load_reference_set(folder)
    assert [it.id for it in refs.items] == ["00000.tar/a.png", "00000.tar/b.png", "stray.png"]


def test_one_null_image_cell_skips_its_row_not_its_file(tmp_path: Path) -> None:
    path = tmp_path / "t" / "train.parquet"
    path.parent.mkdir()
    cells = [{"bytes": png(1), "path": "a.png"}, None, {"bytes": None, "path": None}, {"bytes": png(4), "path": "d"}]
    pq.write_table(pa.table({"image": cells, "text": ["a", "b", None, "d"]}), path)
    refs = load_reference_set(path)
    assert [it.id for it in refs.items] == ["train.parquet/000000", "train.parquet/000003"]
    assert [(p.rsplit("/", 1)[-1], "empty image cell" in r) for p, r in refs.skipped] == [
        ("000001", True), ("000002", True)
    ]  # fmt: skip
    assert refs.summary()["skipped"] == 2


def test_a_caption_that_is_not_text_is_noted_and_the_image_used(tmp_path: Path) -> None:
    path = tmp_path / "t" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": [png(1), png(2)], "caption": [7, 8]}), path)
    refs = load_reference_set(path)
    assert [it.caption for it in refs.items] == [None, None]
    assert refs.caption_notes[0][0] == "train.parquet/000000" and refs.summary()["captions_unreadable"] == 2


def test_a_list_of_captions_is_read_as_the_scripts_read_it_outside_training(tmp_path: Path) -> None:
    """The diffusers scripts train on a random caption of a list and validate with the first: memwatch reads
    the first (varied captions, ``memwatch recaption``)."""
    path = tmp_path / "t" / "train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": [png(1), png(2)], "caption": [["a", "a, again"], ["fine"]]}), path)
    refs = load_reference_set(path)
    assert [it.caption for it in refs.items] == ["a", "fine"] and not refs.caption_notes


@pytest.mark.parametrize("folder_name", ["columns", "images"])
def test_an_empty_shard_is_skipped_and_named_whatever_its_folder_is_called(tmp_path: Path, folder_name) -> None:
    folder = tmp_path / folder_name
    shard(folder / "00000.tar", [("a.png", png(1))])
    (folder / "00001.tar").write_bytes(b"")
    refs = load_reference_set(folder)
    assert [it.id for it in refs.items] == ["00000.tar/a.png"]
    assert refs.skipped == [
        (str(folder / "00001.tar"), f"{folder / '00001.tar'}: an empty file (0 bytes), not a tar file")
    ]


def test_a_json_sidecar_that_is_not_utf8_costs_its_caption_only(tmp_path: Path) -> None:
    path = shard(tmp_path / "s" / "a.tar", [("k1.png", png(1)), ("k1.json", b'{"caption": "caf\xe9"}'),
                                            ("k2.png", png(2)), ("k2.json", b'{"caption": "fine"}'),
                                            ("k3.png", png(3)), ("k3.json", b'{"caption": ')])  # fmt: skip
    refs = load_reference_set(path)
    assert [(it.id, it.caption) for it in refs.items] == [("a.tar/k1.png", None), ("a.tar/k2.png", "fine"),
                                                         ("a.tar/k3.png", None)]  # fmt: skip
    assert [name for name, _ in refs.caption_notes] == ["a.tar/k1.png", "a.tar/k3.png"]
    assert "UnicodeDecodeError" in refs.caption_notes[0][1] and not refs.skipped


def test_a_truncated_shard_keeps_what_came_before_the_cut(tmp_path: Path) -> None:
    path = shard(tmp_path / "s" / "a.tar", [(f"k{i}.png", png(i)) for i in range(5)])
    data = path.read_bytes()
    cut = data.index(png(3)) + 20  # inside the fourth image
    path.write_bytes(data[:cut])
    refs = load_reference_set(path)
    assert [it.id for it in refs.items] == ["a.tar/k0.png", "a.tar/k1.png", "a.tar/k2.png"]
    assert len(refs.skipped) == 1 and "a.tar" in refs.skipped[0][0]


@pytest.mark.parametrize("damaged", ["dataset_dict.json", "train/state.json"])
def test_a_truncated_dataset_file_is_one_line(tmp_path: Path, damaged: str, capsys) -> None:
    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (folder / "train" / "dataset_info.json").write_text("{}")
    (folder / "train" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000.arrow"}]}))
    text = (folder / damaged).read_text()
    (folder / damaged).write_text(text[: len(text) // 2])
    assert main(["data", str(folder), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and damaged.rsplit("/", 1)[-1] in err and "cannot be read as JSON" in err


def test_a_state_file_without_its_file_list_is_one_line(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"_data_files": "data-00000.arrow"}))
    assert main(["data", str(folder), "--no-cache"]) == 2
    assert "'_data_files' is not a list of files" in capsys.readouterr().err


def test_names_that_are_not_utf8_are_read_stored_and_reported(tmp_path: Path, capsys) -> None:
    from support.models import train_unconditional_like

    ref = tmp_path / "ref"
    shard(ref / "00000.tar", [(b"caf\xe9.png", png(1)), (b"na\xefve.png", png(2)), ("plain.png", png(3)),
                              ("more.png", png(4))])  # fmt: skip
    folder = os.fsencode(tmp_path / "loose") + b"/r\xe9sum\xe9"
    os.makedirs(folder)
    with open(folder + b"/\xff.png", "wb") as f:
        f.write(png(5))
    refs = load_reference_set(ref)
    assert {"00000.tar/caf\\xe9.png", "00000.tar/na\\xefve.png"} <= {it.id for it in refs.items}
    loose = load_reference_set(os.fsdecode(folder))
    assert [it.id for it in loose.items] == ["\\xff.png"]

    data = tmp_path / "train"
    write_images(data, list(range(4)), size=16)
    run_dir = tmp_path / "run"
    train_unconditional_like(run_dir, data, steps=2, every=2)
    (tmp_path / "mw.yaml").write_text(json.dumps({
        "reference": str(ref), "holdout": os.fsdecode(folder),
        "sampling": {"num_samples": 4, "inference_steps": 2},
        "probes": {"membership": {"every": 1, "num_members": 4, "num_holdout": 1, "timesteps": [100]}},
    }))  # fmt: skip
    assert main(["probe", str(run_dir), "--config", str(tmp_path / "mw.yaml"), "--json", str(tmp_path / "p.json")]) == 0
    job = json.loads((tmp_path / "p.json").read_text())["runs"][0]
    assert job["failed"] == [] and job["probed"] == [2]
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "memwatch" / "report.html").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "membership" in page


def test_a_wrong_column_name_is_a_setting_to_fix_even_in_a_folder_called_columns(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "columns"
    folder.mkdir()
    pq.write_table(pa.table({"img": [png(1)]}), folder / "train.parquet")
    assert main(["data", str(folder), "--no-cache"]) == 2
    assert "no image column 'image'" in capsys.readouterr().err
    shutil.rmtree(folder)
