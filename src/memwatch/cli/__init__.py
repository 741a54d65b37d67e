"""The ``memwatch`` command line: one module per command, each with ``add_parser`` and ``run``.

Exit codes (DESIGN.md): 0 ran and nothing at or above ``--fail-on``; 1 a warning at or above
``--fail-on``; 2 bad usage or bad input, with a one-line reason and no traceback.

A new command is one module here with ``NAME``, ``add_parser(subparsers)`` (which sets
``func=run``) and ``run(args) -> int``, listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from memwatch.cli import (
    canaries,
    config,
    curves,
    data,
    demo,
    exclude,
    forecast,
    index,
    keygen,
    probe,
    report,
    score,
    verify,
    watch,
)
from memwatch.errors import MemwatchError
from memwatch.version import __version__

#: The commands, in the order ``--help`` lists them.
COMMANDS = (score, demo, curves, probe, watch, report, verify, keygen, forecast, data, exclude, index, canaries, config)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help`` in the README).

    Example:
        >>> sorted(build_parser()._subparsers._group_actions[0].choices)[:3]
        ['canaries', 'config', 'curves']
    """
    parser = argparse.ArgumentParser(
        prog="memwatch",
        description="Watch diffusion models for memorization of training images.",
    )
    parser.add_argument("--version", action="version", version=f"memwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memwatch`` console command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="memwatch: %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except MemwatchError as e:
        print(f"memwatch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memwatch: interrupted; everything recorded so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
