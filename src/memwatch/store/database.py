"""The store: one SQLite file that is the single source of truth for a run.

Runs, snapshots, probe results with their metric, match and item rows, and alert events all live
here; curves, warnings and reports are read back through the view methods (``metrics``, ``matches``,
``items``, ``events``...), so a report can be rebuilt at any time from this file alone.

**A snapshot is a set of weights**, identified by the sha256 of its weights (a file's hash for a
folder, :func:`memwatch.hashing.state_sha256` for a live module). Where and when those weights were
seen are its *sightings*: ``(step, kind, path)`` with kind ``live``, ``checkpoint`` or ``final``. The
same weights seen twice (a final pipeline equal to the last checkpoint, the same file under two
names) are one snapshot with two sightings, measured once; a file rewritten at the same path is a
new snapshot. Results belong to snapshots.

Durability and concurrency choices (see DESIGN.md, "Conventions"):

* WAL journal, so a reader (``memwatch report`` while training runs) never blocks the writer and
  the writer never blocks readers;
* ``synchronous=FULL``: a commit is on disk before the call returns, so a killed job loses at most
  the result it was writing, never one it already reported;
* one ``BEGIN IMMEDIATE`` transaction per call, or per :meth:`Store.batch` block: a probed step's
  snapshot, results and the events they raise are written together or not at all;
* a busy timeout, so a second writer (``watch`` beside an in-training monitor) waits instead of
  failing with "database is locked".

Readers (``memwatch curves``, ``memwatch report``) open stores with ``readonly=True``: they never
write, work on archived read-only copies, and refuse a file that is not a memwatch store without
touching it. Every SQLite error becomes one :class:`MemwatchError` line that names the file and says
what is wrong (full disk, read-only, not a memwatch store, corrupt).

Example:
    >>> import tempfile
    >>> from memwatch.core.probe import ProbeResult
    >>> with Store(Path(tempfile.mkdtemp()) / "memwatch.sqlite") as store:
    ...     run = store.ensure_run("demo", config={})
    ...     snap = store.add_snapshot(run, 500, kind="checkpoint", path="out/checkpoint-500", weights_sha256="ab" * 32)
    ...     rid = store.write_result(snap, ProbeResult("membership", {"mia_auc": 0.61}), config_hash="c1")
    ...     [(m["step"], m["metric"], m["value"]) for m in store.metrics(run)]
    [(500, 'mia_auc', 0.61)]
"""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memwatch.errors import MemwatchError
from memwatch.hashing import canonical_json, config_hash
from memwatch.store import ledger
from memwatch.store.schema import SCHEMA, SCHEMA_V2, SCHEMA_VERSION, upgrade

if TYPE_CHECKING:
    from memwatch.core.probe import ProbeResult

#: file name of the store inside a run's memwatch folder (every front-end writes and reads this name)
STORE_NAME = "memwatch.sqlite"
#: memwatch's folder inside a training output dir (DESIGN.md: OUTPUT_DIR/memwatch/)
OUTPUT_SUBDIR = "memwatch"
KINDS = ("live", "checkpoint", "final")

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
        "snapshot_id",
    }
)


class Store:
    """A memwatch SQLite store (created if missing); usable as a context manager.

    One ``Store`` may be shared by threads (calls are serialised by a lock); several ``Store``
    objects, in one process or many, may open the same file at once.

    Args:
        path: the database file; parent folders are created (not in read-only mode).
        readonly: open for reading only: the file is never written, and must already be a
            memwatch store.

    Raises:
        MemwatchError: the file is missing (read-only), not a SQLite database, another
            application's database, corrupt, unreadable or unwritable, or written by a newer memwatch.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._depth = 0  # nesting of _transaction() blocks (batch() holds one open)
        self._conn = self._connect()
        try:
            self._configure()
            self._check_or_create_schema()
        except BaseException:
            self._conn.close()
            raise

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

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.is_file():
                raise MemwatchError(f"store {self.path} does not exist: pass a run folder that memwatch has probed")
            # A store with a -wal file has a writer (or committed data not yet checkpointed): mode=ro reads it
            # with SQLite's locking. Without one nobody writes it: it is read as immutable, which creates no
            # -wal/-shm file, so a reader never writes anything (and works in a read-only folder).
            uri = self.path.resolve().as_uri()
            error: sqlite3.Error | None = None
            wal = self.path.with_name(self.path.name + "-wal").exists()
            for query in ("?mode=ro", "?mode=ro&immutable=1") if wal else ("?mode=ro&immutable=1",):
                conn = None
                try:
                    conn = sqlite3.connect(
                        uri + query, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
                    )
                    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                    return conn
                except sqlite3.Error as e:
                    error = e
                    if conn is not None:
                        conn.close()
            assert error is not None
            raise self._error(error, "open") from None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemwatchError(
                f"cannot create the folder of store {self.path} ({e.strerror}): pass a writable path"
            ) from None
        try:
            # isolation_level=None: no implicit transactions; every write opens its own
            # BEGIN IMMEDIATE below, so transaction boundaries are exactly ours.
            return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise self._error(e, "open") from None

    def _configure(self) -> None:
        conn = self._conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # Read the header before changing anything: another application's file is left as it is.
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error as e:
            raise self._error(e, "open") from None
        if tables and "meta" not in tables:
            raise MemwatchError(
                f"{self.path} is a SQLite database of another application (tables: {', '.join(sorted(tables)[:5])}), "
                "not a memwatch store; it was not changed: pass another store path"
            )
        if self.readonly:
            if not tables:
                raise MemwatchError(f"{self.path} is an empty database, not a memwatch store: nothing to read")
            return
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise self._error(e, "open") from None
        if str(mode).lower() != "wal":
            # Some network file systems refuse WAL; the store still works (rollback journal),
            # but readers then block the writer.
            warnings.warn(
                f"store {self.path}: SQLite refused WAL mode (journal_mode={mode}); "
                "put the store on a local disk for concurrent readers",
                stacklevel=3,
            )

    def _check_or_create_schema(self) -> None:
        version = self._schema_version()
        if version is not None and version > SCHEMA_VERSION:
            raise MemwatchError(
                f"store {self.path} has schema version {version}, newer than this memwatch understands "
                f"({SCHEMA_VERSION}): upgrade memwatch or use another store file"
            )
        if self.readonly:
            if version != SCHEMA_VERSION:
                raise MemwatchError(
                    f"store {self.path} has schema version {version} of an older memwatch: open it once with a "
                    "writing command (memwatch probe on its run folder) to upgrade it, then read it"
                )
            return
        if version is None:  # a new file: created as schema 2, then upgraded like any older store
            with self._transaction("create its tables") as conn:
                # read again under the write lock: another process opening the new file may have created it
                version = self._schema_version()
                if version is None:
                    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
                    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '2')")
                    for statement in SCHEMA_V2:
                        conn.execute(statement)
                    version = 2
        if version < SCHEMA_VERSION:
            self._migrate(version)
        with self._transaction("create its tables") as conn:  # tables added without a version change
            for statement in SCHEMA:
                conn.execute(statement)

    def _schema_version(self) -> int | None:
        try:
            has_meta = self._conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            row = (
                self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if has_meta
                else None
            )
        except sqlite3.Error as e:
            raise self._error(e, "read") from None
        if not has_meta:
            return None
        try:
            return int(row[0]) if row else -1
        except ValueError:
            raise MemwatchError(
                f"store {self.path} has an unknown schema version {row[0]!r}: it is not a memwatch store; "
                "pass another store path"
            ) from None

    def _migrate(self, version: int) -> None:
        """Upgrade an older store in place (:func:`memwatch.store.schema.upgrade`), one transaction per version."""
        conn = self._conn
        try:
            conn.execute("PRAGMA foreign_keys = OFF")  # tables may be rebuilt; references are kept by id
            while version < SCHEMA_VERSION:
                with self._transaction("upgrade it") as c:
                    version = self._schema_version() or version  # another process may have upgraded it meanwhile
                    if version < SCHEMA_VERSION:
                        version = upgrade(c, version, self.path)
        finally:
            conn.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def batch(self) -> Iterator[Store]:
        """Make every write inside the block one transaction: all of it is stored, or none.

        Example:
            >>> with store.batch():  # doctest: +SKIP
            ...     snap = store.add_snapshot(run, 500, kind="checkpoint", path="c-500", weights_sha256="ab")
            ...     store.write_result(snap, result, config_hash="c1")
            ...     store.add_event(run, event)
        """
        with self._transaction("write to it"):
            yield self

    @contextmanager
    def _transaction(self, doing: str = "write to it") -> Iterator[sqlite3.Connection]:
        """One write transaction: commit on success, roll back on any exception (all or nothing).

        Nested blocks join the outermost one.
        """
        if self.readonly:
            raise MemwatchError(f"store {self.path} was opened read-only: cannot {doing}")
        with self._lock:
            conn = self._conn
            if self._depth:
                self._depth += 1
                try:
                    yield conn
                finally:
                    self._depth -= 1
                return
            try:
                # IMMEDIATE takes the write lock up front, so a concurrent writer waits (busy
                # timeout) at BEGIN instead of failing halfway with an upgrade deadlock.
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self._error(e, doing) from None
            self._depth = 1
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as e:
                # Some errors (disk full, I/O) make SQLite roll back on its own.
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                if isinstance(e, sqlite3.Error):
                    raise self._error(e, doing) from None
                raise
            finally:
                self._depth = 0

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                cur = self._conn.cursor()
                cur.row_factory = sqlite3.Row
                return cur.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise self._error(e, "read it") from None

    def _error(self, e: sqlite3.Error, doing: str) -> MemwatchError:
        """One line for the user: which file, what is wrong, and what to do."""
        text = str(e).lower()
        where = f"store {self.path}"
        if "malformed" in text or "corrupt" in text:
            return MemwatchError(
                f"{where} is corrupt ({e}): move it aside or delete it; memwatch starts a new store and probes again"
            )
        if "not a database" in text or "file is encrypted" in text:
            return MemwatchError(f"{where} is not a SQLite database (another kind of file): pass another store path")
        if "disk is full" in text or "disk i/o" in text and "full" in text:
            return MemwatchError(f"cannot {doing}: the disk of {where} is full; free space and run again")
        if "readonly" in text or "read-only" in text or "permission" in text:
            return MemwatchError(
                f"cannot {doing}: {where} or its folder is read-only; check permissions or pass a writable folder"
            )
        if "unable to open" in text:
            return MemwatchError(
                f"cannot open {where} ({e}): check that its folder exists and is readable and writable"
            )
        if "locked" in text or "busy" in text:
            return MemwatchError(f"cannot {doing}: {where} is locked by another process ({e}); try again")
        return MemwatchError(f"cannot {doing}: {where}: {e}")

    # -- writes ----------------------------------------------------------------------------------

    def ensure_run(
        self,
        name: str,
        *,
        config: dict[str, Any],
        identity: str | None = None,
        reference: dict[str, Any] | None = None,
        holdout: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        created_at: float | None = None,
    ) -> int:
        """Id of the run called ``name``, creating it if missing; ``config`` is added to the run's configs when it
        differs from the latest one (an existing run's row is otherwise not changed).

        Args:
            name: unique run name.
            config: the configuration probing it now; stored as JSON with ``hashing.config_hash(config)``.
            identity: what makes it the same training run (:class:`memwatch.core.run_identity.RunIdentity`'s hash);
                kept on a new run, or on a run that has none yet.
            reference: summary of the reference set (``n``, ``skipped``, ``manifest_sha256``, ``root``).
            holdout: the same summary for the holdout set.
            info: environment facts (package versions, host).
            created_at: ``time.time()`` stamp; now if None.
        """
        now = _now(created_at)
        text, chash = canonical_json(config), config_hash(config)
        row = (name, now, text, chash, identity, _json_or_none(reference), _json_or_none(holdout), _json_or_none(info))
        with self._transaction("record the run") as conn:
            created = conn.execute(
                "INSERT INTO runs (name, created_at, config_json, config_hash, identity, reference_json, "
                "holdout_json, info_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                row,
            ).rowcount
            run_id = conn.execute("SELECT id FROM runs WHERE name = ?", (name,)).fetchone()[0]
            if created:
                ledger.append(conn, "runs", run_id)
            elif identity is not None:
                if conn.execute(
                    "UPDATE runs SET identity = ? WHERE id = ? AND identity IS NULL", (identity, run_id)
                ).rowcount:
                    ledger.append(conn, "runs", run_id, action="update")
            latest = conn.execute(
                "SELECT config_hash FROM run_configs WHERE run_id = ? ORDER BY id DESC LIMIT 1", (run_id,)
            ).fetchone()
            if latest is None or latest[0] != chash:
                cur = conn.execute(
                    "INSERT INTO run_configs (run_id, config_hash, config_json, first_used) VALUES (?, ?, ?, ?)",
                    (run_id, chash, text, now),
                )
                ledger.append(conn, "run_configs", cur.lastrowid)
            return run_id

    def run_with_identity(self, identity: str) -> str | None:
        """The name of the most recently created run with this identity, or None."""
        rows = self._query("SELECT name FROM runs WHERE identity = ? ORDER BY created_at DESC, id DESC", (identity,))
        return rows[0][0] if rows else None

    def run_config(self, run_id: int, *, first: bool = False) -> dict[str, Any] | None:
        """The latest config a run was probed with (``first``: the one it was created with), or None."""
        order = "ASC" if first else "DESC"
        rows = self._query(
            f"SELECT config_json FROM run_configs WHERE run_id = ? ORDER BY id {order} LIMIT 1", (run_id,)
        )
        return json.loads(rows[0][0]) if rows else None

    def update_run_sets(self, run_id: int, reference: dict[str, Any], holdout: dict[str, Any] | None) -> None:
        """Replace a run's reference and holdout summaries (files found unreadable while probing are added)."""
        with self._transaction("update the run") as conn:
            conn.execute(
                "UPDATE runs SET reference_json = ?, holdout_json = ? WHERE id = ?",
                (_json_or_none(reference), _json_or_none(holdout), run_id),
            )
            ledger.append(conn, "runs", run_id, action="update")

    def add_snapshot(
        self,
        run_id: int,
        step: int,
        *,
        kind: str = "live",
        path: str | Path | None = None,
        weights_sha256: str | None = None,
        weights: str | None = None,
        info: Mapping[str, Any] | None = None,
        created_at: float | None = None,
    ) -> int:
        """Id of the snapshot with these weights (or, unhashed, at this step and path), recording the sighting.

        The same weights seen again (at another step, path or kind) are the same snapshot with one
        more sighting; an unhashed snapshot is identified by ``(step, kind, path)``.

        Args:
            run_id: id from :meth:`ensure_run`.
            step: training step of the weights.
            kind: ``"live"``, ``"checkpoint"`` or ``"final"``.
            path: the folder, or None for a live snapshot.
            weights_sha256: hash of the weights, if known.
            weights: ``"raw"`` or ``"ema"``, if known.
            info: facts about how it was loaded (noise scheduler and where it came from, notes).
            created_at: ``time.time()`` stamp; now if None.
        """
        if kind not in KINDS:
            raise ValueError(f"add_snapshot: kind {kind!r} is unknown; use one of {KINDS}")
        step = _int(step, "snapshot step")
        where = "" if path is None else _text(str(path), "path")
        now = _now(created_at)
        with self._transaction("record the snapshot") as conn:
            if weights_sha256 is not None:
                row = conn.execute(
                    "SELECT id FROM snapshots WHERE run_id = ? AND weights_sha256 = ?", (run_id, weights_sha256)
                ).fetchone()
            else:
                row = conn.execute(
                    "SELECT id FROM snapshots WHERE run_id = ? AND step = ? AND kind = ? AND path = ? "
                    "AND weights_sha256 IS NULL",
                    (run_id, step, kind, where),
                ).fetchone()
            if row is None:
                snap = conn.execute(
                    "INSERT INTO snapshots (run_id, step, kind, path, weights_sha256, weights, info_json, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, step, kind, where, weights_sha256, weights, _dumps(dict(info or {})), now),
                ).lastrowid
                ledger.append(conn, "snapshots", snap)
            else:
                snap = row[0]
                if info:
                    conn.execute("UPDATE snapshots SET info_json = ? WHERE id = ?", (_dumps(dict(info)), snap))
                    ledger.append(conn, "snapshots", snap, action="update")
            seen = conn.execute(
                "SELECT id FROM sightings WHERE snapshot_id = ? AND step = ? AND kind = ? AND path = ?",
                (snap, step, kind, where),
            ).fetchone()
            if seen is None:
                cur = conn.execute(
                    "INSERT INTO sightings (snapshot_id, step, kind, path, first_seen, last_seen) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (snap, step, kind, where, now, now),
                )
                ledger.append(conn, "sightings", cur.lastrowid)
            else:
                conn.execute("UPDATE sightings SET last_seen = ? WHERE id = ?", (now, seen[0]))
            return snap

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
        """
        finished = _now(finished_at)
        duration = None if started_at is None else finished - float(started_at)
        with self._transaction("write a probe result") as conn:
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
            ledger.append(conn, "probe_results", result_id)
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
        """
        finished = _now(finished_at)
        duration = None if started_at is None else finished - float(started_at)
        with self._transaction("record a failed probe") as conn:
            cur = conn.execute(
                "INSERT INTO probe_results (snapshot_id, probe, config_hash, status, error, started_at, "
                "finished_at, duration_s, host) VALUES (?, ?, ?, 'failed', ?, ?, ?, ?, ?)",
                (
                    snapshot_id,
                    probe,
                    config_hash,
                    _text(str(error), "error"),
                    started_at,
                    finished,
                    duration,
                    host if host is not None else socket.gethostname(),
                ),
            )
            ledger.append(conn, "probe_results", cur.lastrowid)
            return cur.lastrowid

    def has_result(self, snapshot_id: int, probe: str, config_hash: str) -> bool:
        """True if a successful result for ``(snapshot_id, probe, config_hash)`` is stored."""
        rows = self._query(
            "SELECT 1 FROM probe_results WHERE snapshot_id = ? AND probe = ? AND config_hash = ? "
            "AND status = 'ok' LIMIT 1",
            (snapshot_id, probe, config_hash),
        )
        return bool(rows)

    def find_snapshot(self, run_id: int, weights_sha256: str) -> int | None:
        """Id of the run's snapshot with these weights, or None."""
        rows = self._query("SELECT id FROM snapshots WHERE run_id = ? AND weights_sha256 = ?", (run_id, weights_sha256))
        return rows[0][0] if rows else None

    def add_event(self, run_id: int, event: Mapping[str, Any]) -> int | None:
        """Store an alert event; an event of the same rule, step and snapshot is stored once.

        Args:
            run_id: id from :meth:`ensure_run`.
            event: ``step``, ``rule``, ``severity``, ``metric``, ``value``, ``threshold``,
                ``forecast_step``, ``message``, ``evidence`` (a dict, stored as JSON), and optional
                ``snapshot_id`` and ``created_at``. ``rule`` and ``severity`` are required.

        Returns:
            The new row's id, or None if the event was already stored.

        Raises:
            ValueError: an unknown key, or a missing ``rule``/``severity``.
        """
        unknown = set(event) - _EVENT_KEYS
        if unknown:
            raise ValueError(f"add_event: unknown keys {sorted(unknown)}; allowed: {sorted(_EVENT_KEYS)}")
        for required in ("rule", "severity"):
            if event.get(required) is None:
                raise ValueError(f"add_event: the event needs a {required!r}")
        row = (
            run_id,
            _int(event.get("snapshot_id"), "event snapshot_id"),
            _int(event.get("step"), "event step"),
            str(event["rule"]),
            str(event["severity"]),
            None if event.get("metric") is None else str(event["metric"]),
            _real(event.get("value"), "event value"),
            _real(event.get("threshold"), "event threshold"),
            _int(event.get("forecast_step"), "event forecast_step"),
            _text(str(event.get("message") or ""), "event message"),
            _dumps(event.get("evidence") or {}),
            _now(event.get("created_at")),
        )
        with self._transaction("record an event") as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (run_id, snapshot_id, step, rule, severity, metric, value, threshold, "
                "forecast_step, message, evidence_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if not cur.rowcount:
                return None
            ledger.append(conn, "events", cur.lastrowid)
            return cur.lastrowid

    def write_training_set(
        self,
        run_id: int,
        manifest_sha256: str | None,
        analysis: dict[str, Any] | None,
        error: str | None = None,
        created_at: float | None = None,
    ) -> None:
        """Record a run's training-set analysis (:meth:`TrainingSetAnalysis.to_dict`), or why it failed;
        replaces an earlier one (the reference set changed)."""
        with self._transaction("record the training-set analysis") as conn:
            conn.execute(
                "INSERT OR REPLACE INTO training_sets (run_id, manifest_sha256, analysis_json, error, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, manifest_sha256, _json_or_none(analysis), error, _now(created_at)),
            )
            ledger.append(conn, "training_sets", run_id)

    def training_set(self, run_id: int) -> dict[str, Any] | None:
        """A run's training-set analysis: ``{"manifest_sha256", "analysis", "error", "created_at"}``, or None."""
        if not self._query("SELECT 1 FROM sqlite_master WHERE name = 'training_sets'"):
            return None  # a store written before the table existed, opened read-only
        rows = self._query("SELECT * FROM training_sets WHERE run_id = ?", (run_id,))
        if not rows:
            return None
        r = rows[0]
        return {
            "manifest_sha256": r["manifest_sha256"],
            "analysis": _loads_or_none(r["analysis_json"]),
            "error": r["error"],
            "created_at": r["created_at"],
        }

    def add_intervention(
        self,
        run_id: int,
        kind: str,
        step: int | None,
        images: Sequence[str] = (),
        detail: Mapping[str, Any] | None = None,
        *,
        error: str | None = None,
        event: Mapping[str, Any] | None = None,
        created_at: float | None = None,
    ) -> int:
        """Record that training was changed (or that a change failed), with its event, in one transaction.

        Args:
            run_id: id from :meth:`ensure_run`.
            kind: what changed (``reweight``, ``loss_gate``, ``rollback``...).
            step: the training step from which it applies.
            images: the training image ids it applies to.
            detail: its settings and figures (JSON).
            error: why it could not be applied (then nothing changed).
            event: the event that says so (:meth:`add_event`'s keys), stored with it.

        Returns:
            The new row's id.

        Example:
            >>> store.add_intervention(run, "reweight", 300, ["a.png"], {"weight": 0.0})  # doctest: +SKIP
            1
        """
        row = (run_id, _int(step, "intervention step"), _text(str(kind), "intervention kind"),
               _dumps(list(images)), _dumps(dict(detail or {})), error, _now(created_at))  # fmt: skip
        with self._transaction("record an intervention") as conn:
            cur = conn.execute(
                "INSERT INTO interventions (run_id, step, kind, images_json, detail_json, error, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            ledger.append(conn, "interventions", cur.lastrowid)
            if event is not None:
                self.add_event(run_id, event)
            return int(cur.lastrowid)

    def interventions(self, run_id: int) -> list[dict[str, Any]]:
        """A run's interventions in the order they were made (empty for a store written before them)."""
        if not self._query("SELECT 1 FROM sqlite_master WHERE name = 'interventions'"):
            return []
        rows = self._query("SELECT * FROM interventions WHERE run_id = ? ORDER BY id", (run_id,))
        return [
            {"id": r["id"], "step": r["step"], "kind": r["kind"], "images": json.loads(r["images_json"]),
             "detail": json.loads(r["detail_json"]), "error": r["error"], "created_at": r["created_at"]}
            for r in rows
        ]  # fmt: skip

    # -- the record --------------------------------------------------------------------------------

    def check_record(self, expected: ledger.ChainHead | None = None) -> ledger.LedgerCheck:
        """Recompute the hash chain over every record (:func:`memwatch.store.ledger.verify_ledger`): what no
        longer matches, and the chain's head. Never writes.

        Args:
            expected: a head a report carries; the chain must contain it.
        """
        with self._lock:
            try:
                check = ledger.verify_ledger(self._conn, expected=expected)
                check.starts_at = ledger.chain_start(self._conn)
            except sqlite3.Error as e:
                raise self._error(e, "read its ledger") from None
        return check

    # -- views -----------------------------------------------------------------------------------

    def run_id(self, name: str) -> int | None:
        """Id of the run called ``name``, or None."""
        rows = self._query("SELECT id FROM runs WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def runs(self) -> list[dict[str, Any]]:
        """All runs by id: ``id, name, created_at, identity, config`` (the latest config it was probed with),
        ``config_hash`` (its hash), ``first_config_hash``, ``reference, holdout, info`` (the JSON columns
        decoded; None where not given)."""
        latest = {
            r["run_id"]: r
            for r in self._query("SELECT run_id, config_json, config_hash FROM run_configs ORDER BY run_id, id")
        }
        out = []
        for r in self._query("SELECT * FROM runs ORDER BY id"):
            config = latest.get(r["id"], r)
            out.append(
                {
                    "id": r["id"],
                    "name": r["name"],
                    "created_at": r["created_at"],
                    "identity": r["identity"],
                    "config": json.loads(config["config_json"]),
                    "config_hash": config["config_hash"],
                    "first_config_hash": r["config_hash"],
                    "reference": _loads_or_none(r["reference_json"]),
                    "holdout": _loads_or_none(r["holdout_json"]),
                    "info": _loads_or_none(r["info_json"]),
                }
            )
        return out

    def snapshots(self, run_id: int) -> list[dict[str, Any]]:
        """Snapshots of a run by step, kind, path: ``id, run_id, step, kind, path`` (None for live),
        ``weights_sha256, weights, info, created_at`` and ``sightings`` (``step, kind, path,
        first_seen, last_seen``, in the order they were first seen)."""
        rows = self._query(
            "SELECT id, run_id, step, kind, path, weights_sha256, weights, info_json, created_at FROM snapshots "
            "WHERE run_id = ? ORDER BY step, kind, path, id",
            (run_id,),
        )
        seen: dict[int, list[dict[str, Any]]] = {}
        for s in self._query(
            "SELECT g.snapshot_id, g.step, g.kind, g.path, g.first_seen, g.last_seen FROM sightings g "
            "JOIN snapshots s ON s.id = g.snapshot_id WHERE s.run_id = ? ORDER BY g.first_seen, g.id",
            (run_id,),
        ):
            seen.setdefault(s["snapshot_id"], []).append(
                {k: s[k] for k in ("step", "kind", "first_seen", "last_seen")} | {"path": s["path"] or None}
            )
        out = []
        for r in rows:
            d = dict(r)
            d["info"] = json.loads(d.pop("info_json"))
            d["path"] = r["path"] or None
            d["sightings"] = seen.get(r["id"], [])
            out.append(d)
        return out

    def results(self, run_id: int) -> list[dict[str, Any]]:
        """Probe results (ok and failed) by step, probe, id: the probe_results columns plus
        ``step`` and ``kind``, with ``timings`` (dict) and ``evidence`` (list) decoded."""
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
        undefined), ``snapshot_id, result_id``."""
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

    def earlier_results(
        self,
        run_id: int,
        probe: str,
        config_hash: str | Sequence[str],
        *,
        before_step: int,
        weights: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """The latest ``limit`` successful results of ``probe`` (these settings) on this run's snapshots
        before ``before_step`` with the same weights kind, oldest first: ``step``, ``metrics`` (dict) and
        ``items`` (list). Probes that follow a trajectory (the onset forecast) read their past here.

        Args:
            run_id: the run.
            probe: the probe's name.
            config_hash: its settings' hash, or the hashes that count as these settings (results of other
                settings are another series).
            before_step: only snapshots at smaller steps.
            weights: ``"ema"`` or raw (``None`` and ``"raw"`` are one series).
            limit: how many results at most (the most recent ones).
        """
        keys = [config_hash] if isinstance(config_hash, str) else list(config_hash)
        rows = self._query(
            "SELECT r.id, s.step FROM probe_results r JOIN snapshots s ON s.id = r.snapshot_id "
            f"WHERE s.run_id = ? AND r.probe = ? AND r.config_hash IN ({', '.join('?' * len(keys))}) "
            "AND r.status = 'ok' AND s.step < ? AND COALESCE(s.weights, 'raw') = ? ORDER BY s.step DESC, r.id DESC",
            (run_id, probe, *keys, _int(before_step, "step"), weights or "raw"),
        )
        chosen: dict[int, int] = {}  # step -> result id: the newest result at each step
        for r in rows:
            if len(chosen) >= limit:
                break
            chosen.setdefault(r["step"], r["id"])
        out = []
        for step, result_id in sorted(chosen.items()):
            metrics = {
                m["metric"]: _nan_if_none(m["value"])
                for m in self._query("SELECT metric, value FROM metrics WHERE result_id = ?", (result_id,))
            }
            rows_of = self._query("SELECT item, data_json FROM items WHERE result_id = ? ORDER BY rowid", (result_id,))
            items = [{**json.loads(x["data_json"]), "item": x["item"]} for x in rows_of]
            out.append({"step": step, "metrics": metrics, "items": items})
        return out

    def events(self, run_id: int) -> list[dict[str, Any]]:
        """Alert events by step, id: the events columns with ``evidence`` decoded (value and
        threshold None where not given)."""
        rows = self._query("SELECT * FROM events WHERE run_id = ? ORDER BY step, id", (run_id,))
        out = []
        for r in rows:
            d = dict(r)
            d["evidence"] = json.loads(d.pop("evidence_json"))
            out.append(d)
        return out

    def integrity(self) -> str:
        """SQLite's integrity check of the file: ``"ok"`` or the first problem."""
        return str(self._query("PRAGMA integrity_check")[0][0])


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
        v = int(v)
    if not isinstance(v, int):
        raise TypeError(f"{what}: expected an integer, got {type(v).__name__} {v!r}")
    if not -(2**63) <= v < 2**63:
        raise MemwatchError(f"{what} {v} is beyond 64 bits: SQLite cannot store it")
    return int(v)


def _text(v: Any, what: str) -> str | None:
    v = _unwrap(v)
    if v is None:
        return v
    if isinstance(v, str):
        # a name read from a file system or archive with bytes that are not UTF-8 (surrogate escapes):
        # stored with those bytes written out (\\xNN), as SQLite text must be UTF-8
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(v, int | Path) and not isinstance(v, bool):
        return _text(str(v), what)
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
