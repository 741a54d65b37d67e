from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.images import smooth_image, write_images

from memwatch.data.embed_cache import EmbeddingCache
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.embedders.pixel import PixelEmbedder
from memwatch.probes.regurgitation import (
    ReferenceIndex,
    RegurgitationConfig,
    memorized_evidence,
    regurgitation_probe,
)


@pytest.fixture
def index(train_dir: Path) -> ReferenceIndex:
    return ReferenceIndex(load_reference_set(train_dir), PixelEmbedder(resolution=32), None)


def _samples(train_dir: Path) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(0)
    exact = load_image(train_dir / "img003.png", 32)
    near = np.clip(smooth_image(5) / 255.0 + rng.normal(0, 0.03, (32, 32, 3)), 0, 1)
    near_t = torch.from_numpy(near).permute(2, 0, 1).float()
    unrelated = [torch.from_numpy(smooth_image(100 + i) / 255.0).permute(2, 0, 1).float() for i in range(10)]
    names = ["exact", "near"] + [f"u{i}" for i in range(10)]
    return torch.stack([exact, near_t, *unrelated]), names


def test_planted_copies_are_flagged_and_unrelated_are_not(train_dir: Path, index: ReferenceIndex) -> None:
    samples, names = _samples(train_dir)
    cfg = RegurgitationConfig(extraction_n=8)  # Carlini's n must not exceed the 12 training images
    r = regurgitation_probe(samples, index, cfg, names=names, seeds=list(range(12)))
    rows = {m["sample"]: m for m in r.matches}
    assert rows["exact"]["nn1"] == "img003.png" and rows["exact"]["d1"] < 1e-6 and rows["exact"]["ratio"] < 1e-4
    assert rows["near"]["nn1"] == "img005.png" and rows["near"]["ratio"] < 1 / 3
    for flag in ("memorized", "extracted", "copied"):
        assert rows["exact"][flag] and rows["near"][flag], flag
        assert not any(rows[f"u{i}"][flag] for i in range(10)), flag
    assert all(rows[f"u{i}"]["ratio"] > 1 / 3 for i in range(10))
    assert r.metrics["mem_fraction"] == pytest.approx(2 / 12)
    assert r.metrics["extracted_fraction"] == pytest.approx(2 / 12)
    assert r.metrics["copy_fraction"] == pytest.approx(2 / 12)
    assert r.metrics["distinct_memorized"] == 2
    assert r.metrics["sim_max"] == pytest.approx(1.0, abs=1e-6)
    assert r.metrics["sim_p50"] < r.metrics["sim_p95"] <= r.metrics["sim_max"]
    assert memorized_evidence(r) == {
        "seeds": [0, 1],
        "samples": ["exact", "near"],
        "training_ids": ["img003.png", "img005.png"],
    }


def test_duplicated_training_image_does_not_hide_a_copy(tmp_path: Path) -> None:
    train = tmp_path / "train"
    write_images(train, list(range(6)))
    (train / "dup_of_2.png").write_bytes((train / "img002.png").read_bytes())
    index = ReferenceIndex(load_reference_set(train), PixelEmbedder(resolution=32), None)
    assert len(index) == 6  # the twin counts once
    copy = load_image(train / "img002.png", 32)[None]
    r = regurgitation_probe(copy, index, RegurgitationConfig())
    assert r.matches[0]["nn1"] == "dup_of_2.png"  # first id (sorted) with that content
    assert r.matches[0]["memorized"]


def test_carlini_extraction_uses_alpha_and_n(train_dir: Path, index: ReferenceIndex) -> None:
    samples, _ = _samples(train_dir)
    cfg = RegurgitationConfig(extraction_alpha=0.5, extraction_n=4)
    r = regurgitation_probe(samples, index, cfg)
    emb = index.embedder
    d = emb.pairwise_distance(emb.embed(samples), index.embeddings).sort(dim=1).values
    want = d[:, 0] / (0.5 * d[:, :4].mean(dim=1))
    got = torch.tensor([m["extraction"] for m in r.matches])
    assert torch.allclose(got, want, atol=1e-6)


def test_extraction_is_undefined_with_fewer_than_n_training_images(train_dir: Path, index: ReferenceIndex) -> None:
    samples, _ = _samples(train_dir)
    r = regurgitation_probe(samples, index, RegurgitationConfig(extraction_n=50))
    assert np.isnan(r.metrics["extracted_fraction"])
    assert all(np.isnan(m["extraction"]) and not m["extracted"] for m in r.matches)
    assert r.metrics["mem_fraction"] == pytest.approx(2 / 12)  # the ratio test does not depend on n


def test_single_training_image_gives_undefined_ratio(tmp_path: Path) -> None:
    write_images(tmp_path / "one", [1])
    index = ReferenceIndex(load_reference_set(tmp_path / "one"), PixelEmbedder(resolution=32), None)
    r = regurgitation_probe(torch.rand(2, 3, 32, 32), index, RegurgitationConfig())
    assert all(np.isnan(m["ratio"]) and not m["memorized"] for m in r.matches)


def test_reference_embeddings_are_cached_and_reused(train_dir: Path, tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    first = ReferenceIndex(load_reference_set(train_dir), PixelEmbedder(resolution=32), cache)
    assert (first.computed, first.cached) == (12, 0)
    second = ReferenceIndex(
        load_reference_set(train_dir), PixelEmbedder(resolution=32), EmbeddingCache(tmp_path / "cache")
    )
    assert (second.computed, second.cached) == (0, 12)  # second run embeds nothing
    assert torch.equal(first.embeddings, second.embeddings)
    # A different embedder config is a different key; a changed file is a different hash.
    other = ReferenceIndex(load_reference_set(train_dir), PixelEmbedder(resolution=16), cache)
    assert other.computed == 12
    Image.fromarray(smooth_image(77)).save(train_dir / "img000.png")
    third = ReferenceIndex(load_reference_set(train_dir), PixelEmbedder(resolution=32), cache)
    assert (third.computed, third.cached) == (1, 11)


def test_cached_vectors_live_in_shards_and_a_lost_shard_is_embedded_again(
    train_dir: Path, tmp_path: Path, caplog
) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    embedder = PixelEmbedder(resolution=32)
    first = ReferenceIndex(load_reference_set(train_dir), embedder, cache)
    (shard,) = cache.shard_dir(embedder.key).glob("*.npy")  # one write, one shard: the vectors are not in SQLite
    assert np.load(shard, allow_pickle=False).shape == (12, 3 * 32 * 32)
    # a pickled .npy in its place is refused, not unpickled; its vectors are embedded again
    np.save(shard, np.array([{"x": 1}] * 12, dtype=object), allow_pickle=True)
    again = ReferenceIndex(load_reference_set(train_dir), embedder, EmbeddingCache(tmp_path / "cache"))
    assert (again.computed, again.cached) == (12, 0) and "cannot be used" in caplog.text
    assert torch.equal(first.embeddings, again.embeddings)
    shard.unlink()  # a removed shard: its rows now point at the newer one
    third = ReferenceIndex(load_reference_set(train_dir), embedder, EmbeddingCache(tmp_path / "cache"))
    assert (third.computed, third.cached) == (0, 12) and torch.equal(first.embeddings, third.embeddings)


def test_undecodable_pixels_found_while_embedding_are_skipped(tmp_path: Path) -> None:
    train = tmp_path / "train"
    write_images(train, [1, 2, 3])
    # A PNG whose structure verifies but whose pixel data is corrupt: header and CRCs fine, zlib stream bad.
    good = (train / "img003.png").read_bytes()
    bad = _corrupt_idat(good)
    (train / "img003.png").write_bytes(bad)
    refs = load_reference_set(train)
    index = ReferenceIndex(refs, PixelEmbedder(resolution=32), None)
    assert len(index) == len(refs.items)
    assert [Path(p).name for p, _ in refs.skipped] == ["img003.png"]


def _corrupt_idat(png: bytes) -> bytes:
    import struct
    import zlib

    i = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[i : i + 4])[0]
    data = bytearray(png[i + 8 : i + 8 + length])
    data[2:10] = b"\xff" * 8
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)) & 0xFFFFFFFF)
    return png[: i + 8] + bytes(data) + crc + png[i + 12 + length :]
