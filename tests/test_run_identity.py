"""Beside real diffusers runs: the right snapshots, the right schedule, each audited once.

A run of train_unconditional.py is replayed on a fake clock from saves trained here exactly as the
script writes them (its save hook, its pipeline saved after epoch 0 and every --save_model_epochs, its
pauses while it generates its own samples, checkpoint rotation, its logs), with ``memwatch watch``
beside it; scheduled ``memwatch probe`` jobs run during and after training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from diffusers import DDPMScheduler
from support.clock import ScriptedClock, copy_pipeline, copy_save, delete, touch_log
from support.images import write_images
from support.models import stage_unconditional_saves, tiny_unet

from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.frontends.jobs import probe_run_dir, watch_run_dir
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.hashing import sha256_file
from memwatch.store import Store
from memwatch.store.history import find_store, load_history
from memwatch.views.report import build_report

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("data")
    write_images(root / "train", list(range(6)), size=16)
    write_images(root / "holdout", list(range(40, 46)), size=16)
    cfg = root / "memwatch.yaml"  # as the README writes it: no run_name
    cfg.write_text(
        yaml.safe_dump(
            {
                "reference": "train",
                "holdout": "holdout",
                "probes": {
                    "membership": {"num_members": 6, "num_holdout": 6, "timesteps": [100, 400]},
                    "regurgitation": {"num_samples": 4, "inference_steps": 3, "batch_size": 4},
                },
            }
        )
    )
    return {"root": root, "train": root / "train", "config": cfg}


@pytest.fixture(scope="module")
def staged(data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train_unconditional.py, 2 steps per epoch, 6 epochs: --checkpointing_steps 5, --save_model_epochs 2
    (pipeline saves after epochs 0, 2, 4 and the last, 5: steps 2, 6, 10, 12)."""
    return stage_unconditional_saves(
        tmp_path_factory.mktemp("staged"), data["train"], steps=12, checkpoint_every=5, pipeline_steps=(2, 6, 10, 12)
    )


def _timeline(staged: Path, run_dir: Path) -> list:
    """The script's saves in time order: (seconds, action). Epoch e ends at 30 e + 10; at the epochs it
    saves, it first generates its samples for 20 s (nothing is written), then saves the pipeline;
    the logs are flushed every 15 s while it trains; --checkpoints_total_limit 1."""
    t = [(1.0, touch_log(run_dir, "start"))]
    t += [(float(s), touch_log(run_dir)) for s in range(15, 190, 15) if not 10 <= s % 60 <= 30]
    t += [
        (30.0, copy_pipeline(staged / "pipeline-2", run_dir)),  # epoch 0, after a 20 s pause
        (55.0, copy_save(staged, run_dir, "checkpoint-5")),
        (90.0, copy_pipeline(staged / "pipeline-6", run_dir)),  # epoch 2
        (115.0, delete(run_dir / "checkpoint-5")),
        (115.0, copy_save(staged, run_dir, "checkpoint-10")),
        (150.0, copy_pipeline(staged / "pipeline-10", run_dir)),  # epoch 4
        (180.0, copy_pipeline(staged / "pipeline-12", run_dir)),  # the last epoch
        (181.0, touch_log(run_dir, "end_training")),
    ]
    return t


def test_watch_follows_train_unconditional_to_its_end(data: dict, staged: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddpm"
    clock = ScriptedClock(_timeline(staged, run_dir))
    report = watch_run_dir(run_dir, load_config(data["config"]), quiet_period=5.0, poll=1.0, idle_timeout=600,
                           clock=clock.clock, sleep=clock.sleep)  # fmt: skip
    assert clock.done and clock.now > 181  # it ended only after training did
    # every checkpoint and the true final model once; the epoch-0/2/4 pipelines are not final models
    assert report.probed == [5, 10, 10] and report.failed == [] and report.rotated == []
    with Store(find_store(run_dir), readonly=True) as store:
        history = load_history(store)
    final = [s for s in history.snapshots if s["kind"] == "final"]
    assert [s["weights_sha256"] for s in final] == [sha256_file(staged / "pipeline-12" / UNET_FILE)]
    hashes = {s["weights_sha256"] for s in history.snapshots}
    for early in (2, 6):  # (the epoch-4 pipeline holds checkpoint-10's weights)
        assert sha256_file(staged / f"pipeline-{early}" / UNET_FILE) not in hashes
    assert final[0]["info"]["scheduler_source"] == "the pipeline's own scheduler/"
    # checkpoint-5 was probed, then rotated away: the report says so
    rows = {r["step"]: r for r in build_report(run_dir)["verdict"]["snapshots"] if r["kind"] == "checkpoint"}
    assert [g["status"] for g in rows[5]["sightings"]] == ["deleted"]


def test_scheduled_probe_re_audits_a_rewritten_final_model(data: dict, staged: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "ddpm"
    cfg = str(data["config"])
    copy_pipeline(staged / "pipeline-2", run_dir)()  # cron fires after epoch 0
    assert main(["probe", str(run_dir), "--config", cfg]) == 0
    copy_save(staged, run_dir, "checkpoint-5")()
    copy_pipeline(staged / "pipeline-6", run_dir)()  # the model in RUN_DIR is rewritten
    assert main(["probe", str(run_dir), "--config", cfg]) == 0
    assert main(["probe", str(run_dir), "--config", cfg]) == 0  # nothing new: nothing probed
    out = capsys.readouterr().out.splitlines()
    assert [line.split(": ", 1)[1].split(",")[:2] for line in out] == [
        ["probed 1", " already done 0"],
        ["probed 2", " already done 0"],
        ["probed 0", " already done 2"],
    ]
    report = build_report(run_dir)
    finals = [g for r in report["verdict"]["snapshots"] for g in r["sightings"] if g["kind"] == "final"]
    assert [g["status"] for g in finals] == ["superseded", "current"]
    assert "final-superseded" in {x["code"] for x in report["limitations"]}
    # one run, found again by folder and config although the config names none
    with Store(find_store(run_dir), readonly=True) as store:
        (run,) = store.runs()
    assert run["name"].startswith("ddpm@")


def test_the_final_model_equal_to_the_last_checkpoint_counts_once(data: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddpm"
    stage = stage_unconditional_saves(tmp_path / "s", data["train"], steps=4, checkpoint_every=2, pipeline_steps=(4,))
    for name in ("checkpoint-2", "checkpoint-4"):
        copy_save(stage, run_dir, name)()
    copy_pipeline(stage / "pipeline-4", run_dir)()
    rule = {"name": "twice", "type": "threshold", "metric": "membership/loss_member", "op": ">", "value": 0,
            "for": 3, "severity": "critical", "message": "three measurements"}  # fmt: skip
    config = load_config({**yaml.safe_load(data["config"].read_text()), "reference": str(data["train"]),
                          "holdout": str(data["root"] / "holdout"), "rules": [rule]})  # fmt: skip
    report = probe_run_dir(run_dir, config)
    assert report.probed == [2, 4] and report.already_done == 1
    assert report.events == []  # two measurements of distinct weights: a "for 3" rule does not fire


def test_an_ema_runs_final_model_is_audited_as_ema(data: dict, tmp_path: Path) -> None:
    stage = stage_unconditional_saves(
        tmp_path / "s", data["train"], steps=4, checkpoint_every=2, pipeline_steps=(4,), use_ema=True
    )
    settings = {**yaml.safe_load(data["config"].read_text()), "reference": str(data["train"]),
                "holdout": str(data["root"] / "holdout")}  # fmt: skip
    for weights in ("ema", "raw"):
        run_dir = tmp_path / weights
        for name in ("checkpoint-2", "checkpoint-4"):
            copy_save(stage, run_dir, name)()
        copy_pipeline(stage / "pipeline-4", run_dir)()
        report = probe_run_dir(run_dir, load_config({**settings, "weights": weights}))
        assert report.failed == []
        with Store(find_store(run_dir), readonly=True) as store:
            history = load_history(store)
        final = next(s for s in history.snapshots if any(g["kind"] == "final" for g in s["sightings"]))
        assert final["weights"] == "ema"
        if weights == "ema":  # the final pipeline holds the last unet_ema/ weights: one snapshot, seen twice
            assert report.probed == [2, 4] and report.already_done == 1
            assert final["weights_sha256"] == sha256_file(
                stage / "checkpoint-4" / "unet_ema" / "diffusion_pytorch_model.safetensors"
            )
        else:  # raw checkpoints and the EMA final: two series, never one curve
            assert report.probed == [2, 4, 4]
            assert set(history.metrics["membership/loss_member"]) == {2, 4}
            assert set(history.metrics["membership/loss_member@ema"]) == {4}


def test_a_non_default_schedule_comes_from_the_run(data: dict, tmp_path: Path) -> None:
    """Trained with --prediction_type sample --ddpm_beta_schedule squaredcos_cap_v2: the monitor and
    ``memwatch probe`` of the same weights give the same membership losses."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    stage = stage_unconditional_saves(
        tmp_path / "s", data["train"], steps=4, checkpoint_every=4, pipeline_steps=(2,), scheduler=sched
    )
    run_dir = tmp_path / "run"
    copy_pipeline(stage / "pipeline-2", run_dir)()  # the epoch-0 save: RUN_DIR/scheduler/ holds the schedule
    shutil.rmtree(run_dir / "unet")
    (run_dir / "model_index.json").unlink()  # keep only the scheduler: checkpoint-4 is what is probed
    copy_save(stage, run_dir, "checkpoint-4")()
    settings = {**yaml.safe_load(data["config"].read_text()), "reference": str(data["train"]),
                "holdout": str(data["root"] / "holdout"), "probes": {"regurgitation": {"every": 0}}}  # fmt: skip
    probe_run_dir(run_dir, load_config(settings))
    with Store(find_store(run_dir), readonly=True) as store:
        history = load_history(store)
    (snap,) = history.snapshots
    assert snap["info"]["scheduler"]["prediction_type"] == "sample" and not snap["info"]["scheduler_guessed"]
    from_probe = history.metrics["membership/loss_member"][4]

    unet = tiny_unet()
    unet.load_state_dict(
        __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(stage / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
        )
    )
    settings["probes"]["membership"] = {**settings["probes"].get("membership", {}), "every": 4}
    monitor = MemorizationMonitor(Accelerator(cpu=True), settings, output_dir=tmp_path / "live")
    monitor.step(4, unet, sched)
    monitor.close()
    with Store(find_store(tmp_path / "live"), readonly=True) as store:
        from_monitor = load_history(store).metrics["membership/loss_member"][4]
    assert from_probe == pytest.approx(from_monitor, rel=1e-6)
    # the default schedule (what memwatch used to assume) gives another loss: the schedule matters
    guessed = {**settings, "scheduler": None}
    shutil.rmtree(run_dir / "scheduler")
    shutil.rmtree(run_dir / "memwatch")
    probe_run_dir(run_dir, load_config(guessed))
    with Store(find_store(run_dir), readonly=True) as store:
        history = load_history(store)
    assert history.snapshots[0]["info"]["scheduler_guessed"]
    assert history.metrics["membership/loss_member"][4] != pytest.approx(from_probe, rel=1e-3)
    assert "schedule-guessed" in {x["code"] for x in build_report(run_dir)["limitations"]}


def test_rotation_while_loading_is_skipped_not_failed(data: dict, staged: Path, tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "ddpm"
    copy_save(staged, run_dir, "checkpoint-5")()
    copy_save(staged, run_dir, "checkpoint-10")()
    import memwatch.frontends.jobs.prober as jobs

    real = jobs.load_snapshot

    def rotate_then_load(path, **kw):  # --checkpoints_total_limit deletes the folder as it is loaded
        if Path(path).name == "checkpoint-5":
            shutil.rmtree(path)
        return real(path, **kw)

    monkeypatch.setattr(jobs, "load_snapshot", rotate_then_load)
    report = probe_run_dir(run_dir, load_config(data["config"]))
    assert report.rotated == [str(run_dir / "checkpoint-5")] and report.failed == [] and report.probed == [10]
    summary = json.dumps(report.to_dict())
    assert "huggingface" not in summary
