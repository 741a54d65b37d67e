"""The store's tables, and the upgrades of stores written by older versions of memwatch.

A new store is created as schema 2 and upgraded like any old one, so every store reaches the current
schema by one path (:func:`upgrade`, one transaction per version):

* 1 -> 2: snapshots keyed by their weights instead of by step and path (the same weights seen twice become
  one snapshot with two sightings);
* 2 -> 3: a run is identified by its folder and data (``runs.identity``), not by its whole config, so an
  upgrade of memwatch or a change of settings no longer starts a new run; the configs a run was probed with
  are kept in ``run_configs``, the first one being the config the run was created with. Runs named as the
  checkpoint jobs named them (``<folder>@<12 hex>``) get their identity from that folder and their stored
  manifests; runs of the in-training monitor keep none (each training is its own run). The store's own
  cache of checkpoint file hashes is dropped (one file-hash cache serves every reader now);
* 3 -> 4: the ledger, a hash chain over every record (:mod:`memwatch.store.ledger`); the rows already there
  are adopted into it, so later edits are evident (what happened to them before the upgrade is not attested).

Statements are executed one by one inside a transaction (``executescript`` would commit first).
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

from memwatch.errors import MemwatchError
from memwatch.hashing import run_identity_hash
from memwatch.store.ledger import LEDGER_SCHEMA, adopt_all

SCHEMA_VERSION = 4

#: The tables of a schema-2 store (new stores are created as schema 2 and upgraded, so there is one path).
SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        config_json TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        reference_json TEXT,
        holdout_json TEXT,
        info_json TEXT
    )""",
    # One row per distinct set of weights of a run. step/kind/path are those of its first sighting.
    """CREATE TABLE IF NOT EXISTS snapshots (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL DEFAULT '',
        weights_sha256 TEXT,
        weights TEXT,
        info_json TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    )""",
    # Weights are the identity; a snapshot whose weights could not be hashed (its folder failed to
    # load) is identified by where it was seen.
    """CREATE UNIQUE INDEX IF NOT EXISTS snapshots_weights
        ON snapshots (run_id, weights_sha256) WHERE weights_sha256 IS NOT NULL""",
    """CREATE UNIQUE INDEX IF NOT EXISTS snapshots_unhashed
        ON snapshots (run_id, step, kind, path) WHERE weights_sha256 IS NULL""",
    """CREATE TABLE IF NOT EXISTS sightings (
        id INTEGER PRIMARY KEY,
        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL DEFAULT '',
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        UNIQUE (snapshot_id, step, kind, path)
    )""",
    """CREATE TABLE IF NOT EXISTS probe_results (
        id INTEGER PRIMARY KEY,
        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        probe TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error TEXT,
        started_at REAL,
        finished_at REAL NOT NULL,
        duration_s REAL,
        host TEXT,
        timings_json TEXT NOT NULL DEFAULT '{}',
        evidence_json TEXT NOT NULL DEFAULT '[]'
    )""",
    # At most one successful result per (snapshot, probe, config): views never double-count.
    # Failed attempts are history and may repeat.
    """CREATE UNIQUE INDEX IF NOT EXISTS probe_results_ok
        ON probe_results (snapshot_id, probe, config_hash) WHERE status = 'ok'""",
    "CREATE INDEX IF NOT EXISTS probe_results_snapshot ON probe_results (snapshot_id, probe)",
    """CREATE TABLE IF NOT EXISTS metrics (
        result_id INTEGER NOT NULL REFERENCES probe_results(id) ON DELETE CASCADE,
        snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        probe TEXT NOT NULL,
        metric TEXT NOT NULL,
        value REAL,
        PRIMARY KEY (result_id, metric)
    )""",
    "CREATE INDEX IF NOT EXISTS metrics_snapshot ON metrics (snapshot_id, probe, metric)",
    """CREATE TABLE IF NOT EXISTS matches (
        result_id INTEGER NOT NULL REFERENCES probe_results(id) ON DELETE CASCADE,
        sample TEXT NOT NULL,
        seed INTEGER,
        nn1 TEXT,
        d1 REAL,
        d2 REAL,
        ratio REAL,
        similarity REAL,
        extraction REAL,
        memorized INTEGER,
        copied INTEGER,
        extracted INTEGER,
        extra_json TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS matches_result ON matches (result_id, sample)",
    # Per-training-image trajectories ("which steps regurgitate image X") look matches up by nn1.
    "CREATE INDEX IF NOT EXISTS matches_nn1 ON matches (nn1)",
    """CREATE TABLE IF NOT EXISTS items (
        result_id INTEGER NOT NULL REFERENCES probe_results(id) ON DELETE CASCADE,
        item TEXT,
        data_json TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS items_result ON items (result_id, item)",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        snapshot_id INTEGER REFERENCES snapshots(id) ON DELETE SET NULL,
        step INTEGER,
        rule TEXT NOT NULL,
        severity TEXT NOT NULL,
        metric TEXT,
        value REAL,
        threshold REAL,
        forecast_step INTEGER,
        message TEXT NOT NULL DEFAULT '',
        evidence_json TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_run ON events (run_id, step)",
    # A rule fires at most once per probed snapshot: replaying a run never records an event twice.
    """CREATE UNIQUE INDEX IF NOT EXISTS events_once
        ON events (run_id, rule, step, snapshot_id) WHERE snapshot_id IS NOT NULL""",
    # The training-set analysis (memwatch data) of a run's reference set, made once at its first probe.
    # Added without a schema-version change: an older store simply has none (readers tolerate that).
    """CREATE TABLE IF NOT EXISTS training_sets (
        run_id INTEGER PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
        manifest_sha256 TEXT,
        analysis_json TEXT,
        error TEXT,
        created_at REAL NOT NULL
    )""",
)

#: What schema 3 adds (created with ``IF NOT EXISTS`` at every open, after the upgrade added the columns).
SCHEMA_V3 = (
    # Every config a run was probed with, in the order first used (the run's row keeps its first).
    """CREATE TABLE IF NOT EXISTS run_configs (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        config_hash TEXT NOT NULL,
        config_json TEXT NOT NULL,
        first_used REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS run_configs_run ON run_configs (run_id, id)",
    "CREATE INDEX IF NOT EXISTS runs_identity ON runs (identity)",
)
#: What a run's training was changed by (memwatch.interventions): which kind, from which step, on which
#: images, with what settings. Added without a schema-version change: an older store simply has none.
INTERVENTIONS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS interventions (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        step INTEGER,
        kind TEXT NOT NULL,
        images_json TEXT NOT NULL DEFAULT '[]',
        detail_json TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS interventions_run ON interventions (run_id, id)",
)
#: Every table and index of the current schema (schema 4 adds the ledger).
SCHEMA = SCHEMA_V2 + SCHEMA_V3 + LEDGER_SCHEMA + INTERVENTIONS_SCHEMA

#: The name the checkpoint jobs gave a run before schema 3: ``<folder>@<first 12 hex of the config hash>``.
_JOB_RUN_NAME = re.compile(r"^(?P<folder>.+)@[0-9a-f]{12}$")


def upgrade(conn: sqlite3.Connection, version: int, path: Path) -> int:
    """Upgrade the store open on ``conn`` (inside a transaction) from ``version`` to the next; returns it.

    Raises:
        MemwatchError: a version this memwatch does not know.
    """
    if version == 1:
        _upgrade_1(conn)
    elif version == 2:
        _upgrade_2(conn)
    elif version == 3:
        _upgrade_3(conn)
    else:
        raise MemwatchError(f"store {path} has an unknown schema version {version}: use another store file")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version + 1),))
    return version + 1


def _upgrade_1(c: sqlite3.Connection) -> None:
    """Schema 1 (snapshots keyed by step and path) to weights-keyed snapshots with sightings."""
    c.execute("ALTER TABLE snapshots RENAME TO snapshots_v1")
    c.execute("ALTER TABLE events ADD COLUMN snapshot_id INTEGER")
    for statement in SCHEMA_V2:
        c.execute(statement)
    keep: dict[tuple[int, str], int] = {}
    for row in c.execute("SELECT * FROM snapshots_v1 ORDER BY id").fetchall():
        sid, run, step, path, sha, kind, created = (row[0], row[1], row[2], row[3], row[4], row[5], row[6])
        target = keep.get((run, sha)) if sha else None
        if target is None:
            c.execute(
                "INSERT INTO snapshots (id, run_id, step, kind, path, weights_sha256, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sid, run, step, kind, path, sha, created),
            )
            target = sid
            if sha:
                keep[(run, sha)] = sid
        else:  # the same weights seen twice: one snapshot, its duplicate results dropped
            dup = [
                r[0]
                for r in c.execute(
                    "SELECT id FROM probe_results p WHERE snapshot_id = ? AND status = 'ok' AND EXISTS "
                    "(SELECT 1 FROM probe_results o WHERE o.snapshot_id = ? AND o.probe = p.probe AND "
                    "o.config_hash = p.config_hash AND o.status = 'ok')",
                    (sid, target),
                ).fetchall()
            ]
            for table in ("metrics", "matches", "items"):
                c.executemany(f"DELETE FROM {table} WHERE result_id = ?", [(r,) for r in dup])
            c.executemany("DELETE FROM probe_results WHERE id = ?", [(r,) for r in dup])
            for table in ("probe_results", "metrics"):
                c.execute(f"UPDATE {table} SET snapshot_id = ? WHERE snapshot_id = ?", (target, sid))
        c.execute(
            "INSERT OR IGNORE INTO sightings (snapshot_id, step, kind, path, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (target, step, kind, path, created, created),
        )
    c.execute("DROP TABLE snapshots_v1")


def _upgrade_2(c: sqlite3.Connection) -> None:
    """Schema 2 to run identities and the configs a run was probed with."""
    c.execute("ALTER TABLE runs ADD COLUMN identity TEXT")
    # Checkpoint file hashes are remembered in the one file-hash cache (memwatch.data.file_hashes) now.
    c.execute("DROP TABLE IF EXISTS file_hashes")
    for statement in SCHEMA_V3:
        c.execute(statement)
    runs = c.execute("SELECT id, name, created_at, config_json, config_hash, reference_json, holdout_json FROM runs")
    for run_id, name, created, config_json, chash, reference, holdout in runs.fetchall():
        c.execute(
            "INSERT INTO run_configs (run_id, config_hash, config_json, first_used) VALUES (?, ?, ?, ?)",
            (run_id, chash, config_json, created),
        )
        job = _JOB_RUN_NAME.match(name)
        if job is not None:
            identity = run_identity_hash(job["folder"], _manifest(reference), _manifest(holdout))
            c.execute("UPDATE runs SET identity = ? WHERE id = ?", (identity, run_id))


def _upgrade_3(c: sqlite3.Connection) -> None:
    """Schema 3 to the ledger: every existing record adopted into the hash chain."""
    for statement in LEDGER_SCHEMA:
        c.execute(statement)
    adopt_all(c)


def _manifest(summary_json: str | None) -> str | None:
    """The manifest sha256 of a stored set summary, or None."""
    if not summary_json:
        return None
    try:
        summary = json.loads(summary_json)
    except ValueError:
        return None
    value = summary.get("manifest_sha256") if isinstance(summary, dict) else None
    return value if isinstance(value, str) else None
