#!/usr/bin/env python
"""The intervention benchmark: does acting on memwatch's warning delay copying, and what does it cost?

Each (n, seed) of the warning benchmark's recipe (``scripts/bench_warnings.py``: the 16x16 DDPM, memwatch's
monitor at its defaults, the dense truth every 50 steps) is trained once per arm, for the whole step budget:

* ``none``: as the warning benchmark trains it (the baseline);
* ``drop``: :class:`memwatch.interventions.ImageWeights` — once the first warning fires, the images memwatch
  names at risk get weight 0 in the batch draw;
* ``gate``: :class:`memwatch.interventions.LossGate` — examples whose loss falls below half the running mean at
  their timestep get weight 0 in the loss, from the first step;
* ``rollback``: at the first warning, :func:`memwatch.interventions.rollback` to the last clean checkpoint
  (saved every 50 steps), and the images at risk dropped as in ``drop``.

Every arm trains exactly as ``none`` until its intervention first changes something, so an arm and its
baseline are the same run up to that step. Per run: the onset (first dense probe with 5% of 64 samples
copying), the first warning, when the intervention acted, the final ``mem_fraction``, and quality at the end
without downloaded weights: the held-out denoising loss and a kernel distance (KID's unbiased estimator) of
256 samples against the family's images the run never saw, in pixel space (``bench_warnings.final_quality``).

    python scripts/bench_interventions.py --tune --jobs 2 --json runs/interventions_tune.json
    python scripts/bench_interventions.py --jobs 2 --json docs/bench_interventions.json

Goal (issue 25): onset delayed at least 2x or avoided within the budget, at no more than 5% quality cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_warnings as bw  # noqa: E402

ARMS = ("none", "drop", "gate", "rollback")
#: the seeds the arms' settings may be tuned on, and the ones reported (disjoint, as the warning benchmark's)
TUNE = {"sizes": [8, 16], "seeds": [100, 101]}
REPORT = {"sizes": [8, 16], "seeds": [0, 1, 2]}
#: long enough for a 2x delay of these sizes' onsets (about 700-1,300 steps in the warning sweep)
STEPS = 3000


def specs(sizes: list[int], seeds: list[int], arms: list[str], steps: int, out: Path) -> list[bw.RunSpec]:
    """One run per (n, seed, arm), each arm in its own folder ``out/<arm>/n<n>-s<seed>``."""
    base = [bw.RunSpec(n=n, seed=seed, steps=steps, out="", full_budget=True) for n in sizes for seed in seeds]
    return [replace(spec, out=str(out / arm), intervention=arm) for spec in base for arm in arms]


def analyse(out: Path, arms: list[str]) -> list[dict[str, Any]]:
    """One row per run folder found: the truth, the first warning, what the arm changed, quality."""
    rows = []
    for arm in arms:
        for run_dir in sorted((out / arm).glob("n*-s*")):
            if not (run_dir / "truth.json").is_file():
                continue
            data = json.loads((run_dir / "truth.json").read_text())
            warnings = bw.warnings_of(run_dir)
            acted = [c.get("step") for c in data.get("interventions", []) if c.get("step") is not None]
            rows.append({
                "arm": arm, "n": data["n"], "seed": data["seed"], "steps_trained": data["steps_trained"],
                "onset_step": data["onset_step"], "first_copy_step": data["first_copy_step"],
                "first_warning_step": warnings[0]["step"] if warnings else None,
                "acted_step": min(acted) if acted else None, "changes": data.get("interventions", []),
                "final_mem_fraction": data["truth"]["mem_fraction"][-1] if data["truth"]["mem_fraction"] else None,
                **{k: (data.get("quality") or {}).get(k) for k in ("kid", "holdout_loss")},
                "wall_s": data["wall_s"], "measured": data.get("measured"),
            })  # fmt: skip
    return rows


def compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm against ``none`` on the same (n, seed): onset delay, avoided onsets, quality change."""
    base = {(r["n"], r["seed"]): r for r in rows if r["arm"] == "none"}
    out: dict[str, Any] = {}
    for arm in sorted({r["arm"] for r in rows} - {"none"}):
        pairs = [(r, base[(r["n"], r["seed"])]) for r in rows if r["arm"] == arm and (r["n"], r["seed"]) in base]
        delays, avoided, met, loss_cost, kid_change = [], 0, 0, [], []
        for r, b in pairs:
            if b["onset_step"] is None:
                pass  # the baseline did not memorize within the budget: nothing to delay, quality still counts
            elif r["onset_step"] is None:
                avoided += 1
                met += 1
            else:
                delays.append(r["onset_step"] / b["onset_step"])
                met += r["onset_step"] >= 2 * b["onset_step"]
            if r["holdout_loss"] is not None and b["holdout_loss"]:
                loss_cost.append(r["holdout_loss"] / b["holdout_loss"] - 1)
            if r["kid"] is not None and b["kid"] is not None:
                kid_change.append(r["kid"] - b["kid"])
        out[arm] = {
            "runs": len(pairs),
            "avoided": avoided,
            "delayed_2x_or_avoided": met,
            "median_delay": round(statistics.median(delays), 3) if delays else None,
            "median_holdout_loss_cost": round(statistics.median(loss_cost), 4) if loss_cost else None,
            "median_kid_change": round(statistics.median(kid_change), 6) if kid_change else None,
        }
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| n | seed | arm | onset | first warning | acted at | final mem_fraction | holdout loss | KID |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["n"], r["seed"], ARMS.index(r["arm"]))):
        cells = [r["n"], r["seed"], r["arm"], r["onset_step"], r["first_warning_step"], r["acted_step"],
                 r["final_mem_fraction"], r["holdout_loss"], r["kid"]]  # fmt: skip
        lines.append("| " + " | ".join("-" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c)
                                       for c in cells) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tune", action="store_true", help=f"the tuning seeds {TUNE} instead of the reporting ones")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/bench_interventions")
    p.add_argument("--analyse", action="store_true", help="only re-read the run folders under --out")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    preset = TUNE if args.tune else REPORT
    sizes, seeds, out = args.sizes or preset["sizes"], args.seeds or preset["seeds"], Path(args.out)
    t0 = time.perf_counter()
    if not args.analyse:
        todo = specs(sizes, seeds, args.arms, args.steps, out)
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            for record in pool.map(bw.run_one, todo):
                print(f"n {record['n']} seed {record['seed']} {record['intervention']}: onset {record['onset_step']}"
                      f" ({record['wall_s']} s)", flush=True)  # fmt: skip
    rows = [r for r in analyse(out, list(ARMS)) if r["n"] in sizes and r["seed"] in seeds]
    sources = sorted({(r.get("measured") or {}).get("memwatch_src", "unknown") for r in rows})
    summary = {"arms": compare(rows), "steps": args.steps, "wall_s": round(time.perf_counter() - t0, 1),
               "measured_with": sources}  # fmt: skip
    print(markdown(rows))
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": rows, "summary": summary}, indent=2, default=bw._nan) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
