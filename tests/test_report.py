"""Tests for memwatch.views.report: the audit report built from a run's store.

Two kinds of runs:

* a real demo-sized run (``tests/support/demo_run.py``, the session fixture ``demo_run``): a tiny
  UNet2DModel trained a few steps under MemorizationMonitor, a saved and hashed checkpoint probed as
  a checkpoint, then the same monitor probing models that reproduce their training images;
* small stores written by hand, for the verdict rules and the limitations (failed probes, missing
  files, identities, NaN extraction).
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from support.demo_run import DEMO_CONFIG, MEMORIZING_STEPS, PLANTED_ID, SIZE, TRAIN_STEPS
from support.images import smooth_image, write_images
from support.schema import schema_errors

from memwatch.core.probe import ProbeResult
from memwatch.data.images import load_image
from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file
from memwatch.store import STORE_NAME, Store
from memwatch.views.report import build_report, render_html, report_json, report_schema, sources, write_report
from memwatch.views.report.build import VERDICT_DEFINITION, wilson_interval

DATA_URI = re.compile(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+")


# ---------------------------------------------------------------------------------------------
# A real demo-sized run


@pytest.fixture(scope="module")
def demo_report(demo_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo-report")
    paths = write_report(demo_run["run_dir"], out / "report.html", json_out=out / "report.json").paths
    return {
        "paths": paths,
        "html": paths["html"].read_text(encoding="utf-8"),
        "report": json.loads(paths["json"].read_text(encoding="utf-8")),
        "out": out,
    }


def _decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# The real run


def test_demo_run_verdicts_onset_and_last_clean_checkpoint(demo_run: dict[str, Any], demo_report: dict) -> None:
    report = demo_report["report"]
    overall = report["verdict"]["overall"]
    snaps = {(s["step"], s["kind"]): s for s in report["verdict"]["snapshots"]}
    assert overall["verdict"] == "memorizing"
    assert overall["onset_step"] == overall["since_step"] == MEMORIZING_STEPS[0]
    assert overall["last_clean_step"] == TRAIN_STEPS
    assert (
        overall["last_clean_checkpoint"]
        == overall["last_clean_checkpoint_on_disk"]
        == {
            "step": TRAIN_STEPS,
            "path": demo_run["checkpoint"].relative_to(demo_run["run_dir"]).as_posix(),  # relative: portable
            "weights_sha256": demo_run["weights_sha256"],
            "exists": True,
        }
    )
    assert snaps[(TRAIN_STEPS, "checkpoint")]["verdict"] == "clean"
    first = snaps[(MEMORIZING_STEPS[0], "live")]
    assert first["verdict"] == "memorizing"
    # The critical rule's threshold is behind it: mem_fraction measured at that step, no event yet (for: 2).
    assert [(r["source"], r["rule"], r["op"], r["threshold"]) for r in first["reasons"]] == [
        ("metric", "mem-fraction-high", ">=", 0.1)
    ]
    later = snaps[(MEMORIZING_STEPS[1], "live")]["reasons"]
    assert [(r["source"], r["rule"], r["step"]) for r in later] == [("event", "mem-fraction-high", MEMORIZING_STEPS[1])]
    mf = first["mem_fraction"]
    assert mf["memorized"] == mf["num_samples"] == DEMO_CONFIG["sampling"]["num_samples"]
    assert mf["ci95"] == list(wilson_interval(mf["memorized"], mf["num_samples"]))
    # every snapshot is identified by its weights: the checkpoint by its file, live ones by their tensors
    hashes = [w["weights_sha256"] for w in report["provenance"]["weights"]]
    assert demo_run["weights_sha256"] in hashes and all(hashes) and len(set(hashes)) == len(hashes)
    assert "weights-unhashed" not in {x["code"] for x in report["limitations"]}


def test_the_planted_duplicate_is_the_image_most_at_risk(demo_run: dict[str, Any], demo_report: dict) -> None:
    # duplicated 8 times in the memorizing model's data, it is copied first (Carlini et al. 2023)
    (first, *_) = demo_run["summary"]["images_at_risk"]
    assert demo_run["summary_after_close"] == demo_run["summary"]
    assert first["training_id"] == PLANTED_ID and first["first_copy_step"] == MEMORIZING_STEPS[0]
    top = demo_report["report"]["evidence"]["at_risk_images"][0]
    assert (top["rank"], top["training_id"], top["at_risk"]) == (1, PLANTED_ID, 1)
    assert top["ratio_min_step"] in MEMORIZING_STEPS and top["image"].startswith("data:image/png;base64,")
    assert "<h3>Training images most at risk</h3>" in demo_report["html"]


def test_demo_run_evidence_shows_the_copied_planted_image(demo_run: dict[str, Any], demo_report: dict) -> None:
    evidence = demo_report["report"]["evidence"]
    planted = [s for s in evidence["samples"] if s["nn1"] == PLANTED_ID]
    assert planted and all(s["memorized"] and s["image"] for s in planted)
    truth = np.asarray(Image.open(demo_run["planted"]).convert("RGB"), dtype=np.int16)
    # The sample's cell, cut from the evidence grid, is the planted image (upscaled): the row mapping is right.
    for s in planted:
        cell = _decode(s["image"])
        assert (
            np.abs(
                cell
                - np.asarray(
                    Image.fromarray(truth.astype(np.uint8)).resize(cell.shape[:2][::-1], Image.Resampling.NEAREST),
                    dtype=np.int16,
                )
            ).mean()
            < 2
        )
    (entry,) = [t for t in evidence["training_images"] if t["id"] == PLANTED_ID]
    assert entry["file_status"] == "ok" and entry["thumbnail_source"] == "reference file"
    assert entry["file_sha256"] == sha256_file(demo_run["planted"])
    assert np.array_equal(_decode(entry["thumbnail"]), truth)
    first = {f["training_id"]: f for f in evidence["first_seen"]}
    assert first[PLANTED_ID]["first_step"] == MEMORIZING_STEPS[0]
    assert evidence["identities"] == {"probed": False, "leaks": [], "interpolations": [], "first_seen": []}


def test_demo_report_escapes_the_planted_name_and_forbids_scripts(demo_report: dict) -> None:
    page = demo_report["html"]
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page
    assert "demo-&lt;b&gt;report&lt;/b&gt;" in page and "<b>report" not in page
    head = page.split("<head>", 1)[1]
    assert head.lstrip().startswith('<meta http-equiv="Content-Security-Policy"')
    csp = html.unescape(re.search(r'Content-Security-Policy" content="([^"]*)"', page).group(1))
    for directive in ("default-src 'none'", "img-src data:", "style-src 'unsafe-inline'"):
        assert directive in csp
    # Self-contained: every src is a data: URI and nothing names another origin.
    assert set(re.findall(r'src="([a-z]+):', page)) == {"data"}
    assert not re.search(r"(href|src)=\"(https?:|//)", page) and "@import" not in page and "url(" not in page


def test_demo_report_validates_and_rebuilds_byte_identically(demo_run: dict[str, Any], demo_report: dict) -> None:
    assert schema_errors(demo_report["report"]) == []
    again = write_report(
        demo_run["run_dir"], demo_report["out"] / "again.html", json_out=demo_report["out"] / "again.json"
    ).paths
    assert again["html"].read_bytes() == demo_report["paths"]["html"].read_bytes()
    assert again["json"].read_bytes() == demo_report["paths"]["json"].read_bytes()


def test_redacted_report_has_no_training_or_generated_pixels(demo_run: dict[str, Any], demo_report: dict) -> None:
    redacted = build_report(demo_run["run_dir"], redact=True)
    text, page = report_json(redacted), render_html(redacted)
    assert schema_errors(redacted) == []
    # The three plots (curves, per-seed and per-image heatmaps: numbers, not pixels) are the only images
    # left: decided, and stated in the report.
    plots = set(redacted["curves"]["images"].values())
    assert len(plots) == 4  # the headline chart, the grid, the per-seed and the per-image heatmaps
    assert all(r["image"] is None for r in redacted["evidence"]["at_risk_images"])
    assert set(DATA_URI.findall(text)) <= {"png"} and {m.group(0) for m in DATA_URI.finditer(text)} == plots
    assert {m.group(0) for m in DATA_URI.finditer(page)} == plots
    assert all(s["image"] is None for s in redacted["evidence"]["samples"])
    assert all(t["thumbnail"] is None for t in redacted["evidence"]["training_images"])
    # Evidence stays as ids and scores.
    full = demo_report["report"]["evidence"]["samples"]
    strip = [{k: v for k, v in s.items() if k not in ("image", "image_source")} for s in full]
    assert [
        {k: v for k, v in s.items() if k not in ("image", "image_source")} for s in redacted["evidence"]["samples"]
    ] == strip
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.png" in page and "Redacted report" in page
    assert {"code": "redacted"} in [{"code": x["code"]} for x in redacted["limitations"]]


# ---------------------------------------------------------------------------------------------
# Hand-written stores: verdict rules and limitations

HOSTILE = '<img src=x onerror="alert(2)">'
RULES = [
    {"name": "first-copy", "type": "first", "metric": "regurgitation/distinct_memorized", "op": ">", "value": 0,
     "severity": "warning", "message": "copy at {step}"},
    {"name": "mem-high", "type": "threshold", "metric": "regurgitation/mem_fraction", "op": ">=", "value": 0.5,
     "for": 2, "severity": "critical", "message": "high at {step}"},
    {"name": "mem-rising", "type": "trend", "metric": "regurgitation/mem_fraction", "op": ">=", "value": 0.5,
     "window": 3, "min_points": 2, "horizon": 500, "severity": "warning", "message": "rising"},
]  # fmt: skip
HAND_CONFIG = {
    "run_name": "hand",
    "embedder": {"name": "pixel"},
    "probes": {"regurgitation": {"mem_ratio": 1 / 3, "extraction_alpha": 0.5, "extraction_n": 50}},
    "rules": RULES,
    "note": HOSTILE,
}
# step -> memorized flags of the 4 samples (None: the probe failed at that step)
HAND_STEPS = {50: None, 100: [0, 0, 0, 0], 200: [1, 0, 0, 0], 300: [1, 1, 0, 0], 350: None, 400: [1, 1, 1, 0]}
# The verdicts the documented definition gives (VERDICT_DEFINITION), worked out by hand:
# 50 nothing ran; 100 clean; 200 warning event; 300 mem_fraction 0.5 meets the critical rule (its `for`
# aside); 350 failed, but the warning at 200 still applies; 400 critical event.
# 350 stays memorizing: the critical value measured at 300 counts cumulatively, like events.
HAND_VERDICTS = {50: "unaudited", 100: "clean", 200: "warning", 300: "memorizing", 350: "memorizing", 400: "memorizing"}
NN1 = ["a.png", "b.png", HOSTILE + ".png", "a.png"]
A_SEED, B_SEED = 1, 2  # a.png is smooth_image(1); b.png (not in the reference folder) is smooth_image(2)


def _hand_run(root: Path) -> Path:
    """A store written the way the front-ends write it, with known steps, matches, events and failures."""
    from memwatch.core.evidence import save_evidence_grid
    from memwatch.probes.identity import identity_pairs
    from memwatch.probes.regurgitation import regurgitation_pairs

    refs, elsewhere, out = root / "refs", root / "elsewhere", root / "out" / "memwatch"
    write_images(refs, [A_SEED], size=SIZE, prefix="a")  # a001.png
    (refs / "a001.png").rename(refs / "a.png")
    write_images(elsewhere, [B_SEED, 3], size=SIZE)  # b.png and the hostile one exist only to draw the grids
    paths = {"a.png": refs / "a.png", "b.png": elsewhere / f"img{B_SEED:03d}.png", NN1[2]: elsewhere / "img003.png"}
    reference = {"root": str(refs), "n": 3, "skipped": 1, "manifest_sha256": "0" * 64}
    info = {"versions": {"memwatch": "0.1.0", "torch": "2.15.0", "open_clip_torch": None}, "host": "trainer-01"}
    with Store(out / STORE_NAME) as store:
        run = store.ensure_run("hand", config=HAND_CONFIG, reference=reference, holdout=None, info=info, created_at=1e9)
        for step, flags in HAND_STEPS.items():
            snap = store.add_snapshot(
                run,
                step,
                kind="checkpoint",
                path=f"ckpt/checkpoint-{step}",
                weights_sha256=f"{step:064x}",
                created_at=1e9 + step,
            )
            if flags is None:
                store.record_failure(
                    snap,
                    "regurgitation",
                    config_hash="c0ffee",
                    error=f"CUDA out of memory {HOSTILE}",
                    started_at=1e9,
                    finished_at=1e9 + 1,
                    host="gpu-7",
                )
                continue
            matches = [
                {"sample": f"seed-{i:06d}", "seed": i, "nn1": NN1[i], "d1": 0.01 if f else 0.3, "d2": 0.3,
                 "ratio": (0.01 if f else 0.3) / 0.3 + i / 1000, "similarity": 0.99 if f else 0.7,
                 "extraction": math.nan, "memorized": bool(f), "copied": bool(f), "extracted": False}
                for i, f in enumerate(flags)
            ]  # fmt: skip
            samples = torch.stack([load_image(paths[m["nn1"]], SIZE) for m in matches])
            evidence = []
            if step != 200:  # the grid of step 200 is named but missing
                pairs = regurgitation_pairs(matches)
                grid = save_evidence_grid(out / "evidence" / f"reg-{step}.png", samples, pairs, paths, top=3)
                evidence.append(str(grid.relative_to(out)))
            else:
                evidence.append("evidence/reg-200.png")
            metrics = {
                "mem_fraction": sum(flags) / len(flags),
                "num_samples": float(len(flags)),
                "distinct_memorized": float(len({m["nn1"] for m in matches if m["memorized"]})),
                "extracted_fraction": math.nan,
            }
            result = ProbeResult("regurgitation", metrics, matches=matches, evidence=evidence, timings={"search": 0.1})
            store.write_result(
                snap, result, config_hash="c0ffee", started_at=1e9 + step, finished_at=1e9 + step + 2, host="gpu-7"
            )
        # Identity rows as the identity probe writes them (no "item" key: stored in insertion order).
        faces = [
            {"sample": "seed-000000", "seed": 0, "identity": HOSTILE, "identity_item": "a.png", "similarity": 0.8,
             "leak": True, "interpolation": False},
            {"sample": "seed-000001", "seed": 1, "identity": "bob", "identity_item": "b.png", "similarity": 0.52,
             "leak": False, "interpolation": True, "parent_a": "ann", "parent_b": "bob", "sim_a": 0.5, "sim_b": 0.52,
             "slerp_t": 0.5, "slerp_similarity": 0.6},
            {"sample": "seed-000002", "seed": 2, "identity": "cy", "identity_item": "a.png", "similarity": 0.1,
             "leak": False, "interpolation": False},
        ]  # fmt: skip
        samples = torch.stack([load_image(paths[n], SIZE) for n in ("b.png", "a.png", "b.png")])
        grid = save_evidence_grid(out / "evidence" / "faces-400.png", samples, identity_pairs(faces), paths)
        identity = ProbeResult(
            "identity",
            {"identity_leak_rate": 0.5, "identity_threshold": 0.45, "threshold_calibrated": 0.0},
            items=faces,
            evidence=[str(grid.relative_to(out))],
        )
        snap = store.add_snapshot(run, 400, kind="checkpoint", path="ckpt/checkpoint-400", weights_sha256=f"{400:064x}")
        store.write_result(
            snap, identity, config_hash="face", started_at=1e9 + 400, finished_at=1e9 + 401, host="gpu-7"
        )
        store.add_event(
            run,
            {
                "step": 200,
                "rule": "first-copy",
                "severity": "warning",
                "metric": "regurgitation/distinct_memorized",
                "value": 1,
                "threshold": 0,
                "message": f"copy {HOSTILE}",
                "evidence": {"training_ids": [HOSTILE]},
                "created_at": 1e9 + 200,
            },
        )
        store.add_event(
            run,
            {
                "step": 300,
                "rule": "mem-rising",
                "severity": "warning",
                "metric": "regurgitation/mem_fraction",
                "value": 0.5,
                "threshold": 0.5,
                "forecast_step": 420,
                "message": "rising",
                "created_at": 1e9 + 300,
            },
        )
        store.add_event(
            run,
            {
                "step": 400,
                "rule": "mem-high",
                "severity": "critical",
                "metric": "regurgitation/mem_fraction",
                "value": 0.75,
                "threshold": 0.5,
                "message": "high",
                "created_at": 1e9 + 400,
            },
        )
    return root / "out"


@pytest.fixture
def hand_run(tmp_path: Path) -> Path:
    return _hand_run(tmp_path)


@pytest.fixture(scope="module")
def hand_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of one hand-written run, built once for the tests that only read it."""
    return build_report(_hand_run(tmp_path_factory.mktemp("hand")))


def test_verdicts_follow_the_documented_definition(hand_report: dict[str, Any]) -> None:
    report = hand_report
    verdict = report["verdict"]
    assert verdict["definition"] == VERDICT_DEFINITION
    assert {s["step"]: s["verdict"] for s in verdict["snapshots"]} == HAND_VERDICTS
    by_step = {s["step"]: s for s in verdict["snapshots"]}
    assert [(r["source"], r["rule"], r["op"], r["threshold"], r["value"]) for r in by_step[300]["reasons"]] == [
        ("metric", "mem-high", ">=", 0.5, 0.5)
    ]
    assert [(r["source"], r["rule"], r["step"]) for r in by_step[350]["reasons"]] == [("metric", "mem-high", 300)]
    assert [(r["rule"], r["severity"]) for r in by_step[400]["reasons"]] == [("mem-high", "critical")]
    overall = verdict["overall"]
    assert overall["verdict"] == "memorizing" and overall["since_step"] == 300
    assert overall["onset_step"] == 200 and overall["first_alarm_step"] == 200 and overall["identity_onset_step"] == 400
    assert overall["last_clean_step"] == 100
    # the hand-written run's folders do not exist: the last clean checkpoint is known, but not on disk
    assert overall["last_clean_checkpoint"] == {
        "step": 100,
        "path": "ckpt/checkpoint-100",
        "weights_sha256": f"{100:064x}",
        "exists": False,
    }
    assert overall["last_clean_checkpoint_on_disk"] is None
    codes = {x["code"]: x["message"] for x in report["limitations"]}
    assert "ckpt/checkpoint-100 has been deleted" in codes["checkpoint-deleted"]
    assert overall["snapshots_by_verdict"] == {
        v: list(HAND_VERDICTS.values()).count(v) for v in ("unaudited", "clean", "at-risk", "warning", "memorizing")
    }
    (forecast,) = report["curves"]["forecasts"]
    assert forecast == {
        "step": 300,
        "rule": "mem-rising",
        "severity": "warning",
        "metric": "regurgitation/mem_fraction",
        "value": 0.5,
        "threshold": 0.5,
        "forecast_step": 420,
    }
    assert schema_errors(report) == []


def test_limitations_name_failures_missing_files_and_undefined_numbers(hand_report: dict[str, Any]) -> None:
    report = hand_report
    codes = {x["code"]: x["message"] for x in report["limitations"]}
    assert HOSTILE in codes["probe-failed"] and "gpu-7" in codes["probe-failed"]
    assert "evidence/reg-200.png" in codes["evidence-missing"]
    assert "b.png" in codes["reference-image-missing"]
    assert "n = 50" in codes["extraction-undefined"] and "3 images" in codes["extraction-undefined"]
    assert "1 file(s)" in codes["reference-skipped"]
    assert {"face-threshold-uncalibrated", "face-weights-unverified", "no-holdout"} <= set(codes)
    assert "weights-unhashed" not in codes  # every snapshot of this run has its weights hash
    assert "probes-sparse" not in codes  # samples at 4 steps: enough for a forecast to warn at the last
    assert "samples-without-pixels" in codes  # grids keep the top 3 of 4 samples, and one grid is missing
    assert "embedder-weights-unverified" not in codes  # the pixel embedder has no weights
    runs = report["provenance"]["probe_runs"]
    failed = [r for r in runs if r["status"] == "failed"]
    assert [(r["step"], r["host"], r["started_at_utc"]) for r in failed] == [
        (50, "gpu-7", "2001-09-09T01:46:40.000Z"), (350, "gpu-7", "2001-09-09T01:46:40.000Z")
    ]  # fmt: skip
    # Samples without a grid, or below the grid's top rows, are kept as ids and scores.
    samples = report["evidence"]["samples"]
    assert {s["step"] for s in samples if s["image"] is None} >= {200}
    assert all(s["extraction"] is None for s in samples)  # NaN is null in JSON
    # b.png is not in the reference folder: its thumbnail is cut from an evidence grid instead.
    training = {t["id"]: t for t in report["evidence"]["training_images"]}
    assert training["b.png"]["file_status"] == "missing" and training["b.png"]["thumbnail_source"] == "evidence grid"
    assert training["a.png"]["file_status"] == "ok" and training["a.png"]["thumbnail_source"] == "reference file"


def test_missing_reference_root_is_reported_not_fatal(hand_run: Path) -> None:
    shutil.rmtree(hand_run.parent / "refs")
    report = build_report(hand_run)
    codes = {x["code"] for x in report["limitations"]}
    assert "reference-root-missing" in codes
    assert {t["file_status"] for t in report["evidence"]["training_images"]} == {"no-reference-root"}
    assert schema_errors(report) == []


def test_identity_rows_become_first_seen_leaks_and_blends(hand_report: dict[str, Any]) -> None:
    identities = hand_report["evidence"]["identities"]
    assert identities["probed"] is True
    assert identities["first_seen"] == [
        {"identity": HOSTILE, "first_step": 400, "first_seeds": [0], "leaks": 1, "max_similarity": 0.8}
    ]
    assert [(b["parent_a"], b["parent_b"], b["slerp_t"]) for b in identities["interpolations"]] == [("ann", "bob", 0.5)]
    # Generated faces are cut from the identity probe's evidence grid: seed 0 drew b.png, seed 1 a.png.
    (leak,), (blend,) = identities["leaks"], identities["interpolations"]
    for row, drawn in ((leak, B_SEED), (blend, A_SEED)):
        cell = _decode(row["image"])
        small = np.asarray(
            Image.fromarray(smooth_image(drawn, SIZE)).resize(cell.shape[1::-1], Image.Resampling.NEAREST)
        )
        assert np.abs(cell - small.astype(np.int16)).mean() < 2, row["image_source"]
    thresholds = {t["name"]: t for t in hand_report["provenance"]["thresholds"]}
    face = thresholds["identity verification threshold (cosine)"]
    assert face["value"] == 0.45 and face["source"].startswith("NOT calibrated")


def test_every_string_from_data_is_escaped(hand_report: dict[str, Any]) -> None:
    page = render_html(hand_report)
    assert HOSTILE not in page and "<img src=x" not in page
    assert html_escaped(HOSTILE) in page
    # Only our own images: every <img> has a data: src and our classes.
    assert all(src.startswith("data:image/") for src in re.findall(r'<img [^>]*src="([^"]*)"', page))
    assert "<script" not in page.lower()


def html_escaped(text: str) -> str:
    """What the page must show for ``text``: the template engine's escaping (quotes included)."""
    from markupsafe import escape

    return str(escape(text))


def test_render_refuses_images_that_are_not_inline_data(hand_report: dict[str, Any]) -> None:
    report = hand_report
    tampered = copy.deepcopy(report)
    tampered["curves"]["images"]["curves"] = "https://example.invalid/track.png"
    tampered["evidence"]["training_images"][0]["thumbnail"] = 'data:image/png;base64,AAAA" onerror="alert(3)'
    page = render_html(tampered)
    # Refused, not loaded and not printed: neither the remote address nor the attribute break-out appears.
    assert "example.invalid" not in page and "alert(3)" not in page
    assert page.count("image not available]") >= 2
    assert schema_errors(tampered)  # the schema rejects both too


def test_schema_rejects_a_broken_report(hand_report: dict[str, Any]) -> None:
    report = hand_report
    assert schema_errors(report) == []
    missing = copy.deepcopy(report)
    del missing["provenance"]["config_hash"]
    wrong_enum = copy.deepcopy(report)
    wrong_enum["verdict"]["snapshots"][0]["verdict"] = "fine"
    extra = copy.deepcopy(report)
    extra["verdict"]["overall"]["confidence"] = "high"
    bad_hash = copy.deepcopy(report)
    bad_hash["provenance"]["weights"][0]["weights_sha256"] = "not-a-hash"
    for broken in (missing, wrong_enum, extra, bad_hash):
        assert schema_errors(broken), broken is missing
    assert json.loads(json.dumps(report_schema()))["$defs"]  # the schema itself is plain JSON


def test_thresholds_cite_sources_only_for_packaged_defaults(tmp_path: Path) -> None:
    defaults = sources.packaged_defaults()
    # Every default rule and every threshold setting declares its source.
    assert all(r.get("source") for r in defaults["rules"])
    thresholds = sources.threshold_settings(defaults)
    assert {p for p, _ in thresholds} >= {"probes.regurgitation.mem_ratio", "probes.identity.target_fmr"}
    for path, source in thresholds:
        *parents, key = path.split(".")
        assert key in sources.dig(defaults, ".".join(parents)) and source != sources.CUSTOM, path
    changed = copy.deepcopy(defaults)
    changed["rules"][2]["value"] = 0.3  # mem-fraction-high made stricter
    changed["probes"]["regurgitation"]["mem_ratio"] = 0.25
    with Store(tmp_path / STORE_NAME) as store:
        store.ensure_run("defaults", config=defaults, created_at=1.0)
        store.ensure_run("changed", config=changed, created_at=2.0)
    by_run = {
        name: {t["name"]: t for t in build_report(tmp_path, run=name)["provenance"]["thresholds"]}
        for name in ("defaults", "changed")
    }
    for name in (r["name"] for r in defaults["rules"]):
        text = next(r["source"] for r in defaults["rules"] if r["name"] == name)
        assert by_run["defaults"][name]["source"] == text and by_run["defaults"][name]["packaged_default"]
    assert by_run["defaults"]["probes.regurgitation.mem_ratio"]["packaged_default"]
    assert by_run["defaults"]["embedder.copy_threshold (pixel default)"]["packaged_default"]
    for name in ("mem-fraction-high", "probes.regurgitation.mem_ratio"):
        assert not by_run["changed"][name]["packaged_default"]
        assert by_run["changed"][name]["source"].startswith("set by the run's configuration")
    assert by_run["changed"]["first-regurgitation"]["packaged_default"]
    empty = build_report(tmp_path, run="defaults")
    assert empty["verdict"]["overall"]["verdict"] == "unaudited"
    assert "no-results" in {x["code"] for x in empty["limitations"]}
    assert schema_errors(empty) == []


def test_wilson_interval_brackets_the_fraction() -> None:
    z = 1.959963984540054
    for n in (1, 8, 32, 1000):
        assert wilson_interval(0, n)[0] == 0.0
        assert math.isclose(wilson_interval(0, n)[1], z * z / (n + z * z))  # closed form at k = 0
        for k in range(0, n + 1, max(1, n // 7)):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            mirrored = wilson_interval(n - k, n)
            assert math.isclose(lo, 1 - mirrored[1], abs_tol=1e-12)


def test_write_report_defaults_and_bad_input(hand_run: Path, tmp_path: Path) -> None:
    paths = write_report(hand_run).paths
    assert paths == {"html": hand_run / "memwatch" / "report.html"}
    assert paths["html"].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    with pytest.raises(MemwatchError, match="no run 'nope'"):
        build_report(hand_run, run="nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MemwatchError, match="no memwatch store"):
        build_report(empty)


def test_grid_rows_that_do_not_match_the_store_are_not_used(hand_run: Path) -> None:
    from memwatch.core.evidence import CELL, LABEL_H

    grid_path = hand_run / "memwatch" / "evidence" / "reg-300.png"
    grid = Image.open(grid_path).convert("RGB")
    band = CELL + LABEL_H
    first, second = grid.crop((0, 0, 2 * CELL, band)), grid.crop((0, band, 2 * CELL, 2 * band))
    grid.paste(second, (0, 0))
    grid.paste(first, (0, band))  # rows 1 and 2 swapped: row 1 now shows b.png where the store says a.png
    grid.save(grid_path)
    report = build_report(hand_run)
    codes = {x["code"]: x["message"] for x in report["limitations"]}
    assert "reg-300.png" in codes["evidence-mismatch"]
    assert [s["image"] for s in report["evidence"]["samples"] if s["step"] == 300] == [None, None]
    assert all(s["image"] for s in report["evidence"]["samples"] if s["step"] == 400)


def test_report_command_line(capsys, tmp_path: Path) -> None:
    from memwatch.cli import main

    assert main(["report", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == report_schema()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
