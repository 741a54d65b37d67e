"""memwatch canaries as a careless or hostile user runs it: it never writes into the training folder, leaves a
complete planted copy and manifest or none, names what it could not copy, refuses a damaged manifest in one
line, and says it cannot tell when the run was not trained on the planted folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate import Accelerator
from support.images import write_images
from support.models import train

from memwatch.cli import main
from memwatch.frontends.monitor import MemorizationMonitor

ROOT = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    write_images(tmp_path / "train", list(range(8)), size=16)
    return tmp_path / "train"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memwatch: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("out", ["train/planted", "train/sub/planted", "train/../train/planted"])
def test_plant_never_writes_inside_its_reference(ref: Path, tmp_path: Path, out: str, capsys) -> None:
    before = listing(ref)
    assert main(["canaries", "plant", str(ref), str(tmp_path / out)]) == 2
    assert "inside REFERENCE" in one_line_error(capsys) and listing(ref) == before


def test_plant_never_writes_its_manifest_inside_its_reference(ref: Path, tmp_path: Path, capsys) -> None:
    before = listing(ref)
    args = ["canaries", "plant", str(ref), str(tmp_path / "planted"), "--manifest", str(ref / "canaries.json")]
    assert main(args) == 2
    assert "--manifest" in one_line_error(capsys) and listing(ref) == before and not (tmp_path / "planted").exists()


def test_an_out_that_cannot_be_created_leaves_nothing(ref: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["canaries", "plant", str(ref), str(tmp_path / "a-file" / "planted")]) == 2
    one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "train"]


FULL_DISK = textwrap.dedent(
    """
    import resource, sys
    from memwatch.cli import main
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
    sys.exit(main(["canaries", "plant", sys.argv[1], sys.argv[2]]))
    """
)


def test_a_full_disk_leaves_no_half_planted_folder(ref: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.py"
    job.write_text(FULL_DISK)
    limit = min(p.stat().st_size for p in ref.iterdir()) - 1  # no image fits: the copy fails at once
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(job), str(ref), str(tmp_path / "planted"), str(limit)],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nothing was left behind" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.py", "train"]


def test_a_dangling_link_in_the_source_is_named_not_fatal(ref: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone.png", ref / "link.png")
    assert main(["canaries", "plant", str(ref), str(tmp_path / "planted"), "--levels", "2"]) == 0
    doc = json.loads((tmp_path / "planted-canaries.json").read_text())
    assert [s["path"].rsplit("/", 1)[-1] for s in doc["skipped"]] == ["link.png"]
    assert "dangling symbolic link" in doc["skipped"][0]["reason"]
    assert len(list((tmp_path / "planted").rglob("*.png"))) == 8 + 1


@pytest.mark.parametrize("field", ["id", "copies", "copy_ids", "folder"])
def test_a_manifest_missing_a_field_is_one_line(ref: Path, tmp_path: Path, field: str, capsys) -> None:
    assert main(["canaries", "plant", str(ref), str(tmp_path / "planted"), "--levels", "2"]) == 0
    path = tmp_path / "planted-canaries.json"
    doc = json.loads(path.read_text())
    if field == "folder":
        del doc["folder"]
    else:
        del doc["canaries"][0][field]
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["canaries", "check", str(tmp_path), str(path)]) == 2
    assert repr(field) in one_line_error(capsys)


def test_check_on_a_run_not_trained_on_the_planted_folder_cannot_tell(ref: Path, tmp_path: Path, capsys) -> None:
    assert main(["canaries", "plant", str(ref), str(tmp_path / "planted"), "--levels", "2"]) == 0
    acc = Accelerator(cpu=True)
    config = {"sampling": {"every": 2, "num_samples": 4, "inference_steps": 2}, "probes": {"membership": {"every": 0}}}
    out = tmp_path / "run"
    with MemorizationMonitor(acc, config, reference=ref, output_dir=out / "memwatch") as monitor:  # the original
        train(acc, ref, 2, monitor=monitor)
    capsys.readouterr()
    assert main(["canaries", "check", str(out), str(tmp_path / "planted-canaries.json")]) == 2
    err = one_line_error(capsys)
    assert "cannot tell" in err and "not the planted folder" in err
