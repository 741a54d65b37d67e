"""The run configuration: the user's YAML file (or dict) validated against every declared setting.

Every setting is declared once, in the section that owns it (:mod:`memwatch.settings`): the top-level
ones in :class:`MonitorConfig`, the embedder's in :class:`~memwatch.embedders.EmbedderConfig`, the shared
samples' in :class:`~memwatch.sampling.plan.SamplingSettings` (``sampling``), and each probe's in its
``Settings`` class (``probes.<name>``). Each probe also ships its default rules.
A user config sets only what differs; a user ``rules:`` list replaces the default rules as a whole.
Unknown settings are errors (a typo must not silently fall back to a default).

``configs/default.yaml`` is :func:`defaults_yaml`'s output, every setting with its default and the
source of that default; ``tests/test_config.py`` checks that the file equals it. Regenerate it with
``memwatch config --defaults > configs/default.yaml``.

Your own probes: list their import paths under ``custom_probes`` and set them under
``probes.<name>`` like the built-in ones.

Configs written before the ``sampling`` section existed set the samples under ``probes.regurgitation``;
they are still read, with one warning that says where the settings live now.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from memwatch.core.cadence import CadenceSettings
from memwatch.core.probe import Probe, ProbeSettings
from memwatch.core.registry import probe_classes
from memwatch.embedders import EmbedderConfig
from memwatch.errors import MemwatchError
from memwatch.hashing import config_hash
from memwatch.sampling.plan import SAMPLE_KEYS, SamplingSettings
from memwatch.settings import SettingError, Settings, build_section, declarations, setting
from memwatch.signals.rules import SEVERITIES, Rule, parse_rules

log = logging.getLogger("memwatch")

#: Sections that are not plain settings.
_SECTIONS = ("embedder", "sampling", "cadence", "probes", "rules")
#: Where configs of memwatch before 0.2 set the shared samples (moved to ``sampling``).
_OLD_SAMPLING_PROBE = "regurgitation"


@dataclass
class MonitorConfig(Settings):
    """Everything the monitor and the checkpoint front-ends need to know.

    Build it with :func:`load_config`; ``raw`` is the whole validated config as plain data (stored
    with each run; its probe sections key stored results).
    """

    run_name: str | None = setting(None, "name of the run in the store; null: 'run-<UTC time>' when probing starts")
    output_dir: str | None = setting(
        None, "where the store, events and evidence go; null: <accelerator project_dir>/memwatch, else ./memwatch",
        path=True,
    )  # fmt: skip
    reference: str | None = setting(
        None,
        "training images: folder, diffusers imagefolder, .jsonl manifest, hf:NAME (a Hugging Face dataset in the "
        "local cache), a save_to_disk folder, parquet files or webdataset tar shards",
        path=True,
    )
    holdout: str | None = setting(
        None, "non-members of the same distribution (enables the membership probe)", path=True
    )
    search: str = setting(
        "auto",
        "auto | exact | flat | compressed: how samples are matched to training images; auto is exact up to 100,000 "
        "distinct images, then a FAISS IVF-PQ index re-ranked exactly (memwatch[search]; recall in docs/benchmarks.md)",
        choices=("auto", "exact", "flat", "compressed"),
    )
    image_column: str | None = setting(
        None,
        "reference and holdout stored as a dataset (hf:NAME, save_to_disk), parquet files or tar shards: the column "
        "with the images, as the training script's --image_column; null: image",
    )
    caption_column: str | None = setting(
        None, "the column with the captions, as the training script's --caption_column; null: text, then caption"
    )
    cache_dir: str | None = setting(
        None, "reference-embedding cache; null: $MEMWATCH_CACHE_DIR or ~/.cache/memwatch", path=True
    )
    weights: str = setting(
        "raw",
        "raw | ema: probe the trained weights, or the EMA weights (monitor: pass ema= to step(); checkpoint "
        "folders: unet_ema/)",
        choices=("raw", "ema"),
    )
    base_model: str | None = setting(
        None,
        "checkpoint front-ends: local pipeline folder a LoRA is applied to; it also supplies the noise scheduler "
        "of bare checkpoint-<step> folders",
        path=True,
    )
    scheduler: str | None = setting(
        None,
        "checkpoint front-ends: the training noise scheduler (a scheduler/ folder or a pipeline folder); null: the "
        "run's own (the snapshot's pipeline, RUN_DIR/scheduler/, then base_model's)",
        path=True,
    )
    stop_on: str | None = setting(
        None, "null | warning | critical: monitor.should_stop turns true on such an event", choices=SEVERITIES
    )
    analyse_data: bool = setting(
        True,
        "analyse the training set once per run at the first probe (exact and near duplicates, isolated images, "
        "as memwatch data does) and keep it in the store and report",
    )
    evidence_top: int = setting(8, "sample/training pairs in each sample probe's evidence grid", min=0)
    custom_probes: list[str] = setting(
        [], "your own probes: import paths module:Class of Probe subclasses; set them under probes.<name>"
    )
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    cadence: CadenceSettings = field(default_factory=CadenceSettings)
    probes: dict[str, ProbeSettings] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    #: whether ``rules`` are the probes' default rules (no ``rules:`` in the user's config)
    default_rules: bool = True
    source: str = "defaults"
    raw: dict[str, Any] = field(default_factory=dict)

    def probe_classes(self) -> list[type[Probe]]:
        """The built-in probe classes (:mod:`memwatch.core.registry`), then the ``custom_probes``, in order."""
        return probe_classes(self.custom_probes)

    def make_probes(self) -> list[Probe]:
        """One probe per configured probe section, with its settings."""
        return [self.bind(cls(self.probes[cls.name])) for cls in self.probe_classes()]

    def bind(self, probe: Probe) -> Probe:
        """``probe``, set to follow this config's ``sampling.every`` when its own ``every`` is null."""
        probe.sampling_every = self.sampling.every
        return probe

    def probe_hash(self, probe: Probe) -> str:
        """Key of a probe's stored results: what they depend on (:meth:`Probe.result_key`), so a changed setting
        of the probe, of the samples it reads or of the embedder it compares with measures again, and nothing
        else does."""
        return config_hash(probe.result_key(self.sampling, self.raw["embedder"]))

    @property
    def columns(self) -> dict[str, str]:
        """The column settings given, as :func:`memwatch.data.refset.load_reference_set` keywords."""
        return {k: v for k in ("image_column", "caption_column") if (v := getattr(self, k))}

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML/JSON data (what ``raw`` holds)."""
        out = Settings.to_dict(self)
        out["embedder"] = self.embedder.to_dict()
        out["sampling"] = self.sampling.to_dict()
        out["cadence"] = self.cadence.to_dict()
        out["probes"] = {name: s.to_dict() for name, s in self.probes.items()}
        out["rules"] = [r.to_dict() for r in self.rules]
        return out


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
        >>> cfg = load_config({"sampling": {"every": 200}})
        >>> [p.every for p in cfg.make_probes()][:3], cfg.probes["membership"].every
        ([200, 200, 0], 50)
    """
    if isinstance(source, MonitorConfig):
        return source
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
    config = _build(user, name)
    if isinstance(source, str | Path):
        # Paths in a config file are relative to the file, so cron jobs work from any folder.
        _resolve_paths(config, Path(source).resolve().parent)
    config.raw = config.to_dict()
    return config


def default_rules(classes: list[type[Probe]]) -> list[dict[str, Any]]:
    """The rules the probes ship with, in probe order (what ``rules:`` is when a config omits it)."""
    return [copy.deepcopy(rule) for cls in classes for rule in cls.default_rules]


def defaults_yaml() -> str:
    """``configs/default.yaml``: every setting with its default, what it does and where the default comes from.

    Example:
        >>> "mem_ratio: 0.3333333333333333" in defaults_yaml()
        True
    """
    config = load_config(None)
    lines = [
        "# memwatch defaults: every setting a config file may set, with the value used when it does not.",
        "# Generated from the settings' declarations by `memwatch config --defaults`; do not edit by hand.",
        "# A user config is merged over these (sections key by key); a user `rules:` list replaces the",
        "# default rules as a whole. Relative paths in a config file are relative to that file's folder.",
        "",
    ]
    lines += _section_lines(config, "")
    lines += ["", "embedder:"] + _section_lines(config.embedder, "  ")
    lines += ["", "sampling:  # the fixed-seed samples every sample probe shares"]
    lines += _section_lines(config.sampling, "  ")
    lines += ["", "cadence:  # in-training front-ends only"] + _section_lines(config.cadence, "  ")
    lines += ["", "probes:"]
    for cls in config.probe_classes():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        lines += [f"  {cls.name}:  # {doc}"] + _section_lines(config.probes[cls.name], "    ")
    rules = yaml.safe_dump([r.to_dict() for r in config.rules], sort_keys=False, allow_unicode=True, width=100)
    lines += ["", "# Each default rule names the source of its threshold.", "rules:"]
    lines += ["  " + line if line else line for line in rules.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def _section_lines(section: Settings, indent: str) -> list[str]:
    lines = []
    for name, _, info in declarations(type(section)):
        comment = info.help + (f" [{info.unit}]" if info.unit else "")
        lines.append(f"{indent}# {comment}")
        if info.source:
            lines.append(f"{indent}#   source: {info.source}")
        value = yaml.safe_dump(Settings.to_dict(section)[name], default_flow_style=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{indent}{name}: {value}")
    return lines


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MemwatchError(f"config file {path} does not exist: pass a YAML file (see configs/default.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MemwatchError(f"config file {path} is not UTF-8 text: save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        raise MemwatchError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise MemwatchError(f"config file {path} cannot be read ({e.strerror}): check its permissions") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MemwatchError(f"config file {path} must hold a mapping of settings at the top level")
    return data


def _build(user: dict[str, Any], source: str) -> MonitorConfig:
    def mapping(key: str) -> dict[str, Any]:
        value = user.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise SettingError(f"{source}: setting '{key}' must be a mapping, got {value!r}")
        return dict(value)

    top = {k: v for k, v in user.items() if k not in _SECTIONS}
    known = [n for n, _, _ in declarations(MonitorConfig)]
    for key in top:
        if key not in known:
            listed = ", ".join([*known, *_SECTIONS])
            raise SettingError(f"{source}: setting '{key}' is unknown; known settings here: {listed}")
    try:
        general = MonitorConfig(**top)
    except SettingError as e:
        raise SettingError(f"{source}: {e}") from None
    classes = general.probe_classes()
    names = [cls.name for cls in classes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MemwatchError(f"{source}: setting 'custom_probes': probe name(s) {twice} are used twice")
    probes_in = mapping("probes")
    sampling_in = _moved_sampling_settings(mapping("sampling"), probes_in, source)
    for key in probes_in:
        if key not in names:
            raise SettingError(
                f"{source}: setting 'probes.{key}' is unknown; known probes: {', '.join(names)} "
                "(list your own probes' import paths under custom_probes)"
            )
    for key in probes_in:
        if probes_in[key] is not None and not isinstance(probes_in[key], Mapping):
            raise SettingError(f"{source}: setting 'probes.{key}' must be a mapping, got {probes_in[key]!r}")
    probes = {cls.name: build_section(cls.Settings, probes_in.get(cls.name), source=source) for cls in classes}
    rules_raw = user["rules"] if "rules" in user else default_rules(classes)
    return dataclasses.replace(
        general,
        embedder=build_section(EmbedderConfig, mapping("embedder"), source=source),
        sampling=build_section(SamplingSettings, sampling_in, source=source),
        cadence=build_section(CadenceSettings, mapping("cadence"), source=source),
        probes=probes,
        rules=parse_rules(rules_raw, source),
        default_rules="rules" not in user,
        source=source,
    )


def legacy_probe_hash(probe: Probe, config: MonitorConfig, stored: Mapping[str, Any]) -> str | None:
    """The key under which memwatch before the ``sampling`` section (0.1) stored this probe's results on a run it
    started, when those results measured what ``probe`` measures now under ``config``; else None.

    Such a run's stored config (``stored``) has no ``sampling`` section: the samples were set under
    ``probes.regurgitation``, and a result's key hashed the probe's whole settings (its cadence too) and the
    embedder. Its results count as measured only if everything :meth:`Probe.result_key` depends on is the
    same then and now, so a setting changed since the upgrade still measures again.

    Args:
        probe: the probe now.
        config: the config now.
        stored: the config the run was created with.
    """
    probes, embedder = stored.get("probes"), stored.get("embedder")
    if "sampling" in stored or not isinstance(probes, Mapping) or not isinstance(embedder, Mapping):
        return None
    then_settings = probes.get(probe.name)
    if not isinstance(then_settings, Mapping):
        return None
    old_samples = probes.get(_OLD_SAMPLING_PROBE)
    old_samples = old_samples if isinstance(old_samples, Mapping) else {}
    sampling_names = {n for n, _, _ in declarations(SamplingSettings)}
    own = {
        k: v
        for k, v in then_settings.items()
        if k != "every" and not (probe.name == _OLD_SAMPLING_PROBE and k in sampling_names)
    }
    then: dict[str, Any] = {"probe": probe.name, "settings": own}
    if probe.needs_samples:
        then["sampling"] = {k: old_samples.get(k) for k in SAMPLE_KEYS}
    if probe.uses_embedder:
        then["embedder"] = dict(embedder)
    if then != probe.result_key(config.sampling, config.raw["embedder"]):
        return None
    return config_hash({"probe": probe.name, "settings": dict(then_settings), "embedder": dict(embedder)})


def _moved_sampling_settings(sampling: dict[str, Any], probes_in: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``sampling`` section, with the sample settings an older config set under ``probes.regurgitation``
    moved into it (taken out of ``probes_in``; one warning names them)."""
    old = probes_in.get(_OLD_SAMPLING_PROBE)
    if not isinstance(old, Mapping):
        return sampling
    names = [n for n, _, _ in declarations(SamplingSettings) if n != "every"]
    moved = {k: old[k] for k in old if k in names}
    if not moved:
        return sampling
    both = sorted(set(moved) & set(sampling))
    if both:
        raise SettingError(
            f"{source}: setting 'sampling.{both[0]}' is also set as 'probes.{_OLD_SAMPLING_PROBE}.{both[0]}': keep it "
            "under sampling only"
        )
    probes_in[_OLD_SAMPLING_PROBE] = {k: v for k, v in old.items() if k not in moved}
    keys = ", ".join(moved)
    log.warning(
        "%s: probes.%s.{%s} are read as sampling.{%s}: the shared samples have their own section now; move them there",
        source, _OLD_SAMPLING_PROBE, keys, keys,
    )  # fmt: skip
    return {**sampling, **moved}


def _resolve_paths(config: MonitorConfig, base: Path) -> None:
    for section in (config, config.embedder, *config.probes.values()):
        for name, _, info in declarations(type(section)):
            value = getattr(section, name)
            if info.path and value is not None and not Path(str(value)).expanduser().is_absolute():
                if str(value).startswith("hf:"):
                    continue  # a Hugging Face dataset name, not a path
                setattr(section, name, str(base / str(value)))
