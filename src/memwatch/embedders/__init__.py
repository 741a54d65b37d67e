"""Embedders turn images into vectors that probes compare; pick one by name with :func:`make_embedder`.

``pixel`` needs nothing beyond torch. ``clip`` (open_clip) is imported only when asked for, so
``import memwatch`` stays light.
"""

from __future__ import annotations

from typing import Any

from memwatch.embedders.base import Embedder
from memwatch.errors import MemwatchError

EMBEDDERS = ("pixel", "clip")


def make_embedder(name: str, **options: Any) -> Embedder:
    """Build an embedder from its name and options.

    Args:
        name: ``"pixel"`` or ``"clip"``.
        **options: passed to the embedder's constructor (e.g. ``resolution``, ``tiled`` for pixel;
            ``model``, ``pretrained`` for clip). ``None`` values are dropped so defaults apply.

    Example:
        >>> make_embedder("pixel", resolution=32).spec()
        {'name': 'pixel', 'resolution': 32, 'tiled': False}
    """
    options = {k: v for k, v in options.items() if v is not None}
    try:
        if name == "pixel":
            from memwatch.embedders.pixel import PixelEmbedder

            return PixelEmbedder(**options)
        if name == "clip":
            from memwatch.embedders.clip import ClipEmbedder

            return ClipEmbedder(**options)
    except TypeError as e:
        raise MemwatchError(f"embedder '{name}': unsupported option ({e}); check the embedder settings") from None
    raise MemwatchError(f"embedder '{name}' is unknown: choose one of {', '.join(EMBEDDERS)}")


__all__ = ["EMBEDDERS", "Embedder", "make_embedder"]
