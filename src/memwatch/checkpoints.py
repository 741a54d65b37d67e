"""Checkpoint folders written by accelerate / the diffusers example scripts (``checkpoint-<step>``)."""

from __future__ import annotations

import re
from pathlib import Path

# Exactly the names the diffusers scripts write; anything else that starts with "checkpoint"
# (e.g. "checkpoint-final-notes") is not a checkpoint and is left alone.
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder directly under ``run_dir``, oldest first.

    Example:
        >>> list_checkpoints("runs/demo")  # doctest: +SKIP
        [(200, PosixPath('runs/demo/checkpoint-200')), (400, PosixPath('runs/demo/checkpoint-400'))]
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def last_clean_checkpoint(run_dir: str | Path, last_clean_step: int | None) -> Path | None:
    """The newest checkpoint saved at or before ``last_clean_step`` (None if there is none).

    Example:
        >>> last_clean_checkpoint("runs/demo", 450)  # doctest: +SKIP
        PosixPath('runs/demo/checkpoint-400')
    """
    if last_clean_step is None:
        return None
    clean = [p for step, p in list_checkpoints(run_dir) if step <= last_clean_step]
    return clean[-1] if clean else None
