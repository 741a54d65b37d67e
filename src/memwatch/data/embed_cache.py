"""On-disk cache of reference embeddings, keyed by (embedder spec hash, image sha256).

Reference images are embedded once per embedder and reused across probes, runs and processes. The
vectors live in memory-mapped shard files (``<cache_dir>/vectors/<embedder>/<shard>.npy``, float32,
one file per write, never changed after it is written); one SQLite file (``<cache_dir>/embeddings.sqlite``,
WAL mode, so concurrent jobs share it safely) maps each (embedder, sha256) to its shard and row.
Reading a million vectors is then a few large sequential reads instead of a million database rows,
and nothing is unpickled: ``.npy`` files are opened with ``allow_pickle=False``.

Integrity: a shard is written to a temporary file of its own, flushed to disk, renamed into place, and only
then recorded, with its sha256, row count and width (table ``shards``). A shard is checked against that
record when it is first read by a process: a shard that was removed, cut, rewritten, or whose rows were
damaged under an intact header is not served; its vectors are embedded again, with a warning. Shards of
caches written before checksums existed are checked for shape and finite values, then their checksum is
recorded (they are trusted from then on).

The default folder is ``$MEMWATCH_CACHE_DIR`` or ``~/.cache/memwatch`` (:mod:`memwatch.data.sqlite_cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memwatch.data.refset import ReferenceItem, ReferenceSet
from memwatch.data.sqlite_cache import SqliteCache, default_cache_dir
from memwatch.embedders.base import Embedder
from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file

log = logging.getLogger("memwatch")


class EmbeddingCache(SqliteCache):
    """Persistent map (embedder key, sha256) -> float32 vector, the vectors in memory-mapped shards.

    Args:
        cache_dir: folder holding ``embeddings.sqlite`` and ``vectors/`` (created if missing).

    Example:
        >>> import tempfile
        >>> cache = EmbeddingCache(tempfile.mkdtemp())
        >>> cache.put("k", {"ab12": torch.ones(4), "ef56": torch.empty(0)})  # empty: an image without a face
        >>> got = cache.get("k", ["ab12", "cd34", "ef56"])
        >>> got["ab12"].tolist(), got["ef56"].numel(), "cd34" in got
        ([1.0, 1.0, 1.0, 1.0], 0, False)
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        super().__init__(
            "embedding cache",
            self.dir / "embeddings.sqlite",
            (
                "CREATE TABLE IF NOT EXISTS vectors (key TEXT, sha256 TEXT, shard TEXT, row INTEGER,"
                " PRIMARY KEY (key, sha256))",
                "CREATE TABLE IF NOT EXISTS shards (key TEXT, shard TEXT, sha256 TEXT NOT NULL, rows INTEGER NOT NULL,"
                " dim INTEGER NOT NULL, PRIMARY KEY (key, shard))",
            ),
            "embedding without it; set cache_dir or $MEMWATCH_CACHE_DIR to a writable folder, or delete a corrupt "
            "cache file",
        )
        #: shard path -> (size, mtime_ns) at which it was checked in this process
        self._checked: dict[Path, tuple[int, int]] = {}

    def shard_dir(self, key: str) -> Path:
        """The folder of one embedder's shards (named by a hash of its key, which may be long)."""
        return self.dir / "vectors" / hashlib.sha256(key.encode()).hexdigest()[:16]

    def get(self, key: str, hashes: Iterable[str]) -> dict[str, torch.Tensor]:
        """Cached vectors for the given image hashes (missing ones are simply absent, and so are those
        whose shard file was removed or damaged: they are embedded again)."""
        hashes = list(dict.fromkeys(hashes))
        if self.db is None:
            return {}
        where: dict[str, list[tuple[str, int]]] = defaultdict(list)  # shard -> [(sha256, row)]
        try:
            for start in range(0, len(hashes), 500):  # stay under SQLite's bound-parameter limit
                part = hashes[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT sha256, shard, row FROM vectors WHERE key = ? AND sha256 IN ({marks})", [key, *part]
                )
                for sha, shard, row in rows:
                    where[shard].append((sha, row))
        except sqlite3.Error as e:
            self.disable(e)
            return {}
        found: dict[str, torch.Tensor] = {}
        for shard, wanted in where.items():
            path = self.shard_dir(key) / shard
            try:
                self._check(key, shard, path)
                data = np.load(path, mmap_mode="r", allow_pickle=False)
                rows = np.sort([r for _, r in wanted])  # sorted: sequential reads of the map
                block = np.array(data[rows], dtype=np.float32)
                del data  # the map is released here: no file stays open between calls
            except (OSError, ValueError, IndexError, sqlite3.Error) as e:
                log.warning(
                    "embedding cache shard %s cannot be used (%s): its %d vectors are embedded again",
                    path,
                    e,
                    len(wanted),
                )
                continue
            position = {r: i for i, r in enumerate(rows.tolist())}
            for sha, r in wanted:
                found[sha] = torch.from_numpy(block[position[r]])
        return found

    def _check(self, key: str, shard: str, path: Path) -> None:
        """Raise ValueError unless the shard file is the one recorded (its sha256, rows and width); a shard of an
        older cache, without a record, is checked for shape and finite values and then recorded."""
        st = path.stat()
        if self._checked.get(path) == (st.st_size, st.st_mtime_ns):
            return
        assert self.db is not None
        row = self.db.execute(
            "SELECT sha256, rows, dim FROM shards WHERE key = ? AND shard = ?", (key, shard)
        ).fetchone()
        digest = sha256_file(path)
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        shape, dtype = data.shape, data.dtype
        if len(shape) != 2 or dtype != np.float32:
            raise ValueError(f"holds a {dtype} array of shape {shape}, not float32 vectors")
        if row is None:
            if not np.isfinite(np.asarray(data)).all():
                raise ValueError("holds values that are not finite")
            with self.db:
                self.db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)", (key, shard, digest, *shape))
        elif row[0] != digest:
            raise ValueError("its content is not what was written (sha256 mismatch)")
        elif tuple(row[1:]) != tuple(shape):
            raise ValueError(f"holds {shape[0]} x {shape[1]}, not the {row[1]} x {row[2]} written")
        del data
        self._checked[path] = (st.st_size, st.st_mtime_ns)

    def put(self, key: str, vectors: dict[str, torch.Tensor]) -> None:
        """Write vectors as new shards (one per vector length) and record them in one transaction; a
        cache that cannot be written is disabled with a warning."""
        if self.db is None or not vectors:
            return
        by_size: dict[int, list[str]] = defaultdict(list)  # one shard per vector length (a face cache
        for sha, v in vectors.items():  # holds empty vectors for images without a face)
            by_size[v.numel()].append(sha)
        folder = self.shard_dir(key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            rows, shards = [], []
            for shas in by_size.values():
                block = torch.stack([vectors[s].detach().float().cpu().reshape(-1) for s in shas]).numpy()
                name = f"{uuid.uuid4().hex}.npy"  # unique: concurrent writers never share a file
                tmp = folder / f".{name}.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, block, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before any row points at it
                shards.append((key, name, sha256_file(tmp), *block.shape))
                os.replace(tmp, folder / name)  # a shard appears whole or not at all
                rows += [(key, s, name, i) for i, s in enumerate(shas)]
            _fsync_folder(folder)  # the rename too
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)", shards)
                self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?)", rows)
        except (OSError, sqlite3.Error) as e:
            self.disable(e)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class EmbeddedSet:
    """Reference embeddings aligned with ``refs.items``, and how many were computed versus cached."""

    embeddings: torch.Tensor
    computed: int
    cached: int


#: vectors written to the cache at a time while embedding: an interrupted run keeps what it had done
FLUSH_EVERY = 2048


def embed_items(
    refs: ReferenceSet,
    items: list[ReferenceItem],
    embedder: Embedder,
    cache: EmbeddingCache | None,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Embed ``items`` of ``refs`` (duplicate contents once), writing to the cache every
    :data:`FLUSH_EVERY` vectors, so an interrupted run resumes where it stopped.

    Args:
        refs: the set the items belong to (undecodable items are moved to its ``skipped``).
        items: those to embed.
        embedder: the embedder.
        cache: the cache, or None.
        batch_size: images per forward pass.
        progress: show a progress bar (stderr).

    Returns:
        sha256 -> vector of every item embedded.
    """
    from tqdm import tqdm

    new: dict[str, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    with tqdm(total=len(items), desc="embedding", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(items), batch_size):
            batch = [it for it in items[start : start + batch_size] if it.sha256 not in new]
            unique = list({it.sha256: it for it in batch}.values())  # duplicate file content: embed once
            images, kept = refs.load(unique, embedder.resolution)  # undecodable items are skipped and counted
            if kept:
                vectors = dict(zip([it.sha256 for it in kept], embedder.embed(images), strict=True))
                new.update(vectors)
                pending.update(vectors)
            if cache is not None and len(pending) >= FLUSH_EVERY:
                cache.put(embedder.key, pending)
                pending = {}
            bar.update(len(items[start : start + batch_size]))
    if cache is not None and pending:
        cache.put(embedder.key, pending)
    return new


def embed_reference(
    refs: ReferenceSet,
    embedder: Embedder,
    cache: EmbeddingCache | None,
    *,
    batch_size: int = 64,
) -> EmbeddedSet:
    """Embed every item of ``refs``, reusing and filling the cache.

    Items whose pixels fail to decode are moved to ``refs.skipped`` (counted and reported), so the
    returned rows always align with ``refs.items``.

    Args:
        refs: the reference or holdout set.
        embedder: the embedder (its ``key`` keys the cache).
        cache: the cache, or None to embed everything.
        batch_size: images embedded per forward pass.

    Returns:
        An :class:`EmbeddedSet`.

    Example:
        >>> out = embed_reference(refs, PixelEmbedder(32), EmbeddingCache())  # doctest: +SKIP
        >>> out.embeddings.shape, out.computed, out.cached  # doctest: +SKIP
        (torch.Size([16, 3072]), 0, 16)
    """
    key = embedder.key
    have = cache.get(key, [it.sha256 for it in refs.items]) if cache is not None else {}
    have = _of_one_width(have, refs, embedder)
    todo = [it for it in refs.items if it.sha256 not in have]
    new = embed_items(refs, todo, embedder, cache, batch_size=batch_size)
    if not refs.items:
        raise MemwatchError(f"{refs.root}: no image could be decoded; see the skipped files logged above")
    have.update(new)
    emb = torch.stack([have[it.sha256] for it in refs.items])
    return EmbeddedSet(embeddings=emb, computed=len(new), cached=sum(it.sha256 not in new for it in refs.items))


def _of_one_width(have: dict[str, torch.Tensor], refs: ReferenceSet, embedder: Embedder) -> dict[str, torch.Tensor]:
    """Cached vectors of the embedder's width only: when they disagree (a cache damaged by hand, or by another
    program), one image is embedded to learn the width, and the others are embedded again."""
    widths = {v.numel() for v in have.values()}
    if len(widths) <= 1:
        return have
    probe = refs.items[0]
    images, kept = refs.load([probe], embedder.resolution)
    if not kept:
        return {}
    width = embedder.embed(images)[0].numel()
    wrong = [sha for sha, v in have.items() if v.numel() != width]
    log.warning("embedding cache: %d vectors are not %d wide, as %s's are: they are embedded again", len(wrong),
                width, embedder.name)  # fmt: skip
    return {sha: v for sha, v in have.items() if v.numel() == width}
