"""The command line: one module per command, one-line errors."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import memwatch.cli as cli
from memwatch.cli import COMMANDS, build_parser, main


def test_every_command_is_one_module() -> None:
    modules = {m.name for m in pkgutil.iter_modules(cli.__path__) if not m.name.startswith("_")}
    modules -= {"jobs_common", "embedder_options"}  # options shared by several commands
    assert {c.__name__.rsplit(".", 1)[1] for c in COMMANDS} == modules
    commands = build_parser()._subparsers._group_actions[0].choices
    for module in COMMANDS:
        assert importlib.import_module(module.__name__).NAME in commands
        assert commands[module.NAME].get_default("func") is module.run


def test_bad_usage_is_one_line_with_exit_2(capsys: pytest.CaptureFixture, tmp_path) -> None:
    assert main(["report"]) == 2
    assert capsys.readouterr().err == "memwatch: error: memwatch report needs RUN_DIR (or --schema)\n"
    assert main(["curves", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert main(["demo", "--control", "--faces", "--output-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two different demos" in err and not (tmp_path / "demo").exists()
