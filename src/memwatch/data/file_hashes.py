"""Remembered sha256 of reference files, so an unchanged file is not read again on every run.

A file is taken as unchanged while its size, modification time (nanoseconds) and inode are those
recorded with its hash, as git's index does. Like git, a hash taken while the file was just written
is not remembered: a file modified again within the same clock tick would keep its size and
modification time, so an entry is only stored when the file is older than :data:`RACY_S` seconds.

Every reader of files that may be large uses it: reference sets, and the weights files of checkpoint
folders (``memwatch probe`` / ``watch`` identify a snapshot by them). The cache is one SQLite file beside the
embedding cache (``<cache_dir>/file_hashes.sqlite``,
:class:`memwatch.data.sqlite_cache.SqliteCache`); it is an optimisation only: when it cannot be used, a
warning is logged once and every file is read.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> cache = FileHashCache(d)
    >>> (d / "a.bin").write_bytes(b"x") and None
    >>> cache.lookup([d / "a.bin"])  # nothing remembered yet
    {}
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from memwatch.data.sqlite_cache import SqliteCache, default_cache_dir
from memwatch.hashing import sha256_file

#: files modified less than this long before hashing are not remembered (the "racy git" rule)
RACY_S = 2.0


def _path_key(p: Path) -> str:
    """The cache's key of a file: its resolved path, bytes that are not UTF-8 written as ``\\xNN`` (SQLite text)."""
    return str(p.resolve()).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _key(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class FileHashCache(SqliteCache):
    """Path -> sha256 for files whose size, mtime and inode are unchanged.

    Args:
        cache_dir: the folder (default: the embedding cache's, ``$MEMWATCH_CACHE_DIR`` or ``~/.cache/memwatch``).
        clock: wall-clock seconds (tests pass their own).
    """

    def __init__(self, cache_dir: str | Path | None = None, clock=time.time):
        super().__init__(
            "file-hash cache",
            Path(cache_dir or default_cache_dir()) / "file_hashes.sqlite",
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "inode INTEGER, sha256 TEXT)",
            "reading every file",
        )
        self.clock = clock

    def lookup(self, paths: Iterable[Path]) -> dict[Path, str]:
        """The remembered hash of each path whose file is unchanged (others are absent)."""
        if self.db is None:
            return {}
        stats: dict[str, tuple[Path, tuple[int, int, int]]] = {}
        for p in paths:
            try:
                stats[_path_key(p)] = (p, _key(p.stat()))
            except OSError:
                continue  # gone or unreadable: the caller reads it and records why
        found: dict[Path, str] = {}
        names = list(stats)
        try:
            for start in range(0, len(names), 500):  # stay under SQLite's bound-parameter limit
                part = names[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT path, size, mtime_ns, inode, sha256 FROM files WHERE path IN ({marks})", part
                )
                for name, size, mtime_ns, inode, sha in rows:
                    p, now = stats[name]
                    if now == (size, mtime_ns, inode):
                        found[p] = sha
        except sqlite3.Error as e:
            self.disable(e)
            return {}
        return found

    def remember(self, hashes: dict[Path, str]) -> None:
        """Record hashes just computed (files younger than :data:`RACY_S` are left out)."""
        if self.db is None or not hashes:
            return
        now = self.clock()
        rows = []
        for p, sha in hashes.items():
            try:
                st = p.stat()
            except OSError:
                continue
            if now - st.st_mtime_ns / 1e9 >= RACY_S:
                rows.append((_path_key(p), *_key(st), sha))
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            self.disable(e)

    def sha256(self, path: Path) -> str:
        """The file's sha256: remembered while the file is unchanged, else read (and remembered).

        Raises:
            OSError: the file cannot be read (gone: checkpoint rotation).
        """
        known = self.lookup([path]).get(path)
        if known is not None:
            return known
        sha = sha256_file(path)
        self.remember({path: sha})
        return sha
