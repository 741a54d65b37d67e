"""Checkpoint-folder front-ends: ``memwatch probe`` (scheduled) and ``memwatch watch`` (beside training).

* :mod:`~memwatch.frontends.jobs.discovery`: which snapshot folders RUN_DIR holds;
* :mod:`~memwatch.frontends.jobs.prober`: probing them into ``RUN_DIR/memwatch/`` (``memwatch probe``);
* :mod:`~memwatch.frontends.jobs.watch`: following a run while it trains (``memwatch watch``).
"""

from memwatch.frontends.jobs.discovery import SnapshotRef, discover_snapshots, uses_ema
from memwatch.frontends.jobs.prober import (
    LOCK_NAME,
    CheckpointProber,
    RunReport,
    fails,
    probe_run_dir,
    run_lock,
    stored_events,
)
from memwatch.frontends.jobs.watch import watch_run_dir

__all__ = [
    "LOCK_NAME",
    "CheckpointProber",
    "RunReport",
    "SnapshotRef",
    "discover_snapshots",
    "fails",
    "probe_run_dir",
    "run_lock",
    "stored_events",
    "uses_ema",
    "watch_run_dir",
]
