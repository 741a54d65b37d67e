"""Identity probe: do generated faces leak training identities, or blend two of them?

For every generated sample the face is detected and embedded (:class:`~memwatch.faces.embed.FacePipeline`),
then compared with the gallery of training faces:

* **leak**: the best-matching training face passes the verification threshold and the face is not
  a blend (below). The sample's ``identity`` is that face's identity. ``identity_leak_rate`` is the
  share of generated faces that leak; ``identities_leaked`` counts distinct identities matched.
  With a holdout of other people's real faces, the same rate on the holdout is the baseline and
  ``identity_leak_excess`` the difference.
* **interpolation** (identity blending; MMPMR-style, Scherhag et al. 2017): the face verifies against
  two training identities A and B (best-face similarity to each at or above the threshold), the two
  similarities are balanced (``|s_A - s_B| <= balance_tolerance``), A and B do not verify against each
  other (centroid similarity below the threshold), and the face lies near the slerp arc between the
  two identity centroids, away from either end: its nearest arc point is in the middle
  ``[slerp_end_margin, 1 - slerp_end_margin]`` of the arc and it verifies against that point
  (similarity ``>= slerp_min_similarity``, default the threshold). Each flagged face records its parents
  (ordered by name), their similarities, the arc position ``slerp_t`` and ``slerp_similarity``.

Per-sample rows go to :attr:`ProbeResult.items`; they carry the identity so per-identity trajectories
can be computed from stored results, and the matcher and its weights' sha256.

**Leak forecast** (the identity precursor): each training person's *closest approach* at a probe is
the highest similarity among the generated faces whose best match they are
(:func:`closest_approaches`). Before the first leak, it rises towards the threshold;
:func:`leak_forecast` fits that approach as the copy forecast fits d1/d2 and gives ``leak_onset``
with a band, which the ``identity-leak-forecast`` rule reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from memwatch.core.probe import ProbeResult
from memwatch.errors import MemwatchError
from memwatch.faces.config import IdentityConfig
from memwatch.faces.gallery import FaceGallery

PROBE = "identity"
#: Identities passing the threshold that are paired up per face (the most similar ones). A bound on
#: work for degenerate matchers that match everything; real faces pass for a handful of identities.
MAX_CANDIDATES = 16
_NAN = float("nan")


def identity_probe(
    samples: torch.Tensor,
    gallery: FaceGallery,
    config: IdentityConfig,
    *,
    names: Sequence[str] | None = None,
    seeds: Sequence[int | None] | None = None,
) -> ProbeResult:
    """Detect, embed and match the faces of generated samples against the training identities.

    Args:
        samples: ``(N, 3, H, W)`` generated images in [0, 1] (any size; small ones are upsampled
            for detection).
        gallery: built by :func:`~memwatch.faces.gallery.build_gallery` (holds the face pipeline and
            the threshold).
        config: interpolation settings (``balance_tolerance``, ``slerp_*``, ``chunk_size``); the
            threshold is the gallery's.
        names: sample names for the item rows (default: seeds, or positions).
        seeds: the seed each sample was generated from, if any.

    Returns:
        A :class:`ProbeResult` with probe ``"identity"``, the metrics listed in :func:`identity_from_embeddings`,
        one item row per sample, and timings (``detection``, ``embedding``, ``matching``).

    Example:
        >>> gallery = build_gallery(refs, load_face_pipeline(cfg), cfg)  # doctest: +SKIP
        >>> r = identity_probe(samples, gallery, cfg, seeds=list(range(len(samples))))  # doctest: +SKIP
        >>> r.metrics["face_detection_rate"], r.metrics["identity_leak_rate"]  # doctest: +SKIP
        (0.875, 0.143)
    """
    if gallery.pipeline is None:
        raise ValueError("this gallery has no face pipeline: build it with build_gallery() to probe images")
    faces = gallery.pipeline.embed_images(samples)
    t0 = time.perf_counter()
    result = identity_from_embeddings(
        faces.embeddings,
        faces.found,
        gallery,
        config,
        names=names,
        seeds=seeds,
        probs=faces.probs,
        detect_errors=faces.errors,
    )
    result.timings = {**faces.timings, "matching": time.perf_counter() - t0}
    spec = gallery.pipeline.matcher.spec()
    for row in result.items:  # every identity result names the matcher and weights that produced it
        row["matcher"], row["matcher_weights_sha256"] = spec["matcher"], spec["weights_sha256"]
    return result


def identity_from_embeddings(
    embeddings: torch.Tensor,
    found: torch.Tensor | None,
    gallery: FaceGallery,
    config: IdentityConfig,
    *,
    names: Sequence[str] | None = None,
    seeds: Sequence[int | None] | None = None,
    probs: torch.Tensor | None = None,
    detect_errors: int = 0,
) -> ProbeResult:
    """The probe's arithmetic on already embedded faces (see :func:`identity_probe`).

    Args:
        embeddings: ``(N, D)`` face embeddings (rows where ``found`` is False are ignored).
        found: ``(N,)`` bool, or None when every row is a face.
        gallery: training identities and threshold.
        config: interpolation settings.
        names, seeds: as in :func:`identity_probe`.
        probs: ``(N,)`` detection probabilities, if known.
        detect_errors: images the detector failed on (reported as ``face_detect_errors``).

    Returns:
        A :class:`ProbeResult` with metrics ``num_samples``, ``faces_found``, ``face_detection_rate``,
        ``face_detect_errors``, ``identity_leak_rate``, ``identity_leak_share`` (leaks over all samples),
        ``identities_leaked``,
        ``identity_interpolation_rate``, ``identity_interpolations``, ``identity_pairs_interpolated``,
        ``identity_sim_p50``/``p95``/``max``, the threshold's (``identity_threshold``,
        ``threshold_calibrated`` 0/1, ``threshold_fmr``...), ``gallery_identities``, ``gallery_faces``
        and, with a holdout, ``identity_leak_baseline`` and ``identity_leak_excess``. Rates are over
        faces found (NaN when none was found).

    Example:
        >>> r = identity_from_embeddings(emb, None, gallery, IdentityConfig())  # doctest: +SKIP
        >>> [row["parent_a"] for row in r.items if row["interpolation"]]  # doctest: +SKIP
        ['alice']
    """
    n = embeddings.shape[0]
    found = torch.ones(n, dtype=torch.bool) if found is None else found.bool()
    if names is None:
        names = [str(s) for s in seeds] if seeds is not None else [str(i) for i in range(n)]
    face_rows = torch.nonzero(found).flatten().tolist()
    matches = match_faces(embeddings[found], gallery, config) if face_rows else []
    by_row = dict(zip(face_rows, matches, strict=True))
    items: list[dict[str, Any]] = []
    for i in range(n):
        row: dict[str, Any] = {
            "sample": names[i],
            "seed": None if seeds is None or seeds[i] is None else int(seeds[i]),
            "face_found": bool(found[i]),
            "face_prob": None if probs is None or not found[i] else float(probs[i]),
        }
        row.update(by_row.get(i, _no_face_row()))
        items.append(row)
    metrics = _metrics(matches, n, gallery, detect_errors)
    return ProbeResult(probe=PROBE, metrics=metrics, items=items)


def check_instance(gallery: FaceGallery, config: IdentityConfig) -> None:
    """Raise if ``config.instance`` names a person the gallery does not have (a typo would hide nothing and count
    the subject's faces as leaks)."""
    unknown = sorted(set(config.instance) - set(gallery.identities))
    if unknown:
        shown = ", ".join(gallery.identities[:10]) + (" ..." if len(gallery.identities) > 10 else "")
        raise MemwatchError(
            f"setting probes.identity.instance names {', '.join(map(repr, unknown))}, which is no training "
            f"identity; the gallery's identities: {shown}"
        )


def match_faces(query: torch.Tensor, gallery: FaceGallery, config: IdentityConfig) -> list[dict[str, Any]]:
    """Leak and interpolation verdicts for face embeddings ``(Q, D)``.

    Returns:
        One dict per face: ``identity``, ``identity_item`` (best training face), ``similarity``,
        ``leak``, ``interpolation``, ``parent_a``, ``parent_b``, ``sim_a``, ``sim_b``, ``slerp_t``,
        ``slerp_similarity`` (None where not an interpolation).

    Example:
        >>> faces = torch.nn.functional.normalize(torch.randn(3, 512), dim=1)
        >>> rows = match_faces(faces, gallery, cfg)  # doctest: +SKIP
        >>> rows[0]["leak"]  # doctest: +SKIP
        False
    """
    t = gallery.threshold
    query = torch.nn.functional.normalize(query.float(), dim=1)
    n_id = len(gallery.identities)
    rows: list[dict[str, Any]] = []
    for start in range(0, query.shape[0], config.chunk_size):
        q = query[start : start + config.chunk_size]
        sims = q @ gallery.embeddings.T  # (Qc, G)
        best_sim, best_face = sims.max(dim=1)
        # Similarity to an identity = to its best-matching training face.
        per_id = torch.full((q.shape[0], n_id), float("-inf"))
        per_id.scatter_reduce_(1, gallery.face_identity.expand(q.shape[0], -1), sims, reduce="amax")
        for r in range(q.shape[0]):
            face = int(best_face[r])
            sim = float(best_sim[r])
            blend = _interpolation(q[r], per_id[r], gallery, config)
            person = gallery.identities[int(gallery.face_identity[face])]
            # a face that blends two people verifies against both, but reproduces neither
            verified = sim >= t and not blend["interpolation"]
            row = {
                "identity": person,
                "identity_item": gallery.item_ids[face],
                "similarity": sim,
                "verified": verified,  # the face is its best-matching person (a leak, or the fine-tune's subject)
                # the fine-tune's own subject is what it is meant to produce: kept apart from leaks
                "leak": verified and person not in config.instance,
                "instance": person in config.instance,
                **blend,
            }
            rows.append(row)
    return rows


def _interpolation(e: torch.Tensor, per_id: torch.Tensor, gallery: FaceGallery, config: IdentityConfig) -> dict:
    """Best (A, B) blend explaining face ``e``, or a row of "no interpolation"."""
    t = gallery.threshold
    path_min = t if config.slerp_min_similarity is None else config.slerp_min_similarity
    passing = torch.nonzero(per_id >= t).flatten()
    if passing.numel() < 2:
        return _no_interpolation()
    order = torch.argsort(per_id[passing], descending=True, stable=True)
    cand = passing[order][:MAX_CANDIDATES].tolist()
    best: tuple[float, float] | None = None
    out = _no_interpolation()
    for i, first in enumerate(cand):
        for second in cand[i + 1 :]:
            # Parents in name order, so (A, B) is the same pair whatever matched more strongly.
            a_idx, b_idx = sorted((first, second), key=lambda k: gallery.identities[k])
            s_a, s_b = float(per_id[a_idx]), float(per_id[b_idx])
            if abs(s_a - s_b) > config.balance_tolerance:
                continue
            geo = slerp_position(e, gallery.centroids[a_idx], gallery.centroids[b_idx])
            if geo is None or geo["parents_similarity"] >= t:
                continue  # the parents verify against each other: a face matching both is no blend
            tau, path_sim = geo["t"], geo["similarity"]
            if not config.slerp_end_margin <= tau <= 1.0 - config.slerp_end_margin or path_sim < path_min:
                continue
            score = (min(s_a, s_b), path_sim)
            if best is None or score > best:
                best = score
                out = {
                    "interpolation": True,
                    "parent_a": gallery.identities[a_idx],
                    "parent_b": gallery.identities[b_idx],
                    "sim_a": s_a,
                    "sim_b": s_b,
                    "slerp_t": tau,
                    "slerp_similarity": path_sim,
                }
    return out


def slerp_position(e: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> dict[str, float] | None:
    """Where unit vector ``e`` lies relative to the slerp arc from unit ``a`` to unit ``b``.

    ``e`` is projected onto the plane of ``a`` and ``b``; its angle from ``a`` in that plane, divided
    by the angle between ``a`` and ``b``, is the arc position ``t`` (0 at ``a``, 1 at ``b``). When
    ``0 <= t <= 1`` the nearest arc point is ``slerp(a, b, t)`` and the cosine similarity to it is the
    norm of the projection.

    Returns:
        ``{"t", "similarity", "parents_similarity"}``, or None if ``a`` and ``b`` are (anti)parallel.

    Example:
        >>> a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
        >>> pos = slerp_position(torch.nn.functional.normalize(a + b, dim=0), a, b)
        >>> round(pos["t"], 3), round(pos["similarity"], 3)
        (0.5, 1.0)
    """
    c = float(a @ b)
    sin_omega = math.sqrt(max(0.0, 1.0 - c * c))
    if sin_omega < 1e-6:
        return None
    u = (b - c * a) / sin_omega  # unit vector in the plane, orthogonal to a
    x, y = float(e @ a), float(e @ u)
    tau = math.atan2(y, x) / math.acos(max(-1.0, min(1.0, c)))
    if 0.0 <= tau <= 1.0:
        similarity = math.hypot(x, y)
    else:  # nearest arc point is an end
        similarity = max(x, float(e @ b))
    return {"t": tau, "similarity": similarity, "parents_similarity": c}


def _no_interpolation() -> dict[str, Any]:
    return {
        "interpolation": False,
        "parent_a": None,
        "parent_b": None,
        "sim_a": None,
        "sim_b": None,
        "slerp_t": None,
        "slerp_similarity": None,
    }


def _no_face_row() -> dict[str, Any]:
    return {"identity": None, "identity_item": None, "similarity": None, "verified": False, "leak": False,
            "instance": False, **_no_interpolation()}  # fmt: skip


def _metrics(matches: list[dict[str, Any]], n: int, gallery: FaceGallery, detect_errors: int) -> dict[str, float]:
    faces = len(matches)
    leaks = [m for m in matches if m["leak"]]
    blends = [m for m in matches if m["interpolation"]]
    subject = [m for m in matches if m["instance"] and m["verified"]]
    # how close faces come to a person they must not reproduce: the instance person is left out
    sims = torch.tensor([m["similarity"] for m in matches if not m["instance"]], dtype=torch.float64)
    others = int(sims.numel())
    metrics: dict[str, float] = {
        "num_samples": float(n),
        "faces_found": float(faces),
        "face_detection_rate": faces / n if n else _NAN,
        "face_detect_errors": float(detect_errors),
        "identity_leak_rate": len(leaks) / faces if faces else _NAN,
        # over every sample, not the faces found: one face of 32 samples is not "100% leaking"
        "identity_leak_share": len(leaks) / n if n else _NAN,
        "identities_leaked": float(len({m["identity"] for m in leaks})),
        "identity_interpolation_rate": len(blends) / faces if faces else _NAN,
        "identity_interpolations": float(len(blends)),
        "identity_pairs_interpolated": float(len({(m["parent_a"], m["parent_b"]) for m in blends})),
        "identity_sim_p50": torch.quantile(sims, 0.5).item() if others else _NAN,
        "identity_sim_p95": torch.quantile(sims, 0.95).item() if others else _NAN,
        "identity_sim_max": sims.max().item() if others else _NAN,
        "instance_faces": float(len(subject)),
        "instance_face_rate": len(subject) / faces if faces else _NAN,
        "gallery_identities": float(len(gallery.identities)),
        "gallery_faces": float(len(gallery)),
        **gallery.calibration.metrics(),
    }
    if gallery.holdout_leak_rate is not None:
        metrics["identity_leak_baseline"] = gallery.holdout_leak_rate
        metrics["identity_leak_excess"] = metrics["identity_leak_rate"] - gallery.holdout_leak_rate
    return metrics


def identity_evidence(result: ProbeResult) -> dict[str, Any]:
    """Seeds and training identities of the faces that leak or blend (for warning events).

    Example:
        >>> rows = [{"seed": 3, "leak": True, "identity": "ann", "similarity": 0.95}]
        >>> identity_evidence(ProbeResult("identity", {}, items=rows))
        {'seeds': [3], 'identities': ['ann'], 'blends': [], 'closest_people': 'ann (0.950)'}
    """
    flagged = [it for it in result.items if it.get("leak") or it.get("interpolation")]
    closest = sorted(closest_approaches(result.items).items(), key=lambda kv: -kv[1])[:3]
    return {
        "seeds": [it["seed"] for it in flagged if it.get("seed") is not None],
        "identities": sorted({str(it["identity"]) for it in flagged if it.get("identity")}),
        "blends": sorted({f"{it['parent_a']}+{it['parent_b']}" for it in flagged if it.get("interpolation")}),
        "closest_people": ", ".join(f"{p} ({s:.3f})" for p, s in closest) or "-",
    }


#: Probes of each person's closest approach in the leak forecast, and how far ahead it may reach: the
#: copy forecast's settings (probes/forecast.py, tuned on scripts/bench_warnings.py), not tuned for faces.
LEAK_WINDOW = 6
LEAK_MAX_EXTRAPOLATION = 2.0


def closest_approaches(items: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each training person's closest approach at one probe: the highest similarity among the generated
    faces whose best match they are (a person no face matches best has no value then), as
    :mod:`memwatch.signals.image_risk` does for training images.

    Example:
        >>> closest_approaches([{"identity": "ann", "similarity": 0.8}, {"identity": "ann", "similarity": 0.9},
        ...                     {"identity": None, "similarity": None}])
        {'ann': 0.9}
    """
    out: dict[str, float] = {}
    for row in items:
        person, sim = row.get("identity"), row.get("similarity")
        if row.get("instance"):
            continue  # the fine-tune's subject approaching is its purpose, not a leak to forecast
        if person is not None and sim is not None and math.isfinite(float(sim)):
            out[str(person)] = max(out.get(str(person), -math.inf), float(sim))
    return out


def leak_forecast(
    trajectory: Sequence[tuple[int, dict[str, float]]], threshold: float, *, window: int = LEAK_WINDOW
) -> dict[str, Any]:
    """Forecast the first identity leak from the people's closest approaches, as the copy forecast does.

    Each person's cosine distance ``1 - similarity`` falls towards ``1 - threshold`` as generated faces
    come to resemble them; :func:`memwatch.signals.forecast.forecast_onset` fits the smallest distance over the
    people (the person closest to leaking) and says when it reaches the threshold.

    Args:
        trajectory: ``(step, {person: closest approach})`` per probe, oldest first; the last is now.
        threshold: the verification threshold (cosine similarity).
        window: the most recent probes in the fit.

    Returns:
        ``{"metrics": {leak_onset, leak_onset_low, leak_onset_high, leak_steps_to_onset, leak_slope_t,
        people_approaching}, "crossings": {person: forecast step or NaN}}``.

    Example:
        >>> steps = [(100, {"ann": 0.70}), (200, {"ann": 0.78}), (300, {"ann": 0.84}), (400, {"ann": 0.88})]
        >>> out = leak_forecast(steps, 0.907)
        >>> 400 < out["metrics"]["leak_onset"] < 700
        True
    """
    from memwatch.signals.forecast import forecast_onset

    distances = [(step, {p: 1.0 - s for p, s in people.items()}) for step, people in trajectory]
    f = forecast_onset(
        distances, threshold=1.0 - threshold, quantile=0.0, window=window, max_extrapolation=LEAK_MAX_EXTRAPOLATION
    )
    m = f.metrics()
    metrics = {
        "leak_onset": m["onset"],
        "leak_onset_low": m["onset_low"],
        "leak_onset_high": m["onset_high"],
        "leak_steps_to_onset": m["steps_to_onset"],
        "leak_slope_t": m["slope_t"],
        "people_approaching": m["seeds_approaching"],
    }
    return {"metrics": metrics, "crossings": dict(f.per_seed)}
