"""``memwatch exclude``: for a script memwatch does not run, a training folder without the images at risk, the
checkpoint to resume from, and the change on the run's record. A real monitor run, a real store, real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from support.demo_run import MemorizingDenoiser
from support.images import write_images
from support.models import tiny_unet

from memwatch import MemorizationMonitor
from memwatch.cli import main
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.store import STORE_NAME, Store

SIZE = 16
SETTINGS = {
    "sampling": {"every": 4, "num_samples": 8, "inference_steps": 4, "batch_size": 8},
    "probes": {"membership": {"every": 0}},
    "cadence": {"adaptive": False},
}


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A run that copies one training image from step 5 on, with checkpoints beside it; the imagefolder has
    captions in metadata.jsonl and one caption side file. Returns (run folder, training folder, ids at risk)."""
    root = tmp_path_factory.mktemp("exclude")
    train = root / "train"
    write_images(train, list(range(6)), size=SIZE)
    names = sorted(p.name for p in train.glob("*.png"))
    rows = [{"file_name": n, "text": f"photo {i}"} for i, n in enumerate(names)]
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (train / names[2].replace(".png", ".txt")).write_text("photo 2, again")
    refs = load_reference_set(train)
    run = root / "run"
    for step in (3, 9):  # as --checkpointing_steps would leave them: one before the warning, one after
        (run / f"checkpoint-{step}").mkdir(parents=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with MemorizationMonitor(Accelerator(cpu=True), SETTINGS, reference=refs, output_dir=run / "memwatch") as monitor:
        for step in range(1, 5):
            monitor.step(step, tiny_unet(SIZE), scheduler)
        only = torch.stack([load_image(refs.items[2].path, SIZE)] * 4)
        for step in range(5, 9):
            monitor.step(step, MemorizingDenoiser(only, scheduler), scheduler)
        assert monitor.first_alarm_step == 8 and monitor.last_clean_step == 4
        at_risk = [r["training_id"] for r in monitor.session.images_at_risk(most=None)]
    assert names[2] in at_risk
    return run, train, at_risk


def test_the_new_folder_leaves_out_the_images_at_risk_and_says_where_to_resume(watched, tmp_path, capsys) -> None:
    run, train, at_risk = watched
    before = {p: p.read_bytes() for p in train.iterdir()}
    out = tmp_path / "train-kept"
    assert main(["exclude", str(run), "--out", str(out), "--most", "1"]) == 0
    printed = capsys.readouterr().out
    kept = sorted(p.name for p in out.iterdir())
    expected = sorted(p.name for p in train.iterdir() if p.name not in at_risk and p.stem + ".png" not in at_risk)
    assert kept == expected  # the images at risk and their caption side file are gone, the rest is there
    rows = [json.loads(line)["file_name"] for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert rows == [n for n in sorted(p.name for p in train.glob("*.png")) if n not in at_risk]
    assert {p: p.read_bytes() for p in train.iterdir()} == before  # the original folder is untouched
    image = next(p for p in out.glob("*.png"))
    assert os.path.samefile(image, train / image.name)  # hard links: no space used
    assert f"--resume_from_checkpoint {run / 'checkpoint-3'}" in printed and "saved by the last clean step" in printed
    # the reference set memwatch reads from the new folder is the old one minus the images at risk
    assert sorted(load_reference_set(out).ids) == sorted(set(load_reference_set(train).ids) - set(at_risk))
    with Store(run / "memwatch" / STORE_NAME, readonly=True) as store:
        run_id = store.runs()[0]["id"]
        (row,) = store.interventions(run_id)
        events = [e for e in store.events(run_id) if e["rule"] == "intervention-exclude"]
    assert row["kind"] == "exclude" and row["step"] == 3 and sorted(row["images"]) == sorted(at_risk)
    assert row["detail"]["resume_from"] == str(run / "checkpoint-3") and row["detail"]["matched_by"] == "step"
    assert len(events) == 1 and events[0]["severity"] == "info"


def test_the_share_most_caps_what_is_left_out(watched, tmp_path, capsys) -> None:
    run, train, at_risk = watched
    out = tmp_path / "one"
    assert main(["exclude", str(run), "--out", str(out), "--most", "0.2"]) == 0  # 20% of 6 images: 1
    assert len(list(train.glob("*.png"))) - len(list(out.glob("*.png"))) == 1
    assert "left out 1 image(s) at risk of 6" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--out", "{train}/inside"], "lies inside the training folder"),
        (["--out", "{tmp}/o", "--most", "0"], "--most 0.0"),
        (["--out", "{tmp}/o", "--reference", "{tmp}/nowhere"], "nowhere"),
        (["--out", "{tmp}/o", "--reference", "{tmp}/other"], "give the folder the run watched"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(watched, tmp_path, capsys, args, says) -> None:
    run, train, _ = watched
    write_images(tmp_path / "other", [10, 11], size=SIZE, prefix="another")  # a folder the run did not watch
    argv = ["exclude", str(run), *(a.format(train=train, tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (train / "inside").exists()


def test_a_metadata_csv_in_a_subfolder_loses_only_the_rows_of_the_images_left_out(tmp_path: Path) -> None:
    from memwatch.interventions.filtered_folder import write_filtered_folder

    sub = tmp_path / "train" / "faces"
    write_images(sub, [0, 1, 2], size=SIZE)
    (sub / "metadata.csv").write_text('file_name,text\nimg000.png,"a face, smiling"\nimg001.png,b\nimg002.png,c\n')
    done = write_filtered_folder(tmp_path / "train", tmp_path / "kept", ["faces/img001.png"])
    csv_text = (tmp_path / "kept" / "faces" / "metadata.csv").read_text()
    assert csv_text == 'file_name,text\nimg000.png,"a face, smiling"\nimg002.png,c\n'
    assert done.left_out == ["faces/img001.png"] and done.rows_left_out == 1 and done.files == 3


def test_recaption_keeps_the_images_and_gives_those_at_risk_varied_captions(watched, tmp_path, capsys) -> None:
    run, train, at_risk = watched
    out = tmp_path / "train-varied"
    assert main(["recaption", str(run), "--out", str(out), "--variants", "4"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in train.iterdir())  # nothing left out
    before = {json.loads(line)["file_name"]: line for line in (train / "metadata.jsonl").read_text().splitlines()}
    for line in (out / "metadata.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["file_name"] in at_risk:  # the original caption first, then 3 variants of it
            original = json.loads(before[row["file_name"]])["text"]
            assert len(row["text"]) == 4 and row["text"][0] == original and len(set(row["text"])) == 4
            assert all(set(original.split()) <= set(v.split()) for v in row["text"])
        else:
            assert line == before[row["file_name"]]  # every other row as it was, byte for byte
    # memwatch (and the scripts, outside training) read the first caption: the same set, the same captions
    old, new = load_reference_set(train), load_reference_set(out)
    assert [(it.id, it.caption) for it in new.items] == [(it.id, it.caption) for it in old.items]
    assert f"--resume_from_checkpoint {run / 'checkpoint-3'}" in printed and "varied the captions of" in printed
    with Store(run / "memwatch" / STORE_NAME, readonly=True) as store:
        run_id = store.runs()[0]["id"]
        rows = [r for r in store.interventions(run_id) if r["kind"] == "recaption"]
        events = [e for e in store.events(run_id) if e["rule"] == "intervention-recaption"]
    assert len(rows) == 1 and sorted(rows[0]["images"]) == sorted(at_risk) and len(events) == 1
    assert rows[0]["detail"]["variants"] == 4 and set(rows[0]["detail"]["captions"]) == set(at_risk)


def test_recaption_of_captions_in_a_csv_is_one_line_and_exit_2(watched, tmp_path, capsys) -> None:
    run, train, at_risk = watched
    csv_train = tmp_path / "csv-train"
    csv_train.mkdir()
    for p in train.glob("*.png"):
        (csv_train / p.name).write_bytes(p.read_bytes())
    names = sorted(p.name for p in train.glob("*.png"))
    (csv_train / "metadata.csv").write_text(
        "file_name,text\n" + "".join(f"{n},photo {i}\n" for i, n in enumerate(names))
    )
    assert main(["recaption", str(run), "--out", str(tmp_path / "o"), "--reference", str(csv_train)]) == 2
    err = capsys.readouterr().err.strip()
    assert "metadata.csv" in err and "metadata.jsonl" in err and len(err.splitlines()) == 1
