"""Remembered sha256 of reference files, so an unchanged file is not read again on every run.

A file is taken as unchanged while its size, modification time (nanoseconds) and inode are those
recorded with its hash, as git's index does. Like git, a hash taken while the file was just written
is not remembered: a file modified again within the same clock tick would keep its size and
modification time, so an entry is only stored when the file is older than :data:`RACY_S` seconds.

The cache is one SQLite file beside the embedding cache (``<cache_dir>/file_hashes.sqlite``); it is an
optimisation only: when it cannot be used, a warning is logged once and every file is read.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> cache = FileHashCache(d)
    >>> (d / "a.bin").write_bytes(b"x") and None
    >>> cache.lookup([d / "a.bin"])  # nothing remembered yet
    {}
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("memwatch")

#: files modified less than this long before hashing are not remembered (the "racy git" rule)
RACY_S = 2.0


def connect_wal(path: Path, schema: str) -> sqlite3.Connection:
    """A connection to a cache file shared by concurrent processes (WAL mode), with ``schema`` created.

    Switching to WAL needs a moment of exclusive access, which SQLite does not wait for: when several
    processes open the file at once (``accelerate launch``), the losers are told "database is locked"
    at once. They try again, for up to about 10 s, before giving up.
    """
    for attempt in range(100):
        db = sqlite3.connect(path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(schema)
            db.commit()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class FileHashCache:
    """Path -> sha256 for files whose size, mtime and inode are unchanged.

    Args:
        cache_dir: the folder (default: the embedding cache's, ``$MEMWATCH_CACHE_DIR`` or ``~/.cache/memwatch``).
        clock: wall-clock seconds (tests pass their own).
    """

    def __init__(self, cache_dir: str | Path | None = None, clock=time.time):
        from memwatch.embed_cache import default_cache_dir

        self.path = Path(cache_dir or default_cache_dir()) / "file_hashes.sqlite"
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = connect_wal(
                self.path,
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "inode INTEGER, sha256 TEXT)",
            )
        except (OSError, sqlite3.Error) as e:
            self._disable(e)

    def _disable(self, e: BaseException) -> None:
        log.warning("file-hash cache %s cannot be used (%s): reading every file", self.path, e)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    def lookup(self, paths: Iterable[Path]) -> dict[Path, str]:
        """The remembered hash of each path whose file is unchanged (others are absent)."""
        if self._db is None:
            return {}
        stats: dict[str, tuple[Path, tuple[int, int, int]]] = {}
        for p in paths:
            try:
                stats[str(p.resolve())] = (p, _key(p.stat()))
            except OSError:
                continue  # gone or unreadable: the caller reads it and records why
        found: dict[Path, str] = {}
        names = list(stats)
        try:
            for start in range(0, len(names), 500):  # stay under SQLite's bound-parameter limit
                part = names[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT path, size, mtime_ns, inode, sha256 FROM files WHERE path IN ({marks})", part
                )
                for name, size, mtime_ns, inode, sha in rows:
                    p, now = stats[name]
                    if now == (size, mtime_ns, inode):
                        found[p] = sha
        except sqlite3.Error as e:
            self._disable(e)
            return {}
        return found

    def remember(self, hashes: dict[Path, str]) -> None:
        """Record hashes just computed (files younger than :data:`RACY_S` are left out)."""
        if self._db is None or not hashes:
            return
        now = self.clock()
        rows = []
        for p, sha in hashes.items():
            try:
                st = p.stat()
            except OSError:
                continue
            if now - st.st_mtime_ns / 1e9 >= RACY_S:
                rows.append((str(p.resolve()), *_key(st), sha))
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            self._disable(e)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
