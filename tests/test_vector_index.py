"""vector_index: the FAISS searches behind ReferenceIndex.search. The flat index re-ranked by the embedder
is exact (also for the tiled distance, where its shortlist must be certified or widened); the compressed
index finds near copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memwatch.embedders.pixel import PixelEmbedder
from memwatch.errors import MemwatchError
from memwatch.search.exact import knn
from memwatch.search.index import EXACT_LIMIT, Search, build_search

faiss = pytest.importorskip("faiss", reason="the FAISS searches need faiss-cpu (memwatch[search])")


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Smooth images (flattened), like photos for pixel distances."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic").clamp(0, 1)
    return (x + 0.03 * torch.rand(x.shape, generator=g)).clamp(0, 1).flatten(1)


@pytest.mark.parametrize("tiled", [False, True])
def test_the_flat_index_re_ranked_is_exact(tiled: bool) -> None:
    ref, query = images(3000), images(40, seed=1)
    query[:10] = ref[:10] + 0.002  # near copies among the queries
    embedder = PixelEmbedder(16, tiled=tiled)
    search = build_search(ref, embedder, "flat", shortlist=8)
    d, i = search.search(query, 5)
    want_d, want_i = knn(query, ref, 5, embedder.pairwise_distance)
    torch.testing.assert_close(d, want_d, rtol=0, atol=1e-6)
    assert torch.equal(i[:10, 0], torch.arange(10))
    assert search.describe() == {"kind": "flat", "shortlist": 8}


def test_the_compressed_index_finds_near_copies_and_describes_itself() -> None:
    ref = images(1500, size=8)  # small vectors: FAISS's k-means training is the slow part
    picked = torch.arange(0, 1500, 50)
    noise = 0.003 * torch.randn(len(picked), ref.shape[1], generator=torch.Generator().manual_seed(2))
    search = build_search(ref, PixelEmbedder(8), "compressed", nlist=12, m=8, nprobe=4)
    d, i = search.search(ref[picked] + noise, 2)
    assert (i[:, 0] == picked).float().mean() >= 0.95
    assert bool((d[:, 0] <= d[:, 1]).all())  # re-ranked by the exact distance
    assert search.describe()["kind"] == "compressed" and search.describe()["nlist"] == 12


def test_auto_is_exact_for_sets_that_fit_and_kinds_are_checked() -> None:
    assert type(build_search(images(10), PixelEmbedder(16))) is Search
    assert EXACT_LIMIT >= 100_000
    with pytest.raises(MemwatchError, match="search kind 'annoy'"):
        build_search(images(10), PixelEmbedder(16), "annoy")
