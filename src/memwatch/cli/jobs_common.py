"""Options and the summary shared by the checkpoint-folder commands (``probe`` and ``watch``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="memwatch YAML config (reference, holdout, probes, rules)")
    p.add_argument(
        "--fail-on",
        choices=("info", "warning", "critical"),
        default=None,
        help="exit 1 if the run holds an event at or above this severity",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="write a JSON summary")


def load_job_config(path: str) -> Any:
    from memwatch.config import load_config

    if not Path(path).is_file():
        raise MemwatchError(f"--config {path} does not exist: pass a YAML file (see configs/default.yaml)")
    return load_config(path)


def finish(reports: list, args: argparse.Namespace) -> int:
    """Print one line per run (and its failures), write ``--json``, and give the exit code."""
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
