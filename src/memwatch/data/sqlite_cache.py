"""What memwatch's on-disk caches share: one SQLite file in the cache folder, opened in WAL mode so that
concurrent jobs and ``accelerate`` processes can use it at once, and switched off with one warning when it
cannot be used (a cache is an optimisation: the work is then simply done again).

The cache folder is ``$MEMWATCH_CACHE_DIR`` or ``~/.cache/memwatch``.

Example:
    >>> import tempfile
    >>> cache = SqliteCache("test cache", Path(tempfile.mkdtemp()) / "c.sqlite", "CREATE TABLE IF NOT EXISTS t (x)", "")
    >>> cache.db is not None
    True
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("memwatch")


def default_cache_dir() -> Path:
    """``$MEMWATCH_CACHE_DIR`` if set, else ``~/.cache/memwatch``."""
    return Path(os.environ.get("MEMWATCH_CACHE_DIR") or Path.home() / ".cache" / "memwatch")


def connect_wal(path: Path, schema: str | tuple[str, ...]) -> sqlite3.Connection:
    """A connection to a cache file shared by concurrent processes (WAL mode), with ``schema`` (one statement or
    several) created.

    Switching to WAL needs a moment of exclusive access, which SQLite does not wait for: when several
    processes open the file at once (``accelerate launch``), the losers are told "database is locked"
    at once. They try again, for up to about 10 s, before giving up.
    """
    for attempt in range(100):
        db = sqlite3.connect(path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in (schema,) if isinstance(schema, str) else schema:
                db.execute(statement)
            db.commit()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if "locked" not in str(e) or attempt == 99:
                raise
            time.sleep(0.1)
    raise AssertionError("unreachable")


class SqliteCache:
    """One cache file: ``db`` is its connection, or None once it could not be used.

    Args:
        name: what the warning calls it (``"embedding cache"``).
        path: the SQLite file (its folder is created).
        schema: the ``CREATE TABLE IF NOT EXISTS`` statement(s) of its table(s).
        unusable: the warning's text after "<path> cannot be used (<reason>): ", saying what happens instead.
    """

    def __init__(self, name: str, path: Path, schema: str | tuple[str, ...], unusable: str):
        self.name = name
        self.path = path
        self.unusable = unusable
        self.db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = connect_wal(self.path, schema)
        except (OSError, sqlite3.Error) as e:
            self.disable(e)

    def disable(self, e: BaseException) -> None:
        """Say once why the cache cannot be used, and go on without it."""
        log.warning(
            "%s %s cannot be used (%s): %s", self.name, self.path, getattr(e, "strerror", None) or e, self.unusable
        )
        self.close()

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except sqlite3.Error:
                pass
        self.db = None
