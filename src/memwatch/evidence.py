"""Evidence images: each flagged sample beside its nearest training image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from memwatch.images import load_image, tensor_to_pil

CELL = 96  # pixels per image in the grid: small samples are upscaled so a reviewer can see them
LABEL_H = 14


def save_evidence_grid(
    path: str | Path,
    samples: torch.Tensor,
    matches: Sequence[dict[str, Any]],
    reference_paths: dict[str, Path],
    *,
    top: int = 8,
) -> Path | None:
    """Write a PNG with the ``top`` closest samples (lowest ratio) beside their nearest training images.

    Args:
        path: output PNG path (parent folders are created).
        samples: the probe's samples ``(N, 3, H, W)`` in [0, 1], aligned with ``matches``.
        matches: the probe's match rows (``nn1``, ``ratio``, ``seed``, ``memorized``).
        reference_paths: training id -> image file.
        top: pairs shown.

    Returns:
        The path written, or None when there is nothing to show.

    Example:
        >>> save_evidence_grid("evidence/step-1000.png", samples, result.matches, paths)  # doctest: +SKIP
    """
    order = sorted(range(len(matches)), key=lambda i: (_nan_last(matches[i]["ratio"]), i))[:top]
    if not order:
        return None
    grid = Image.new("RGB", (2 * CELL, len(order) * (CELL + LABEL_H)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for row, i in enumerate(order):
        m = matches[i]
        y = row * (CELL + LABEL_H)
        grid.paste(tensor_to_pil(samples[i]).resize((CELL, CELL), Image.Resampling.NEAREST), (0, y + LABEL_H))
        ref = load_image(reference_paths[m["nn1"]], samples.shape[-1])
        grid.paste(tensor_to_pil(ref).resize((CELL, CELL), Image.Resampling.NEAREST), (CELL, y + LABEL_H))
        flag = "MEM" if m["memorized"] else "   "
        draw.text((2, y + 1), f"{flag} seed {m['seed']} r={m['ratio']:.2f}", fill=(200, 0, 0) if m["memorized"] else 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _nan_last(x: float) -> float:
    return float("inf") if x != x else x
