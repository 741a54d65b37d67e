"""What an audit report covers: its fields against the documents a provenance team answers to, and what it does
not establish. The report carries this (``coverage``) and shows it as a section; ``docs/audit.md`` explains it.

The mapping is deliberately narrow: each row names a document's item and the report fields that give evidence
for it, never more than the fields hold. Documents: the EU AI Act (Regulation (EU) 2024/1689) Art. 53(1) and
Annex XI technical documentation of general-purpose AI models; NIST AI 600-1 (Generative AI Profile of the AI
RMF, July 2024) with the AI RMF 1.0 subcategories it maps to; C2PA 2.x's training-and-data-mining assertion.

Example:
    >>> any(c["document"].startswith("EU AI Act") for c in coverage()["items"])
    True
"""

from __future__ import annotations

from typing import Any

_ITEMS = (
    {
        "document": "EU AI Act, Annex XI, Section 1, 2(c)",
        "item": "information on the data used for training: number of data points, curation (e.g. cleaning, filtering)",
        "answer": "the training set audited: its size, manifest sha256, files that could not be read, exact and near "
        "duplicates and isolated images (duplication drives memorization)",
        "fields": ["provenance.reference", "training_set", "limitations"],
    },
    {
        "document": "EU AI Act, Annex XI, Section 2, 1",
        "item": "evaluation strategies and results: evaluation criteria, metrics, methodology for identifying "
        "limitations (models with systemic risk)",
        "answer": "the probes run, each metric with its threshold and the threshold's published source, verdicts per "
        "checkpoint, curves over training, and the limitations found",
        "fields": ["verdict", "curves", "provenance.thresholds", "provenance.config", "limitations"],
    },
    {
        "document": "EU AI Act, Art. 53(1)(c)",
        "item": "a policy to comply with Union copyright law",
        "answer": "evidence for that policy, not the policy: which training images generated samples reproduce, "
        "since which step, and the last checkpoint before it (keep advice)",
        "fields": ["evidence.training_images", "evidence.first_seen", "verdict.overall.last_clean_checkpoint"],
    },
    {
        "document": "NIST AI 600-1, risk 2.4 Data Privacy; AI RMF MEASURE 2.10",
        "item": "privacy risk examined and documented: leakage of training data, membership inference",
        "answer": "regurgitation of training images, membership inference AUC on held-out images, and (faces) "
        "training identities reproduced or blended",
        "fields": ["curves.metrics", "evidence.samples", "evidence.identities", "events"],
    },
    {
        "document": "NIST AI 600-1, risk 2.10 Intellectual Property; AI RMF GOVERN 1.1",
        "item": "legal requirements understood and documented; replication of training content in outputs",
        "answer": "which training works are reproduced, how closely (d1/d2, similarity), with crops of both",
        "fields": ["evidence.training_images", "evidence.samples", "evidence.at_risk_images"],
    },
    {
        "document": "NIST AI RMF MEASURE 3.1",
        "item": "emergent risks identified and tracked over time",
        "answer": "the probes ran during training: curves, onset forecasts and events with the step they came at",
        "fields": ["curves.forecasts", "events", "provenance.probe_runs"],
    },
    {
        "document": "C2PA 2.x, c2pa.training-mining assertion",
        "item": "whether a work's owner allows generative AI training on it",
        "answer": "memwatch does not read C2PA manifests; the reference manifest and image ids let a team check the "
        "training images' assertions separately, and the report names the images the model reproduces",
        "fields": ["provenance.reference.manifest_sha256", "evidence.training_images"],
    },
    {
        "document": "in-toto attestation (memwatch report --sign)",
        "item": "this evaluation ran, on these weights and data, with this result",
        "answer": "a signed statement whose subjects are the audited weights, the data manifests and the report "
        "files, with the chain head of the store it was built from",
        "fields": ["record", "provenance.weights"],
    },
)

_NOT_ESTABLISHED = (
    "that the model never reproduces training data: probes draw a finite number of samples from fixed seeds and "
    "prompts; a copy they did not sample is not seen",
    "anything about data outside the reference set given to memwatch: a copy of an image that is not in it is not "
    "recognised as a copy",
    "legal conclusions: whether a reproduction infringes copyright or a blend of faces harms a person is for people "
    "to judge; the report gives the measurements and their thresholds' sources",
    "that the submitter ran memwatch as configured on the whole training: the record shows what was written and that "
    "it is unchanged since, not what was left out; a signature shows who signed, not that they are trustworthy",
    "that the weights audited are the weights released: compare the released files' sha256 with the audited ones",
)


def coverage() -> dict[str, Any]:
    """The ``coverage`` section of a report: ``items`` (document, item, answer, fields) and ``does_not_establish``."""
    return {"items": [dict(i) for i in _ITEMS], "does_not_establish": list(_NOT_ESTABLISHED)}
