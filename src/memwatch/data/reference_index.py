"""The training set embedded once and ready for search: what every probe that compares with training images uses.

:class:`ReferenceIndex` holds the training set's embeddings, computed once through the embedding cache
and de-duplicated by file content, and searches them with :mod:`memwatch.search.index` (exact, or a
FAISS index for large sets).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from memwatch.data.embed_cache import EmbeddingCache
    from memwatch.data.refset import ReferenceSet
    from memwatch.embedders.base import Embedder


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
        from memwatch.data.embed_cache import embed_reference

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
        from memwatch.search.index import build_search, resolve_kind, saved_index_path

        kind = resolve_kind(len(self), self.search_kind)
        kwargs: dict[str, Any] = {}
        if kind != "exact" and self.cache_dir is not None:
            manifest = self.refs.manifest_sha256
            kwargs["path"] = saved_index_path(self.cache_dir, self.embedder, manifest, kind)
        self._search = build_search(self.embeddings, self.embedder, kind, **kwargs)
        return self._search

    def search(self, query: torch.Tensor, k: int, *, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest training rows of each query (:mod:`memwatch.search.index`: exact, or a FAISS
        index for large sets, built on first use), as ``(distances, indices)`` nearest first."""
        if self._search is None:
            self.prepare_search()
        self._search.chunk_size = chunk_size
        return self._search.search(query, k)
