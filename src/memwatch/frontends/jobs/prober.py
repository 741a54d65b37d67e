"""Probing the snapshots of a training output folder: ``memwatch probe``, and the core of ``memwatch watch``.

Both look at a training output folder (RUN_DIR) as the diffusers example scripts write it: one
``checkpoint-<step>/`` folder per save (rotated away by ``--checkpoints_total_limit``) and the model
saved in RUN_DIR itself (the *final* model). Both write only to ``RUN_DIR/memwatch/``: nothing whose
name starts with ``checkpoint`` (the scripts parse every such name as ``checkpoint-<int>``), and
never into data folders.

* A **snapshot is its weights**: each folder's weights files are hashed (without loading; unchanged
  files are not re-read, their hash is cached by size, modification time and inode), and weights
  measured before are only recorded as seen again. The final model equal to the last checkpoint is
  one measurement; a final model rewritten with other weights is a new snapshot, audited again.
* A **run is its folder and config**: without ``run_name``, repeated jobs with the same config
  resume the same run (``<folder>@<config hash>``), and probe only what is new.
* ``probe`` probes every snapshot that has no result for this config yet, oldest step first. Each
  step is one transaction, so a killed job loses nothing and the next run finishes what is missing;
  a second job on the same RUN_DIR finds the lock held, probes nothing, and still reports (and gates
  ``--fail-on`` on) what the store holds.
* ``watch`` probes each checkpoint once it is complete and quiet, tolerates rotation, and probes the
  final model when training has ended (see :func:`watch_run_dir`), then stops.
* **EMA runs**: a run whose checkpoints hold ``unet_ema/`` saves its EMA weights as the final model;
  it is recorded as EMA weights, so curves keep the raw and EMA series apart.
* **The noise schedule comes from the run** (:func:`memwatch.snapshots.load_snapshot`); a guessed one
  is recorded as such and shown in the report.
* A folder deleted by rotation before or while it is probed is skipped and counted, never failed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwatch.core.config import MonitorConfig
from memwatch.core.run_identity import RunIdentity
from memwatch.core.session import ProbeSession, as_refset
from memwatch.core.workers import Workers
from memwatch.data.file_hashes import FileHashCache
from memwatch.data.refset import ReferenceSet
from memwatch.errors import MemwatchError, failure_reason
from memwatch.frontends.jobs.discovery import SnapshotRef, discover_snapshots, uses_ema
from memwatch.signals.rules import severity_at_least
from memwatch.snapshots import denoiser_class, load_snapshot, snapshot_sha256
from memwatch.store import OUTPUT_SUBDIR, STORE_NAME, Store
from memwatch.store.history import load_history

log = logging.getLogger("memwatch")

LOCK_NAME = "probe.lock"


@dataclass
class RunReport:
    """What one probe/watch job did on one RUN_DIR (JSON-ready via :meth:`to_dict`).

    ``probed``: steps of snapshots measured now; ``already_done``: snapshots whose weights were
    measured before (seen again); ``failed``: snapshots on which no probe could run, with the reason;
    ``rotated``: folders deleted (checkpoint rotation) before they could be probed; ``skipped``:
    folders that are not usable snapshots, with the reason.
    """

    run_dir: str
    store: str
    run: str = ""
    probed: list[int] = field(default_factory=list)
    already_done: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    new_events: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_clean_step: int | None = None
    onset_step: int | None = None
    locked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def run_lock(folder: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder/probe.lock``; yields False when another job holds it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError as e:
        raise MemwatchError(
            f"cannot create the lock file {folder / LOCK_NAME} ({e.strerror}): RUN_DIR/{OUTPUT_SUBDIR} must be "
            "writable for probe and watch"
        ) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class CheckpointProber:
    """Probe snapshots of one RUN_DIR into ``RUN_DIR/memwatch/``, skipping weights already measured.

    Args:
        run_dir: the training output folder.
        config: the validated config (``reference`` must be set).
        on_event: called with each new event.
        workers: the processes sharing the probes (``accelerate launch``); the main process alone reads
            and writes the store and decides, every process loads each snapshot and computes its share.
    """

    def __init__(
        self,
        run_dir: str | Path,
        config: MonitorConfig,
        *,
        on_event: Callable | None = None,
        workers: Workers | None = None,
    ):
        self.workers = workers or Workers()
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise MemwatchError(f"RUN_DIR {self.run_dir} is not a folder: pass a training output folder")
        if not config.reference:
            raise MemwatchError(
                f"{config.source}: setting 'reference' is required: the training images to compare with"
            )
        self.config = config
        self.out = self.run_dir / OUTPUT_SUBDIR
        self.on_event = on_event
        self.session: ProbeSession | None = None
        self.refs: ReferenceSet | None = None
        self.holdout: ReferenceSet | None = None
        self.identity: RunIdentity | None = None
        #: checkpoint weights files are hashed once while unchanged (the cache every reader of files shares)
        self.file_hashes = FileHashCache(config.cache_dir)
        self.run_name = config.run_name or ""
        self.report = RunReport(run_dir=str(self.run_dir), store=str(self.out / STORE_NAME), run=self.run_name)

    def load_data(self) -> RunIdentity:
        """Load the reference (and holdout) set; the run is its folder and this data (:class:`RunIdentity`)."""
        if self.identity is None:
            cols = self.config.columns
            self.refs = as_refset(self.config.reference, "reference set", cols)
            self.holdout = as_refset(self.config.holdout, "holdout set", cols) if self.config.holdout else None
            self.identity = RunIdentity.of(self.run_dir, self.refs, self.holdout)
        return self.identity

    def open(self) -> None:
        """Load the data, open the store and resume this training run (the same folder and data, whatever the
        config or memwatch version), replaying its history into the rules."""
        identity = self.load_data()
        assert self.refs is not None
        self.session = ProbeSession(
            self.config, self.refs, self.holdout, self.out, on_event=self._event, run_name=self.config.run_name,
            identity=identity, workers=self.workers,
        )  # fmt: skip
        self.run_name = self.report.run = self.session.run_name

    def _event(self, event: Any) -> None:
        self.report.new_events.append(event.to_dict())
        if self.on_event is not None:
            self.on_event(event)

    def weights_of(self, ref: SnapshotRef) -> str:
        """``"ema"`` or ``"raw"``: what the snapshot's weights are (the final model of an EMA run is EMA)."""
        if self.config.weights == "ema" or (ref.kind == "final" and uses_ema(self.run_dir)):
            return "ema"
        return "raw"

    def weights_sha256(self, ref: SnapshotRef) -> str:
        """The sha256 that identifies the snapshot's weights, reading only files that changed since last hashed.

        Raises:
            MemwatchError: the weights are missing or incomplete.
            FileNotFoundError: a file vanished (rotation).
        """
        # The weights a checkpoint folder is probed with: unet_ema/ when the config asks for EMA.
        which = self.config.weights if ref.kind == "checkpoint" else "raw"
        return snapshot_sha256(
            ref.path, weights=which, base_model=self.config.base_model, file_sha256=self.file_hashes.sha256
        )

    def probe(self, ref: SnapshotRef) -> str:
        """Probe one snapshot if its weights are new (or miss a probe).

        Returns:
            ``"probed"``, ``"already"`` (these weights were measured before: recorded as seen again),
            ``"failed"`` (recorded with the reason), or ``"rotated"`` (the folder was deleted meanwhile).
        """
        s = self.session
        assert s is not None
        text_to_image = denoiser_class(ref.path, self.config.weights) in (None, "UNet2DConditionModel")
        applicable = s.applicable(text_to_image=text_to_image)
        weights = self.weights_of(ref)
        # The main process reads the store and decides; every process follows (one collective call).
        decision = self._decide(ref, applicable) if self.workers.is_main else None
        action, sha = self.workers.broadcast(decision)
        if action != "load":
            return action
        try:
            which = self.config.weights if ref.kind == "checkpoint" else "raw"
            snap = load_snapshot(
                ref.path,
                weights=which,
                base_model=self.config.base_model,
                scheduler=self.config.scheduler,
                run_dir=self.run_dir,
            )
            if snap.parts.text_to_image and snap.parts.text_encoder is None:
                raise MemwatchError(
                    f"{ref.path}: text-to-image UNet without tokenizer/text encoder/VAE: set 'base_model' to the "
                    "local pipeline folder the run started from (--pretrained_model_name_or_path)"
                )
            error = None
        except (MemwatchError, OSError) as e:
            error = e
        # every process learns whether all loaded it, so none is left waiting inside the probes
        reasons = self.workers.gather([None if error is None else failure_reason(error)])
        failed_to_load = next((r for r in reasons if r is not None), None)
        if failed_to_load is not None:
            if self.workers.is_main:
                return self._failed(ref, applicable, failed_to_load, error)
            return "failed"
        for note in snap.notes:
            log.info("%s: %s", ref.path, note)
        failures_before = len(s.failures)
        s.probe(  # the snapshot carries UNet, scheduler and (text-to-image) its text components
            ref.step,
            snap,
            probes=[p.name for p in applicable],
            kind=ref.kind,
            path=str(ref.path),
            weights_sha256=sha,
            weights=weights,
            info=snap.info(),
        )
        failed = s.failures[failures_before:]
        ran = {p.name for p in applicable if not (p.text_to_image_only and not snap.parts.text_to_image)}
        if ran and {f["probe"] for f in failed} >= ran:
            self.report.failed.append({"step": ref.step, "path": str(ref.path), "error": failed[0]["error"]})
            return "failed"
        self.report.probed.append(ref.step)
        return "probed"

    def _decide(self, ref: SnapshotRef, applicable: list) -> tuple[str, str | None]:
        """Main process: ``("load", sha)`` when these weights need probing, else what was recorded instead
        (``"already"``, ``"failed"``, ``"rotated"``)."""
        s = self.session
        assert s is not None and s.store is not None
        try:
            sha = self.weights_sha256(ref)
        except (MemwatchError, OSError) as e:
            return self._failed(ref, applicable, failure_reason(e), e), None
        existing = s.store.find_snapshot(s.run_id, sha)
        if existing is not None and all(s.measured(existing, p) for p in applicable):
            s.store.add_snapshot(s.run_id, ref.step, kind=ref.kind, path=str(ref.path), weights_sha256=sha)
            self.report.already_done += 1
            return "already", sha
        return "load", sha

    def _failed(self, ref: SnapshotRef, applicable: list, reason: str, error: BaseException | None) -> str:
        """Main process: record a snapshot that could not be hashed or loaded (or was deleted meanwhile)."""
        s = self.session
        assert s is not None and s.store is not None
        if not ref.path.exists():
            return self._rotated(ref, error or FileNotFoundError(reason))
        snap_id = s.store.add_snapshot(s.run_id, ref.step, kind=ref.kind, path=str(ref.path))
        for p in applicable:
            s.store.record_failure(snap_id, p.name, config_hash=s.probe_hash(p), error=reason)
        self.report.failed.append({"step": ref.step, "path": str(ref.path), "error": reason})
        log.warning("%s: recorded as failed: %s", ref.path, reason)
        return "failed"

    def _rotated(self, ref: SnapshotRef, e: BaseException) -> str:
        log.info("%s was deleted (checkpoint rotation) before it could be probed (%s)", ref.path, e)
        self.report.rotated.append(str(ref.path))
        return "rotated"

    def close(self) -> RunReport:
        s = self.session
        if s is not None:
            self.report.events = [e.to_dict() for e in s.events]
            self.report.last_clean_step = s.last_clean_step
            self.report.onset_step = s.onset_step
            s.last_step = max(self.report.probed, default=None)
            s.close()
        return self.report


def probe_run_dir(
    run_dir: str | Path, config: MonitorConfig, *, wait: bool = False, workers: Workers | None = None
) -> RunReport:
    """Probe every snapshot of RUN_DIR that has no result for this config yet, oldest first.

    Args:
        run_dir: training output folder.
        config: validated config.
        wait: if another job holds RUN_DIR's lock, wait for it (default: do nothing and report).
        workers: the processes of an ``accelerate launch`` sharing the probes (default: this one alone).

    Returns:
        The :class:`RunReport`. When another job held the lock, ``locked`` is True, nothing was
        probed, and ``events`` are those the store already holds (so ``--fail-on`` still gates on them).

    Example:
        >>> report = probe_run_dir("runs/ddpm", load_config("memwatch.yaml"))  # doctest: +SKIP
        >>> report.probed  # doctest: +SKIP
        [500, 1000]
    """
    workers = workers or Workers()
    prober = CheckpointProber(run_dir, config, workers=workers)
    lock = run_lock(prober.out, wait=wait) if workers.is_main else contextlib.nullcontext(True)
    with lock as got:
        if not workers.broadcast(got):
            prober.report.locked = True
            identity = prober.load_data() if workers.is_main else None
            prober.report.events = stored_events(prober.out / STORE_NAME, prober.run_name or None, identity)
            if workers.is_main:
                log.warning("%s: another memwatch job holds %s; nothing probed", run_dir, prober.out / LOCK_NAME)
            return prober.report
        prober.open()
        skipped: list[tuple[str, str]] = []
        try:
            from tqdm.auto import tqdm

            # the main process lists the snapshots; every process probes the same ones in the same order
            snapshots = workers.broadcast(list(discover_snapshots(run_dir, skipped)) if workers.is_main else None)
            # a bar on a terminal only (disable=None): logs and captured output stay clean
            bar = None if workers.is_main else True
            for ref in tqdm(snapshots, desc="memwatch probe", unit="snapshot", disable=bar, leave=False):
                prober.probe(ref)
        finally:
            prober.report.skipped = [{"path": p, "reason": r} for p, r in skipped]
            report = prober.close()
    return report


def stored_events(store_path: Path, run_name: str | None, identity: RunIdentity | None = None) -> list[dict[str, Any]]:
    """The events a run's store holds, the run named ``run_name`` or else the one with this identity (read-only;
    none if there is no store, no such run yet, or a store that only a writing job can upgrade)."""
    if not store_path.is_file():
        return []
    try:
        with Store(store_path, readonly=True) as store:
            name = run_name or (store.run_with_identity(identity.hash) if identity else None)
            if name is None or store.run_id(name) is None:
                return []
            return load_history(store, name).events
    except MemwatchError as e:  # e.g. an older store the job holding the lock is upgrading now
        log.warning("%s: events not read (%s)", store_path, e)
        return []


def fails(report: RunReport, fail_on: str | None) -> bool:
    """Whether the run holds an event at or above ``fail_on`` (the state of the run, not just this job's)."""
    return fail_on is not None and any(severity_at_least(e["severity"], fail_on) for e in report.events)
