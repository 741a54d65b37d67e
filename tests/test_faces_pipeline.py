"""The identity probe end to end on real images, with InceptionResnetV1 weights this test writes itself.

The weights are facenet-pytorch's InceptionResnetV1 at a fixed random initialisation, with its last
batch-norm re-centred on a few LFW face crops (a random network otherwise maps every face to nearly
the same direction). They are saved with safetensors and loaded through the real local-file path;
a ``.pt`` copy in a temporary torch hub cache checks the cache lookup. Nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data
from support.faces import face_state_dict, resize_square, rgb_tensor

from memwatch.data.embed_cache import EmbeddingCache
from memwatch.data.images import load_image, tensor_to_pil
from memwatch.data.refset import load_reference_set
from memwatch.errors import MemwatchError
from memwatch.faces import FaceMatcher, IdentityConfig, build_gallery, identity_probe, load_face_pipeline
from memwatch.faces.embed import weights_file_name

pytest.importorskip("facenet_pytorch", reason="the identity probe needs facenet-pytorch (memwatch[faces])")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return face_state_dict()


@pytest.fixture(scope="module")
def weights(state_dict: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "irv1-test.safetensors"
    save_file(state_dict, str(path))
    return path


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """64 px test images: astronaut portraits (two framings, one mirrored), LFW faces, a coffee cup."""
    photo = resize_square(rgb_tensor(data.astronaut()), 256)
    lfw = data.lfw_subset()
    return {
        "portrait": resize_square(photo[:, 5:95, 68:158], 64),
        "wide": resize_square(photo[:, 0:110, 58:168], 64),
        "mirrored": resize_square(photo[:, 5:95, 68:158].flip(-1), 64),
        "lfw00": resize_square(rgb_tensor(lfw[0]), 64),
        "lfw05": resize_square(rgb_tensor(lfw[5]), 64),
        "lfw50": resize_square(rgb_tensor(lfw[50]), 64),
        "lfw60": resize_square(rgb_tensor(lfw[60]), 64),
        "coffee": resize_square(rgb_tensor(data.coffee()), 64),
    }


@pytest.fixture
def manifest(tmp_path: Path, images: dict[str, torch.Tensor]) -> Path:
    rows = [
        ("eileen/portrait.png", "portrait", "eileen"),
        ("eileen/wide.png", "wide", "eileen"),
        ("lfw/00.png", "lfw00", "lfw-00"),
        ("lfw/05.png", "lfw05", "lfw-05"),
        ("objects/coffee.png", "coffee", None),
    ]
    lines = []
    for rel, key, identity in rows:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        tensor_to_pil(images[key]).save(tmp_path / rel)
        lines.append(json.dumps({"path": rel, **({"identity": identity} if identity else {})}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.jsonl"


def test_identity_probe_end_to_end(weights: Path, manifest: Path, images: dict, tmp_path: Path) -> None:
    config = IdentityConfig(matcher="vggface2", weights=str(weights), reference_resolution=64)
    pipeline = load_face_pipeline(config)
    cache = EmbeddingCache(tmp_path / "cache")
    gallery = build_gallery(load_reference_set(manifest), pipeline, config, cache=cache)

    assert gallery.source == "labels" and gallery.identities == ["eileen", "lfw-00", "lfw-05"]
    assert gallery.stats["items"] == 5 and gallery.stats["faces"] == 4 and gallery.stats["no_face"] == 1
    assert gallery.stats["computed"] == 5 and gallery.stats["cached"] == 0
    assert {"item": "objects/coffee.png", "identity": None, "face": False} in gallery.assignments
    assert {"item": "eileen/wide.png", "identity": "eileen", "face": True} in gallery.assignments
    assert not gallery.calibration.calibrated  # 5 impostor pairs cannot resolve FMR 1e-4

    # The training image as the model saw it, a mirrored portrait (not in training), no face, noise.
    samples = torch.stack(
        [
            load_image(manifest.parent / "eileen/portrait.png", 64),
            images["mirrored"],
            images["coffee"],
            torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)),
        ]
    )
    result = identity_probe(samples, gallery, config, names=["copy", "mirror", "cup", "noise"], seeds=[7, 8, 9, 10])
    items = {it["sample"]: it for it in result.items}
    assert result.probe == "identity"
    assert [it["seed"] for it in result.items] == [7, 8, 9, 10]
    # Training and generated faces go through the same detect-crop-embed path: a copy matches itself.
    copy = items["copy"]
    assert copy["face_found"] and copy["identity"] == "eileen" and copy["identity_item"] == "eileen/portrait.png"
    assert copy["similarity"] > 0.999 and copy["leak"]
    assert items["mirror"]["face_found"] and items["mirror"]["identity"] == "eileen"
    assert not items["cup"]["face_found"] and items["cup"]["identity"] is None and not items["cup"]["leak"]
    assert not items["noise"]["face_found"]
    assert result.metrics["face_detection_rate"] == 0.5 and result.metrics["faces_found"] == 2
    assert result.metrics["threshold_calibrated"] == 0.0
    assert set(result.timings) == {"detection", "embedding", "matching"}

    # Second build: every training embedding comes from the cache (no-face images included).
    again = build_gallery(load_reference_set(manifest), pipeline, config, cache=cache)
    assert again.stats["computed"] == 0 and again.stats["cached"] == 5
    assert torch.equal(again.embeddings, gallery.embeddings)


def test_holdout_gives_the_leak_baseline(weights: Path, manifest: Path, images: dict, tmp_path: Path) -> None:
    config = IdentityConfig(matcher="vggface2", weights=str(weights), reference_resolution=64)
    holdout_dir = tmp_path / "holdout"
    holdout_dir.mkdir()
    for key in ("lfw50", "lfw60", "coffee"):
        tensor_to_pil(images[key]).save(holdout_dir / f"{key}.png")
    gallery = build_gallery(
        load_reference_set(manifest), load_face_pipeline(config), config, holdout=load_reference_set(holdout_dir)
    )
    assert gallery.stats["holdout_items"] == 3 and gallery.stats["holdout_faces"] == 2
    result = identity_probe(images["portrait"][None], gallery, config)
    m = result.metrics
    assert m["identity_leak_baseline"] == gallery.holdout_leak_rate
    assert m["identity_leak_excess"] == pytest.approx(m["identity_leak_rate"] - m["identity_leak_baseline"])


def test_weights_from_the_torch_hub_cache_match_the_safetensors_file(
    weights: Path, state_dict: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """facenet-pytorch's release .pt (with its classifier head) found in $TORCH_HOME/checkpoints."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "checkpoints" / weights_file_name("vggface2")
    cached.parent.mkdir(parents=True)
    release = dict(state_dict, **{"logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)})
    torch.save(release, cached)
    from_cache = FaceMatcher(IdentityConfig(matcher="vggface2"))
    from_file = FaceMatcher(IdentityConfig(matcher="vggface2", weights=str(weights)))
    assert from_cache.weights_path == cached
    crops = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(from_cache.embed(crops), from_file.embed(crops), atol=1e-6)
    assert from_cache.spec() != from_file.spec()  # different files, different cache keys


def test_missing_weights_offline_fail_fast_with_the_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))

    def no_network(*args, **kwargs):
        raise AssertionError("memwatch tried to download weights without identity.download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    for matcher in ("vggface2", "casia-webface"):
        start = time.perf_counter()
        with pytest.raises(MemwatchError) as err:
            load_face_pipeline(IdentityConfig(matcher=matcher))
        assert time.perf_counter() - start < 5.0
        message = str(err.value)
        assert weights_file_name(matcher) in message and "identity.weights" in message
        assert "identity.download" in message and "\n" not in message
    with pytest.raises(MemwatchError, match="missing.safetensors does not exist"):
        load_face_pipeline(IdentityConfig(matcher="vggface2", weights=str(tmp_path / "missing.safetensors")))


def test_unreadable_or_unfitting_weights_are_user_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(MemwatchError, match="cannot read face matcher weights file"):
        FaceMatcher(IdentityConfig(matcher="vggface2", weights=str(garbage)))
    other = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(MemwatchError, match="does not fit InceptionResnetV1"):
        FaceMatcher(IdentityConfig(matcher="vggface2", weights=str(other)))
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": Image.new("RGB", (1, 1))}, pickled)  # not loadable with weights_only=True
    with pytest.raises(MemwatchError, match="cannot read face matcher weights file"):
        FaceMatcher(IdentityConfig(matcher="vggface2", weights=str(pickled)))
