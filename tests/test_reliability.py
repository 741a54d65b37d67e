"""Reliability: the monitor never harms training, never loses a warning, never calls bad weights clean.

Real files, real SQLite, real subprocesses and signals; faults are made the way they happen (a truncated
JPEG, a NaN in the weights, a full database, a folder deleted by rotation, a killed process), never by
mocking the code under test. Every command-line error here is one line on stderr with exit status 2.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image
from support.images import smooth_image, write_images
from support.models import FAST_MONITOR, accelerate_launch, tiny_unet, train, train_unconditional_like

from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.core.probe import Probe, ProbeResult
from memwatch.core.session import ProbeSession
from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.errors import MemwatchError
from memwatch.frontends.jobs import probe_run_dir, run_lock
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.store import SCHEMA_VERSION, Store
from memwatch.store.history import find_store, load_history
from memwatch.views.report import build_report

MEMBERSHIP_ONLY = {"probes": {**FAST_MONITOR["probes"], "regurgitation": {"every": 0}}}


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return its exit code, stderr (checked to be one line when it fails) and stdout."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("memwatch: error: ") and "Traceback" not in err, err
    return code, err, out


def stored(out: Path) -> Any:
    with Store(find_store(out), readonly=True) as store:
        return load_history(store)


def truncated_jpeg(path: Path, seed: int = 7) -> Path:
    """A JPEG cut short: it passes Image.verify() (the listing check) but does not decode."""
    buf = io.BytesIO()
    # 64 px: the entropy-coded data is most of the file, so the cut leaves the headers whole (with a 16 px
    # image, Pillow 12 could no longer identify the file at all)
    Image.fromarray(smooth_image(seed, 64)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) * 3 // 4])
    with Image.open(path) as img:
        img.verify()  # the cheap check passes
    return path


@pytest.fixture
def run_dir(train_holdout: tuple[Path, Path], tmp_path: Path) -> Path:
    train_unconditional_like(tmp_path / "run", train_holdout[0], steps=4, every=2)
    return tmp_path / "run"


@pytest.fixture
def config_file(train_holdout: tuple[Path, Path], tmp_path: Path) -> Path:
    cfg = tmp_path / "mw.yaml"
    train_dir, holdout_dir = train_holdout
    cfg.write_text(
        yaml.safe_dump(
            {
                "reference": str(train_dir),
                "holdout": str(holdout_dir),
                "probes": {
                    "membership": {"every": 1, "num_members": 6, "num_holdout": 6, "timesteps": [100]},
                    "regurgitation": {"every": 1, "num_samples": 2, "inference_steps": 2, "batch_size": 2},
                },
            }
        )
    )
    return cfg


# ---------------------------------------------------------------------------------------------
# The monitor never harms training


def test_a_corrupt_holdout_image_does_not_stop_training(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    truncated_jpeg(holdout_dir / "broken.jpg")
    plain = train(Accelerator(cpu=True), train_dir, 7)
    acc = Accelerator(cpu=True)
    with MemorizationMonitor(acc, FAST_MONITOR, reference=train_dir, holdout=holdout_dir,
                             output_dir=tmp_path / "mw") as monitor:  # fmt: skip
        watched = train(acc, train_dir, 7, monitor=monitor)
    assert watched == plain  # ran to the end, and the same losses as without the monitor
    history = stored(tmp_path / "mw")
    assert history.info["holdout"]["skipped"] == 1  # recorded: counted and named
    assert "broken.jpg" in history.info["holdout"]["skipped_files"][0]["path"]
    assert history.metrics["membership/num_holdout"][3] == 8  # the 8 good holdout images were used


def test_a_truncated_training_image_is_skipped_and_named(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    truncated_jpeg(train_dir / "zz-broken.jpg")
    session = ProbeSession(load_config(FAST_MONITOR), load_reference_set(train_dir), None, tmp_path / "out")
    session.probe(1, tiny_unet(), DDPMScheduler())
    session.close()
    history = stored(tmp_path / "out")
    assert history.metrics["regurgitation/num_samples"][1] == 6
    assert history.info["reference"]["skipped"] == 1 and history.info["reference"]["n"] == 8


class ExplodingProbe(Probe):
    """A probe that fails in its per-process part."""

    name = "explode"
    metrics = ("x",)

    def compute(self, ctx):
        raise RuntimeError("boom in compute")

    def reduce(self, rows, ctx):
        return ProbeResult(self.name, {"x": 1.0})


class ExplodingReduce(ExplodingProbe):
    name = "explode_reduce"

    def compute(self, ctx):
        return [{"item": "a"}]

    def reduce(self, rows, ctx):
        raise ValueError("boom in reduce")


def test_a_failing_probe_is_recorded_and_the_others_still_run(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    acc = Accelerator(cpu=True)
    probes = [ExplodingProbe(every=3), ExplodingReduce(every=3)]
    monitor = MemorizationMonitor(acc, MEMBERSHIP_ONLY, reference=train_dir, holdout=holdout_dir,
                                  output_dir=tmp_path / "mw", probes=probes)  # fmt: skip
    losses = train(acc, train_dir, 6, monitor=monitor)
    summary = monitor.close()
    assert len(losses) == 6
    errors = {(f["step"], f["probe"]): f["error"] for f in summary["failed_probes"]}
    expected = {"explode": "RuntimeError: boom in compute", "explode_reduce": "ValueError: boom in reduce"}
    assert errors == {(step, name): why for step in (3, 6) for name, why in expected.items()}
    history = stored(tmp_path / "mw")
    assert sorted(history.metrics["membership/mia_auc"]) == [3, 6]  # membership ran at both steps
    failed = [(r["step"], r["probe"], r["error"]) for r in history.results if r["status"] == "failed"]
    assert (3, "explode", "RuntimeError: boom in compute") in failed


def test_an_on_event_callback_that_raises_does_not_stop_training(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    acc = Accelerator(cpu=True)
    rule = {"name": "always", "type": "threshold", "metric": "membership/loss_member", "op": ">", "value": -1,
            "severity": "warning", "message": "m"}  # fmt: skip

    def bad_callback(event):
        raise KeyError("user bug")

    monitor = MemorizationMonitor(acc, {**MEMBERSHIP_ONLY, "rules": [rule]}, reference=train_dir, holdout=holdout_dir,
                                  output_dir=tmp_path / "mw", on_event=bad_callback)  # fmt: skip
    assert len(train(acc, train_dir, 4, monitor=monitor)) == 4
    monitor.close()
    assert [e["rule"] for e in stored(tmp_path / "mw").events] == ["always"]  # the event is stored anyway


def test_non_finite_weights_are_a_finding_not_clean(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    model = tiny_unet()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    monitor = MemorizationMonitor(Accelerator(cpu=True), FAST_MONITOR, reference=train_dir, holdout=holdout_dir,
                                  output_dir=tmp_path / "mw")  # fmt: skip
    assert monitor.step(12, model, DDPMScheduler()) == []
    summary = monitor.close()
    assert {f["probe"] for f in summary["failed_probes"]} == {"forecast", "membership", "regurgitation"}
    assert "NaN or Inf" in summary["failed_probes"][0]["error"]
    report = build_report(tmp_path / "mw")
    assert [s["verdict"] for s in report["verdict"]["snapshots"]] == ["unaudited"]
    assert report["verdict"]["overall"]["verdict"] == "unaudited"


class InfModel(torch.nn.Module):
    """A UNet stand-in whose outputs are infinite (a diverged model with finite weights)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_unet()
        self.config = self.inner.config

    def forward(self, x, t, **kw):
        out = self.inner(x, t, **kw)
        out.sample = out.sample * float("inf")
        return out


def test_non_finite_losses_and_samples_fail_their_probes(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    session = ProbeSession(load_config(FAST_MONITOR), load_reference_set(train_dir), load_reference_set(holdout_dir),
                           tmp_path / "out")  # fmt: skip
    session.probe(1, InfModel(), DDPMScheduler())
    errors = {f["probe"]: f["error"] for f in session.close()["failed_probes"]}
    assert "denoising losses are NaN or Inf" in errors["membership"]
    assert "samples contain NaN or Inf" in errors["regurgitation"]


def test_step_after_close_and_a_repeated_step_have_one_behaviour(train_holdout, tmp_path: Path, caplog) -> None:
    train_dir, holdout_dir = train_holdout
    model, sched = tiny_unet(), DDPMScheduler()
    monitor = MemorizationMonitor(Accelerator(cpu=True), MEMBERSHIP_ONLY, reference=train_dir, holdout=holdout_dir,
                                  output_dir=tmp_path / "mw")  # fmt: skip
    monitor.step(3, model, sched)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monitor.step(3, model, sched)  # the same step again: probed once, with a warning
    monitor.close()
    assert monitor.step(6, model, sched) == []  # after close: nothing, no exception
    assert "seen twice" in caplog.text and "after close" in caplog.text
    assert sorted(stored(tmp_path / "mw").metrics["membership/mia_auc"]) == [3]


def test_a_step_beyond_64_bits_does_not_stop_training(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    monitor = MemorizationMonitor(Accelerator(cpu=True), MEMBERSHIP_ONLY, reference=train_dir, holdout=holdout_dir,
                                  output_dir=tmp_path / "mw")  # fmt: skip
    monitor.step(3 * 2**64, tiny_unet(), DDPMScheduler())  # cadence holds, but the store cannot hold the step
    monitor.close()  # no exception reached the loop


def test_an_unwritable_output_folder_fails_at_construction_in_one_line(train_holdout, tmp_path: Path) -> None:
    train_dir, _ = train_holdout
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MemwatchError, match=r"cannot create the output folder .*file/mw"):
        MemorizationMonitor(Accelerator(cpu=True), FAST_MONITOR, reference=train_dir, output_dir=blocker / "mw")


def test_a_full_disk_does_not_stop_training_and_says_so(train_holdout, tmp_path: Path) -> None:
    """The process may not grow any file past its current size (RLIMIT_FSIZE, what a full disk does to a
    writer): every write of the monitor fails, training runs to the end, and the log says why."""
    train_dir, holdout_dir = train_holdout
    script = tmp_path / "job.py"
    script.write_text(
        "import os, resource, signal, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from accelerate import Accelerator\n"
        "from support.models import FAST_MONITOR, train\n"
        "from memwatch.frontends.monitor import MemorizationMonitor\n"
        "acc = Accelerator(cpu=True)\n"
        "ref, hold, out = sys.argv[1:4]\n"
        "m = MemorizationMonitor(acc, FAST_MONITOR, reference=ref, holdout=hold, output_dir=out)\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG\n"
        "limit = sum(f.stat().st_size for f in os.scandir(sys.argv[3]) if f.is_file()) + 1024\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
        "losses = train(acc, sys.argv[1], 8, monitor=m)\n"
        "m.close()\n"
        "print('trained', len(losses))\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(train_dir), str(holdout_dir), str(tmp_path / "mw")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0 and "trained 8" in proc.stdout, proc.stderr[-2000:]
    assert "could not be recorded" in proc.stderr and "Traceback" not in proc.stderr


def test_failures_on_one_process_reach_all_without_a_hang(train_holdout, tmp_path: Path) -> None:
    """Two processes; a probe fails on rank 1 only. Both finish and the failure is recorded."""
    train_dir, holdout_dir = train_holdout
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from accelerate import Accelerator\n"
        "from diffusers import DDPMScheduler\n"
        "from support.models import tiny_unet\n"
        "from memwatch.frontends.monitor import MemorizationMonitor\n"
        "from memwatch.core.probe import Probe, ProbeResult\n"
        "class RankOne(Probe):\n"
        "    name, metrics = 'rank_one', ('x',)\n"
        "    def compute(self, ctx):\n"
        "        if ctx.workers.process_index == 1: raise RuntimeError('only on rank 1')\n"
        "        return []\n"
        "    def reduce(self, rows, ctx): return ProbeResult(self.name, {'x': 1.0})\n"
        "acc = Accelerator(cpu=True)\n"
        "m = MemorizationMonitor(acc, {'probes': {'membership': {'every': 4, 'num_members': 4, 'num_holdout': 4,"
        " 'timesteps': [100]}, 'regurgitation': {'every': 0}, 'forecast': {'every': 0}}},"
        " reference=sys.argv[1], holdout=sys.argv[2], output_dir=sys.argv[3], probes=[RankOne(every=4)])\n"
        "m.step(4, acc.prepare(tiny_unet()), DDPMScheduler())\n"
        "m.close()\n"
        "acc.end_training()\n"  # as a training script ends: no rank exits with the process group alive
    )
    cmd = accelerate_launch(2, 29610, script, str(train_dir), str(holdout_dir), str(tmp_path / "mw"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = stored(tmp_path / "mw")
    assert [(r["probe"], r["status"]) for r in history.results] == [("membership", "ok"), ("rank_one", "failed")]
    assert "only on rank 1" in next(r["error"] for r in history.results if r["status"] == "failed")


# ---------------------------------------------------------------------------------------------
# No interruption loses a warning, nothing is counted twice


def test_a_restart_records_the_events_the_store_lost(run_dir: Path, config_file: Path) -> None:
    rule = {"name": "seen", "type": "first", "metric": "membership/loss_member", "op": ">", "value": -1,
            "severity": "warning", "message": "step {step}"}  # fmt: skip
    config = load_config({**yaml.safe_load(config_file.read_text()), "rules": [rule]})
    probe_run_dir(run_dir, config)
    store_path = find_store(run_dir)
    with sqlite3.connect(store_path) as conn:  # what a kill between results and events used to leave
        conn.execute("DELETE FROM events")
    report = probe_run_dir(run_dir, config)
    assert report.probed == [] and [e["rule"] for e in report.new_events] == ["seen"]
    assert [e["rule"] for e in stored(run_dir).events] == ["seen"]
    assert probe_run_dir(run_dir, config).new_events == []  # and never twice


def test_a_resumed_run_does_not_fire_once_per_run_rules_again(train_holdout, tmp_path: Path) -> None:
    train_dir, holdout_dir = train_holdout
    rule = {"name": "first", "type": "first", "metric": "membership/loss_member", "op": ">", "value": -1,
            "severity": "warning", "message": "m"}  # fmt: skip
    cfg = {**MEMBERSHIP_ONLY, "run_name": "resumable", "rules": [rule]}
    fired = []
    for start in (0, 6):  # training resumed from a checkpoint with the same run name
        acc = Accelerator(cpu=True)
        with MemorizationMonitor(acc, cfg, reference=train_dir, holdout=holdout_dir, output_dir=tmp_path / "mw",
                                 on_event=fired.append) as monitor:  # fmt: skip
            model = tiny_unet(seed=start)
            for step in range(start + 1, start + 7):
                monitor.step(step, model, DDPMScheduler())
    assert [(e.rule, e.step) for e in fired] == [("first", 3)]


def test_events_are_stored_once_per_rule_step_and_snapshot(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        run = store.ensure_run("r", config={})
        snap = store.add_snapshot(run, 1, weights_sha256="a" * 64)
        event = {"step": 1, "rule": "r", "severity": "warning", "snapshot_id": snap}
        assert store.add_event(run, event) is not None and store.add_event(run, event) is None
        assert len(store.events(run)) == 1


@pytest.mark.slow
def test_kill_9_at_random_points_never_loses_or_duplicates(run_dir: Path, config_file: Path) -> None:
    """``memwatch probe`` killed (SIGKILL) after a random number of stored results, then finished: the store
    equals an uninterrupted run's. (scripts/chaos_kill.py does this 24 times; results in docs/reliability.md.)"""
    rule = {"name": "seen", "type": "threshold", "metric": "membership/loss_member", "op": ">", "value": -1,
            "severity": "warning", "message": "m"}  # fmt: skip
    config_file.write_text(yaml.safe_dump({**yaml.safe_load(config_file.read_text()), "rules": [rule]}))
    clean = run_dir.parent / "clean"
    shutil.copytree(run_dir, clean)
    probe_run_dir(clean, load_config(config_file))
    expected = _fingerprint(clean)
    cmd = [sys.executable, "-m", "memwatch.cli", "probe", str(run_dir), "--config", str(config_file)]
    rng = random.Random(0)
    for _ in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = _results_stored(run_dir) + rng.randint(1, 2)  # kill between two results of this job
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _results_stored(run_dir) < target:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    probe_run_dir(run_dir, load_config(config_file))
    got = _fingerprint(run_dir)
    for key in expected:
        assert got[key] == expected[key], (key, sorted(set(got[key]) ^ set(expected[key]), key=str)[:6])


def _results_stored(run_dir: Path) -> int:
    """Results in the store so far (0 while the job has not created it yet)."""
    try:
        return len(_fingerprint(run_dir)["results"])
    except MemwatchError:
        return 0


def _fingerprint(run_dir: Path) -> dict[str, Any]:
    """What a store holds, without times, ids and paths: results, metrics and events."""
    history = stored(run_dir)
    return {
        "results": sorted((r["step"], r["kind"], r["probe"], r["status"]) for r in history.results),
        "metrics": sorted(
            (m["step"], m["probe"], m["metric"], None if math.isnan(m["value"]) else round(m["value"], 9))
            for m in history.metric_rows
        ),
        "events": sorted((e["step"], e["rule"]) for e in history.events),
        "integrity": Store(find_store(run_dir), readonly=True).integrity(),
    }


# ---------------------------------------------------------------------------------------------
# Rotation, evidence, locks


def test_a_checkpoint_deleted_before_hashing_is_counted_not_failed(
    run_dir: Path, config_file: Path, capsys, monkeypatch
) -> None:
    import shutil

    import memwatch.frontends.jobs.prober as jobs

    real = jobs.snapshot_sha256

    def rotate_first(path, **kw):  # rotation removes checkpoint-2 just as the job reaches it
        if Path(path).name == "checkpoint-2":
            shutil.rmtree(path)
        return real(path, **kw)

    monkeypatch.setattr(jobs, "snapshot_sha256", rotate_first)
    code = main(["probe", str(run_dir), "--config", str(config_file)])
    out = capsys.readouterr().out
    assert code == 0 and "probed 1, already done 1, failed 0, deleted before probing 1" in out


def test_a_checkpoint_and_a_final_model_at_one_step_keep_their_own_evidence(run_dir: Path, config_file: Path) -> None:
    state = run_dir / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(str(state))
    first = next(iter(weights))
    weights[first] = weights[first] * 1.01  # training went on after checkpoint-4: other weights, same step
    save_file(weights, str(state))
    probe_run_dir(run_dir, load_config(config_file))
    history = stored(run_dir)
    grids = [e for r in history.results if r["probe"] == "regurgitation" for e in r["evidence"]]
    assert len(grids) == 3 and len(set(grids)) == 3  # checkpoint-2, checkpoint-4 and the final model
    assert all((run_dir / "memwatch" / g).is_file() for g in grids)


def test_a_locked_job_still_gates_fail_on(run_dir: Path, config_file: Path, capsys) -> None:
    rule = {"name": "seen", "type": "first", "metric": "membership/loss_member", "op": ">", "value": -1,
            "severity": "warning", "message": "m"}  # fmt: skip
    config_file.write_text(yaml.safe_dump({**yaml.safe_load(config_file.read_text()), "rules": [rule]}))
    assert cli(capsys, "probe", run_dir, "--config", config_file)[0] == 0
    with run_lock(run_dir / "memwatch", wait=False):
        code, _, out = cli(capsys, "probe", run_dir, "--config", config_file, "--fail-on", "warning")
        assert code == 1 and "locked by another job: nothing done (1 events stored)" in out
        assert cli(capsys, "probe", run_dir, "--config", config_file, "--fail-on", "critical")[0] == 0


# ---------------------------------------------------------------------------------------------
# Readers never write; stores say precisely what is wrong


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_report_and_curves_leave_the_store_untouched(run_dir: Path, config_file: Path, tmp_path: Path, capsys) -> None:
    probe_run_dir(run_dir, load_config(config_file))
    store_dir = run_dir / "memwatch"
    before = {k: v for k, v in _digest(store_dir).items() if k.startswith("memwatch.sqlite")}
    assert cli(capsys, "report", run_dir, "-o", tmp_path / "r.html", "--json", tmp_path / "r.json")[0] == 0
    assert cli(capsys, "curves", run_dir, "--out", tmp_path / "curves")[0] == 0
    after = {k: v for k, v in _digest(store_dir).items() if k.startswith("memwatch.sqlite")}
    assert after == before


def test_another_applications_database_is_refused_untouched(tmp_path: Path, capsys) -> None:
    other = tmp_path / "memwatch" / "memwatch.sqlite"
    other.parent.mkdir()
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    before = other.read_bytes()
    code, err, _ = cli(capsys, "report", tmp_path)
    assert code == 2 and "another application" in err and "not changed" in err
    with pytest.raises(MemwatchError, match="another application"):
        Store(other)  # a writer refuses it too
    assert other.read_bytes() == before
    with sqlite3.connect(other) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"plain text, not a database at all" * 200, "not a SQLite database"),
        (b"", "empty database"),
    ],
)
def test_a_store_that_is_not_a_store_gives_one_precise_line(tmp_path: Path, capsys, content, expected) -> None:
    (tmp_path / "memwatch").mkdir()
    (tmp_path / "memwatch" / "memwatch.sqlite").write_bytes(content)
    code, err, _ = cli(capsys, "curves", tmp_path)
    assert code == 2 and expected in err and "delete" not in err


def test_a_corrupt_store_says_so_and_only_then_suggests_deleting(run_dir: Path, config_file: Path, capsys) -> None:
    probe_run_dir(run_dir, load_config(config_file))
    path = find_store(run_dir)
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : page * 3] = os.urandom(page * 2)  # scribble over pages 2-3
    path.write_bytes(bytes(data))
    code, err, _ = cli(capsys, "report", run_dir, "-o", run_dir / "r.html")
    assert code == 2 and ("corrupt" in err or "not a SQLite database" in err)
    if "corrupt" in err:
        assert "move it aside or delete it" in err


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(MemwatchError, match=r"newer than this memwatch understands"):
        Store(path)


def test_a_schema_1_store_is_upgraded_by_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the schema of memwatch 0.1, with one final equal to a checkpoint
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
                config_json TEXT NOT NULL, config_hash TEXT NOT NULL, reference_json TEXT, holdout_json TEXT,
                info_json TEXT);
            CREATE TABLE snapshots (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, step INTEGER NOT NULL,
                path TEXT NOT NULL DEFAULT '', weights_sha256 TEXT, kind TEXT NOT NULL, created_at REAL NOT NULL,
                UNIQUE (run_id, step, kind, path));
            CREATE TABLE probe_results (id INTEGER PRIMARY KEY, snapshot_id INTEGER NOT NULL, probe TEXT NOT NULL,
                config_hash TEXT NOT NULL, status TEXT NOT NULL, error TEXT, started_at REAL, finished_at REAL NOT NULL,
                duration_s REAL, host TEXT, timings_json TEXT NOT NULL DEFAULT '{}',
                evidence_json TEXT NOT NULL DEFAULT '[]');
            CREATE TABLE metrics (result_id INTEGER NOT NULL, snapshot_id INTEGER NOT NULL, probe TEXT NOT NULL,
                metric TEXT NOT NULL, value REAL, PRIMARY KEY (result_id, metric));
            CREATE TABLE events (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL, step INTEGER, rule TEXT NOT NULL,
                severity TEXT NOT NULL, metric TEXT, value REAL, threshold REAL, forecast_step INTEGER,
                message TEXT NOT NULL DEFAULT '', evidence_json TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
            INSERT INTO runs VALUES (1, 'r', 1.0, '{}', 'h', NULL, NULL, NULL);
            INSERT INTO snapshots VALUES (1, 1, 4, 'c/checkpoint-4', 'ab', 'checkpoint', 1.0);
            INSERT INTO snapshots VALUES (2, 1, 4, 'c', 'ab', 'final', 2.0);
            INSERT INTO probe_results VALUES (1, 1, 'membership', 'k', 'ok', NULL, NULL, 1.0, NULL, NULL, '{}', '[]');
            INSERT INTO probe_results VALUES (2, 2, 'membership', 'k', 'ok', NULL, NULL, 2.0, NULL, NULL, '{}', '[]');
            INSERT INTO metrics VALUES (1, 1, 'membership', 'mia_auc', 0.7);
            INSERT INTO metrics VALUES (2, 2, 'membership', 'mia_auc', 0.7);
            """
        )
    with pytest.raises(MemwatchError, match="schema version 1 of an older memwatch"):
        Store(path, readonly=True)
    with Store(path) as store:
        (snap,) = store.snapshots(1)  # the same weights seen twice: one snapshot, measured once
        assert [g["kind"] for g in snap["sightings"]] == ["checkpoint", "final"]
        assert len(store.metrics(1)) == 1 and store.integrity() == "ok"


def test_a_broken_embedding_cache_is_bypassed_with_a_warning(train_holdout, tmp_path: Path, caplog) -> None:
    train_dir, _ = train_holdout
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "embeddings.sqlite").write_bytes(b"garbage" * 1000)
    config = load_config({**FAST_MONITOR, "cache_dir": str(cache)})
    session = ProbeSession(config, load_reference_set(train_dir), None, tmp_path / "out")
    session.probe(1, tiny_unet(), DDPMScheduler())
    session.close()
    assert "embedding cache" in caplog.text and "cannot be used" in caplog.text
    assert stored(tmp_path / "out").metrics["regurgitation/num_samples"][1] == 6


# ---------------------------------------------------------------------------------------------
# Command-line paths and inputs: one line, exit 2


def test_output_paths_that_cannot_be_written(
    train_holdout, run_dir: Path, config_file: Path, tmp_path: Path, capsys
) -> None:
    probe_run_dir(run_dir, load_config(config_file))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    a_folder = tmp_path / "a-folder"
    a_folder.mkdir()
    for args, expected in (
        (("curves", run_dir, "--out", a_file), "is a file"),
        (("report", run_dir, "-o", a_folder), "is a folder"),
        (("report", run_dir, "--json", a_folder), "is a folder"),
        (("report", run_dir, "-o", a_file / "r.html"), "cannot write"),
        (("score", train_holdout[1], train_holdout[0], "--json", a_folder), "is a folder"),
        (("probe", run_dir, "--config", config_file, "--json", a_folder), "is a folder"),
    ):
        code, err, _ = cli(capsys, *args)
        assert code == 2 and expected in err, (args, err)


def test_bad_inputs_on_the_command_line(train_holdout, tmp_path: Path, capsys) -> None:
    train_dir, _ = train_holdout
    bad_yaml = tmp_path / "latin1.yaml"
    bad_yaml.write_bytes("reference: caf\xe9\n".encode("latin-1"))
    good_yaml = tmp_path / "good.yaml"
    good_yaml.write_text(f"reference: {train_dir}\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'{"path": "caf\xe9.png"}\n')
    for args, expected in (
        (("score", train_dir, train_dir, "--resolution", "-5"), "--resolution -5"),
        (("probe", tmp_path, "--config", bad_yaml), "not UTF-8"),
        (("score", train_dir, manifest), "not UTF-8"),
        (("watch", tmp_path, "--config", good_yaml, "--poll", "-1"), "--poll -1"),
        (("probe", tmp_path, tmp_path, "--config", bad_yaml, "--config", bad_yaml, "--config", bad_yaml), "3 --config"),
    ):
        code, err, _ = cli(capsys, *args)
        assert code == 2 and expected in err, (args, err)


def test_no_yaml_tag_or_pickle_payload_ever_runs(run_dir: Path, config_file: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil_yaml = tmp_path / "evil.yaml"
    evil_yaml.write_text(f"reference: !!python/object/apply:os.system ['touch {marker}']\n")
    assert cli(capsys, "probe", run_dir, "--config", evil_yaml)[0] == 2
    # accelerate's pickles are never opened; a .bin with a payload is refused by torch.load(weights_only=True)
    (run_dir / "checkpoint-2" / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    unet_dir = run_dir / "checkpoint-4" / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": Payload()}, unet_dir / "diffusion_pytorch_model.bin")
    report = probe_run_dir(run_dir, load_config(config_file))
    assert not marker.exists()
    assert [f["step"] for f in report.failed] == [4]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"probes": {"membership": {"timesteps": "50,150"}}}, "must be a list of whole numbers"),
        ({"probes": {"regurgitation": {"num_samples": 0}}}, "num_samples' must be >= 1"),
        ({"embedder": {"resolution": -32}}, "embedder.resolution' must be >= 1"),
        ({"rules": [{"name": "typo", "type": "first", "metric": "regurgitation/mem_fracton", "op": ">", "value": 0,
                     "severity": "warning", "message": "m"}]}, "does not report; its metrics: copy_fraction"),
        ({"rules": [{"name": "typo", "type": "first", "metric": "regurgitaton/mem_fraction", "op": ">", "value": 0,
                     "severity": "warning", "message": "m"}]}, "no probe is called 'regurgitaton'"),
    ],
)  # fmt: skip
def test_config_values_are_checked_against_their_declarations(train_holdout, tmp_path, setting, expected) -> None:
    train_dir, _ = train_holdout
    with pytest.raises(MemwatchError, match=expected):
        ProbeSession(load_config({**setting}), load_reference_set(train_dir), None, tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# Reference files: accepted, or counted and named


def test_every_format_the_diffusers_loaders_read_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    for i, fmt in enumerate(("png", "gif", "tiff", "jpeg", "webp", "bmp")):
        Image.fromarray(smooth_image(i, 16)).save(folder / f"img{i}.{fmt}")
    (folder / "README.txt").write_text("not an image")
    refs = load_reference_set(folder)
    assert len(refs) == 6 and refs.skipped == [] and refs.not_images == 1


def test_links_that_loop_or_dangle_are_counted(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    write_images(folder, [1, 2], size=16)
    (folder / "loop").symlink_to(folder)
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")
    refs = load_reference_set(folder)
    assert len(refs) == 2
    reasons = sorted(r for _, r in refs.skipped)
    assert any("dangling symbolic link" in r for r in reasons) and any("loop" in r for r in reasons)


def test_16_bit_images_keep_their_contrast(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 65535, 16 * 16).reshape(16, 16)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    x = load_image(tmp_path / "deep.png", 16)
    assert 0.0 <= x.min() < 0.05 and 0.95 < x.max() <= 1.0 and abs(float(x.mean()) - 0.5) < 0.05


def test_checkpoint_names_beyond_64_bits_are_skipped_and_named(run_dir: Path, config_file: Path, capsys) -> None:
    os.rename(run_dir / "checkpoint-2", run_dir / f"checkpoint-{2**70}")
    code, _, out = cli(capsys, "probe", run_dir, "--config", config_file)
    assert code == 0 and f"skipped: {run_dir / f'checkpoint-{2**70}'}: step {2**70} is beyond 64 bits" in out


def test_hostile_names_are_escaped_in_the_report(tmp_path: Path) -> None:
    hostile = '<img src=x onerror="alert(1)">'
    folder = tmp_path / "data"
    write_images(folder, [1, 2], size=16)
    config = load_config({**FAST_MONITOR, "run_name": hostile})
    session = ProbeSession(config, load_reference_set(folder), None, tmp_path / "out")
    session.probe(1, tiny_unet(), DDPMScheduler())
    session.close()
    from memwatch.views.report import render_html

    report = build_report(tmp_path / "out")
    page = render_html(report)
    assert report["run"]["name"] == hostile  # shown, as text
    assert hostile not in page and "memwatch audit report: &lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page


def test_nan_metrics_are_undefined_not_zero(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        run = store.ensure_run("r", config={})
        snap = store.add_snapshot(run, 1, weights_sha256="b" * 64)
        store.write_result(snap, ProbeResult("p", {"m": math.nan}), config_hash="c")
        assert math.isnan(store.metrics(run)[0]["value"])
