"""The report's JSON schema check, shared by the report tests."""

from __future__ import annotations

from typing import Any

from memwatch.views.report.schema import report_schema


def schema_errors(report: Any) -> list[str]:
    """Errors of ``report`` against :func:`report_schema` (jsonschema, draft 2020-12)."""
    import jsonschema

    schema = report_schema()
    validator = jsonschema.Draft202012Validator(schema)
    validator.check_schema(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(report)]
