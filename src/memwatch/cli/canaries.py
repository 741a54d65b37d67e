"""``memwatch canaries plant|check``: plant duplicated training images, then see when the monitor caught them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memwatch.output import write_output

NAME = "canaries"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="plant duplicated canary images into a copy of a training set; check when a run caught them",
        description="'plant' copies an image folder and duplicates a few images 2, 4, 8... times (byte copies; "
        "duplicated images are memorized first, Carlini et al. 2023) and writes a manifest. Train on the copy "
        "with memwatch on; 'check' reads the run's store and prints, per canary, when it was first at risk "
        "(copied, or forecast to be) and first copied, beside the other images.",
    )
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    plant = actions.add_parser("plant", help="copy REFERENCE to OUT with duplicated canaries")
    plant.add_argument("reference", metavar="REFERENCE", help="training image folder")
    plant.add_argument("out", metavar="OUT", help="new folder for the planted copy")
    plant.add_argument("--levels", type=int, nargs="+", default=[2, 4, 8], help="copies per canary (default 2 4 8)")
    plant.add_argument("--per-level", type=int, default=1, help="canaries per level (default 1)")
    plant.add_argument("--seed", type=int, default=0, help="which images become canaries (default 0)")
    plant.add_argument("--manifest", default=None, help="manifest path (default OUT-canaries.json beside OUT)")
    check = actions.add_parser("check", help="when each canary was first at risk and first copied in a run")
    check.add_argument("run_dir", metavar="RUN_DIR", help="the run trained on the planted folder (with memwatch/)")
    check.add_argument("manifest", metavar="MANIFEST", help="the manifest 'plant' wrote")
    check.add_argument("--run", default=None, help="run name in the store (default: the latest)")
    check.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON")


def run(args: argparse.Namespace) -> int:
    from memwatch.frontends.canaries import check_canaries, default_manifest, plant_canaries

    if args.action == "plant":
        doc = plant_canaries(
            args.reference, args.out, levels=args.levels, per_level=args.per_level, seed=args.seed,
            manifest=args.manifest,
        )  # fmt: skip
        for c in doc["canaries"]:
            print(f"canary {c['id']}: {c['copies']} copies")
        print(f"wrote {args.out} and {args.manifest or default_manifest(Path(args.out))}")
        return 0
    result = check_canaries(args.run_dir, args.manifest, run=args.run)
    first, last = result["steps"]
    print(f"probed steps {first}-{last}")
    for c in result["canaries"]:
        print(
            f"canary {c['id']} (x{c['copies']}): first at risk {_step(c['first_at_risk_step'])}, "
            f"first copied {_step(c['first_copy_step'])}"
        )
    o = result["others"]
    print(
        f"other images: {o['copied']} of {o['images']} copied; median first copy {_step(o['median_first_copy_step'])}, "
        f"median first at risk {_step(o['median_first_at_risk_step'])}"
    )
    if args.json:
        write_output(args.json, json.dumps(result, indent=2) + "\n", "--json")
    return 0


def _step(step: float | None) -> str:
    if step is None:
        return "-"
    return f"step {step:.0f}"
