"""What a training output folder (RUN_DIR) holds: its snapshot folders, oldest first, and their file signatures.

The diffusers example scripts write one ``checkpoint-<step>/`` folder per save (rotated away by
``--checkpoints_total_limit``) and the model saved in RUN_DIR itself (the *final* model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memwatch.snapshots import detect_layout
from memwatch.snapshots.checkpoints import list_checkpoints


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot folder found in RUN_DIR: its step, where it is, and whether it is the final model."""

    step: int
    path: Path
    kind: str  # "checkpoint" or "final"


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
