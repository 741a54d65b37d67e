"""Tests for memwatch.store: round trips, atomicity, schema checks, crash safety and concurrency."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from memwatch.core.probe import ProbeResult
from memwatch.errors import MemwatchError
from memwatch.hashing import config_hash
from memwatch.store import SCHEMA_VERSION, Store

SRC = Path(__file__).resolve().parents[1] / "src"


def _regurgitation_result(n: int = 3, offset: int = 0) -> ProbeResult:
    """A result with metrics, n match rows, two item rows, timings and evidence."""
    matches = []
    for i in range(n):
        matches.append(
            {
                "sample": f"s{i:03d}",
                "seed": 100 + i,
                "nn1": f"img_{(i + offset) % 5}.png",
                "d1": 0.1 * (i + 1),
                "d2": 0.5 + i,
                "ratio": 0.1 * (i + 1) / (0.5 + i),
                "similarity": 0.9 - 0.1 * i,
                "extraction": 0.8 + i,
                "memorized": i == 0,
                "copied": int(i < 2),
                "extracted": 0,
            }
        )
    return ProbeResult(
        probe="regurgitation",
        metrics={"mem_fraction": 1 / n, "sim_p95": 0.88, "distinct_memorized": 1.0},
        matches=matches,
        items=[{"item": "img_0.png", "loss": 0.25, "member": True}, {"item": "img_1.png", "loss": 0.5}],
        timings={"sampling": 1.5, "search": 0.25},
        evidence=["evidence/step500/s000.png"],
    )


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "sub" / "memwatch.db") as s:
        yield s


def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_creates_parent_folder_and_sets_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "memwatch.db"
    with Store(path) as s:
        assert s.path == path
        assert path.is_file()
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    # WAL is persistent: a plain connection sees it too.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    assert int(version) == SCHEMA_VERSION == 4
    conn.close()


def test_reopen_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "memwatch.db"
    with Store(path) as s:
        run = s.ensure_run("r", config={"a": 1})
    with Store(path) as s:
        assert [r["id"] for r in s.runs()] == [run]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 1
    conn.close()


@pytest.mark.parametrize("seen", [None, 2], ids=["created", "upgraded"])
def test_a_store_another_process_created_or_upgraded_meanwhile_opens(tmp_path: Path, monkeypatch, seen) -> None:
    """Two processes open a new (or old) store at once: both read its schema version before either holds the write
    lock; the one that waited must read it again under the lock, not create (or upgrade) the tables a second time.
    Made deterministic by letting the first read see the version the other process had not yet changed."""
    path = tmp_path / "memwatch.sqlite"
    with Store(path) as s:  # the other process, done first
        run = s.ensure_run("r", config={"a": 1})
    read = Store._schema_version
    calls = []

    def stale_first(self):
        calls.append(1)
        return seen if len(calls) == 1 else read(self)

    monkeypatch.setattr(Store, "_schema_version", stale_first)
    with Store(path) as s:  # raised "table meta already exists" (created) or failed to upgrade (upgraded)
        assert [r["id"] for r in s.runs()] == [run]
    assert len(calls) >= 2  # the version was read again under the lock


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    conn.commit()
    conn.close()
    with pytest.raises(MemwatchError, match=r"future\.db.*99"):
        Store(path)
    # Nothing was created in the newer database.
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"meta"}


def test_not_a_database_is_a_memwatch_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MemwatchError, match=r"junk\.db"):
        Store(path)


def test_ensure_run_round_trip_and_idempotence(store: Store) -> None:
    config = {"probes": ["regurgitation"], "every": 500}
    reference = {"n": 10, "skipped": 1, "manifest_sha256": "ab" * 32, "root": "/data/train"}
    holdout = {"n": 5, "skipped": 0, "manifest_sha256": "cd" * 32, "root": "/data/holdout"}
    info = {"versions": {"torch": "2.15.0"}, "host": "box"}
    run = store.ensure_run(
        "run-a", config=config, identity="i1", reference=reference, holdout=holdout, info=info, created_at=123.5
    )
    assert store.ensure_run("run-a", config=config) == run and store.run_config(run) == config  # nothing new
    # Same name again: the same run, its row unchanged; the new config is added to the configs it was probed with.
    assert store.ensure_run("run-a", config={"other": True}, identity="i2", reference={"n": 1}) == run
    other = store.ensure_run("run-b", config={})
    assert other != run
    runs = store.runs()
    assert [r["name"] for r in runs] == ["run-a", "run-b"]
    assert runs[0] == {
        "id": run,
        "name": "run-a",
        "created_at": 123.5,
        "identity": "i1",
        "config": {"other": True},
        "config_hash": config_hash({"other": True}),
        "first_config_hash": config_hash(config),
        "reference": reference,
        "holdout": holdout,
        "info": info,
    }
    assert store.run_config(run, first=True) == config and store.run_config(run) == {"other": True}
    assert store.run_with_identity("i1") == "run-a" and store.run_with_identity("i2") is None
    assert runs[1]["reference"] is None and runs[1]["holdout"] is None and runs[1]["info"] is None
    assert store.run_id("run-b") == other
    assert store.run_id("nope") is None


def test_a_snapshot_is_its_weights_and_its_sightings_are_where_it_was_seen(store: Store) -> None:
    run = store.ensure_run("r", config={})
    live = store.add_snapshot(run, 500, created_at=10.0)
    assert store.add_snapshot(run, 500) == live  # unhashed: identified by step, kind and path
    unhashed = store.add_snapshot(run, 500, kind="checkpoint", path=Path("/out/checkpoint-500"))
    assert unhashed != live
    ckpt = store.add_snapshot(run, 500, kind="checkpoint", path="/out/checkpoint-500", weights_sha256="h1")
    assert ckpt != unhashed  # hashed weights are another identity
    # the final model with the same weights is the same snapshot, seen twice
    final = store.add_snapshot(run, 500, kind="final", path="/out", weights_sha256="h1", weights="raw")
    assert final == ckpt
    # the same path rewritten with other weights is a new snapshot
    rewritten = store.add_snapshot(run, 500, kind="final", path="/out", weights_sha256="h2", weights="ema")
    assert rewritten not in (ckpt, live, unhashed)
    snaps = {s["id"]: s for s in store.snapshots(run)}
    assert [(g["step"], g["kind"], g["path"]) for g in snaps[ckpt]["sightings"]] == [
        (500, "checkpoint", "/out/checkpoint-500"),
        (500, "final", "/out"),
    ]
    assert (snaps[rewritten]["weights"], snaps[rewritten]["kind"]) == ("ema", "final")
    assert snaps[live]["path"] is None and snaps[live]["created_at"] == 10.0 and snaps[live]["run_id"] == run
    assert _count(store.path, "snapshots") == 4 and _count(store.path, "sightings") == 5
    with pytest.raises(ValueError, match="kind 'folder' is unknown"):
        store.add_snapshot(run, 1, kind="folder")


def test_write_result_round_trip(store: Store) -> None:
    run = store.ensure_run("r", config={})
    s500 = store.add_snapshot(run, 500)
    s1000 = store.add_snapshot(run, 1000)
    # Written out of step order: views must sort by step.
    r1000 = store.write_result(s1000, _regurgitation_result(offset=1), config_hash="c1", started_at=100.0, host="gpu-7")
    result = _regurgitation_result()
    r500 = store.write_result(s500, result, config_hash="c1", started_at=time.time() - 2.0)
    loss = ProbeResult("membership", {"auc": 0.75, "loss_gap": 0.125}, items=[{"item": "img_2.png", "loss": 1.0}])
    rloss = store.write_result(s500, loss, config_hash="c2", started_at=50.0, finished_at=52.5, host="h")

    metrics = store.metrics(run)
    assert [(m["step"], m["probe"], m["metric"]) for m in metrics] == [
        (500, "membership", "auc"),
        (500, "membership", "loss_gap"),
        (500, "regurgitation", "distinct_memorized"),
        (500, "regurgitation", "mem_fraction"),
        (500, "regurgitation", "sim_p95"),
        (1000, "regurgitation", "distinct_memorized"),
        (1000, "regurgitation", "mem_fraction"),
        (1000, "regurgitation", "sim_p95"),
    ]
    by_key = {(m["result_id"], m["metric"]): m for m in metrics}
    for name, value in result.metrics.items():
        m = by_key[(r500, name)]
        assert m["value"] == value and m["snapshot_id"] == s500 and m["kind"] == "live"
    assert by_key[(rloss, "auc")]["value"] == 0.75

    matches = store.matches(run, probe="regurgitation")
    assert [(m["step"], m["sample"]) for m in matches] == [
        (500, "s000"),
        (500, "s001"),
        (500, "s002"),
        (1000, "s000"),
        (1000, "s001"),
        (1000, "s002"),
    ]
    for got, want in zip(matches[:3], result.matches, strict=True):
        assert got["result_id"] == r500 and got["probe"] == "regurgitation" and got["snapshot_id"] == s500
        for key, value in want.items():
            assert got[key] == value, key
        assert isinstance(got["memorized"], int)
    assert store.matches(run, probe="membership") == []
    assert len(store.matches(run)) == 6

    items = store.items(run)
    assert [(i["step"], i["probe"], i["item"]) for i in items] == [
        (500, "regurgitation", "img_0.png"),
        (500, "regurgitation", "img_1.png"),
        (500, "membership", "img_2.png"),
        (1000, "regurgitation", "img_0.png"),
        (1000, "regurgitation", "img_1.png"),
    ]
    assert items[0]["loss"] == 0.25 and items[0]["member"] is True and "member" not in items[1]
    assert [i["result_id"] for i in store.items(run, probe="membership")] == [rloss]

    results = store.results(run)
    assert [(r["step"], r["probe"], r["id"]) for r in results] == [
        (500, "membership", rloss),
        (500, "regurgitation", r500),
        (1000, "regurgitation", r1000),
    ]
    by_id = {r["id"]: r for r in results}
    assert by_id[rloss]["duration_s"] == 2.5 and by_id[rloss]["finished_at"] == 52.5
    assert by_id[rloss]["host"] == "h" and by_id[rloss]["status"] == "ok" and by_id[rloss]["error"] is None
    assert by_id[r1000]["host"] == "gpu-7" and by_id[r1000]["started_at"] == 100.0
    assert by_id[r500]["timings"] == result.timings and by_id[r500]["evidence"] == result.evidence
    assert 1.0 < by_id[r500]["duration_s"] < 60.0
    assert by_id[r500]["host"]  # defaults to this machine's name

    assert store.has_result(s500, "regurgitation", "c1")
    assert not store.has_result(s500, "regurgitation", "other-config")
    assert not store.has_result(s1000, "membership", "c2")


def test_nan_metric_and_match_values_round_trip(store: Store) -> None:
    run = store.ensure_run("r", config={})
    snap = store.add_snapshot(run, 1)
    res = ProbeResult(
        "regurgitation",
        {"nan_metric": float("nan"), "np_metric": np.float32(0.5), "none_metric": None, "inf": math.inf},
        matches=[{"sample": "s0", "seed": np.int64(3), "d1": float("nan"), "memorized": np.bool_(True)}],
        items=[{"item": "x", "losses": np.array([0.5, 1.5]), "nan": float("nan")}],
    )
    store.write_result(snap, res, config_hash="c")
    values = {m["metric"]: m["value"] for m in store.metrics(run)}
    assert math.isnan(values["nan_metric"]) and math.isnan(values["none_metric"])
    assert values["np_metric"] == 0.5 and values["inf"] == math.inf
    (match,) = store.matches(run)
    assert match["seed"] == 3 and match["memorized"] == 1
    assert math.isnan(match["d1"]) and math.isnan(match["d2"])  # d2 was never given
    assert match["nn1"] is None and match["copied"] is None
    (item,) = store.items(run)
    assert item["losses"] == [0.5, 1.5] and math.isnan(item["nan"])


def test_extra_match_keys_are_kept(store: Store) -> None:
    run = store.ensure_run("r", config={})
    snap = store.add_snapshot(run, 1)
    res = ProbeResult("faces", {"leak": 1.0}, matches=[{"sample": "s0", "identity": "alice", "tile": [1, 2]}])
    store.write_result(snap, res, config_hash="c")
    (match,) = store.matches(run)
    assert match["identity"] == "alice" and match["tile"] == [1, 2] and match["sample"] == "s0"


def test_duplicate_ok_result_returns_existing_id(store: Store) -> None:
    run = store.ensure_run("r", config={})
    snap = store.add_snapshot(run, 1)
    first = store.write_result(snap, _regurgitation_result(), config_hash="c")
    assert store.write_result(snap, _regurgitation_result(n=5), config_hash="c") == first
    assert len(store.matches(run)) == 3
    # A different configuration is a different result.
    assert store.write_result(snap, _regurgitation_result(), config_hash="d") != first


def test_failing_write_leaves_no_partial_rows(store: Store) -> None:
    run = store.ensure_run("r", config={})
    snap = store.add_snapshot(run, 1)
    bad = _regurgitation_result(n=3)
    # The second match row carries an integer SQLite cannot hold (64-bit limit): the probe_results
    # row, all metrics and the first match row are already inserted when it is refused.
    bad.matches[1]["seed"] = 2**70
    with pytest.raises(MemwatchError, match=r"matches\[1\]\['seed'\] 1180591620717411303424 is beyond 64 bits"):
        store.write_result(snap, bad, config_hash="c")
    bad_item = _regurgitation_result()
    bad_item.items.append({"item": "z", "value": object()})  # not JSON-serialisable, after everything else
    with pytest.raises(TypeError):
        store.write_result(snap, bad_item, config_hash="c")
    for table in ("probe_results", "metrics", "matches", "items"):
        assert _count(store.path, table) == 0, table
    assert not store.has_result(snap, "regurgitation", "c")
    assert store.metrics(run) == [] and store.results(run) == []
    # The store is still usable afterwards.
    good = store.write_result(snap, _regurgitation_result(), config_hash="c")
    assert {m["result_id"] for m in store.metrics(run)} == {good}
    assert _count(store.path, "matches") == 3


def test_record_failure(store: Store) -> None:
    run = store.ensure_run("r", config={})
    snap = store.add_snapshot(run, 7)
    fid = store.record_failure(snap, "regurgitation", config_hash="c", error="CUDA out of memory")
    store.record_failure(snap, "regurgitation", config_hash="c", error="again")  # retries are history
    assert not store.has_result(snap, "regurgitation", "c")
    results = store.results(run)
    assert [(r["id"], r["status"], r["error"], r["step"]) for r in results][0] == (
        fid,
        "failed",
        "CUDA out of memory",
        7,
    )
    assert len(results) == 2 and store.metrics(run) == []
    ok = store.write_result(snap, _regurgitation_result(), config_hash="c")
    assert store.has_result(snap, "regurgitation", "c")
    assert [r["status"] for r in store.results(run)] == ["failed", "failed", "ok"]
    assert store.results(run)[-1]["id"] == ok


def test_events_round_trip(store: Store) -> None:
    run = store.ensure_run("r", config={})
    later = {
        "step": 900,
        "rule": "mem_fraction_above",
        "severity": "warning",
        "metric": "mem_fraction",
        "value": 0.125,
        "threshold": 0.1,
        "forecast_step": None,
        "message": "mem_fraction 0.125 > 0.1",
        "evidence": {"samples": ["s000"], "result_id": 3},
        "created_at": 5.0,
    }
    earlier = {
        "step": 400,
        "rule": "forecast",
        "severity": "info",
        "metric": "mem_fraction",
        "value": 0.01,
        "threshold": 0.1,
        "forecast_step": 2000,
        "message": "crosses at ~2000",
    }
    e1 = store.add_event(run, later)
    e2 = store.add_event(run, earlier)
    events = store.events(run)
    assert [e["id"] for e in events] == [e2, e1]  # ordered by step
    got = events[1]
    for key, value in later.items():
        assert got[key] == value, key
    assert got["run_id"] == run
    assert events[0]["evidence"] == {} and events[0]["forecast_step"] == 2000 and events[0]["created_at"] > 0
    with pytest.raises(ValueError, match="unknown keys"):
        store.add_event(run, {**earlier, "colour": "red"})
    with pytest.raises(ValueError, match="severity"):
        store.add_event(run, {"step": 1, "rule": "x"})


def test_unknown_run_gives_empty_views(store: Store) -> None:
    assert store.runs() == []
    for view in (store.snapshots, store.metrics, store.matches, store.items, store.events, store.results):
        assert view(12345) == []


def test_two_stores_one_writing_one_reading(tmp_path: Path) -> None:
    path = tmp_path / "memwatch.db"
    writer = Store(path)
    reader = Store(path)
    run = writer.ensure_run("r", config={})
    n_results, n_metrics, n_matches = 30, 3, 20
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for step in range(n_results):
                snap = writer.add_snapshot(run, step)
                writer.write_result(snap, _regurgitation_result(n=n_matches, offset=step), config_hash="c")
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    reads = 0
    while thread.is_alive() or reads == 0:
        # Every read sees whole results only (each SELECT is a consistent WAL snapshot).
        counts: dict[int, int] = {}
        for m in reader.metrics(run):
            counts[m["result_id"]] = counts.get(m["result_id"], 0) + 1
        assert all(c == n_metrics for c in counts.values())
        match_counts: dict[int, int] = {}
        for m in reader.matches(run):
            match_counts[m["result_id"]] = match_counts.get(m["result_id"], 0) + 1
        assert all(c == n_matches for c in match_counts.values())
        # The reader may write too (waits on the busy timeout instead of failing).
        reader.ensure_run(f"reader-{reads % 3}", config={})
        reads += 1
    thread.join()
    assert not errors, errors
    assert len(reader.results(run)) == n_results
    assert len(reader.metrics(run)) == n_results * n_metrics
    assert len(reader.matches(run)) == n_results * n_matches
    assert {r["name"] for r in writer.runs()} >= {"r", "reader-0"}
    writer.close()
    reader.close()


_CHILD = textwrap.dedent(
    """
    import sys
    from memwatch.core.probe import ProbeResult
    from memwatch.store import Store

    store = Store(sys.argv[1])
    run = store.ensure_run("crash", config={})
    step = 0
    while True:
        snap = store.add_snapshot(run, step)
        matches = [{"sample": f"s{i:03d}", "seed": i, "nn1": f"img_{i}", "d1": 0.5, "d2": 1.0,
                    "ratio": 0.5, "memorized": 0} for i in range(N_MATCHES)]
        res = ProbeResult("regurgitation", {f"m{j}": float(step + j) for j in range(N_METRICS)},
                          matches=matches)
        rid = store.write_result(snap, res, config_hash="c")
        print(rid, step, flush=True)
        step += 1
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_killed_writer_loses_nothing_committed(tmp_path: Path) -> None:
    path = tmp_path / "memwatch.db"
    n_matches, n_metrics = 200, 4
    code = _CHILD.replace("N_MATCHES", str(n_matches)).replace("N_METRICS", str(n_metrics))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(60.0, proc.kill)  # a hung child must not hang the test suite
    watchdog.start()
    committed: dict[int, int] = {}
    try:
        while len(committed) < 5:
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.stderr.read()}"
            rid, step = map(int, line.split())
            committed[rid] = step
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    with Store(path) as store:
        assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        run = store.run_id("crash")
        results = {r["id"]: r for r in store.results(run)}
        metric_counts: dict[int, int] = {}
        for m in store.metrics(run):
            metric_counts[m["result_id"]] = metric_counts.get(m["result_id"], 0) + 1
        match_counts: dict[int, int] = {}
        for m in store.matches(run):
            match_counts[m["result_id"]] = match_counts.get(m["result_id"], 0) + 1
        for rid, step in committed.items():
            assert results[rid]["step"] == step and results[rid]["status"] == "ok"
            assert metric_counts.get(rid) == n_metrics
            assert match_counts.get(rid) == n_matches
        # Whatever else made it to disk is whole, too (all or nothing per result).
        assert set(metric_counts) == set(match_counts) == set(results)
        assert set(metric_counts.values()) == {n_metrics} and set(match_counts.values()) == {n_matches}
        # And the store accepts new writes after the crash.
        snap = store.add_snapshot(run, 10_000)
        store.write_result(snap, _regurgitation_result(), config_hash="c")
