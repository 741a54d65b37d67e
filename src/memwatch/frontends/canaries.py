"""Canaries: plant known duplicates into a copy of a training set, then see when the monitor caught them.

A data owner measures that memwatch would have caught a copy the way security teams test an alarm:
plant one. :func:`plant_canaries` copies a training folder and duplicates a few of its images 2, 4, 8...
times (byte copies under new names, the way duplicates occur in scraped data; duplicated images are
memorized first: Carlini et al. 2023). Train on the copy with the monitor on; :func:`check_canaries`
then reads the run's store and says, for each canary, when it was first *at risk* (copied, or its own
closest approach forecast to reach 1/3: :mod:`memwatch.signals.image_risk`) and when it was first *copied*,
beside the same for the images that were not duplicated.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> src = Path(tempfile.mkdtemp()) / "train"
    >>> src.mkdir()
    >>> for i in range(6):
    ...     Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(src / f"{i}.png")
    >>> manifest = plant_canaries(src, src.parent / "planted", levels=(2, 4), seed=0)
    >>> [(c["copies"], len(c["copy_ids"])) for c in manifest["canaries"]]
    [(2, 1), (4, 3)]
    >>> len(list((src.parent / "planted").rglob("*.png")))
    10
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memwatch.errors import MemwatchError
from memwatch.output import write_output
from memwatch.signals.image_risk import Approach, first_at_risk, image_trajectories

CANARY_FOLDER = "canaries"
FORMAT = "memwatch-canaries"


def default_manifest(out: Path) -> Path:
    """``OUT-canaries.json`` beside the planted folder (outside it, so no training loader reads it)."""
    return out.parent / f"{out.name}-canaries.json"


def plant_canaries(
    reference: str | Path,
    out: str | Path,
    *,
    levels: Sequence[int] = (2, 4, 8),
    per_level: int = 1,
    seed: int = 0,
    manifest: str | Path | None = None,
) -> dict[str, Any]:
    """Copy the image folder ``reference`` to ``out`` and duplicate ``per_level`` images per level.

    Args:
        reference: a training image folder (searched recursively; files are copied byte for byte).
        out: the new folder (must not exist).
        levels: how many times each canary appears in ``out`` (2: the original and one copy).
        per_level: canaries per level.
        seed: which images become canaries (``random.Random(seed)``).
        manifest: where to write the manifest (default :func:`default_manifest`).

    Returns:
        The manifest: ``{"format", "source", "folder", "seed", "canaries": [{"id", "copies", "copy_ids"}]}``;
        ids are paths relative to ``out``, as the reference set reads them.

    Raises:
        MemwatchError: ``reference`` is not a folder, ``out`` exists, a level is below 2, or there are
            fewer images than canaries.
    """
    from memwatch.data.refset import load_reference_set

    src, dst = Path(reference), Path(out)
    if not src.is_dir():
        raise MemwatchError(f"REFERENCE {src} is not a folder: canaries are planted into a copy of an image folder")
    if dst.exists():
        raise MemwatchError(f"OUT {dst} exists: give a new folder (the planted copy is written there)")
    if any(level < 2 for level in levels) or per_level < 1:
        raise MemwatchError(f"--levels {list(levels)} --per-level {per_level}: levels must be >= 2, per-level >= 1")
    refs = load_reference_set(src, what="REFERENCE")
    if any(it.locator is not None for it in refs.items):
        raise MemwatchError(
            f"REFERENCE {src} stores its images inside files (tar shards, parquet, a dataset): canaries are planted "
            "into a folder of image files; export the images to a folder first"
        )
    wanted = len(levels) * per_level
    if len(refs) < wanted:
        raise MemwatchError(f"REFERENCE {src} has {len(refs)} usable images: {wanted} canaries need at least as many")
    shutil.copytree(src, dst, symlinks=False)
    picks = random.Random(seed).sample(refs.items, wanted)
    canaries = []
    for k, item in enumerate(picks):
        level = levels[k // per_level]
        suffix = Path(item.id).suffix
        stem = Path(item.id).as_posix().replace("/", "__")[: -len(suffix) or None]
        copy_ids = []
        for j in range(1, level):
            rel = Path(CANARY_FOLDER) / f"x{level}" / f"{stem}-copy{j}{suffix}"
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.path, dst / rel)
            copy_ids.append(rel.as_posix())
        canaries.append({"id": item.id, "copies": level, "copy_ids": copy_ids})
    doc = {"format": FORMAT, "source": str(src), "folder": str(dst), "seed": seed, "canaries": canaries}
    write_output(manifest or default_manifest(dst), json.dumps(doc, indent=2) + "\n", "--manifest")
    return doc


def check_canaries(run_dir: str | Path, manifest: str | Path, *, run: str | None = None) -> dict[str, Any]:
    """When each canary of ``manifest`` was first at risk and first copied in a run.

    Args:
        run_dir: the run (with its memwatch store) trained on the planted folder.
        manifest: the JSON :func:`plant_canaries` wrote.
        run: run name in the store (default the latest).

    Returns:
        ``{"canaries": [{"id", "copies", "first_at_risk_step", "first_copy_step"}], "others": {"images",
        "copied", "median_first_copy_step", "median_first_at_risk_step"}, "steps": [first, last probed]}``.
    """
    from statistics import median

    from memwatch.core.declared import load_run
    from memwatch.store import Store
    from memwatch.store.history import find_store

    doc = _read_manifest(Path(manifest))
    with Store(find_store(run_dir), readonly=True) as store:
        data = load_run(store, run)
    traj = image_trajectories(data.seeds)
    steps = sorted({int(r["step"]) for r in data.seeds})
    if not steps:
        raise MemwatchError(f"{run_dir}: the run has no regurgitation results, so no image was approached")

    def timing(image_id: str, copy_ids: Sequence[str] = ()) -> tuple[int | None, int | None]:
        # the reference set de-duplicates identical files under the first id, so a canary's samples may
        # name any of its copies: its trajectory is theirs together
        merged: dict[int, Approach] = {}
        for i in (image_id, *copy_ids):
            for step, a in traj.get(i, {}).items():
                if step not in merged or a.ratio < merged[step].ratio:
                    merged[step] = a
        return first_at_risk(merged, steps, threshold=data.mem_ratio)

    planted = {c["id"] for c in doc["canaries"]} | {i for c in doc["canaries"] for i in c["copy_ids"]}
    rows = []
    for c in doc["canaries"]:
        at_risk, copied = timing(c["id"], c["copy_ids"])
        rows.append({"id": c["id"], "copies": c["copies"], "first_at_risk_step": at_risk, "first_copy_step": copied})
    others = [timing(i) for i in traj if i not in planted]
    copied_others = [c for _, c in others if c is not None]
    risk_others = [r for r, _ in others if r is not None]
    return {
        "canaries": sorted(rows, key=lambda r: (-r["copies"], r["id"])),
        "others": {
            "images": len(others),
            "copied": len(copied_others),
            "median_first_copy_step": median(copied_others) if copied_others else None,
            "median_first_at_risk_step": median(risk_others) if risk_others else None,
        },
        "steps": [steps[0], steps[-1]],
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemwatchError(f"MANIFEST {path} does not exist: pass the JSON 'memwatch canaries plant' wrote") from None
    except (OSError, ValueError) as e:
        raise MemwatchError(f"MANIFEST {path} is not readable JSON ({e}): pass the JSON 'plant' wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("canaries"), list):
        raise MemwatchError(f"MANIFEST {path} is not a memwatch canaries manifest (format {FORMAT!r})")
    return doc
