"""What makes two probing jobs the same training run: its output folder and its data, nothing else.

A scheduled ``memwatch probe`` must keep adding to one audit history however memwatch is upgraded and
however its settings change: a new built-in probe, a new rule, another threshold. So a run is identified
by the training folder's name and the content of its data (the reference and holdout manifests' sha256),
not by any setting. Results are keyed by each probe's own settings (see
:meth:`memwatch.core.probe.Probe.result_key`), so a changed setting re-probes that probe alone, and rules
are evaluated over the stored results.

Example:
    >>> ident = RunIdentity("ddpm", "ab" * 32, None)
    >>> ident.default_name == "ddpm@" + ident.hash[:12]
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memwatch.hashing import run_identity_hash

if TYPE_CHECKING:
    from memwatch.data.refset import ReferenceSet


@dataclass(frozen=True)
class RunIdentity:
    """One training run.

    Attributes:
        folder: the name of the training output folder (not its path: a run folder may move).
        reference: sha256 of the reference set's manifest (ids, file contents, captions).
        holdout: sha256 of the holdout set's manifest, or None.
    """

    folder: str
    reference: str
    holdout: str | None = None

    @property
    def hash(self) -> str:
        """The identity as a short hash (stored with the run)."""
        return run_identity_hash(self.folder, self.reference, self.holdout)

    @property
    def default_name(self) -> str:
        """The run's name when the config gives none: ``<folder>@<identity>``."""
        return f"{self.folder}@{self.hash[:12]}"

    @classmethod
    def of(cls, run_dir: str | Path, refs: ReferenceSet, holdout: ReferenceSet | None) -> RunIdentity:
        """The identity of the run in ``run_dir`` trained on ``refs`` (and measured against ``holdout``)."""
        return cls(Path(run_dir).resolve().name, refs.manifest_sha256, holdout.manifest_sha256 if holdout else None)
