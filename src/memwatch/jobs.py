"""Checkpoint-folder front-ends: ``memwatch probe`` (scheduled) and ``memwatch watch`` (beside training).

Both look at a training output folder (RUN_DIR) as the diffusers example scripts write it: one
``checkpoint-<step>/`` folder per save (rotated away by ``--checkpoints_total_limit``) and, at the
end, the final model in RUN_DIR itself. Both write only to ``RUN_DIR/memwatch/``: nothing whose name
starts with ``checkpoint`` (the scripts parse every such name as ``checkpoint-<int>``), and never
into data folders.

* ``probe`` probes every snapshot that has no result for this config yet, oldest step first. Each
  probe result is one transaction, so a killed job loses nothing and the next run finishes what is
  missing; a second job on the same RUN_DIR finds the lock held and exits (or waits with ``wait``).
* ``watch`` polls for new checkpoints, probes each once it is complete and has not changed for a
  quiet period, tolerates checkpoints deleted by rotation, and stops after probing the final model
  or after an idle timeout.

Unconditional and text-to-image snapshots go through the same path: the loaded snapshot (UNet,
scheduler and, for ``UNet2DConditionModel``, tokenizer / text encoder / VAE from the pipeline or
``base_model``) is handed to :meth:`ProbeSession.probe`, which prompts text-to-image models with the
training captions. A text-to-image checkpoint or LoRA whose base pipeline cannot be found is
recorded as failed for that snapshot alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwatch.checkpoints import list_checkpoints
from memwatch.config import MonitorConfig
from memwatch.errors import MemwatchError
from memwatch.rules import severity_at_least
from memwatch.session import ProbeSession, as_refset
from memwatch.snapshots import denoiser_class, detect_layout, load_snapshot, snapshot_complete
from memwatch.store import OUTPUT_SUBDIR

log = logging.getLogger("memwatch")

LOCK_NAME = "probe.lock"


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot folder found in RUN_DIR: its step, where it is, and whether it is the final model."""

    step: int
    path: Path
    kind: str  # "checkpoint" or "final"


@dataclass
class RunReport:
    """What one probe/watch job did on one RUN_DIR (JSON-ready via :meth:`to_dict`)."""

    run_dir: str
    store: str
    probed: list[int] = field(default_factory=list)
    already_done: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    new_events: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_clean_step: int | None = None
    onset_step: int | None = None
    locked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def discover_snapshots(run_dir: str | Path) -> list[SnapshotRef]:
    """``checkpoint-<step>`` folders, oldest first, then the final model saved in RUN_DIR itself.

    The final model gets the step of the newest checkpoint (training ends right after it) or 0.

    Example:
        >>> [(s.step, s.kind) for s in discover_snapshots("runs/ddpm")]  # doctest: +SKIP
        [(500, 'checkpoint'), (1000, 'checkpoint'), (1000, 'final')]
    """
    run_dir = Path(run_dir)
    found = [SnapshotRef(step, path, "checkpoint") for step, path in list_checkpoints(run_dir)]
    if detect_layout(run_dir) != "unknown":
        found.append(SnapshotRef(found[-1].step if found else 0, run_dir, "final"))
    return found


@contextlib.contextmanager
def run_lock(folder: Path, *, wait: bool) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder/probe.lock``; yields False when another job holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as f:
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
    """Probe snapshots of one RUN_DIR into ``RUN_DIR/memwatch/``, skipping those already probed.

    Args:
        run_dir: the training output folder.
        config: the validated config (``reference`` must be set).
        on_event: called with each new event.
    """

    def __init__(self, run_dir: str | Path, config: MonitorConfig, *, on_event: Callable | None = None):
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
        self.report = RunReport(run_dir=str(self.run_dir), store=str(self.out / "memwatch.sqlite"))

    def open(self) -> None:
        """Load the reference sets, open the store and replay the run's history into the rules."""
        refs = as_refset(self.config.reference, "reference set")
        holdout = as_refset(self.config.holdout, "holdout set") if self.config.holdout else None
        new_events = self.report.new_events
        self.session = ProbeSession(self.config, refs, holdout, self.out, on_event=lambda e: self._event(e, new_events))
        self.session.replay()

    def _event(self, event: Any, sink: list) -> None:
        sink.append(event.to_dict())
        if self.on_event is not None:
            self.on_event(event)

    def missing_probes(self, ref: SnapshotRef) -> list[str]:
        """Probes that apply to this snapshot and have no ok result for it and this config yet.

        Text-to-image-only probes apply when the folder's UNet is a ``UNet2DConditionModel`` (read
        from its config, without loading weights).
        """
        s = self.session
        assert s is not None and s.store is not None
        snap_id = s.store.add_snapshot(s.run_id, ref.step, kind=ref.kind, path=str(ref.path))
        # None: the folder does not say (yet); loading will tell, and probes that do not apply are skipped.
        text_to_image = denoiser_class(ref.path, self.config.weights) in (None, "UNet2DConditionModel")
        return [
            p.name
            for p in s.applicable(text_to_image=text_to_image)
            if not s.store.has_result(snap_id, p.name, s.probe_hash(p))
        ]

    def probe(self, ref: SnapshotRef) -> bool:
        """Probe one snapshot if anything is missing; returns True if it probed or recorded a failure."""
        s = self.session
        assert s is not None and s.store is not None
        missing = self.missing_probes(ref)
        if not missing:
            self.report.already_done += 1
            return False
        try:
            snap = load_snapshot(ref.path, weights=self.config.weights, base_model=self.config.base_model)
            if snap.parts.text_to_image and snap.parts.text_encoder is None:
                raise MemwatchError(
                    f"{ref.path}: text-to-image UNet without tokenizer/text encoder/VAE: set 'base_model' to the "
                    "local pipeline folder the run started from (--pretrained_model_name_or_path)"
                )
        except MemwatchError as e:
            snap_id = s.store.add_snapshot(s.run_id, ref.step, kind=ref.kind, path=str(ref.path))
            by_name = {p.name: p for p in s.probes}
            for name in missing:
                s.store.record_failure(snap_id, name, config_hash=s.probe_hash(by_name[name]), error=str(e))
            self.report.failed.append({"step": ref.step, "path": str(ref.path), "error": str(e)})
            log.warning("%s: recorded as failed: %s", ref.path, e)
            return True
        for note in snap.notes:
            log.info("%s: %s", ref.path, note)
        s.probe(  # the snapshot carries UNet, scheduler and (text-to-image) its text components
            ref.step,
            snap,
            probes=missing,
            kind=ref.kind,
            path=str(ref.path),
            weights_sha256=snap.weights_sha256,
        )
        self.report.probed.append(ref.step)
        return True

    def close(self) -> RunReport:
        s = self.session
        if s is not None:
            self.report.events = [e.to_dict() for e in s.events]
            self.report.last_clean_step = s.last_clean_step
            self.report.onset_step = s.onset_step
            s.last_step = max(self.report.probed, default=None)
            s.close()
        return self.report


def probe_run_dir(run_dir: str | Path, config: MonitorConfig, *, wait: bool = False) -> RunReport:
    """Probe every snapshot of RUN_DIR that has no result for this config yet, oldest first.

    Args:
        run_dir: training output folder.
        config: validated config.
        wait: if another job holds RUN_DIR's lock, wait for it (default: return at once).

    Returns:
        The :class:`RunReport` (``locked=True`` if another job held the lock and nothing was done).

    Example:
        >>> report = probe_run_dir("runs/ddpm", load_config("memwatch.yaml"))  # doctest: +SKIP
        >>> report.probed  # doctest: +SKIP
        [500, 1000, 1000]
    """
    prober = CheckpointProber(run_dir, config)
    with run_lock(prober.out, wait=wait) as got:
        if not got:
            prober.report.locked = True
            log.warning("%s: another memwatch job holds %s; exiting", run_dir, prober.out / LOCK_NAME)
            return prober.report
        prober.open()
        try:
            for ref in discover_snapshots(run_dir):
                prober.probe(ref)
        finally:
            report = prober.close()
    return report


def watch_run_dir(
    run_dir: str | Path,
    config: MonitorConfig,
    *,
    quiet_period: float = 30.0,
    poll: float = 5.0,
    idle_timeout: float = 3600.0,
    on_event: Callable | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RunReport:
    """Follow a training run: probe each new checkpoint once complete and quiet; stop after the final model.

    A snapshot is probed when :func:`memwatch.snapshots.snapshot_complete` says all its files are
    there and none of them changed size or mtime for ``quiet_period`` seconds. A checkpoint deleted
    by rotation before or while it is probed is skipped (logged). The watch ends after the final
    model (saved in RUN_DIR itself) is probed, or when nothing new appeared for ``idle_timeout``.

    Args:
        run_dir: training output folder (may not exist yet: the watch waits for it).
        config: validated config.
        quiet_period: seconds a snapshot's files must stay unchanged before probing.
        poll: seconds between looks at RUN_DIR.
        idle_timeout: stop after this many seconds without a new snapshot.
        on_event: called with each new event.
        clock, sleep: time sources (tests pass fast ones).

    Example:
        >>> watch_run_dir("runs/ddpm", load_config("memwatch.yaml"), idle_timeout=600)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    start = clock()
    while not run_dir.is_dir():  # started before training created its output folder
        if clock() - start > idle_timeout:
            raise MemwatchError(f"RUN_DIR {run_dir} did not appear within --idle-timeout {idle_timeout:g}s")
        sleep(poll)
    prober = CheckpointProber(run_dir, config, on_event=on_event)
    with run_lock(prober.out, wait=True):
        prober.open()
        seen: dict[Path, tuple[tuple, float]] = {}  # folder -> (file signature, since when unchanged)
        done: set[tuple[Path, str]] = set()
        last_activity = clock()
        try:
            while True:
                finished = False
                for ref in discover_snapshots(run_dir):
                    if (ref.path, ref.kind) in done:
                        continue
                    sig = _signature(ref.path, exclude=OUTPUT_SUBDIR if ref.kind == "final" else None)
                    now = clock()
                    if sig is None or not snapshot_complete(ref.path):
                        seen.pop(ref.path, None)
                        continue
                    if seen.get(ref.path, (None, 0.0))[0] != sig:
                        seen[ref.path] = (sig, now)
                        last_activity = now
                    if now - seen[ref.path][1] < quiet_period:
                        continue
                    try:
                        prober.probe(ref)
                    except (FileNotFoundError, MemwatchError) as e:
                        if ref.path.exists():
                            raise
                        log.info("%s was deleted (checkpoint rotation) before it was probed: %s", ref.path, e)
                    done.add((ref.path, ref.kind))
                    last_activity = clock()
                    finished = finished or ref.kind == "final"
                if finished:
                    break
                if clock() - last_activity > idle_timeout:
                    log.warning("%s: nothing new for %gs (--idle-timeout); stopping", run_dir, idle_timeout)
                    break
                sleep(poll)
        finally:
            report = prober.close()
    return report


def _signature(folder: Path, exclude: str | None = None) -> tuple | None:
    """(relative path, size, mtime) of every file under ``folder``; None if it vanished meanwhile."""
    try:
        rows = []
        for root, dirs, files in os.walk(folder):
            if exclude is not None and Path(root) == folder:
                dirs[:] = [d for d in dirs if d != exclude and not d.startswith("checkpoint")]
            for name in files:
                st = (Path(root) / name).stat()
                rows.append((str(Path(root, name).relative_to(folder)), st.st_size, st.st_mtime_ns))
        return tuple(sorted(rows)) if folder.is_dir() else None
    except FileNotFoundError:
        return None


def fails(report: RunReport, fail_on: str | None) -> bool:
    """Whether the run holds an event at or above ``fail_on`` (the state of the run, not just this job's)."""
    return fail_on is not None and any(severity_at_least(e["severity"], fail_on) for e in report.events)
