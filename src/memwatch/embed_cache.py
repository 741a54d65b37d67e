"""On-disk cache of reference embeddings, keyed by (embedder spec hash, image sha256).

Reference images are embedded once per embedder and reused across probes, runs and processes. The
cache is one SQLite file (``<cache_dir>/embeddings.sqlite``, WAL mode, so concurrent jobs share it
safely). Vectors are stored as raw float32 bytes: nothing is unpickled when reading.

The default folder is ``$MEMWATCH_CACHE_DIR`` or ``~/.cache/memwatch`` (:mod:`memwatch.sqlite_cache`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memwatch.embedders.base import Embedder
from memwatch.errors import MemwatchError
from memwatch.refset import ReferenceItem, ReferenceSet
from memwatch.sqlite_cache import SqliteCache, default_cache_dir


class EmbeddingCache(SqliteCache):
    """Persistent map (embedder key, sha256) -> float32 vector.

    Args:
        cache_dir: folder holding ``embeddings.sqlite`` (created if missing).

    Example:
        >>> cache = EmbeddingCache("/tmp/mw-cache")  # doctest: +SKIP
        >>> cache.put("k", {"ab12": torch.ones(4)}); cache.get("k", ["ab12"])["ab12"].shape  # doctest: +SKIP
        torch.Size([4])
    """

    def __init__(self, cache_dir: str | Path | None = None):
        self.dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        super().__init__(
            "embedding cache",
            self.dir / "embeddings.sqlite",
            "CREATE TABLE IF NOT EXISTS embeddings (key TEXT, sha256 TEXT, dim INTEGER, data BLOB,"
            " PRIMARY KEY (key, sha256))",
            "embedding without it; set cache_dir or $MEMWATCH_CACHE_DIR to a writable folder, or delete a corrupt "
            "cache file",
        )

    def get(self, key: str, hashes: Iterable[str]) -> dict[str, torch.Tensor]:
        """Cached vectors for the given image hashes (missing ones are simply absent)."""
        hashes = list(dict.fromkeys(hashes))
        found: dict[str, torch.Tensor] = {}
        if self.db is None:
            return found
        try:
            for start in range(0, len(hashes), 500):  # stay under SQLite's bound-parameter limit
                part = hashes[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self.db.execute(
                    f"SELECT sha256, data FROM embeddings WHERE key = ? AND sha256 IN ({marks})", [key, *part]
                )
                for sha, data in rows:
                    found[sha] = torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy())
        except sqlite3.Error as e:
            self.disable(e)
            return {}
        return found

    def put(self, key: str, vectors: dict[str, torch.Tensor]) -> None:
        """Store vectors (one transaction); a cache that cannot be written is disabled with a warning."""
        if self.db is None:
            return
        rows = [(key, sha, v.numel(), v.detach().float().cpu().numpy().tobytes()) for sha, v in vectors.items()]
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error as e:
            self.disable(e)


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
    todo = [it for it in refs.items if it.sha256 not in have]
    new = embed_items(refs, todo, embedder, cache, batch_size=batch_size)
    if not refs.items:
        raise MemwatchError(f"{refs.root}: no image could be decoded; see the skipped files logged above")
    have.update(new)
    emb = torch.stack([have[it.sha256] for it in refs.items])
    return EmbeddedSet(embeddings=emb, computed=len(new), cached=sum(it.sha256 not in new for it in refs.items))
