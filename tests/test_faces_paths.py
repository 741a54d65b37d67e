"""The identity path (memwatch.faces.paths) with the real offline matcher on real portraits: a sequence of faces
from one training person to another that snaps is told apart from one that passes through blends.

The sequences are made from the bundled portraits (``assets/faces``), not by a model: landmark-aligned morphs
(tests/support/faces.py) at the mixing weights a path would pass through.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.faces import aligned_morph, pil_tensor, portrait

pytest.importorskip("dlib", reason="the dlib matcher needs dlib-bin (pip install 'memwatch[faces]')")
pytest.importorskip("facenet_pytorch", reason="face detection needs facenet-pytorch (pip install 'memwatch[faces]')")

from memwatch.data.refset import load_reference_set  # noqa: E402
from memwatch.faces import IdentityConfig, build_gallery, load_face_pipeline  # noqa: E402
from memwatch.faces.dlib_matcher import DESCRIPTOR_FILE, dlib_available  # noqa: E402
from memwatch.faces.paths import path_profile, similarities_to, slerp_noise  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dlib_available(), reason=f"face_recognition_models ({DESCRIPTOR_FILE}) is not installed"
)
FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"
A, B = "obama_2012_official", "biden_2013_official"
BLEND = [i / 8 for i in range(9)]  # a model that interpolates: every mixture on the way
SNAP = [0.0, 0.0, 0.03, 0.06, 0.94, 0.97, 1.0, 1.0, 1.0]  # a model that knows two faces and nothing between


@pytest.fixture(scope="module")
def setting():
    config = IdentityConfig(matcher="dlib")
    pipeline = load_face_pipeline(config)
    gallery = build_gallery(load_reference_set(FACES / "faces.jsonl"), pipeline, config)
    photos = {n: portrait(n) for n in (A, B)}
    boxes = {n: pipeline.embed_images([pil_tensor(photos[n])]).detections[0].box for n in (A, B)}
    return pipeline, gallery, photos, boxes


def _profile(setting, weights_of_b: list[float], size: int = 128) -> dict:
    pipeline, gallery, photos, boxes = setting
    images = [pil_tensor(aligned_morph(photos[A], boxes[A], photos[B], boxes[B], weight=1 - w, size=size))
              for w in weights_of_b]  # fmt: skip
    out = pipeline.embed_images(images)
    sim_a = similarities_to(out.embeddings, out.found, gallery, "barack_obama")
    sim_b = similarities_to(out.embeddings, out.found, gallery, "joe_biden")
    return path_profile(sim_a, sim_b, threshold=gallery.threshold)


def test_a_path_through_blends_and_a_path_that_snaps_are_told_apart(setting) -> None:
    blend, snap = _profile(setting, BLEND), _profile(setting, SNAP)
    assert blend["faces"] == snap["faces"] == 9  # every point a detected face
    assert blend["kind"] == "blend" and blend["both"] >= 1  # some mixture passes as both people
    assert snap["kind"] == "snap" and snap["both"] == 0 and snap["switch_at"] == 4
    assert snap["sharpness"] > 0.5 > blend["sharpness"]  # one step carries the change, or many share it
    assert blend["closeness"] >= setting[1].threshold > snap["closeness"]


def test_the_noise_path_keeps_its_ends_and_a_typical_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    path = slerp_noise(a, b, 9)
    assert torch.equal(path[0], a) or torch.allclose(path[0], a, atol=1e-6)
    assert torch.allclose(path[-1], b, atol=1e-6)
    norms = path.flatten(1).norm(dim=1)
    assert float(norms.min()) > 0.95 * min(a.norm(), b.norm())  # a straight line would dip to ~0.71 of it
