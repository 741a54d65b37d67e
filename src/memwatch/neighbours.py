"""The reference index and exact k-nearest-neighbour search in chunks.

The reference set is scanned ``chunk_size`` rows at a time and a running top-k is kept, so the
distance matrix in memory is at most ``len(query) x chunk_size`` however large the reference set is.
Results equal brute force exactly: ties are broken by the lower reference index (a stable sort of the
running candidates, which always come from earlier chunks, before the new chunk).

:class:`ReferenceIndex` holds the training set's embeddings, computed once through the embedding
cache and de-duplicated by file content; every probe that compares with training images searches it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from memwatch.embed_cache import EmbeddingCache
    from memwatch.embedders.base import Embedder
    from memwatch.refset import ReferenceSet

DistanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def knn(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    distance: DistanceFn,
    *,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest reference rows of every query row.

    Args:
        query: ``(Q, D)`` embeddings.
        reference: ``(R, D)`` embeddings.
        k: neighbours wanted; clipped to ``R``.
        distance: pairwise distance function ``(Q, D), (C, D) -> (Q, C)``.
        chunk_size: reference rows compared at a time.

    Returns:
        ``(distances, indices)``, both ``(Q, min(k, R))``, sorted by increasing distance.

    Example:
        >>> q, r = torch.rand(3, 5), torch.rand(100, 5)
        >>> d, i = knn(q, r, 2, torch.cdist, chunk_size=16)
        >>> d.shape, i.shape
        (torch.Size([3, 2]), torch.Size([3, 2]))
    """
    if reference.shape[0] == 0:
        raise ValueError("knn needs at least one reference row")
    k = min(k, reference.shape[0])
    best_d = torch.empty(query.shape[0], 0)
    best_i = torch.empty(query.shape[0], 0, dtype=torch.long)
    for start in range(0, reference.shape[0], chunk_size):
        chunk = reference[start : start + chunk_size]
        d = distance(query, chunk).float()
        idx = torch.arange(start, start + chunk.shape[0]).expand(query.shape[0], -1)
        cand_d = torch.cat([best_d, d], dim=1)
        cand_i = torch.cat([best_i, idx], dim=1)
        order = torch.sort(cand_d, dim=1, stable=True).indices[:, :k]
        best_d = torch.gather(cand_d, 1, order)
        best_i = torch.gather(cand_i, 1, order)
    return best_d, best_i


class ReferenceIndex:
    """Reference embeddings ready for search: embedded once (through the cache), de-duplicated.

    Args:
        refs: the training set.
        embedder: the embedder all comparisons use.
        cache: embedding cache, or None.

    Example:
        >>> index = ReferenceIndex(load_reference_set("data/train"), PixelEmbedder(32), None)  # doctest: +SKIP
        >>> result = regurgitation_probe(samples, index, RegurgitationConfig())  # doctest: +SKIP
    """

    def __init__(self, refs: ReferenceSet, embedder: Embedder, cache: EmbeddingCache | None, *, search: str = "auto"):
        from memwatch.embed_cache import embed_reference

        t0 = time.perf_counter()
        embedded = embed_reference(refs, embedder, cache)
        self.refs = refs
        self.embedder = embedder
        self.computed, self.cached = embedded.computed, embedded.cached
        # One row per distinct file content; nn1 names the first id (sorted) that has it.
        first: dict[str, int] = {}
        for i, it in enumerate(refs.items):
            first.setdefault(it.sha256, i)
        keep = sorted(first.values())
        self.embeddings = embedded.embeddings[keep]
        self.ids = [refs.items[i].id for i in keep]
        self.search_kind = search
        self.cache_dir = cache.dir if cache is not None else None
        self._search: Any = None
        self.seconds = time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.ids)

    def prepare_search(self) -> Any:
        """Build (or load, when ``memwatch index`` or an earlier run kept it beside the embedding cache)
        the search behind :meth:`search`; returns it."""
        from memwatch.vector_index import build_search, resolve_kind, saved_index_path

        kind = resolve_kind(len(self), self.search_kind)
        kwargs: dict[str, Any] = {}
        if kind != "exact" and self.cache_dir is not None:
            manifest = self.refs.manifest_sha256
            kwargs["path"] = saved_index_path(self.cache_dir, self.embedder, manifest, kind)
        self._search = build_search(self.embeddings, self.embedder, kind, **kwargs)
        return self._search

    def search(self, query: torch.Tensor, k: int, *, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest training rows of each query (:mod:`memwatch.vector_index`: exact, or a FAISS
        index for large sets, built on first use), as ``(distances, indices)`` nearest first."""
        if self._search is None:
            self.prepare_search()
        self._search.chunk_size = chunk_size
        return self._search.search(query, k)
