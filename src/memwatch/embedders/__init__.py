"""Embedders turn images into vectors that probes compare; one is chosen by the ``embedder`` settings.

``pixel`` needs nothing beyond torch. ``clip`` (open_clip) is imported only when asked for, so
``import memwatch`` stays light. ``embedder.name`` may also be the import path ``module:Class`` of
your own :class:`~memwatch.embedders.base.Embedder` subclass (one file, nothing else to edit): it
is built with its ``from_settings`` class method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memwatch.embedders.base import Embedder
from memwatch.errors import MemwatchError
from memwatch.plugins import load_class
from memwatch.settings import Settings, setting

#: Built-in embedders: name -> import path.
BUILTIN_EMBEDDERS = {
    "pixel": "memwatch.embedders.pixel:PixelEmbedder",
    "clip": "memwatch.embedders.clip:ClipEmbedder",
}
EMBEDDERS = tuple(BUILTIN_EMBEDDERS)


@dataclass
class EmbedderConfig(Settings):
    """Which embedder the probes compare images with, and its options."""

    section = "embedder"
    name: str = setting("pixel", "pixel | clip, or the import path module:Class of your own Embedder")
    resolution: int | None = setting(
        None, "pixel: side images are compared at (null: the model's sample size); clip: its model's input size", min=1
    )
    tiled: bool = setting(False, "pixel: Carlini et al. 2023 tiled l2 (max over a 4x4 grid of tiles)")
    model: str = setting("ViT-B-32", "clip: open_clip model name")
    pretrained: str = setting("openai", "clip: pretrained tag (from the local hub cache) or a local weights file")
    copy_threshold: float | None = setting(
        None, "similarity counted as a copy; null: the embedder's own default", min=-1.0, max=1.0
    )


def embedder_class(name: str) -> type[Embedder]:
    """The embedder class of a built-in name or an import path.

    Example:
        >>> embedder_class("pixel").__name__
        'PixelEmbedder'
    """
    return load_class(name, BUILTIN_EMBEDDERS, Embedder, "embedder")


def build_embedder(settings: EmbedderConfig, default_resolution: int | None = None) -> Embedder:
    """The embedder the settings describe.

    Args:
        settings: the ``embedder`` section.
        default_resolution: the model's image resolution (pixel's default).

    Example:
        >>> build_embedder(EmbedderConfig(), default_resolution=32).spec()
        {'name': 'pixel', 'resolution': 32, 'tiled': False}
    """
    return embedder_class(settings.name).from_settings(settings, default_resolution)


def make_embedder(name: str, **options: Any) -> Embedder:
    """Build an embedder from its name and constructor options.

    Args:
        name: ``"pixel"``, ``"clip"`` or an import path.
        **options: passed to the embedder's constructor (e.g. ``resolution``, ``tiled`` for pixel;
            ``model``, ``pretrained`` for clip). ``None`` values are dropped so defaults apply.

    Example:
        >>> make_embedder("pixel", resolution=32).spec()
        {'name': 'pixel', 'resolution': 32, 'tiled': False}
    """
    cls = embedder_class(name)
    try:
        return cls(**{k: v for k, v in options.items() if v is not None})
    except TypeError as e:
        raise MemwatchError(f"embedder '{name}': unsupported option ({e}); check the embedder settings") from None


__all__ = ["EMBEDDERS", "EmbedderConfig", "Embedder", "build_embedder", "embedder_class", "make_embedder"]
