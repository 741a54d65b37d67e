"""``memwatch score SAMPLES_DIR REFERENCE_DIR``: score a folder of generated images against the training images."""

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
from memwatch.faces.config import MATCHERS
from memwatch.output import write_output

NAME = "score"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="score a folder of generated images against the training images",
        description="Regurgitation metrics (mem_fraction, extraction, copy fraction, similarity percentiles) "
        "for generated images against a reference (training) set.",
    )
    p.add_argument("samples", metavar="SAMPLES_DIR", help="generated images (folder or .jsonl manifest)")
    p.add_argument(
        "reference", metavar="REFERENCE_DIR", help="training images (folder, imagefolder, .jsonl, hf:NAME, a "
        "save_to_disk folder, parquet files or tar shards)",
    )  # fmt: skip
    add_embedder_options(p, default_resolution=64)
    add_reference_options(p)
    p.add_argument(
        "--copy-threshold",
        type=float,
        default=None,
        help="similarity counted as a copy (default: the embedder's, see docs)",
    )
    p.add_argument(
        "--identity",
        action="store_true",
        help="also run the face identity probe (leakage and interpolation of training people; REFERENCE_DIR "
        "holds their faces, best as a .jsonl manifest with identity labels)",
    )
    p.add_argument(
        "--matcher",
        "--face-matcher",
        dest="face_matcher",
        choices=MATCHERS,
        default="auto",
        help="face matcher: dlib (offline, from memwatch[faces]), vggface2 or casia-webface (InceptionResnetV1 "
        "weights from the torch hub cache or --face-weights); auto: dlib when installed (default)",
    )
    p.add_argument(
        "--face-weights",
        default=None,
        help="dlib: a folder with its model files (default: the face_recognition_models package); FaceNet: a local "
        "weights file (default: the torch hub cache)",
    )
    p.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="PERSON",
        help="with --identity: a person the samples are meant to show (a DreamBooth or LoRA subject, by identity "
        "label; repeatable): their faces are counted apart (instance_faces), not as leaks",
    )
    p.add_argument("--json", metavar="OUT", help="also write all metrics and matches as JSON")
    p.add_argument("--top", type=int, default=10, metavar="N", help="matches shown in the table (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.frontends.score import format_summary, score_folders
    from memwatch.probes.regurgitation import RegurgitationConfig

    if args.top < 0:
        raise MemwatchError(f"--top {args.top}: give a number of matches >= 0")
    for label, folder in (("SAMPLES_DIR", args.samples), ("REFERENCE_DIR", args.reference)):
        check_exists(label, folder)
    columns = columns_from_args(args)
    embedder = embedder_from_args(args)
    cache = cache_from_args(args)
    config = RegurgitationConfig(copy_threshold=args.copy_threshold)
    doc = score_folders(args.samples, args.reference, embedder, cache=cache, config=config, columns=columns)
    print(format_summary(doc, top=args.top))
    if args.identity:
        from memwatch.faces import IdentityConfig
        from memwatch.frontends.score import score_identities

        faces = IdentityConfig(matcher=args.face_matcher, weights=args.face_weights, instance=tuple(args.instance))
        doc["identity"] = score_identities(args.samples, args.reference, faces, cache=cache, columns=columns)
        m = doc["identity"]["metrics"]
        print(
            f"\nfaces: detection rate {m['face_detection_rate']:.3f}, leak rate {m['identity_leak_rate']:.3f}, "
            f"identities leaked {m['identities_leaked']:.0f}, interpolation rate {m['identity_interpolation_rate']:.3f}"
            + (f", faces of {', '.join(args.instance)} {m['instance_faces']:.0f}" if args.instance else "")
        )
    if args.json:
        out = write_output(args.json, json.dumps(doc, indent=2, allow_nan=True) + "\n", "--json")
        print(f"\nwrote {out}")
    return 0
