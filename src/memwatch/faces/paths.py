"""Can the model blend two training people? The identity path: faces along the way from one person to another.

The identity probe notices a blend only when a fixed-seed sample happens to be one. The path test asks the
model directly: for a pair of training people A and B that the model already reproduces from some seeds (a
sample of seed ``s_A`` verifies as A, one of ``s_B`` as B), it generates faces along the path between the two
seeds' initial noises (spherical interpolation, :func:`slerp_noise`) and follows each face's similarity to A and
to B (:func:`path_profile`):

* ``face_rate``: the share of path points with a detected face;
* ``both_rate``: the share of path points that verify against **both** people (the morphing-attack measure
  MMPMR, Scherhag et al. 2017, over the path): a model that can make such faces can make a face that passes as
  two real people;
* how the identity changes: ``sharpness`` is the largest change of the margin ``s_A - s_B`` between two
  neighbouring points as a share of its whole change along the path. A model that has memorized two faces and
  nothing between them **snaps** (one step carries most of the change, no point passes as both); one that can
  interpolate identities passes through convincing **blends** (points that verify against both); a path that
  fades from A to B through faces that pass as neither is a **fade**;
* ``closeness``: the highest ``min(s_A, s_B)`` on the path: how near the path comes to a face that passes as
  both (the precursor of the first blend, as a person's closest approach is of the first leak).

Example:
    >>> p = path_profile([0.95, 0.93, 0.91, 0.80, 0.60], [0.60, 0.85, 0.92, 0.93, 0.95], threshold=0.907)
    >>> p["kind"], p["both"], round(p["closeness"], 2)
    ('blend', 1, 0.91)
    >>> path_profile([0.95, 0.95, 0.94, 0.62, 0.61], [0.60, 0.61, 0.62, 0.94, 0.95], threshold=0.907)["kind"]
    'snap'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

#: one step carrying at least this share of the identity's whole change along the path is a snap
SNAP_SHARE = 0.5
#: the kinds of path, from the most to the least telling
KINDS = ("blend", "snap", "fade", "no-switch", "no-face")


def slerp_noise(a: torch.Tensor, b: torch.Tensor, points: int) -> torch.Tensor:
    """``points`` tensors on the great circle from ``a`` to ``b`` (both ends included), their norms interpolated
    linearly: Gaussian initial noises stay typical all along (a straight line between two would shrink towards
    the middle, where the model was never trained to start).

    Example:
        >>> a, b = torch.randn(3, 8, 8), torch.randn(3, 8, 8)
        >>> path = slerp_noise(a, b, 5)
        >>> path.shape, torch.allclose(path[0], a, atol=1e-5), torch.allclose(path[-1], b, atol=1e-5)
        (torch.Size([5, 3, 8, 8]), True, True)
    """
    if points < 2:
        raise ValueError(f"points={points}: a path needs at least its two ends")
    fa, fb = a.double().flatten(), b.double().flatten()
    na, nb = fa.norm(), fb.norm()
    ua, ub = fa / na, fb / nb
    omega = torch.arccos(torch.clamp(ua @ ub, -1.0, 1.0))
    out = []
    for t in torch.linspace(0.0, 1.0, points, dtype=torch.float64):
        if float(omega) < 1e-6:
            u = ua
        else:
            u = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
        out.append((u * ((1 - t) * na + t * nb)).reshape(a.shape))
    return torch.stack(out).to(a.dtype)


def similarities_to(embeddings: torch.Tensor, found: torch.Tensor, gallery: Any, person: str) -> list[float | None]:
    """Each face's similarity to ``person`` (its best-matching gallery face), None where no face was found.

    Args:
        embeddings: ``(N, D)`` face embeddings (the pipeline's ``embed_images``).
        found: ``(N,)`` bool.
        gallery: the :class:`~memwatch.faces.gallery.FaceGallery` of training faces.
        person: one of ``gallery.identities``.
    """
    k = gallery.identities.index(person)
    mine = gallery.embeddings[gallery.face_identity.flatten() == k]
    sims = torch.nn.functional.normalize(embeddings.float(), dim=1) @ mine.T
    best = sims.max(dim=1).values
    return [float(best[i]) if bool(found[i]) else None for i in range(len(found))]


def path_profile(
    sim_a: Sequence[float | None],
    sim_b: Sequence[float | None],
    *,
    threshold: float,
    snap_share: float = SNAP_SHARE,
) -> dict[str, Any]:
    """What a path from person A to person B shows, from each point's similarity to each of them.

    Args:
        sim_a: per path point, the face's similarity to A (its best gallery face), None where no face was found.
        sim_b: the same for B.
        threshold: the verification threshold (the gallery's).
        snap_share: the share of the whole change one step must carry to call the switch a snap.

    Returns:
        ``points``, ``faces``, ``face_rate``, ``both`` (points verifying against both), ``both_rate`` (over all
        points), ``closeness`` (max of ``min(s_A, s_B)``; NaN without a face), ``sharpness`` (NaN when the margin
        does not change sign: no switch), ``switch_at`` (the point index after the largest step) and ``kind``:
        ``blend`` (a point verifies against both), ``snap``, ``fade`` (the identity switches gradually through
        faces that pass as neither), ``no-switch`` (A does not give way to B along the path) or ``no-face``.
    """
    if len(sim_a) != len(sim_b):
        raise ValueError(f"{len(sim_a)} similarities to A but {len(sim_b)} to B: give one of each per point")
    faces = [
        (i, float(a), float(b))
        for i, (a, b) in enumerate(zip(sim_a, sim_b, strict=True))
        if a is not None and b is not None
    ]
    n = len(sim_a)
    both = sum(1 for _, a, b in faces if a >= threshold and b >= threshold)
    out: dict[str, Any] = {
        "points": n,
        "faces": len(faces),
        "face_rate": len(faces) / n if n else math.nan,
        "both": both,
        "both_rate": both / n if n else math.nan,
        "closeness": max((min(a, b) for _, a, b in faces), default=math.nan),
        "sharpness": math.nan,
        "switch_at": None,
    }
    if not faces:
        out["kind"] = "no-face"
        return out
    margins = [(i, a - b) for i, a, b in faces]
    first, last = margins[0][1], margins[-1][1]
    if both:
        out["kind"] = "blend"
    elif not (first > 0 > last):
        out["kind"] = "no-switch"
    if first > 0 > last:
        steps = [(margins[k][1] - margins[k + 1][1], margins[k + 1][0]) for k in range(len(margins) - 1)]
        jump, at = max(steps)
        out["sharpness"] = jump / (first - last)
        out["switch_at"] = at
        if not both:
            out["kind"] = "snap" if out["sharpness"] >= snap_share else "fade"
    return out


def path_pairs(items: Sequence[dict[str, Any]], most: int) -> list[tuple[str, int, str, int]]:
    """Up to ``most`` pairs of training people to draw paths between, from one probe's identity rows: each
    person some sample verifies as (a leak, or the fine-tune's own subject: ``verified``) gets the seed of its most
    similar such sample; pairs in name order.

    Returns:
        ``(person_a, seed_a, person_b, seed_b)`` tuples.

    Example:
        >>> rows = [{"verified": True, "identity": "bo", "similarity": 0.95, "seed": 4},
        ...         {"verified": True, "identity": "al", "similarity": 0.93, "seed": 9},
        ...         {"verified": True, "identity": "al", "similarity": 0.97, "seed": 2}]
        >>> path_pairs(rows, 3)
        [('al', 2, 'bo', 4)]
    """
    best: dict[str, tuple[float, int]] = {}
    for row in items:
        if row.get("verified") and row.get("seed") is not None and row.get("identity") is not None:
            person, sim = str(row["identity"]), float(row["similarity"])
            if person not in best or sim > best[person][0]:
                best[person] = (sim, int(row["seed"]))
    people = sorted(best)
    pairs = [(a, best[a][1], b, best[b][1]) for i, a in enumerate(people) for b in people[i + 1 :]]
    return pairs[:most]


def draw_paths(ctx: Any, items: Sequence[dict[str, Any]], gallery: Any, config: Any) -> tuple[dict[str, float], list]:
    """The identity paths of one probe: metrics for the identity result and one row per path point.

    Args:
        ctx: the probe context (the model, and the shared samples with the settings they were drawn with).
        items: the identity probe's rows for the shared samples (which seed reproduces which person).
        gallery: the training faces.
        config: the identity settings (``paths``, ``path_points``).

    Returns:
        ``(metrics, rows)``: ``path_pairs`` (paths drawn), ``path_pairs_blending`` (paths with a face that
        verifies against both people), ``path_pairs_snapping``, ``path_blend_ability`` (blending / drawn),
        ``path_mmpmr`` (mean share of path points verifying against both), ``path_face_rate`` and
        ``path_closeness`` (the highest ``min(s_A, s_B)`` on any path); NaN where no pair of people is
        reproduced yet (or the model is text-to-image, whose paths are not drawn).
    """
    from memwatch.models.modes import unwrap_model
    from memwatch.sampling.ddim import generate_samples, image_shape, seed_noise

    nan = math.nan
    metrics = {"path_pairs": 0.0, "path_pairs_blending": nan, "path_pairs_snapping": nan, "path_blend_ability": nan,
               "path_mmpmr": nan, "path_face_rate": nan, "path_closeness": nan}  # fmt: skip
    samples = ctx.samples
    pairs = path_pairs(items, config.paths)
    if not pairs or ctx.parts.text_to_image or samples is None or samples.settings is None:
        return metrics, []
    shape = image_shape(unwrap_model(ctx.parts.unet))
    index = {s: i for i, s in enumerate(samples.plan.seeds)}
    rows, profiles = [], []
    for a, seed_a, b, seed_b in pairs:
        noise = slerp_noise(seed_noise(seed_a, shape), seed_noise(seed_b, shape), config.path_points)
        inner = generate_samples(ctx.parts.unet, ctx.parts.scheduler, [seed_a] * (len(noise) - 2),
                                 num_inference_steps=samples.settings.inference_steps, initial=noise[1:-1],
                                 batch_size=samples.settings.batch_size or 16)  # fmt: skip
        images = torch.cat([samples.images[index[seed_a]][None], inner, samples.images[index[seed_b]][None]])
        faces = gallery.pipeline.embed_images(list(images))
        sim_a = similarities_to(faces.embeddings, faces.found, gallery, a)
        sim_b = similarities_to(faces.embeddings, faces.found, gallery, b)
        profile = path_profile(sim_a, sim_b, threshold=gallery.threshold)
        profiles.append(profile)
        for k, (sa, sb) in enumerate(zip(sim_a, sim_b, strict=True)):
            rows.append({"pair": f"{a}+{b}", "person_a": a, "person_b": b, "seed_a": seed_a, "seed_b": seed_b,
                         "t": k / (len(noise) - 1), "face_found": sa is not None, "sim_a": sa, "sim_b": sb,
                         "both": sa is not None and sb is not None and min(sa, sb) >= gallery.threshold,
                         "path_kind": profile["kind"], "sharpness": profile["sharpness"]})  # fmt: skip
    n = len(profiles)
    blending = sum(p["kind"] == "blend" for p in profiles)
    metrics.update({
        "path_pairs": float(n), "path_pairs_blending": float(blending),
        "path_pairs_snapping": float(sum(p["kind"] == "snap" for p in profiles)),
        "path_blend_ability": blending / n, "path_mmpmr": sum(p["both_rate"] for p in profiles) / n,
        "path_face_rate": sum(p["face_rate"] for p in profiles) / n,
        "path_closeness": max((p["closeness"] for p in profiles if math.isfinite(p["closeness"])), default=nan),
    })  # fmt: skip
    return metrics, rows
