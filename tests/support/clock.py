"""A fake clock for the watch tests: time passes only when the watcher sleeps, and the training run's
scripted saves happen at their times. One thread, no wall-clock sleeps: the same run every time."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path


class ScriptedClock:
    """``clock()`` and ``sleep()`` for :func:`memwatch.frontends.jobs.watch_run_dir`.

    Args:
        actions: ``(time, action)`` pairs; each action runs once the clock has reached its time.
    """

    def __init__(self, actions: Iterable[tuple[float, Callable[[], None]]]):
        self.now = 0.0
        self.actions = sorted(actions, key=lambda a: a[0])
        self.run_due()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.run_due()

    def run_due(self) -> None:
        while self.actions and self.actions[0][0] <= self.now:
            self.actions.pop(0)[1]()

    @property
    def done(self) -> bool:
        return not self.actions


def copy_save(staged: Path, run_dir: Path, name: str | None = None) -> Callable[[], None]:
    """An action that copies one save of a staged run into ``run_dir``: a ``checkpoint-<step>`` folder
    (``name``), or with ``name=None`` the final pipeline files saved in the run folder itself."""

    def act() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if name is not None:
            shutil.copytree(staged / name, run_dir / name)
            return
        for entry in staged.iterdir():
            if entry.name.startswith("checkpoint") or entry.name == "memwatch":
                continue
            if entry.is_dir():
                shutil.copytree(entry, run_dir / entry.name, dirs_exist_ok=True)
            else:
                shutil.copy2(entry, run_dir / entry.name)

    return act


def delete(path: Path) -> Callable[[], None]:
    """An action that deletes a folder, as ``--checkpoints_total_limit`` rotation does."""
    return lambda: shutil.rmtree(path)


def copy_pipeline(staged: Path, run_dir: Path) -> Callable[[], None]:
    """An action that saves a staged pipeline folder into ``run_dir`` itself, as ``pipeline.save_pretrained``
    does (files are overwritten)."""

    def act() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, run_dir, dirs_exist_ok=True)

    return act


def touch_log(run_dir: Path, line: str = "x") -> Callable[[], None]:
    """An action that appends to the run's TensorBoard-like log (``logs/events``), as a flush does."""

    def act() -> None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(run_dir / "logs" / "events", "a") as f:
            f.write(line + "\n")

    return act
