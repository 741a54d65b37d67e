"""memwatch probe and watch when training writes, rotates and ends under them: a checkpoint probed while it was
still being written is probed again once its files change, and a watch always ends with the final model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.clock import ScriptedClock, copy_save
from support.watching import job_config, staged_run
from support.watching import watch as _watch

import memwatch.frontends.jobs.prober as prober_mod
from memwatch.core.config import load_config
from memwatch.frontends.jobs import probe_run_dir

CONFIG = Path("unet") / "config.json"


@pytest.fixture
def data(tmp_path: Path) -> dict:
    return job_config(tmp_path)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return staged_run(tmp_path_factory.mktemp("staged"))


def half_written(staged: Path, run_dir: Path, name: str):
    """A save still being written by a slow file system: every file is there and the weights are whole (so it
    looks complete), but the model's config.json is cut short, so loading it fails."""

    def act() -> None:
        copy_save(staged, run_dir, name)()
        config = run_dir / name / CONFIG
        config.write_text(config.read_text()[:40])

    return act


def finish_writing(staged: Path, run_dir: Path, name: str):
    return lambda: shutil.copy2(staged / name / CONFIG, run_dir / name / CONFIG)


def test_a_checkpoint_probed_while_written_is_probed_again_once_complete(data, staged, tmp_path: Path) -> None:
    run_dir = tmp_path / "slow"
    clock = ScriptedClock(
        [
            (10.0, half_written(staged["run"], run_dir, "checkpoint-2")),  # quiet for longer than quiet_period
            (25.0, finish_writing(staged["run"], run_dir, "checkpoint-2")),
            (30.0, copy_save(staged["run"], run_dir, "checkpoint-4")),
            (40.0, copy_save(staged["run"], run_dir)),
        ]
    )
    report = _watch(run_dir, load_config(data["config"]), clock, quiet_period=3.0, poll=1.0, idle_timeout=60)
    assert [f["step"] for f in report.failed] == [2]  # the half-written save, recorded as failed
    assert 2 in report.probed and 4 in report.probed  # ... and probed again once complete


def test_a_failed_checkpoint_whose_files_do_not_change_is_not_tried_again(data, staged, tmp_path: Path) -> None:
    run_dir = tmp_path / "broken"
    clock = ScriptedClock(
        [(10.0, half_written(staged["run"], run_dir, "checkpoint-2")), (30.0, copy_save(staged["run"], run_dir))]
    )
    report = _watch(run_dir, load_config(data["config"]), clock, quiet_period=3.0, poll=1.0, idle_timeout=60)
    assert [f["step"] for f in report.failed] == [2] and report.probed == [2]  # [2]: the final model's step


def test_memwatch_probe_probes_a_failed_snapshot_again_once_its_files_change(data, staged, tmp_path: Path) -> None:
    run_dir = tmp_path / "cron"
    half_written(staged["run"], run_dir, "checkpoint-2")()
    first = probe_run_dir(run_dir, load_config(data["config"]))
    assert [f["step"] for f in first.failed] == [2] and first.probed == []
    finish_writing(staged["run"], run_dir, "checkpoint-2")()
    second = probe_run_dir(run_dir, load_config(data["config"]))
    assert second.probed == [2] and second.failed == []


def test_a_checkpoint_rotated_away_while_probed_still_ends_with_the_final_model(
    data, staged, tmp_path: Path, monkeypatch
) -> None:
    run_dir = tmp_path / "rot"
    real = prober_mod.load_snapshot

    def rotate_while_probed(path, **kw):  # --checkpoints_total_limit removes it while memwatch holds it
        snap = real(path, **kw)
        if Path(path).name == "checkpoint-4":
            shutil.rmtree(path)
        return snap

    monkeypatch.setattr(prober_mod, "load_snapshot", rotate_while_probed)
    clock = ScriptedClock(
        [
            (10.0, copy_save(staged["run"], run_dir, "checkpoint-2")),
            (20.0, copy_save(staged["run"], run_dir, "checkpoint-4")),
            (30.0, copy_save(staged["run"], run_dir, "checkpoint-8")),
            (40.0, copy_save(staged["run"], run_dir)),
        ]
    )
    report = _watch(run_dir, load_config(data["config"]), clock, quiet_period=3.0, poll=1.0, idle_timeout=60)
    assert report.probed == [2, 4, 8] and report.already_done == 1  # the final model is checkpoint-8's weights


def test_the_idle_timeout_ends_with_the_model_saved_last(data, staged, tmp_path: Path) -> None:
    run_dir = tmp_path / "idle"
    # the final model is saved, and the run folder is then silent: the watch stops on its idle timeout
    # before its end-of-training rule would (end_quiet longer than idle_timeout), with the final model
    clock = ScriptedClock([(5.0, copy_save(staged["run"], run_dir, "checkpoint-2")),
                           (10.0, copy_save(staged["run"], run_dir))])  # fmt: skip
    report = _watch(run_dir, load_config(data["config"]), clock, quiet_period=3.0, poll=1.0, idle_timeout=20,
                    end_quiet=500)  # fmt: skip
    assert report.probed == [2, 2] and clock.now < 60  # checkpoint-2, then the final model (new weights)
