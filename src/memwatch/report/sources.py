"""Where each threshold of an audit comes from, for the report's provenance table.

The packaged ``configs/default.yaml`` names the source of every threshold in a YAML comment. Comments
are not data (a YAML loader drops them, and their wording is free), so the report does not parse
them: the sources are written down here once, keyed by the setting's path or the default rule's name,
and kept in step with ``default.yaml`` by ``tests/test_report.py``, which checks that every threshold
the packaged defaults set has an entry here.

A run's value is credited to a source only when it equals the packaged default (a rule: every
setting equal); a value the run's own configuration changed is reported as such, with the packaged
default's source beside it, so nobody mistakes a custom threshold for a published one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULTS_YAML = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

#: Probe and embedder settings that act as thresholds: setting path -> source of the packaged default.
SETTING_SOURCES: dict[str, str] = {
    "probes.regurgitation.mem_ratio": ("d1/d2 < 1/3: Gu et al. 2023 (mem_ratio.py), Bonnaire et al. 2025 (f_mem)"),
    "probes.regurgitation.extraction_alpha": "Carlini et al. 2023 (alpha = 0.5)",
    "probes.regurgitation.extraction_n": "Carlini et al. 2023 (n = 50 nearest training images)",
    "probes.identity.threshold": (
        "null: the face verification threshold is calibrated on the gallery's impostor pairs at target_fmr"
    ),
    "probes.identity.target_fmr": (
        "false-match rate 1e-4: the TAR@FAR=1e-4 operating point of face verification benchmarks (IJB-B/IJB-C)"
    ),
    "probes.identity.fallback_threshold": (
        "FaceNet (Schroff et al. 2015): squared l2 1.1 between unit embeddings, i.e. cosine 0.45"
    ),
    "probes.identity.balance_tolerance": (
        "memwatch heuristic (faces/config.py): a blend matches both parents about equally"
    ),
    "probes.identity.slerp_end_margin": (
        "morphing data sets blend two faces at 0.5 (Scherhag et al. 2019): the middle half of the A-B slerp arc"
    ),
    "probes.identity.min_face_prob": "facenet-pytorch's own cut-off for a confident face (MTCNN select_boxes)",
}

#: The embedders' built-in copy thresholds (used when ``embedder.copy_threshold`` is null).
COPY_THRESHOLD_SOURCES: dict[str, str] = {
    "pixel": (
        "memwatch heuristic (embedders/pixel.py): 1 - normalised l2 >= 0.95; extracted CIFAR-10 samples of "
        "Carlini et al. 2023 lie about this close to their training image"
    ),
    "clip": (
        "CLIP de-duplication practice (embedders/clip.py; e.g. Webster et al. 2023): cosine >= 0.95 is a near-duplicate"
    ),
}

#: Default rules (by name) -> the source their comment in ``default.yaml`` gives.
RULE_SOURCES: dict[str, str] = {
    "first-regurgitation": ("Gu et al. 2023: any sample with d1/d2 < 1/3 is a copy, so the first one marks the onset"),
    "mem-fraction-rising": (
        "memwatch default: 10% of samples copying is far past onset for a generative model; the trend "
        "rule warns before it is reached"
    ),
    "mem-fraction-high": (
        "memwatch default: 10% of samples copying is far past onset for a generative model (sustained for 2 probes)"
    ),
    "first-identity-leak": (
        "a generated face verifies against a training identity at the calibrated false-match rate (default 1e-4)"
    ),
    "identity-leak-high": (
        "memwatch default: 10% of generated faces being training identities, sustained for 2 probes"
    ),
    "first-identity-blend": (
        "MMPMR-style (Scherhag et al. 2017): the face verifies against two training identities that do not "
        "verify against each other"
    ),
    "condnoise-separable": (
        "Hanley & McNeil 1982: with 32 vs 32 prompts the AUC's standard error at 0.5 is about 0.07, so 0.7 is "
        "about 3 SE; the signal is Wen et al. (ICLR 2024)"
    ),
    "membership-separable": (
        "Hanley & McNeil 1982: with 64 members vs 64 holdout the AUC's standard error at 0.5 is about 0.05; "
        "0.6 sustained over 3 probes is well beyond chance"
    ),
}

CUSTOM = "set by the run's configuration; no published source recorded"


def packaged_defaults() -> dict[str, Any]:
    """The packaged ``default.yaml`` as a dict.

    Example:
        >>> packaged_defaults()["probes"]["regurgitation"]["extraction_n"]
        50
    """
    with open(DEFAULTS_YAML, encoding="utf-8") as f:
        return yaml.safe_load(f)


def dig(d: Any, path: str) -> Any:
    """``d["a"]["b"]`` for ``path = "a.b"``; None where a level is missing.

    Example:
        >>> dig({"a": {"b": 2}}, "a.b"), dig({}, "a.b")
        (2, None)
    """
    for key in path.split("."):
        d = d.get(key) if isinstance(d, Mapping) else None
    return d


def setting_source(path: str, value: Any, defaults: Mapping[str, Any]) -> tuple[str, bool]:
    """Source text of a threshold setting and whether the run's value is the packaged default.

    Args:
        path: setting path, e.g. ``"probes.regurgitation.mem_ratio"``.
        value: the run's value.
        defaults: :func:`packaged_defaults`.

    Example:
        >>> setting_source("probes.regurgitation.extraction_n", 50, packaged_defaults())
        ('Carlini et al. 2023 (n = 50 nearest training images)', True)
    """
    known = SETTING_SOURCES.get(path)
    default = dig(defaults, path)
    if known is None:
        return CUSTOM, False
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
    known = RULE_SOURCES.get(str(name))
    if packaged is None or known is None:
        return CUSTOM, False
    keys = set(packaged) | set(rule)
    if all(_same(rule.get(k), packaged.get(k)) for k in keys if k != "message"):
        return known, True
    return f"set by the run's configuration (changed from the packaged rule of that name: {known})", False


def _same(a: Any, b: Any) -> bool:
    """Equal values, with numbers compared as numbers (YAML ``0`` vs stored ``0.0``)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b
