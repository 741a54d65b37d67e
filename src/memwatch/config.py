"""Monitor configuration: ``configs/default.yaml`` merged with the user's YAML file or dict.

Every setting has its default, and the reason for it, in ``configs/default.yaml``. A user config
is merged over the defaults dictionary by dictionary; a user ``rules:`` list replaces the default
rules as a whole. Unknown settings are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memwatch.errors import MemwatchError
from memwatch.faces.config import IdentityConfig
from memwatch.hashing import config_hash
from memwatch.probes.condnoise import CondNoiseConfig
from memwatch.probes.membership import MembershipConfig
from memwatch.probes.regurgitation import RegurgitationConfig
from memwatch.rules import SEVERITIES, Rule, parse_rules

DEFAULTS_PATH = Path(__file__).parent / "configs" / "default.yaml"
#: settings holding paths; in a config file they are relative to that file's folder
PATH_SETTINGS = ("output_dir", "reference", "holdout", "cache_dir", "base_model", "probes.identity.weights")


@dataclass
class EmbedderConfig:
    """Which embedder the probes compare images with (see ``configs/default.yaml``)."""

    name: str = "pixel"
    resolution: int | None = None
    tiled: bool = False
    model: str = "ViT-B-32"
    pretrained: str = "openai"
    copy_threshold: float | None = None

    def options(self, default_resolution: int | None = None) -> dict[str, Any]:
        """Constructor options for :func:`memwatch.embedders.make_embedder`."""
        if self.name == "pixel":
            return {
                "resolution": self.resolution or default_resolution,
                "tiled": self.tiled,
                "copy_threshold": self.copy_threshold,
            }
        if self.resolution is not None:
            raise MemwatchError("setting 'embedder.resolution' applies to pixel only: clip uses its model's input size")
        return {"model": self.model, "pretrained": self.pretrained, "copy_threshold": self.copy_threshold}


@dataclass
class MonitorConfig:
    """Everything the monitor and the checkpoint front-ends need to know.

    Build it with :func:`load_config`; ``raw`` keeps the merged dictionary (stored with each run
    and hashed into result keys).
    """

    run_name: str | None = None
    output_dir: str | None = None
    reference: str | None = None
    holdout: str | None = None
    cache_dir: str | None = None
    weights: str = "raw"
    base_model: str | None = None
    stop_on: str | None = None
    evidence_top: int = 8
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    regurgitation: RegurgitationConfig = field(default_factory=RegurgitationConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    condnoise: CondNoiseConfig = field(default_factory=CondNoiseConfig)
    rules: list[Rule] = field(default_factory=list)
    source: str = "defaults"
    raw: dict[str, Any] = field(default_factory=dict)

    def probe_hash(self, probe: str) -> str:
        """Key of a probe's results: its settings plus the embedder's (so changed settings re-probe)."""
        return config_hash({"probe": probe, "settings": self.raw["probes"][probe], "embedder": self.raw["embedder"]})


def load_config(source: str | Path | dict[str, Any] | MonitorConfig | None = None) -> MonitorConfig:
    """Load and validate a monitor config.

    Args:
        source: a YAML file path, a dict with the same shape, an existing config (returned as is),
            or None for the defaults.

    Returns:
        A validated :class:`MonitorConfig`.

    Raises:
        MemwatchError: the file is missing or not YAML, or a setting is unknown or invalid (the
            message names the file and the setting).

    Example:
        >>> cfg = load_config({"probes": {"regurgitation": {"every": 100}}})
        >>> cfg.regurgitation.every, cfg.membership.every
        (100, 50)
    """
    if isinstance(source, MonitorConfig):
        return source
    defaults = _read_yaml(DEFAULTS_PATH)
    name = "defaults"
    user: dict[str, Any] = {}
    if isinstance(source, str | Path):
        name = str(source)
        user = _read_yaml(Path(source))
    elif isinstance(source, dict):
        name = "config dict"
        user = copy.deepcopy(source)
    elif source is not None:
        raise MemwatchError(f"config must be a YAML path, a dict or a MonitorConfig, not {type(source).__name__}")
    merged = _merge(defaults, user, name, "")
    if isinstance(source, str | Path):
        # Paths in a config file are relative to the file, so cron jobs work from any folder.
        base = Path(source).resolve().parent
        for dotted in PATH_SETTINGS:
            *parents, key = dotted.split(".")
            holder = merged
            for part in parents:
                holder = holder[part]
            if holder[key] is not None and not Path(str(holder[key])).expanduser().is_absolute():
                holder[key] = str(base / str(holder[key]))
    return _build(merged, name)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MemwatchError(f"config file {path} does not exist: pass a YAML file (see configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MemwatchError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MemwatchError(f"config file {path} must hold a mapping of settings at the top level")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any], source: str, prefix: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        where = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise MemwatchError(f"{source}: setting '{where}' is unknown; known settings here: {known}")
        if isinstance(base[key], dict) and key != "rules":
            if not isinstance(value, dict):
                raise MemwatchError(f"{source}: setting '{where}' must be a mapping")
            out[key] = _merge(base[key], value, source, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _build(raw: dict[str, Any], source: str) -> MonitorConfig:
    def section(cls: type, data: dict[str, Any], where: str) -> Any:
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise MemwatchError(f"{source}: settings under '{where}' are invalid ({e})") from None

    if raw["weights"] not in ("raw", "ema"):
        raise MemwatchError(f"{source}: setting 'weights' must be raw or ema, not {raw['weights']!r}")
    if raw["stop_on"] is not None and raw["stop_on"] not in SEVERITIES:
        raise MemwatchError(f"{source}: setting 'stop_on' must be null or one of {', '.join(SEVERITIES)}")
    if raw["embedder"]["name"] not in ("pixel", "clip"):
        raise MemwatchError(f"{source}: setting 'embedder.name' must be pixel or clip, not {raw['embedder']['name']!r}")
    for probe in ("membership", "regurgitation", "identity", "condnoise"):
        every = raw["probes"][probe]["every"]
        if not isinstance(every, int) or every < 0:
            raise MemwatchError(f"{source}: setting 'probes.{probe}.every' must be a whole number >= 0 (0 disables)")
    scalars = {f.name for f in dataclasses.fields(MonitorConfig)} - {
        "embedder",
        "membership",
        "regurgitation",
        "identity",
        "condnoise",
        "rules",
        "source",
        "raw",
    }
    return MonitorConfig(
        **{k: raw[k] for k in scalars},
        embedder=section(EmbedderConfig, raw["embedder"], "embedder"),
        membership=section(MembershipConfig, raw["probes"]["membership"], "probes.membership"),
        regurgitation=section(RegurgitationConfig, raw["probes"]["regurgitation"], "probes.regurgitation"),
        identity=section(IdentityConfig, raw["probes"]["identity"], "probes.identity"),
        condnoise=section(CondNoiseConfig, raw["probes"]["condnoise"], "probes.condnoise"),
        rules=parse_rules(raw["rules"], source),
        source=source,
        raw=raw,
    )
