"""Where each threshold of an audit comes from, for the report's provenance table.

Nothing is written down here: every source comes from a declaration. A threshold setting is declared
with ``threshold=True`` and its ``source`` (:mod:`memwatch.settings`), a default rule carries a
``source`` (each probe's ``default_rules``), and an embedder names the source of its built-in copy
threshold (``copy_threshold_source``).

A run's value is credited to a source only when it equals the packaged default (a rule: every
setting equal); a value the run's own configuration changed is reported as such, with the packaged
default's source beside it, so nobody mistakes a custom threshold for a published one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memwatch.core.config import load_config
from memwatch.core.registry import known_classes
from memwatch.errors import MemwatchError
from memwatch.settings import declarations

CUSTOM = "set by the run's configuration; no published source recorded"


def packaged_defaults(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The packaged defaults as plain data (what ``configs/default.yaml`` holds), with the declared
    defaults of the run's custom probes where they can be imported here.

    Example:
        >>> packaged_defaults()["probes"]["regurgitation"]["extraction_n"]
        50
    """
    custom = (config or {}).get("custom_probes")
    if isinstance(custom, list) and custom:
        try:
            return load_config({"custom_probes": custom}).raw
        except MemwatchError:
            pass  # a custom probe that cannot be imported here: its rules and settings have no known source
    return load_config(None).raw


def threshold_settings(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(path, source)`` of every setting declared as a threshold, for the built-in probes and the
    run's importable custom probes, in declaration order.

    Example:
        >>> threshold_settings({})[0]
        ('probes.regurgitation.mem_ratio', 'd1/d2 < 1/3: Gu et al. 2023 (mem_ratio.py), Bonnaire et al. 2025 (f_mem)')
    """
    custom = config.get("custom_probes") if isinstance(config.get("custom_probes"), list) else []
    out = []
    # a custom probe that cannot be imported here is left out: its thresholds are shown without a source
    for cls in known_classes([str(spec) for spec in custom]):
        for name, _, info in declarations(cls.Settings):
            if info.threshold:
                out.append((f"probes.{cls.name}.{name}", info.source or CUSTOM))
    return out


def dig(d: Any, path: str) -> Any:
    """``d["a"]["b"]`` for ``path = "a.b"``; None where a level is missing.

    Example:
        >>> dig({"a": {"b": 2}}, "a.b"), dig({}, "a.b")
        (2, None)
    """
    for key in path.split("."):
        d = d.get(key) if isinstance(d, Mapping) else None
    return d


def setting_source(path: str, known: str, value: Any, defaults: Mapping[str, Any]) -> tuple[str, bool]:
    """Source text of a threshold setting and whether the run's value is the packaged default.

    Args:
        path: setting path, e.g. ``"probes.regurgitation.mem_ratio"``.
        known: the declared source of its default.
        value: the run's value.
        defaults: :func:`packaged_defaults`.

    Example:
        >>> setting_source("probes.regurgitation.extraction_n", "Carlini", 50, packaged_defaults())
        ('Carlini', True)
    """
    default = dig(defaults, path)
    if _same(value, default):
        return known, True
    return f"set by the run's configuration (packaged default {default!r}: {known})", False


def rule_source(rule: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[str, bool]:
    """Source text of a rule and whether it is exactly the packaged default rule of that name.

    Example:
        >>> rule = packaged_defaults()["rules"][0]
        >>> rule_source(rule, packaged_defaults())[1]
        True
    """
    name = rule.get("name")
    packaged = next((r for r in defaults.get("rules") or [] if r.get("name") == name), None)
    known = packaged.get("source") if packaged else None
    if packaged is None or known is None:
        own = rule.get("source")
        return (f"set by the run's configuration: {own}" if own else CUSTOM), False
    keys = (set(packaged) | set(rule)) - {"message", "source"}
    if all(_same(rule.get(k), packaged.get(k)) for k in keys):
        return known, True
    return f"set by the run's configuration (changed from the packaged rule of that name: {known})", False


def _same(a: Any, b: Any) -> bool:
    """Equal values, with numbers compared as numbers (YAML ``0`` vs stored ``0.0``)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b
