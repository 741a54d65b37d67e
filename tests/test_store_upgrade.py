"""A run is its folder and data: upgrading memwatch, adding a rule or changing a threshold continues the same
run without probing again what was measured; a changed probe setting re-probes that probe alone; a store
written by memwatch 0.1 opens, keeps its run and continues."""

from __future__ import annotations

import json
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from support.images import write_images
from support.models import train_unconditional_like

import memwatch.core.registry as registry
from memwatch.cli import main
from memwatch.core.config import load_config
from memwatch.core.probe import Probe, ProbeResult, ProbeSettings
from memwatch.frontends.jobs import probe_run_dir
from memwatch.settings import setting
from memwatch.store import SCHEMA_VERSION, Store
from memwatch.store.history import find_store, load_history
from memwatch.views.report import build_report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store_v2"
SMALL = {
    "sampling": {"every": 1, "num_samples": 4, "inference_steps": 2, "batch_size": 4},
    "probes": {"membership": {"every": 1, "num_members": 6, "num_holdout": 6, "timesteps": [100, 400]}},
}


@dataclass
class NewSettings(ProbeSettings):
    section = "probes.newcomer"
    every: int | None = setting(0, "off unless asked for", min=0, unit="steps")


class NewcomerProbe(Probe):
    """A built-in probe that a newer memwatch ships, off by default."""

    name = "newcomer"
    Settings = NewSettings
    metrics = ("x",)
    default_rules = (
        {"name": "newcomer-high", "type": "threshold", "metric": "newcomer/x", "op": ">", "value": 1,
         "severity": "info", "source": "a test", "message": "x {value}"},
    )  # fmt: skip

    def reduce(self, rows, ctx):
        return ProbeResult(self.name, {"x": 0.0})


@pytest.fixture
def run(tmp_path: Path) -> dict:
    data, holdout = tmp_path / "train", tmp_path / "holdout"
    write_images(data, list(range(6)), size=16)
    write_images(holdout, list(range(100, 106)), size=16)
    run_dir = tmp_path / "ddpm"
    train_unconditional_like(run_dir, data, steps=4, every=2)
    return {"dir": run_dir, "config": {"reference": str(data), "holdout": str(holdout), **SMALL}}


def results_by_probe(run_dir: Path) -> dict[str, int]:
    with Store(find_store(run_dir), readonly=True) as store:
        (only,) = store.runs()
        out: dict[str, int] = {}
        for r in store.results(only["id"]):
            out[r["probe"]] = out.get(r["probe"], 0) + (r["status"] == "ok")
    return out


def test_an_upgrade_a_new_rule_and_a_changed_threshold_continue_the_run(run: dict, monkeypatch) -> None:
    first = probe_run_dir(run["dir"], load_config(run["config"]))
    assert first.probed == [2, 4] and first.already_done == 1  # the final model is checkpoint-4's weights
    before = results_by_probe(run["dir"])

    # the upgrade: a new built-in probe (off), a new rule, a stricter threshold of a default rule
    shipped = registry.builtin_probes()
    monkeypatch.setattr(registry, "builtin_probes", lambda: (*shipped, NewcomerProbe))
    config = load_config(run["config"])
    rules = [r.to_dict() for r in config.rules]
    rules = [{**r, "value": 0.05} if r["name"] == "mem-fraction-high" else r for r in rules]
    rules.append({"name": "any-sample-near", "type": "threshold", "metric": "regurgitation/ratio_min", "op": "<",
                  "value": 10.0, "severity": "info", "source": "a test", "message": "ratio {value:.2f}"})  # fmt: skip
    upgraded = load_config({**run["config"], "rules": rules})
    assert "newcomer" in upgraded.probes
    again = probe_run_dir(run["dir"], upgraded)

    assert again.run == first.run and again.probed == [] and again.already_done == 3
    assert results_by_probe(run["dir"]) == before  # nothing measured twice
    # the new rule was judged on what was measured, at the step it first held (a sustained breach is one event)
    assert [(e["rule"], e["step"]) for e in again.new_events] == [("any-sample-near", 2)]
    with Store(find_store(run["dir"]), readonly=True) as store:
        (only,) = store.runs()
        assert only["config"]["rules"][-1]["name"] == "any-sample-near"  # the run's latest config
        assert store.run_config(only["id"], first=True)["rules"][-1]["name"] != "any-sample-near"


def test_a_changed_probe_setting_reprobes_that_probe_alone(run: dict) -> None:
    probe_run_dir(run["dir"], load_config(run["config"]))
    before = results_by_probe(run["dir"])
    changed = {**run["config"], "probes": {**SMALL["probes"], "forecast": {"window": 5}}}
    again = probe_run_dir(run["dir"], load_config(changed))
    after = results_by_probe(run["dir"])
    assert again.probed == [2, 4]
    assert after["forecast"] == before["forecast"] + 2
    assert {k: v for k, v in after.items() if k != "forecast"} == {k: v for k, v in before.items() if k != "forecast"}


def test_the_cadence_and_the_embedder_of_other_probes_key_nothing(run: dict) -> None:
    probe_run_dir(run["dir"], load_config(run["config"]))
    before = results_by_probe(run["dir"])
    # every is when, not what; membership does not compare in the embedder's space
    changed = load_config({**run["config"], "sampling": {**SMALL["sampling"], "every": 7}})
    again = probe_run_dir(run["dir"], changed)
    assert again.probed == [] and results_by_probe(run["dir"]) == before
    embedder = load_config({**run["config"], "embedder": {"resolution": 8}})
    again = probe_run_dir(run["dir"], embedder)
    after = results_by_probe(run["dir"])
    assert after["membership"] == before["membership"] and after["regurgitation"] == before["regurgitation"] + 2


def perturbed_checkpoint(run_dir: Path, source: str, step: int) -> None:
    """A new checkpoint: another's weights, moved a little (a training step that was not run here)."""
    target = run_dir / f"checkpoint-{step}"
    shutil.copytree(run_dir / source, target)
    weights = target / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = state[first] + 0.01 * torch.ones_like(state[first])
    save_file(state, str(weights))


def test_a_store_of_memwatch_0_1_opens_keeps_its_run_and_continues(tmp_path: Path, capsys, caplog) -> None:
    folder = tmp_path / "fixture"
    shutil.copytree(FIXTURE, folder)
    store_path = folder / "run" / "memwatch" / "memwatch.sqlite"
    conn = sqlite3.connect(store_path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    old_results = conn.execute("SELECT id, probe, config_hash FROM probe_results ORDER BY id").fetchall()
    conn.close()

    # the forecast settings 0.1 ran with (its defaults then), as a user who keeps the config they ran with;
    # closest did not exist in 0.1: at the value it was declared with (was=1) it keys the results as 0.1 did
    pinned = yaml.safe_load((folder / "memwatch.yaml").read_text())
    pinned["probes"]["forecast"].update(window=6, max_extrapolation=2.0, closest=1)
    (folder / "memwatch.yaml").write_text(yaml.safe_dump(pinned))
    config = str(folder / "memwatch.yaml")
    assert main(["probe", str(folder / "run"), "--config", config]) == 0
    out = capsys.readouterr().out
    assert "probed 0, already done 2" in out  # its results count: the same measurements, stored by 0.1
    assert "sampling" in caplog.text  # the 0.1 config's sample settings are read, with one warning

    perturbed_checkpoint(folder / "run", "checkpoint-4", 6)
    assert main(["probe", str(folder / "run"), "--config", config, "--json", str(tmp_path / "p.json")]) == 0
    report = json.loads((tmp_path / "p.json").read_text())["runs"][0]
    assert report["run"] == "run@661c4f7d4141" and report["probed"] == [6] and report["already_done"] == 2

    with Store(store_path, readonly=True) as store:
        assert [r["name"] for r in store.runs()] == ["run@661c4f7d4141"]
        assert store.runs()[0]["identity"] is not None
        history = load_history(store)
    assert sorted(history.metrics["regurgitation/mem_fraction"]) == [2, 4, 6]
    # the forecast continues the trajectory 0.1 began: it read the earlier results of the same seeds
    assert sorted(history.metrics["forecast/precursor"]) == [2, 4, 6]
    conn = sqlite3.connect(store_path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    kept = conn.execute("SELECT id, probe, config_hash FROM probe_results ORDER BY id").fetchall()
    conn.close()
    assert kept[: len(old_results)] == old_results  # history is added to, never rewritten
    assert build_report(folder / "run")["verdict"]["overall"]["verdict"] in ("clean", "at-risk", "warning")


def test_defaults_changed_since_memwatch_0_1_measure_again_only_what_they_change(tmp_path: Path) -> None:
    folder = tmp_path / "fixture"
    shutil.copytree(FIXTURE, folder)
    store_path = folder / "run" / "memwatch" / "memwatch.sqlite"
    with sqlite3.connect(store_path) as conn:
        (last_old,) = conn.execute("SELECT MAX(id) FROM probe_results").fetchone()
    # the fixture's config leaves the forecast's window and reach to the defaults, which changed after 0.1
    assert main(["probe", str(folder / "run"), "--config", str(folder / "memwatch.yaml")]) == 0
    with Store(store_path, readonly=True) as store:
        run = store.runs()[0]
        assert run["name"] == "run@661c4f7d4141"  # the same run, not a new one
        added = {(r["probe"], r["step"]) for r in store.results(run["id"]) if r["id"] > last_old}
    assert added == {("forecast", 2), ("forecast", 4)}  # regurgitation and membership of 0.1 still count


def test_an_older_config_file_is_read_with_one_warning(tmp_path: Path, caplog) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"probes": {"regurgitation": {"every": 50, "num_samples": 8, "batch_size": 4}}}))
    config = load_config(path)
    assert (config.sampling.num_samples, config.sampling.batch_size, config.probes["regurgitation"].every) == (8, 4, 50)
    assert caplog.text.count("sampling") >= 1 and len(caplog.records) == 1
    both = {"sampling": {"num_samples": 4}, "probes": {"regurgitation": {"num_samples": 8}}}
    with pytest.raises(Exception, match=r"'sampling.num_samples' is also set as 'probes.regurgitation.num_samples'"):
        load_config(both)
