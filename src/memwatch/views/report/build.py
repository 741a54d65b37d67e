"""Collect the content of an audit report from a run's store.

The report is a view over the store (DESIGN.md): everything comes from the store file, plus two kinds of
image files the store names: the reference (training) images, resolved by id under the run's
``reference.root``, for evidence thumbnails, and the probes' evidence grids (paths relative to the
memwatch folder), from which each flagged sample's pixels are cut. A file that is gone is reported in
the limitations, never a reason to fail.

The result is a plain dict of JSON types (the ``--json`` output and the input of
:func:`memwatch.views.report.html.render_html`). It carries no time stamp of its own and every list has a
fixed order, so the same store gives the same bytes. Non-finite numbers (NaN: undefined) become
``null``.

Verdicts (also stated in the report, :data:`VERDICT_DEFINITION`):

* ``memorizing``: a ``critical`` event at or before the snapshot's step, or a value measured at the
  snapshot or an earlier one that meets a critical ``threshold``/``first`` rule's condition (its
  ``for`` count aside);
* ``warning``: otherwise, a ``warning`` event at or before the snapshot's step;
* ``clean``: otherwise, when at least one probe succeeded on the snapshot;
* ``unaudited``: no probe succeeded on the snapshot and no event applies to it.

Events and critical measurements count cumulatively: a model that once reproduced a training image
is not cleared by a later checkpoint that happens not to.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memwatch.core.declared import Declarations, load_run
from memwatch.core.probe import MAIN_PANEL, ProbeRecord
from memwatch.errors import MemwatchError
from memwatch.hashing import canonical_json, config_hash, sha256_bytes
from memwatch.signals.forecast import MIN_POINTS, sparse_samples_message
from memwatch.signals.image_risk import ImageRisk, image_trajectories, rank_images
from memwatch.signals.rules import FORECAST, OPS
from memwatch.store import Store
from memwatch.store.history import RunHistory, find_store, run_folder
from memwatch.store.ledger import LedgerCheck
from memwatch.version import __version__
from memwatch.views.curves import curves_figure, images_figure, seeds_figure
from memwatch.views.headline import headline_figure
from memwatch.views.plotting import DPI, PNG_METADATA
from memwatch.views.report import sources
from memwatch.views.report.common import IDENTITY, REGURGITATION, Limits, data_uri
from memwatch.views.report.coverage import coverage
from memwatch.views.report.evidence import ReferenceFiles, collect_evidence, sample_crops
from memwatch.views.report.paths import make_portable
from memwatch.views.report.training_set import training_set_section

FORMAT = "memwatch-report"
FORMAT_VERSION = 1
#: Verdicts from least to most severe; a run's overall verdict is its worst snapshot's.
VERDICTS = ("unaudited", "clean", "at-risk", "warning", "memorizing")
VERDICT_DEFINITION = (
    "Per snapshot (checkpoint or live model at a step): 'memorizing' if a critical event fired at or "
    "before its step, or a value measured on it or an earlier snapshot meets a critical threshold/first "
    "rule's condition (e.g. mem_fraction at or above the critical rule's threshold; the rule's 'for' "
    "count aside); "
    "'warning' otherwise if a warning event fired at or before its step; 'at-risk' if the only such events "
    "are onset forecasts (copying forecast within the rule's horizon, nothing copied yet); 'clean' otherwise "
    "if at least one probe succeeded on it; 'unaudited' if none did and no event applies. Events and critical "
    "measurements count cumulatively: a model that once reproduced training images is not cleared by a "
    "later checkpoint. "
    "The run's verdict is its worst snapshot's. Onset step: first step at which a generated sample "
    "was memorized (d1/d2 below mem_ratio). Last clean checkpoint: the last saved checkpoint before "
    "the first snapshot that is not clean."
)
# Two-sided 95% standard normal quantile, for Wilson's (1927) score interval on mem_fraction.
Z95 = 1.959963984540054


def build_report(
    run_dir: str | Path, *, run: str | None = None, redact: bool = False, absolute_paths: bool = False
) -> dict[str, Any]:
    """Build the audit report of one run as a dict of JSON types (see :mod:`memwatch.views.report.schema`).

    Args:
        run_dir: the training output dir (with ``memwatch/``), the memwatch folder, or the store file.
        run: run name in the store; default the most recently created run.
        redact: leave out every training and generated pixel (thumbnails, sample crops, evidence
            images); ids, hashes and scores stay. The curve plots stay: they show numbers only.
        absolute_paths: keep paths as the store recorded them; by default they are relative to the run folder,
            and any other absolute path is cut to its last part (:mod:`memwatch.views.report.paths`).

    Returns:
        The report content; :func:`report_json` serialises it.

    Raises:
        MemwatchError: no store, no run, or an unknown run name.

    Example:
        >>> report = build_report("out/", redact=True)  # doctest: +SKIP
        >>> report["verdict"]["overall"]["verdict"]  # doctest: +SKIP
        'warning'
    """
    store_path = find_store(run_dir)
    store_dir = store_path.parent
    with Store(store_path, readonly=True) as store:
        history = load_run(store, run)
        item_rows = store.items(history.run_id)
        record = store.check_record()
    identity_rows = [r for r in item_rows if r["probe"] == IDENTITY]
    info, config, rules = history.info, history.config, history.rules
    snapshots, results, metric_rows = history.snapshots, history.results, history.metric_rows
    matches, events = history.matches, history.events
    limits = Limits()
    refs = ReferenceFiles(info.get("reference"), store_dir, limits)
    declared = Declarations.of_config(config)
    probes = {cls.name: cls for cls in declared.classes}
    crops = {} if redact else sample_crops(results, matches, item_rows, store_dir, refs, limits, probes)

    copies = history.training_copies
    risks = rank_images(image_trajectories(history.seeds), threshold=history.mem_ratio, training_copies=copies)
    verdict = _verdicts(declared, snapshots, results, metric_rows, matches, identity_rows, events, rules)
    report = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": {"memwatch": __version__},
        "redacted": bool(redact),
        "run": {"name": info["name"], "created_at": info["created_at"], "created_at_utc": _utc(info["created_at"])},
        "verdict": verdict,
        "curves": _curves(history, risks),
        "events": [_event(e) for e in events],
        "interventions": [_intervention(i) for i in history.interventions],
        "evidence": collect_evidence(
            history, matches, identity_rows, results, crops, refs, store_dir, redact, limits, risks
        ),
        "training_set": training_set_section(history.training_set, info.get("reference"), limits),
        "provenance": _provenance(info, config, snapshots, results, metric_rows, limits),
        "limitations": [],
    }
    report["record"] = _record(record, limits)
    report["coverage"] = coverage()
    _general_limits(report, info, snapshots, results, redact, limits)
    _probe_limits(declared, info, config, results, matches, metric_rows, item_rows, limits)
    report["limitations"] = limits.ordered()
    report = _json_safe(report)
    cut: list[str] = []
    if not absolute_paths:
        report, cut = make_portable(report, run_folder(store_path))
        if cut:
            report["limitations"].append({
                "code": "paths-cut",
                "message": f"{len(cut)} text(s) held absolute paths outside the run folder; each is cut to its last "
                "part (listed under paths.cut): memwatch report --absolute-paths keeps them",
            })  # fmt: skip
    report["paths"] = {"relative_to": "the run folder", "absolute": bool(absolute_paths), "cut": cut}
    return report


def _record(check: LedgerCheck, limits: Limits) -> dict[str, Any]:
    """The store's hash chain as the report states it (its head is what an attestation signs)."""
    if check.findings:
        limits.add(
            "record-altered",
            f"the store's hash chain does not match {len(check.findings)} record(s) or entries: the store was changed "
            f"outside memwatch after it was written (first: {check.findings[0]}); memwatch verify lists them all",
        )
    if check.adopted:
        limits.add(
            "record-adopted",
            f"the first {check.adopted} record(s) were written before the store kept a hash chain and were adopted "
            f"into it when it was upgraded: edits after that are evident, what happened to them before is not; "
            f"the chain records writes as they happened from entry {check.starts_at} on",
        )
    return {
        "chain": "sha256 hash chain over every stored record, each entry over the record's RFC 8785 canonical JSON "
        "and the entry before it (memwatch.store.ledger)",
        "head": check.head.to_dict(),
        "records": check.records,
        "adopted": check.adopted,
        "starts_at": check.starts_at,
        "intact": check.ok,
        "findings": list(check.findings),
    }


def report_json(report: Mapping[str, Any]) -> str:
    """The report as JSON text: sorted keys, two-space indent, no NaN, one trailing newline.

    Example:
        >>> report_json({"b": 1, "a": None})
        '{\\n  "a": null,\\n  "b": 1\\n}\\n'
    """
    return json.dumps(report, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------
# Verdicts


def _verdicts(
    declared: Declarations,
    snapshots: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    metric_rows: Sequence[Mapping[str, Any]],
    matches: Sequence[Mapping[str, Any]],
    identity_rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    rules: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    ops = {r["name"]: r.get("op", "<=") for r in rules if isinstance(r.get("name"), str)}
    forecasts = {r["name"] for r in rules if r.get("type") == FORECAST}
    critical_rules = [r for r in rules if r.get("severity") == "critical" and r.get("type") in ("threshold", "first")]
    probed_ok = {r["snapshot_id"] for r in results if r["status"] == "ok"}
    values = _values_by_snapshot(metric_rows)
    rows = []
    # Critical values measured on earlier snapshots count cumulatively, like events: (step, reason).
    measured: list[tuple[int, Any, Any]] = []
    for snap in snapshots:
        step = int(snap["step"])
        past = [e for e in events if e.get("step") is not None and int(e["step"]) <= step]
        critical = [_event_reason(e, ops) for e in past if e["severity"] == "critical"]
        own = values.get(snap["id"], {})
        fired = {e["rule"] for e in past if e["severity"] == "critical"}
        for rule in critical_rules:
            v = own.get(rule["metric"])
            if v is not None and math.isfinite(v) and OPS[rule["op"]](v, float(rule["value"])):
                measured.append((step, rule.get("name"), _metric_reason(rule, v, step)))
        # A rule whose event already fired speaks through the event; otherwise its first measured breach.
        first_breach: dict[Any, Any] = {}
        for at, name, reason in measured:
            if at <= step and name not in fired and name not in first_breach:
                first_breach[name] = reason
        critical += list(first_breach.values())
        warning = [_event_reason(e, ops) for e in past if e["severity"] == "warning"]
        if critical:
            verdict, reasons = "memorizing", critical
        elif warning and all(r["rule"] in forecasts for r in warning):
            verdict, reasons = "at-risk", warning
        elif warning:
            verdict, reasons = "warning", warning
        elif snap["id"] in probed_ok:
            verdict, reasons = "clean", []
        else:
            verdict, reasons = "unaudited", []
        info = snap.get("info") or {}
        rows.append(
            {
                "snapshot_id": snap["id"],
                "step": step,
                "kind": snap["kind"],
                "path": snap["path"],
                "weights_sha256": snap["weights_sha256"],
                "weights": snap.get("weights"),
                "sightings": [sighting_status(g, snap, snapshots) for g in snap.get("sightings") or []],
                "scheduler_source": info.get("scheduler_source"),
                "scheduler_guessed": bool(info.get("scheduler_guessed")),
                "verdict": verdict,
                "reasons": reasons,
                "mem_fraction": _mem_fraction(own, declared),
            }
        )
    overall = _overall(rows, matches, identity_rows, events)
    return {"definition": VERDICT_DEFINITION, "overall": overall, "snapshots": rows}


def sighting_status(
    sighting: Mapping[str, Any], snap: Mapping[str, Any], snapshots: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """One place a snapshot was seen, with whether it still holds these weights there.

    ``status``: ``live`` (inside training), ``deleted`` (the folder is gone: checkpoint rotation),
    ``superseded`` (the same path was seen later with other weights: a rewritten final model), else
    ``current``.
    """
    path = sighting.get("path")
    status = "live" if not path else "current"
    if path:
        later = [
            g["first_seen"]
            for other in snapshots
            if other["id"] != snap["id"]
            for g in other.get("sightings") or []
            if g.get("path") == path and g["first_seen"] > sighting["last_seen"]
        ]
        if later:
            status = "superseded"
        elif not Path(path).exists():
            status = "deleted"
    return {k: sighting.get(k) for k in ("step", "kind", "path")} | {"status": status}


def _values_by_snapshot(metric_rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """snapshot id -> {"probe/metric": value}; of two results on one snapshot the later-written wins."""
    out: dict[int, dict[str, float]] = {}
    written: dict[tuple[int, str], int] = {}
    for m in metric_rows:
        key = f"{m['probe']}/{m['metric']}"
        if written.get((m["snapshot_id"], key), -1) > m["result_id"]:
            continue
        written[(m["snapshot_id"], key)] = m["result_id"]
        out.setdefault(m["snapshot_id"], {})[key] = float(m["value"])
    return out


def _event_reason(e: Mapping[str, Any], ops: Mapping[str, str]) -> dict[str, Any]:
    return {
        "source": "event",
        "rule": e["rule"],
        "severity": e["severity"],
        "metric": e.get("metric"),
        "op": ops.get(e["rule"]),
        "threshold": e.get("threshold"),
        "value": e.get("value"),
        "step": e.get("step"),
        "forecast_step": e.get("forecast_step"),
        "message": e.get("message") or "",
    }


def _metric_reason(rule: Mapping[str, Any], value: float, step: int) -> dict[str, Any]:
    return {
        "source": "metric",
        "rule": str(rule.get("name", "")),
        "severity": "critical",
        "metric": rule["metric"],
        "op": rule["op"],
        "threshold": float(rule["value"]),
        "value": value,
        "step": step,
        "forecast_step": None,
        "message": f"{rule['metric']} = {value:.4g} at this snapshot ({rule['op']} {float(rule['value']):g})",
    }


def _mem_fraction(values: Mapping[str, float], declared: Declarations) -> dict[str, Any] | None:
    """The share of samples that copy (the first ``share`` metric of the main panel the probes declare, e.g.
    ``regurgitation/mem_fraction``) with its sample count and Wilson 95% interval: how sure the share is."""
    shares = [k for k in declared.keys(role="share", panel=MAIN_PANEL) if k in values]
    if not shares:
        return None
    key = shares[0]
    out_of = declared.metrics[key].out_of
    v = values.get(key)
    n = values.get(f"{key.split('/', 1)[0]}/{out_of}") if out_of else None
    if v is None or not math.isfinite(v):
        return None
    if n is None or not math.isfinite(n) or n < 1:
        return {"value": v, "num_samples": None, "memorized": None, "ci95": None}
    k = round(v * n)
    return {"value": v, "num_samples": int(n), "memorized": int(k), "ci95": list(wilson_interval(int(k), int(n)))}


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) score interval for a proportion ``k / n`` (sensible also at 0 and n).

    Example:
        >>> [round(x, 3) for x in wilson_interval(0, 32)]
        [0.0, 0.107]
    """
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The bounds are exactly 0 at k = 0 and 1 at k = n; say so rather than print rounding noise (2e-19).
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _overall(
    rows: Sequence[Mapping[str, Any]],
    matches: Sequence[Mapping[str, Any]],
    identity_rows: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    worst = max((r["verdict"] for r in rows), key=VERDICTS.index, default="unaudited")
    first_worst = next((r for r in rows if r["verdict"] == worst), None)
    last_clean = last_checkpoint = None
    for r in rows:
        if r["verdict"] == "unaudited":
            continue
        if r["verdict"] != "clean":
            break
        last_clean = r
        if any(g["kind"] == "checkpoint" for g in r["sightings"]):
            last_checkpoint = r
    alarms = [int(e["step"]) for e in events if e["severity"] in ("warning", "critical") and e.get("step") is not None]
    on_disk = None
    for r in rows:
        if r["verdict"] == "unaudited":
            continue
        if r["verdict"] != "clean":
            break
        if any(g["kind"] == "checkpoint" and g["status"] == "current" for g in r["sightings"]):
            on_disk = r
    return {
        "verdict": worst,
        "since_step": first_worst["step"] if first_worst and worst in ("at-risk", "warning", "memorizing") else None,
        "reasons": list(first_worst["reasons"]) if first_worst else [],
        "onset_step": _first_step(m for m in matches if m.get("memorized")),
        "identity_onset_step": _first_step(r for r in identity_rows if r.get("leak")),
        "first_alarm_step": min(alarms, default=None),
        "last_clean_step": last_clean["step"] if last_clean else None,
        "last_clean_checkpoint": _checkpoint_ref(last_checkpoint),
        "last_clean_checkpoint_on_disk": _checkpoint_ref(on_disk),
        "snapshots": len(rows),
        "snapshots_by_verdict": {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS},
    }


def _checkpoint_ref(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A clean snapshot as a checkpoint to keep: its step, folder, weights hash, and whether the folder exists."""
    if row is None:
        return None
    folder = next((g for g in row["sightings"] if g["kind"] == "checkpoint"), {"path": row["path"], "status": ""})
    exists = folder["status"] == "current"
    return {"step": row["step"], "path": folder["path"], "weights_sha256": row["weights_sha256"], "exists": exists}


def _first_step(rows: Iterable[Mapping[str, Any]]) -> int | None:
    return min((int(r["step"]) for r in rows), default=None)


# ---------------------------------------------------------------------------------------------
# Curves and events


def _curves(data: RunHistory, risks: Sequence[ImageRisk]) -> dict[str, Any]:
    forecasts = [
        {k: e.get(k) for k in ("step", "rule", "severity", "metric", "value", "threshold", "forecast_step")}
        for e in data.events
        if e.get("forecast_step") is not None
    ]
    return {
        "metrics": {
            name: [{"step": step, "value": value} for step, value in series.items()]
            for name, series in data.metrics.items()
        },
        "forecasts": forecasts,
        "mem_ratio": data.mem_ratio,
        # Plots of numbers only (no training or generated pixels): kept in redacted reports too.
        "images": {
            "headline": _figure_uri(headline_figure(data)),
            "curves": _figure_uri(curves_figure(data)),
            "seeds": _figure_uri(seeds_figure(data)),
            "images": _figure_uri(images_figure(data, risks)),
        },
    }


def _figure_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)  # the settings curves.py writes PNGs with
    return data_uri(buf.getvalue(), "image/png")


#: images listed per intervention in the report (all of them are in the store)
INTERVENTION_IMAGES = 20


def _intervention(row: Mapping[str, Any]) -> dict[str, Any]:
    images = [str(i) for i in row["images"]]
    return {
        "step": row["step"], "kind": row["kind"], "images": images[:INTERVENTION_IMAGES],
        "images_total": len(images), "detail": row["detail"], "error": row["error"],
        "created_at_utc": _utc(row["created_at"]),
    }  # fmt: skip


def _event(e: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("step", "rule", "severity", "metric", "value", "threshold", "forecast_step", "message", "evidence")
    return {**{k: e.get(k) for k in keys}, "created_at": e["created_at"], "created_at_utc": _utc(e["created_at"])}


# ---------------------------------------------------------------------------------------------
# Provenance


def _provenance(
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    snapshots: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    metric_rows: Sequence[Mapping[str, Any]],
    limits: Limits,
) -> dict[str, Any]:
    env = info.get("info") if isinstance(info.get("info"), dict) else {}
    versions = env.get("versions") if isinstance(env.get("versions"), dict) else {}
    recomputed = config_hash(info["config"])
    if recomputed != info["config_hash"]:
        limits.add(
            "config-hash-mismatch",
            f"the stored config hash {info['config_hash']} does not match the stored config ({recomputed}): "
            "the store may have been edited",
        )
    return {
        "weights": [
            {**sighting_status(g, s, snapshots), "weights_sha256": s["weights_sha256"], "weights": s.get("weights")}
            for s in snapshots
            for g in s.get("sightings")
            or [{"step": s["step"], "kind": s["kind"], "path": s["path"], "first_seen": 0, "last_seen": 0}]
        ],
        "reference": info.get("reference"),
        "holdout": info.get("holdout"),
        "config": info["config"],
        "config_hash": info["config_hash"],
        "config_hash_verified": recomputed == info["config_hash"],
        "config_sha256": sha256_bytes(canonical_json(info["config"]).encode()),
        "thresholds": _thresholds(config, metric_rows, {r["probe"] for r in results}),
        "versions": {str(k): versions[k] for k in sorted(versions)},
        "host": env.get("host"),
        "torch_threads": env.get("torch_threads"),  # null in stores written before it was recorded
        "embedder": _embedder(config, env, limits),
        "probe_runs": [_probe_run(r) for r in results],
    }


def _thresholds(
    config: Mapping[str, Any], metric_rows: Sequence[Mapping[str, Any]], probes_run: set[str]
) -> list[dict[str, Any]]:
    defaults = sources.packaged_defaults(config)
    out = []
    for rule in config.get("rules") or []:
        if not isinstance(rule, dict):
            continue
        source, packaged = sources.rule_source(rule, defaults)
        details = {k: rule[k] for k in ("for", "window", "min_points", "horizon", "horizon_share") if k in rule}
        out.append(
            {
                "kind": "rule",
                "name": str(rule.get("name")),
                "metric": rule.get("metric"),
                "op": rule.get("op", "<=" if rule.get("type") == FORECAST else None),
                "value": rule.get("value", rule.get("horizon_share")),
                "severity": rule.get("severity"),
                "details": details,
                "source": source,
                "packaged_default": packaged,
            }
        )
    for path, known in sources.threshold_settings(config):
        probe = path.split(".")[1]
        if probe not in probes_run and not _probe_on(config, probe):
            continue  # settings of a probe that is off and never ran are no part of this audit
        value = sources.dig(config, path)
        source, packaged = sources.setting_source(path, known, value, defaults)
        out.append(_setting(path, value, source, packaged))
    if "regurgitation" in probes_run or _probe_on(config, "regurgitation"):
        out.append(_copy_threshold(config))
    identity = _latest_identity_threshold(metric_rows)
    if identity is not None:
        out.append(identity)
    return out


def _probe_on(config: Mapping[str, Any], probe: str) -> bool:
    """Whether the run's config had the probe on (its ``every``, or for ``null`` the samples' ``every``)."""
    every = sources.dig(config, f"probes.{probe}.every")
    if every is None and isinstance(sources.dig(config, f"probes.{probe}"), Mapping):
        every = sources.dig(config, "sampling.every")
    return bool(every)


def _setting(name: str, value: Any, source: str, packaged: bool) -> dict[str, Any]:
    return {
        "kind": "setting",
        "name": name,
        "metric": None,
        "op": None,
        "value": value,
        "severity": None,
        "details": {},
        "source": source,
        "packaged_default": packaged,
    }


def _copy_threshold(config: Mapping[str, Any]) -> dict[str, Any]:
    """The similarity at or above which a sample counts as a copy, where it was set, and why."""
    from memwatch.embedders import embedder_class

    for path in ("probes.regurgitation.copy_threshold", "embedder.copy_threshold"):
        value = sources.dig(config, path)
        if value is not None:
            return _setting(path, value, sources.CUSTOM, False)
    name = sources.dig(config, "embedder.name") or "pixel"
    try:
        cls = embedder_class(name)
    except MemwatchError:
        return _setting(f"embedder.copy_threshold ({name} default)", None, sources.CUSTOM, False)
    return _setting(f"embedder.copy_threshold ({name} default)", cls.builtin_copy_threshold, cls.copy_threshold_source,
                    True)  # fmt: skip


def _latest_identity_threshold(metric_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The face verification threshold of the latest identity result, and whether it was calibrated."""
    latest: dict[str, float] = {}
    for m in metric_rows:  # rows come by step: the last one of each name is the latest
        if m["probe"] == IDENTITY:
            latest[m["metric"]] = m["value"]
    if "identity_threshold" not in latest:
        return None
    calibrated = latest.get("threshold_calibrated") == 1.0
    if calibrated:
        source = (
            f"calibrated on the gallery's impostor pairs at target false-match rate "
            f"{latest.get('threshold_target_fmr', math.nan):g} (achieved {latest.get('threshold_fmr', math.nan):g}, "
            f"{latest.get('threshold_impostor_pairs', math.nan):g} pairs)"
        )
    else:
        pairs = latest.get("threshold_impostor_pairs", math.nan)
        target = latest.get("threshold_target_fmr", math.nan)
        source = (
            f"NOT calibrated ({pairs:g} impostor pairs; false-match rate {target:g} needs {math.ceil(1 / target):,}): "
            "a fixed identity.threshold from the config, or the matcher's documented one (dlib: distance 0.6 "
            "between descriptors, cosine 0.907; FaceNet: 0.45, Schroff et al. 2015)"
            if target > 0
            else "NOT calibrated: a fixed identity.threshold, or the matcher's documented one"
        )
    return _setting("identity verification threshold (cosine)", latest["identity_threshold"], source, False)


def _embedder(config: Mapping[str, Any], env: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    """Which embedder compared images, and what is known of its weights."""
    settings = config.get("embedder") if isinstance(config.get("embedder"), dict) else {}
    name = settings.get("name") or "pixel"
    recorded = env.get("embedder") if isinstance(env.get("embedder"), dict) else None
    if name == "pixel":
        identity = "none: the pixel embedder compares pixels and has no learned weights"
    elif recorded and _has_sha(recorded):
        identity = f"recorded with the run: {canonical_json(recorded)}"
    else:
        identity = (
            f"open_clip model {settings.get('model')!r} with pretrained {settings.get('pretrained')!r}; "
            "the weights file's sha256 was not recorded with the run"
        )
        limits.add(
            "embedder-weights-unverified",
            f"the {name} embedder ran with weights whose sha256 is not in the store ({settings.get('pretrained')!r}): "
            "their provenance cannot be checked from this report",
        )
    return {"name": name, "settings": dict(settings), "weights_identity": identity, "recorded": recorded}


def _has_sha(d: Mapping[str, Any]) -> bool:
    return any("sha256" in str(k) for k in d) or any(isinstance(v, dict) and _has_sha(v) for v in d.values())


def _probe_run(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "result_id": r["id"],
        "step": r["step"],
        "kind": r["kind"],
        "probe": r["probe"],
        "status": r["status"],
        "error": r["error"],
        "config_hash": r["config_hash"],
        "host": r["host"],
        "started_at": r["started_at"],
        "started_at_utc": _utc(r["started_at"]),
        "finished_at": r["finished_at"],
        "finished_at_utc": _utc(r["finished_at"]),
        "duration_s": r["duration_s"],
        "timings": {k: r["timings"][k] for k in sorted(r["timings"])},
        "evidence": list(r["evidence"]),
    }


# ---------------------------------------------------------------------------------------------
# Limitations that concern the run as a whole


def _general_limits(
    report: Mapping[str, Any],
    info: Mapping[str, Any],
    snapshots: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    redact: bool,
    limits: Limits,
) -> None:
    """What limits the audit of this run whatever its probes: failures, unreadable data, unhashed weights,
    guessed schedules, rewritten or deleted checkpoints."""
    for r in results:
        if r["status"] == "failed":
            limits.add(
                "probe-failed",
                f"probe {r['probe']} failed at step {r['step']} on {r['host']}: {r['error']}; that step has no "
                f"{r['probe']} result",
            )
    if not any(r["status"] == "ok" for r in results):
        limits.add("no-results", "no probe succeeded on this run: nothing was measured, the verdict is 'unaudited'")
    for label, summary in (("reference", info.get("reference")), ("holdout", info.get("holdout"))):
        if isinstance(summary, dict) and summary.get("skipped"):
            limits.add(
                f"{label}-skipped",
                f"{summary['skipped']} file(s) of the {label} set could not be decoded and were skipped when the run "
                "was recorded: those images were not audited",
            )
    sampled = sorted({r["step"] for r in results if r["probe"] == REGURGITATION and r["status"] == "ok"})
    if 0 < len(sampled) <= MIN_POINTS:
        limits.add("probes-sparse", sparse_samples_message(sampled))
    if info.get("holdout") is None:
        limits.add("no-holdout", "no holdout set: membership signals (members vs non-members) could not be measured")
    unhashed = sum(1 for s in snapshots if not s["weights_sha256"])
    if unhashed:
        limits.add(
            "weights-unhashed",
            f"{unhashed} snapshot(s) have no weights hash (folders that could not be read): which weights they "
            "were cannot be verified",
        )
    verdicts = report["verdict"]["snapshots"]
    guessed = [r["step"] for r in verdicts if r["scheduler_guessed"]]
    if guessed:
        limits.add(
            "schedule-guessed",
            f"the training noise schedule of {len(guessed)} snapshot(s) (steps {_steps(guessed)}) was not found and "
            "DDPMScheduler(1000) was assumed: their membership losses rest on a guessed schedule; set 'scheduler' "
            "or 'base_model' in the config",
        )
    superseded = [g for r in verdicts for g in r["sightings"] if g["status"] == "superseded"]
    if superseded:
        limits.add(
            "final-superseded",
            f"{len(superseded)} model(s) saved in the run folder were later rewritten with other weights (e.g. "
            f"{superseded[0]['path']}): they are listed as superseded; the newest one is the released model",
        )
    lcc = report["verdict"]["overall"]["last_clean_checkpoint"]
    if lcc is not None and not lcc["exists"]:
        kept = report["verdict"]["overall"]["last_clean_checkpoint_on_disk"]
        limits.add(
            "checkpoint-deleted",
            f"the last clean checkpoint {lcc['path']} has been deleted since it was probed (checkpoint rotation); "
            + (f"the last clean checkpoint still on disk is {kept['path']}" if kept else "no clean checkpoint is left"),
        )
    if redact:
        limits.add("redacted", "redacted report: training and generated pixels were left out; ids and scores remain")


def _probe_limits(
    declared: Declarations,
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    matches: Sequence[Mapping[str, Any]],
    metric_rows: Sequence[Mapping[str, Any]],
    item_rows: Sequence[Mapping[str, Any]],
    limits: Limits,
) -> None:
    """What each probe says its own stored results cannot show (:meth:`memwatch.core.probe.Probe.limitations`)."""
    settings = config.get("probes") if isinstance(config.get("probes"), Mapping) else {}
    items: dict[str, list[dict[str, Any]]] = {}
    for r in item_rows:
        items.setdefault(r["probe"], []).append(dict(r))
    for cls in declared.classes:
        record = ProbeRecord(
            settings=dict(settings.get(cls.name) or {}),
            results=[r for r in results if r["probe"] == cls.name],
            metrics=[m for m in metric_rows if m["probe"] == cls.name],
            matches=[m for m in matches if m["probe"] == cls.name],
            items=items.get(cls.name, []),
            reference=info.get("reference") if isinstance(info.get("reference"), dict) else None,
            holdout=info.get("holdout") if isinstance(info.get("holdout"), dict) else None,
        )
        try:
            found = cls.limitations(record)
        except Exception as e:  # a probe's own judgement must not cost the whole report
            found = [(f"{cls.name}-limitations-failed", f"probe {cls.name} could not judge its results: {e}")]
        for code, message in found:
            limits.add(code, message)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _steps(steps: Sequence[int], most: int = 5) -> str:
    shown = ", ".join(str(s) for s in steps[:most])
    return shown + (f" and {len(steps) - most} more" if len(steps) > most else "")


def _utc(t: float | None) -> str | None:
    if t is None:
        return None
    return (
        _dt.datetime.fromtimestamp(float(t), _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def _json_safe(obj: Any) -> Any:
    """JSON types only: NaN/inf -> None (undefined), tuples -> lists, keys -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)
