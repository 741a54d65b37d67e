"""``memwatch score``: regurgitation metrics for a folder of generated images against training images.

For users who only have samples (no model, no training run). Both folders accept every reference-set
form (image folder, diffusers imagefolder, JSONL manifest); names in the output are paths relative
to their folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memwatch.core.evidence import nan_last
from memwatch.data.embed_cache import EmbeddingCache, embed_reference
from memwatch.data.reference_index import ReferenceIndex
from memwatch.data.refset import load_reference_set
from memwatch.embedders.base import Embedder
from memwatch.probes.regurgitation import RegurgitationConfig, regurgitation_from_embeddings


def score_folders(
    samples_dir: str | Path,
    reference_dir: str | Path,
    embedder: Embedder,
    *,
    cache: EmbeddingCache | None = None,
    config: RegurgitationConfig | None = None,
    columns: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score every image in ``samples_dir`` against ``reference_dir``.

    Args:
        samples_dir: generated images.
        reference_dir: training images (the set the model may have memorized).
        embedder: embedder used for distances and similarities.
        cache: reference-embedding cache (samples are never cached).
        config: thresholds; defaults follow DESIGN.md.
        columns: ``image_column`` / ``caption_column`` of a reference set stored in a dataset, parquet
            files or tar shards.

    Returns:
        ``{"metrics", "matches", "reference", "samples", "embedder", "thresholds"}``, JSON-ready;
        matches are sorted by ratio (most memorized first), then sample name.

    Raises:
        MemwatchError: a folder is missing or has no usable image.

    Example:
        >>> doc = score_folders("samples/", "train/", make_embedder("pixel", resolution=64))  # doctest: +SKIP
        >>> doc["metrics"]["mem_fraction"]  # doctest: +SKIP
        0.25
    """
    config = config or RegurgitationConfig()
    refs = load_reference_set(reference_dir, what="reference folder", **(columns or {}))
    samples = load_reference_set(samples_dir, what="samples folder")
    index = ReferenceIndex(refs, embedder, cache)
    sample_emb = embed_reference(samples, embedder, None).embeddings
    result = regurgitation_from_embeddings(sample_emb, index, config, names=samples.ids)
    keys = ("sample", "nn1", "d1", "d2", "ratio", "similarity", "extraction", "memorized", "copied", "extracted")
    matches = [{k: m[k] for k in keys} for m in result.matches]
    matches.sort(key=lambda m: (nan_last(m["ratio"]), m["sample"]))
    threshold = embedder.default_copy_threshold if config.copy_threshold is None else config.copy_threshold
    return {
        "metrics": result.metrics,
        "matches": matches,
        "reference": {
            "n": len(refs),
            "manifest_sha256": refs.manifest_sha256,
            "skipped": [{"path": p, "reason": r} for p, r in refs.skipped],
            "embedded": index.computed,
            "from_cache": index.cached,
        },
        "samples": {"n": len(samples), "skipped": [{"path": p, "reason": r} for p, r in samples.skipped]},
        "embedder": embedder.spec(),
        "thresholds": {
            "mem_ratio": config.mem_ratio,
            "extraction_alpha": config.extraction_alpha,
            "extraction_n": config.extraction_n,
            "copy_threshold": threshold,
        },
    }


def score_identities(
    samples_dir: str | Path,
    reference_dir: str | Path,
    config: Any,
    *,
    cache: EmbeddingCache | None = None,
    resolution: int = 160,
    columns: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Identity leakage and interpolation of the faces in ``samples_dir`` against the training faces.

    Args:
        samples_dir: generated images.
        reference_dir: training images (identities from manifest labels, else clustered).
        config: a :class:`memwatch.faces.IdentityConfig`.
        cache: face-embedding cache for the training faces.
        resolution: side samples are normalised to before face detection.
        columns: as for :func:`score_folders`.

    Returns:
        ``{"metrics", "items", "gallery", "threshold", "matcher"}``, JSON-ready: ``threshold`` says how
        the verification threshold was chosen, ``matcher`` names the matcher and its weights' sha256.

    Example:
        >>> doc = score_identities("samples/", "faces.jsonl", IdentityConfig(weights="w.safetensors"))  # doctest: +SKIP
        >>> doc["metrics"]["identity_leak_rate"]  # doctest: +SKIP
        0.125
    """
    import torch

    from memwatch.data.images import load_image
    from memwatch.faces import build_gallery, identity_probe, load_face_pipeline
    from memwatch.faces.probe import check_instance

    refs = load_reference_set(reference_dir, what="reference folder", **(columns or {}))
    samples = load_reference_set(samples_dir, what="samples folder")
    gallery = build_gallery(refs, load_face_pipeline(config), config, cache=cache)
    check_instance(gallery, config)
    images = torch.stack([load_image(it.source, resolution) for it in samples.items])
    result = identity_probe(images, gallery, config, names=samples.ids)
    return {
        "metrics": result.metrics,
        "items": result.items,
        "gallery": gallery.assignments,
        "threshold": {k: v for k, v in gallery.summary().items() if k.startswith("threshold")},
        "matcher": gallery.pipeline.matcher.spec() if gallery.pipeline is not None else None,
    }


def format_summary(doc: dict[str, Any], top: int = 10) -> str:
    """A short human-readable table of the metrics and the ``top`` closest matches."""
    m = doc["metrics"]
    lines = [
        f"samples: {doc['samples']['n']} (skipped {len(doc['samples']['skipped'])})   "
        f"reference: {doc['reference']['n']} (skipped {len(doc['reference']['skipped'])}, "
        f"manifest {doc['reference']['manifest_sha256'][:12]})   embedder: {doc['embedder']['name']}",
        "",
        f"{'metric':<20}{'value':>10}",
    ]
    for name in (
        "mem_fraction",
        "extracted_fraction",
        "copy_fraction",
        "sim_p50",
        "sim_p95",
        "sim_max",
        "distinct_memorized",
    ):
        lines.append(f"{name:<20}{m[name]:>10.4f}")
    for what in ("samples", "reference"):
        for s in doc[what]["skipped"]:
            lines.append(f"skipped ({what}): {s['path']}: {s['reason']}")
    if top > 0:
        lines += ["", f"{'sample':<32}{'nearest training image':<32}{'d1':>8}{'ratio':>8}{'sim':>8}  flags"]
        for row in doc["matches"][:top]:
            flags = ",".join(k for k in ("memorized", "extracted", "copied") if row[k]) or "-"
            lines.append(
                f"{_clip(row['sample']):<32}{_clip(row['nn1']):<32}{row['d1']:>8.4f}{row['ratio']:>8.3f}"
                f"{row['similarity']:>8.4f}  {flags}"
            )
    return "\n".join(lines)


def _clip(s: str, width: int = 30) -> str:
    return s if len(s) <= width else "…" + s[-(width - 1) :]
