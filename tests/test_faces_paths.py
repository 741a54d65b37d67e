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


def test_the_monitor_draws_the_path_between_two_people_it_reproduces(setting, tmp_path: Path) -> None:
    """A model that has memorized two faces and nothing between them (the optimal denoiser of the two, which
    samples one face or the other even at a softer posterior: tried down to 1/30) snaps on the path."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from support.demo_run import MemorizingDenoiser

    from memwatch import MemorizationMonitor
    from memwatch.store import STORE_NAME, Store

    _, _, photos, boxes = setting
    root = tmp_path / "train"
    root.mkdir()
    chips, lines = [], []
    for name, person, weight in ((A, "barack_obama", 1.0), (B, "joe_biden", 0.0)):  # aligned as a model would learn
        chip = aligned_morph(photos[A], boxes[A], photos[B], boxes[B], weight=weight, size=64)
        chip.save(root / f"{name}.png")
        chips.append(pil_tensor(chip))
        lines.append(f'{{"path": "{name}.png", "identity": "{person}"}}\n')
    (root / "train.jsonl").write_text("".join(lines))
    refs = load_reference_set(root / "train.jsonl")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = MemorizingDenoiser(torch.stack(chips), scheduler)  # it has memorized both faces, and nothing else
    settings = {
        "sampling": {"every": 1, "num_samples": 8, "inference_steps": 4, "batch_size": 8},
        "probes": {"membership": {"every": 0}, "identity": {"every": 1, "matcher": "dlib", "paths": 1}},
        "cadence": {"adaptive": False},
    }
    out = tmp_path / "mw"
    with MemorizationMonitor(Accelerator(cpu=True), settings, reference=refs, output_dir=out) as monitor:
        monitor.step(1, model, scheduler)
    with Store(out / STORE_NAME, readonly=True) as store:
        run = store.runs()[0]["id"]
        metrics = {m["metric"]: m["value"] for m in store.metrics(run) if m["probe"] == "identity"}
        rows = [it for it in store.items(run) if it["probe"] == "identity_paths"]
        events = [e["rule"] for e in store.events(run)]
    assert metrics["identities_leaked"] == 2 and metrics["path_pairs"] == 1
    assert len(rows) == 9 and rows[0]["t"] == 0 and rows[-1]["t"] == 1
    assert rows[0]["sim_a"] > 0.99 and rows[-1]["sim_b"] > 0.99  # the ends are the samples that reproduce each
    assert metrics["path_pairs_snapping"] == 1 and metrics["path_pairs_blending"] == 0 and metrics["path_mmpmr"] == 0
    assert {r["path_kind"] for r in rows} == {"snap"} and metrics["path_face_rate"] == 1
    sims = [r["sim_a"] - r["sim_b"] for r in rows]  # A, then B: one switch, no face passing as both
    assert sum(1 for x, y in zip(sims, sims[1:], strict=False) if (x > 0) != (y > 0)) == 1
    assert "first-identity-path-blend" not in events and "first-identity-leak" in events
