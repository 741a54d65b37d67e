"""Checkpoint folders written by accelerate / the diffusers example scripts (``checkpoint-<step>``)."""

from __future__ import annotations

import re
from pathlib import Path

# Exactly the names the diffusers scripts write; anything else that starts with "checkpoint"
# (e.g. "checkpoint-final-notes") is not a checkpoint and is left alone.
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


#: Steps are stored as SQLite integers (64-bit signed); a folder named beyond that is not a usable step.
MAX_STEP = 2**63 - 1


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a ``checkpoint-<step>`` folder's name, or None for any other name.

    Example:
        >>> checkpoint_step("out/checkpoint-500"), checkpoint_step("out/checkpoints/checkpoint_3")
        (500, None)
    """
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m and int(m.group(1)) <= MAX_STEP else None


def list_checkpoints(run_dir: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder directly under ``run_dir``, oldest first.

    Args:
        run_dir: the training output folder.
        skipped: if given, ``(folder, reason)`` is appended for a checkpoint name whose step is too large.

    Example:
        >>> list_checkpoints("no/such/run")
        []
    """
    run_dir = Path(run_dir)
    try:
        entries = list(run_dir.iterdir()) if run_dir.is_dir() else []
    except OSError:  # deleted or unreadable meanwhile: nothing to list now
        return []
    found = []
    for p in entries:
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            step = int(m.group(1))
            if step > MAX_STEP:
                if skipped is not None:
                    skipped.append((str(p), f"step {step} is beyond 64 bits: not a training step memwatch can record"))
                continue
            found.append((step, p))
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
