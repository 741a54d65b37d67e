"""The audit record: the store's hash chain, signed attestations, ``memwatch verify``, portable reports.

On the real demo-sized run (``tests/support/demo_run.py``): every single stored row changed, deleted or moved
after the fact is named by the verification; a signed report verifies, and one byte changed in the report or
the attestation, swapped weights or a changed training image fail it, naming what does not match. The
attestation is checked by the in-toto project's own Statement validator and the DSSE verifier of
securesystemslib, independently of memwatch's code.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from memwatch.cli import main
from memwatch.store import STORE_NAME, Store
from memwatch.store.ledger import RECORD_TABLES, verify_ledger

pytest.importorskip("cryptography", reason="signing needs memwatch[sign] (cryptography)")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A demo-sized run made for these tests (its backup, and the place it was made and is restored to)."""
    import torch
    from support.demo_run import make_demo_run

    root = tmp_path_factory.mktemp("attest")
    torch.manual_seed(0)
    make_demo_run(root / "live")
    shutil.copytree(root / "live", root / "backup")
    return root / "backup", root / "live"


@pytest.fixture
def run(pristine: tuple[Path, Path]) -> dict[str, Any]:
    """The demo-sized run, restored where it was made (the paths its store recorded hold), free to tamper with."""
    backup, live = pristine
    shutil.rmtree(live)
    shutil.copytree(backup, live)
    return {"dir": live / "out", "store": live / "out" / "memwatch" / STORE_NAME, "train": live / "train",
            "checkpoint": live / "out" / "checkpoint-4"}  # fmt: skip


def _findings(store: Path) -> list[str]:
    conn = sqlite3.connect(store)
    try:
        return verify_ledger(conn).findings
    finally:
        conn.close()


def _rows(store: Path) -> list[tuple[str, int, dict]]:
    """(table, rowid, row) of every stored row, the ledger's own included."""
    conn = sqlite3.connect(store)
    conn.row_factory = sqlite3.Row
    out = []
    for table in (*RECORD_TABLES, "metrics", "matches", "items", "ledger"):
        for r in conn.execute(f"SELECT rowid AS _rowid, * FROM {table}").fetchall():
            out.append((table, r["_rowid"], dict(r)))
    conn.close()
    return out


def _named(table: str, row: dict) -> tuple[str, ...]:
    """What a finding names for a change of this row: the record (a result for its metric, match and item rows);
    for a ledger entry, the entry or the record it covered (the last entry removed leaves a record uncovered)."""
    if table in ("metrics", "matches", "items"):
        return (f"probe_results row {row['result_id']}:",)
    if table == "ledger":
        return (f"ledger entry {row['seq']}", f"{row['tbl']} row {row['row_id']}:")
    return (f"{table} row {row['run_id'] if table == 'training_sets' else row['id']}:",)


def _move_to_end(conn: sqlite3.Connection, table: str, rowid: int, key: str | None) -> None:
    """Delete a row and insert it again after every other (with a new ``key`` when the table has one)."""
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute(f"SELECT * FROM {table} WHERE rowid = ?", (rowid,)).fetchone())
    conn.row_factory = None
    new = conn.execute(f"SELECT MAX(rowid) + 1 FROM {table}").fetchone()[0]
    conn.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
    values = row | ({key: new} if key else {})
    conn.execute(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                 tuple(values.values()))  # fmt: skip


def _changed(value: Any) -> Any:
    if value is None:
        return 1
    if isinstance(value, bytes):
        return value + b"x"
    if isinstance(value, str):
        return value + "x"
    return value + 1


def test_an_untouched_store_verifies(run: dict[str, Any], capsys) -> None:
    assert _findings(run["store"]) == []
    assert main(["verify", "--store", str(run["store"])]) == 0
    assert "hash chain intact" in capsys.readouterr().out


def test_every_single_row_changed_deleted_or_moved_is_named(run: dict[str, Any], tmp_path: Path) -> None:
    rows = _rows(run["store"])
    assert {t for t, _, _ in rows} >= {"runs", "snapshots", "sightings", "probe_results", "metrics", "matches",
                                       "items", "events", "ledger"}  # fmt: skip
    checked = 0
    for i, (table, rowid, row) in enumerate(rows):
        columns = [c for c in row if c not in ("_rowid", "last_seen", "seq")]  # last_seen is not recorded
        for kind in ("change", "delete", "move"):
            work = tmp_path / f"{i}-{kind}.sqlite"
            shutil.copy(run["store"], work)
            conn = sqlite3.connect(work)
            if kind == "change":
                for column in (c for c in columns if c != "id"):  # the first column a change is allowed in
                    try:
                        conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (_changed(row[column]), rowid))
                        break
                    except sqlite3.IntegrityError:
                        continue
            elif kind == "delete":
                conn.execute(f"DELETE FROM {table} WHERE rowid = ?", (rowid,))
            else:  # the same row, moved: a new id, or (a result's rows) another place among its siblings
                if table in ("metrics", "matches", "items"):
                    siblings = [
                        r[0]
                        for r in conn.execute(
                            f"SELECT rowid FROM {table} WHERE result_id = ? ORDER BY rowid", (row["result_id"],)
                        )
                    ]
                    if len(siblings) < 2:
                        conn.close()
                        continue  # a result's only row has no order to change
                    # the row to the end; the last row goes first instead (the others to the end)
                    for moved in [rowid] if rowid != siblings[-1] else siblings[:-1]:
                        _move_to_end(conn, table, moved, None)
                else:
                    key = {"ledger": "seq", "training_sets": "run_id"}.get(table, "id")
                    _move_to_end(conn, table, rowid, key)
            conn.commit()
            conn.close()
            findings = _findings(work)
            assert findings, f"{kind} of {table} row {rowid} went unnoticed"
            assert any(re.search(re.escape(name) + r"(?!\d)", f) for f in findings for name in _named(table, row)), (
                table,
                kind,
                findings,
            )
            checked += 1
    assert checked >= 300  # every row of a real run, three ways


def test_a_store_cut_back_to_an_earlier_state_does_not_hold_the_reported_head(run: dict[str, Any], tmp_path) -> None:
    from memwatch.store.ledger import ChainHead

    with Store(run["store"]) as store:  # a report is made after one more event...
        event = store.add_event(store.runs()[0]["id"], {"rule": "late", "severity": "critical", "step": 99})
        head = store.check_record().head
    conn = sqlite3.connect(run["store"])  # ...then the store is cut back to before that event
    conn.execute("DELETE FROM ledger WHERE seq = ?", (head.seq,))
    conn.execute("DELETE FROM events WHERE id = ?", (event,))
    conn.commit()
    conn.close()
    assert verify_ledger(sqlite3.connect(run["store"])).findings == []  # consistent by itself...
    assert verify_ledger(sqlite3.connect(run["store"]), expected=ChainHead(head.seq, head.sha256)).findings  # not so


@pytest.fixture
def signed(run: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    key = tmp_path / "keys" / "audit.key"
    assert main(["keygen", str(key)]) == 0
    folder = run["dir"] / "memwatch"
    assert main(["report", str(run["dir"]), "--json", str(folder / "report.json"), "--sign", str(key)]) == 0
    return {**run, "key": key, "pub": key.with_name("audit.key.pub"), "attestation": folder / "report.intoto.jsonl",
            "html": folder / "report.html", "json": folder / "report.json"}  # fmt: skip


def _verify(signed: dict[str, Any], capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["verify", str(signed["attestation"]), "--key", str(signed["pub"]), *extra])
    return rc, capsys.readouterr().out


def test_a_signed_report_verifies(signed: dict[str, Any], capsys) -> None:
    rc, out = _verify(signed, capsys)
    assert rc == 0, out
    for name in ("signature", "report.html", "report.json", "checkpoint-4/unet", "reference-set", "holdout-set",
                 "store", "report"):  # fmt: skip
        assert re.search(rf"^ok +{re.escape(name)}:", out, re.M), (name, out)
    assert "cannot live@step-" in out  # weights probed inside training, never saved: listed, not failed


@pytest.mark.parametrize("target", ["html", "json", "attestation"])
def test_one_byte_changed_in_the_report_or_the_attestation_fails(signed: dict[str, Any], capsys, target) -> None:
    path: Path = signed[target]
    data = bytearray(path.read_bytes())
    # a byte inside the content: for the attestation, one in its base64 payload
    at = data.index(b'"payload":"') + 40 if target == "attestation" else len(data) // 2
    data[at] = ord("A") if data[at] != ord("A") else ord("B")
    path.write_bytes(bytes(data))
    rc, out = _verify(signed, capsys)
    assert rc == 1
    expected = "signature" if target == "attestation" else path.name
    assert re.search(rf"^FAIL +{re.escape(expected)}:", out, re.M), out


def test_another_key_or_no_key_fails(signed: dict[str, Any], tmp_path: Path, capsys) -> None:
    other = tmp_path / "other.key"
    main(["keygen", str(other)])
    capsys.readouterr()
    assert main(["verify", str(signed["attestation"]), "--key", f"{other}.pub"]) == 1
    assert re.search(r"^FAIL +signature: does not verify", capsys.readouterr().out, re.M)
    assert main(["verify", str(signed["attestation"])]) == 1
    assert "pass the signer's public key with --key" in capsys.readouterr().out


def test_swapped_weights_are_named(signed: dict[str, Any], capsys) -> None:
    import torch
    from diffusers import UNet2DModel

    folder = signed["checkpoint"] / "unet"
    unet = UNet2DModel.from_pretrained(folder)
    with torch.no_grad():
        next(unet.parameters()).add_(0.01)  # other weights under the same name
    unet.save_pretrained(folder)
    rc, out = _verify(signed, capsys)
    assert rc == 1 and re.search(r"^FAIL +checkpoint-4/unet: weights differ", out, re.M), out


def test_a_changed_training_image_is_named(signed: dict[str, Any], capsys) -> None:
    image = sorted(signed["train"].glob("*.png"))[0]
    with Image.open(image) as im:
        pixels = im.convert("RGB")
    pixels.putpixel((0, 0), (0, 0, 0) if pixels.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    pixels.save(image)
    rc, out = _verify(signed, capsys)
    assert rc == 1 and re.search(r"^FAIL +reference-set: the images in .* differ", out, re.M), out


def test_a_tampered_store_fails_the_signed_verification(signed: dict[str, Any], capsys) -> None:
    conn = sqlite3.connect(signed["store"])
    conn.execute("UPDATE events SET severity = 'info' WHERE severity = 'critical'")
    conn.commit()
    conn.close()
    rc, out = _verify(signed, capsys)
    assert rc == 1 and re.search(r"^FAIL +store: events row \d+: differs", out, re.M), out


def test_the_attestation_is_an_in_toto_statement_in_a_signed_dsse_envelope(signed: dict[str, Any]) -> None:
    """Checked with the in-toto project's Statement v1 validator and securesystemslib's DSSE verifier."""
    google = pytest.importorskip("google.protobuf.json_format")
    spb = pytest.importorskip("in_toto_attestation.v1.statement_pb2")
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    from memwatch.attest.keys import load_public_key

    envelope = json.loads(signed["attestation"].read_text().splitlines()[0])
    key = SSlibKey.from_crypto(load_public_key(signed["pub"]), keyid=envelope["signatures"][0]["keyid"])
    dsse = Envelope.from_dict(envelope)  # (it consumes the dict)
    assert list(dsse.verify([key], 1)) == [key.keyid]  # raises when the signature does not verify
    assert dsse.payload_type == "application/vnd.in-toto+json"
    pb = google.Parse(dsse.payload, spb.Statement())  # strict: unknown fields are refused
    Statement.copy_from_pb(pb).validate()
    statement = json.loads(dsse.payload)
    names = {s["name"] for s in statement["subject"]}
    assert {"report.html", "report.json", "checkpoint-4/unet", "reference-set", "holdout-set"} <= names
    predicate = statement["predicate"]
    assert predicate["verdict"] == "memorizing" and predicate["record"]["intact"] is True
    assert predicate["record"]["head"]["seq"] > 0 and predicate["last_clean_step"] == 4


def test_nothing_in_the_report_or_attestation_is_an_absolute_path(signed: dict[str, Any]) -> None:
    machine = str(Path(signed["dir"]).parents[2])  # the temporary root the run lives under
    statement = json.loads(__import__("base64").b64decode(json.loads(signed["attestation"].read_text())["payload"]))
    for text in (signed["html"].read_text(), signed["json"].read_text(), json.dumps(statement)):
        assert machine not in text
        assert not re.search(r"""(?:^|[\s"'(=,])/(?:tmp|home|root|work|usr)/""", text)
    report = json.loads(signed["json"].read_text())
    assert report["paths"]["absolute"] is False


def test_absolute_paths_on_request(run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "abs.json"
    assert main(["report", str(run["dir"]), "-o", str(tmp_path / "abs.html"), "--json", str(out),
                 "--absolute-paths"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["paths"]["absolute"] is True
    assert any(w["path"].startswith("/") for w in report["provenance"]["weights"] if w["path"])


def test_an_upgraded_store_adopts_its_rows_and_the_report_says_where_the_chain_starts(tmp_path: Path) -> None:
    from memwatch.core.probe import ProbeResult
    from memwatch.views.report.build import build_report

    fixture = Path(__file__).parent / "fixtures" / "store_v2"
    shutil.copytree(fixture, tmp_path / "v2")
    store_path = tmp_path / "v2" / "run" / "memwatch" / STORE_NAME
    assert store_path.is_file()
    with Store(store_path) as store:  # the upgrade
        check = store.check_record()
        assert check.ok and check.adopted == check.records > 0 and check.starts_at == check.head.seq + 1
        run_id = store.runs()[0]["id"]
        snap = store.snapshots(run_id)[0]["id"]
        store.write_result(snap, ProbeResult("custom", {"x": 1.0}), config_hash="c")
        after = store.check_record()
    assert after.ok and after.starts_at == check.head.seq + 1
    report = build_report(tmp_path / "v2" / "run")
    assert report["record"]["adopted"] == check.adopted and report["record"]["starts_at"] == after.starts_at
    assert "record-adopted" in {x["code"] for x in report["limitations"]}
    conn = sqlite3.connect(store_path)  # an adopted row edited after the upgrade is evident
    conn.execute("UPDATE snapshots SET step = step + 1 WHERE id = ?", (snap,))
    conn.commit()
    assert any(f"snapshots row {snap}" in f for f in verify_ledger(conn).findings)
    conn.close()
