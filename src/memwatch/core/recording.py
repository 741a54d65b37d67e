"""Recording one probed snapshot: its results, failures and the events they raised, in ONE store transaction.

:class:`Recorder` is the only part of a probing session that writes the store (main process): a
snapshot, every probe result and failure at it, the events its metrics raised, and the reference-set
summaries when images were found unreadable while probing, are stored together or not at all. It also
writes each sample probe's evidence grid (a PNG named by run, step and weights) before the transaction,
so the stored result names the file. Nothing here raises into training: a failure is logged and the
warnings still reach the user.

Example:
    >>> recorder = Recorder(store, run_id, Path("out"), refs, evidence_top=8)  # doctest: +SKIP
    >>> recorder.write(snapshot, outcomes, failures, events, key=session.probe_hash)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memwatch.core.evidence import save_evidence_grid
from memwatch.errors import failure_reason
from memwatch.signals.rules import Event

if TYPE_CHECKING:
    from memwatch.core.probe import Probe, ProbeResult
    from memwatch.data.refset import ReferenceSet
    from memwatch.sampling.plan import Samples
    from memwatch.store import Store

log = logging.getLogger("memwatch")


@dataclass
class Outcome:
    """What one probe returned at one step: its results (its own first, then companions) and when it started."""

    probe: Probe
    results: list[ProbeResult]
    started: float


class Recorder:
    """Writes a run's probed snapshots to its store.

    Args:
        store: the open store.
        run_id: the run.
        output_dir: where evidence grids go (``evidence/run<id>/...``).
        refs: the training set (evidence grids show its images).
        holdout: the holdout set, or None.
        evidence_top: sample/training pairs per grid.
    """

    def __init__(
        self,
        store: Store,
        run_id: int,
        output_dir: Path,
        refs: ReferenceSet,
        holdout: ReferenceSet | None = None,
        *,
        evidence_top: int = 8,
    ):
        self.store = store
        self.run_id = run_id
        self.output_dir = output_dir
        self.refs = refs
        self.holdout = holdout
        self.evidence_top = evidence_top
        self._skipped = self._skipped_now()

    def _skipped_now(self) -> tuple[int, int]:
        return len(self.refs.skipped), len(self.holdout.skipped) if self.holdout else 0

    def evidence_grid(self, probe: Probe, result: ProbeResult, samples: Samples, snapshot: Mapping[str, Any]) -> None:
        """The sample/training pairs of a sample probe as one PNG, named by run, step and weights; its path is added
        to ``result.evidence`` (a grid that cannot be written is logged: the result still counts)."""
        sha = (snapshot["weights_sha256"] or "unhashed")[:12]
        name = f"run{self.run_id:03d}/step{snapshot['step']:08d}-{sha}-{probe.name}.png"
        try:
            grid = save_evidence_grid(
                self.output_dir / "evidence" / name,
                samples.images,
                probe.evidence_pairs(result),
                {it.id: it for it in self.refs.items},
                top=self.evidence_top,
            )
        except Exception as e:  # a training image gone since listing, a full disk: the result still counts
            log.warning("memwatch: evidence grid %s not written: %s", name, failure_reason(e))
            return
        if grid is not None:
            result.evidence.append(str(grid.relative_to(self.output_dir)))

    def write(
        self,
        snapshot: Mapping[str, Any],
        outcomes: Sequence[Outcome],
        failures: Mapping[str, str],
        events: Sequence[Event],
        *,
        key: Callable[[Probe], str],
        key_of: Mapping[str, str],
    ) -> str | None:
        """Store the snapshot, its results and failures and the events, in one transaction.

        Args:
            snapshot: :meth:`Store.add_snapshot` keywords (``step``, ``kind``, ``path``, ``weights_sha256``...).
            outcomes: the probes' results.
            failures: probe name -> why it could not run.
            events: the events the results raised.
            key: a probe's result key (:meth:`memwatch.core.config.MonitorConfig.probe_hash`).
            key_of: probe name -> result key, for the failures.

        Returns:
            None when it was stored; else why not (logged; nothing of it is in the store).
        """
        host = socket.gethostname()
        try:
            with self.store.batch():
                skipped = self._skipped_now()
                if skipped != self._skipped:  # images found unreadable while probing: counted and named
                    holdout = self.holdout.summary() if self.holdout else None
                    self.store.update_run_sets(self.run_id, self.refs.summary(), holdout)
                    self._skipped = skipped
                snap = self.store.add_snapshot(self.run_id, **snapshot)
                for name, reason in failures.items():
                    self.store.record_failure(snap, name, config_hash=key_of[name], error=reason)
                for outcome in outcomes:
                    for result in outcome.results:
                        self.store.write_result(
                            snap, result, config_hash=key(outcome.probe), started_at=outcome.started, host=host
                        )
                for event in events:
                    self.store.add_event(self.run_id, {**event.to_dict(), "snapshot_id": snap})
            return None
        except Exception as e:
            # The training goes on; the warnings still reach the log and the outputs.
            reason = failure_reason(e)
            log.error("memwatch: step %d could not be recorded: %s", snapshot["step"], reason)
            return reason

    def write_failures(self, step: int, failures: Mapping[str, tuple[str, str]]) -> None:
        """A live snapshot at ``step`` on which probes could not run: probe name -> (result key, reason)."""
        try:
            with self.store.batch():
                snap = self.store.add_snapshot(self.run_id, step, kind="live")
                for name, (key, reason) in failures.items():
                    self.store.record_failure(snap, name, config_hash=key, error=reason)
        except Exception as e:  # e.g. a step the store cannot hold: said, never raised into training
            log.warning("memwatch: could not record the failure either: %s", failure_reason(e))

    def add_lost_event(self, snapshot_id: int, event: Event) -> bool:
        """Store an event the replay raised that the store lacks; True if it was new."""
        return self.store.add_event(self.run_id, {**event.to_dict(), "snapshot_id": snapshot_id}) is not None
