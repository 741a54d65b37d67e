"""What every embedder provides: images in, vectors out, plus the distance that goes with them.

An embedder turns a batch of images ``(N, 3, H, W)`` with values in [0, 1] into float32 vectors
``(N, D)`` and says how to compare them. It owns the resolution at which reference images are
loaded (``resolution``) and resizes generated samples to it, so training and generated images are
always compared at the same size. Its :meth:`Embedder.spec` identifies it completely: equal specs
give equal embeddings, so the spec's hash keys the on-disk embedding cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F

from memwatch.hashing import config_hash


class Embedder(ABC):
    """Base class for embedders.

    Subclasses set ``name``, ``resolution`` and ``default_copy_threshold`` and implement
    :meth:`_embed`, :meth:`pairwise_distance`, :meth:`similarity` and :meth:`spec`.
    """

    name: str
    resolution: int
    #: similarity at or above which a sample counts as a copy (``copy_fraction``); see subclasses
    default_copy_threshold: float
    #: the copy threshold used when the settings set none, and where it comes from (audit report)
    builtin_copy_threshold: float | None = None
    copy_threshold_source: str = "set by the embedder; no published source recorded"

    @classmethod
    def from_settings(cls, settings: Any, default_resolution: int | None = None) -> Embedder:
        """Build from the ``embedder`` settings section (:class:`memwatch.embedders.EmbedderConfig`).

        Args:
            settings: the section.
            default_resolution: the model's image resolution, for embedders that compare at it.
        """
        raise NotImplementedError(f"{cls.__name__}.from_settings")

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """Everything that determines the embeddings (name, resolution, weights identity...)."""

    @property
    def key(self) -> str:
        """Cache key: hash of :meth:`spec`."""
        return config_hash(self.spec())

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize a batch to ``resolution`` (bicubic, antialiased) and clamp to [0, 1]."""
        images = images.float()
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            images = F.interpolate(
                images, size=(self.resolution, self.resolution), mode="bicubic", antialias=True, align_corners=False
            )
        return images.clamp(0.0, 1.0)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch ``(N, 3, H, W)`` in [0, 1]; returns float32 ``(N, D)`` on the CPU."""
        return self._embed(self.prepare(images)).float().cpu()

    @abstractmethod
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images already at ``resolution``."""

    @abstractmethod
    def pairwise_distance(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Distances ``(Q, R)`` between two sets of embeddings (smaller is closer)."""

    @abstractmethod
    def similarity(self, distance: torch.Tensor) -> torch.Tensor:
        """Map a distance to this embedder's similarity score (larger is more alike)."""

    def distance_lower_bound(self, l2: torch.Tensor, dim: int) -> torch.Tensor | None:
        """A lower bound on :meth:`pairwise_distance`, given a lower bound on the plain euclidean distance
        between the embeddings (``dim``: their length); None when the embedder knows none.

        It lets :mod:`memwatch.search.pairs` skip pairs that cannot be close without changing its result.
        """
        return None
