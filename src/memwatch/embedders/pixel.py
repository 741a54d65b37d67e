"""Pixel-space embedder: the image itself is the embedding.

Distance follows Gu et al. 2023 (``mem_ratio.py``): the l2 distance between images with values in
[0, 1], divided by sqrt(H*W*C) so it lies in [0, 1] whatever the resolution. With ``tiled=True`` the
distance is Carlini et al. 2023's tiled l2: the image is cut into a 4x4 grid of tiles and the
distance is the *largest* normalised l2 over the 16 tiles, so a sample that copies most of an image
but differs in one corner is not hidden by averaging... and, conversely, one tile that differs
strongly keeps an otherwise similar pair apart.

Similarity is ``1 - distance`` (1 for identical images, 0 for black versus white).
"""

from __future__ import annotations

from typing import Any

import torch

from memwatch.embedders.base import Embedder
from memwatch.errors import MemwatchError

# Carlini et al. 2023 cut images into a 4x4 grid for the tiled l2 distance.
TILE_GRID = 4
# Copy threshold as a similarity (1 - normalised l2): 0.95 means the sample lies within 0.05 of a training
# image. Memorized CIFAR-10 samples extracted by Carlini et al. 2023 are within about this distance of their
# training image, while distinct natural images at 32-64 px are typically 0.15-0.35 apart; blurry samples of an
# untrained model sit near 0.1 from everything, so a looser threshold would count them as copies. A heuristic:
# set embedder.copy_threshold for your data.
PIXEL_COPY_THRESHOLD = 0.95


class PixelEmbedder(Embedder):
    """Embed images as their flattened pixels at a fixed resolution.

    Args:
        resolution: side length images are resized to before comparison.
        tiled: use Carlini's tiled l2 (max over a 4x4 grid of tiles) instead of the whole-image l2.
        copy_threshold: similarity at or above which a sample counts as a copy.

    Example:
        >>> emb = PixelEmbedder(resolution=8)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> d = emb.pairwise_distance(emb.embed(x), emb.embed(x))
        >>> float(d[0, 0]) < 1e-6
        True
    """

    name = "pixel"
    builtin_copy_threshold = PIXEL_COPY_THRESHOLD
    copy_threshold_source = (
        "memwatch heuristic (embedders/pixel.py): 1 - normalised l2 >= 0.95; extracted CIFAR-10 samples of "
        "Carlini et al. 2023 lie about this close to their training image"
    )

    @classmethod
    def from_settings(cls, settings: Any, default_resolution: int | None = None) -> PixelEmbedder:
        resolution = settings.resolution or default_resolution
        kwargs = {} if resolution is None else {"resolution": resolution}
        return cls(**kwargs, tiled=settings.tiled, copy_threshold=settings.copy_threshold)

    def __init__(self, resolution: int = 64, *, tiled: bool = False, copy_threshold: float | None = None):
        if tiled and resolution % TILE_GRID:
            raise MemwatchError(
                f"setting 'embedder.resolution' ({resolution}) must be a multiple of {TILE_GRID} for tiled distance"
            )
        self.resolution = resolution
        self.tiled = tiled
        self.default_copy_threshold = PIXEL_COPY_THRESHOLD if copy_threshold is None else copy_threshold

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "resolution": self.resolution, "tiled": self.tiled}

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        if not self.tiled:
            return images.flatten(1)
        # Lay the pixels out tile by tile, so each tile is one contiguous block of the vector.
        n, c, h, w = images.shape
        t = TILE_GRID
        tiles = images.reshape(n, c, t, h // t, t, w // t).permute(0, 2, 4, 1, 3, 5)
        return tiles.reshape(n, -1)

    def pairwise_distance(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if not self.tiled:
            return _normalised_l2(query, reference)
        blocks = TILE_GRID * TILE_GRID
        q = query.reshape(query.shape[0], blocks, -1)
        r = reference.reshape(reference.shape[0], blocks, -1)
        per_tile = torch.stack([_normalised_l2(q[:, i], r[:, i]) for i in range(blocks)])
        return per_tile.amax(dim=0)

    def similarity(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance

    def distance_lower_bound(self, l2: torch.Tensor, dim: int) -> torch.Tensor:
        """``l2 / sqrt(dim)``: the whole-image normalised l2, which is also a lower bound of the tiled
        distance (the root mean square of the 16 tiles' distances is at most their largest)."""
        return l2 / dim**0.5


def _normalised_l2(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """l2 distance divided by sqrt(dim), computed in float64 so near-copies keep their tiny distances."""
    d = torch.cdist(q.double(), r.double())
    return (d / q.shape[1] ** 0.5).float()
