#!/usr/bin/env python
"""Benchmark: memwatch monitor overhead on the demo, and where a probe's time goes.

Trains the demo recipe three times in one run of this script, on the same data and seed: with
memwatch's default settings (default probes, cadence adaptive under its 10% budget), with the demo's
settings (configs/demo.yaml: adaptive cadence without a time budget), and with every probe disabled
(the monitor is still called each step, so the difference is the probing itself). Prints Markdown tables for
docs/benchmarks.md.

    python scripts/bench_monitor.py [--steps N]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
import yaml

from memwatch.demo.run import DEMO_STEPS, DEMO_TRAINING_ARGS, _load_script, find_checkout


def run(script, root: Path, out: Path, config: Path, steps: int) -> tuple[float, dict]:
    argv = [
        "--train-data",
        str(root / "assets/demo/train"),
        "--holdout-data",
        str(root / "assets/demo/holdout"),
        "--output-dir",
        str(out),
        "--memwatch-config",
        str(config),
        "--steps",
        str(steps),
        *[a for a in DEMO_TRAINING_ARGS],
    ]
    t0 = time.perf_counter()
    summary = script.main(argv)
    return time.perf_counter() - t0, summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    args = p.parse_args()
    root = find_checkout()
    script = _load_script(root / "scripts" / "train_ddpm.py")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        off, defaults = tmp / "off.yaml", tmp / "defaults.yaml"
        disabled = {"sampling": {"every": 0}, "probes": {"membership": {"every": 0}}}
        off.write_text(yaml.safe_dump({"run_name": "bench-off", **disabled}))
        defaults.write_text(yaml.safe_dump({"run_name": "bench-defaults"}))
        default_s, default = run(script, root, tmp / "defaults", defaults, args.steps)
        on_s, on = run(script, root, tmp / "on", root / "configs" / "demo.yaml", args.steps)
        off_s, _ = run(script, root, tmp / "off", off, args.steps)
    t = on["timings"]
    probe_s = t.get("total", 0.0)
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {args.steps} steps\n"
    )
    print("| run | wall time (s) | overhead | probe time / training time (the monitor's own measure) |")
    print("|---|---|---|---|")
    for label, secs, summary in (("default settings", default_s, default), ("demo settings", on_s, on)):
        measured = summary.get("probe_overhead")
        print(f"| {label} | {secs:.1f} | {secs - off_s:.1f} s = {100 * (secs - off_s) / off_s:.1f}% | "
              f"{'-' if measured is None else f'{100 * measured:.1f}%'} |")  # fmt: skip
    print(f"| probes disabled | {off_s:.1f} | - | - |\n")
    print("Demo settings, where the probe time goes:\n")
    print("| phase | seconds | share of probe time |\n|---|---|---|")
    for phase in ("sampling", "reference_embedding", "embedding", "search", "membership", "store"):
        print(f"| {phase} | {t.get(phase, 0.0):.2f} | {100 * t.get(phase, 0.0) / max(probe_s, 1e-9):.1f}% |")
    print(f"| total inside probes | {probe_s:.2f} | 100% |")
    for label, summary in (("defaults", default), ("demo", on)):
        steps = {k: summary.get(k) for k in ("onset_step", "at_risk_step", "first_alarm_step", "last_clean_step")}
        print(f"{label}: {steps}, events {summary['events']}, images at risk {summary.get('images_at_risk')}")


if __name__ == "__main__":
    main()
