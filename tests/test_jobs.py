"""memwatch probe / watch on checkpoint folders written as diffusers' train_unconditional.py writes them."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.clock import ScriptedClock, copy_save, delete
from support.models import train_unconditional_like
from support.watching import job_config, staged_run, watch

from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.frontends.jobs import discover_snapshots, probe_run_dir, run_lock
from memwatch.store import Store


@pytest.fixture
def data(tmp_path: Path) -> dict:
    return job_config(tmp_path)


def _metrics(run_dir: Path) -> dict:
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        run = store.runs()[0]["id"]
        return {(m["step"], m["kind"], m["probe"], m["metric"]): m["value"] for m in store.metrics(run)}


def _ok_results(run_dir: Path) -> list[tuple]:
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        runs = store.runs()  # empty until the job has recorded its run
        rows = store.results(runs[0]["id"]) if runs else []
    return sorted((r["step"], r["kind"], r["probe"]) for r in rows if r["status"] == "ok")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return staged_run(tmp_path_factory.mktemp("staged"))


_watch = watch


def test_probe_twice_and_watch_give_the_same_metrics(data, staged, tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    config = load_config(data["config"])
    saves = [(10.0 * k, copy_save(staged["run"], watched, f"checkpoint-{2 * k}")) for k in (1, 2, 3, 4)]
    clock = ScriptedClock([*saves, (50.0, copy_save(staged["run"], watched))])
    # started before training created its folder; ends on its own after the final model
    report = _watch(watched, config, clock, quiet_period=3.0, poll=1.0, idle_timeout=60)
    # the final pipeline holds checkpoint-8's weights: seen again, not measured twice
    assert sorted(report.probed) == [2, 4, 6, 8] and report.already_done == 1 and clock.now < 100

    probed = tmp_path / "probed"
    shutil.copytree(watched, probed, ignore=shutil.ignore_patterns("memwatch"))
    assert main(["probe", str(probed), "--config", str(data["config"])]) == 0
    first = _metrics(probed)
    assert {k[:2] for k in first} == {(s, "checkpoint") for s in (2, 4, 6, 8)}
    report = probe_run_dir(probed, config)  # second run is a no-op
    assert report.probed == [] and report.already_done == 5
    assert _metrics(probed) == first
    assert _metrics(watched) == first  # watch and probe record the same metrics
    assert not any(p.name.startswith("checkpoint") for p in (probed / "memwatch").rglob("*"))


def test_rotation_while_watching(data, staged, tmp_path: Path) -> None:
    run_dir = tmp_path / "rot"
    config = load_config(data["config"])
    # --checkpoints_total_limit 1: each save deletes the one before. checkpoint-4 lives 1 s, less than the
    # quiet period, so it is deleted before it could be probed; the others are probed.
    actions = [(10.0, copy_save(staged["run"], run_dir, "checkpoint-2"))]
    for t, old, new in ((20.0, 2, 4), (21.0, 4, 6), (30.0, 6, 8)):
        actions += [
            (t, delete(run_dir / f"checkpoint-{old}")),
            (t, copy_save(staged["run"], run_dir, f"checkpoint-{new}")),
        ]
    clock = ScriptedClock([*actions, (40.0, copy_save(staged["run"], run_dir))])
    report = _watch(run_dir, config, clock, quiet_period=3.0, poll=1.0, idle_timeout=60)
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-8"]
    assert sorted(report.probed) == [2, 6, 8] and report.failed == [] and report.already_done == 1
    assert report.rotated == []  # checkpoint-4 went before it was complete and quiet: never started


def test_watch_stops_after_the_idle_timeout(data, tmp_path: Path) -> None:
    clock = ScriptedClock([(0.0, lambda: (tmp_path / "idle").mkdir())])
    report = _watch(tmp_path / "idle", load_config(data["config"]), clock, quiet_period=3.0, poll=1.0, idle_timeout=30)
    assert report.probed == [] and 30 <= clock.now <= 32


def test_odd_names_are_left_alone_and_corrupt_snapshots_fail_alone(data, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_unconditional_like(run_dir, data["train"], steps=6, every=2)
    notes = run_dir / "checkpoint-final-notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("not a checkpoint")
    weights = run_dir / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert [s.path.name for s in discover_snapshots(run_dir)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "run"]
    report = probe_run_dir(run_dir, load_config(data["config"]))
    assert report.probed == [2, 6] and report.already_done == 1  # the final model is checkpoint-6's weights
    assert [f["step"] for f in report.failed] == [4] and "diffusion_pytorch_model.safetensors" in report.failed[0][
        "error"
    ]
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"]
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        run = store.runs()[0]["id"]
        assert not any("final-notes" in (s["path"] or "") for s in store.snapshots(run))
        failed = [(r["step"], r["probe"]) for r in store.results(run) if r["status"] == "failed"]
    assert sorted(failed) == [(4, "forecast"), (4, "membership"), (4, "regurgitation")]


def _probe_cmd(run_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "memwatch.cli", "probe", str(run_dir), "--config", str(config)]


@pytest.mark.slow
def test_killed_probe_resumes_without_duplicates(data, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_unconditional_like(run_dir, data["train"], steps=8, every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _probe_cmd(run_dir, data["config"]), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    store_path = run_dir / "memwatch" / "memwatch.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline and (not store_path.exists() or len(_ok_results(run_dir)) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _ok_results(run_dir)
    assert 2 <= len(partial) < 12, partial  # killed mid-way

    assert main(["probe", str(run_dir), "--config", str(data["config"])]) == 0
    final = _ok_results(run_dir)
    expected = sorted((s, "checkpoint", p) for s in (2, 4, 6, 8) for p in ("forecast", "membership", "regurgitation"))
    assert final == expected  # nothing missing, nothing twice
    with Store(store_path) as store:
        assert store._query("PRAGMA integrity_check")[0][0] == "ok"


def test_a_second_job_finds_the_lock(data, staged, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(staged["run"], run_dir)
    config = load_config(data["config"])
    with run_lock(run_dir / "memwatch", wait=False) as held:  # another job holds the lock
        assert held
        assert main(["probe", str(run_dir), "--config", str(data["config"])]) == 0
        assert "locked by another job: nothing done" in capsys.readouterr().out
        report = probe_run_dir(run_dir, config)
        assert report.locked and report.probed == [] and _ok_results(run_dir) == []
        with run_lock(run_dir / "memwatch", wait=False) as again:  # flock: a second holder is refused
            assert not again
    report = probe_run_dir(run_dir, config)  # released: this job probes
    assert not report.locked and report.probed == [2, 4, 6, 8] and report.already_done == 1


def test_probe_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["probe", str(tmp_path / "nowhere"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "port"),
    [(["probe"], 29561), (["watch", "--quiet-period", "0", "--end-quiet", "0", "--poll", "0.1"], 29562)],
    ids=["probe", "watch"],
)
def test_jobs_under_accelerate_launch_with_two_processes_give_the_same_metrics(
    data, staged, tmp_path: Path, command: list[str], port: int
) -> None:
    from support.models import accelerate_launch

    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        shutil.copytree(staged["run"], run)
    assert main(["probe", str(one), "--config", str(data["config"])]) == 0
    cmd = accelerate_launch(
        2, port, "--module", "memwatch.cli", command[0], str(two), *command[1:], "--config", str(data["config"])
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("probed 4, already done 1") == 1  # the main process alone reports
    with Store(two / "memwatch" / "memwatch.sqlite") as store:
        assert store.runs()[0]["info"]["processes"] == 2  # two processes really shared the probes
    first, second = _metrics(one), _metrics(two)
    assert first.keys() == second.keys() and len(first) >= 12
    for key, value in first.items():
        assert second[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
