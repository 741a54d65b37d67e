"""``memwatch data REFERENCE``: exact and near duplicates, and isolated images, in a training set."""

from __future__ import annotations

import argparse
import json

from memwatch.cli.embedder_options import (
    add_embedder_options,
    add_reference_options,
    cache_from_args,
    check_exists,
    columns_from_args,
    embedder_from_args,
)
from memwatch.errors import MemwatchError
from memwatch.output import write_output

NAME = "data"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="find exact and near duplicates and isolated images in a training set",
        description="Analyse a training set before training: exact duplicates (same bytes), near duplicates "
        "(the same photo re-encoded, resized, slightly shifted or cropped: normalised cross-correlation "
        "after aligning shift and zoom), grouped, and isolated images (nearest image in the embedder's "
        "space beyond Tukey's fence). Duplicated images are memorized first (Carlini et al. 2023).",
    )
    p.add_argument(
        "reference", metavar="REFERENCE", help="training images (folder, imagefolder, .jsonl, hf:NAME, a "
        "save_to_disk folder, parquet files or tar shards)",
    )  # fmt: skip
    add_embedder_options(p, default_resolution=32)
    add_reference_options(p)
    p.add_argument(
        "--near-threshold",
        type=float,
        default=None,
        help="aligned correlation a near-duplicate pair must reach (default 0.753, measured "
        "on real photos: scripts/bench_near_duplicates.py)",
    )
    p.add_argument("--json", metavar="OUT", help="also write every group, isolated image and nearest neighbour")
    p.add_argument("--top", type=int, default=10, metavar="N", help="groups and images listed (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.data.refset import load_reference_set
    from memwatch.data.training_set import analyse_training_set, format_analysis

    if args.top < 0:
        raise MemwatchError(f"--top {args.top}: give a number of groups >= 0")
    if args.near_threshold is not None and not 0 < args.near_threshold <= 1:
        raise MemwatchError(f"--near-threshold {args.near_threshold}: give a similarity in (0, 1]")
    check_exists("REFERENCE", args.reference)
    refs = load_reference_set(args.reference, what="REFERENCE", **columns_from_args(args))
    result = analyse_training_set(
        refs, embedder_from_args(args), cache_from_args(args), near_threshold=args.near_threshold
    )
    print(format_analysis(result, top=args.top))
    if args.json:
        out = write_output(args.json, json.dumps(result.to_dict(), indent=2) + "\n", "--json")
        print(f"wrote {out}")
    return 0
