"""Canaries: planted duplicates are found by `memwatch data`, and a run on the planted copy says when
each was first at risk and first copied (a real monitor and store; the model sharpens from a blur
towards the data it memorizes, duplicates included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from support.demo_run import MemorizingDenoiser
from support.images import write_images

from memwatch.cli import main
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.frontends.canaries import check_canaries, plant_canaries
from memwatch.frontends.monitor import MemorizationMonitor

SIZE = 16
MONITOR = {
    "probes": {
        "membership": {"every": 0},
        "regurgitation": {"every": 1, "num_samples": 16, "inference_steps": 8, "batch_size": 16},
        "forecast": {"every": 1},
    },
    "cadence": {"adaptive": False},
}


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, dict]:
    write_images(tmp_path / "train", list(range(10)), size=SIZE)
    doc = plant_canaries(tmp_path / "train", tmp_path / "planted", levels=(2, 8), seed=1)
    return tmp_path / "planted", doc


def test_plant_writes_byte_copies_and_a_manifest_beside_the_folder(planted: tuple[Path, dict], tmp_path: Path) -> None:
    folder, doc = planted
    assert json.loads((tmp_path / "planted-canaries.json").read_text()) == doc
    assert [c["copies"] for c in doc["canaries"]] == [2, 8]
    for c in doc["canaries"]:
        original = (folder / c["id"]).read_bytes()
        assert all((folder / i).read_bytes() == original for i in c["copy_ids"])
    assert len(load_reference_set(folder)) == 10 + 1 + 7
    # memwatch data finds exactly the planted groups
    out = tmp_path / "data.json"
    assert main(["data", str(folder), "--json", str(out), "--no-cache", "--resolution", str(SIZE)]) == 0
    groups = {frozenset(g["ids"]) for g in json.loads(out.read_text())["duplicate_groups"] if g["kind"] == "exact"}
    assert groups == {frozenset([c["id"], *c["copy_ids"]]) for c in doc["canaries"]}


def test_the_most_duplicated_canary_is_caught_first(planted: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    folder, doc = planted
    refs = load_reference_set(folder)
    data = torch.stack([load_image(it.path, SIZE) for it in refs.items])  # duplicates weigh as often as they occur
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    out = tmp_path / "run"
    torch.manual_seed(0)
    with MemorizationMonitor(Accelerator(cpu=True), MONITOR, reference=folder, output_dir=out / "memwatch") as mon:
        for step in range(1, 13):  # the posterior sharpens: a model learning its data, then memorizing it
            mon.step(step, MemorizingDenoiser(data, scheduler, sharpness=1e-5 * 3.0**step), scheduler)
    result = check_canaries(out, tmp_path / "planted-canaries.json")
    by_copies = {c["copies"]: c for c in result["canaries"]}
    x8, x2, others = by_copies[8], by_copies[2], result["others"]
    # the higher the duplication, the earlier: x8 before x2 before the median other image
    assert None not in (x8["first_copy_step"], x2["first_copy_step"], others["median_first_copy_step"])
    assert x8["first_copy_step"] < x2["first_copy_step"] <= others["median_first_copy_step"]
    assert x8["first_at_risk_step"] <= x8["first_copy_step"] and x2["first_at_risk_step"] <= x2["first_copy_step"]
    assert others["images"] >= others["copied"] >= 1
    assert main(["canaries", "check", str(out), str(tmp_path / "planted-canaries.json")]) == 0
    assert f"canary {x8['id']} (x8): first at risk step" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["canaries", "plant", "/no/such", "{tmp}/x"], "REFERENCE /no/such is not a folder"),
        (["canaries", "plant", "{tmp}/train", "{tmp}/train"], "exists: give a new folder"),
        (["canaries", "plant", "{tmp}/train", "{tmp}/y", "--levels", "1"], "levels must be >= 2"),
        (["canaries", "check", "{tmp}", "{tmp}/missing.json"], "MANIFEST"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, argv: list[str], message: str, capsys) -> None:
    write_images(tmp_path / "train", list(range(3)), size=SIZE)
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
