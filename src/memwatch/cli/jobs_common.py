"""Options and the summary shared by the checkpoint-folder commands (``probe`` and ``watch``)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.output import write_output


def add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        action="append",
        help="memwatch YAML config (reference, holdout, probes, rules); give it once for every RUN_DIR, or once "
        "per RUN_DIR in the same order",
    )
    p.add_argument(
        "--fail-on",
        choices=("info", "warning", "critical"),
        default=None,
        help="exit 1 if the run holds an event at or above this severity",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="write a JSON summary")


def load_job_configs(paths: list[str], runs: int) -> list[Any]:
    """One validated config per run: the single ``--config`` for all, or one ``--config`` per RUN_DIR."""
    from memwatch.core.config import load_config

    if len(paths) not in (1, runs):
        raise MemwatchError(
            f"{len(paths)} --config files for {runs} RUN_DIRs: give one config for all, or one per RUN_DIR in order"
        )
    for path in paths:
        if not Path(path).is_file():
            raise MemwatchError(f"--config {path} does not exist: pass a YAML file (see configs/default.yaml)")
    configs = [load_config(path) for path in paths]
    return configs * runs if len(configs) == 1 else configs


@contextlib.contextmanager
def launched_workers() -> Iterator[Any]:
    """The processes started by ``accelerate launch`` (several: WORLD_SIZE > 1), else this one alone.

    Without GPUs the processes talk over gloo on the CPU (``PartialState(cpu=True)``). Several
    processes end together, as ``accelerator.end_training()`` ends a training script: a barrier, then
    the process group is destroyed, so no rank exits with the group's threads still running. An error
    leaves at once (no barrier it could wait in forever).

    Example:
        >>> with launched_workers() as workers:
        ...     workers.is_main
        True
    """
    import os

    from memwatch.core.workers import Workers

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        yield Workers()
        return
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    yield Workers.from_accelerator(state)
    state.wait_for_everyone()
    state.destroy_process_group()


def finish(reports: list, args: argparse.Namespace) -> int:
    """Print one line per run (and its failures), write ``--json``, and give the exit code."""
    from memwatch.frontends.jobs import fails

    for r in reports:
        if r.locked:
            state = f"locked by another job: nothing done ({len(r.events)} events stored)"
        else:
            state = (
                f"probed {len(r.probed)}, already done {r.already_done}, failed {len(r.failed)}, "
                f"deleted before probing {len(r.rotated)}, new events {len(r.new_events)}, "
                f"last clean step {r.last_clean_step}"
            )
        print(f"{r.run_dir}: {state}")
        for f in r.failed:
            print(f"  failed: {f['path']}: {f['error']}")
        for s in r.skipped:
            print(f"  skipped: {s['path']}: {s['reason']}")
    if args.json:
        write_output(args.json, json.dumps({"runs": [r.to_dict() for r in reports]}, indent=2, default=str) + "\n",
                     "--json")  # fmt: skip
    return 1 if any(fails(r, args.fail_on) for r in reports) else 0
