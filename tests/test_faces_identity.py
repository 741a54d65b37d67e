"""Identity leak, interpolation and threshold calibration on controlled embeddings.

Embeddings are unit vectors built here: identity centroids are orthonormal directions, a person's
faces are their centroid plus noise, and generated faces are near-copies, slerp blends or unrelated
vectors. The face pipeline is not involved, so each verdict is checked against known geometry.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from memwatch.errors import MemwatchError
from memwatch.faces import (
    IdentityConfig,
    calibrate_threshold,
    cluster_identities,
    documented_threshold,
    gallery_from_embeddings,
    identity_from_embeddings,
    match_faces,
    slerp_position,
    threshold_at_fmr,
)
from memwatch.faces.paths import path_pairs
from memwatch.faces.probe import check_instance, closest_approaches, identity_evidence

DIM = 256


# Small matrix products run faster on one thread than on two contended ones.
pytestmark = pytest.mark.usefixtures("one_thread")


NOISE = 0.5  # noise norm relative to the centroid: a face's cosine to its centroid is about 0.89


def _noisy(center: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` unit vectors around unit ``center``: ``center + noise * random unit direction``."""
    directions = F.normalize(torch.randn(n, center.shape[0], generator=gen), dim=1)
    return F.normalize(center.unsqueeze(0) + noise * directions, dim=1)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    omega = math.acos(float((a @ b).clamp(-1, 1)))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


@pytest.fixture
def world() -> dict:
    """Six labelled identities (4 faces each) with orthonormal centroids, plus two look-alikes
    ``twin_a`` / ``twin_b`` whose centroids have cosine 0.8 (they verify against each other)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(DIM, 8, generator=gen)).Q.T  # 8 orthonormal rows
    centers = {name: basis[i] for i, name in enumerate(["ann", "bob", "cat", "dan", "eve", "fay"])}
    centers["twin_a"] = basis[6]
    centers["twin_b"] = F.normalize(0.8 * basis[6] + 0.6 * basis[7], dim=0)
    faces, labels, ids = [], [], []
    for name, c in centers.items():
        for k, v in enumerate(_noisy(c, 4, NOISE, gen)):
            faces.append(v)
            labels.append(name)
            ids.append(f"{name}/{k}.png")
    return {"centers": centers, "faces": torch.stack(faces), "labels": labels, "ids": ids, "gen": gen}


def _gallery(world: dict, config: IdentityConfig, **kw):
    return gallery_from_embeddings(world["faces"], world["ids"], world["labels"], config, **kw)


def test_near_copies_leak_with_their_identity_and_do_not_interpolate(world: dict) -> None:
    config = IdentityConfig(matcher="vggface2")
    gallery = _gallery(world, config)
    queries, truth = [], []
    for name in ("ann", "cat", "fay"):
        queries.append(_noisy(world["centers"][name], 3, NOISE, world["gen"]))
        truth += [name] * 3
    rows = match_faces(torch.cat(queries), gallery, config)
    assert [r["identity"] for r in rows] == truth
    assert all(r["leak"] and r["similarity"] >= gallery.threshold for r in rows)
    assert not any(r["interpolation"] for r in rows)
    assert all(r["identity_item"].startswith(r["identity"] + "/") for r in rows)


def test_unrelated_faces_neither_leak_nor_interpolate(world: dict) -> None:
    config = IdentityConfig(matcher="vggface2")
    gallery = _gallery(world, config)
    unrelated = F.normalize(torch.randn(20, DIM, generator=world["gen"]), dim=1)
    rows = match_faces(unrelated, gallery, config)
    assert not any(r["leak"] for r in rows)
    assert not any(r["interpolation"] for r in rows)


@pytest.mark.parametrize(("a", "b"), [("ann", "bob"), ("eve", "dan"), ("cat", "fay")])
@pytest.mark.parametrize("t", [0.45, 0.5, 0.55])
def test_slerp_blends_interpolate_with_the_right_parents(world: dict, a: str, b: str, t: float) -> None:
    config = IdentityConfig(matcher="vggface2")
    gallery = _gallery(world, config)
    blends = _noisy(_slerp(world["centers"][a], world["centers"][b], t), 4, 0.2, world["gen"])
    rows = match_faces(blends, gallery, config)
    for r in rows:
        assert r["interpolation"], r
        assert (r["parent_a"], r["parent_b"]) == tuple(sorted((a, b)))  # parents in name order
        assert min(r["sim_a"], r["sim_b"]) >= gallery.threshold
        assert abs(r["sim_a"] - r["sim_b"]) <= config.balance_tolerance
        t_from_a = r["slerp_t"] if r["parent_a"] == a else 1 - r["slerp_t"]
        assert t_from_a == pytest.approx(t, abs=0.05)
        assert not r["leak"]  # a blend verifies against both parents, but reproduces neither


def test_balance_tolerance_decides_unbalanced_blends(world: dict) -> None:
    blends = _noisy(_slerp(world["centers"]["ann"], world["centers"]["bob"], 0.4), 4, 0.2, world["gen"])
    strict, loose = (
        IdentityConfig(matcher="vggface2", balance_tolerance=0.05),
        IdentityConfig(matcher="vggface2", balance_tolerance=0.3),
    )
    assert not any(r["interpolation"] for r in match_faces(blends, _gallery(world, strict), strict))
    assert all(r["interpolation"] for r in match_faces(blends, _gallery(world, loose), loose))


def test_blends_near_one_parent_are_not_interpolations(world: dict) -> None:
    """A face 20% of the way from ann to bob matches both (at a low fixed threshold, with the balance
    test switched off), but lies near ann's end of the arc: only a narrower end margin admits it."""
    near_ann = _noisy(_slerp(world["centers"]["ann"], world["centers"]["bob"], 0.2), 4, 0.2, world["gen"])
    default = IdentityConfig(matcher="vggface2", threshold=0.25, balance_tolerance=2.0)
    rows = match_faces(near_ann, _gallery(world, default), default)
    assert all(r["leak"] and r["identity"] == "ann" for r in rows)
    assert not any(r["interpolation"] for r in rows)
    narrow = IdentityConfig(matcher="vggface2", threshold=0.25, balance_tolerance=2.0, slerp_end_margin=0.1)
    assert all(r["interpolation"] for r in match_faces(near_ann, _gallery(world, narrow), narrow))


def test_faces_off_the_arc_are_not_interpolations(world: dict) -> None:
    """Blends with heavy noise (cosine ~0.89 to the arc) pass the default, not a 0.95 arc similarity."""
    blurred = _noisy(_slerp(world["centers"]["ann"], world["centers"]["bob"], 0.5), 4, NOISE, world["gen"])
    default, tight = IdentityConfig(matcher="vggface2"), IdentityConfig(slerp_min_similarity=0.95)
    assert all(r["interpolation"] for r in match_faces(blurred, _gallery(world, default), default))
    assert not any(r["interpolation"] for r in match_faces(blurred, _gallery(world, tight), tight))


def test_blends_of_identities_that_verify_against_each_other_are_not_interpolations(world: dict) -> None:
    config = IdentityConfig(matcher="vggface2")
    gallery = _gallery(world, config)
    twins = (
        gallery.centroids[gallery.identities.index("twin_a")] @ gallery.centroids[gallery.identities.index("twin_b")]
    )
    assert twins >= gallery.threshold  # the setup: the look-alikes verify against each other
    blends = _noisy(_slerp(world["centers"]["twin_a"], world["centers"]["twin_b"], 0.5), 4, 0.2, world["gen"])
    rows = match_faces(blends, gallery, config)
    assert all(r["leak"] for r in rows)
    assert not any(r["interpolation"] for r in rows)


def test_slerp_position_geometry() -> None:
    a, b, c = torch.eye(3)
    for t in (0.0, 0.3, 0.5, 1.0):
        pos = slerp_position(_slerp(a, b, t), a, b)
        assert pos["t"] == pytest.approx(t, abs=1e-6) and pos["similarity"] == pytest.approx(1.0, abs=1e-6)
    off_plane = F.normalize(_slerp(a, b, 0.5) + c, dim=0)  # 45 degrees off the arc's midpoint
    pos = slerp_position(off_plane, a, b)
    assert pos["t"] == pytest.approx(0.5) and pos["similarity"] == pytest.approx(math.cos(math.pi / 4))
    assert slerp_position(a, a, a) is None


def test_probe_metrics_and_items(world: dict) -> None:
    config = IdentityConfig(matcher="vggface2")
    hold_gen = torch.Generator().manual_seed(1)
    holdout = torch.cat(
        [
            F.normalize(torch.randn(9, DIM, generator=hold_gen), dim=1),  # other people
            _noisy(world["centers"]["dan"], 1, NOISE, hold_gen),  # a dan look-alike in the holdout
        ]
    )
    gallery = _gallery(world, config, holdout_embeddings=holdout)
    assert gallery.holdout_leak_rate == pytest.approx(0.1)
    c = world["centers"]
    emb = torch.cat(
        [
            _noisy(c["ann"], 2, NOISE, world["gen"]),
            _noisy(c["bob"], 1, NOISE, world["gen"]),
            _noisy(_slerp(c["cat"], c["eve"], 0.5), 1, 0.2, world["gen"]),
            F.normalize(torch.randn(3, DIM, generator=world["gen"]), dim=1),
            torch.zeros(1, DIM),  # no face: ignored
        ]
    )
    found = torch.tensor([True] * 7 + [False])
    seeds = list(range(100, 108))
    result = identity_from_embeddings(emb, found, gallery, config, seeds=seeds)
    m = result.metrics
    assert result.probe == "identity"
    assert m["num_samples"] == 8 and m["faces_found"] == 7
    assert m["face_detection_rate"] == pytest.approx(7 / 8)
    assert m["identity_leak_rate"] == pytest.approx(3 / 7)  # ann, ann, bob; the cat/eve blend is no leak
    assert m["identities_leaked"] == 2  # ann and bob
    assert m["identity_interpolation_rate"] == pytest.approx(1 / 7)
    assert m["identity_pairs_interpolated"] == 1
    assert m["identity_leak_baseline"] == pytest.approx(0.1)
    assert m["identity_leak_excess"] == pytest.approx(3 / 7 - 0.1)
    assert m["threshold_calibrated"] == 0.0 and m["identity_threshold"] == documented_threshold(config) == 0.45
    assert m["gallery_identities"] == 8 and m["gallery_faces"] == 32
    items = result.items
    assert [it["seed"] for it in items] == seeds and [it["sample"] for it in items] == [str(s) for s in seeds]
    assert [it["identity"] for it in items[:3]] == ["ann", "ann", "bob"]
    blend = items[3]
    assert blend["interpolation"] and not blend["leak"] and (blend["parent_a"], blend["parent_b"]) == ("cat", "eve")
    assert blend["sim_a"] >= m["identity_threshold"] and blend["sim_b"] >= m["identity_threshold"]
    assert items[7]["face_found"] is False and items[7]["identity"] is None and items[7]["leak"] is False
    no_faces = identity_from_embeddings(emb[:2], torch.tensor([False, False]), gallery, config)
    assert no_faces.metrics["face_detection_rate"] == 0.0 and math.isnan(no_faces.metrics["identity_leak_rate"])


def test_the_fine_tunes_own_subject_is_kept_apart_from_leaks(world: dict) -> None:
    """DreamBooth/LoRA on one person: faces of that person are the purpose (instance_faces), not leaks; leaks of
    anyone else, blends of the subject with another person and the leak precursor are counted as before."""
    c = world["centers"]
    emb = torch.cat(
        [
            _noisy(c["ann"], 3, NOISE, world["gen"]),  # the subject
            _noisy(c["bob"], 1, NOISE, world["gen"]),  # someone else: a leak
            _noisy(_slerp(c["ann"], c["eve"], 0.5), 1, 0.2, world["gen"]),  # the subject blended with eve
            F.normalize(torch.randn(2, DIM, generator=world["gen"]), dim=1),
        ]
    )
    plain = identity_from_embeddings(emb, None, _gallery(world, IdentityConfig(matcher="vggface2")),
                                     IdentityConfig(matcher="vggface2"))  # fmt: skip
    config = IdentityConfig(matcher="vggface2", instance=("ann",))
    result = identity_from_embeddings(emb, None, _gallery(world, config), config, seeds=list(range(7)))
    m, p = result.metrics, plain.metrics
    assert p["identities_leaked"] == 2 and p["identity_leak_rate"] == pytest.approx(4 / 7) and p["instance_faces"] == 0
    assert m["identities_leaked"] == 1 and m["identity_leak_rate"] == pytest.approx(1 / 7)  # bob alone
    assert m["instance_faces"] == 3 and m["instance_face_rate"] == pytest.approx(3 / 7)
    assert m["identity_interpolations"] == p["identity_interpolations"] == 1  # ann+eve is still a blend
    assert [(it["leak"], it["instance"]) for it in result.items[:4]] == [(False, True)] * 3 + [(True, False)]
    # the precursor and the leak forecast follow the people the model must not reproduce
    assert m["identity_sim_max"] < p["identity_sim_max"]
    assert "ann" not in closest_approaches(result.items) and "ann" in closest_approaches(plain.items)
    # the identity paths still start from the subject: blends of them with others are what to look for
    assert [(a, b) for a, _, b, _ in path_pairs(result.items, 3)] == [("ann", "bob")]
    evidence = identity_evidence(result)  # the subject's own faces are no evidence; its blend is
    assert evidence["blends"] == ["ann+eve"] and "bob" in evidence["identities"]


def test_an_instance_name_the_gallery_does_not_have_is_a_user_error(world: dict) -> None:
    config = IdentityConfig(matcher="vggface2", instance=("anne",))
    with pytest.raises(MemwatchError, match="probes.identity.instance names 'anne', which is no training identity"):
        check_instance(_gallery(world, config), config)
    check_instance(_gallery(world, config), IdentityConfig(matcher="vggface2", instance=("ann",)))


# --- calibration -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmr", [1e-3, 1e-4])
def test_calibration_recovers_the_threshold_of_a_known_impostor_distribution(fmr: float) -> None:
    """Impostor scores ~ N(0, 0.1), genuine ~ N(0.7, 0.1): the threshold at FMR f is 0.1 * z(1 - f)."""
    gen = torch.Generator().manual_seed(0)
    impostor = 0.1 * torch.randn(1_000_000, generator=gen)
    genuine = 0.7 + 0.1 * torch.randn(10_000, generator=gen)
    expected = 0.1 * NormalDist().inv_cdf(1 - fmr)
    cal = calibrate_threshold(impostor, IdentityConfig(matcher="vggface2", target_fmr=fmr), genuine_scores=genuine)
    assert cal.calibrated and cal.source == "labels"
    assert cal.threshold == pytest.approx(expected, abs=0.01)
    assert fmr / 2 <= cal.fmr <= fmr
    expected_fnmr = NormalDist(0.7, 0.1).cdf(expected)
    assert cal.fnmr == pytest.approx(expected_fnmr, abs=0.003)


def test_threshold_at_fmr_is_exact_on_small_lists() -> None:
    scores = torch.tensor([0.1, 0.9, 0.4, 0.5, 0.45, 0.2, 0.3, 0.35, 0.15, 0.25])
    threshold, achieved = threshold_at_fmr(scores, 10, 0.2)  # two scores may pass
    assert 0.45 < threshold <= 0.5 and achieved == pytest.approx(0.2)
    threshold, achieved = threshold_at_fmr(scores, 10, 0.05)  # none may pass
    assert threshold > 0.9 and achieved == 0.0


def test_too_few_impostor_pairs_fall_back_and_say_so() -> None:
    scores = 0.1 * torch.randn(500, generator=torch.Generator().manual_seed(0))
    cal = calibrate_threshold(scores, IdentityConfig(matcher="vggface2"))  # 500 < 1 / 1e-4 pairs
    assert not cal.calibrated and cal.source == "fallback"
    assert cal.threshold == documented_threshold(IdentityConfig(matcher="vggface2")) == 0.45
    assert "500 impostor pairs" in cal.reason
    assert cal.metrics()["threshold_calibrated"] == 0.0
    fixed = calibrate_threshold(scores, IdentityConfig(matcher="vggface2", threshold=0.6))
    assert fixed.threshold == 0.6 and fixed.source == "config" and not fixed.calibrated


def test_gallery_calibration_equals_brute_force_over_labelled_pairs() -> None:
    """60 identities x 3 faces: 15,930 impostor pairs, enough for FMR 1e-4; chunked scan == brute force."""
    gen = torch.Generator().manual_seed(3)
    centers = F.normalize(torch.randn(60, 64, generator=gen), dim=1)
    faces = torch.cat([_noisy(c, 3, 0.6, gen) for c in centers])
    labels = [f"p{i:02d}" for i in range(60) for _ in range(3)]
    config = IdentityConfig(matcher="vggface2", chunk_size=7)
    gallery = gallery_from_embeddings(faces, [f"img{i}" for i in range(180)], labels, config)
    sims = faces @ faces.T
    person = torch.arange(60).repeat_interleave(3)
    same = person[:, None] == person[None, :]
    upper = torch.triu(torch.ones(180, 180, dtype=torch.bool), diagonal=1)
    impostor, genuine = sims[upper & ~same], sims[upper & same]
    expected, _ = threshold_at_fmr(impostor, impostor.numel(), 1e-4)
    cal = gallery.calibration
    assert cal.calibrated and cal.source == "labels"
    assert cal.n_impostor == impostor.numel() == 15_930 and cal.n_genuine == genuine.numel() == 180
    # Chunked and full matrix products may differ in the last bit of a float32.
    assert cal.threshold == pytest.approx(expected, abs=1e-6)
    assert cal.fmr == pytest.approx(float((impostor >= expected).double().mean()))
    assert 0 < cal.fmr <= 1e-4
    assert cal.fnmr == pytest.approx(float((genuine < expected).double().mean()))


def test_unlabelled_gallery_is_clustered_at_the_holdout_calibrated_threshold() -> None:
    gen = torch.Generator().manual_seed(4)
    centers = F.normalize(torch.randn(20, DIM, generator=gen), dim=1)
    faces = torch.cat([_noisy(c, 3, NOISE, gen) for c in centers])
    truth = [i for i in range(20) for _ in range(3)]
    ids = [f"img{i:03d}.png" for i in range(60)]
    holdout = F.normalize(torch.randn(200, DIM, generator=gen), dim=1)  # 60 x 200 = 12,000 impostor pairs
    gallery = gallery_from_embeddings(
        faces,
        ids,
        None,
        IdentityConfig(matcher="vggface2"),
        holdout_embeddings=holdout,
        no_face_items=[("img999.png", None)],
    )
    assert gallery.source == "clustering"
    assert gallery.calibration.calibrated and gallery.calibration.source == "holdout"
    assert gallery.calibration.n_impostor == 12_000
    # Clusters reproduce the true partition; each is named after its first item.
    assigned = {row["item"]: row["identity"] for row in gallery.assignments}
    for i, item in enumerate(ids):
        assert assigned[item] == f"cluster:{ids[3 * truth[i]]}"
    assert len(gallery.identities) == 20
    assert {"item": "img999.png", "identity": None, "face": False} in gallery.assignments
    # At FMR 1e-4 over 12,000 pairs at most one holdout/gallery pair passes: at most 1 of 200 faces.
    assert gallery.holdout_leak_rate <= 1 / 200


def test_clustering_keeps_singletons_and_follows_chains() -> None:
    a, b, c = torch.eye(3)
    chain = F.normalize(torch.stack([a, a + 0.5 * b, a + 1.5 * b, b, c]), dim=1)
    # consecutive links pass 0.8, a-b does not: connected components still join the chain
    assert cluster_identities(chain, 0.8, chunk_size=2) == [0, 0, 0, 0, 1]


def test_partially_labelled_items_become_their_own_identities(world: dict) -> None:
    labels = list(world["labels"])
    labels[0] = None
    gallery = gallery_from_embeddings(world["faces"], world["ids"], labels, IdentityConfig(matcher="vggface2"))
    assert gallery.source == "labels"
    assert f"item:{world['ids'][0]}" in gallery.identities
    # The unlabelled face may be anyone (ann, even): it is in no impostor or genuine pair.
    genuine = 7 * (4 * 3 // 2) + 3 * 2 // 2
    assert gallery.calibration.n_genuine == genuine
    assert gallery.calibration.n_impostor == 31 * 30 // 2 - genuine


def test_empty_gallery_and_bad_settings_are_user_errors() -> None:
    with pytest.raises(MemwatchError, match="no face"):
        gallery_from_embeddings(torch.empty(0, DIM), [], None, IdentityConfig(matcher="vggface2"))
    with pytest.raises(MemwatchError, match="identity.matcher"):
        IdentityConfig(matcher="arcface")
    with pytest.raises(MemwatchError, match="identity.target_fmr"):
        IdentityConfig(matcher="vggface2", target_fmr=0)
    with pytest.raises(MemwatchError, match="identity.detect_min_side"):
        IdentityConfig(matcher="vggface2", detect_min_side=10)


def test_the_leak_forecast_follows_the_closest_person() -> None:
    from memwatch.faces.probe import closest_approaches, leak_forecast

    # ann's best face approaches the threshold 0.9 steadily; bob stays far
    steps = [100, 200, 300, 400, 500]
    trajectory = []
    for step, sim in zip(steps, (0.60, 0.70, 0.77, 0.82, 0.855), strict=True):
        rows = [{"identity": "ann", "similarity": sim}, {"identity": "ann", "similarity": sim - 0.1},
                {"identity": "bob", "similarity": 0.5}, {"identity": None, "similarity": None}]  # fmt: skip
        trajectory.append((step, closest_approaches(rows)))
    assert trajectory[-1][1] == {"ann": 0.855, "bob": 0.5}
    out = leak_forecast(trajectory, 0.9)
    m = out["metrics"]
    assert 500 < m["leak_onset"] < 900 and m["leak_onset_low"] <= m["leak_onset"] <= m["leak_onset_high"]
    assert m["people_approaching"] == 1 and math.isnan(out["crossings"]["bob"])
    flat = leak_forecast([(s, {"ann": 0.6, "bob": 0.5}) for s in steps], 0.9)
    assert math.isnan(flat["metrics"]["leak_onset"])  # nobody approaches: no forecast
    leaked = leak_forecast([*trajectory[:-1], (500, {"ann": 0.95})], 0.9)
    assert leaked["metrics"]["leak_onset"] == 500  # already past the threshold: the onset is now
