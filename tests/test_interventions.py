"""Interventions (memwatch.interventions): each follows what the monitor found, each is on the record, and none
stops training when it fails. Real monitors, real stores, a real accelerate loop with save_state/load_state."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from support.demo_run import MemorizingDenoiser
from support.images import write_images
from support.models import tiny_unet
from support.schema import schema_errors

from memwatch import MemorizationMonitor
from memwatch.core.probe import Probe, ProbeContext, ProbeResult, ProbeSettings
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.hashing import state_sha256
from memwatch.interventions import ImageWeights, LossGate, VariedCaptions, rollback
from memwatch.store import STORE_NAME, Store
from memwatch.views.report import build_report, render_html

SIZE = 16
SAMPLING = {
    "sampling": {"every": 4, "num_samples": 8, "inference_steps": 4, "batch_size": 8},
    "probes": {"membership": {"every": 0}},
    "cadence": {"adaptive": False},
}


def _stored(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with Store(out / STORE_NAME, readonly=True) as store:
        run = store.runs()[0]["id"]
        return store.interventions(run), store.events(run)


def test_the_weights_and_the_sampler_follow_the_images_at_risk(tmp_path: Path) -> None:
    write_images(tmp_path / "train", list(range(6)), size=SIZE)
    refs = load_reference_set(tmp_path / "train")
    ids = [it.id for it in refs.items]
    copied = ids[2]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with MemorizationMonitor(Accelerator(cpu=True), SAMPLING, reference=refs, output_dir=tmp_path / "mw") as monitor:
        weights = ImageWeights(monitor, ids)
        capped = ImageWeights(monitor, ids, most=0.1)  # a share of 6 images that rounds to none
        sampler = weights.sampler(60, generator=torch.Generator().manual_seed(0))
        model = tiny_unet(SIZE)
        for step in range(1, 5):  # a model still learning: nothing copied, no warning
            monitor.step(step, model, scheduler)
            assert not weights.update()
        assert monitor.first_alarm_step is None
        assert torch.equal(weights.weights, torch.ones(6, dtype=torch.float64))
        assert set(sampler) == set(range(6))
        # a model that has memorized one image: every sample copies it
        only = torch.stack([load_image(refs.items[2].path, SIZE)] * 4)
        for step in range(5, 9):
            monitor.step(step, MemorizingDenoiser(only, scheduler), scheduler)
            weights.update()
            assert not capped.update()
        assert monitor.first_alarm_step == 8
    assert weights.reweighted == [copied]
    assert weights.weights.tolist() == [0.0 if i == copied else 1.0 for i in ids]
    assert weights.of([2, 3]).tolist() == [0.0, 1.0]
    drawn = list(sampler)
    assert len(drawn) == 60 and set(drawn) == {0, 1, 3, 4, 5}
    rows, events = _stored(tmp_path / "mw")
    done = [(r["step"], r["images"], r["error"]) for r in rows if r["images"]]
    assert done == [(8, [copied], None)]
    (held,) = [r for r in rows if not r["images"]]  # the capped weights: held back, once, unchanged
    assert held["detail"]["held_back"] == [copied] and held["error"] is None and not held["images"]
    assert torch.equal(capped.weights, torch.ones(6, dtype=torch.float64))
    assert [e["rule"] for e in events if e["rule"].startswith("intervention")] == ["intervention-reweight"] * 2


def test_varied_captions_follow_the_images_at_risk(tmp_path: Path) -> None:
    write_images(tmp_path / "train", list(range(6)), size=SIZE)
    refs = load_reference_set(tmp_path / "train")
    ids = [it.id for it in refs.items]
    texts = [f"a photo of thing {i}, red, smooth" for i in range(6)]
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with MemorizationMonitor(Accelerator(cpu=True), SAMPLING, reference=refs, output_dir=tmp_path / "mw") as monitor:
        captions = VariedCaptions(monitor, ids, texts, variants=4)
        for step in range(1, 5):  # nothing at risk yet: every example keeps its caption
            monitor.step(step, tiny_unet(SIZE), scheduler)
            assert not captions.update()
            assert captions.of(range(6), random.Random(step)) == texts
        only = torch.stack([load_image(refs.items[2].path, SIZE)] * 4)
        for step in range(5, 9):
            monitor.step(step, MemorizingDenoiser(only, scheduler), scheduler)
            captions.update()
    assert list(captions.varied) == [2] and captions.varied[2][0] == texts[2] and len(set(captions.varied[2])) == 4
    drawn = [captions.of([2, 3], random.Random(k)) for k in range(40)]
    assert {d[1] for d in drawn} == {texts[3]}  # the others as written
    assert {d[0] for d in drawn} == set(captions.varied[2])  # the image at risk: any of its captions
    assert drawn == [captions.of([2, 3], random.Random(k)) for k in range(40)]  # the same seed, the same captions
    assert torch.equal(captions.weights, torch.ones(6, dtype=torch.float64))  # nothing dropped
    rows, events = _stored(tmp_path / "mw")
    (row,) = rows
    assert row["kind"] == "recaption" and row["step"] == 8 and row["images"] == [ids[2]]
    assert row["detail"]["captions"] == {ids[2]: captions.varied[2]} and row["error"] is None
    assert [e["rule"] for e in events if e["rule"].startswith("intervention")] == ["intervention-recaption"]
    with pytest.raises(ValueError, match="captions for"):
        VariedCaptions(monitor, ids, texts[:3])


def test_duplicates_weigh_as_one_image_from_the_first_step(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "train", list(range(5)), size=SIZE)
    shutil.copy(paths[1], tmp_path / "train" / "again.png")  # an exact duplicate under another name
    refs = load_reference_set(tmp_path / "train")
    ids = [it.id for it in refs.items]
    config = {**SAMPLING, "sampling": {"every": 0}}
    with MemorizationMonitor(Accelerator(cpu=True), config, reference=refs, output_dir=tmp_path / "mw") as monitor:
        weights = ImageWeights(monitor, ids, at_risk=None, duplicates=True)
        assert not weights.update()  # no step seen yet: the model's resolution is not known
        monitor.step(1, tiny_unet(SIZE), DDPMScheduler(num_train_timesteps=1000))
        assert weights.update()
        assert not weights.update()  # made once
    pair = {"again.png", paths[1].name}
    assert weights.weights.tolist() == [0.5 if i in pair else 1.0 for i in ids]
    rows, _ = _stored(tmp_path / "mw")
    assert [(r["kind"], r["step"], sorted(r["images"])) for r in rows] == [("duplicates", 1, sorted(pair))]


def test_the_loss_gate_skips_examples_far_below_their_timesteps_mean(tmp_path: Path) -> None:
    write_images(tmp_path / "train", list(range(3)), size=SIZE)
    with MemorizationMonitor(Accelerator(cpu=True), SAMPLING, reference=tmp_path / "train",
                             output_dir=tmp_path / "mw") as monitor:  # fmt: skip
        gate = LossGate(monitor, num_train_timesteps=1000, buckets=2, warmup=4, record_every=10)
        t = torch.tensor([100, 200, 700, 800])
        for step in range(1, 3):  # warm-up: low timesteps lose 1.0, high ones 0.1
            assert gate(torch.tensor([1.0, 1.0, 0.1, 0.1]), t, ["a", "b", "c", "d"], step).tolist() == [1.0] * 4
        # far below the low bucket's mean is gated; the same loss at a high timestep is that bucket's normal
        losses = torch.tensor([0.2, 1.1, 0.1, 0.09], requires_grad=True)
        w = gate(losses, t, ["a", "b", "c", "d"], 3)
        assert w.tolist() == [0.0, 1.0, 1.0, 1.0] and not w.requires_grad
        assert gate(torch.tensor([0.3, 0.9, 0.1, 0.1]), t, ["e", "b", "c", "d"], 4).tolist() == [0.0, 1.0, 1.0, 1.0]
        gate.close(5)
    assert gate.gated == 2 and gate.examples == 16
    rows, _ = _stored(tmp_path / "mw")
    assert [(r["kind"], r["step"], r["images"]) for r in rows] == [("loss-gate", 3, ["a"]), ("loss-gate", 5, ["e"])]
    assert rows[1]["detail"]["gated_total"] == 2


class StepProbe(Probe):
    """A sampling-free probe whose metric is the step: its rule warns from a known step on."""

    name = "steps"
    Settings = ProbeSettings
    metrics = ("step",)
    default_rules = (
        {"name": "step-reached", "type": "first", "metric": "steps/step", "op": ">=", "value": 6,
         "severity": "warning", "source": "a test", "message": "step {step}"},
    )  # fmt: skip

    def compute(self, ctx: ProbeContext) -> list[dict[str, Any]]:
        return []

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult:
        return ProbeResult(self.name, {"step": float(ctx.step)})


def _train_until_warning(tmp_path: Path, save_at: tuple[int, ...]) -> tuple[Any, ...]:
    """Train a tiny UNet 6 steps under a monitor whose rule warns at step 6, saving state at ``save_at``."""
    write_images(tmp_path / "train", list(range(4)), size=SIZE)
    run_dir = tmp_path / "run"
    acc = Accelerator(cpu=True)
    config = {"sampling": {"every": 0}, "probes": {"membership": {"every": 0}}, "cadence": {"adaptive": False}}
    monitor = MemorizationMonitor(acc, config, reference=tmp_path / "train", output_dir=run_dir / "memwatch",
                                  probes=[StepProbe(every=2)])  # fmt: skip
    torch.manual_seed(0)
    model = tiny_unet(SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    data = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    saved = {}
    for step in range(1, 7):
        noise = torch.randn_like(data)
        t = torch.randint(0, 1000, (4,))
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(data, noise, t), t).sample, noise)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.step(step, model, scheduler)
        if step in save_at:
            acc.save_state(str(run_dir / f"checkpoint-{step}"))
            saved[step] = (state_sha256(acc.unwrap_model(model)), optimizer.state_dict()["state"][0]["exp_avg"].clone())
    return acc, monitor, model, optimizer, run_dir, saved


def test_a_rollback_restores_the_last_clean_checkpoint_and_records_it(tmp_path: Path) -> None:
    acc, monitor, model, optimizer, run_dir, saved = _train_until_warning(tmp_path, save_at=(2, 4))
    assert (monitor.first_alarm_step, monitor.last_clean_step) == (6, 4)
    assert state_sha256(acc.unwrap_model(model)) != saved[4][0]
    assert rollback(acc, monitor, model, run_dir) == 4
    assert state_sha256(acc.unwrap_model(model)) == saved[4][0]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved[4][1])
    monitor.close()
    rows, events = _stored(run_dir / "memwatch")
    (row,) = rows
    assert (row["kind"], row["step"], row["error"]) == ("rollback", 6, None)
    assert row["detail"]["checkpoint_step"] == 4 and row["detail"]["matches_probed_weights"] is True
    assert row["detail"]["weights_sha256"] == saved[4][0]
    assert "intervention-rollback" in [e["rule"] for e in events]
    # the audit report lists it, valid against its schema, and shows it on the page
    report = build_report(run_dir)
    assert schema_errors(report) == []
    assert [(i["step"], i["kind"], i["error"]) for i in report["interventions"]] == [(6, "rollback", None)]
    html = render_html(report)
    assert 'id="interventions"' in html and "checkpoint-4" in html


def test_an_intervention_that_fails_never_stops_training(tmp_path: Path) -> None:
    acc, monitor, model, _, run_dir, _ = _train_until_warning(tmp_path, save_at=(6,))  # no clean checkpoint
    before = state_sha256(acc.unwrap_model(model))
    assert rollback(acc, monitor, model, run_dir) is None
    assert state_sha256(acc.unwrap_model(model)) == before  # nothing restored
    gate = LossGate(monitor, warmup=1)
    w = gate(torch.ones(3), torch.tensor([1, 2]))  # one timestep short: the gate fails, training goes on
    assert w.tolist() == [1.0, 1.0, 1.0]
    assert gate(torch.full((2,), 0.01), torch.tensor([1, 2])).tolist() == [1.0, 1.0]  # stays off
    monitor.close()
    rows, _ = _stored(run_dir / "memwatch")
    assert [r["kind"] for r in rows] == ["rollback", "loss-gate"]
    assert "no checkpoint" in rows[0]["error"] and "one per example" in rows[1]["error"]


def test_weights_reject_a_weight_outside_zero_to_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at_risk=2"):
        ImageWeights(object(), ["a"], at_risk=2)
