"""The comparison-space options shared by the commands that compare images (``score`` and ``data``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from memwatch.errors import MemwatchError

if TYPE_CHECKING:  # torch comes with them: imported when a command runs, so --help stays fast
    from memwatch.embed_cache import EmbeddingCache
    from memwatch.embedders.base import Embedder


def add_embedder_options(p: argparse.ArgumentParser, default_resolution: int) -> None:
    """``--embedder``, ``--resolution``, ``--tiled``, ``--clip-model``, ``--clip-pretrained``, the cache options."""
    p.add_argument("--embedder", choices=("pixel", "clip"), default="pixel", help="comparison space (default pixel)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"side length images are normalised to (pixel default {default_resolution}; clip: the model's own)",
    )
    p.add_argument("--tiled", action="store_true", help="pixel: Carlini's tiled l2 (max over a 4x4 grid)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    p.add_argument(
        "--clip-pretrained", default="openai", help="open_clip pretrained tag, or a local weights file (default openai)"
    )
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default $MEMWATCH_CACHE_DIR or ~/.cache/memwatch)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.set_defaults(default_resolution=default_resolution)


def embedder_from_args(args: argparse.Namespace) -> Embedder:
    """The embedder the options name (one-line errors for bad combinations)."""
    from memwatch.embedders import make_embedder

    if args.resolution is not None and args.resolution < 1:
        raise MemwatchError(f"--resolution {args.resolution}: give a side length in pixels >= 1")
    if args.embedder == "pixel":
        return make_embedder("pixel", resolution=args.resolution or args.default_resolution, tiled=args.tiled)
    if args.resolution is not None:
        raise MemwatchError("--resolution applies to --embedder pixel only: clip uses its model's input size")
    return make_embedder("clip", model=args.clip_model, pretrained=args.clip_pretrained)


def cache_from_args(args: argparse.Namespace) -> EmbeddingCache | None:
    """The embedding cache the options ask for, or None with ``--no-cache``."""
    from memwatch.embed_cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache(args.cache_dir)
