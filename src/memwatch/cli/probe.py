"""``memwatch probe RUN_DIR...``: probe every snapshot that has no result for this config yet (cron)."""

from __future__ import annotations

import argparse

from memwatch.cli.jobs_common import add_job_options, finish, launched_workers, load_job_configs

NAME = "probe"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="probe every checkpoint folder of one or more runs that has no result for this config (cron)",
        description="Probe each snapshot under RUN_DIR (checkpoint-<step>/ folders, oldest first, then the final "
        "model) that has no result for this config yet; results go to RUN_DIR/memwatch/. Running it again does "
        "nothing; a killed job is finished by the next one; a second job on the same RUN_DIR exits at once. Under "
        "`accelerate launch` the processes share each snapshot's sampling and membership losses, as the "
        "in-training monitor does.",
    )
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="training output folder(s)")
    add_job_options(p)
    p.add_argument("--wait", action="store_true", help="wait for another job's lock instead of exiting")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.frontends.jobs import probe_run_dir

    configs = load_job_configs(args.config, len(args.run_dirs))
    with launched_workers() as workers:
        reports = [
            probe_run_dir(d, c, wait=args.wait, workers=workers) for d, c in zip(args.run_dirs, configs, strict=True)
        ]
    return finish(reports, args) if workers.is_main else 0  # the main process alone reports
