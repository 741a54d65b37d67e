"""Audit reports: one self-contained HTML file (and the same content as JSON, optionally a PDF) that
answers, from the store alone, whether a model reproduced training images or identities, since when,
how sure that is, and exactly what was audited.

Example:
    >>> written = write_report("out/", "out/report.html", json_out="out/report.json")  # doctest: +SKIP
    >>> sorted(written.paths)  # doctest: +SKIP
    ['html', 'json']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memwatch.output import write_output
from memwatch.views.report.build import build_report, report_json
from memwatch.views.report.html import render_html
from memwatch.views.report.pdf import write_pdf
from memwatch.views.report.schema import report_schema

REPORT_NAME = "report.html"

__all__ = ["WrittenReport", "build_report", "render_html", "report_json", "report_schema", "write_pdf", "write_report"]


@dataclass
class WrittenReport:
    """A report as written: its content and the files (``{"html": path, "json": path, "pdf": path}``)."""

    report: dict[str, Any]
    paths: dict[str, Path]


def write_report(
    run_dir: str | Path,
    html_out: str | Path | None = None,
    json_out: str | Path | None = None,
    pdf_out: str | Path | None = None,
    redact: bool = False,
    run: str | None = None,
    absolute_paths: bool = False,
) -> WrittenReport:
    """Build one run's report and write it as HTML, and optionally JSON and PDF.

    Args:
        run_dir: the training output dir (with ``memwatch/``), the memwatch folder, or the store file.
        html_out: the HTML file; default ``report.html`` beside the store.
        json_out: also write the report content as JSON here.
        pdf_out: also print the HTML page to this PDF (needs headless Chromium).
        redact: leave out all training and generated pixels (see :func:`build_report`).
        run: run name in the store; default the most recent.
        absolute_paths: keep the paths the store recorded (default: relative to the run folder).

    Returns:
        The report's content and the files written.

    Raises:
        MemwatchError: no store or run, an output that cannot be written, or a failed PDF print.

    Example:
        >>> write_report("out/", "report.html", redact=True).paths  # doctest: +SKIP
        {'html': PosixPath('report.html')}
    """
    from memwatch.store.history import find_store

    report = build_report(run_dir, run=run, redact=redact, absolute_paths=absolute_paths)
    html_path = Path(html_out) if html_out is not None else find_store(run_dir).parent / REPORT_NAME
    paths = {"html": write_output(html_path, render_html(report), "-o")}
    if json_out is not None:
        paths["json"] = write_output(Path(json_out), report_json(report), "--json")
    if pdf_out is not None:
        paths["pdf"] = write_pdf(html_path, pdf_out)
    return WrittenReport(report, paths)
