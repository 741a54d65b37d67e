"""The in-toto Statement (v1) that attests an audit report, and writing it signed (``memwatch report --sign``).

Subjects (what the statement is about, each with a digest):

* the report files written (``sha256`` of each file; names relative to the attestation's folder);
* every audited set of weights (``memwatchWeightsSha256``: memwatch's identity of a denoiser's weights — the
  combined sha256 of its weights files for a folder, of its tensors when probed inside training; names are the
  checkpoint folders relative to the run folder, ``live@step-<n>`` for weights probed inside training that no
  checkpoint holds);
* the reference and holdout sets (``memwatchManifestSha256``: the sha256 of the set's manifest of image ids and
  content hashes).

The predicate (type :data:`PREDICATE_TYPE`) carries the verdicts, the onset, at-risk and last clean steps, the
store's chain head, the memwatch version and the config hash; ``docs/audit.md`` lists its fields.

Example:
    >>> s = statement([{"name": "report.html", "digest": {"sha256": "ab" * 32}}], {"verdict": "clean"})
    >>> s["_type"], s["predicateType"] == PREDICATE_TYPE
    ('https://in-toto.io/Statement/v1', True)
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import rfc8785

from memwatch.hashing import sha256_file
from memwatch.version import __version__

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://memwatch.dev/attestation/memorization-audit/v1"
#: Digest names of memwatch's own identities (in-toto allows names beyond the standard hashes).
WEIGHTS_DIGEST = "memwatchWeightsSha256"
MANIFEST_DIGEST = "memwatchManifestSha256"
#: Subject names of the data sets.
SETS = {"reference": "reference-set", "holdout": "holdout-set"}
#: The attestation's file name beside an HTML report ``<stem>.html``: ``<stem>.intoto.jsonl``.
SUFFIX = ".intoto.jsonl"


def statement(subjects: list[dict[str, Any]], predicate: Mapping[str, Any]) -> dict[str, Any]:
    """An in-toto Statement v1 of these subjects with a memwatch predicate."""
    return {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": PREDICATE_TYPE, "predicate": dict(predicate)}


def report_statement(report: Mapping[str, Any], files: Mapping[str, Path], attestation: Path, run_folder: Path) -> dict:
    """The statement of a written report.

    Args:
        report: the report's content (as written, paths already portable).
        files: kind -> report file written (``html``, ``json``, ``pdf``).
        attestation: where the attestation will be written (file subjects are named relative to its folder).
        run_folder: the run's folder (the weights' names in the report are relative to it).
    """
    folder = attestation.parent
    subjects = [{"name": _relative(path, folder), "digest": {"sha256": sha256_file(path)}}
                for _, path in sorted(files.items())]  # fmt: skip
    seen: set[str] = set()
    for w in report["provenance"]["weights"]:
        if not w.get("weights_sha256"):
            continue
        name = w["path"] if w.get("path") and w["kind"] != "live" else f"live@step-{w['step']}"
        if name in seen:
            continue
        seen.add(name)
        subjects.append(
            {
                "name": name,
                "digest": {WEIGHTS_DIGEST: w["weights_sha256"]},
                "annotations": {"step": w["step"], "kind": w["kind"], "weights": w.get("weights") or "raw"},
            }
        )
    for key, name in SETS.items():
        s = report["provenance"].get(key)
        if isinstance(s, Mapping) and s.get("manifest_sha256"):
            subjects.append({"name": name, "digest": {MANIFEST_DIGEST: s["manifest_sha256"]},
                             "annotations": {"root": s.get("root"), "images": s.get("n")}})  # fmt: skip
    overall = report["verdict"]["overall"]
    predicate = {
        "memwatch": __version__,
        "report": {"format": report["format"], "format_version": report["format_version"],
                   "redacted": report["redacted"]},
        "run": report["run"]["name"],
        "run_folder": _relative(run_folder, folder),
        "config_hash": report["provenance"]["config_hash"],
        "config_sha256": report["provenance"]["config_sha256"],
        "verdict": overall["verdict"],
        "since_step": overall.get("since_step"),
        "onset_step": overall.get("onset_step"),
        "first_alarm_step": overall.get("first_alarm_step"),
        "last_clean_step": overall.get("last_clean_step"),
        "last_clean_checkpoint": overall.get("last_clean_checkpoint"),
        "snapshots": [{"step": s["step"], "kind": s["kind"], "verdict": s["verdict"]}
                      for s in report["verdict"]["snapshots"]],
        "record": {k: report["record"][k] for k in ("head", "starts_at", "adopted", "intact")},
        "limitations": sorted({x["code"] for x in report["limitations"]}),
        "attested_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    return statement(subjects, predicate)


def write_attestation(
    report: Mapping[str, Any], files: Mapping[str, Path], run_folder: Path, key_path: str | Path
) -> Path:
    """Sign the statement of a written report with the Ed25519 key at ``key_path``; write it beside the HTML
    report as ``<stem>.intoto.jsonl`` (one DSSE envelope on one line); returns its path.

    Raises:
        MemwatchError: the key cannot be read, or the file cannot be written.
    """
    import json

    from memwatch.attest.dsse import sign
    from memwatch.attest.keys import load_private_key
    from memwatch.output import write_output

    key = load_private_key(key_path, _passphrase())
    html = Path(files["html"])
    path = html.with_name(html.stem + SUFFIX)
    payload = rfc8785.dumps(report_statement(report, files, path, run_folder))
    return write_output(path, json.dumps(sign(payload, key), separators=(",", ":")) + "\n", "--sign")


def sign_report(run_dir: str | Path, key: str | Path, **options: Any) -> dict[str, Path]:
    """Write a run's report (:func:`memwatch.views.report.write_report` with ``options``) and its signed
    attestation; returns the files written (``"attestation"`` among them). A key that cannot be read fails
    before anything is written.

    Example:
        >>> sign_report("runs/demo", "audit.key", json_out="report.json")["attestation"].name  # doctest: +SKIP
        'report.intoto.jsonl'
    """
    from memwatch.attest.keys import load_private_key
    from memwatch.store.history import find_store, run_folder
    from memwatch.views.report import write_report

    load_private_key(key, _passphrase())
    written = write_report(run_dir, **options)
    attestation = write_attestation(written.report, written.paths, run_folder(find_store(run_dir)), key)
    return {**written.paths, "attestation": attestation}


def _passphrase() -> bytes | None:
    """The signing key's passphrase, from ``MEMWATCH_KEY_PASSPHRASE`` (never a command-line argument)."""
    value = os.environ.get("MEMWATCH_KEY_PASSPHRASE")
    return value.encode() if value else None


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(Path(path).absolute(), Path(folder).absolute())).as_posix()
