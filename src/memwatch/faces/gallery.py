"""The identity gallery: training faces grouped by person, and a verification threshold from the data.

Identities come from the reference set's ``identity`` labels when any item has one (unlabelled items
become single-face identities). Without labels, training faces are clustered: faces whose cosine
similarity reaches the verification threshold are linked, and each connected component is one
identity (singletons kept), named ``cluster:<first item id>``. Either way :attr:`FaceGallery.assignments`
lists ``{"item", "identity", "face"}`` for every usable item, so a report can show the grouping.

The threshold is calibrated on *impostor* pairs (two faces known to be different people): pairs of
gallery faces with different labels, and pairs of a gallery face with a holdout face (other people's
real faces). It is the smallest similarity whose false-match rate on those pairs is at most
``target_fmr``. With fewer than ``1 / target_fmr`` impostor pairs the rate cannot be resolved, so the
documented fallback applies and the calibration says so (``calibrated = False``).

Training-face embeddings are cached by (pipeline spec hash, image sha256); an image without a face
is cached as an empty vector, so it is skipped at once next time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from memwatch.data.embed_cache import EmbeddingCache
from memwatch.data.images import load_image, pil_to_tensor, to_rgb
from memwatch.data.refset import ReferenceItem, ReferenceSet
from memwatch.errors import MemwatchError
from memwatch.faces.config import IdentityConfig
from memwatch.faces.embed import FacePipeline, documented_threshold
from memwatch.hashing import config_hash

log = logging.getLogger(__name__)

#: images loaded, detected and embedded per step while building a gallery (bounds memory)
LOAD_CHUNK = 64


@dataclass
class Calibration:
    """The verification threshold and how it was chosen.

    Attributes:
        threshold: cosine similarity at or above which two faces are the same person.
        calibrated: True if estimated from impostor pairs at ``target_fmr``.
        target_fmr: the false-match rate asked for.
        fmr: false-match rate of ``threshold`` on the impostor pairs (NaN without pairs).
        n_impostor: impostor pairs available.
        n_genuine: genuine pairs (same label) available.
        fnmr: share of genuine pairs below ``threshold`` (NaN without genuine pairs).
        source: ``"labels"``, ``"holdout"``, ``"labels+holdout"``, ``"config"`` or ``"fallback"``.
        reason: why the threshold was not calibrated (empty when it was).
    """

    threshold: float
    calibrated: bool
    target_fmr: float
    fmr: float = float("nan")
    n_impostor: int = 0
    n_genuine: int = 0
    fnmr: float = float("nan")
    source: str = "fallback"
    reason: str = ""

    def metrics(self) -> dict[str, float]:
        """Numbers for a probe result (``threshold_calibrated`` is 0/1)."""
        return {
            "identity_threshold": float(self.threshold),
            "threshold_calibrated": float(self.calibrated),
            "threshold_target_fmr": float(self.target_fmr),
            "threshold_fmr": float(self.fmr),
            "threshold_fnmr": float(self.fnmr),
            "threshold_impostor_pairs": float(self.n_impostor),
        }


def threshold_at_fmr(top_scores: torch.Tensor, n_total: int, target_fmr: float) -> tuple[float, float]:
    """Smallest threshold whose false-match rate over ``n_total`` impostor scores is at most ``target_fmr``.

    Args:
        top_scores: the impostor scores, or at least their ``floor(target_fmr * n_total) + 1`` largest.
        n_total: how many impostor scores there are in all.
        target_fmr: wanted false-match rate (share of impostor scores ``>= threshold``).

    Returns:
        ``(threshold, achieved_fmr)``. The threshold lies just above the (k+1)-th largest score,
        k = ``floor(target_fmr * n_total)``, so exactly the k largest (or fewer, with ties) pass.

    Example:
        >>> threshold_at_fmr(torch.tensor([0.9, 0.5, 0.4, 0.1]), 4, 0.25)[1]
        0.25
    """
    k = int(math.floor(target_fmr * n_total + 1e-9))
    scores = torch.sort(top_scores.float().flatten(), descending=True).values
    if scores.numel() < min(k + 1, n_total):
        raise ValueError(f"need the {k + 1} largest impostor scores, got {scores.numel()}")
    if k >= n_total:
        return float("-inf"), 1.0
    # float32 next-up of the (k+1)-th score: that score and everything below it fail the test s >= t.
    cut = np.float32(scores[k].item())
    threshold = float(np.nextafter(cut, np.float32(np.inf)))
    achieved = int((scores >= threshold).sum()) / n_total
    return threshold, achieved


def calibrate_threshold(
    impostor_scores: torch.Tensor,
    config: IdentityConfig,
    *,
    n_total: int | None = None,
    genuine_scores: torch.Tensor | None = None,
    source: str = "labels",
) -> Calibration:
    """Choose the verification threshold from impostor scores, or fall back when they are too few.

    Args:
        impostor_scores: similarities of face pairs known to be different people (all of them, or
            the largest ones when ``n_total`` says how many there are).
        config: ``target_fmr``, ``min_impostor_pairs``, ``threshold`` and ``fallback_threshold``.
        n_total: number of impostor pairs (default: ``len(impostor_scores)``).
        genuine_scores: similarities of same-person pairs, for the false non-match rate.
        source: where the impostor pairs came from (recorded).

    Returns:
        A :class:`Calibration`. A fixed ``config.threshold`` wins over calibration (source
        ``"config"``); fewer than ``config.required_impostor_pairs`` pairs give the fallback.

    Example:
        >>> scores = torch.randn(100_000) * 0.1
        >>> cal = calibrate_threshold(scores, IdentityConfig(target_fmr=1e-3))
        >>> cal.calibrated, round(cal.threshold, 1)
        (True, 0.3)
    """
    n = int(impostor_scores.numel()) if n_total is None else int(n_total)
    need = config.required_impostor_pairs
    if config.threshold is not None:
        threshold, calibrated, src = float(config.threshold), False, "config"
        reason = "identity.threshold is set"
    elif n < need:
        threshold, calibrated, src = documented_threshold(config), False, "fallback"
        reason = f"{n} impostor pairs, {need} needed for FMR {config.target_fmr:g}"
    else:
        threshold, _ = threshold_at_fmr(impostor_scores, n, config.target_fmr)
        calibrated, src, reason = True, source, ""
    fmr = float((impostor_scores >= threshold).sum()) / n if n else float("nan")
    n_gen = int(genuine_scores.numel()) if genuine_scores is not None else 0
    fnmr = float((genuine_scores < threshold).sum()) / n_gen if n_gen else float("nan")
    return Calibration(
        threshold=threshold,
        calibrated=calibrated,
        target_fmr=config.target_fmr,
        fmr=fmr,
        n_impostor=n,
        n_genuine=n_gen,
        fnmr=fnmr,
        source=src,
        reason=reason,
    )


@dataclass
class FaceGallery:
    """Training faces, their identities, identity centroids and the verification threshold.

    Attributes:
        embeddings: ``(G, D)`` unit vectors, one per distinct training image with a face.
        item_ids: reference item id of each row.
        face_identity: ``(G,)`` index into ``identities`` of each row.
        identities: identity names (sorted).
        centroids: ``(I, D)`` normalised mean embedding of each identity.
        calibration: the threshold and how it was chosen.
        source: ``"labels"`` (from the manifest) or ``"clustering"``.
        assignments: ``{"item", "identity", "face"}`` for every usable reference item (identity None
            for an unlabelled item without a face).
        holdout_embeddings: ``(H, D)`` holdout faces, or None.
        holdout_leak_rate: share of holdout faces whose best gallery match passes the threshold (the
            baseline of ``identity_leak_rate``), or None without holdout faces.
        pipeline: the face pipeline that embedded the gallery (needed to probe images).
        stats: counts (items, faces, no-face items, computed/cached embeddings, holdout counts).
    """

    embeddings: torch.Tensor
    item_ids: list[str]
    face_identity: torch.Tensor
    identities: list[str]
    centroids: torch.Tensor
    calibration: Calibration
    source: str
    assignments: list[dict[str, Any]] = field(default_factory=list)
    holdout_embeddings: torch.Tensor | None = None
    holdout_leak_rate: float | None = None
    pipeline: FacePipeline | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        """The verification threshold (cosine similarity)."""
        return self.calibration.threshold

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def summary(self) -> dict[str, Any]:
        """Counts, identity source and calibration, for stores and reports."""
        return {
            "identities": len(self.identities),
            "faces": len(self),
            "source": self.source,
            "threshold": self.threshold,
            "threshold_calibrated": int(self.calibration.calibrated),
            "threshold_source": self.calibration.source,
            "threshold_target_fmr": self.calibration.target_fmr,
            "threshold_fmr": self.calibration.fmr,
            "threshold_reason": self.calibration.reason,
            **self.stats,
        }


def gallery_from_embeddings(
    embeddings: torch.Tensor,
    item_ids: list[str],
    labels: list[str | None] | None,
    config: IdentityConfig,
    *,
    holdout_embeddings: torch.Tensor | None = None,
    pipeline: FacePipeline | None = None,
    no_face_items: list[tuple[str, str | None]] | None = None,
    stats: dict[str, float] | None = None,
) -> FaceGallery:
    """Build a gallery from training-face embeddings (the arithmetic half of :func:`build_gallery`).

    Args:
        embeddings: ``(G, D)`` unit vectors of training faces.
        item_ids: reference item id per row.
        labels: identity label per row (None entries are unlabelled); None or all-None clusters.
        config: threshold and calibration settings.
        holdout_embeddings: ``(H, D)`` faces of other people, for calibration and the leak baseline.
        pipeline: kept on the gallery so :func:`identity_probe` can embed samples.
        no_face_items: ``(item id, label)`` of usable items without a face, for :attr:`FaceGallery.assignments`.
        stats: extra counts to keep in :attr:`FaceGallery.stats`.

    Returns:
        A :class:`FaceGallery`.

    Example:
        >>> e = torch.nn.functional.normalize(torch.randn(6, 32), dim=1)
        >>> g = gallery_from_embeddings(e, list("abcdef"), ["x", "x", "y", "y", "z", None], IdentityConfig())
        >>> g.identities, g.calibration.calibrated
        (['item:f', 'x', 'y', 'z'], False)
    """
    if embeddings.ndim != 2 or embeddings.shape[0] != len(item_ids):
        raise ValueError("embeddings must be (G, D) with one item id per row")
    if embeddings.shape[0] == 0:
        raise MemwatchError(
            "no face was found in any training image: the identity probe needs a reference set of face images"
        )
    emb = torch.nn.functional.normalize(embeddings.float(), dim=1)
    hold = None
    if holdout_embeddings is not None and holdout_embeddings.shape[0] > 0:
        hold = torch.nn.functional.normalize(holdout_embeddings.float(), dim=1)
    labelled = labels is not None and any(lab is not None for lab in labels)

    if labelled:
        assert labels is not None
        names = [lab if lab is not None else f"item:{iid}" for lab, iid in zip(labels, item_ids, strict=True)]
        calibration = _calibrate(emb, list(labels), hold, config)
        source = "labels"
    else:
        # No labels: only holdout pairs are known impostors. Calibrate on them (or fall back), then link.
        calibration = _calibrate(emb, None, hold, config)
        components = cluster_identities(emb, calibration.threshold, chunk_size=config.chunk_size)
        first: dict[int, str] = {}
        for comp, iid in sorted(zip(components, item_ids, strict=True), key=lambda t: t[1]):
            first.setdefault(comp, iid)
        names = [f"cluster:{first[c]}" for c in components]
        source = "clustering"

    identities = sorted(set(names))
    index = {name: i for i, name in enumerate(identities)}
    face_identity = torch.tensor([index[n] for n in names], dtype=torch.long)
    centroids = torch.zeros(len(identities), emb.shape[1]).index_add_(0, face_identity, emb)
    centroids = torch.nn.functional.normalize(centroids, dim=1)

    assignments = [{"item": iid, "identity": name, "face": True} for iid, name in zip(item_ids, names, strict=True)]
    for iid, lab in no_face_items or []:
        assignments.append({"item": iid, "identity": lab if labelled else None, "face": False})
    assignments.sort(key=lambda row: row["item"])

    gallery = FaceGallery(
        embeddings=emb,
        item_ids=list(item_ids),
        face_identity=face_identity,
        identities=identities,
        centroids=centroids,
        calibration=calibration,
        source=source,
        assignments=assignments,
        holdout_embeddings=hold,
        pipeline=pipeline,
        stats=dict(stats or {}),
    )
    if hold is not None:
        best = best_similarity(hold, emb, chunk_size=config.chunk_size)
        gallery.holdout_leak_rate = float((best >= gallery.threshold).double().mean())
    return gallery


def best_similarity(query: torch.Tensor, reference: torch.Tensor, *, chunk_size: int = 2048) -> torch.Tensor:
    """Highest cosine similarity of each query row to any reference row, ``(Q,)``, in chunks."""
    best = torch.full((query.shape[0],), float("-inf"))
    for start in range(0, reference.shape[0], chunk_size):
        sims = query @ reference[start : start + chunk_size].T
        best = torch.maximum(best, sims.max(dim=1).values)
    return best


def cluster_identities(embeddings: torch.Tensor, threshold: float, *, chunk_size: int = 2048) -> list[int]:
    """Connected components of the graph linking faces with cosine similarity ``>= threshold``.

    Args:
        embeddings: ``(G, D)`` unit vectors.
        threshold: linking similarity (the verification threshold).
        chunk_size: rows compared at a time.

    Returns:
        Component number per row (numbered in order of first appearance); singletons are their own.

    Example:
        >>> e = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0]])
        >>> cluster_identities(torch.nn.functional.normalize(e, dim=1), 0.9)
        [0, 0, 1]
    """
    n = embeddings.shape[0]
    # Edge list of linked pairs (each once, i < j); typical galleries link only same-person faces.
    src, dst = [], []
    for start in range(0, n, chunk_size):
        sims = embeddings[start : start + chunk_size] @ embeddings.T
        rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
        rows = rows + start
        upper = cols > rows
        src.append(rows[upper])
        dst.append(cols[upper])
    a = torch.cat(src) if src else torch.empty(0, dtype=torch.long)
    b = torch.cat(dst) if dst else torch.empty(0, dtype=torch.long)
    # Min-label propagation with pointer jumping: every face ends with the smallest index of its component.
    labels = torch.arange(n)
    while True:
        new = labels.clone()
        new.scatter_reduce_(0, a, labels[b], reduce="amin")
        new.scatter_reduce_(0, b, labels[a], reduce="amin")
        new = new[new]
        if torch.equal(new, labels):
            break
        labels = new
    numbering: dict[int, int] = {}
    return [numbering.setdefault(int(lab), len(numbering)) for lab in labels]


def _calibrate(
    emb: torch.Tensor, labels: list[str | None] | None, hold: torch.Tensor | None, config: IdentityConfig
) -> Calibration:
    """Collect impostor (and genuine) pairs and calibrate; see :func:`calibrate_threshold`.

    Label pairs are impostors only when both faces are labelled: an unlabelled face may be anyone,
    including a labelled person.
    """
    codes = None
    n_label_imp, n_genuine = 0, 0
    if labels is not None:
        ids = {name: i for i, name in enumerate(sorted({lab for lab in labels if lab is not None}))}
        codes = torch.tensor([ids[lab] if lab is not None else -1 for lab in labels], dtype=torch.long)
        counts = torch.bincount(codes[codes >= 0]).tolist()
        n_known = sum(counts)
        n_genuine = sum(c * (c - 1) // 2 for c in counts)
        n_label_imp = n_known * (n_known - 1) // 2 - n_genuine
    n_hold_imp = emb.shape[0] * hold.shape[0] if hold is not None else 0
    n_total = n_label_imp + n_hold_imp
    parts = [p for p, n in (("labels", n_label_imp), ("holdout", n_hold_imp)) if n > 0]
    source = "+".join(parts) if parts else "fallback"
    # Only the k+1 largest impostor scores decide the threshold; keep that many while scanning.
    keep = min(n_total, int(math.floor(config.target_fmr * n_total + 1e-9)) + 1) if n_total else 0
    top = _top_impostor_scores(emb, codes, hold, keep, config.chunk_size) if keep else torch.empty(0)
    cal = calibrate_threshold(top, config, n_total=n_total, source=source)
    # When calibrated, the kept scores hold every impostor score >= the threshold; otherwise count all.
    if not cal.calibrated and n_total:
        cal.fmr = _count_impostors_at(emb, codes, hold, cal.threshold, config.chunk_size) / n_total
    if codes is not None and n_genuine:
        passing = _count_genuine_at(emb, codes, cal.threshold, config.chunk_size)
        cal.n_genuine, cal.fnmr = n_genuine, 1.0 - passing / n_genuine
    return cal


def _pair_blocks(emb: torch.Tensor, codes: torch.Tensor | None, hold: torch.Tensor | None, chunk: int):
    """Yield ``(similarities, impostor mask, genuine mask)`` blocks covering every pair once.

    ``codes`` are label numbers per gallery face (-1: unlabelled, in no label pair).
    """
    g = emb.shape[0]
    col = torch.arange(g)
    for start in range(0, g, chunk):
        block = emb[start : start + chunk]
        if codes is not None:
            row = torch.arange(start, start + block.shape[0]).unsqueeze(1)
            sims = block @ emb.T
            mine = codes[start : start + block.shape[0]].unsqueeze(1)
            # each unordered pair once, no self pairs, both faces labelled
            valid = (col.unsqueeze(0) > row) & (mine >= 0) & (codes.unsqueeze(0) >= 0)
            same = mine == codes.unsqueeze(0)
            yield sims, valid & ~same, valid & same
        if hold is not None:
            sims = block @ hold.T
            yield sims, torch.ones_like(sims, dtype=torch.bool), None


def _top_impostor_scores(
    emb: torch.Tensor, labels: torch.Tensor | None, hold: torch.Tensor | None, keep: int, chunk: int
) -> torch.Tensor:
    top = torch.empty(0)
    for sims, impostor, _ in _pair_blocks(emb, labels, hold, chunk):
        values = sims[impostor]
        if values.numel():
            top = torch.cat([top, values])
            if top.numel() > keep:
                top = torch.topk(top, keep).values
    return top


def _count_impostors_at(
    emb: torch.Tensor, labels: torch.Tensor | None, hold: torch.Tensor | None, threshold: float, chunk: int
) -> int:
    return sum(int((sims[imp] >= threshold).sum()) for sims, imp, _ in _pair_blocks(emb, labels, hold, chunk))


def _count_genuine_at(emb: torch.Tensor, labels: torch.Tensor, threshold: float, chunk: int) -> int:
    return sum(int((sims[gen] >= threshold).sum()) for sims, _, gen in _pair_blocks(emb, labels, None, chunk))


def _load_native_or_resized(item: ReferenceItem, resolution: int | None) -> torch.Tensor:
    """Decode an item by memwatch's image rule; keep its own size when ``resolution`` is None."""
    if resolution is not None:
        return load_image(item.source, resolution)
    from PIL import Image

    with Image.open(item.source) as img:
        img.load()
        return pil_to_tensor(to_rgb(img))


@dataclass
class _EmbeddedFaces:
    """Face embeddings of a reference set's usable items (``vectors[id]`` None: no face)."""

    vectors: dict[str, torch.Tensor | None]
    computed: int = 0
    cached: int = 0
    errors: int = 0


def embed_reference_faces(
    refs: ReferenceSet, pipeline: FacePipeline, config: IdentityConfig, cache: EmbeddingCache | None
) -> _EmbeddedFaces:
    """Detect and embed the face of every item, reusing and filling the cache.

    Items whose pixels cannot be decoded are recorded in ``refs.skipped`` and removed from
    ``refs.items`` (as :func:`memwatch.data.embed_cache.embed_reference` does).
    """
    key = config_hash({"faces": pipeline.spec(), "reference_resolution": config.reference_resolution})
    have = cache.get(key, [it.sha256 for it in refs.items]) if cache is not None else {}
    out = _EmbeddedFaces(vectors={})
    new: dict[str, torch.Tensor] = {}
    todo = [it for it in refs.items if it.sha256 not in have]
    failed: set[str] = set()
    seen: set[str] = set()
    for start in range(0, len(todo), LOAD_CHUNK):
        images, shas = [], []
        for it in todo[start : start + LOAD_CHUNK]:
            if it.sha256 in seen:
                continue  # identical file content: detect and embed once
            try:
                images.append(_load_native_or_resized(it, config.reference_resolution))
            except Exception as e:  # any decoder error: the item is unusable, record it
                failed.add(it.id)
                refs.skip(it.path, f"cannot decode image ({type(e).__name__}: {e})")
                continue
            shas.append(it.sha256)
            seen.add(it.sha256)
        if not images:
            continue
        faces = pipeline.embed_images(images)
        out.errors += faces.errors
        for i, sha in enumerate(shas):
            # An image without a face is cached as an empty vector: skipped at once next time.
            new[sha] = faces.embeddings[i] if bool(faces.found[i]) else torch.empty(0)
    if failed:
        refs.items = [it for it in refs.items if it.id not in failed]
    if cache is not None and new:
        cache.put(key, new)
    have.update(new)
    for it in refs.items:
        vec = have[it.sha256]
        out.vectors[it.id] = vec if vec.numel() else None
    out.computed = len(new)
    out.cached = sum(it.sha256 not in new for it in refs.items)
    return out


def build_gallery(
    refs: ReferenceSet,
    pipeline: FacePipeline,
    config: IdentityConfig,
    *,
    cache: EmbeddingCache | None = None,
    holdout: ReferenceSet | None = None,
) -> FaceGallery:
    """Detect and embed the training faces, group them into identities and calibrate the threshold.

    Args:
        refs: the training set (``identity`` labels used when present).
        pipeline: the face pipeline (also used later for generated samples).
        config: identity settings.
        cache: embedding cache (keyed by pipeline spec hash and image sha256), or None.
        holdout: real faces of *other* people: impostor pairs for calibration and the leak baseline.

    Returns:
        A :class:`FaceGallery`; ``stats`` counts items, faces, items without a face, computed and
        cached embeddings, and the same for the holdout.

    Raises:
        MemwatchError: no training image has a face.

    Example:
        >>> refs = load_reference_set("data/faces.jsonl")  # doctest: +SKIP
        >>> gallery = build_gallery(refs, load_face_pipeline(cfg), cfg, cache=EmbeddingCache())  # doctest: +SKIP
        >>> gallery.summary()["threshold_calibrated"]  # doctest: +SKIP
        1
    """
    t0 = time.perf_counter()
    train = embed_reference_faces(refs, pipeline, config, cache)
    # One gallery row per distinct file content (the first item by id keeps it), so byte-identical
    # copies neither inflate genuine pairs nor, if labelled differently, create impostor pairs of 1.0.
    rows: list[ReferenceItem] = []
    no_face: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for it in refs.items:
        if train.vectors[it.id] is None:
            no_face.append((it.id, it.identity))
        elif it.sha256 not in seen:
            seen.add(it.sha256)
            rows.append(it)
    if not rows:
        raise MemwatchError(
            f"{refs.root}: no face found in any of its {len(refs.items)} images: the identity probe needs "
            "face images (check identity.min_face_prob and identity.detect_* settings)"
        )
    stats: dict[str, float] = {
        "items": float(len(refs.items)),
        "faces": float(len(refs.items) - len(no_face)),
        "no_face": float(len(no_face)),
        "computed": float(train.computed),
        "cached": float(train.cached),
        "detect_errors": float(train.errors),
    }
    hold_emb = None
    if holdout is not None:
        held = embed_reference_faces(holdout, pipeline, config, cache)
        vecs = [v for v in held.vectors.values() if v is not None]
        dim = train.vectors[rows[0].id].shape[0]
        hold_emb = torch.stack(vecs) if vecs else torch.empty(0, dim)
        stats.update(
            holdout_items=float(len(holdout.items)),
            holdout_faces=float(len(vecs)),
            holdout_computed=float(held.computed),
            holdout_cached=float(held.cached),
        )
    labels = [it.identity for it in rows]
    gallery = gallery_from_embeddings(
        torch.stack([train.vectors[it.id] for it in rows]),
        [it.id for it in rows],
        labels,
        config,
        holdout_embeddings=hold_emb,
        pipeline=pipeline,
        no_face_items=no_face,
        stats=stats,
    )
    # Byte-identical copies (not gallery rows) still belong in the assignments the report shows.
    row_identity = dict(zip(gallery.item_ids, (gallery.identities[i] for i in gallery.face_identity), strict=True))
    by_sha = {it.sha256: row_identity[it.id] for it in rows}
    listed = {row["item"] for row in gallery.assignments}
    for it in refs.items:
        if it.id not in listed:
            gallery.assignments.append({"item": it.id, "identity": by_sha[it.sha256], "face": True})
    gallery.assignments.sort(key=lambda row: row["item"])
    gallery.stats["seconds"] = time.perf_counter() - t0
    log.info(
        "face gallery: %d identities from %d faces (%s), threshold %.3f (%s)",
        len(gallery.identities),
        len(gallery),
        gallery.source,
        gallery.threshold,
        gallery.calibration.source if gallery.calibration.calibrated else gallery.calibration.reason,
    )
    return gallery
