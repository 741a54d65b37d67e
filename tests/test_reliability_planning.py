"""memwatch forecast and custom probes as careless users give them: a pilot given twice counts once, a fit that
does not follow the law says so instead of printing a negative step, and an error in a user's own probe
module is one line and exit 2 (never read by --fail-on as "warnings found")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from support.images import write_images
from test_planning import pilot

from memwatch.cli import main


def law_pilots(root: Path, law, sizes=(8, 16, 32)) -> list[Path]:
    out = []
    for n in sizes:
        for k, jitter in enumerate((-40, 40)):
            onset = int(law(n)) + jitter
            out.append(
                pilot(root, f"n{n}-{k}", n, {s: (0.1 if s >= onset else 0.0) for s in range(50, onset + 200, 50)})
            )
    return out


def plan_line(capsys) -> str:
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("onset = ")][0]


def test_a_pilot_given_as_its_folder_and_as_its_store_counts_once(tmp_path: Path, capsys) -> None:
    pilots = law_pilots(tmp_path, lambda n: 100 + 90 * n)
    assert main(["forecast", *map(str, pilots), "--n", "64"]) == 0
    alone = plan_line(capsys)
    again = [*pilots, pilots[0] / "memwatch" / "memwatch.sqlite", pilots[1] / "memwatch"]
    assert main(["forecast", *map(str, again), "--n", "64"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("pilot ") == 6  # six runs, not eight
    assert [line for line in printed.splitlines() if line.startswith("onset = ")][0] == alone  # not narrowed


def test_a_copy_of_a_pilot_store_counts_once(tmp_path: Path, capsys) -> None:
    pilots = law_pilots(tmp_path, lambda n: 100 + 90 * n)
    copy = tmp_path / "copy-of-n8"
    shutil.copytree(pilots[0], copy)
    assert main(["forecast", *map(str, pilots), "--n", "64"]) == 0
    alone = plan_line(capsys)
    assert main(["forecast", *map(str, pilots), str(copy), "--n", "64"]) == 0
    assert plan_line(capsys) == alone


@pytest.mark.parametrize(
    ("law", "message"),
    [
        (lambda n: 5000 - 120 * n, "do not grow with the training-set size"),  # falling: "onset at step -9647"
        (lambda n: 2000 + 0 * n, "do not grow with the training-set size"),  # flat
    ],
)
def test_pilots_that_break_the_law_give_no_forecast(tmp_path: Path, law, message: str, capsys) -> None:
    pilots = law_pilots(tmp_path, law)
    assert main(["forecast", *map(str, pilots), "--n", "64"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "-9647" not in err


def test_a_forecast_before_step_zero_is_refused(tmp_path: Path, capsys) -> None:
    pilots = law_pilots(tmp_path, lambda n: -2000 + 200 * n, sizes=(16, 24, 32))
    assert main(["forecast", *map(str, pilots), "--n", "2"]) == 2
    assert "before training starts" in capsys.readouterr().err


def test_too_few_sizes_is_said(tmp_path: Path, capsys) -> None:
    pilots = law_pilots(tmp_path, lambda n: 100 + 90 * n, sizes=(8,))
    assert main(["forecast", *map(str, pilots), "--n", "64"]) == 2
    assert "at least 2 training-set sizes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("class Broken(:\n    pass\n", "SyntaxError"),
        ("raise RuntimeError('needs a GPU')\n", "RuntimeError: needs a GPU"),
        ("import no_such_module_anywhere\n", "cannot import"),
        ("x = 1\n", "has no Probe subclass"),
    ],
)
def test_an_error_in_a_custom_probe_module_is_one_line_and_exit_2(tmp_path: Path, source: str, expected: str,
                                                                   capsys, monkeypatch) -> None:  # fmt: skip
    (tmp_path / "my_probes.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_images(tmp_path / "train", [1, 2], size=16)
    (tmp_path / "run").mkdir()
    config = tmp_path / "mw.yaml"
    config.write_text(yaml.safe_dump({"reference": str(tmp_path / "train"), "custom_probes": ["my_probes:Mine"]}))
    code = main(["probe", str(tmp_path / "run"), "--config", str(config), "--fail-on", "warning"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err


UNSTORABLE = """
from dataclasses import dataclass
from memwatch.probes import Probe, ProbeResult, ProbeSettings, setting

@dataclass
class S(ProbeSettings):
    section = "probes.odd"
    every: int | None = setting(1, "every step", min=0)

class Odd(Probe):
    name = "odd"
    Settings = S
    metrics = ("x",)
    def reduce(self, rows, ctx):
        return ProbeResult(self.name, {"x": "not a number"})  # a value the store cannot hold
"""


def test_results_that_cannot_be_recorded_are_counted_as_failed(tmp_path: Path, capsys, monkeypatch) -> None:
    from support.models import train_unconditional_like

    (tmp_path / "odd_probe.py").write_text(UNSTORABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_images(tmp_path / "train", list(range(4)), size=16)
    train_unconditional_like(tmp_path / "run", tmp_path / "train", steps=2, every=2)
    config = tmp_path / "mw.yaml"
    config.write_text(yaml.safe_dump({"reference": str(tmp_path / "train"), "custom_probes": ["odd_probe:Odd"],
                                      "sampling": {"every": 0}, "probes": {"membership": {"every": 0}}}))  # fmt: skip
    assert main(["probe", str(tmp_path / "run"), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    # checkpoint-2 and the final model (the same weights, but nothing of them is on the record): both failed
    assert "probed 0, already done 0, failed 2" in out and "not recorded: TypeError: metric 'x'" in out
