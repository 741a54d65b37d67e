"""A run folder and a config for the probe / watch tests: checkpoints as diffusers' train_unconditional.py writes
them, copied into watched folders by scripted saves (:mod:`support.clock`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from memwatch.frontends.jobs import watch_run_dir
from support.clock import ScriptedClock
from support.images import write_images
from support.models import train_unconditional_like


def job_config(tmp_path: Path) -> dict:
    """Six training and six holdout images, and a config file probing every checkpoint (run name ``audit``)."""
    write_images(tmp_path / "train", list(range(6)), size=16)
    write_images(tmp_path / "holdout", list(range(40, 46)), size=16)
    cfg = tmp_path / "memwatch.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "reference": "train",
                "holdout": "holdout",
                "run_name": "audit",
                "sampling": {"every": 1, "num_samples": 4, "inference_steps": 3, "batch_size": 4},
                "probes": {"membership": {"every": 1, "num_members": 6, "num_holdout": 6, "timesteps": [100, 400]}},
            }
        )
    )
    return {"train": tmp_path / "train", "config": cfg}


def staged_run(root: Path) -> dict:
    """A run trained once (checkpoints every 2 steps to 8, then the final pipeline), for scripted saves."""
    write_images(root / "train", list(range(6)), size=16)
    train_unconditional_like(root / "run", root / "train", steps=8, every=2)
    return {"run": root / "run", "train": root / "train"}


def watch(run_dir: Path, config, clock: ScriptedClock, **kw):
    """watch_run_dir on the scripted clock; the training's saves must all have happened before it ends."""
    report = watch_run_dir(run_dir, config, clock=clock.clock, sleep=clock.sleep, **kw)
    assert clock.done, "the watch ended before training did"
    return report
