"""The store's hash chain: every record written is appended to a ledger that makes later edits evident.

Each run, config, snapshot, sighting, probe result (with its metric, match and item rows), failure, event and
training-set analysis is a *record*. When the store writes one — in the same transaction as the row — it
appends a ledger entry: the record's table and id, the sha256 of its content (the row and its child rows,
serialised as RFC 8785 canonical JSON), and the hash of the entry before it, so that each entry commits to
the whole history before it (a hash chain in the manner of Certificate Transparency's log, RFC 6962, without
its tree). A record that changes legitimately (a snapshot's load notes, a run's data summaries, a replaced
training-set analysis) gets a new entry; the latest one is what its row must match.

:func:`verify_ledger` recomputes everything and names each record that no longer matches: a row changed,
deleted or added outside memwatch, a ledger entry edited, removed or reordered. What the chain cannot show
by itself is a store cut back to an earlier, consistent state: the report and its attestation carry the
chain's head (:class:`ChainHead`), and a head that the store no longer contains is a finding too.

Stores written before the ledger existed are upgraded in place: their rows are *adopted* (one entry each,
action ``adopt``), so edits after the upgrade are evident, while what happened to them before it is not
attested; :func:`chain_start` says from which entry the chain vouches for the writing itself.

Example:
    >>> import sqlite3
    >>> conn = sqlite3.connect(":memory:")
    >>> for ddl in LEDGER_SCHEMA:
    ...     _ = conn.execute(ddl)
    >>> _ = conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, rule TEXT)")
    >>> _ = conn.execute("INSERT INTO events (rule) VALUES ('first-copy')")
    >>> append(conn, "events", 1, at=0.0).seq
    1
    >>> verify_ledger(conn, tables=("events",)).findings
    []
    >>> _ = conn.execute("UPDATE events SET rule = 'nothing' WHERE id = 1")
    >>> verify_ledger(conn, tables=("events",)).findings[0].startswith("events row 1")
    True
"""

from __future__ import annotations

import hashlib
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import rfc8785

#: The ledger's table, created with the store's schema 4.
LEDGER_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS ledger (
        seq INTEGER PRIMARY KEY,
        tbl TEXT NOT NULL,
        row_id INTEGER NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('insert', 'update', 'adopt')),
        content_sha256 TEXT NOT NULL,
        prev_sha256 TEXT NOT NULL,
        entry_sha256 TEXT NOT NULL,
        at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_record ON ledger (tbl, row_id, seq)",
)

#: The tables whose rows are records, in the order an upgrade adopts them. Metric, match and item rows are
#: part of their probe result's content; ``sightings.last_seen`` is left out (it moves each time the same
#: weights are seen again, and says only when).
RECORD_TABLES = (
    "runs",
    "run_configs",
    "snapshots",
    "sightings",
    "probe_results",
    "events",
    "training_sets",
    "interventions",
)
#: The rows that belong to a probe result (their ``result_id``), in its content.
CHILD_TABLES = ("metrics", "matches", "items")
_LEFT_OUT = {"sightings": ("last_seen",)}
_KEY = {"training_sets": "run_id"}
GENESIS = "0" * 64


@dataclass(frozen=True)
class ChainHead:
    """The chain's last entry: how many entries there are, and its hash (what a report carries)."""

    seq: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "sha256": self.sha256}


@dataclass
class LedgerCheck:
    """What :func:`verify_ledger` found: one line per record or entry that does not match, and the head."""

    findings: list[str] = field(default_factory=list)
    head: ChainHead = ChainHead(0, GENESIS)
    records: int = 0
    adopted: int = 0
    #: the first entry that records a write as it happened (:func:`chain_start`)
    starts_at: int = 1

    @property
    def ok(self) -> bool:
        return not self.findings


def record_content(conn: sqlite3.Connection, table: str, row_id: int) -> dict[str, Any] | None:
    """The content of one record as the ledger hashes it (None when the row does not exist)."""
    cur = conn.execute(f"SELECT * FROM {table} WHERE {_KEY.get(table, 'id')} = ?", (row_id,))
    row = cur.fetchone()
    if row is None:
        return None
    names = [d[0] for d in cur.description]
    content: dict[str, Any] = {n: _json_value(v) for n, v in zip(names, row, strict=True)
                               if n not in _LEFT_OUT.get(table, ())}  # fmt: skip
    if table == "probe_results":
        for child in CHILD_TABLES:
            cur = conn.execute(f"SELECT * FROM {child} WHERE result_id = ? ORDER BY rowid", (row_id,))
            cols = [d[0] for d in cur.description]
            content[child] = [[_json_value(v) for c, v in zip(cols, r, strict=True) if c != "result_id"]
                              for r in cur.fetchall()]  # fmt: skip
    return content


def content_sha256(content: dict[str, Any]) -> str:
    """sha256 of a record's RFC 8785 canonical JSON."""
    return hashlib.sha256(rfc8785.dumps(content)).hexdigest()


def entry_sha256(seq: int, table: str, row_id: int, action: str, content: str, prev: str) -> str:
    """The hash an entry is chained by: its position, record, action, content hash and the previous hash."""
    body = {"seq": seq, "table": table, "row_id": row_id, "action": action, "content_sha256": content, "prev": prev}
    return hashlib.sha256(rfc8785.dumps(body)).hexdigest()


def head(conn: sqlite3.Connection) -> ChainHead:
    """The last entry (``seq`` 0 and the genesis hash for an empty ledger)."""
    row = conn.execute("SELECT seq, entry_sha256 FROM ledger ORDER BY seq DESC LIMIT 1").fetchone()
    return ChainHead(int(row[0]), str(row[1])) if row else ChainHead(0, GENESIS)


def append(
    conn: sqlite3.Connection, table: str, row_id: int, *, action: str = "insert", at: float | None = None
) -> ChainHead:
    """Append the entry of one record (call inside the transaction that wrote the row); returns the new head.

    Raises:
        ValueError: the row does not exist (a caller's mistake: the entry would vouch for nothing).
    """
    content = record_content(conn, table, row_id)
    if content is None:
        raise ValueError(f"ledger: {table} row {row_id} does not exist")
    digest = content_sha256(content)
    if action == "update":  # an update that changed nothing recorded adds no entry
        latest = conn.execute(
            "SELECT content_sha256 FROM ledger WHERE tbl = ? AND row_id = ? ORDER BY seq DESC LIMIT 1", (table, row_id)
        ).fetchone()
        if latest is not None and latest[0] == digest:
            return head(conn)
    last = head(conn)
    seq = last.seq + 1
    entry = entry_sha256(seq, table, row_id, action, digest, last.sha256)
    conn.execute(
        "INSERT INTO ledger (seq, tbl, row_id, action, content_sha256, prev_sha256, entry_sha256, at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, table, row_id, action, digest, last.sha256, entry, time.time() if at is None else at),
    )
    return ChainHead(seq, entry)


def adopt_all(conn: sqlite3.Connection, tables: Sequence[str] = RECORD_TABLES) -> int:
    """Adopt every existing record into the chain (the upgrade of a store written without one); returns how
    many. The chain then vouches for these rows as they are now, not for how they came to be."""
    n = 0
    present = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table in tables:
        if table not in present:  # a table newer than the store being upgraded: created empty after it
            continue
        key = _KEY.get(table, "id")
        for (row_id,) in conn.execute(f"SELECT {key} FROM {table} ORDER BY {key}").fetchall():
            append(conn, table, int(row_id), action="adopt")
            n += 1
    return n


def chain_start(conn: sqlite3.Connection) -> int:
    """The first entry that records a write as it happened (entries before it adopted older rows); 1 for a store
    that had the ledger from its creation, ``head + 1`` when nothing was written since an upgrade."""
    row = conn.execute("SELECT MIN(seq) FROM ledger WHERE action != 'adopt'").fetchone()
    if row and row[0] is not None:
        return int(row[0])
    return head(conn).seq + 1


def verify_ledger(
    conn: sqlite3.Connection, *, tables: Sequence[str] = RECORD_TABLES, expected: ChainHead | None = None
) -> LedgerCheck:
    """Recompute the chain and every record's content; one finding per mismatch.

    Args:
        conn: the store (read only).
        tables: the record tables to check (every one of the store).
        expected: a head a report or attestation carries: the chain must contain it.
    """
    check = LedgerCheck()
    prev, latest = GENESIS, {}
    rows = conn.execute(
        "SELECT seq, tbl, row_id, action, content_sha256, prev_sha256, entry_sha256 FROM ledger ORDER BY seq"
    ).fetchall()
    hashes: dict[int, str] = {}
    for position, (seq, table, row_id, action, digest, prev_hash, entry) in enumerate(rows, start=1):
        if seq != position:
            check.findings.append(f"ledger entry {position}: missing (the next entry is {seq}): an entry was deleted")
        if prev_hash != prev:
            check.findings.append(f"ledger entry {seq}: does not follow the entry before it (removed or reordered)")
        if entry_sha256(seq, table, row_id, action, digest, prev_hash) != entry:
            check.findings.append(f"ledger entry {seq} ({table} row {row_id}): its hash does not match: it was edited")
        prev, hashes[seq] = entry, entry
        latest[(table, row_id)] = (seq, digest)
        check.adopted += action == "adopt"
    if rows:
        check.head = ChainHead(int(rows[-1][0]), str(rows[-1][6]))
    check.records = len(latest)
    for (table, row_id), (seq, digest) in sorted(latest.items(), key=lambda kv: kv[1][0]):
        if table not in tables:
            continue
        content = record_content(conn, table, row_id)
        if content is None:
            check.findings.append(f"{table} row {row_id}: recorded (ledger entry {seq}) but no longer in the store: "
                                  "it was deleted")  # fmt: skip
        elif content_sha256(content) != digest:
            check.findings.append(f"{table} row {row_id}: differs from what was recorded (ledger entry {seq}): it was "
                                  "changed after it was written")  # fmt: skip
    for table in tables:
        key = _KEY.get(table, "id")
        for (row_id,) in conn.execute(f"SELECT {key} FROM {table} ORDER BY {key}").fetchall():
            if (table, int(row_id)) not in latest:
                check.findings.append(f"{table} row {row_id}: not in the ledger: it was added outside memwatch")
    for child in CHILD_TABLES if "probe_results" in tables else ():
        orphans = conn.execute(
            f"SELECT COUNT(*) FROM {child} WHERE result_id NOT IN (SELECT id FROM probe_results)"
        ).fetchone()[0]
        if orphans:
            check.findings.append(f"{child}: {orphans} row(s) of no probe result: added outside memwatch")
    if expected is not None and expected.seq > 0 and hashes.get(expected.seq) != expected.sha256:
        check.findings.append(f"the chain does not contain the head the report carries (entry {expected.seq}, "
                              f"{expected.sha256[:12]}...): the store was cut back or rewritten")  # fmt: skip
    return check


def _json_value(v: Any) -> Any:
    """A SQLite value as canonical JSON can hold it: bytes as hex (a hand-edited row may hold some), infinities
    and integers beyond JSON's exact range (2**53) as text."""
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v).hex()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, int) and not -(2**53) < v < 2**53:
        return str(v)
    return v
