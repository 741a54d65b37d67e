"""Render a report dict (from :func:`memwatch.views.report.build.build_report`) as one self-contained HTML page.

The page is the Jinja2 template ``templates/report.html.j2`` with autoescaping on: every string that
comes from the run (file names, ids, prompts, identities, config values, messages) is escaped unless
the template itself builds the markup. Self-contained: no script, no external font, style sheet or
image; every image is a ``data:`` URI, accepted only as base64 ``data:image/png|jpeg``, so the file
reads the same offline, in an e-mail attachment or printed; a Content-Security-Policy meta tag
forbids scripts and any fetch as a second line of defence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from memwatch.views.report.build import FORMAT, VERDICTS

#: Defence in depth: nothing but inline style and data: images may load, no script may run.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_DATA_URI = re.compile(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/]*={0,2}")
VERDICT_TEXT = {
    "memorizing": "MEMORIZING: reproduces training data",
    "warning": "WARNING: early signs of memorization",
    "at-risk": "AT RISK: copying is forecast soon; nothing copied yet",
    "clean": "CLEAN: no memorization detected by the probes that ran",
    "unaudited": "UNAUDITED: no probe result",
}
TOC = (
    ("verdict", "Verdict per checkpoint"),
    ("curves", "Memorization curves and events"),
    ("signals", "All signals"),
    ("evidence", "Evidence"),
    ("provenance", "Provenance"),
    ("limitations", "Limitations"),
)
_TEMPLATES = Path(__file__).parent / "templates"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML document (a string; write it as UTF-8).

    Args:
        report: the dict from :func:`memwatch.views.report.build.build_report` (or its JSON read back).

    Returns:
        The page. The same report gives the same text.

    Example:
        >>> page = render_html(build_report("out/"))  # doctest: +SKIP
        >>> Path("report.html").write_text(page, encoding="utf-8")  # doctest: +SKIP
    """
    evidence = report["evidence"]
    training = {t["id"]: t for t in evidence["training_images"]}
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            report=report,
            css=(_TEMPLATES / "report.css").read_text(encoding="utf-8"),
            csp=CSP,
            format=FORMAT,
            verdicts=VERDICTS,
            verdict_text=VERDICT_TEXT,
            toc=TOC,
            training=training,
            cards=_cards(evidence, training),
            signals=_signals(report["curves"]["metrics"]),
        )
    )


def _cards(evidence: Mapping[str, Any], training: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One card per training image a flagged sample lies nearest to: first-seen order, then the rest by id."""
    by_training: dict[str, list[Mapping[str, Any]]] = {}
    for s in evidence["samples"]:
        by_training.setdefault(str(s["nn1"]), []).append(s)
    first = {f["training_id"]: f for f in evidence["first_seen"]}
    order = [f["training_id"] for f in evidence["first_seen"]] + sorted(set(by_training) - set(first))
    return [
        {"id": t, "image": training.get(t), "first": first.get(t), "samples": by_training.get(t, [])} for t in order
    ]


def _signals(metrics: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """One table per probe: steps down, that probe's metrics across ('' where a metric has no value there)."""
    by_probe: dict[str, list[str]] = {}
    for name in metrics:
        by_probe.setdefault(name.split("/", 1)[0], []).append(name)
    out = []
    for probe, names in by_probe.items():
        steps = sorted({p["step"] for n in names for p in metrics[n]})
        value = {(n, p["step"]): p["value"] for n in names for p in metrics[n]}
        rows = [(s, [value.get((n, s), "") for n in names]) for s in steps]
        out.append((probe, {"names": [n.split("/", 1)[1] for n in names], "rows": rows}))
    return out


@cache
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters.update(n=_n, t=_t, short=_short, compact=_compact, pretty=_pretty, flags=_flags)
    env.tests["data_image"] = lambda uri: isinstance(uri, str) and _DATA_URI.fullmatch(uri) is not None
    return env


def _t(value: Any) -> str:
    """Text of a value from data; None shows as an em dash (escaped by the template)."""
    return "—" if value is None else str(value)


def _n(value: Any) -> str:
    """A number for a table cell: ints as they are, floats to 4 significant digits, None as n/a.

    Example:
        >>> _n(None), _n(3), _n(0.123456), _n(True)
        ('n/a', '3', '0.1235', 'yes')
    """
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _short(sha: str | None) -> str:
    return "not recorded" if not sha else f"{sha[:16]}…"


def _compact(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


def _pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)


def _flags(sample: Mapping[str, Any]) -> str:
    return ", ".join(f for f in ("memorized", "copied", "extracted") if sample[f])
