"""Roll back: restore the last clean checkpoint's training state so training can go on from there.

The last clean step is the last probed step before any warning (``monitor.last_clean_step``); its checkpoint
is the newest ``checkpoint-<step>`` folder saved at or before it. ``accelerator.load_state`` restores the
model, the optimizer, the learning-rate scheduler and the RNG streams the script registered, as the diffusers
scripts' ``--resume_from_checkpoint`` does (the folder is the run's own, written by its own
``accelerator.save_state``). The restored weights are hashed and compared with the weights the probes
measured at that checkpoint (the sighting the monitor recorded when it was saved), so the record says whether
training really went back to weights known to be clean.

Keep counting steps upward after a rollback (the next step is the one after the warning): the store's
timeline then stays in order and the intervention row says which checkpoint the weights came from. Drop the
images at risk with :class:`~memwatch.interventions.weights.ImageWeights` (pass it here so the record names
them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from memwatch.errors import failure_reason
from memwatch.hashing import state_sha256
from memwatch.models.modes import unwrap_model
from memwatch.snapshots.checkpoints import checkpoint_step, last_clean_checkpoint

log = logging.getLogger("memwatch")


def rollback(accelerator: Any, monitor: Any, model: Any, run_dir: str | Path, *, weights: Any = None) -> int | None:
    """Restore the last clean checkpoint of ``run_dir`` into the training state; never raises.

    Call it on every process (``load_state`` is collective); only the main process records.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (the one that saved the checkpoints).
        monitor: the run's ``MemorizationMonitor`` (or its session).
        model: the model being trained (wrapped or not), to check the restored weights.
        run_dir: the folder holding the ``checkpoint-<step>`` folders.
        weights: the run's :class:`~memwatch.interventions.weights.ImageWeights`, if it drops images at risk.

    Returns:
        The restored checkpoint's step, or None when nothing was restored (recorded with the reason).

    Example:
        >>> if monitor.first_alarm_step is not None and not rolled_back:  # doctest: +SKIP
        ...     rollback(accelerator, monitor, model, args.output_dir, weights=weights)
        ...     rolled_back = True
    """
    session = getattr(monitor, "session", monitor)
    from_step = session.last_step
    images = list(getattr(weights, "reweighted", []) or [])
    try:
        clean = session.last_clean_step
        folder = last_clean_checkpoint(run_dir, clean)
        if folder is None:
            raise RuntimeError(f"no checkpoint-<step> folder in {run_dir} at or before the last clean step {clean}")
        step = checkpoint_step(folder)
        accelerator.load_state(str(folder))
        sha = state_sha256(unwrap_model(model))
    except Exception as e:
        reason = failure_reason(e)
        log.warning("memwatch: roll back not made: %s", reason)
        session.record_intervention("rollback", from_step, images, {"run_dir": str(run_dir)}, error=reason)
        return None
    probed = _probed_sha(session, folder)
    detail = {
        "checkpoint": str(folder), "checkpoint_step": step, "from_step": from_step,
        "last_clean_step": session.last_clean_step, "weights_sha256": sha, "probed_weights_sha256": probed,
        # False: the folder's weights are not those the probes measured (or were never measured): not known clean
        "matches_probed_weights": probed == sha if probed else None,
    }  # fmt: skip
    session.record_intervention(
        "rollback", from_step, images, detail,
        message=f"rolled back from step {from_step} to {folder.name}"
                + ("" if probed == sha else " (its weights are not the ones the probes measured)")
                + (f"; {len(images)} image(s) at risk left out" if images else ""),
    )  # fmt: skip
    return step


def _probed_sha(session: Any, folder: Path) -> str | None:
    """The weights hash the monitor recorded for ``folder`` when it was saved (None if it saw no such save)."""
    if session.store is None:
        return None
    try:
        for snapshot in session.store.snapshots(session.run_id):
            if any(s["path"] and Path(s["path"]).resolve() == folder.resolve() for s in snapshot["sightings"]):
                return snapshot["weights_sha256"]
    except Exception as e:
        log.warning("memwatch: the checkpoint's probed weights could not be read: %s", failure_reason(e))
    return None
