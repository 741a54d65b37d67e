import torch

from memwatch.embedders.pixel import PixelEmbedder
from memwatch.search.exact import knn


def brute_force(q: torch.Tensor, r: torch.Tensor, k: int, dist) -> tuple[torch.Tensor, torch.Tensor]:
    d = dist(q, r).float()
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return torch.gather(d, 1, order), order


def test_chunked_search_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    q, r = torch.rand(37, 48, generator=g), torch.rand(1003, 48, generator=g)
    emb = PixelEmbedder(resolution=4)
    # memwatch's own distances (float64 inside) give bit-identical results in any chunking;
    # a plain float32 cdist rounds differently per matrix shape, so only its order is exact.
    for dist, exact in ((emb.pairwise_distance, True), (torch.cdist, False)):
        want_d, want_i = brute_force(q, r, 7, dist)
        for chunk in (1, 5, 64, 1000, 5000):
            got_d, got_i = knn(q, r, 7, dist, chunk_size=chunk)
            assert torch.equal(got_i, want_i), chunk
            if exact:
                assert torch.equal(got_d, want_d), chunk
            else:
                assert torch.allclose(got_d, want_d, atol=1e-5), chunk


def test_ties_break_by_lower_index_in_any_chunking() -> None:
    r = torch.tensor([[1.0], [0.0], [1.0], [0.0], [2.0]])
    q = torch.tensor([[0.0]])
    for chunk in (1, 2, 3, 10):
        d, i = knn(q, r, 4, torch.cdist, chunk_size=chunk)
        assert i.tolist() == [[1, 3, 0, 2]]


def test_k_larger_than_reference_is_clipped() -> None:
    d, i = knn(torch.zeros(2, 3), torch.rand(3, 3), 50, torch.cdist, chunk_size=2)
    assert d.shape == (2, 3) and sorted(i[0].tolist()) == [0, 1, 2]


def test_tiled_distance_is_max_over_tiles() -> None:
    emb = PixelEmbedder(resolution=8, tiled=True)
    a = torch.zeros(1, 3, 8, 8)
    b = a.clone()
    b[:, :, :2, :2] = 1.0  # one 2x2 tile fully different
    d_tiled = emb.pairwise_distance(emb.embed(a), emb.embed(b))
    assert abs(float(d_tiled) - 1.0) < 1e-6  # that tile's normalised l2 is 1
    whole = PixelEmbedder(resolution=8)
    d_whole = whole.pairwise_distance(whole.embed(a), whole.embed(b))
    assert abs(float(d_whole) - 0.25) < 1e-6  # sqrt(12/192)
