"""``memwatch config``: print the default settings (every setting, its default and its source), or check a file."""

from __future__ import annotations

import argparse

NAME = "config"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="print every setting with its default and source, or check a config file",
        description="With --defaults, print configs/default.yaml: every setting a config file may set, its "
        "default and where the default comes from. With a FILE, validate it and print the merged config.",
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="a memwatch YAML config to validate")
    p.add_argument("--defaults", action="store_true", help="print the defaults (configs/default.yaml)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from memwatch.core.config import defaults_yaml, load_config
    from memwatch.errors import MemwatchError

    if args.defaults:
        print(defaults_yaml(), end="")
        return 0
    if args.file is None:
        raise MemwatchError("memwatch config needs FILE (a YAML config to check) or --defaults")
    config = load_config(args.file)
    print(yaml.safe_dump(config.raw, sort_keys=False, allow_unicode=True), end="")
    return 0
