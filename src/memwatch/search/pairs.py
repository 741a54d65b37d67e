"""All pairs of similar embeddings, and each embedding's nearest other: exact, and fast on real data.

``memwatch data`` needs, for a whole training set, every pair at or above the copy threshold and every
image's nearest other image. Comparing all pairs in the embedder's own distance costs ``n**2 * D``
(about 9 minutes for 100,000 images of 32 px on two cores). This module gets the same answer, exactly,
from a cheap lower bound:

1. project the embeddings onto their top ``components`` principal axes (an orthonormal basis, so the
   projected euclidean distance never exceeds the full one: a contraction);
2. the embedder turns that into a lower bound on its own distance
   (:meth:`memwatch.embedders.base.Embedder.distance_lower_bound`);
3. candidates are the pairs whose bound could still reach the threshold, and each row's ``candidates``
   smallest bounds; only those are measured exactly;
4. a row's nearest is certain when its ``candidates``-th smallest bound is no smaller than the best
   exact distance found; rows where it is not (little structure for the projection to catch) are
   measured exactly against every row, as without the prefilter.

Pairs are complete by construction (no pair whose distance reaches the threshold has a larger bound),
so the prefilter changes the time, never the result. An embedder without a bound gets the plain
exact search in blocks.

Example:
    >>> from memwatch.embedders.pixel import PixelEmbedder
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(300, 4, generator=g).repeat_interleave(48, dim=1)  # 300 images, 192 pixel values
    >>> x[7] = x[3] + 0.001  # a near copy
    >>> pairs, nearest = similar_pairs(x, PixelEmbedder(8), 0.99, chunk_size=64)
    >>> [(i, j) for i, j, _ in pairs]
    [(3, 7)]
    >>> nearest[3][0], nearest[7][0]
    (7, 3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from memwatch.embedders.base import Embedder

#: principal axes of the projection: enough for natural images at 32-64 px to keep most of the variance
COMPONENTS = 64
#: exact candidates measured per row before falling back to a full scan of that row
CANDIDATES = 16
#: rows used to find the principal axes (a random sample: the axes need not be optimal, only orthonormal)
PCA_SAMPLE = 20_000

Pairs = list[tuple[int, int, float]]
Nearest = dict[int, tuple[int, float]]


def similar_pairs(
    emb: torch.Tensor,
    embedder: Embedder,
    threshold: float | None,
    *,
    chunk_size: int = 2048,
    components: int = COMPONENTS,
    candidates: int = CANDIDATES,
) -> tuple[Pairs, Nearest]:
    """Every pair ``(i, j, similarity)`` with ``i < j`` at or above ``threshold``, and each row's nearest.

    Args:
        emb: embeddings ``(n, D)``, as the embedder made them.
        embedder: gives the distance, the similarity and the lower bound.
        threshold: similarity at or above which a pair is returned; None: no pairs, each row's nearest only.
        chunk_size: rows compared at a time (memory: ``chunk_size**2`` distances).
        components: principal axes of the prefilter's projection.
        candidates: rows measured exactly per row before a full scan of that row.

    Returns:
        ``(pairs, nearest)``: pairs sorted, and ``{row: (nearest other row, its similarity)}``.
    """
    n, dim = emb.shape
    threshold = 2.0 if threshold is None else threshold  # above every similarity: no pair reaches it
    if n < 2:
        return [], {}
    if embedder.distance_lower_bound(torch.zeros(1), dim) is None or n <= max(chunk_size, 4 * candidates):
        pairs, nearest = _exact_all_pairs(emb, embedder, threshold, chunk_size)
        return sorted(pairs), nearest
    proj = _project(emb, min(components, dim, n))
    k = min(candidates, n - 1)
    pairs: Pairs = []
    nearest: Nearest = {}
    unsure: list[int] = []
    for a in range(0, n, chunk_size):
        rows = range(a, min(a + chunk_size, n))
        near_cols, kth_bound, reach = _bounds(proj, rows, embedder, dim, threshold, k, chunk_size)
        for r, i in enumerate(rows):
            cols = torch.unique(torch.cat([near_cols[r], reach[i]])) if i in reach else near_cols[r]
            sims = embedder.similarity(embedder.pairwise_distance(emb[i : i + 1], emb[cols]))[0].double()
            best = int(sims.argmax())
            nearest[i] = (int(cols[best]), float(sims[best]))
            keep = (cols > i) & (sims >= threshold)
            if keep.any():
                pairs += [(i, int(j), float(s)) for j, s in zip(cols[keep], sims[keep], strict=True)]
            # Certain when no row outside the candidates can be closer: its bound already is at least as far.
            if len(cols) < n - 1 and float(embedder.similarity(kth_bound[r])) > nearest[i][1]:
                unsure.append(i)
    if 2 * len(unsure) > n:  # a full scan of most rows costs more than one pass over the triangle
        nearest = _exact_all_pairs(emb, embedder, 2.0, chunk_size)[1]
    elif unsure:
        nearest.update(_exact_nearest(emb, embedder, unsure, chunk_size))
    return sorted(pairs), nearest


def _project(emb: torch.Tensor, components: int) -> torch.Tensor:
    """Coordinates on ``components`` orthonormal principal axes (float64), centred; in blocks, so memory
    stays near the projection's own size."""
    mean = emb.sum(dim=0, dtype=torch.float64) / emb.shape[0]
    g = torch.Generator().manual_seed(0)
    sample = emb[torch.randperm(emb.shape[0], generator=g)[:PCA_SAMPLE]].double() - mean
    torch.manual_seed(0)  # svd_lowrank draws a random start: keep the axes (and the time) reproducible
    _, _, v = torch.svd_lowrank(sample, q=components, niter=2)
    basis, _ = torch.linalg.qr(v)  # re-orthonormalise: the bound needs orthonormal columns
    step = 8192
    return torch.cat([(emb[a : a + step].double() - mean) @ basis for a in range(0, emb.shape[0], step)])


def _bounds(
    proj: torch.Tensor,
    rows: range,
    embedder: Embedder,
    dim: int,
    threshold: float,
    k: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """For a block of rows: the ``k`` columns with the smallest bound, the ``k``-th bound, and the
    columns whose bound could still reach ``threshold``.

    The work is on squared projected distances in float32 (the bound is monotone in them, so the ``k``
    smallest are the same); ``reach`` is compared to the squared radius within which the bound can
    reach the threshold, and a slack covers float32 rounding so the bound stays a bound.
    """
    q = proj[rows.start : rows.stop]
    qn = (q * q).sum(dim=1)
    radius2 = _reach_radius(embedder, dim, threshold) ** 2
    qf = q.float()
    best_d = torch.zeros((len(rows), 0))
    best_i = torch.zeros((len(rows), 0), dtype=torch.long)
    reach: dict[int, list[torch.Tensor]] = {}
    for c0 in range(0, proj.shape[0], 4 * chunk_size):
        c = proj[c0 : c0 + 4 * chunk_size]
        cn = (c * c).sum(dim=1)
        # |q - c|^2 - |q|^2 = |c|^2 - 2 q.c: one fused float32 product, the row's own |q|^2 moved to the limit
        part = torch.addmm(cn.float().expand(len(rows), -1), qf, c.float().T, alpha=-2.0)
        part -= (1e-5 * cn).float()  # slack for the column's share of the rounding (the row's is in `limit`)
        own = torch.arange(rows.start, rows.stop) - c0
        inside = (own >= 0) & (own < c.shape[0])
        part[inside.nonzero()[:, 0], own[inside]] = torch.inf  # a row is not its own neighbour
        limit = (radius2 - qn + 1e-5 * qn + 1e-12).float()
        ii, jj = torch.nonzero(part <= limit[:, None], as_tuple=True)
        for i in torch.unique(ii).tolist():
            reach.setdefault(rows.start + i, []).append(jj[ii == i] + c0)
        cand_d = torch.cat([best_d, part], dim=1)
        cand_i = torch.cat([best_i, torch.arange(c0, c0 + c.shape[0]).expand(len(rows), -1)], dim=1)
        best_d, pos = cand_d.topk(min(k, cand_d.shape[1]), dim=1, largest=False)
        best_i = cand_i.gather(1, pos)
    kth2 = (best_d[:, -1].double() + qn - 1e-5 * qn).clamp(min=0.0)
    return best_i, embedder.distance_lower_bound(kth2.sqrt(), dim).double(), {i: torch.cat(v) for i, v in reach.items()}


def _reach_radius(embedder: Embedder, dim: int, threshold: float) -> float:
    """The largest euclidean distance whose bound still reaches ``threshold`` (the bound and the
    similarity are monotone, so bisection finds it; 60 halvings reach float64 resolution)."""

    def reaches(l2: float) -> bool:
        bound = embedder.distance_lower_bound(torch.tensor([l2], dtype=torch.float64), dim)
        return float(embedder.similarity(bound)[0]) >= threshold

    hi = 1.0
    while reaches(hi) and hi < 1e12:
        hi *= 2.0
    lo = 0.0
    if not reaches(lo):
        return -1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if reaches(mid) else (lo, mid)
    return hi  # the upper end: a pair right at the radius is kept, never lost


def _exact_nearest(emb: torch.Tensor, embedder: Embedder, rows: list[int], chunk_size: int) -> Nearest:
    """Each listed row's nearest other row, by the embedder's own distance against every row."""
    out: Nearest = {}
    for a in range(0, len(rows), chunk_size):
        idx = torch.tensor(rows[a : a + chunk_size])
        best_sim = torch.full((len(idx),), -torch.inf, dtype=torch.float64)
        best_col = torch.full((len(idx),), -1, dtype=torch.long)
        for b in range(0, emb.shape[0], chunk_size):
            sim = embedder.similarity(embedder.pairwise_distance(emb[idx], emb[b : b + chunk_size])).double()
            own = idx - b
            inside = (own >= 0) & (own < sim.shape[1])
            sim[inside.nonzero()[:, 0], own[inside]] = -torch.inf
            top, arg = sim.max(dim=1)
            better = top > best_sim
            best_sim = torch.where(better, top, best_sim)
            best_col = torch.where(better, arg + b, best_col)
        out.update({int(i): (int(c), float(s)) for i, c, s in zip(idx, best_col, best_sim, strict=True)})
    return out


def _exact_all_pairs(emb: torch.Tensor, embedder: Embedder, threshold: float, chunk_size: int) -> tuple[Pairs, Nearest]:
    """The plain search: every pair by the embedder's own distance, one block of the upper triangle at a time."""
    n = emb.shape[0]
    pairs: Pairs = []
    best_sim = torch.full((n,), -torch.inf, dtype=torch.float64)
    best_idx = torch.full((n,), -1, dtype=torch.long)

    def keep_best(rows: slice, sims: torch.Tensor, col0: int) -> None:
        top, arg = sims.max(dim=1)
        better = top > best_sim[rows]
        best_sim[rows] = torch.where(better, top, best_sim[rows])
        best_idx[rows] = torch.where(better, arg + col0, best_idx[rows])

    for a in range(0, n, chunk_size):
        qa = emb[a : a + chunk_size]
        for b in range(a, n, chunk_size):
            rb = emb[b : b + chunk_size]
            sim = embedder.similarity(embedder.pairwise_distance(qa, rb)).double()
            if a == b:
                sim.fill_diagonal_(-torch.inf)  # an image is not its own neighbour
            keep_best(slice(a, a + len(qa)), sim, b)
            if a != b:
                keep_best(slice(b, b + len(rb)), sim.T, a)  # the lower block is the transpose: each pair once
            ii, jj = torch.nonzero(sim >= threshold, as_tuple=True)
            upper = (ii + a) < (jj + b)
            pairs += [(int(i) + a, int(j) + b, float(sim[i, j])) for i, j in zip(ii[upper], jj[upper], strict=True)]
    nearest = {i: (int(best_idx[i]), float(best_sim[i])) for i in range(n) if best_idx[i] >= 0}
    return pairs, nearest
