"""The options shared by the commands that read and compare images (``score`` and ``data``): the comparison
space, and how to read a reference set stored in a dataset, parquet files or tar shards."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from memwatch.errors import MemwatchError

if TYPE_CHECKING:  # torch comes with them: imported when a command runs, so --help stays fast
    from memwatch.data.embed_cache import EmbeddingCache
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


def add_reference_options(p: argparse.ArgumentParser) -> None:
    """``--image-column`` and ``--caption-column``, named like the diffusers training scripts' flags."""
    p.add_argument(
        "--image-column", default=None, help="datasets, parquet files, tar shards: the column with the images "
        "(the training script's --image_column; default image)",
    )  # fmt: skip
    p.add_argument(
        "--caption-column", default=None, help="the column with the captions (the training script's "
        "--caption_column; default text, then caption)",
    )  # fmt: skip


def columns_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The column settings given, as :func:`memwatch.data.refset.load_reference_set` keywords."""
    return {k: v for k in ("image_column", "caption_column") if (v := getattr(args, k, None))}


def check_exists(label: str, value: str) -> None:
    """A one-line error if ``value`` names no file or folder (``hf:NAME`` datasets are looked up later)."""
    from pathlib import Path

    if not value.startswith("hf:") and not Path(value).exists():
        raise MemwatchError(f"{label} {value} does not exist: pass a folder of images or a .jsonl manifest")


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
    from memwatch.data.embed_cache import EmbeddingCache

    return None if args.no_cache else EmbeddingCache(args.cache_dir)
