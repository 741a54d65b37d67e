"""``memwatch forecast PILOT... --n N``: predict a run's memorization onset from short pilot runs."""

from __future__ import annotations

import argparse

NAME = "forecast"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="predict the onset step for N training images from pilot runs on smaller subsets",
        description="Read the memwatch stores of a few short pilot runs on subsets of different size, fit the "
        "onset step against the training-set size (onset grows linearly with n: Bonnaire et al. 2025) and "
        "predict the onset for N images with a 90%% prediction interval. A pilot's onset is the first probe "
        "with mem_fraction >= --onset-fraction, else its last onset forecast.",
    )
    p.add_argument("pilots", metavar="PILOT", nargs="+", help="pilot run folders (with memwatch/) or their stores")
    p.add_argument("--n", type=int, required=True, help="training images of the run to plan")
    p.add_argument("--onset-fraction", type=float, default=None, help="mem_fraction that marks onset (default 0.05)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the prediction as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from memwatch.errors import MemwatchError
    from memwatch.output import write_output
    from memwatch.views.planning import ONSET_FRACTION, forecast_from_stores

    fraction = ONSET_FRACTION if args.onset_fraction is None else args.onset_fraction
    if not 0 < fraction <= 1:
        raise MemwatchError(f"--onset-fraction {fraction}: give a share of samples in (0, 1]")
    plan = forecast_from_stores(args.pilots, target_n=args.n, onset_fraction=fraction)
    for p in plan.pilots:
        onset = "-" if p.onset_step is None else f"{p.onset_step:.0f}"
        print(f"pilot {p.run}: n={p.n}, onset {onset} ({p.source})")
    print(
        f"onset = {plan.intercept:.0f} + {plan.slope:.2f} x n (R² {plan.r2:.3f}): for n={plan.target_n}, onset at "
        f"step {plan.onset:.0f} (90% interval {plan.low:.0f}-{plan.high:.0f})"
    )
    if args.json:
        write_output(args.json, json.dumps(plan.to_dict(), indent=2) + "\n", "--json")
    return 0
