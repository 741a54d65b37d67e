"""``memwatch watch RUN_DIR``: follow a training run beside the training script and probe each new checkpoint."""

from __future__ import annotations

import argparse

from memwatch.cli.jobs_common import add_job_options, finish, launched_workers, load_job_configs
from memwatch.errors import MemwatchError

NAME = "watch"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="follow a training run beside the training script and probe each new checkpoint",
        description="Probe each new checkpoint-<step>/ in RUN_DIR once its files are complete and unchanged for "
        "--quiet-period seconds; tolerates checkpoint rotation; probes the model saved in RUN_DIR once training has "
        "ended (nothing changed for --end-quiet seconds, by default three times the longest gap between the run's "
        "saves), then stops; or stops after --idle-timeout seconds in which nothing changed. Writes only to "
        "RUN_DIR/memwatch/. Under `accelerate launch` the main process watches and the processes share each "
        "snapshot's sampling and membership losses.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="training output folder (may not exist yet)")
    add_job_options(p)
    p.add_argument("--quiet-period", type=float, default=30.0, help="seconds a checkpoint must stay unchanged")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between looks at RUN_DIR")
    p.add_argument("--idle-timeout", type=float, default=3600.0, help="stop after this long without any change")
    p.add_argument(
        "--end-quiet",
        type=float,
        default=None,
        help="seconds without any change after which training counts as ended (default: 3x the longest gap "
        "between the run's saves)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.frontends.jobs import watch_run_dir

    (config,) = load_job_configs(args.config, 1)
    for name in ("quiet_period", "poll", "idle_timeout", "end_quiet"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise MemwatchError(f"--{name.replace('_', '-')} {value}: give a number of seconds >= 0")
    with launched_workers() as workers:
        report = watch_run_dir(
            args.run_dir,
            config,
            quiet_period=args.quiet_period,
            poll=args.poll,
            idle_timeout=args.idle_timeout,
            end_quiet=args.end_quiet,
            workers=workers,
        )
    return finish([report], args) if workers.is_main else 0  # the main process alone reports
