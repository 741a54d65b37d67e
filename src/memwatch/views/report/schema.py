"""JSON Schema (draft 2020-12) of the report's ``--json`` output; ``memwatch report --schema`` prints it.

The schema is strict where a reader relies on the shape (every section and field is required, objects
reject unknown keys) and open where the content is the run's own (its config, event evidence, recorded
environment). It uses only the core keywords ``type``, ``properties``, ``required``,
``additionalProperties``, ``items``, ``enum``, ``const``, ``minimum``, ``maximum``, ``minItems``,
``maxItems``, ``pattern``, ``anyOf`` and ``$ref``/``$defs``, so any draft-2020-12 validator can check it.
"""

from __future__ import annotations

import copy
from typing import Any

from memwatch.views.report.build import FORMAT, FORMAT_VERSION, VERDICTS

SCHEMA_ID = f"https://memwatch.invalid/schemas/report-v{FORMAT_VERSION}.json"  # an identifier, never fetched

_NUM = {"type": ["number", "null"]}  # null: undefined (NaN) or not recorded
_INT = {"type": ["integer", "null"]}
_STR = {"type": ["string", "null"]}
_BOOL = {"type": ["boolean", "null"]}
_SHA256 = {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"}
_PNG_URI = {"type": ["string", "null"], "pattern": "^data:image/(png|jpeg);base64,[A-Za-z0-9+/]*={0,2}$"}
_SEVERITY = {"enum": ["info", "warning", "critical"]}


#: A ranked image or caption at risk (memwatch.signals.image_risk) with its closest sample.
_RISK_ROW = {
    "rank": {"type": "integer", "minimum": 1},
    "at_risk": {"enum": [0, 1]},
    "first_copy_step": _INT,
    "copies": {"type": "integer", "minimum": 0},
    "forecast_step": _INT,
    "ratio_now": _NUM,
    "ratio_min": _NUM,
    "ratio_min_step": _INT,
    "ratio_min_seed": _INT,
    "ratio_min_sample": _STR,
    "image": _PNG_URI,
    "image_source": _STR,
}
_IDENTITY_ROW = {
    "step": {"type": "integer"},
    "kind": {"type": "string"},
    "sample": _STR,
    "seed": _INT,
    "identity": _STR,
    "identity_item": _STR,
    "similarity": _NUM,
    "image": _PNG_URI,
    "image_source": _STR,
}


def _obj(props: dict[str, Any], *, open_: bool = False) -> dict[str, Any]:
    """An object with exactly ``props`` (all required), or at least them when ``open_``."""
    return {"type": "object", "properties": props, "required": sorted(props), "additionalProperties": open_}


def _list(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


_DEFS: dict[str, Any] = {
    "reason": _obj(
        {
            "source": {"enum": ["event", "metric"]},
            "rule": {"type": "string"},
            "severity": _SEVERITY,
            "metric": _STR,
            "op": {"enum": [">", ">=", "<", "<=", None]},
            "threshold": _NUM,
            "value": _NUM,
            "step": _INT,
            "forecast_step": _INT,
            "message": {"type": "string"},
        }
    ),
    "snapshot_verdict": _obj(
        {
            "snapshot_id": {"type": "integer"},
            "step": {"type": "integer"},
            "kind": {"type": "string"},
            "path": _STR,
            "weights_sha256": _SHA256,
            "weights": {"enum": ["raw", "ema", None]},
            "sightings": _list({"$ref": "#/$defs/sighting"}),
            "scheduler_source": _STR,
            "scheduler_guessed": {"type": "boolean"},
            "verdict": {"enum": list(VERDICTS)},
            "reasons": _list({"$ref": "#/$defs/reason"}),
            "mem_fraction": {
                "anyOf": [
                    {"type": "null"},
                    _obj(
                        {
                            "value": {"type": "number", "minimum": 0, "maximum": 1},
                            "num_samples": _INT,
                            "memorized": _INT,
                            "ci95": {
                                "type": ["array", "null"],
                                "items": {"type": "number", "minimum": 0, "maximum": 1},
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        }
                    ),
                ]
            },
        }
    ),
    "sighting": _obj(
        {
            "step": {"type": "integer"},
            "kind": {"enum": ["live", "checkpoint", "final"]},
            "path": _STR,
            "status": {"enum": ["live", "current", "superseded", "deleted"]},
        }
    ),
    "checkpoint_ref": _obj(
        {"step": {"type": "integer"}, "path": _STR, "weights_sha256": _SHA256, "exists": {"type": "boolean"}}
    ),
    "point": _obj({"step": {"type": "integer"}, "value": _NUM}),
    "forecast": _obj(
        {
            "step": _INT,
            "rule": {"type": "string"},
            "severity": _SEVERITY,
            "metric": _STR,
            "value": _NUM,
            "threshold": _NUM,
            "forecast_step": {"type": "integer"},
        }
    ),
    "event": _obj(
        {
            "step": _INT,
            "rule": {"type": "string"},
            "severity": _SEVERITY,
            "metric": _STR,
            "value": _NUM,
            "threshold": _NUM,
            "forecast_step": _INT,
            "message": {"type": "string"},
            "evidence": {"type": "object"},
            "created_at": {"type": "number"},
            "created_at_utc": {"type": "string"},
        }
    ),
    "intervention": _obj(
        {
            "step": _INT,
            "kind": {"type": "string"},
            "images": _list({"type": "string"}),
            "images_total": {"type": "integer", "minimum": 0},
            "detail": {"type": "object"},
            "error": _STR,
            "created_at_utc": {"type": "string"},
        }
    ),
    "sample": _obj(
        {
            "step": {"type": "integer"},
            "kind": {"type": "string"},
            "probe": {"type": "string"},
            "result_id": {"type": "integer"},
            "sample": {"type": "string"},
            "seed": _INT,
            "nn1": _STR,
            "d1": _NUM,
            "d2": _NUM,
            "ratio": _NUM,
            "similarity": _NUM,
            "extraction": _NUM,
            "memorized": _BOOL,
            "copied": _BOOL,
            "extracted": _BOOL,
            "image": _PNG_URI,
            "image_source": _STR,
        }
    ),
    "at_risk_image": _obj(
        {
            **_RISK_ROW,
            "training_id": {"type": "string"},
            "training_copies": {"type": ["integer", "null"], "minimum": 1},
        }
    ),
    "at_risk_prompt": _obj(
        {
            **_RISK_ROW,
            "prompt": {"type": "string"},
            "group": {"enum": ["member", "holdout", None]},
            "copies_image": _STR,
            "own_image": _BOOL,
        }
    ),
    "training_image": _obj(
        {
            "id": {"type": "string"},
            "file_status": {"enum": ["ok", "missing", "unreadable", "outside-root", "no-reference-root"]},
            "file_sha256": _SHA256,
            "thumbnail": _PNG_URI,
            "thumbnail_source": {"enum": ["reference file", "evidence grid", None]},
        }
    ),
    "first_seen": _obj(
        {
            "training_id": {"type": "string"},
            "first_step": {"type": "integer"},
            "first_seeds": _list({"type": "integer"}),
            "total_hits": {"type": "integer", "minimum": 1},
        }
    ),
    "identity_leak": _obj(_IDENTITY_ROW),
    "identity_blend": _obj(
        {
            **_IDENTITY_ROW,
            "parent_a": _STR,
            "parent_b": _STR,
            "sim_a": _NUM,
            "sim_b": _NUM,
            "slerp_t": _NUM,
            "slerp_similarity": _NUM,
        }
    ),
    "identity_first_seen": _obj(
        {
            "identity": {"type": "string"},
            "first_step": {"type": "integer"},
            "first_seeds": _list({"type": "integer"}),
            "leaks": {"type": "integer", "minimum": 1},
            "max_similarity": _NUM,
        }
    ),
    "evidence_file": _obj(
        {
            "probe": {"type": "string"},
            "step": {"type": "integer"},
            "path": {"type": "string"},
            "exists": {"type": "boolean"},
            "sha256": _SHA256,
            "image": _PNG_URI,
        }
    ),
    "set_summary": {
        "anyOf": [
            {"type": "null"},
            {
                "type": "object",
                "properties": {
                    "root": {"type": "string"},
                    "n": {"type": "integer", "minimum": 0},
                    "skipped": {"type": "integer", "minimum": 0},
                    "manifest_sha256": _SHA256,
                },
                "required": ["n", "manifest_sha256"],
                "additionalProperties": True,
            },
        ]
    },
    "threshold": _obj(
        {
            "kind": {"enum": ["rule", "setting"]},
            "name": {"type": "string"},
            "metric": _STR,
            "op": _STR,
            "value": {"type": ["number", "string", "boolean", "null"]},
            "severity": _STR,
            "details": {"type": "object"},
            "source": {"type": "string"},
            "packaged_default": {"type": "boolean"},
        }
    ),
    "probe_run": _obj(
        {
            "result_id": {"type": "integer"},
            "step": {"type": "integer"},
            "kind": {"type": "string"},
            "probe": {"type": "string"},
            "status": {"enum": ["ok", "failed"]},
            "error": _STR,
            "config_hash": {"type": "string"},
            "host": _STR,
            "started_at": _NUM,
            "started_at_utc": _STR,
            "finished_at": {"type": "number"},
            "finished_at_utc": {"type": "string"},
            "duration_s": _NUM,
            "timings": {"type": "object", "additionalProperties": _NUM},
            "evidence": _list({"type": "string"}),
        }
    ),
    "limitation": _obj({"code": {"type": "string", "pattern": "^[a-z0-9-]+$"}, "message": {"type": "string"}}),
}

_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "memwatch audit report",
    "description": "Did a diffusion model reproduce training images or identities, since when, how sure, and "
    "exactly what was audited. Numbers that are undefined (NaN) are null.",
    **_obj(
        {
            "format": {"const": FORMAT},
            "format_version": {"const": FORMAT_VERSION},
            "generator": _obj({"memwatch": {"type": "string"}}),
            "redacted": {"type": "boolean"},
            "run": _obj(
                {"name": {"type": "string"}, "created_at": {"type": "number"}, "created_at_utc": {"type": "string"}}
            ),
            "verdict": _obj(
                {
                    "definition": {"type": "string"},
                    "overall": _obj(
                        {
                            "verdict": {"enum": list(VERDICTS)},
                            "since_step": _INT,
                            "reasons": _list({"$ref": "#/$defs/reason"}),
                            "onset_step": _INT,
                            "identity_onset_step": _INT,
                            "first_alarm_step": _INT,
                            "last_clean_step": _INT,
                            "last_clean_checkpoint": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/checkpoint_ref"}]},
                            "last_clean_checkpoint_on_disk": {
                                "anyOf": [{"type": "null"}, {"$ref": "#/$defs/checkpoint_ref"}]
                            },
                            "snapshots": {"type": "integer", "minimum": 0},
                            "snapshots_by_verdict": _obj({v: {"type": "integer", "minimum": 0} for v in VERDICTS}),
                        }
                    ),
                    "snapshots": _list({"$ref": "#/$defs/snapshot_verdict"}),
                }
            ),
            "curves": _obj(
                {
                    "metrics": {"type": "object", "additionalProperties": _list({"$ref": "#/$defs/point"})},
                    "forecasts": _list({"$ref": "#/$defs/forecast"}),
                    "mem_ratio": {"type": "number"},
                    "images": _obj({"headline": _PNG_URI, "curves": _PNG_URI, "seeds": _PNG_URI, "images": _PNG_URI}),
                }
            ),
            "events": _list({"$ref": "#/$defs/event"}),
            "interventions": _list({"$ref": "#/$defs/intervention"}),
            "evidence": _obj(
                {
                    "samples": _list({"$ref": "#/$defs/sample"}),
                    "training_images": _list({"$ref": "#/$defs/training_image"}),
                    "first_seen": _list({"$ref": "#/$defs/first_seen"}),
                    "at_risk_images": _list({"$ref": "#/$defs/at_risk_image"}),
                    "at_risk_prompts": _list({"$ref": "#/$defs/at_risk_prompt"}),
                    "identities": _obj(
                        {
                            "probed": {"type": "boolean"},
                            "leaks": _list({"$ref": "#/$defs/identity_leak"}),
                            "interpolations": _list({"$ref": "#/$defs/identity_blend"}),
                            "first_seen": _list({"$ref": "#/$defs/identity_first_seen"}),
                        }
                    ),
                    "files": _list({"$ref": "#/$defs/evidence_file"}),
                }
            ),
            "training_set": _obj(
                {
                    "status": {"enum": ["analysed", "failed", "not-analysed"]},
                    "error": _STR,
                    "manifest_sha256": _STR,
                    "matches_reference": {"type": "boolean"},
                    "n": _INT,
                    "distinct": _INT,
                    "exact_duplicate_images": _INT,
                    "near_duplicate_groups": _INT,
                    "near_threshold": _NUM,
                    "near_threshold_source": _STR,
                    "isolation_rule": _STR,
                    "duplicate_groups": _list(
                        _obj(
                            {
                                "kind": {"enum": ["exact", "near"]},
                                "ids": _list({"type": "string"}),
                                "min_similarity": _NUM,
                            }
                        )
                    ),
                    "duplicate_groups_total": {"type": "integer", "minimum": 0},
                    "isolated": _list({"type": "string"}),
                    "isolated_total": {"type": "integer", "minimum": 0},
                }
            ),
            "provenance": _obj(
                {
                    "weights": _list(
                        _obj(
                            {
                                "step": {"type": "integer"},
                                "kind": {"type": "string"},
                                "path": _STR,
                                "status": {"enum": ["live", "current", "superseded", "deleted"]},
                                "weights_sha256": _SHA256,
                                "weights": {"enum": ["raw", "ema", None]},
                            }
                        )
                    ),
                    "reference": {"$ref": "#/$defs/set_summary"},
                    "holdout": {"$ref": "#/$defs/set_summary"},
                    "config": {"type": "object"},
                    "config_hash": {"type": "string"},
                    "config_hash_verified": {"type": "boolean"},
                    "config_sha256": _SHA256,
                    "thresholds": _list({"$ref": "#/$defs/threshold"}),
                    "versions": {"type": "object", "additionalProperties": _STR},
                    "host": _STR,
                    "torch_threads": _INT,
                    "embedder": _obj(
                        {
                            "name": {"type": "string"},
                            "settings": {"type": "object"},
                            "weights_identity": {"type": "string"},
                            "recorded": {"type": ["object", "null"]},
                        }
                    ),
                    "probe_runs": _list({"$ref": "#/$defs/probe_run"}),
                }
            ),
            "record": _obj(
                {
                    "chain": {"type": "string"},
                    "head": _obj({"seq": {"type": "integer", "minimum": 0}, "sha256": _SHA256}),
                    "records": {"type": "integer", "minimum": 0},
                    "adopted": {"type": "integer", "minimum": 0},
                    "starts_at": {"type": "integer", "minimum": 1},
                    "intact": {"type": "boolean"},
                    "findings": _list({"type": "string"}),
                }
            ),
            "coverage": _obj(
                {
                    "items": _list(
                        _obj(
                            {
                                "document": {"type": "string"},
                                "item": {"type": "string"},
                                "answer": {"type": "string"},
                                "fields": _list({"type": "string"}),
                            }
                        )
                    ),
                    "does_not_establish": _list({"type": "string"}),
                }
            ),
            "paths": _obj(
                {
                    "relative_to": {"type": "string"},
                    "absolute": {"type": "boolean"},
                    "cut": _list({"type": "string"}),
                }
            ),
            "limitations": _list({"$ref": "#/$defs/limitation"}),
        }
    ),
    "$defs": _DEFS,
}


def report_schema() -> dict[str, Any]:
    """The JSON Schema of :func:`memwatch.views.report.build_report`'s output (a fresh copy).

    Example:
        >>> report_schema()["properties"]["format"]
        {'const': 'memwatch-report'}
    """
    return copy.deepcopy(_SCHEMA)
