"""Exact k-nearest-neighbour search in chunks.

The reference set is scanned ``chunk_size`` rows at a time and a running top-k is kept, so the
distance matrix in memory is at most ``len(query) x chunk_size`` however large the reference set is.
Results equal brute force exactly: ties are broken by the lower reference index (a stable sort of the
running candidates, which always come from earlier chunks, before the new chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
