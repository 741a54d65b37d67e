"""``memwatch watch``: follow a training run beside its script, probing each checkpoint once it is complete."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from memwatch.core.config import MonitorConfig
from memwatch.core.workers import Workers
from memwatch.errors import MemwatchError
from memwatch.frontends.jobs.discovery import SnapshotRef, _signature, discover_snapshots
from memwatch.frontends.jobs.prober import CheckpointProber, RunReport, run_lock
from memwatch.snapshots import snapshot_complete
from memwatch.store import OUTPUT_SUBDIR

log = logging.getLogger("memwatch")


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
        #: folder -> the file signature it was handed to the prober with: a folder is probed again only when
        #: its files change (a checkpoint probed while still being written failed, then was completed)
        self.done: dict[Path, tuple] = {}
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

    def _handled(self, ref: SnapshotRef) -> bool:
        """Whether the folder was handed to the prober with the files it has now."""
        return ref.path in self.stable and self.done.get(ref.path) == self.stable[ref.path][0]

    def ready_checkpoints(self, now: float) -> list[SnapshotRef]:
        return [r for r in self.refs if r.kind == "checkpoint" and not self._handled(r) and self._quiet(r, now)]

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
        if not all(self._handled(r) for r in checkpoints):
            return None
        newest = max((self.stable.get(r.path, (None, -1.0))[1] for r in checkpoints), default=-1.0)
        return final if self.stable[final.path][1] >= newest else None

    def next_probes(self, now: float, idle_timeout: float) -> tuple[list[SnapshotRef], bool]:
        """Look at RUN_DIR and say what to probe now, oldest first, and whether the watch then stops.

        The checkpoints that are ready are counted as handled at once, with the files they have: one whose
        probe failed (or that was rotated away) is not tried again unless its files change. The model in
        RUN_DIR follows them when training has ended; after ``idle_timeout`` seconds without any change the
        watch stops, whatever else is unfinished. Whenever it stops, it ends with the model in RUN_DIR if
        there is a complete one it has not handled.
        """
        self.look(now)
        refs = self.ready_checkpoints(now)
        self.done.update((r.path, self.stable[r.path][0]) for r in refs)
        final = self.final(now)
        if final is not None and self.ended(now):
            return [*refs, *self._last_model()], True
        if now - self.last_change > idle_timeout:
            log.warning("%s: nothing changed for %gs (--idle-timeout); stopping", self.run_dir, idle_timeout)
            return [*refs, *self._last_model()], True
        return refs, False

    def _last_model(self) -> list[SnapshotRef]:
        """The model in RUN_DIR, once, if it is complete and not handled with the files it has now."""
        model = next((r for r in self.refs if r.kind == "final" and r.path in self.stable), None)
        if model is None or self._handled(model):
            return []
        self.done[model.path] = self.stable[model.path][0]
        return [model]

    def ended(self, now: float) -> bool:
        """Nothing changed for long enough that the run's own pauses are over."""
        if self.end_quiet is not None:
            wait = self.end_quiet
        else:
            gaps = [b - a for a, b in zip(self.saves, self.saves[1:], strict=False)]
            wait = max(self.quiet_period, 3.0 * max(gaps, default=0.0))
        return now - self.last_change >= wait
