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
    if args.identity:
        from memwatch.faces import IdentityConfig
        from memwatch.score import score_identities

        faces = IdentityConfig(matcher=args.face_matcher, weights=args.face_weights)
        doc["identity"] = score_identities(args.samples, args.reference, faces, cache=cache)
        m = doc["identity"]["metrics"]
        print(
            f"\nfaces: detection rate {m['face_detection_rate']:.3f}, leak rate {m['identity_leak_rate']:.3f}, "
            f"identities leaked {m['identities_leaked']:.0f}, interpolation rate {m['identity_interpolation_rate']:.3f}"
        )
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")
        print(f"\nwrote {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from memwatch.demo import format_demo_summary, run_demo

    summary = run_demo(control=args.control, steps=args.steps, output_dir=args.output_dir)
    print(format_demo_summary(summary))
    return 0


def _cmd_curves(args: argparse.Namespace) -> int:
    from memwatch.curves import format_written, write_curves

    print(format_written(write_curves(args.run_dir, args.out, run=args.run)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from memwatch.report import report_schema, write_report

    if args.schema:
        print(json.dumps(report_schema(), indent=2, sort_keys=True))
        return 0
    if args.run_dir is None:
        raise MemwatchError("memwatch report needs RUN_DIR (or --schema)")
    paths = write_report(args.run_dir, args.output, args.json, args.pdf, redact=args.redact, run=args.run)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0


def _load_job_config(path: str):
    from memwatch.config import load_config

    if not Path(path).is_file():
        raise MemwatchError(f"--config {path} does not exist: pass a YAML file (see configs/default.yaml)")
    return load_config(path)


def _finish_jobs(reports: list, args: argparse.Namespace) -> int:
    from memwatch.jobs import fails

    for r in reports:
        state = (
            "locked by another job: nothing done"
            if r.locked
            else (
                f"probed {len(r.probed)}, already done {r.already_done}, failed {len(r.failed)}, "
                f"new events {len(r.new_events)}, last clean step {r.last_clean_step}"
            )
        )
        print(f"{r.run_dir}: {state}")
        for f in r.failed:
            print(f"  failed: {f['path']}: {f['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": [r.to_dict() for r in reports]}, indent=2, default=str) + "\n")
    return 1 if any(fails(r, args.fail_on) for r in reports) else 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from memwatch.jobs import probe_run_dir

    config = _load_job_config(args.config)
    return _finish_jobs([probe_run_dir(d, config, wait=args.wait) for d in args.run_dirs], args)


def _cmd_watch(args: argparse.Namespace) -> int:
    from memwatch.jobs import watch_run_dir

    config = _load_job_config(args.config)
    report = watch_run_dir(
        args.run_dir, config, quiet_period=args.quiet_period, poll=args.poll, idle_timeout=args.idle_timeout
    )
    return _finish_jobs([report], args)


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="memwatch YAML config (reference, holdout, probes, rules)")
    p.add_argument(
        "--fail-on",
        choices=("info", "warning", "critical"),
        default=None,
        help="exit 1 if the run holds an event at or above this severity",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="write a JSON summary")


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
    p.add_argument(
        "--identity",
        action="store_true",
        help="also run the face identity probe (leakage and interpolation; needs matcher weights)",
    )
    p.add_argument(
        "--face-matcher",
        choices=("vggface2", "casia-webface"),
        default="vggface2",
        help="InceptionResnetV1 weights to match faces with (default vggface2)",
    )
    p.add_argument("--face-weights", default=None, help="local matcher weights file (default: the torch hub cache)")
    p.add_argument("--json", metavar="OUT", help="also write all metrics and matches as JSON")
    p.add_argument("--top", type=int, default=10, metavar="N", help="matches shown in the table (default 10)")
    p.add_argument(
        "--cache-dir", default=None, help="embedding cache folder (default $MEMWATCH_CACHE_DIR or ~/.cache/memwatch)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "demo",
        help="train a small DDPM on the bundled images (CPU) and watch it start to memorize",
        description="Train a small UNet2DModel DDPM on assets/demo/train with accelerate and the memwatch "
        "monitor, then write curves and a summary (output in runs/demo/). Needs the source checkout.",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="train on the large control set instead (no regurgitation expected); runs/demo-control/",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--output-dir", default=None, help="default runs/demo or runs/demo-control")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "curves",
        help="draw memorization curves and CSVs from a run's store",
        description="Write curves.png, seeds.png and CSVs (metrics by step, per-seed trajectories, first step "
        "each training image was regurgitated, events) from RUN_DIR's memwatch store.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training output dir (with memwatch/) or the memwatch folder")
    p.add_argument("--out", default=None, help="output folder (default: <memwatch folder>/curves)")
    p.add_argument("--run", default=None, help="run name in the store (default: the most recent)")
    p.set_defaults(func=_cmd_curves)

    p = sub.add_parser(
        "probe",
        help="probe every checkpoint folder of one or more runs that has no result for this config (cron)",
        description="Probe each snapshot under RUN_DIR (checkpoint-<step>/ folders, oldest first, then the final "
        "model) that has no result for this config yet; results go to RUN_DIR/memwatch/. Running it again does "
        "nothing; a killed job is finished by the next one; a second job on the same RUN_DIR exits at once.",
    )
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="training output folder(s)")
    _job_options(p)
    p.add_argument("--wait", action="store_true", help="wait for another job's lock instead of exiting")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser(
        "watch",
        help="follow a training run beside the training script and probe each new checkpoint",
        description="Probe each new checkpoint-<step>/ in RUN_DIR once its files are complete and unchanged for "
        "--quiet-period seconds; tolerates checkpoint rotation; stops after the final model is probed or after "
        "--idle-timeout seconds without a new snapshot. Writes only to RUN_DIR/memwatch/.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training output folder (may not exist yet)")
    _job_options(p)
    p.add_argument("--quiet-period", type=float, default=30.0, help="seconds a checkpoint must stay unchanged")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks at RUN_DIR")
    p.add_argument("--idle-timeout", type=float, default=3600.0, help="stop after this long without a new snapshot")
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser(
        "report",
        help="write a self-contained audit report (HTML, JSON, PDF) from a run's store",
        description="Audit report for provenance and trust-and-safety review: verdicts per checkpoint, curves, "
        "evidence, provenance (hashes, config, versions) and limitations, rebuilt from the store alone. "
        "The HTML makes no external requests.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="training output dir (with memwatch/) or the memwatch folder"
    )
    p.add_argument("-o", "--output", default=None, help="HTML file (default: report.html beside the store)")
    p.add_argument("--json", default=None, help="also write the report as JSON (see --schema)")
    p.add_argument("--pdf", default=None, help="also print the report to PDF through headless Chromium")
    p.add_argument("--redact", action="store_true", help="no training or generated pixels: evidence as ids and scores")
    p.add_argument("--run", default=None, help="run name in the store (default: the most recent)")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of --json output and exit")
    p.set_defaults(func=_cmd_report)
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
