"""The report's training-set section: what ``memwatch data`` found in the run's reference set.

The monitor and ``memwatch probe`` analyse the training set once per run (``analyse_data``) and keep it
in the store; this section shows it (duplicate groups first, then isolated images) and says when it is
missing, failed, or describes other data than the run's reference set now.

Example:
    >>> limits = Limits()
    >>> section = training_set_section(None, {"manifest_sha256": "ab"}, limits)
    >>> section["status"], limits.items[0]["code"]
    ('not-analysed', 'training-set-unanalysed')
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memwatch.views.report.common import Limits

#: duplicate groups and isolated images listed in the report (all of them are in the store)
GROUPS_SHOWN = 50
ISOLATED_SHOWN = 20


def training_set_section(
    stored: Mapping[str, Any] | None, reference: Mapping[str, Any] | None, limits: Limits
) -> dict[str, Any]:
    """The report's ``training_set`` object from the store's row (:meth:`Store.training_set`).

    Args:
        stored: the stored analysis row, or None.
        reference: the run's reference-set summary (its ``manifest_sha256`` is compared).
        limits: where a missing, failed or stale analysis is said.
    """
    analysis = (stored or {}).get("analysis") or {}
    manifest = (stored or {}).get("manifest_sha256")
    status = "analysed" if analysis else ("failed" if stored and stored.get("error") else "not-analysed")
    groups = analysis.get("duplicate_groups", [])
    isolated = analysis.get("isolated", [])
    same = manifest is not None and manifest == (reference or {}).get("manifest_sha256")
    if status == "not-analysed":
        limits.add(
            "training-set-unanalysed",
            "the training set was not analysed for duplicates (analyse_data off, or a run recorded before it "
            "existed): run memwatch data on it; duplicated images are memorized first",
        )
    elif status == "failed":
        limits.add("training-set-unanalysed", f"the training-set analysis failed: {stored['error']}")  # type: ignore[index]
    elif not same:
        limits.add(
            "training-set-stale",
            "the training-set analysis describes another version of the reference set (its manifest hash differs)",
        )
    return {
        "status": status,
        "error": (stored or {}).get("error"),
        "manifest_sha256": manifest,
        "matches_reference": same,
        "n": analysis.get("n"),
        "distinct": analysis.get("distinct"),
        "exact_duplicate_images": analysis.get("exact_duplicate_images"),
        "near_duplicate_groups": analysis.get("near_duplicate_groups"),
        "near_threshold": analysis.get("near_threshold"),
        "near_threshold_source": analysis.get("near_threshold_source"),
        "isolation_rule": analysis.get("isolation_rule"),
        "duplicate_groups": [
            {"kind": g["kind"], "ids": list(g["ids"]), "min_similarity": g.get("min_similarity")}
            for g in groups[:GROUPS_SHOWN]
        ],
        "duplicate_groups_total": len(groups),
        "isolated": list(isolated[:ISOLATED_SHOWN]),
        "isolated_total": len(isolated),
    }
