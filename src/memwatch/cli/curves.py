"""``memwatch curves RUN_DIR``: draw memorization curves and CSVs from a run's store."""

from __future__ import annotations

import argparse

NAME = "curves"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="draw memorization curves and CSVs from a run's store",
        description="Write curves.png, seeds.png and CSVs (metrics by step, per-seed trajectories, first step "
        "each training image was regurgitated, events) from RUN_DIR's memwatch store.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training output dir (with memwatch/) or the memwatch folder")
    p.add_argument("--out", default=None, help="output folder (default: <memwatch folder>/curves)")
    p.add_argument("--run", default=None, help="run name in the store (default: the most recent)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.views.curves import format_written, write_curves

    print(format_written(write_curves(args.run_dir, args.out, run=args.run)))
    return 0
