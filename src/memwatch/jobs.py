"""Checkpoint-folder front-ends: ``memwatch probe`` (scheduled) and ``memwatch watch`` (beside training).

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwatch.checkpoints import list_checkpoints
from memwatch.config import MonitorConfig
from memwatch.errors import MemwatchError, failure_reason
from memwatch.hashing import sha256_file
from memwatch.history import load_history
from memwatch.rules import severity_at_least
from memwatch.session import ProbeSession, as_refset
from memwatch.snapshots import (
    denoiser_class,
    detect_layout,
    load_snapshot,
    snapshot_complete,
    snapshot_sha256,
)
from memwatch.store import OUTPUT_SUBDIR, STORE_NAME, Store
from memwatch.workers import Workers

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


def discover_snapshots(run_dir: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[SnapshotRef]:
    """``checkpoint-<step>`` folders, oldest first, then the model saved in RUN_DIR itself (the final model).

    The final model gets the step of the newest checkpoint (its own step is not saved; training ends
    at or after it), or 0.

    Example:
        >>> [(s.step, s.kind) for s in discover_snapshots("runs/ddpm")]  # doctest: +SKIP
        [(500, 'checkpoint'), (1000, 'checkpoint'), (1000, 'final')]
    """
    run_dir = Path(run_dir)
    found = [SnapshotRef(step, path, "checkpoint") for step, path in list_checkpoints(run_dir, skipped)]
    if detect_layout(run_dir) != "unknown":
        found.append(SnapshotRef(found[-1].step if found else 0, run_dir, "final"))
    return found


def uses_ema(run_dir: str | Path) -> bool:
    """Whether the run trained with EMA (a checkpoint holds ``unet_ema/``): its final model holds EMA weights."""
    return any((path / "unet_ema").is_dir() for _, path in list_checkpoints(run_dir))


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


def default_run_name(run_dir: str | Path, config: MonitorConfig) -> str:
    """The run's name when the config gives none: its folder and config (so repeated jobs resume it).

    Example:
        >>> default_run_name("runs/ddpm", load_config(None))  # doctest: +SKIP
        'ddpm@5f0c2a91b7e3'
    """
    return config.run_name or f"{Path(run_dir).resolve().name}@{config.identity_hash()[:12]}"


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
        self.run_name = default_run_name(self.run_dir, config)
        self.report = RunReport(run_dir=str(self.run_dir), store=str(self.out / STORE_NAME), run=self.run_name)

    def open(self) -> None:
        """Load the reference sets, open the store and replay the run's history into the rules."""
        cols = self.config.columns
        refs = as_refset(self.config.reference, "reference set", cols)
        holdout = as_refset(self.config.holdout, "holdout set", cols) if self.config.holdout else None
        self.session = ProbeSession(
            self.config, refs, holdout, self.out, on_event=self._event, run_name=self.run_name, workers=self.workers
        )

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
        s = self.session
        assert s is not None and s.store is not None
        store = s.store

        def cached_sha256(path: Path) -> str:
            st = path.stat()
            key = str(path.resolve())
            sha = store.cached_file_hash(key, st.st_size, st.st_mtime_ns, st.st_ino)
            if sha is None:
                sha = sha256_file(path)
                store.remember_file_hash(key, st.st_size, st.st_mtime_ns, st.st_ino, sha)
            return sha

        # The weights a checkpoint folder is probed with: unet_ema/ when the config asks for EMA.
        which = self.config.weights if ref.kind == "checkpoint" else "raw"
        return snapshot_sha256(ref.path, weights=which, base_model=self.config.base_model, file_sha256=cached_sha256)

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
        if existing is not None and all(s.store.has_result(existing, p.name, s.probe_hash(p)) for p in applicable):
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
            prober.report.events = stored_events(prober.out / STORE_NAME, prober.run_name)
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


def stored_events(store_path: Path, run_name: str) -> list[dict[str, Any]]:
    """The events a run's store holds (read-only; none if there is no store or no such run yet)."""
    if not store_path.is_file():
        return []
    with Store(store_path, readonly=True) as store:
        if store.run_id(run_name) is None:
            return []
        return load_history(store, run_name).events


def watch_run_dir(
    run_dir: str | Path,
    config: MonitorConfig,
    *,
    quiet_period: float = 30.0,
    poll: float = 5.0,
    idle_timeout: float = 3600.0,
    end_quiet: float | None = None,
    on_event: Callable | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    workers: Workers | None = None,
) -> RunReport:
    """Follow a training run: probe each checkpoint once complete and quiet; probe the final model once
    training has ended; then stop.

    A checkpoint is probed when :func:`memwatch.snapshots.snapshot_complete` says all its files are
    there and none of them changed for ``quiet_period`` seconds. A checkpoint deleted by rotation
    before or while it is probed is skipped and counted.

    **When training has ended.** The model in RUN_DIR is not proof of it: ``train_unconditional.py``
    saves its pipeline after its first epoch and every ``--save_model_epochs``, and pauses to generate
    its own samples. The model in RUN_DIR is taken as the final one when it is complete, newer than
    every checkpoint, every checkpoint has been handled, and nothing in RUN_DIR (checkpoints, the
    model, the training logs) has changed for ``end_quiet`` seconds: by default three times the
    longest gap seen between two saves of this run (at least ``quiet_period``), so a pause the run
    has already shown cannot end the watch early. How the scripts end: ``train_unconditional.py``
    saves the pipeline at its last epoch (as at earlier ones) and closes its logs;
    ``train_text_to_image.py`` saves the pipeline once, at the end; the LoRA and DreamBooth scripts
    save ``pytorch_lora_weights.safetensors`` in RUN_DIR once, at the end. If nothing at all changes
    for ``idle_timeout``, the watch stops (probing the model in RUN_DIR if there is one).

    Args:
        run_dir: training output folder (may not exist yet: the watch waits for it).
        config: validated config.
        quiet_period: seconds a snapshot's files must stay unchanged before probing.
        poll: seconds between looks at RUN_DIR.
        idle_timeout: stop after this many seconds in which nothing in RUN_DIR changed.
        end_quiet: seconds without any change after which training counts as ended (default: adaptive,
            see above).
        on_event: called with each new event.
        clock, sleep: time sources (tests pass fake ones).
        workers: the processes of an ``accelerate launch`` sharing the probes (default: this one alone).
            The main process alone looks at RUN_DIR, keeps time and decides what to probe; it
            broadcasts each decision, and every process then probes the same snapshots together.

    Example:
        >>> watch_run_dir("runs/ddpm", load_config("memwatch.yaml"), idle_timeout=600)  # doctest: +SKIP
    """
    workers = workers or Workers()
    run_dir = Path(run_dir)
    start = clock()
    while True:  # started before training created its output folder
        state = None
        if workers.is_main:
            state = "ready" if run_dir.is_dir() else "late" if clock() - start > idle_timeout else "wait"
        state = workers.broadcast(state)  # every process learns it at each poll: none waits for long
        if state == "ready":
            break
        if state == "late":
            raise MemwatchError(f"RUN_DIR {run_dir} did not appear within --idle-timeout {idle_timeout:g}s")
        sleep(poll)
    prober = CheckpointProber(run_dir, config, on_event=on_event, workers=workers)
    lock = run_lock(prober.out, wait=True) if workers.is_main else contextlib.nullcontext(True)
    with lock:
        workers.broadcast(None)  # the others wait here until the main process holds the lock
        prober.open()
        watch = _Watch(run_dir, quiet_period, end_quiet, clock()) if workers.is_main else None
        try:
            while True:
                refs, stop = workers.broadcast(watch.next_probes(clock(), idle_timeout) if watch else None)
                for ref in refs:
                    prober.probe(ref)
                if stop:
                    break
                sleep(poll)
        finally:
            report = prober.close()
    return report


class _Watch:
    """What ``watch`` has seen of RUN_DIR: each snapshot folder's files and since when they are unchanged,
    when anything last changed, and the gaps between saves (for the end-of-training rule)."""

    def __init__(self, run_dir: Path, quiet_period: float, end_quiet: float | None, now: float):
        self.run_dir = run_dir
        self.quiet_period = quiet_period
        self.end_quiet = end_quiet
        self.done: set[Path] = set()
        self.refs: list[SnapshotRef] = []
        self.stable: dict[Path, tuple[tuple, float]] = {}  # folder -> (file signature, unchanged since)
        self.everything: tuple | None = None
        self.last_change = now
        self.saves: list[float] = [now]  # when each new snapshot signature first appeared (and the start)

    def look(self, now: float) -> None:
        everything = _signature(self.run_dir, exclude=OUTPUT_SUBDIR)
        if everything != self.everything:
            self.everything, self.last_change = everything, now
        self.refs = discover_snapshots(self.run_dir)
        for ref in self.refs:
            sig = _signature(ref.path, exclude=OUTPUT_SUBDIR if ref.kind == "final" else None, snapshots_only=True)
            if sig is None or not snapshot_complete(ref.path):
                self.stable.pop(ref.path, None)
                continue
            if self.stable.get(ref.path, (None, 0.0))[0] != sig:
                self.stable[ref.path] = (sig, now)
                self.saves.append(now)

    def _quiet(self, ref: SnapshotRef, now: float) -> bool:
        return ref.path in self.stable and now - self.stable[ref.path][1] >= self.quiet_period

    def ready_checkpoints(self, now: float) -> list[SnapshotRef]:
        return [r for r in self.refs if r.kind == "checkpoint" and r.path not in self.done and self._quiet(r, now)]

    def model(self, now: float) -> SnapshotRef | None:
        """The model saved in RUN_DIR, if it is complete and quiet."""
        final = next((r for r in self.refs if r.kind == "final"), None)
        return final if final is not None and self._quiet(final, now) else None

    def final(self, now: float) -> SnapshotRef | None:
        """The model in RUN_DIR if it is complete, quiet and newer than every checkpoint, with every
        checkpoint handled; else None."""
        final = self.model(now)
        if final is None:
            return None
        checkpoints = [r for r in self.refs if r.kind == "checkpoint"]
        if any(r.path not in self.done for r in checkpoints):
            return None
        newest = max((self.stable.get(r.path, (None, -1.0))[1] for r in checkpoints), default=-1.0)
        return final if self.stable[final.path][1] >= newest else None

    def next_probes(self, now: float, idle_timeout: float) -> tuple[list[SnapshotRef], bool]:
        """Look at RUN_DIR and say what to probe now, oldest first, and whether the watch then stops.

        The checkpoints that are ready are counted as handled at once (a failed or rotated probe is
        recorded by the prober, not retried). The model in RUN_DIR follows them when training has
        ended; after ``idle_timeout`` seconds without any change the model in RUN_DIR is probed if it is
        there, whatever else is unfinished, and the watch stops.
        """
        self.look(now)
        refs = self.ready_checkpoints(now)
        self.done.update(r.path for r in refs)
        final = self.final(now)
        if final is not None and self.ended(now):
            return [*refs, final], True
        if now - self.last_change > idle_timeout:
            log.warning("%s: nothing changed for %gs (--idle-timeout); stopping", self.run_dir, idle_timeout)
            model = self.model(now)
            return refs + ([model] if model is not None else []), True
        return refs, False

    def ended(self, now: float) -> bool:
        """Nothing changed for long enough that the run's own pauses are over."""
        if self.end_quiet is not None:
            wait = self.end_quiet
        else:
            gaps = [b - a for a, b in zip(self.saves, self.saves[1:], strict=False)]
            wait = max(self.quiet_period, 3.0 * max(gaps, default=0.0))
        return now - self.last_change >= wait


def _signature(folder: Path, exclude: str | None = None, *, snapshots_only: bool = False) -> tuple | None:
    """(relative path, size, mtime) of every file under ``folder``; None if it vanished meanwhile.

    ``exclude`` (a top-level folder name) is left out, and with ``snapshots_only`` so are the
    ``checkpoint*`` folders and ``logs/`` of a RUN_DIR (what the final model's own files are).
    """
    try:
        rows = []
        for root, dirs, files in os.walk(folder):
            if Path(root) == folder:
                dirs[:] = [
                    d
                    for d in dirs
                    if d != exclude and not (snapshots_only and (d.startswith("checkpoint") or d == "logs"))
                ]
            for name in files:
                st = (Path(root) / name).stat()
                rows.append((str(Path(root, name).relative_to(folder)), st.st_size, st.st_mtime_ns))
        return tuple(sorted(rows)) if folder.is_dir() else None
    except FileNotFoundError:
        return None


def fails(report: RunReport, fail_on: str | None) -> bool:
    """Whether the run holds an event at or above ``fail_on`` (the state of the run, not just this job's)."""
    return fail_on is not None and any(severity_at_least(e["severity"], fail_on) for e in report.events)
