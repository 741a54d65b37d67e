"""``memwatch report RUN_DIR``: a self-contained audit report (HTML, JSON, PDF) from a run's store."""

from __future__ import annotations

import argparse
import json

from memwatch.errors import MemwatchError

NAME = "report"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        NAME,
        help="write a self-contained audit report (HTML, JSON, PDF) from a run's store",
        description="Audit report for provenance and trust-and-safety review: verdicts per checkpoint, curves, "
        "evidence, provenance (hashes, config, versions) and limitations, rebuilt from the store alone. "
        "The HTML makes no external requests.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", nargs="?", help="training output dir (with memwatch/) or the memwatch folder"
    )
    p.add_argument("-o", "--output", default=None, help="HTML file (default: report.html beside the store)")
    p.add_argument("--json", default=None, help="also write the report as JSON (see --schema)")
    p.add_argument("--pdf", default=None, help="also print the report to PDF through headless Chromium")
    p.add_argument("--redact", action="store_true", help="no training or generated pixels: evidence as ids and scores")
    p.add_argument("--run", default=None, help="run name in the store (default: the most recent)")
    p.add_argument(
        "--sign", metavar="KEY", default=None,
        help="also write a signed in-toto attestation beside the HTML (<name>.intoto.jsonl: the audited weights, data "
        "manifests and report files, with the verdicts and the store's chain head), signed with this Ed25519 key "
        "(memwatch keygen; a passphrase comes from MEMWATCH_KEY_PASSPHRASE)",
    )  # fmt: skip
    p.add_argument(
        "--absolute-paths",
        action="store_true",
        help="keep paths as recorded (default: relative to the run folder; other absolute paths cut)",
    )
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of --json output and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from memwatch.attest.statement import sign_report
    from memwatch.views.report import report_schema, write_report

    if args.schema:
        print(json.dumps(report_schema(), indent=2, sort_keys=True))
        return 0
    if args.run_dir is None:
        raise MemwatchError("memwatch report needs RUN_DIR (or --schema)")
    options = {"html_out": args.output, "json_out": args.json, "pdf_out": args.pdf, "redact": args.redact,
               "run": args.run, "absolute_paths": args.absolute_paths}  # fmt: skip
    if args.sign:
        paths = sign_report(args.run_dir, args.sign, **options)
    else:
        paths = write_report(args.run_dir, **options).paths
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0
