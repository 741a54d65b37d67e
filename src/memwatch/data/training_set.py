"""The training set itself: exact and near duplicates, and isolated images (``memwatch data``).

Duplicated training images are memorized far sooner and more often than the rest (Carlini et al. 2023;
Somepalli et al. 2023), so the owner of a data set wants them found before training:

* **exact duplicates**: files with the same bytes (sha256), whatever their names;
* **near duplicates**: different files that are the same photo, re-encoded, resized, slightly shifted or
  cropped. Two images are near duplicates when their best normalised cross-correlation after aligning
  shift and zoom reaches a threshold measured on real photos (:mod:`memwatch.data.near_duplicates` says
  why a distance between whole images, or the ratio d1/d2 within the set, cannot find them). Near pairs are
  joined into groups (connected components), so a resized, a re-encoded and a cropped copy of one photo
  form one group;
* **isolated images**: those whose nearest other image in the embedder's space is unusually far, beyond
  Tukey's upper fence (Q3 + 1.5 IQR) of the set's nearest-neighbour distances (Tukey 1977).

The nearest-neighbour search is exact (:mod:`memwatch.search.pairs`: a provable lower bound from a
principal-axes projection skips the pairs that cannot be close), in blocks of ``chunk_size`` rows, so
memory stays bounded whatever the set's size.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from memwatch.data.images import tensor_to_pil
    >>> from memwatch.embedders.pixel import PixelEmbedder
    >>> from memwatch.data.refset import load_reference_set
    >>> d = Path(tempfile.mkdtemp())
    >>> g = torch.Generator().manual_seed(0)
    >>> photos = [torch.nn.functional.interpolate(torch.rand(1, 3, 10, 10, generator=g), size=72, mode="bicubic")
    ...           for _ in range(2)]
    >>> for name, photo in [("a", photos[0][..., :64, :64]), ("b", photos[1][..., :64, :64]),
    ...                     ("a_shifted", photos[0][..., 3:67, 2:66])]:  # the same photo, moved by 3 px
    ...     tensor_to_pil(photo[0].clamp(0, 1)).save(d / f"{name}.png")
    >>> (d / "a2.png").write_bytes((d / "a.png").read_bytes()) > 0
    True
    >>> result = analyse_training_set(load_reference_set(d), PixelEmbedder(8))
    >>> [(g.kind, g.ids) for g in result.duplicate_groups]
    [('exact', ['a.png', 'a2.png']), ('near', ['a.png', 'a2.png', 'a_shifted.png'])]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memwatch.data import near_duplicates
from memwatch.data.reference_index import ReferenceIndex
from memwatch.search.pairs import similar_pairs

if TYPE_CHECKING:
    from memwatch.data.embed_cache import EmbeddingCache
    from memwatch.data.refset import ReferenceSet
    from memwatch.embedders.base import Embedder

#: Tukey's fences (Tukey 1977): a nearest-neighbour distance above Q3 + 1.5 IQR marks an isolated image.
TUKEY_K = 1.5
ISOLATION_SOURCE = "Tukey 1977: nearest-neighbour distance above Q3 + 1.5 x IQR of the set's"


@dataclass
class DuplicateGroup:
    """Training images that are copies of each other.

    Attributes:
        kind: ``"exact"`` (same file bytes) or ``"near"`` (aligned correlation at or above the threshold).
        ids: every member's id, sorted (a near group includes the exact copies of its members).
        min_similarity: the smallest aligned correlation of a pair that joined the group (1.0 for exact).
    """

    kind: str
    ids: list[str]
    min_similarity: float = 1.0


@dataclass
class TrainingSetAnalysis:
    """What :func:`analyse_training_set` found; :meth:`to_dict` is ``memwatch data --json``."""

    n: int
    distinct: int
    duplicate_groups: list[DuplicateGroup]
    #: ids of isolated images (one per distinct content), farthest first
    isolated: list[str]
    #: id (first of each distinct content) -> (nearest other id, its similarity)
    nearest: dict[str, tuple[str, float]]
    near_threshold: float
    near_threshold_source: str
    embedder: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, *, all_nearest: bool = True) -> dict[str, Any]:
        """Plain data; ``all_nearest=False`` keeps the nearest neighbour of isolated images only (what the
        store keeps: one row per image would be megabytes for a large set)."""
        groups = self.duplicate_groups
        keep = None if all_nearest else set(self.isolated)
        return {
            "n": self.n,
            "distinct": self.distinct,
            "exact_duplicate_images": sum(len(g.ids) - 1 for g in groups if g.kind == "exact"),
            "near_duplicate_groups": sum(g.kind == "near" for g in groups),
            "duplicate_groups": [
                {"kind": g.kind, "ids": g.ids, "min_similarity": round(g.min_similarity, 6)} for g in groups
            ],
            "isolated": self.isolated,
            "nearest": [
                {"id": i, "nearest": j, "similarity": round(s, 6)}
                for i, (j, s) in sorted(self.nearest.items())
                if keep is None or i in keep
            ],
            "near_threshold": self.near_threshold,
            "near_threshold_source": self.near_threshold_source,
            "isolation_rule": ISOLATION_SOURCE,
            "embedder": self.embedder,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 2),
        }


def analyse_training_set(
    refs: ReferenceSet,
    embedder: Embedder,
    cache: EmbeddingCache | None = None,
    *,
    index: ReferenceIndex | None = None,
    near_threshold: float | None = None,
    chunk_size: int = 2048,
) -> TrainingSetAnalysis:
    """Find exact and near duplicates and isolated images in a training set.

    Args:
        refs: the training set (undecodable files are skipped and listed).
        embedder: the comparison space (the regurgitation probe's, so "near duplicate" means "copy").
        cache: embedding cache, or None.
        index: ``refs`` already embedded by ``embedder`` (the probes' index), to reuse; None: embed here.
        near_threshold: aligned correlation at or above which two images are near duplicates (default
            :data:`memwatch.data.near_duplicates.THRESHOLD`).
        chunk_size: rows compared at a time (memory: ``chunk_size**2`` distances).

    Returns:
        A :class:`TrainingSetAnalysis`; groups sorted by kind (exact first), then by first id.
    """
    t0 = time.perf_counter()
    if index is None:
        index = ReferenceIndex(refs, embedder, cache)  # one row per distinct content (skips undecodable files)
    threshold = near_duplicates.THRESHOLD if near_threshold is None else near_threshold
    source = near_duplicates.THRESHOLD_SOURCE if near_threshold is None else "set by the user (--near-threshold)"
    ids_of: dict[str, list[str]] = {}
    for it in refs.items:
        ids_of.setdefault(it.sha256, []).append(it.id)
    content_ids = [ids for ids in ids_of.values()]  # aligned with index.ids (first id of each content, sorted)
    groups = [DuplicateGroup("exact", sorted(ids)) for ids in content_ids if len(ids) > 1]

    pairs = _near_pairs(refs, index.ids, threshold, chunk_size)
    nearest = similar_pairs(index.embeddings, embedder, None, chunk_size=chunk_size)[1]
    parent = list(range(len(index)))
    weakest: dict[int, float] = {}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, sim in pairs:
        a, b = root(i), root(j)
        low = min(sim, weakest.get(a, 1.0), weakest.get(b, 1.0))
        if a != b:
            parent[b] = a
        weakest[a] = low
    components: dict[int, list[int]] = {}
    for i in range(len(index)):
        components.setdefault(root(i), []).append(i)
    first_to_ids = {ids[0]: ids for ids in content_ids}
    for r, members in components.items():
        if len(members) > 1:
            ids = sorted(x for m in members for x in first_to_ids[index.ids[m]])
            groups.append(DuplicateGroup("near", ids, weakest.get(r, 1.0)))
    groups.sort(key=lambda g: (g.kind != "exact", g.ids))

    near_of = {index.ids[i]: (index.ids[j], float(s)) for i, (j, s) in nearest.items()}
    isolated = _isolated(near_of, embedder)
    return TrainingSetAnalysis(
        n=len(refs.items),
        distinct=len(index),
        duplicate_groups=groups,
        isolated=isolated,
        nearest=near_of,
        near_threshold=float(threshold),
        near_threshold_source=source,
        embedder=embedder.spec(),
        skipped=list(refs.skipped),
        seconds=time.perf_counter() - t0,
    )


def _near_pairs(refs: ReferenceSet, ids: list[str], threshold: float, chunk_size: int) -> list[tuple[int, int, float]]:
    """Near-duplicate pairs among the rows ``ids`` (one per distinct content), as row positions. Images are
    decoded a chunk at a time and only their thumbnails kept (4 KiB each)."""
    by_id = {it.id: it for it in refs.items}
    wanted = [by_id[i] for i in ids if i in by_id]
    row = {i: r for r, i in enumerate(ids)}
    thumbs, colours, at = [], [], []
    for a in range(0, len(wanted), chunk_size):
        images, kept = refs.load(wanted[a : a + chunk_size], near_duplicates.SIDE)  # skips (and lists) bad files
        t, c = near_duplicates.describe(images)
        thumbs.append(t)
        colours.append(c)
        at += [row[it.id] for it in kept]
    if len(at) < 2:
        return []
    found = near_duplicates.near_duplicate_pairs(
        torch.cat(thumbs), torch.cat(colours), threshold=threshold, chunk_size=chunk_size
    )
    return [(min(at[i], at[j]), max(at[i], at[j]), s) for i, j, s in found]


def _isolated(nearest: dict[str, tuple[str, float]], embedder: Embedder) -> list[str]:
    """Ids whose nearest-neighbour distance lies above Tukey's upper fence (at least 4 images needed)."""
    if len(nearest) < 4:
        return []
    # Similarity is a decreasing function of distance for every embedder, so the fence is taken on
    # 1 - similarity, an increasing stand-in for the distance.
    far = {i: 1.0 - s for i, (_, s) in nearest.items()}
    values = torch.tensor(list(far.values()), dtype=torch.float64)
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    fence = q3 + TUKEY_K * (q3 - q1)
    return sorted((i for i, v in far.items() if v > fence), key=lambda i: (-far[i], i))


def format_analysis(result: TrainingSetAnalysis, top: int = 10) -> str:
    """A short text summary for the terminal.

    Example:
        >>> r = TrainingSetAnalysis(3, 2, [DuplicateGroup("exact", ["a", "b"])], [], {}, 0.95, "x", {})
        >>> print(format_analysis(r).splitlines()[0])
        3 images, 2 distinct: 1 exact duplicate group(s) (1 extra copies), 0 near-duplicate group(s)
    """
    d = result.to_dict()
    lines = [
        f"{d['n']} images, {d['distinct']} distinct: "
        f"{sum(g.kind == 'exact' for g in result.duplicate_groups)} exact duplicate group(s) "
        f"({d['exact_duplicate_images']} extra copies), {d['near_duplicate_groups']} near-duplicate group(s)"
    ]
    for g in result.duplicate_groups[:top]:
        detail = "" if g.kind == "exact" else f" (aligned correlation >= {g.min_similarity:.3f})"
        lines.append(f"  {g.kind}{detail}: {', '.join(g.ids[:8])}{' ...' if len(g.ids) > 8 else ''}")
    if len(result.duplicate_groups) > top:
        lines.append(f"  ... {len(result.duplicate_groups) - top} more group(s) in --json")
    lines.append(f"isolated (nearest image beyond Q3 + 1.5 IQR): {len(result.isolated)}")
    for i in result.isolated[:top]:
        j, s = result.nearest[i]
        lines.append(f"  {i}: nearest {j}, similarity {s:.3f}")
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} unreadable file(s): {result.skipped[0][0]} ...")
    return "\n".join(lines)
