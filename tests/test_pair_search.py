"""pair_search: the prefiltered search returns exactly what comparing every pair returns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memwatch.embedders.base import Embedder
from memwatch.embedders.pixel import PixelEmbedder
from memwatch.search.pairs import _exact_all_pairs, similar_pairs


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Natural-image-like pixels (smooth colour fields plus fine noise) with planted copies."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(16, 16), mode="bicubic").clamp(0, 1)
    x = (x + (torch.rand(x.shape, generator=g) - 0.5) * 0.05).clamp(0, 1).flatten(1)
    x[10:40] = torch.rand(30, x.shape[1], generator=g)  # noise images: the projection cannot vouch for them
    x[n - 1] = x[0]  # an exact copy
    x[n - 2] = (x[1] * 0.97).clamp(0, 1)  # a darker copy
    x[n - 3] = (x[2] + 0.02).clamp(0, 1)  # a brighter copy
    return x


def assert_same(x: torch.Tensor, embedder: Embedder, threshold: float) -> None:
    pairs, nearest = similar_pairs(x, embedder, threshold, chunk_size=256)
    want_pairs, want_nearest = _exact_all_pairs(x, embedder, threshold, 256)
    assert [p[:2] for p in pairs] == sorted(p[:2] for p in want_pairs)
    assert nearest.keys() == want_nearest.keys()
    for i, (_, sim) in want_nearest.items():
        assert nearest[i][1] == pytest.approx(sim, abs=1e-6), i  # the same distance (ties may pick another row)


@pytest.mark.parametrize("tiled", [False, True])
def test_pixel_pairs_and_nearest_equal_the_exact_search(tiled: bool) -> None:
    x = smooth_images(1500)
    assert_same(x, PixelEmbedder(16, tiled=tiled), 0.95)
    pairs, _ = similar_pairs(x, PixelEmbedder(16, tiled=tiled), 0.95, chunk_size=256)
    assert {p[:2] for p in pairs} >= {(0, 1499), (1, 1498), (2, 1497)}


def test_unstructured_data_falls_back_to_exact_rows_and_stays_exact() -> None:
    # Uniform noise: the projection keeps little of the distance, so most rows need a full scan.
    x = torch.rand(1200, 192, generator=torch.Generator().manual_seed(1))
    x[5] = x[9]
    assert_same(x, PixelEmbedder(8), 0.9)


class Cosine(Embedder):
    """Unit vectors compared by cosine distance, as the CLIP embedder does (its bound is the one tested)."""

    name = "cosine"
    resolution = 8
    default_copy_threshold = 0.95

    def spec(self) -> dict:
        return {"name": self.name}

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1), dim=1)

    def pairwise_distance(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return 1.0 - query @ reference.T

    def similarity(self, distance: torch.Tensor) -> torch.Tensor:
        return 1.0 - distance

    def distance_lower_bound(self, l2: torch.Tensor, dim: int) -> torch.Tensor:
        pytest.importorskip("open_clip")
        from memwatch.embedders.clip import ClipEmbedder

        return ClipEmbedder.distance_lower_bound(self, l2, dim)  # the CLIP embedder's own bound


def test_cosine_bound_of_the_clip_embedder_keeps_the_search_exact() -> None:
    x = F.normalize(smooth_images(1500, seed=2) - 0.5, dim=1)
    assert_same(x, Cosine(), 0.99)


def test_an_embedder_without_a_bound_gets_the_plain_search() -> None:
    class NoBound(Cosine):
        def distance_lower_bound(self, l2: torch.Tensor, dim: int) -> None:
            return None

    x = F.normalize(smooth_images(600, seed=3) - 0.5, dim=1)
    assert_same(x, NoBound(), 0.99)
