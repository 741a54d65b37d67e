"""Settings are declared once: the defaults file, validation and errors all come from the declarations."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memwatch.cli import main
from memwatch.core.config import defaults_yaml, load_config
from memwatch.errors import MemwatchError
from memwatch.probes.membership import MembershipConfig
from memwatch.settings import declarations

ROOT = Path(__file__).resolve().parents[1]


def test_configs_default_yaml_is_generated_from_the_declarations() -> None:
    text = (ROOT / "configs" / "default.yaml").read_text(encoding="utf-8")
    assert text == defaults_yaml(), (
        "configs/default.yaml is stale: run `memwatch config --defaults > configs/default.yaml`"
    )
    # and it reads back as exactly the defaults, rules included
    assert load_config(yaml.safe_load(text)).raw == load_config(None).raw


def test_every_declared_setting_is_in_the_defaults_with_its_source() -> None:
    text = defaults_yaml()
    for name, _, info in declarations(MembershipConfig):
        assert f"    {name}: " in text
        if info.source:
            assert info.source in text
    assert yaml.safe_load(text)["rules"][0]["source"].startswith("Gu et al. 2023")  # rules carry sources as data


def test_memwatch_config_prints_the_defaults_and_checks_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "--defaults"]) == 0
    assert capsys.readouterr().out == defaults_yaml()
    cfg = tmp_path / "mw.yaml"
    cfg.write_text("reference: data/train\nprobes:\n  membership: {every: 10}\n")
    assert main(["config", str(cfg)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["probes"]["membership"]["every"] == 10 and shown["reference"] == str(tmp_path / "data" / "train")


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ({"probes": {"membership": {"every": -1}}}, "setting 'probes.membership.every' must be >= 0 steps, got -1"),
        (
            {"probes": {"membership": {"timesteps": "50, 150"}}},
            "setting 'probes.membership.timesteps' must be a list of",
        ),
        ({"probes": {"membership": {"timesteps": []}}}, "setting 'probes.membership.timesteps' is empty"),
        ({"sampling": {"num_samples": 0}}, "setting 'sampling.num_samples' must be >= 1"),
        ({"probes": {"regurgitation": {"num_samples": 0}}}, "setting 'sampling.num_samples' must be >= 1"),
        ({"probes": {"regurgitation": {"mem_ratio": "1e-3"}}}, "write 1.0e-3, with a dot"),
        (
            {"probes": {"regurgitation": {"mem_ratio": 1.5}}},
            "setting 'probes.regurgitation.mem_ratio' must be in (0, 1)",
        ),
        ({"probes": {"membership": {"every": True}}}, "setting 'probes.membership.every' must be a whole number"),
        ({"probes": {"membership": {"evry": 5}}}, "setting 'probes.membership.evry' is unknown; known settings here:"),
        ({"probes": {"membrship": {"every": 5}}}, "setting 'probes.membrship' is unknown; known probes:"),
        ({"probes": {"membership": 5}}, "setting 'probes.membership' must be a mapping"),
        ({"weights": "best"}, "setting 'weights' must be one of raw, ema, got 'best'"),
        ({"stop_on": "fatal"}, "setting 'stop_on' must be one of info, warning, critical"),
        ({"refrence": "x"}, "setting 'refrence' is unknown"),
        ({"embedder": {"name": 3}}, "setting 'embedder.name' must be a string"),
        (
            {"probes": {"identity": {"detect_min_side": 10}}},
            "setting 'probes.identity.detect_min_side' (10) must be at",
        ),
        ({"custom_probes": "mymod:Probe"}, "setting 'custom_probes' must be a list of strings"),
    ],
)
def test_bad_values_give_one_error_format(user: dict, expected: str) -> None:
    with pytest.raises(MemwatchError) as info:
        load_config(user)
    message = str(info.value)
    assert message.startswith("config dict: setting '") and expected in message and "\n" not in message


def test_custom_probe_import_errors_name_the_path() -> None:
    with pytest.raises(MemwatchError, match=r"probe 'no_such_module:Probe': cannot import no_such_module"):
        load_config({"custom_probes": ["no_such_module:Probe"]})
    with pytest.raises(
        MemwatchError, match=r"probe 'memwatch.core.config:MonitorConfig': memwatch.core.config has no Probe"
    ):
        load_config({"custom_probes": ["memwatch.core.config:MonitorConfig"]})
    with pytest.raises(MemwatchError, match=r"probe name\(s\) \['membership'\] are used twice"):
        load_config({"custom_probes": ["memwatch.probes.membership:MembershipProbe"]})


def test_paths_in_a_file_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "sub" / "mw.yaml"
    cfg.parent.mkdir()
    cfg.write_text("reference: ../data\nholdout: /abs/holdout\nprobes:\n  identity: {weights: w.safetensors}\n")
    config = load_config(cfg)
    assert config.reference == str(tmp_path / "sub" / ".." / "data") and config.holdout == "/abs/holdout"
    assert config.probes["identity"].weights == str(tmp_path / "sub" / "w.safetensors")


def test_a_user_rules_list_replaces_the_default_rules() -> None:
    rule = {"name": "r", "type": "first", "metric": "membership/mia_auc", "op": ">", "value": 0.9,
            "severity": "info", "message": "m", "source": "my own"}  # fmt: skip
    config = load_config({"rules": [rule]})
    assert [r.name for r in config.rules] == ["r"] and config.raw["rules"][0]["source"] == "my own"
    assert len(load_config(None).rules) == 14  # the probes' default rules
