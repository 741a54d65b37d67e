"""Pieces shared by the report's builders: the limitations list and inline images."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

IDENTITY = "identity"
REGURGITATION = "regurgitation"

#: Limitations that most change how far the verdict can be trusted come first in the report.
LIMIT_ORDER = (
    "no-results",
    "probe-failed",
    "schedule-guessed",
    "probes-sparse",
    "final-superseded",
    "checkpoint-deleted",
    "membership-few-items",
    "condnoise-few-items",
    "config-hash-mismatch",
    "no-regurgitation",
    "face-threshold-uncalibrated",
    "embedder-weights-unverified",
    "face-weights-unverified",
    "weights-unhashed",
    "extraction-undefined",
    "training-set-unanalysed",
    "training-set-stale",
    "reference-skipped",
    "holdout-skipped",
    "no-holdout",
    "no-identity",
    "reference-root-missing",
)


@dataclass
class Limits:
    """Limitations collected while building, in the order found; one entry per code and subject."""

    items: list[dict[str, str]] = field(default_factory=list)

    def add(self, code: str, message: str) -> None:
        entry = {"code": code, "message": message}
        if entry not in self.items:
            self.items.append(entry)

    def ordered(self) -> list[dict[str, str]]:
        """Those that change what the verdict means first (:data:`LIMIT_ORDER`), then the rest as found."""
        rank = {code: i for i, code in enumerate(LIMIT_ORDER)}
        return sorted(self.items, key=lambda x: rank.get(x["code"], len(rank)))


def png_uri(img: Any) -> str:
    """A Pillow image as a PNG ``data:`` URI."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # Pillow writes no time stamp: same pixels, same bytes
    return data_uri(buf.getvalue(), "image/png")


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
