"""Deterministic test images (imported by tests and conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(seed: int, size: int = 32) -> np.ndarray:
    """A deterministic smooth colour image (uint8 HxWx3): random 4x4 colours upsampled bicubically.

    Smooth images behave like photos for pixel distances (unlike white noise, where every pair is
    equally far apart).
    """
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), mode="RGB")
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def write_images(folder: Path, seeds: list[int], size: int = 32, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in seeds:
        p = folder / f"{prefix}{s:03d}.png"
        Image.fromarray(smooth_image(s, size)).save(p)
        paths.append(p)
    return paths
