"""``memwatch verify``: is this the report memwatch wrote, about these weights and data, from this store, unchanged?

Given an attestation (a DSSE envelope of an in-toto Statement, :mod:`memwatch.attest.statement`), and where they
are not beside it the public key, the store, the checkpoints and the data, it checks everything it can and
says one line per check:

* the envelope's layout and its Ed25519 signature (with ``--key``);
* the statement's layout (in-toto Statement v1, memwatch's predicate);
* every subject, re-hashed: the report files (sha256), each audited set of weights (memwatch's weights identity,
  from the checkpoint folder: its files' combined hash, or its tensors' for weights probed inside training), the
  reference and holdout sets (their manifests, from the images);
* the store: its hash chain recomputed (:func:`memwatch.store.ledger.verify_ledger`), holding the head the
  statement carries, and the report JSON carrying the same head and verdict.

A store alone (``--store`` without an attestation) gets the chain check. Nothing is ever written. Weights probed
inside training that no checkpoint holds cannot be re-hashed: they are listed as such, and do not fail the
verification; anything that could be checked with an input not given (a key, a data folder) fails it, with what
to pass.

Example:
    >>> v = verify(store="runs/demo/memwatch/memwatch.sqlite")  # doctest: +SKIP
    >>> v.ok, v.lines()[0]  # doctest: +SKIP
    (True, 'ok    store: hash chain intact, 212 records, head entry 212 (5d1c...)')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwatch.attest import dsse
from memwatch.attest.statement import MANIFEST_DIGEST, PREDICATE_TYPE, SETS, STATEMENT_TYPE, WEIGHTS_DIGEST
from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file
from memwatch.store.ledger import ChainHead

OK, FAIL, UNCHECKED = "ok", "FAIL", "cannot"


@dataclass
class Verification:
    """The checks made: ``(status, what, detail)`` each, status one of ``ok``, ``FAIL``, ``cannot`` (impossible by
    nature: weights that were never written to a file)."""

    checks: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, status: str, what: str, detail: str) -> None:
        self.checks.append((status, what, detail))

    @property
    def ok(self) -> bool:
        """Everything that could be checked matched (and something was)."""
        return bool(self.checks) and all(s != FAIL for s, _, _ in self.checks)

    def lines(self) -> list[str]:
        return [f"{s:<7}{what}: {detail}" for s, what, detail in self.checks]


def verify(
    attestation: str | Path | None = None,
    *,
    key: str | Path | None = None,
    store: str | Path | None = None,
    run_dir: str | Path | None = None,
    checkpoints: str | Path | None = None,
    data: str | Path | None = None,
    holdout: str | Path | None = None,
    base_model: str | Path | None = None,
) -> Verification:
    """Check an attestation and what it names (see the module's description).

    Args:
        attestation: the ``.intoto.jsonl`` file (``memwatch report --sign``); None to check a store alone.
        key: the signer's public key (``.pub``).
        store: the store (default: ``memwatch.sqlite`` beside the attestation).
        run_dir: the run folder the weights' names are relative to (default: as the statement says).
        checkpoints: a folder holding the checkpoint folders instead (matched by name).
        data, holdout: the reference and holdout image folders (default: where the store recorded them).
        base_model: the base pipeline of LoRA checkpoints.

    Raises:
        MemwatchError: no attestation and no store, or an attestation that cannot be read at all.
    """
    v = Verification()
    if attestation is None:
        if store is None:
            raise MemwatchError("memwatch verify needs an attestation (report.intoto.jsonl) or --store")
        _check_store(v, Path(store), None, None)
        return v
    path = Path(attestation)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MemwatchError(f"attestation {path} cannot be read ({e}): pass the .intoto.jsonl file memwatch report "
                            "--sign wrote") from None  # fmt: skip
    try:
        envelope = dsse.parse(text, f"attestation {path}")
    except MemwatchError as e:
        v.add(FAIL, "attestation", str(e))
        return v
    _check_signature(v, envelope, key)
    statement = _statement(v, envelope)
    if statement is None:
        return v
    predicate = statement["predicate"]
    folder = path.parent
    runs = Path(run_dir) if run_dir is not None else folder / predicate.get("run_folder", ".")
    store_path = Path(store) if store is not None else folder / "memwatch.sqlite"
    report_json = _check_subjects(v, statement, folder, runs, Path(checkpoints) if checkpoints else None, base_model)
    recorded = _recorded_sets(store_path)
    for name, given in ((SETS["reference"], data), (SETS["holdout"], holdout)):
        subject = next((s for s in statement["subject"] if s["name"] == name), None)
        if subject is not None:
            _check_set(v, subject, given, recorded.get(name), runs)
    head = predicate.get("record", {}).get("head") or {}
    expected = ChainHead(int(head.get("seq", 0)), str(head.get("sha256", "")))
    _check_store(v, store_path, expected, report_json)
    if report_json is not None:
        _check_report_agrees(v, report_json, predicate)
    return v


def _check_signature(v: Verification, envelope: dict[str, Any], key: str | Path | None) -> None:
    if key is None:
        v.add(FAIL, "signature", "not checked: pass the signer's public key with --key")
        return
    from memwatch.attest.keys import key_id, load_public_key

    public = load_public_key(key)
    if envelope["payloadType"] != dsse.IN_TOTO:
        v.add(FAIL, "signature", f"payload type is {envelope['payloadType']!r}, not an in-toto statement")
    elif dsse.verify(envelope, public):
        v.add(OK, "signature", f"Ed25519, key {key_id(public)[:16]}...")
    else:
        v.add(FAIL, "signature", f"does not verify with key {key_id(public)[:16]}...: the attestation was changed, "
                                 "or signed with another key")  # fmt: skip


def _statement(v: Verification, envelope: dict[str, Any]) -> dict[str, Any] | None:
    try:
        statement = json.loads(dsse.payload_of(envelope))
    except ValueError as e:
        v.add(FAIL, "statement", f"the payload is not JSON ({e})")
        return None
    problems = statement_problems(statement)
    if problems:
        v.add(FAIL, "statement", "; ".join(problems))
        return None
    v.add(OK, "statement", f"in-toto Statement v1, {len(statement['subject'])} subjects, predicate {PREDICATE_TYPE}")
    return statement


def statement_problems(statement: Any) -> list[str]:
    """What makes ``statement`` not an in-toto Statement v1 with memwatch's predicate; empty when it is one."""
    if not isinstance(statement, dict):
        return ["not a JSON object"]
    known = ("_type", "subject", "predicateType", "predicate")
    problems = [f"unknown field {k!r}" for k in statement if k not in known]
    if statement.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type is not {STATEMENT_TYPE}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        problems.append(f"predicateType is not {PREDICATE_TYPE}")
    if not isinstance(statement.get("predicate"), dict) or not statement.get("predicate"):
        problems.append("predicate is missing")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        problems.append("subject is missing or empty")
    else:
        for i, s in enumerate(subjects):
            digest = s.get("digest") if isinstance(s, dict) else None
            if not isinstance(digest, dict) or not digest or not all(isinstance(x, str) for x in digest.values()):
                problems.append(f"subject[{i}] has no digest")
            elif not isinstance(s.get("name"), str):
                problems.append(f"subject[{i}] has no name")
    return problems


def _check_subjects(
    v: Verification, statement: dict, folder: Path, runs: Path, checkpoints: Path | None, base_model: Any
) -> dict | None:
    """Re-hash every file and weights subject; returns the report JSON when it is a subject and matched."""
    report_json = None
    weights_ok: dict[str, str] = {}  # digest -> the subject that matched it
    live = []
    for s in statement["subject"]:
        name, digest = s["name"], s["digest"]
        if "sha256" in digest:
            file = folder / name
            if not file.is_file():
                v.add(FAIL, name, f"not found beside the attestation ({file})")
            elif (found := sha256_file(file)) != digest["sha256"]:
                v.add(FAIL, name, f"sha256 differs: attested {digest['sha256'][:16]}..., the file has {found[:16]}...")
            else:
                v.add(OK, name, "sha256 matches")
                if name.endswith(".json"):
                    report_json = json.loads(file.read_text(encoding="utf-8"))
        elif WEIGHTS_DIGEST in digest:
            if name.startswith("live@"):
                live.append(s)
                continue
            where = (checkpoints / Path(name).name) if checkpoints else runs / name
            status, detail = _check_weights(where, digest[WEIGHTS_DIGEST], s.get("annotations", {}), base_model)
            v.add(status, name, detail)
            if status == OK:
                weights_ok[digest[WEIGHTS_DIGEST]] = name
    for s in live:
        via = weights_ok.get(s["digest"][WEIGHTS_DIGEST])
        if via:
            v.add(OK, s["name"], f"the same weights as {via}, re-hashed above")
        else:
            v.add(UNCHECKED, s["name"], "probed inside training and never saved to a checkpoint: no file to re-hash")
    return report_json


def _check_weights(folder: Path, expected: str, annotations: Mapping[str, Any], base_model: Any) -> tuple[str, str]:
    """Re-hash one set of weights: the folder's files (memwatch probe), else its loaded tensors (the monitor)."""
    from memwatch.hashing import state_sha256
    from memwatch.models.modes import unwrap_model
    from memwatch.snapshots import load_snapshot, snapshot_sha256

    if not folder.exists():
        return FAIL, f"not found at {folder}: pass the folder holding the checkpoints with --checkpoints"
    weights = annotations.get("weights", "raw")
    try:
        if snapshot_sha256(folder, weights=weights, base_model=base_model) == expected:
            return OK, "weights match (their files' sha256)"
        snap = load_snapshot(folder, weights=weights, base_model=base_model)
        found = state_sha256(unwrap_model(snap.parts.unet))
    except (MemwatchError, OSError) as e:
        return FAIL, f"cannot be read: {e}"
    if found == expected:
        return OK, "weights match (their tensors' sha256)"
    return FAIL, f"weights differ from the audited ones: attested {expected[:16]}..., found {found[:16]}..."


def _recorded_sets(store_path: Path) -> dict[str, str]:
    """Where the store recorded the reference and holdout sets (their roots), if it can be read."""
    from memwatch.store import Store

    if not store_path.is_file():
        return {}
    try:
        with Store(store_path, readonly=True) as store:
            runs = store.runs()
    except MemwatchError:
        return {}
    run = runs[-1] if runs else {}
    out = {}
    for key, name in SETS.items():
        summary = run.get(key)
        if isinstance(summary, dict) and summary.get("root"):
            out[name] = str(summary["root"])
    return out


def _check_set(v: Verification, subject: dict, given: Any, recorded: str | None, runs: Path) -> None:
    from memwatch.data.refset import load_reference_set

    name, expected = subject["name"], subject["digest"].get(MANIFEST_DIGEST)
    root = subject.get("annotations", {}).get("root") or ""
    candidates = [Path(given)] if given else [runs / root] if root and "<path>" not in root else []
    if not given and recorded:
        candidates.append(Path(recorded))
    folder = next((c for c in candidates if c.exists()), None)
    option = "--data" if name == SETS["reference"] else "--holdout"
    if folder is None:
        v.add(FAIL, name, f"its images were not found (recorded at {root or 'an unknown place'}): pass the folder "
                          f"with {option}")  # fmt: skip
        return
    try:
        found = load_reference_set(folder).manifest_sha256
    except MemwatchError as e:
        v.add(FAIL, name, f"{folder} cannot be read: {e}")
        return
    if found == expected:
        v.add(OK, name, f"manifest matches the images in {folder}")
    else:
        v.add(FAIL, name, f"the images in {folder} differ from the audited ones (manifest attested {expected[:16]}..., "
                          f"found {found[:16]}...): an image was changed, added or removed")  # fmt: skip


def _check_store(v: Verification, store_path: Path, expected: ChainHead | None, report: dict | None) -> None:
    from memwatch.store import Store

    if not store_path.is_file():
        v.add(FAIL, "store", f"not found at {store_path}: pass it with --store")
        return
    try:
        with Store(store_path, readonly=True) as store:
            check = store.check_record(expected)
    except MemwatchError as e:
        v.add(FAIL, "store", str(e))
        return
    for finding in check.findings:
        v.add(FAIL, "store", finding)
    if check.ok:
        adopted = f", the first {check.adopted} adopted at an upgrade" if check.adopted else ""
        v.add(OK, "store", f"hash chain intact, {check.records} records{adopted}, head entry {check.head.seq} "
                           f"({check.head.sha256[:12]}...)")  # fmt: skip


def _check_report_agrees(v: Verification, report: dict, predicate: dict) -> None:
    """The report JSON states the same chain head and verdict as the signed predicate."""
    head = (report.get("record") or {}).get("head")
    verdict = ((report.get("verdict") or {}).get("overall") or {}).get("verdict")
    if head != predicate.get("record", {}).get("head") or verdict != predicate.get("verdict"):
        v.add(FAIL, "report", "its chain head or verdict differs from the attested ones")
    else:
        v.add(OK, "report", f"states the attested chain head and verdict ({verdict})")
