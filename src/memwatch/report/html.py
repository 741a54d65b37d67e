"""Render a report dict (from :func:`memwatch.report.build.build_report`) as one self-contained HTML page.

Self-contained: no script, no external font, style sheet or image; every image is a ``data:`` URI, so
the file reads the same offline, in an e-mail attachment or printed. Safe with hostile data: every
string that comes from the run (file names, ids, prompts, identities, config values, messages) goes
through :func:`html.escape`, image sources are accepted only as base64 ``data:image/png|jpeg`` URIs,
and a Content-Security-Policy meta tag forbids scripts and any fetch as a second line of defence.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from memwatch.report.build import FORMAT, VERDICTS

#: Defence in depth: nothing but inline style and data: images may load, no script may run.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_DATA_URI = re.compile(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/]*={0,2}")
VERDICT_TEXT = {
    "memorizing": "MEMORIZING: reproduces training data",
    "warning": "WARNING: early signs of memorization",
    "clean": "CLEAN: no memorization detected by the probes that ran",
    "unaudited": "UNAUDITED: no probe result",
}

_CSS = """
:root { --fg: #1a1a1a; --muted: #5a5a5a; --line: #d0d0d0; --bg2: #f5f5f5; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1200px; padding: 16px 24px; line-height: 1.4; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; border-bottom: 2px solid var(--line);
       padding-bottom: 4px; margin-top: 32px; } h3 { font-size: 15px; margin: 20px 0 6px; }
.muted { color: var(--muted); } .mono, code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; }
.mono { font-size: 12px; word-break: break-all; }
pre { background: var(--bg2); padding: 8px; overflow-x: auto; font-size: 12px; white-space: pre-wrap;
      word-break: break-all; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 12.5px; }
th, td { border: 1px solid var(--line); padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: var(--bg2); } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
.badge { display: inline-block; padding: 2px 8px; border-radius: 4px; font-weight: 600; color: #fff; }
.v-memorizing { background: #b3261e; } .v-warning { background: #b86e00; } .v-clean { background: #2e7d32; }
.v-unaudited, .v-unknown { background: #6b6b6b; }
.sev-critical { color: #b3261e; font-weight: 600; } .sev-warning { color: #b86e00; font-weight: 600; }
.sev-info { color: var(--muted); }
.summary { border: 2px solid var(--line); border-radius: 6px; padding: 12px 16px; margin: 12px 0; }
.summary .big { font-size: 20px; }
.summary dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0 0; }
.summary dt { color: var(--muted); } .summary dd { margin: 0; }
.banner { background: #fff4d6; border: 1px solid #e0b84c; padding: 8px 12px; border-radius: 4px; }
nav ol { columns: 2; margin: 4px 0; }
img.plot { max-width: 100%; height: auto; border: 1px solid var(--line); }
img.px { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
         border: 1px solid var(--line); background: var(--bg2); }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px; break-inside: avoid; max-width: 100%; }
.card .head { display: flex; gap: 10px; align-items: flex-start; margin-bottom: 6px; }
.tiles { display: flex; flex-wrap: wrap; gap: 8px; }
.tile { width: 112px; font-size: 11px; } .tile .noimg { width: 96px; height: 96px; display: flex;
        align-items: center; justify-content: center; text-align: center; border: 1px dashed var(--line);
        color: var(--muted); font-size: 11px; padding: 4px; }
.label { word-break: break-all; }
@page { size: A4; margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  h2 { break-after: avoid; } tr, .card, img { break-inside: avoid; }
  .scroll { overflow: visible; } nav { display: none; }
}
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML document (a string; write it as UTF-8).

    Args:
        report: the dict from :func:`memwatch.report.build.build_report` (or its JSON read back).

    Returns:
        The page. The same report gives the same text.

    Example:
        >>> page = render_html(build_report("out/"))  # doctest: +SKIP
        >>> Path("report.html").write_text(page, encoding="utf-8")  # doctest: +SKIP
    """
    run = report["run"]
    body = [
        _header(report),
        _verdict_section(report["verdict"]),
        _curves_section(report["curves"], report["events"]),
        _signals_section(report["curves"]["metrics"]),
        _evidence_section(report["evidence"], report["redacted"]),
        _provenance_section(report["provenance"], report["verdict"]["snapshots"]),
        _limitations_section(report["limitations"]),
        f'<footer class="muted"><p>Generated by memwatch {_e(report["generator"]["memwatch"])} from the run\'s '
        f"store alone ({_e(FORMAT)} format version {_e(report['format_version'])}). Times are UTC.</p></footer>",
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">\n'
        '<meta charset="utf-8">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>memwatch audit report: {_e(run['name'])}</title>\n"
        f"<style>{_CSS}</style>\n"
        "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Sections


def _header(report: Mapping[str, Any]) -> str:
    run, overall = report["run"], report["verdict"]["overall"]
    verdict = overall["verdict"]
    lcc = overall["last_clean_checkpoint"]
    rows = [
        ("Verdict", f"{_badge(verdict)} {_e(VERDICT_TEXT.get(verdict, verdict))}"),
        ("Since step", _n(overall["since_step"])),
        ("Onset step (first memorized sample)", _n(overall["onset_step"])),
        ("First leaked identity", _n(overall["identity_onset_step"])),
        ("First warning or critical event", _n(overall["first_alarm_step"])),
        ("Last clean step", _n(overall["last_clean_step"])),
        (
            "Last clean checkpoint",
            "none recorded"
            if lcc is None
            else f"step {_n(lcc['step'])}: <span class=mono>{_e(lcc['path'])}</span>"
            f" (sha256 <span class=mono>{_e(lcc['weights_sha256'])}</span>)",
        ),
        ("Snapshots audited", f"{_n(overall['snapshots'])}: " + _by_verdict(overall["snapshots_by_verdict"])),
        ("Why", _reasons(overall["reasons"]) if overall["reasons"] else "no warning or critical rule fired"),
    ]
    redacted = (
        '<p class="banner"><strong>Redacted report.</strong> Training and generated images are left out; '
        "evidence is given by ids, hashes and scores. The curve plots show numbers only.</p>"
        if report["redacted"]
        else ""
    )
    toc = "".join(
        f'<li><a href="#{a}">{t}</a></li>'
        for a, t in (
            ("verdict", "Verdict per checkpoint"),
            ("curves", "Memorization curves and events"),
            ("signals", "All signals"),
            ("evidence", "Evidence"),
            ("provenance", "Provenance"),
            ("limitations", "Limitations"),
        )
    )
    return (
        f"<header><h1>memwatch audit report: {_e(run['name'])}</h1>"
        f'<p class="muted">Run recorded {_e(run["created_at_utc"])}.</p>{redacted}'
        f'<section class="summary" id="summary"><div class="big">{_badge(verdict)}</div>'
        f"<dl>{''.join(f'<dt>{k}</dt><dd>{v}</dd>' for k, v in rows)}</dl></section>"
        f"<nav><ol>{toc}</ol></nav></header>"
    )


def _verdict_section(verdict: Mapping[str, Any]) -> str:
    rows = []
    for s in verdict["snapshots"]:
        mf = s["mem_fraction"]
        if mf is None:
            mem = "n/a"
        elif mf["ci95"] is None:
            mem = _n(mf["value"])
        else:
            lo, hi = mf["ci95"]
            mem = f"{_n(mf['value'])} ({_n(mf['memorized'])}/{_n(mf['num_samples'])}; 95% CI {_n(lo)}-{_n(hi)})"
        rows.append(
            [
                _n(s["step"]),
                _e(s["kind"]),
                f"<span class=mono>{_e(s['path'])}</span>",
                f"<span class=mono>{_e(_short(s['weights_sha256']))}</span>",
                _badge(s["verdict"]),
                mem,
                _reasons(s["reasons"]) if s["reasons"] else "",
            ]
        )
    return (
        '<section id="verdict"><h2>Verdict per checkpoint</h2>'
        f"<p>{_e(verdict['definition'])}</p>"
        "<p class=muted>mem_fraction: share of generated samples memorized (d1/d2 below mem_ratio), with the "
        "memorized count and a Wilson 95% interval: how sure the fraction is, given the number of samples.</p>"
        + _table(
            ["step", "kind", "path", "weights sha256", "verdict", "mem_fraction", "rule and threshold behind it"],
            rows,
        )
        + "</section>"
    )


def _curves_section(curves: Mapping[str, Any], events: Sequence[Mapping[str, Any]]) -> str:
    images = curves["images"]
    forecast_rows = [
        [
            _n(f["step"]),
            _e(f["rule"]),
            _sev(f["severity"]),
            _e(f["metric"]),
            _n(f["value"]),
            _n(f["threshold"]),
            _n(f["forecast_step"]),
        ]
        for f in curves["forecasts"]
    ]
    event_rows = [
        [
            _n(e["step"]),
            _e(e["rule"]),
            _sev(e["severity"]),
            _e(e["metric"]),
            _n(e["value"]),
            _n(e["threshold"]),
            _n(e["forecast_step"]),
            _e(e["message"]),
            f"<span class=mono>{_e(_compact(e['evidence']))}</span>" if e["evidence"] else "",
            _e(e["created_at_utc"]),
        ]
        for e in events
    ]
    return (
        '<section id="curves"><h2>Memorization curves and events</h2>'
        "<p class=muted>Every metric against training step. Dashed lines: rule thresholds; vertical lines: events "
        "(grey info, orange warning, red critical); dotted lines and diamonds: trend forecasts of a threshold "
        "crossing.</p>"
        + _img(images["curves"], "memorization curves: every metric by training step", "plot")
        + "<h3>Per-seed d1/d2 (fixed probe seeds)</h3>"
        + f"<p class=muted>Red cells lie below mem_ratio = {_n(curves['mem_ratio'])}: the sample copies the "
        "annotated training image; the step at which a seed turns red is when it snapped onto it.</p>"
        + _img(images["seeds"], "per-seed d1/d2 heatmap", "plot")
        + "<h3>Forecasts</h3>"
        + (
            _table(
                ["step", "rule", "severity", "metric", "value", "threshold", "forecast crossing step"], forecast_rows
            )
            if forecast_rows
            else "<p>No trend rule forecast a crossing.</p>"
        )
        + "<h3>Events</h3>"
        + (
            _table(
                [
                    "step",
                    "rule",
                    "severity",
                    "metric",
                    "value",
                    "threshold",
                    "forecast step",
                    "message",
                    "evidence",
                    "raised (UTC)",
                ],
                event_rows,
            )
            if event_rows
            else "<p>No rule fired.</p>"
        )
        + "</section>"
    )


def _signals_section(metrics: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """One table per probe: steps down, that probe's metrics across (every metric, whatever the probe)."""
    by_probe: dict[str, list[str]] = {}
    for name in metrics:
        by_probe.setdefault(name.split("/", 1)[0], []).append(name)
    parts = [
        '<section id="signals"><h2>All signals</h2>'
        "<p class=muted>Every metric every probe recorded (membership: members vs holdout by loss; condnoise: "
        "conditional-noise magnitude of training vs other prompts; regurgitation: samples vs training images; "
        "identity: generated faces vs training identities). n/a: undefined at that step.</p>"
    ]
    if not metrics:
        parts.append("<p>No metrics recorded.</p>")
    for probe, names in by_probe.items():
        steps = sorted({p["step"] for n in names for p in metrics[n]})
        value = {(n, p["step"]): p["value"] for n in names for p in metrics[n]}
        rows = [[_n(s), *(_n(value.get((n, s))) if (n, s) in value else "" for n in names)] for s in steps]
        header = ["step", *(n.split("/", 1)[1] for n in names)]
        parts.append(f"<h3>{_e(probe)}</h3><div class=scroll>{_table(header, rows, numeric=True)}</div>")
    parts.append("</section>")
    return "".join(parts)


def _evidence_section(evidence: Mapping[str, Any], redacted: bool) -> str:
    training = {t["id"]: t for t in evidence["training_images"]}
    samples = evidence["samples"]
    by_training: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        by_training.setdefault(str(s["nn1"]), []).append(s)
    first = {f["training_id"]: f for f in evidence["first_seen"]}
    order = [f["training_id"] for f in evidence["first_seen"]] + sorted(set(by_training) - set(first))
    cards = [_training_card(t, training.get(t), first.get(t), by_training.get(t, []), redacted) for t in order]
    parts = [
        '<section id="evidence"><h2>Evidence</h2>',
        "<h3>Regurgitated samples beside their nearest training image</h3>",
        "<p class=muted>One card per training image that a flagged sample (memorized, copied or extracted) lies "
        "nearest to: the training image, then the samples, each with its step, seed and scores. d1, d2: distance "
        "to the nearest and second-nearest training image; ratio = d1/d2; sim: similarity to the nearest.</p>",
        f'<div class="gallery">{"".join(cards)}</div>' if cards else "<p>No sample was flagged.</p>",
        "<h3>First step each training image was regurgitated</h3>",
        _table(
            ["training image", "first step", "seeds at that step", "total memorized samples"],
            [
                [
                    f"<span class=label>{_e(f['training_id'])}</span>",
                    _n(f["first_step"]),
                    _e(", ".join(map(str, f["first_seeds"]))),
                    _n(f["total_hits"]),
                ]
                for f in evidence["first_seen"]
            ],
        )
        if evidence["first_seen"]
        else "<p>No training image was regurgitated (no sample below mem_ratio).</p>",
        "<h3>All flagged samples</h3>",
        _samples_table(samples) if samples else "<p>None.</p>",
        _identity_block(evidence["identities"], training, redacted),
        _files_block(evidence["files"]),
        "</section>",
    ]
    return "".join(parts)


def _training_card(
    tid: str,
    image: Mapping[str, Any] | None,
    first: Mapping[str, Any] | None,
    samples: Sequence[Mapping[str, Any]],
    redacted: bool,
) -> str:
    pic = _thumb(image, redacted)
    status = "" if image is None or image["file_status"] == "ok" else f" ({_e(image['file_status'])})"
    if first:
        seen = f"first regurgitated at step {_n(first['first_step'])}, {_n(first['total_hits'])} memorized samples"
    else:
        seen = "flagged (copied or extracted), not memorized"
    sha = ""
    if image and image["file_sha256"]:
        sha = f"<br>sha256 <span class=mono>{_e(_short(image['file_sha256']))}</span>"
    tiles = []
    for s in samples:
        img = (
            _img(s["image"], f"generated sample {s['sample']}", "px")
            if s["image"]
            else (f'<div class="noimg">{"redacted" if redacted else "no pixels kept"}</div>')
        )
        flags = ", ".join(f for f in ("memorized", "copied", "extracted") if s[f])
        tiles.append(
            f'<div class="tile">{img}<div>step {_n(s["step"])} · seed {_n(s["seed"])}</div>'
            f"<div>ratio {_n(s['ratio'])} · d1 {_n(s['d1'])}</div><div>sim {_n(s['similarity'])}</div>"
            f'<div class="muted">{_e(flags)}</div></div>'
        )
    return (
        f'<div class="card"><div class="head">{pic}<div><strong>training image</strong><br>'
        f'<span class="label mono">{_e(tid)}</span>{status}{sha}<br><span class=muted>{seen}</span></div></div>'
        f'<div class="tiles">{"".join(tiles)}</div></div>'
    )


def _thumb(image: Mapping[str, Any] | None, redacted: bool) -> str:
    if image is not None and image["thumbnail"]:
        note = " (as cut from the evidence grid)" if image["thumbnail_source"] == "evidence grid" else ""
        return _img(image["thumbnail"], f"training image {image['id']}{note}", "px")
    reason = "redacted" if redacted else "image not available"
    return f'<div class="tile"><div class="noimg">{reason}</div></div>'


def _samples_table(samples: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            _n(s["step"]),
            _e(s["probe"]),
            f"<span class=label>{_e(s['sample'])}</span>",
            _n(s["seed"]),
            f"<span class=label>{_e(s['nn1'])}</span>",
            _n(s["d1"]),
            _n(s["d2"]),
            _n(s["ratio"]),
            _n(s["similarity"]),
            _n(s["extraction"]),
            _e(", ".join(f for f in ("memorized", "copied", "extracted") if s[f])),
            _e(s["image_source"] or ""),
        ]
        for s in samples
    ]
    head = [
        "step",
        "probe",
        "sample",
        "seed",
        "nearest training image",
        "d1",
        "d2",
        "ratio",
        "sim",
        "extraction",
        "flags",
        "pixels from",
    ]
    return f"<div class=scroll>{_table(head, rows)}</div>"


def _identity_block(identities: Mapping[str, Any], training: Mapping[str, Mapping[str, Any]], redacted: bool) -> str:
    if not identities["probed"]:
        return "<h3>Identities</h3><p>The identity probe did not run on this model: no face was checked.</p>"
    first = (
        _table(
            ["identity", "first leaked at step", "seeds at that step", "leaked samples", "max similarity"],
            [
                [_e(f["identity"]), _n(f["first_step"]), _e(", ".join(map(str, f["first_seeds"]))), _n(f["leaks"]),
                 _n(f["max_similarity"])]
                for f in identities["first_seen"]
            ],
        )
        if identities["first_seen"]
        else "<p>No generated face verified against a training identity.</p>"
    )  # fmt: skip

    def pictures(r: Mapping[str, Any]) -> list[str]:
        face = training.get(str(r["identity_item"])) if r["identity_item"] else None
        sample = (
            _img(r["image"], f"generated face {r['sample']}", "px")
            if r["image"]
            else f'<div class="tile"><div class="noimg">{"redacted" if redacted else "no pixels kept"}</div></div>'
        )
        return [sample, _thumb(face, redacted) if face else ""]

    leaks = [
        [*pictures(r), _n(r["step"]), f"<span class=label>{_e(r['sample'])}</span>", _n(r["seed"]),
         _e(r["identity"]), f"<span class=label>{_e(r['identity_item'])}</span>", _n(r["similarity"])]
        for r in identities["leaks"]
    ]  # fmt: skip
    blends = [
        [*pictures(r), _n(r["step"]), _e(r["sample"]), _n(r["seed"]), _e(r["parent_a"]), _e(r["parent_b"]),
         _n(r["sim_a"]), _n(r["sim_b"]), _n(r["slerp_t"]), _n(r["slerp_similarity"])]
        for r in identities["interpolations"]
    ]  # fmt: skip
    faces = ["generated face", "nearest training face"]
    return (
        "<h3>Identities: first step each training identity leaked</h3>"
        + first
        + "<h3>Leaked faces beside the nearest training face</h3>"
        + (_table([*faces, "step", "sample", "seed", "identity", "training face id", "similarity"], leaks)
           if leaks else "<p>None.</p>")
        + "<h3>Blended identities (interpolation between two training identities)</h3>"
        + (_table([*faces, "step", "sample", "seed", "identity A", "identity B", "sim A", "sim B", "slerp t",
                   "sim to blend"], blends) if blends else "<p>None.</p>")
    )  # fmt: skip


def _files_block(files: Sequence[Mapping[str, Any]]) -> str:
    if not files:
        return "<h3>Evidence files</h3><p>No evidence file was written.</p>"
    rows = [
        [
            _e(f["probe"]),
            _n(f["step"]),
            f"<span class=mono>{_e(f['path'])}</span>",
            "yes" if f["exists"] else "<strong>missing</strong>",
            f"<span class=mono>{_e(f['sha256'])}</span>",
        ]
        for f in files
    ]
    inline = "".join(
        f"<figure><figcaption class=mono>{_e(f['path'])}</figcaption>{_img(f['image'], f['path'], 'plot')}</figure>"
        for f in files
        if f["image"]
    )
    return "<h3>Evidence files</h3>" + _table(["probe", "step", "file", "present", "sha256"], rows) + inline


def _provenance_section(prov: Mapping[str, Any], snapshots: Sequence[Mapping[str, Any]]) -> str:
    weights = _table(
        ["step", "kind", "path", "weights sha256"],
        [
            [
                _n(w["step"]),
                _e(w["kind"]),
                f"<span class=mono>{_e(w['path'])}</span>",
                f"<span class=mono>{_e(w['weights_sha256'] or 'not recorded')}</span>",
            ]
            for w in prov["weights"]
        ],
    )
    sets = _table(
        ["set", "root", "images", "skipped", "manifest sha256"],
        [
            [
                name,
                f"<span class=mono>{_e(s.get('root'))}</span>",
                _n(s.get("n")),
                _n(s.get("skipped")),
                f"<span class=mono>{_e(s.get('manifest_sha256'))}</span>",
            ]
            if isinstance(s, Mapping)
            else [name, "not given", "", "", ""]
            for name, s in (("reference (training)", prov["reference"]), ("holdout (non-members)", prov["holdout"]))
        ],
    )
    thresholds = _table(
        ["kind", "name", "metric", "condition", "severity", "details", "source"],
        [
            [
                _e(t["kind"]),
                _e(t["name"]),
                _e(t["metric"]),
                _e(f"{t['op']} {t['value']}" if t["op"] else t["value"]),
                _sev(t["severity"]) if t["severity"] else "",
                _e(_compact(t["details"])) if t["details"] else "",
                _e(t["source"]) + ("" if t["packaged_default"] else " <em>(not a packaged default)</em>"),
            ]
            for t in prov["thresholds"]
        ],
    )
    versions = _table(["package", "version"], [[_e(k), _e(v or "not installed")] for k, v in prov["versions"].items()])
    emb = prov["embedder"]
    runs = _table(
        [
            "step",
            "kind",
            "probe",
            "status",
            "host",
            "started (UTC)",
            "finished (UTC)",
            "seconds",
            "config hash",
            "error",
        ],
        [
            [
                _n(r["step"]),
                _e(r["kind"]),
                _e(r["probe"]),
                _e(r["status"]),
                _e(r["host"]),
                _e(r["started_at_utc"]),
                _e(r["finished_at_utc"]),
                _n(r["duration_s"]),
                f"<span class=mono>{_e(r['config_hash'])}</span>",
                _e(r["error"] or ""),
            ]
            for r in prov["probe_runs"]
        ],
    )
    verified = "matches the stored config" if prov["config_hash_verified"] else "<strong>does NOT match</strong>"
    return (
        '<section id="provenance"><h2>Provenance: exactly what was audited</h2>'
        "<h3>Audited weights</h3>"
        + weights
        + "<h3>Reference and holdout sets</h3>"
        + sets
        + "<h3>Configuration</h3>"
        + f"<p>memwatch config hash <span class=mono>{_e(prov['config_hash'])}</span> ({verified}); sha256 of the "
        f"canonical config JSON <span class=mono>{_e(prov['config_sha256'])}</span>.</p>"
        + f"<pre>{_e(json.dumps(prov['config'], indent=2, sort_keys=True, ensure_ascii=False))}</pre>"
        + "<h3>Thresholds and their sources</h3>"
        + thresholds
        + "<h3>Software and host</h3>"
        + f"<p>Versions recorded when the run started, on host <span class=mono>{_e(prov['host'])}</span>.</p>"
        + versions
        + "<h3>Embedder</h3>"
        + f"<p>{_e(emb['name'])}: {_e(emb['weights_identity'])}</p>"
        + f"<pre>{_e(json.dumps(emb['settings'], indent=2, sort_keys=True, ensure_ascii=False))}</pre>"
        + "<h3>Probe runs (time and host of each)</h3><div class=scroll>"
        + runs
        + "</div>"
        + f"<p class=muted>{len(snapshots)} snapshot(s), {len(prov['probe_runs'])} probe run(s).</p></section>"
    )


def _limitations_section(limitations: Sequence[Mapping[str, Any]]) -> str:
    items = "".join(f"<li><code>{_e(x['code'])}</code>: {_e(x['message'])}</li>" for x in limitations)
    return (
        '<section id="limitations"><h2>Limitations the reader must know</h2>'
        + (f"<ul>{items}</ul>" if items else "<p>None found.</p>")
        + "</section>"
    )


# ---------------------------------------------------------------------------------------------
# Small pieces


def _e(value: Any) -> str:
    """Escaped text of a value from data; None shows as an em dash."""
    return "—" if value is None else html.escape(str(value), quote=True)


def _n(value: Any) -> str:
    """A number for a table cell: ints as they are, floats to 4 significant digits, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _short(sha: str | None) -> str:
    return "not recorded" if not sha else f"{sha[:16]}…"


def _compact(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def _badge(verdict: str) -> str:
    cls = verdict if verdict in VERDICTS else "unknown"
    return f'<span class="badge v-{cls}">{_e(verdict)}</span>'


def _sev(severity: Any) -> str:
    cls = severity if severity in ("info", "warning", "critical") else "info"
    return f'<span class="sev-{cls}">{_e(severity)}</span>'


def _by_verdict(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{_n(counts[v])} {_e(v)}" for v in reversed(VERDICTS) if counts.get(v))


def _reasons(reasons: Iterable[Mapping[str, Any]]) -> str:
    items = []
    for r in reasons:
        cond = f"{_e(r['metric'])} {_e(r['op'] or '')} {_n(r['threshold'])}".strip()
        where = "event at step" if r["source"] == "event" else "measured at step"
        items.append(
            f"<li>{_sev(r['severity'])} rule <code>{_e(r['rule'])}</code> ({cond}): value {_n(r['value'])}, "
            f"{where} {_n(r['step'])}. <span class=muted>{_e(r['message'])}</span></li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def _img(uri: Any, alt: str, cls: str) -> str:
    """An <img> for a base64 data: URI; anything else (a URL, a malformed URI) is refused, not loaded."""
    if not isinstance(uri, str) or not _DATA_URI.fullmatch(uri):
        return f'<span class="muted">[{_e(alt)}: image not available]</span>'
    return f'<img class="{cls}" alt="{_e(alt)}" src="{uri}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: bool = False) -> str:
    """A table from already escaped cells (header cells are escaped here)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cell = '<td class="num">' if numeric else "<td>"
    body = "".join("<tr>" + "".join(f"{cell}{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
