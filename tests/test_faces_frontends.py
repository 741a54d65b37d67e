"""The identity probe through every front-end: the in-training monitor, `memwatch probe`, `memwatch score`.

Matcher weights are written by the test (see facemodels.py); the training set is a JSONL manifest of
real faces (scikit-image's public-domain astronaut photo and its LFW subset) with identity labels.
"""

import json
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from safetensors.torch import save_file
from skimage import data
from support.faces import face_state_dict, resize_square, rgb_tensor
from support.models import train, train_unconditional_like

from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.data.images import tensor_to_pil
from memwatch.frontends.jobs import probe_run_dir
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.store import Store
from memwatch.views.curves import write_curves

pytest.importorskip("facenet_pytorch", reason="the identity probe needs facenet-pytorch (memwatch[faces])")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faces")
    save_file(face_state_dict(), str(root / "irv1.safetensors"))
    photo = resize_square(rgb_tensor(data.astronaut()), 256)
    lfw = data.lfw_subset()
    images = {
        "eileen/portrait.png": (resize_square(photo[:, 5:95, 68:158], 32), "eileen"),
        "eileen/wide.png": (resize_square(photo[:, 0:110, 58:168], 32), "eileen"),
        "lfw/00.png": (resize_square(rgb_tensor(lfw[0]), 32), "lfw-00"),
        "lfw/05.png": (resize_square(rgb_tensor(lfw[5]), 32), "lfw-05"),
    }
    lines = []
    for rel, (img, identity) in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        tensor_to_pil(img).save(root / rel)
        lines.append(json.dumps({"path": rel, "identity": identity}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "samples").mkdir()
    (root / "samples" / "copy_of_portrait.png").write_bytes((root / "eileen/portrait.png").read_bytes())
    tensor_to_pil(resize_square(rgb_tensor(data.coffee()), 32)).save(root / "samples" / "cup.png")
    cfg = {
        "reference": "train.jsonl",
        "run_name": "faces",
        "probes": {
            "membership": {"every": 0},
            "regurgitation": {"every": 4, "num_samples": 4, "inference_steps": 3, "batch_size": 4},
            "identity": {"every": 4, "weights": "irv1.safetensors"},
        },
    }
    (root / "memwatch.yaml").write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": root / "memwatch.yaml", "weights": root / "irv1.safetensors"}


def _identity_rows(store_path: Path) -> dict:
    with Store(store_path) as store:
        run = store.runs()[0]["id"]
        metrics = {(m["step"], m["probe"], m["metric"]): m["value"] for m in store.metrics(run)}
        items = store.items(run)
    return {"metrics": metrics, "items": items}


def test_identity_probe_in_the_monitor_and_curves(faces, tmp_path: Path) -> None:
    acc = Accelerator(cpu=True)
    out = tmp_path / "mw"
    config = load_config(faces["config"])
    with MemorizationMonitor(acc, config, output_dir=out) as monitor:
        train(acc, faces["root"] / "eileen", 8, monitor=monitor)
    rows = _identity_rows(out / "memwatch.sqlite")
    for step in (4, 8):
        assert 0.0 <= rows["metrics"][(step, "identity", "face_detection_rate")] <= 1.0
        assert (step, "identity", "identity_leak_rate") in rows["metrics"]
        assert (step, "identity", "leak_onset") in rows["metrics"]  # the leak forecast runs with every probe
    # every identity row names the matcher and the sha256 of its weights
    sample_rows = [it for it in rows["items"] if it["probe"] == "identity"]
    assert sample_rows and all(it["matcher"] == "vggface2" and len(it["matcher_weights_sha256"]) == 64
                               for it in sample_rows)  # fmt: skip
    # The gallery (who is who, and the threshold used) is recorded once, with the first identity probe.
    gallery = [it for it in rows["items"] if it["probe"] == "identity_gallery"]
    assert sorted((g["item"], g["identity"]) for g in gallery) == [
        ("eileen/portrait.png", "eileen"),
        ("eileen/wide.png", "eileen"),
        ("lfw/00.png", "lfw-00"),
        ("lfw/05.png", "lfw-05"),
    ]
    assert rows["metrics"][(4, "identity_gallery", "threshold_calibrated")] == 0.0  # 4 faces: fallback
    header = (write_curves(out)["metrics.csv"]).read_text().splitlines()[0]
    assert "identity/identity_leak_rate" in header and "identity/face_detection_rate" in header


def test_identity_probe_on_checkpoint_folders(faces, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_unconditional_like(run_dir, faces["root"] / "eileen", steps=4, every=4)
    report = probe_run_dir(run_dir, load_config(faces["config"]))
    assert report.failed == [] and report.probed == [4] and report.already_done == 1  # final == checkpoint-4
    rows = _identity_rows(run_dir / "memwatch" / "memwatch.sqlite")
    assert (4, "identity", "identity_interpolation_rate") in rows["metrics"]


def test_score_with_identity_flags_a_copied_face(faces, tmp_path: Path) -> None:
    out = tmp_path / "score.json"
    args = [
        "score",
        str(faces["root"] / "samples"),
        str(faces["root"] / "train.jsonl"),
        "--identity",
        "--face-weights",
        str(faces["weights"]),
        "--json",
        str(out),
        "--resolution",
        "32",
    ]
    assert main(args) == 0
    doc = json.loads(out.read_text())["identity"]
    items = {it["sample"]: it for it in doc["items"]}
    assert items["copy_of_portrait.png"]["leak"] and items["copy_of_portrait.png"]["identity"] == "eileen"
    assert not items["cup.png"]["face_found"] and not items["cup.png"]["leak"]
    assert doc["metrics"]["identities_leaked"] == 1.0
