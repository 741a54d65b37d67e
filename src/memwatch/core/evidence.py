"""Evidence images: each flagged generated sample beside the training image it resembles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from memwatch.data.images import load_image, tensor_to_pil

CELL = 96  # pixels per image in the grid: small samples are upscaled so a reviewer can see them
LABEL_H = 14


@dataclass(frozen=True)
class EvidencePair:
    """One row of an evidence grid.

    Attributes:
        sample: index of the sample in the probe's sample batch.
        training_id: id of the training image shown beside it.
        rank: sort key, smaller first (e.g. the d1/d2 ratio, or 1 - similarity).
        label: text above the pair.
        flagged: drawn in red (memorized, leaked...).
    """

    sample: int
    training_id: str
    rank: float
    label: str
    flagged: bool


def save_evidence_grid(
    path: str | Path,
    samples: torch.Tensor,
    pairs: Sequence[EvidencePair],
    reference_paths: Mapping[str, Any],
    *,
    top: int = 8,
) -> Path | None:
    """Write a PNG with the ``top`` best-ranked pairs: sample on the left, training image on the right.

    Args:
        path: output PNG path (parent folders are created).
        samples: the probe's samples ``(N, 3, H, W)`` in [0, 1].
        pairs: rows to choose from (see :class:`EvidencePair`).
        reference_paths: training id -> its image: a file, or a :class:`~memwatch.data.refset.ReferenceItem`
            (whose ``source`` may be inside a tar shard or a parquet file).
        top: pairs shown.

    Returns:
        The path written, or None when there is nothing to show.

    Example:
        >>> save_evidence_grid("ev/step-1000.png", samples, regurgitation_pairs(r.matches), paths)  # doctest: +SKIP
    """
    chosen = sorted(pairs, key=lambda p: (p.rank, p.sample))[:top]
    if not chosen:
        return None
    grid = Image.new("RGB", (2 * CELL, len(chosen) * (CELL + LABEL_H)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, pair in enumerate(chosen):
        y = row * (CELL + LABEL_H)
        grid.paste(tensor_to_pil(samples[pair.sample]).resize((CELL, CELL), Image.Resampling.NEAREST), (0, y + LABEL_H))
        image = reference_paths[pair.training_id]
        ref = load_image(getattr(image, "source", image), samples.shape[-1])
        grid.paste(tensor_to_pil(ref).resize((CELL, CELL), Image.Resampling.NEAREST), (CELL, y + LABEL_H))
        draw.text((2, y + 1), pair.label, fill=(200, 0, 0) if pair.flagged else (0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def nan_last(x: float | None) -> float:
    """Sort key that puts undefined values (None, NaN) after every number."""
    return float("inf") if x is None or x != x else float(x)
