import json
from pathlib import Path

import pytest
from PIL import Image
from support.images import smooth_image, write_images

from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file


def test_folder_is_recursive_sorted_and_hashed(tmp_path: Path) -> None:
    write_images(tmp_path / "a", [1, 2])
    write_images(tmp_path / "b" / "deep", [3])
    (tmp_path / "notes.txt").write_text("not an image")
    refs = load_reference_set(tmp_path)
    assert refs.ids == ["a/img001.png", "a/img002.png", "b/deep/img003.png"]
    assert refs.items[0].sha256 == sha256_file(tmp_path / "a" / "img001.png")
    assert refs.skipped == []
    # The manifest hash is stable and changes when a file changes.
    h = refs.manifest_sha256
    assert load_reference_set(tmp_path).manifest_sha256 == h
    Image.fromarray(smooth_image(99)).save(tmp_path / "a" / "img001.png")
    assert load_reference_set(tmp_path).manifest_sha256 != h


def test_imagefolder_metadata_captions(tmp_path: Path) -> None:
    write_images(tmp_path / "train", [1, 2])
    rows = [{"file_name": "img001.png", "text": "a red square"}, {"file_name": "img002.png", "text": "a dog"}]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    refs = load_reference_set(tmp_path)
    assert [(it.id, it.caption) for it in refs.items] == [
        ("train/img001.png", "a red square"),
        ("train/img002.png", "a dog"),
    ]


def test_jsonl_manifest_ids_captions_identities(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "imgs", [1, 2])
    manifest = tmp_path / "set.jsonl"
    manifest.write_text(
        json.dumps({"path": "imgs/img001.png", "caption": "c1", "identity": "alice", "id": "x1"})
        + "\n\n"
        + json.dumps({"path": str(paths[1].resolve()), "identity": "bob"})
        + "\n"
    )
    refs = load_reference_set(manifest)
    # An absolute path inside the manifest's folder still gets a relative id.
    assert [(it.id, it.caption, it.identity) for it in refs.items] == [
        ("imgs/img002.png", None, "bob"),
        ("x1", "c1", "alice"),
    ]


def test_undecodable_image_is_reported_and_counted(tmp_path: Path) -> None:
    write_images(tmp_path, [1, 2])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    good = (tmp_path / "img002.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    refs = load_reference_set(tmp_path)
    assert refs.ids == ["img001.png", "img002.png"]
    assert sorted(Path(p).name for p, _ in refs.skipped) == ["broken.png", "truncated.png"]
    assert all("cannot decode" in reason for _, reason in refs.skipped)
    assert refs.summary()["skipped"] == 2


def test_empty_and_missing_sets_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemwatchError, match=r"empty has no usable image"):
        load_reference_set(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("nope")
    with pytest.raises(MemwatchError, match=r"1 file\(s\) could not be decoded"):
        load_reference_set(tmp_path / "bad")
    with pytest.raises(MemwatchError, match="does not exist"):
        load_reference_set(tmp_path / "nowhere")


def test_bad_manifest_line_names_file_and_line(tmp_path: Path) -> None:
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.png"}\n{oops\n')
    with pytest.raises(MemwatchError, match=r"m.jsonl:2: not valid JSON"):
        load_reference_set(m)


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    paths = write_images(tmp_path, [1, 2])
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps({"path": p.name, "id": "same"}) for p in paths))
    with pytest.raises(MemwatchError, match="id 'same' is used by both"):
        load_reference_set(m)


def test_normalisation_rule_mixed_sizes_and_modes(tmp_path: Path) -> None:
    base = Image.fromarray(smooth_image(5, 64))
    base.save(tmp_path / "rgb.png")
    # A wider image with the same centre square: resize shorter side, centre-crop -> same content.
    wide = Image.new("RGB", (96, 64), (0, 0, 0))
    wide.paste(base, (16, 0))
    wide.save(tmp_path / "wide.png")
    base.convert("L").save(tmp_path / "grey.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(0)
    rgba.save(tmp_path / "transparent.png")
    a = load_image(tmp_path / "rgb.png", 32)
    assert a.shape == (3, 32, 32) and 0 <= float(a.min()) and float(a.max()) <= 1
    # Same centre content; only the two edge columns feel the resampling kernel reach into the black border.
    assert (load_image(tmp_path / "wide.png", 32) - a)[:, :, 2:-2].abs().max() < 0.02
    grey = load_image(tmp_path / "grey.png", 32)
    assert grey.shape == (3, 32, 32) and (grey[0] == grey[1]).all()
    # Fully transparent composites onto white.
    assert float(load_image(tmp_path / "transparent.png", 32).min()) == 1.0


def test_unchanged_files_are_not_read_again(tmp_path: Path, monkeypatch) -> None:
    import os
    import time

    files = write_images(tmp_path / "d", [0, 1, 2], size=8)
    old = time.time_ns() - 3600 * 10**9
    for p in files:  # written an hour ago: old enough to be remembered (the racy-git rule)
        os.utime(p, ns=(old, old))
    first = load_reference_set(tmp_path / "d")
    reads: list[Path] = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or read_bytes(self))
    assert load_reference_set(tmp_path / "d").manifest_sha256 == first.manifest_sha256
    assert reads == []  # every hash came from the cache
    Image.fromarray(smooth_image(9, 8)).save(files[1])  # changed now: read and hashed again
    changed = load_reference_set(tmp_path / "d")
    assert reads == [files[1]] and changed.items[1].sha256 == sha256_file(files[1])
    load_reference_set(tmp_path / "d")  # modified within the last 2 s: not trusted yet, read again
    assert reads == [files[1], files[1]]
    assert load_reference_set(tmp_path / "d", hash_cache=False).manifest_sha256 == changed.manifest_sha256
