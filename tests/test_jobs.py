"""memwatch probe / watch on checkpoint folders written as diffusers' train_unconditional.py writes them."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from imagegen import write_images
from tinymodels import train_unconditional_like

from memwatch.cli import main
from memwatch.config import load_config
from memwatch.jobs import discover_snapshots, probe_run_dir, watch_run_dir
from memwatch.store import Store


@pytest.fixture
def data(tmp_path: Path) -> dict:
    write_images(tmp_path / "train", list(range(6)), size=16)
    write_images(tmp_path / "holdout", list(range(40, 46)), size=16)
    cfg = tmp_path / "memwatch.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "reference": "train",
                "holdout": "holdout",
                "run_name": "audit",
                "probes": {
                    "membership": {"every": 1, "num_members": 6, "num_holdout": 6, "timesteps": [100, 400]},
                    "regurgitation": {"every": 1, "num_samples": 4, "inference_steps": 3, "batch_size": 4},
                },
            }
        )
    )
    return {"train": tmp_path / "train", "config": cfg}


def _metrics(run_dir: Path) -> dict:
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        run = store.runs()[0]["id"]
        return {(m["step"], m["kind"], m["probe"], m["metric"]): m["value"] for m in store.metrics(run)}


def _ok_results(run_dir: Path) -> list[tuple]:
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        runs = store.runs()  # empty until the job has recorded its run
        rows = store.results(runs[0]["id"]) if runs else []
    return sorted((r["step"], r["kind"], r["probe"]) for r in rows if r["status"] == "ok")


def test_probe_twice_and_watch_give_the_same_metrics(data, tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    config = load_config(data["config"])
    reports = []
    watcher = threading.Thread(
        target=lambda: reports.append(watch_run_dir(watched, config, quiet_period=0.3, poll=0.1, idle_timeout=60))
    )
    watcher.start()  # started before training, ends on its own after the final model
    train_unconditional_like(watched, data["train"], steps=6, every=2)
    watcher.join(timeout=120)
    assert not watcher.is_alive()
    assert sorted(reports[0].probed) == [2, 4, 6, 6]

    probed = tmp_path / "probed"
    shutil.copytree(watched, probed, ignore=shutil.ignore_patterns("memwatch"))
    assert main(["probe", str(probed), "--config", str(data["config"])]) == 0
    first = _metrics(probed)
    assert {k[:2] for k in first} == {(2, "checkpoint"), (4, "checkpoint"), (6, "checkpoint"), (6, "final")}
    report = probe_run_dir(probed, config)  # second run is a no-op
    assert report.probed == [] and report.already_done == 4
    assert _metrics(probed) == first
    assert _metrics(watched) == first  # watch and probe record the same metrics
    assert not any(p.name.startswith("checkpoint") for p in (probed / "memwatch").rglob("*"))


def test_rotation_while_watching(data, tmp_path: Path) -> None:
    run_dir = tmp_path / "rot"
    config = load_config(data["config"])
    reports = []
    watcher = threading.Thread(
        target=lambda: reports.append(watch_run_dir(run_dir, config, quiet_period=0.2, poll=0.05, idle_timeout=60))
    )
    watcher.start()
    train_unconditional_like(run_dir, data["train"], steps=8, every=2, total_limit=1, pause=0.6)
    watcher.join(timeout=120)
    assert not watcher.is_alive() and reports, "the watch crashed or hung"
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-8"]
    assert 6 in reports[0].probed and reports[0].failed == []


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
    assert report.probed == [2, 6, 6]
    assert [f["step"] for f in report.failed] == [4] and "diffusion_pytorch_model.safetensors" in report.failed[0][
        "error"
    ]
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"]
    with Store(run_dir / "memwatch" / "memwatch.sqlite") as store:
        run = store.runs()[0]["id"]
        assert not any("final-notes" in (s["path"] or "") for s in store.snapshots(run))
        failed = [(r["step"], r["probe"]) for r in store.results(run) if r["status"] == "failed"]
    assert sorted(failed) == [(4, "membership"), (4, "regurgitation")]


def _probe_cmd(run_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "memwatch.cli", "probe", str(run_dir), "--config", str(config)]


@pytest.mark.slow
def test_killed_probe_resumes_without_duplicates_and_concurrent_jobs_lock(data, tmp_path: Path) -> None:
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
    assert 2 <= len(partial) < 10, partial  # killed mid-way

    # Two jobs at once: one probes what is missing, the other finds the lock and exits cleanly.
    a = subprocess.Popen(_probe_cmd(run_dir, data["config"]), env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    b = subprocess.run(_probe_cmd(run_dir, data["config"]), env=env, capture_output=True, text=True, timeout=120)
    out_a, _ = a.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (out_a, b.stdout, b.stderr)
    assert "locked by another job" in b.stdout or "already done" in b.stdout
    final = _ok_results(run_dir)
    expected = sorted(
        (s, k, p)
        for s, k in [(2, "checkpoint"), (4, "checkpoint"), (6, "checkpoint"), (8, "checkpoint"), (8, "final")]
        for p in ("membership", "regurgitation")
    )
    assert final == expected  # nothing missing, nothing twice
    with Store(store_path) as store:
        assert store._query("PRAGMA integrity_check")[0][0] == "ok"


def test_probe_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["probe", str(tmp_path / "nowhere"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
