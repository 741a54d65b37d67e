"""The ``memwatch`` command line.

Exit codes (DESIGN.md): 0 ran and nothing at or above ``--fail-on``; 1 a warning at or above
``--fail-on``; 2 bad usage or bad input, with a one-line reason and no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from memwatch import __version__
from memwatch.errors import MemwatchError


def _cmd_score(args: argparse.Namespace) -> int:
    from memwatch.embed_cache import EmbeddingCache
    from memwatch.embedders import make_embedder
    from memwatch.probes.regurgitation import RegurgitationConfig
    from memwatch.score import format_summary, score_folders

    for label, folder in (("SAMPLES_DIR", args.samples), ("REFERENCE_DIR", args.reference)):
        if not Path(folder).exists():
            raise MemwatchError(f"{label} {folder} does not exist: pass a folder of images or a .jsonl manifest")
    if args.embedder == "pixel":
        embedder = make_embedder("pixel", resolution=args.resolution or 64, tiled=args.tiled)
    else:
        if args.resolution is not None:
            raise MemwatchError("--resolution applies to --embedder pixel only: clip uses its model's input size")
        embedder = make_embedder("clip", model=args.clip_model, pretrained=args.clip_pretrained)
    cache = None if args.no_cache else EmbeddingCache(args.cache_dir)
    config = RegurgitationConfig(copy_threshold=args.copy_threshold)
    doc = score_folders(args.samples, args.reference, embedder, cache=cache, config=config)
    print(format_summary(doc, top=args.top))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
        print(f"\nwrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help`` in the README)."""
    parser = argparse.ArgumentParser(
        prog="memwatch",
        description="Watch diffusion models for memorization of training images.",
    )
    parser.add_argument("--version", action="version", version=f"memwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "score",
        help="score a folder of generated images against the training images",
        description="Regurgitation metrics (mem_fraction, extraction, copy fraction, similarity percentiles) "
        "for generated images against a reference (training) set.",
    )
    p.add_argument("samples", metavar="SAMPLES_DIR", help="generated images (folder or .jsonl manifest)")
    p.add_argument("reference", metavar="REFERENCE_DIR", help="training images (folder, imagefolder or .jsonl)")
    p.add_argument("--embedder", choices=("pixel", "clip"), default="pixel", help="comparison space (default pixel)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="side length images are normalised to (pixel default 64; clip: the model's own)",
    )
    p.add_argument("--tiled", action="store_true", help="pixel: Carlini's tiled l2 (max over a 4x4 grid)")
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name (default ViT-B-32)")
    p.add_argument(
        "--clip-pretrained", default="openai", help="open_clip pretrained tag, or a local weights file (default openai)"
    )
    p.add_argument(
        "--copy-threshold",
        type=float,
        default=None,
        help="similarity counted as a copy (default: the embedder's, see docs)",
    )
    p.add_argument("--json", metavar="OUT", help="also write all metrics and matches as JSON")
    p.add_argument("--top", type=int, default=10, metavar="N", help="matches shown in the table (default 10)")
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default $MEMWATCH_CACHE_DIR or ~/.cache/memwatch)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.set_defaults(func=_cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memwatch`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="memwatch: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except MemwatchError as e:
        print(f"memwatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memwatch: interrupted; everything recorded so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
