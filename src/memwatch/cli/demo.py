"""``memwatch demo``: train a small DDPM on the bundled images (CPU) and watch it start to memorize."""

from __future__ import annotations

import argparse

NAME = "demo"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="train a small DDPM on the bundled images (CPU) and watch it start to memorize",
        description="Train a small UNet2DModel DDPM on assets/demo/train with accelerate and the memwatch "
        "monitor, then write curves and a summary (output in runs/demo/: beside the source checkout when run "
        "inside one, else in the current folder; an installed package carries the images and the script).",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="train on the large control set instead (no regurgitation expected); runs/demo-control/",
    )
    p.add_argument(
        "--faces",
        action="store_true",
        help="train on face crops of the bundled public-domain portraits with the identity probe on (dlib, offline; "
        "needs memwatch[faces]): when the model starts to reproduce the people, and to blend them; runs/demo-faces/",
    )
    p.add_argument(
        "--drop-at-risk",
        action="store_true",
        help="turn on an intervention: after the first warning the batches leave out the training images memwatch "
        "names at risk (memwatch.interventions.ImageWeights); runs/demo-drop/",
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the demo recipe's)")
    p.add_argument(
        "--output-dir", default=None, help="default runs/demo, runs/demo-control, runs/demo-faces or runs/demo-drop"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.demo.run import format_demo_summary, run_demo

    summary = run_demo(control=args.control, faces=args.faces, steps=args.steps, output_dir=args.output_dir,
                       drop_at_risk=args.drop_at_risk)  # fmt: skip
    print(format_demo_summary(summary))
    return 0
