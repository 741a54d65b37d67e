"""Nearest training images of many samples: exact search in chunks, or a FAISS index for large sets.

One interface, :meth:`Search.search` (queries in, the ``k`` nearest reference rows in the embedder's own
distance out), three ways behind it, chosen by :func:`build_search`:

* ``exact``: :func:`memwatch.search.exact.knn`, chunked, equal to brute force (the default while the
  reference set fits: below :data:`EXACT_LIMIT` rows);
* ``flat``: FAISS's exact ``IndexFlatL2`` (BLAS, several times faster than chunked torch on many
  queries) for a shortlist by plain euclidean distance, re-ranked by the embedder's distance; a row
  whose shortlist cannot be certified complete by the embedder's lower bound
  (:meth:`memwatch.embedders.base.Embedder.distance_lower_bound`) is searched exactly, so the result is
  exact;
* ``compressed``: an inverted-file product-quantisation index (``IVF{nlist},PQ{m}``: Jégou et al.,
  IEEE TPAMI 2011, as FAISS implements it) whose shortlist of :data:`SHORTLIST` rows per query is
  re-ranked exactly on the full embeddings. It is approximate: its recall against exact search is
  measured by ``scripts/bench_search.py`` and recorded in ``docs/benchmarks.md``.

FAISS (``memwatch[search]``) uses a GPU when its GPU build is installed and one is visible.

A kept index (``memwatch index`` writes one beside the embedding cache) is written to a temporary file of
the writer's own (concurrent builders never share one), flushed and renamed into place, with its sha256 in
``<index>.sha256`` beside it. A kept index that is cut, damaged, of another shape or whose checksum does not
match is built again, with a warning; an index that cannot be kept (a read-only or full disk) is used from
memory, and :attr:`FaissSearch.kept` says so.

Example:
    >>> from memwatch.embedders.pixel import PixelEmbedder
    >>> ref = torch.rand(500, 48, generator=torch.Generator().manual_seed(0))
    >>> search = build_search(ref, PixelEmbedder(4), kind="exact")
    >>> d, i = search.search(ref[:3] + 0.001, k=1)
    >>> i[:, 0].tolist()
    [0, 1, 2]
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file
from memwatch.search.exact import knn

log = logging.getLogger("memwatch")

if TYPE_CHECKING:
    from memwatch.embedders.base import Embedder

#: reference rows up to which ``auto`` searches exactly (memory: rows x dims x 4 bytes, 1.2 GiB at 3,072 dims)
EXACT_LIMIT = 100_000
#: rows of the compressed index's shortlist re-ranked exactly per query
SHORTLIST = 64
#: share of the inverted lists probed per query: on the 1,000,000-row benchmark half the lists gave
#: recall@1 0.998 (1.0 on near copies) at 9 ms per query; a quarter 0.982. A sample's d1/d2 needs its
#: two nearest rows right, so recall comes before speed here (a probe searches only tens of samples).
NPROBE_SHARE = 0.5
KINDS = ("auto", "exact", "flat", "compressed")


def import_faiss() -> Any:
    """faiss, or a one-line error naming the extra that brings it."""
    try:
        import faiss
    except ImportError as e:
        raise MemwatchError(f"large reference sets need faiss ({e}): pip install 'memwatch[search]'") from None
    return faiss


class Search:
    """The ``k`` nearest reference rows of queries, in the embedder's distance."""

    kind = "exact"

    def __init__(self, reference: torch.Tensor, embedder: Embedder, chunk_size: int = 4096):
        self.reference = reference
        self.embedder = embedder
        self.chunk_size = chunk_size

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances, indices)``, both ``(Q, min(k, R))``, nearest first."""
        return knn(query, self.reference, k, self.embedder.pairwise_distance, chunk_size=self.chunk_size)

    def describe(self) -> dict[str, Any]:
        """What the store records about the search (kind and parameters)."""
        return {"kind": self.kind}


class FaissSearch(Search):
    """A FAISS shortlist re-ranked exactly (see the module docstring).

    Args:
        reference: ``(R, D)`` embeddings (kept, for the exact re-ranking).
        embedder: gives the exact distance and its lower bound.
        compressed: IVF-PQ instead of the exact flat index.
        nlist: inverted lists (default ``sqrt(R)``, the usual starting point; k-means training cost grows with it).
        m: PQ sub-vectors (default ``D / 8``; 8 bits each, so ``m`` bytes per row).
        nprobe: lists probed per query (default :data:`NPROBE_SHARE` of ``nlist``).
        shortlist: rows re-ranked per query.
        seed: the k-means seed (the index, and so the results, are reproducible).
        path: where the built index is kept (``memwatch index`` writes it; probes read it instead of
            building again); None: not kept.
    """

    def __init__(
        self,
        reference: torch.Tensor,
        embedder: Embedder,
        *,
        compressed: bool,
        nlist: int | None = None,
        m: int | None = None,
        nprobe: int | None = None,
        shortlist: int = SHORTLIST,
        seed: int = 0,
        chunk_size: int = 4096,
        path: Path | None = None,
    ):
        super().__init__(reference, embedder, chunk_size)
        faiss = import_faiss()
        self.kind = "compressed" if compressed else "flat"
        self.shortlist = shortlist
        r, d = reference.shape
        x = reference.float().contiguous().numpy()
        self.loaded = False
        #: whether the index is kept at ``path`` (False: it could not be written; it is used from memory)
        self.kept = False
        if compressed:
            self.nlist = nlist or max(1, round(math.sqrt(r)))
            self.m = m or _largest_divisor_at_most(d, max(1, d // 8))
            self.nprobe = nprobe or max(1, round(NPROBE_SHARE * self.nlist))
        index = _read_kept(faiss, path, r, d) if path is not None else None
        if index is not None:
            if compressed:
                index.nprobe = self.nprobe
            self.loaded = self.kept = True
        elif compressed:
            index = faiss.index_factory(d, f"IVF{self.nlist},PQ{self.m}", faiss.METRIC_L2)
            index.cp.seed = seed
            # k-means wants 30-256 points per list, and each PQ codebook (256 codes) about 39 x 256 = 9,984;
            # more only slows training
            n_train = min(r, max(10_000, 30 * self.nlist))
            train = x[torch.randperm(r, generator=torch.Generator().manual_seed(seed))[:n_train].numpy()]
            index.train(train)
            index.add(x)
            index.nprobe = self.nprobe
        else:
            index = faiss.IndexFlatL2(d)
            index.add(x)
        if path is not None and not self.loaded:
            self.kept = _keep(faiss, index, path)
        if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # the GPU build, with a GPU visible
            index = faiss.index_cpu_to_all_gpus(index)
        self.index = index

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "shortlist": self.shortlist}
        if self.kind == "compressed":
            out.update(nlist=self.nlist, m=self.m, nprobe=self.nprobe, method="IVF-PQ (Jegou et al. 2011), re-ranked")
        return out

    def search(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.reference.shape[0]
        k = min(k, r)
        want = min(r, max(k, self.shortlist))
        l2sq, cand = self.index.search(query.float().contiguous().numpy(), want)
        cand = torch.from_numpy(cand).long()
        out_d = torch.empty(query.shape[0], k)
        out_i = torch.empty(query.shape[0], k, dtype=torch.long)
        unsure = []
        for q in range(query.shape[0]):
            rows = cand[q][cand[q] >= 0]  # -1: fewer rows than asked in the probed lists
            if len(rows) < k:
                unsure.append(q)
                continue
            d = self.embedder.pairwise_distance(query[q : q + 1], self.reference[rows])[0].float()
            order = torch.sort(d, stable=True).indices[:k]
            out_d[q], out_i[q] = d[order], rows[order]
            if self.kind == "flat" and want < r:
                # Certain when no row outside the shortlist can be nearer than the k-th found.
                bound = self.embedder.distance_lower_bound(torch.tensor([max(float(l2sq[q][-1]), 0.0) ** 0.5]),
                                                           query.shape[1])  # fmt: skip
                if bound is None or float(bound[0]) < float(out_d[q, -1]):
                    unsure.append(q)
        if unsure:
            idx = torch.tensor(unsure)
            d, i = knn(query[idx], self.reference, k, self.embedder.pairwise_distance, chunk_size=self.chunk_size)
            out_d[idx], out_i[idx] = d, i
        return out_d, out_i


def _read_kept(faiss: Any, path: Path, rows: int, dim: int) -> Any:
    """The index kept at ``path`` if it is whole and fits ``rows`` x ``dim``; None (with a warning) otherwise."""
    if not path.is_file():
        return None
    checksum = path.with_name(path.name + ".sha256")
    try:
        recorded = checksum.read_text().strip() if checksum.is_file() else None
        if recorded is not None and recorded != sha256_file(path):
            raise ValueError("its content is not what was written (sha256 mismatch)")
        index = faiss.read_index(str(path))
        if index.ntotal != rows or index.d != dim:
            raise ValueError(f"it holds {index.ntotal} x {index.d}, not {rows} x {dim}")
    except (OSError, RuntimeError, ValueError) as e:  # faiss raises RuntimeError for a cut or damaged file
        log.warning("saved search index %s cannot be used (%s): it is built again", path, str(e).splitlines()[0])
        return None
    if recorded is None:  # kept by an older memwatch: whole and of the right shape, so record its checksum now
        _write_checksum(path)
    return index


def _keep(faiss: Any, index: Any, path: Path) -> bool:
    """Write ``index`` to ``path`` (a temporary file of this writer's, flushed, renamed) with its checksum; False
    (with a warning) when it cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)  # whole or absent: a reader never sees half an index
        _write_checksum(path)
        return True
    except (OSError, RuntimeError) as e:
        log.warning("search index %s not kept (%s): it is used from memory", path, str(e).splitlines()[0])
        tmp.unlink(missing_ok=True)
        return False


def _write_checksum(path: Path) -> None:
    """``<path>.sha256`` beside a kept index (best effort: without it the index is checked for shape only)."""
    checksum = path.with_name(path.name + ".sha256")
    tmp = checksum.with_name(f".{checksum.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(sha256_file(path) + "\n")
        tmp.replace(checksum)
    except OSError as e:
        log.warning("checksum of the search index %s not written (%s)", path, e)
        tmp.unlink(missing_ok=True)


def resolve_kind(rows: int, kind: str = "auto") -> str:
    """The search ``auto`` means for ``rows`` reference rows: exact up to :data:`EXACT_LIMIT`, then the
    compressed index when faiss is installed (else exact: slower, never wrong)."""
    if kind not in KINDS:
        raise MemwatchError(f"search kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    if rows <= EXACT_LIMIT:
        return "exact"
    try:
        import_faiss()
    except MemwatchError:
        return "exact"
    return "compressed"


def saved_index_path(cache_dir: Path, embedder: Embedder, manifest_sha256: str, kind: str) -> Path:
    """Where the FAISS index of one reference set, embedder and kind is kept (beside the embedding cache)."""
    return Path(cache_dir) / "indexes" / f"{embedder.key[:16]}-{manifest_sha256[:16]}-{kind}.faiss"


def build_search(reference: torch.Tensor, embedder: Embedder, kind: str = "auto", **kwargs: Any) -> Search:
    """The search for a reference set: ``auto`` is exact up to :data:`EXACT_LIMIT` rows, then the
    compressed FAISS index when faiss is installed (else exact, which is slower but never wrong).

    Args:
        reference: ``(R, D)`` embeddings.
        embedder: the distance.
        kind: one of :data:`KINDS`.
        kwargs: for :class:`FaissSearch` (``nlist``, ``m``, ``nprobe``, ``shortlist``, ``seed``, ``path``).
    """
    kind = resolve_kind(reference.shape[0], kind)
    if kind == "exact":
        return Search(reference, embedder)
    return FaissSearch(reference, embedder, compressed=kind == "compressed", **kwargs)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """PQ needs ``m`` to divide the dimension."""
    return next(m for m in range(min(limit, n), 0, -1) if n % m == 0)
