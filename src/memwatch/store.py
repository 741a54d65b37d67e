"""The store: one SQLite file that is the single source of truth for a run.

Runs, snapshots (a live model at a step, or a checkpoint folder), probe results with their metric,
match and item rows, and alert events all live here; curves, warnings and reports are read back
through the view methods (``metrics``, ``matches``, ``items``, ``events``...), so a report can be
rebuilt at any time from this file alone.

Durability and concurrency choices (see DESIGN.md, "Conventions"):

* WAL journal, so a reader (``memwatch report`` while training runs) never blocks the writer and
  the writer never blocks readers;
* ``synchronous=FULL``: a commit is on disk before ``write_result`` returns, so a training job that
  is killed loses at most the result it was writing, never one it already reported;
* one ``BEGIN IMMEDIATE`` transaction per probe result: all of its rows, or none;
* a busy timeout, so a second writer (``watch`` beside an in-training monitor) waits instead of
  failing with "database is locked".

Example:
    >>> with Store("out/memwatch/memwatch.db") as store:  # doctest: +SKIP
    ...     run = store.ensure_run("sd-faces", config={"probes": ["regurgitation"]})
    ...     snap = store.add_snapshot(run, 500, kind="checkpoint", path="out/checkpoint-500")
    ...     store.write_result(snap, result, config_hash="3f2a...")
    ...     store.metrics(run)[0]["value"]
"""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.hashing import canonical_json, config_hash
from memwatch.probes.base import ProbeResult

SCHEMA_VERSION = 1
#: file name of the store inside a run's memwatch folder (every front-end writes and reads this name)
STORE_NAME = "memwatch.sqlite"
#: memwatch's folder inside a training output dir (DESIGN.md: OUTPUT_DIR/memwatch/)
OUTPUT_SUBDIR = "memwatch"

# Seconds a connection waits for another writer's lock before giving up. Probe results are small
# transactions (milliseconds); 30 s covers a slow disk or a reader checkpointing the WAL.
BUSY_TIMEOUT_S = 30.0

# Typed columns of the matches table (ProbeResult.matches keys); any other key of a match row is
# kept in ``extra_json`` and merged back on read, so nothing a probe reports is dropped.
_MATCH_TEXT = ("sample", "nn1")
_MATCH_REAL = ("d1", "d2", "ratio", "similarity", "extraction")
_MATCH_INT = ("seed", "memorized", "copied", "extracted")
_MATCH_COLUMNS = ("sample", "seed", "nn1", *_MATCH_REAL, "memorized", "copied", "extracted")

_EVENT_KEYS = frozenset(
    {
        "step",
        "rule",
        "severity",
        "metric",
        "value",
        "threshold",
        "forecast_step",
        "message",
        "evidence",
        "created_at",
    }
)

# Executed one by one inside the opening transaction (executescript would commit first).
_SCHEMA = (
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
    # path is '' (not NULL) for live snapshots: NULLs are all distinct in a UNIQUE key.
    """CREATE TABLE IF NOT EXISTS snapshots (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        path TEXT NOT NULL DEFAULT '',
        weights_sha256 TEXT,
        kind TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (run_id, step, kind, path)
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
)


class Store:
    """A memwatch SQLite store (created if missing); usable as a context manager.

    One ``Store`` may be shared by threads (calls are serialised by a lock); several ``Store``
    objects, in one process or many, may open the same file at once.

    Args:
        path: the database file; parent folders are created.

    Raises:
        MemwatchError: the file is not a SQLite database, cannot be opened, or was written by a
            newer memwatch (schema version above :data:`SCHEMA_VERSION`).

    Example:
        >>> with Store(tmp_path / "memwatch.db") as store:  # doctest: +SKIP
        ...     run = store.ensure_run("demo", config={})
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemwatchError(f"cannot create the folder for store {self.path}: {e}") from None
        try:
            # isolation_level=None: no implicit transactions; every write opens its own
            # BEGIN IMMEDIATE below, so transaction boundaries are exactly ours.
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            raise MemwatchError(f"cannot open store {self.path}: {e}; pass a writable file path") from None
        try:
            self._configure()
            self._init_schema()
        except MemwatchError:
            self._conn.close()
            raise
        except sqlite3.Error as e:
            self._conn.close()
            raise MemwatchError(
                f"cannot open store {self.path}: {e}; is it a memwatch database? "
                "Point the store at a new file or delete the broken one"
            ) from None

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (committed data is already on disk)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _configure(self) -> None:
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # Some network file systems refuse WAL; the store still works (rollback journal),
            # but readers then block the writer.
            warnings.warn(
                f"store {self.path}: SQLite refused WAL mode (journal_mode={mode}); "
                "put the store on a local disk for concurrent readers",
                stacklevel=3,
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")

    def _init_schema(self) -> None:
        with self._transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            else:
                try:
                    version = int(row[0])
                except ValueError:
                    version = -1
                if version > SCHEMA_VERSION:
                    raise MemwatchError(
                        f"store {self.path} has schema version {version}, newer than this memwatch "
                        f"understands ({SCHEMA_VERSION}): upgrade memwatch or use another store file"
                    )
                if version < 1:
                    raise MemwatchError(
                        f"store {self.path} has an unknown schema version {row[0]!r}: use another store file"
                    )
            for statement in _SCHEMA:
                conn.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back on any exception (all or nothing)."""
        with self._lock:
            conn = self._conn
            # IMMEDIATE takes the write lock up front, so a concurrent writer waits (busy
            # timeout) at BEGIN instead of failing halfway with an upgrade deadlock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Some errors (disk full, I/O) make SQLite roll back on its own.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._conn.cursor()
            cur.row_factory = sqlite3.Row
            return cur.execute(sql, params).fetchall()

    # -- writes ----------------------------------------------------------------------------------

    def ensure_run(
        self,
        name: str,
        *,
        config: dict[str, Any],
        reference: dict[str, Any] | None = None,
        holdout: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        created_at: float | None = None,
    ) -> int:
        """Id of the run called ``name``, creating it if missing (an existing run is not changed).

        Args:
            name: unique run name.
            config: the run's configuration; stored as JSON with ``hashing.config_hash(config)``.
            reference: summary of the reference set (``n``, ``skipped``, ``manifest_sha256``, ``root``).
            holdout: the same summary for the holdout set.
            info: environment facts (package versions, host).
            created_at: ``time.time()`` stamp; now if None.

        Example:
            >>> run_id = store.ensure_run("sd-faces", config={"every": 500})  # doctest: +SKIP
        """
        row = (
            name,
            _now(created_at),
            canonical_json(config),
            config_hash(config),
            _json_or_none(reference),
            _json_or_none(holdout),
            _json_or_none(info),
        )
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO runs (name, created_at, config_json, config_hash, reference_json, "
                "holdout_json, info_json) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                row,
            )
            return conn.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()[0]

    def add_snapshot(
        self,
        run_id: int,
        step: int,
        *,
        kind: str = "live",
        path: str | Path | None = None,
        weights_sha256: str | None = None,
        created_at: float | None = None,
    ) -> int:
        """Id of the snapshot ``(run_id, step, kind, path)``, creating it if missing.

        An existing row is kept; only a missing ``weights_sha256`` is filled in when one is given
        (the hash of a checkpoint may be computed after it was first seen).

        Args:
            run_id: id from :meth:`ensure_run`.
            step: training step of the weights.
            kind: ``"live"`` (a module inside training) or ``"checkpoint"`` (a saved folder).
            path: checkpoint folder, or None for a live snapshot.
            weights_sha256: hash of the weights file, if known.
            created_at: ``time.time()`` stamp; now if None.

        Example:
            >>> snap = store.add_snapshot(run_id, 500, kind="checkpoint", path="out/checkpoint-500")  # doctest: +SKIP
        """
        key = (int(run_id), int(step), kind, "" if path is None else str(path))
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO snapshots (run_id, step, kind, path, weights_sha256, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, step, kind, path) DO UPDATE SET "
                "weights_sha256 = COALESCE(snapshots.weights_sha256, excluded.weights_sha256)",
                (*key, weights_sha256, _now(created_at)),
            )
            return conn.execute(
                "SELECT id FROM snapshots WHERE run_id = ? AND step = ? AND kind = ? AND path = ?", key
            ).fetchone()[0]

    def write_result(
        self,
        snapshot_id: int,
        result: ProbeResult,
        *,
        config_hash: str,
        started_at: float | None = None,
        finished_at: float | None = None,
        host: str | None = None,
    ) -> int:
        """Write one probe result with all its metric, match and item rows in ONE transaction.

        Either everything is stored or (on any error, including a value SQLite cannot hold)
        nothing is. If an ``ok`` result for ``(snapshot_id, result.probe, config_hash)`` already
        exists (two front-ends raced on the same snapshot), nothing is written and the existing
        id is returned.

        Args:
            snapshot_id: id from :meth:`add_snapshot`.
            result: the probe's output. Metric values NaN/None are stored as NULL (read back as
                NaN); match keys outside the typed columns are kept as JSON; item rows may carry
                an ``"item"`` key (their id) and any JSON-serialisable values.
            config_hash: hash of the probe's configuration (the result's cache key).
            started_at: when the probe started (``time.time()``); duration is stored if given.
            finished_at: when it finished; now if None.
            host: machine name; this machine's if None.

        Returns:
            The probe_results id.

        Example:
            >>> rid = store.write_result(snap, ProbeResult("loss", {"auc": 0.61}), config_hash="ab12")  # doctest: +SKIP
        """
        finished = _now(finished_at)
        duration = None if started_at is None else finished - float(started_at)
        with self._transaction() as conn:
            existing = conn.execute(
                "SELECT id FROM probe_results WHERE snapshot_id = ? AND probe = ? AND config_hash = ? "
                "AND status = 'ok'",
                (snapshot_id, result.probe, config_hash),
            ).fetchone()
            if existing is not None:
                return existing[0]
            cur = conn.execute(
                "INSERT INTO probe_results (snapshot_id, probe, config_hash, status, started_at, "
                "finished_at, duration_s, host, timings_json, evidence_json) "
                "VALUES (?, ?, ?, 'ok', ?, ?, ?, ?, ?, ?)",
                (
                    snapshot_id,
                    result.probe,
                    config_hash,
                    started_at,
                    finished,
                    duration,
                    host if host is not None else socket.gethostname(),
                    _dumps({k: _real(v, f"timings[{k!r}]") for k, v in result.timings.items()}),
                    _dumps([str(p) for p in result.evidence]),
                ),
            )
            result_id = cur.lastrowid
            conn.executemany(
                "INSERT INTO metrics (result_id, snapshot_id, probe, metric, value) VALUES (?, ?, ?, ?, ?)",
                (
                    (result_id, snapshot_id, result.probe, str(name), _real(value, f"metric {name!r}"))
                    for name, value in result.metrics.items()
                ),
            )
            conn.executemany(
                f"INSERT INTO matches (result_id, {', '.join(_MATCH_COLUMNS)}, extra_json) "
                f"VALUES (?, {', '.join('?' * len(_MATCH_COLUMNS))}, ?)",
                (_match_row(result_id, i, row) for i, row in enumerate(result.matches)),
            )
            conn.executemany(
                "INSERT INTO items (result_id, item, data_json) VALUES (?, ?, ?)",
                (_item_row(result_id, i, row) for i, row in enumerate(result.items)),
            )
            return result_id

    def record_failure(
        self,
        snapshot_id: int,
        probe: str,
        *,
        config_hash: str,
        error: str,
        started_at: float | None = None,
        finished_at: float | None = None,
        host: str | None = None,
    ) -> int:
        """Record that ``probe`` failed on a snapshot (status ``'failed'``), so it is reported.

        Args:
            snapshot_id: id from :meth:`add_snapshot`.
            probe: probe name.
            config_hash: hash of the probe's configuration.
            error: one-line description of what went wrong.
            started_at, finished_at, host: as in :meth:`write_result`.

        Example:
            >>> store.record_failure(snap, "regurgitation", config_hash="ab12", error="CUDA OOM")  # doctest: +SKIP
        """
        finished = _now(finished_at)
        duration = None if started_at is None else finished - float(started_at)
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO probe_results (snapshot_id, probe, config_hash, status, error, started_at, "
                "finished_at, duration_s, host) VALUES (?, ?, ?, 'failed', ?, ?, ?, ?, ?)",
                (
                    snapshot_id,
                    probe,
                    config_hash,
                    str(error),
                    started_at,
                    finished,
                    duration,
                    host if host is not None else socket.gethostname(),
                ),
            )
            return cur.lastrowid

    def has_result(self, snapshot_id: int, probe: str, config_hash: str) -> bool:
        """True if a successful result for ``(snapshot_id, probe, config_hash)`` is stored.

        Example:
            >>> if not store.has_result(snap, "membership", cfg_hash): ...  # doctest: +SKIP
        """
        rows = self._query(
            "SELECT 1 FROM probe_results WHERE snapshot_id = ? AND probe = ? AND config_hash = ? "
            "AND status = 'ok' LIMIT 1",
            (snapshot_id, probe, config_hash),
        )
        return bool(rows)

    def add_event(self, run_id: int, event: Mapping[str, Any]) -> int:
        """Store an alert event (every call adds a row; rules decide what is new).

        Args:
            run_id: id from :meth:`ensure_run`.
            event: ``step``, ``rule``, ``severity``, ``metric``, ``value``, ``threshold``,
                ``forecast_step``, ``message``, ``evidence`` (a dict, stored as JSON) and optional
                ``created_at``. ``rule`` and ``severity`` are required; other keys default to None.

        Raises:
            ValueError: an unknown key, or a missing ``rule``/``severity``.

        Example:
            >>> store.add_event(run, {"step": 900, "rule": "mem_fraction_above", "severity": "warning",
            ...                       "metric": "mem_fraction", "value": 0.12, "threshold": 0.1,
            ...                       "message": "mem_fraction 0.12 > 0.1"})  # doctest: +SKIP
        """
        unknown = set(event) - _EVENT_KEYS
        if unknown:
            raise ValueError(f"add_event: unknown keys {sorted(unknown)}; allowed: {sorted(_EVENT_KEYS)}")
        for required in ("rule", "severity"):
            if event.get(required) is None:
                raise ValueError(f"add_event: the event needs a {required!r}")
        row = (
            run_id,
            _int(event.get("step"), "event step"),
            str(event["rule"]),
            str(event["severity"]),
            None if event.get("metric") is None else str(event["metric"]),
            _real(event.get("value"), "event value"),
            _real(event.get("threshold"), "event threshold"),
            _int(event.get("forecast_step"), "event forecast_step"),
            str(event.get("message") or ""),
            _dumps(event.get("evidence") or {}),
            _now(event.get("created_at")),
        )
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO events (run_id, step, rule, severity, metric, value, threshold, forecast_step, "
                "message, evidence_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return cur.lastrowid

    # -- views -----------------------------------------------------------------------------------

    def run_id(self, name: str) -> int | None:
        """Id of the run called ``name``, or None.

        Example:
            >>> store.run_id("sd-faces")  # doctest: +SKIP
            1
        """
        rows = self._query("SELECT id FROM runs WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def runs(self) -> list[dict[str, Any]]:
        """All runs by id: ``id, name, created_at, config, config_hash, reference, holdout, info``
        (the JSON columns decoded; None where not given).

        Example:
            >>> [r["name"] for r in store.runs()]  # doctest: +SKIP
            ['sd-faces']
        """
        out = []
        for r in self._query("SELECT * FROM runs ORDER BY id"):
            out.append(
                {
                    "id": r["id"],
                    "name": r["name"],
                    "created_at": r["created_at"],
                    "config": json.loads(r["config_json"]),
                    "config_hash": r["config_hash"],
                    "reference": _loads_or_none(r["reference_json"]),
                    "holdout": _loads_or_none(r["holdout_json"]),
                    "info": _loads_or_none(r["info_json"]),
                }
            )
        return out

    def snapshots(self, run_id: int) -> list[dict[str, Any]]:
        """Snapshots of a run by step, kind, path: ``id, run_id, step, kind, path`` (None for live),
        ``weights_sha256, created_at``.

        Example:
            >>> [s["step"] for s in store.snapshots(run)]  # doctest: +SKIP
            [500, 1000]
        """
        rows = self._query(
            "SELECT id, run_id, step, kind, path, weights_sha256, created_at FROM snapshots "
            "WHERE run_id = ? ORDER BY step, kind, path, id",
            (run_id,),
        )
        return [{**dict(r), "path": r["path"] or None} for r in rows]

    def results(self, run_id: int) -> list[dict[str, Any]]:
        """Probe results (ok and failed) by step, probe, id: the probe_results columns plus
        ``step`` and ``kind``, with ``timings`` (dict) and ``evidence`` (list) decoded.

        Example:
            >>> [(r["step"], r["probe"], r["status"]) for r in store.results(run)]  # doctest: +SKIP
            [(500, 'regurgitation', 'ok')]
        """
        rows = self._query(
            "SELECT r.*, s.step, s.kind FROM probe_results r JOIN snapshots s ON s.id = r.snapshot_id "
            "WHERE s.run_id = ? ORDER BY s.step, r.probe, r.id",
            (run_id,),
        )
        out = []
        for r in rows:
            d = dict(r)
            d["timings"] = json.loads(d.pop("timings_json"))
            d["evidence"] = json.loads(d.pop("evidence_json"))
            out.append(d)
        return out

    def metrics(self, run_id: int) -> list[dict[str, Any]]:
        """Metric rows by step, probe, metric: ``step, kind, probe, metric, value`` (NaN where
        undefined), ``snapshot_id, result_id``.

        Example:
            >>> [(m["step"], m["value"]) for m in store.metrics(run) if m["metric"] == "mem_fraction"]  # doctest: +SKIP
            [(500, 0.0), (1000, 0.125)]
        """
        rows = self._query(
            "SELECT s.step, s.kind, m.probe, m.metric, m.value, m.snapshot_id, m.result_id "
            "FROM metrics m JOIN snapshots s ON s.id = m.snapshot_id WHERE s.run_id = ? "
            "ORDER BY s.step, m.probe, m.metric, s.kind, m.snapshot_id, m.result_id",
            (run_id,),
        )
        return [{**dict(r), "value": _nan_if_none(r["value"])} for r in rows]

    def matches(self, run_id: int, probe: str | None = None) -> list[dict[str, Any]]:
        """Per-sample match rows by step, sample: the match columns (REAL ones NaN where
        undefined; flags as 0/1/None) and any extra keys, plus ``step, kind, probe, snapshot_id,
        result_id``.

        Args:
            run_id: the run.
            probe: only rows of this probe, if given.

        Example:
            >>> [(m["step"], m["seed"], m["nn1"]) for m in store.matches(run) if m["memorized"]]  # doctest: +SKIP
            [(1000, 7, 'img_003.png')]
        """
        sql = (
            f"SELECT s.step, s.kind, r.probe, r.snapshot_id, x.result_id, "
            f"{', '.join('x.' + c for c in _MATCH_COLUMNS)}, x.extra_json "
            "FROM matches x JOIN probe_results r ON r.id = x.result_id "
            "JOIN snapshots s ON s.id = r.snapshot_id WHERE s.run_id = ?"
        )
        params: tuple[Any, ...] = (run_id,)
        if probe is not None:
            sql += " AND r.probe = ?"
            params += (probe,)
        sql += " ORDER BY s.step, x.sample, r.probe, s.kind, x.result_id, x.rowid"
        out = []
        for r in self._query(sql, params):
            d = dict(r)
            extra = d.pop("extra_json")
            for c in _MATCH_REAL:
                d[c] = _nan_if_none(d[c])
            if extra:
                # Typed columns win over extras of the same name (extras never contain them).
                d = {**json.loads(extra), **d}
            out.append(d)
        return out

    def items(self, run_id: int, probe: str | None = None) -> list[dict[str, Any]]:
        """Per-item rows by step, item: ``item`` and the row's other keys (decoded from JSON),
        plus ``step, kind, probe, snapshot_id, result_id``.

        Args:
            run_id: the run.
            probe: only rows of this probe, if given.

        Example:
            >>> [(i["step"], i["item"], i["loss"]) for i in store.items(run, "membership")]  # doctest: +SKIP
            [(500, 'img_000.png', 0.081)]
        """
        sql = (
            "SELECT s.step, s.kind, r.probe, r.snapshot_id, x.result_id, x.item, x.data_json "
            "FROM items x JOIN probe_results r ON r.id = x.result_id "
            "JOIN snapshots s ON s.id = r.snapshot_id WHERE s.run_id = ?"
        )
        params: tuple[Any, ...] = (run_id,)
        if probe is not None:
            sql += " AND r.probe = ?"
            params += (probe,)
        sql += " ORDER BY s.step, x.item, r.probe, s.kind, x.result_id, x.rowid"
        out = []
        for r in self._query(sql, params):
            d = dict(r)
            d = {**json.loads(d.pop("data_json")), **d}
            out.append(d)
        return out

    def events(self, run_id: int) -> list[dict[str, Any]]:
        """Alert events by step, id: the events columns with ``evidence`` decoded (value and
        threshold None where not given).

        Example:
            >>> [(e["step"], e["severity"], e["message"]) for e in store.events(run)]  # doctest: +SKIP
            [(900, 'warning', 'mem_fraction 0.12 > 0.1')]
        """
        rows = self._query("SELECT * FROM events WHERE run_id = ? ORDER BY step, id", (run_id,))
        out = []
        for r in rows:
            d = dict(r)
            d["evidence"] = json.loads(d.pop("evidence_json"))
            out.append(d)
        return out


# -- value conversion ---------------------------------------------------------------------------


def _now(t: float | None) -> float:
    return time.time() if t is None else float(t)


def _unwrap(v: Any) -> Any:
    """numpy scalars and 0-d tensors -> Python numbers (sqlite3 cannot bind np.float32/np.int64)."""
    if v is not None and not isinstance(v, str | bytes | int | float) and hasattr(v, "item"):
        return v.item()
    return v


def _real(v: Any, what: str) -> float | None:
    """A REAL column value; None and NaN become NULL (SQLite cannot store NaN)."""
    v = _unwrap(v)
    if v is None:
        return None
    if isinstance(v, str | bytes):
        raise TypeError(f"{what}: expected a number, got {type(v).__name__} {v!r}")
    f = float(v)
    return None if math.isnan(f) else f


def _int(v: Any, what: str) -> int | None:
    v = _unwrap(v)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if not isinstance(v, int):
        raise TypeError(f"{what}: expected an integer, got {type(v).__name__} {v!r}")
    return int(v)


def _text(v: Any, what: str) -> str | None:
    v = _unwrap(v)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int | Path) and not isinstance(v, bool):
        return str(v)
    raise TypeError(f"{what}: expected a string, got {type(v).__name__} {v!r}")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy arrays/scalars, tensors
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_json_default)


def _json_or_none(obj: Any) -> str | None:
    return None if obj is None else _dumps(obj)


def _loads_or_none(s: str | None) -> Any:
    return None if s is None else json.loads(s)


def _nan_if_none(v: float | None) -> float:
    return math.nan if v is None else v


def _match_row(result_id: int, i: int, row: Mapping[str, Any]) -> tuple[Any, ...]:
    """Converted per row while the transaction is open, so a bad row aborts the whole result."""
    values: dict[str, Any] = {}
    for c in _MATCH_TEXT:
        values[c] = _text(row.get(c), f"matches[{i}][{c!r}]")
    for c in _MATCH_REAL:
        values[c] = _real(row.get(c), f"matches[{i}][{c!r}]")
    for c in _MATCH_INT:
        values[c] = _int(row.get(c), f"matches[{i}][{c!r}]")
    extra = {k: v for k, v in row.items() if k not in values}
    return (result_id, *(values[c] for c in _MATCH_COLUMNS), _dumps(extra) if extra else None)


def _item_row(result_id: int, i: int, row: Mapping[str, Any]) -> tuple[Any, ...]:
    data = {k: v for k, v in row.items() if k != "item"}
    return (result_id, _text(row.get("item"), f"items[{i}]['item']"), _dumps(data))
