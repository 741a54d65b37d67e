"""The identity probe with the real offline matcher (dlib) on the real portraits of ``assets/faces``.

Nothing is downloaded: dlib comes from ``dlib-bin`` and its model files from ``face_recognition_models``
(both in ``memwatch[faces]``). The portraits' sources are in ``assets/faces/LICENSE.md``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support.faces import PORTRAITS, aligned_morph, pil_tensor, plain_average, portrait, small_copy

pytest.importorskip("dlib", reason="the dlib matcher needs dlib-bin (pip install 'memwatch[faces]')")
pytest.importorskip("facenet_pytorch", reason="face detection needs facenet-pytorch (pip install 'memwatch[faces]')")

from memwatch.cli import main  # noqa: E402
from memwatch.faces import IdentityConfig, load_face_pipeline  # noqa: E402
from memwatch.faces.dlib_matcher import DESCRIPTOR_FILE, cosine_threshold, dlib_available, find_model_dir  # noqa: E402
from memwatch.hashing import sha256_file  # noqa: E402

pytestmark = pytest.mark.skipif(
    not dlib_available(), reason=f"face_recognition_models ({DESCRIPTOR_FILE}) is not installed"
)
FACES = Path(__file__).resolve().parents[1] / "assets" / "faces"


@pytest.fixture(scope="module")
def pipeline():
    return load_face_pipeline(IdentityConfig(matcher="dlib"))


@pytest.fixture(scope="module")
def faces(pipeline) -> dict:
    """Each portrait: its image, detected box and unit embedding."""
    names = list(PORTRAITS)
    images = [portrait(n) for n in names]
    out = pipeline.embed_images([pil_tensor(im) for im in images])
    assert out.found.all(), "every portrait has a face"
    return {
        n: {"image": im, "box": det.box, "embedding": e}
        for n, im, det, e in zip(names, images, out.detections, out.embeddings, strict=True)
    }


def test_auto_picks_dlib_and_records_its_weights(pipeline) -> None:
    assert IdentityConfig().resolved_matcher == "dlib"  # installed: the default matcher
    spec = pipeline.spec()
    assert spec["matcher"] == "dlib" and spec["weights_file"] == DESCRIPTOR_FILE
    assert spec["weights_sha256"] == sha256_file(find_model_dir(None) / DESCRIPTOR_FILE)
    assert pipeline.matcher.threshold == pytest.approx(0.907, abs=1e-3) == cosine_threshold()


def test_two_photos_of_one_person_verify_and_two_people_do_not(faces, pipeline) -> None:
    t = pipeline.matcher.threshold
    names = list(faces)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sim = float(faces[a]["embedding"] @ faces[b]["embedding"])
            same = PORTRAITS[a] == PORTRAITS[b]
            assert (sim >= t) == same, (a, b, sim)


def _manifest(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True)
    for n in names:
        shutil.copy(FACES / f"{n}.jpg", folder / f"{n}.jpg")
    rows = [json.dumps({"path": f"{n}.jpg", "identity": PORTRAITS[n]}) for n in names]
    (folder / "faces.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "faces.jsonl"


def test_score_names_copies_blends_and_strangers(faces, tmp_path: Path, capsys) -> None:
    # the gallery: two people, two photos each; Eileen Collins is not in it
    manifest = _manifest(tmp_path / "train", ["obama_2012_official", "obama_blue_room", "biden_2013_official",
                                              "biden_blue_room"])  # fmt: skip
    samples = tmp_path / "samples"
    samples.mkdir()
    f = faces
    # 64 px images whose face is about 32 px wide, shifted by a few pixels
    small_copy(f["obama_2012_official"]["image"], f["obama_2012_official"]["box"]).save(samples / "copy_obama.png")
    small_copy(f["biden_blue_room"]["image"], f["biden_blue_room"]["box"], shift=(-2, 2)).save(
        samples / "copy_biden.png"
    )
    morph = aligned_morph(
        f["obama_2012_official"]["image"],
        f["obama_2012_official"]["box"],
        f["biden_2013_official"]["image"],
        f["biden_2013_official"]["box"],
    )
    morph.save(samples / "blend.png")
    small_copy(f["collins_astronaut"]["image"], f["collins_astronaut"]["box"]).save(samples / "stranger.png")
    # measured: a pixel average of two unaligned photos verifies as one parent only (not a blend)
    plain_average(f["obama_2012_official"]["image"], f["biden_2013_official"]["image"]).save(samples / "average.png")
    out = tmp_path / "score.json"
    args = ["score", str(samples), str(manifest), "--identity", "--matcher", "dlib", "--json", str(out)]
    assert main(args) == 0
    doc = json.loads(out.read_text())["identity"]
    rows = {r["sample"]: r for r in doc["items"]}
    assert set(rows) == {"copy_obama.png", "copy_biden.png", "blend.png", "stranger.png", "average.png"}
    assert rows["copy_obama.png"]["leak"] and rows["copy_obama.png"]["identity"] == "barack_obama"
    assert rows["copy_biden.png"]["leak"] and rows["copy_biden.png"]["identity"] == "joe_biden"
    assert not rows["copy_obama.png"]["interpolation"] and not rows["copy_biden.png"]["interpolation"]
    blend = rows["blend.png"]
    assert blend["interpolation"] and not blend["leak"], blend
    assert (blend["parent_a"], blend["parent_b"]) == ("barack_obama", "joe_biden")
    assert not rows["stranger.png"]["leak"] and not rows["stranger.png"]["interpolation"]
    assert rows["average.png"]["leak"] and not rows["average.png"]["interpolation"]
    assert rows["average.png"]["identity"] == "barack_obama"
    m = doc["metrics"]
    assert m["identities_leaked"] == 2 and m["identity_interpolations"] == 1  # Obama (copy, average), Biden
    # 2 people: too few impostor pairs to calibrate; dlib's documented threshold, said so
    assert doc["threshold"]["threshold_calibrated"] == 0 and doc["threshold"]["threshold_source"] == "fallback"
    assert doc["threshold"]["threshold"] == pytest.approx(cosine_threshold())
    assert doc["matcher"]["matcher"] == "dlib" and all(r["matcher"] == "dlib" for r in doc["items"])
    assert all(r["matcher_weights_sha256"] == doc["matcher"]["weights_sha256"] for r in doc["items"])
    # the same samples from a DreamBooth run on Obama: his faces are its purpose, Biden's copy still leaks, the
    # morph of the two is still a blend
    assert main([*args, "--instance", "barack_obama"]) == 0
    doc = json.loads(out.read_text())["identity"]
    rows = {r["sample"]: r for r in doc["items"]}
    assert rows["copy_obama.png"]["instance"] and not rows["copy_obama.png"]["leak"]
    assert rows["copy_biden.png"]["leak"] and rows["blend.png"]["interpolation"]
    m = doc["metrics"]
    assert m["instance_faces"] == 2 and m["identities_leaked"] == 1 and m["identity_interpolations"] == 1
    capsys.readouterr()
    assert main([*args, "--instance", "obama"]) == 2  # a name that is no training identity: one line
    err = capsys.readouterr().err.strip()
    assert "probes.identity.instance names 'obama', which is no training identity" in err and "\n" not in err


def test_the_faces_demo_runs_its_recipe_with_the_identity_probe(tmp_path: Path) -> None:
    """`memwatch demo --faces`, cut to 100 steps (one probe): the crops, labels, gallery and identity metrics."""
    from memwatch.demo.run import FACES_CROPS, people_leaked, run_demo
    from memwatch.store import Store

    out = tmp_path / "demo-faces"
    summary = run_demo(faces=True, steps=100, output_dir=out)
    meta = [json.loads(line) for line in (out / "data" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == FACES_CROPS * len(PORTRAITS)
    assert {m["identity"] for m in meta} == set(PORTRAITS.values())
    assert summary["last_step"] == 100 and not summary["failed_probes"]
    with Store(Path(summary["store"]), readonly=True) as store:
        run = store.runs()[0]["id"]
        metrics = {(m["probe"], m["metric"]): m["value"] for m in store.metrics(run)}
    assert metrics[("identity_gallery", "identities")] == 3 and metrics[("identity_gallery", "faces")] == 20
    assert metrics[("identity", "identity_threshold")] == pytest.approx(cosine_threshold())
    assert ("identity", "leak_onset") in metrics
    assert summary["people"] == people_leaked(Path(summary["store"]))  # 100 steps: nobody yet
