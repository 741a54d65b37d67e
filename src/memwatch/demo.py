"""``memwatch demo``: train a small DDPM on the bundled images and watch it start to memorize.

The demo runs ``scripts/train_ddpm.py`` (the copyable example script, with memwatch added in three
lines) on ``assets/demo/train``, then draws the curves and prints a summary. ``--control`` trains
the same model for the same number of steps on the much larger ``assets/demo/control`` set, where
it does not have the capacity to copy: no regurgitation warning fires.

Inside the source checkout they come from ``assets/demo``, ``scripts/train_ddpm.py`` and
``configs/demo.yaml`` and runs go to ``runs/``; an installed package carries the same files
(``memwatch/demo_assets``, ``memwatch/demo_train.py``, ``memwatch/configs/demo.yaml``; in the checkout
these are links to the originals) and writes ``runs/`` in the current folder.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memwatch.checkpoints import last_clean_checkpoint
from memwatch.errors import MemwatchError
from memwatch.store import OUTPUT_SUBDIR


@dataclass
class DemoFiles:
    """Where the demo's images, training script and config are, and where its runs go."""

    assets: Path
    script: Path
    config: Path
    runs: Path


def demo_files(start: Path | None = None) -> DemoFiles:
    """The source checkout's files when run inside one, else the copies installed with the package.

    Raises:
        MemwatchError: neither is there (an installation made without its package data).
    """
    try:
        root = find_checkout(start)
        return DemoFiles(root / "assets" / "demo", root / "scripts" / "train_ddpm.py", root / "configs" / "demo.yaml",
                         root / "runs")  # fmt: skip
    except MemwatchError:
        pass
    package = Path(__file__).resolve().parent
    files = DemoFiles(package / "demo_assets", package / "demo_train.py", package / "configs" / "demo.yaml",
                      (start or Path.cwd()) / "runs")  # fmt: skip
    if not ((files.assets / "train").is_dir() and files.script.is_file()):
        raise MemwatchError(
            f"memwatch demo needs its images and training script, which this installation lacks ({files.assets}): "
            "install memwatch from a wheel or source checkout that includes them, or run bash scripts/demo.sh in "
            "the repository"
        )
    return files


def find_checkout(start: Path | None = None) -> Path:
    """The memwatch source checkout: the first folder holding ``scripts/train_ddpm.py`` and ``assets/demo``."""
    candidates = [start or Path.cwd(), Path(__file__).resolve()]
    for base in candidates:
        for folder in [base, *base.parents]:
            if (folder / "scripts" / "train_ddpm.py").is_file() and (folder / "assets" / "demo").is_dir():
                return folder
    raise MemwatchError(
        "memwatch demo needs the memwatch source checkout (scripts/train_ddpm.py and assets/demo/): "
        "run it from inside the repository"
    )


def run_demo(*, control: bool = False, steps: int | None = None, output_dir: str | Path | None = None) -> dict:
    """Train, probe, draw curves; return the monitor's summary plus the curve paths.

    Args:
        control: train on the large control set instead (no memorization expected).
        steps: optimizer steps (default: the demo config's).
        output_dir: default ``runs/demo`` (``runs/demo-control`` for the control).

    Example:
        >>> summary = run_demo(steps=200)  # doctest: +SKIP
        >>> summary["last_clean_step"]  # doctest: +SKIP
        1200
    """
    from memwatch.curves import write_curves

    files = demo_files()
    name = "demo-control" if control else "demo"
    out = Path(output_dir) if output_dir else files.runs / name
    if (out / OUTPUT_SUBDIR).is_dir():
        shutil.rmtree(out)  # a demo starts fresh: only a folder that an earlier demo wrote is removed
    data = files.assets / ("control" if control else "train")
    argv = [
        "--train-data",
        str(data),
        "--holdout-data",
        str(files.assets / "holdout"),
        "--output-dir",
        str(out),
        "--memwatch-config",
        str(files.config),
        "--steps",
        str(steps or DEMO_STEPS),
        *DEMO_TRAINING_ARGS,
    ]
    script = _load_script(files.script)
    summary: dict[str, Any] = script.main(argv)
    summary["curves"] = {k: str(v) for k, v in write_curves(out / OUTPUT_SUBDIR).items()}
    ckpt = last_clean_checkpoint(out, summary["last_clean_step"])
    summary["last_clean_checkpoint"] = str(ckpt) if ckpt else None
    return summary


# The demo recipe (docs/benchmarks.md has its timings): a 0.27M-parameter UNet predicting v (as Stable
# Diffusion 2 does) on 8 images (each 4 times per batch of 32) memorizes within ~2,000 steps; mem_fraction is 0 before
# step ~1,000. Found by a small sweep over model width, batch size, learning rate and prediction type.
DEMO_STEPS = 2000
DEMO_TRAINING_ARGS = [
    "--resolution", "32", "--batch-size", "32", "--repeats", "4", "--lr", "1e-3", "--block-channels", "16", "32", "32",
    "--prediction-type", "v_prediction", "--checkpointing-steps", "250",
]  # fmt: skip


def format_demo_summary(summary: dict[str, Any]) -> str:
    """Human-readable end-of-demo summary."""
    events = ", ".join(f"{n} {sev}" for sev, n in sorted(summary["events"].items())) or "none"
    lines = [
        "",
        "memwatch demo summary",
        f"  steps trained:          {summary['last_step']}",
        f"  onset (first copy):     {_step(summary['onset_step'])}",
        f"  at risk (forecast):     {_step(summary.get('at_risk_step'))}",
        f"  first warning:          {_step(summary['first_alarm_step'])}",
        f"  last clean step:        {_step(summary['last_clean_step'])}",
        f"  last clean checkpoint:  {_rel(summary.get('last_clean_checkpoint')) or '-'}",
        f"  images at risk:         {_images(summary.get('images_at_risk') or [])}",
        f"  events:                 {events}",
        f"  store:                  {_rel(summary['store'])}",
        f"  events log:             {_rel(summary['events_file'])}",
    ]
    lines += [f"  {name + ':':<24}{_rel(path)}" for name, path in summary.get("curves", {}).items()]
    return "\n".join(lines)


def _images(rows: list[dict[str, Any]]) -> str:
    """``a.png (copied at 775), b.png (forecast 900)``, or ``-``."""
    words = [
        f"{r['training_id']} (copied at {r['first_copy_step']})"
        if r["first_copy_step"] is not None
        else f"{r['training_id']} (forecast {r['forecast_step']})"
        for r in rows
    ]
    return ", ".join(words) or "-"


def _rel(path: str | None) -> str | None:
    """``path`` relative to the current folder when it lies below it (shorter to read)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _step(step: int | None) -> str:
    return "-" if step is None else f"step {step}"


def _load_script(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("memwatch_train_ddpm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
