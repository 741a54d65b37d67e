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
import os
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

    The copy is made in a temporary folder beside ``out`` and renamed into place when it is whole, and the
    manifest is written last: a failure (a full disk, a folder that cannot be written) leaves neither, and
    says why in one line. Nothing is ever written inside ``reference``.

    Args:
        reference: a training image folder (searched recursively; files are copied byte for byte).
        out: the new folder (must not exist, and must not be inside ``reference``).
        levels: how many times each canary appears in ``out`` (2: the original and one copy).
        per_level: canaries per level.
        seed: which images become canaries (``random.Random(seed)``).
        manifest: where to write the manifest (default :func:`default_manifest`; not inside ``reference``).

    Returns:
        The manifest: ``{"format", "source", "folder", "seed", "manifest_sha256", "skipped", "canaries": [{"id",
        "copies", "copy_ids"}]}``; ids are paths relative to ``out``, as the reference set reads them, and
        ``manifest_sha256`` is the planted folder's (what a run trained on it records).

    Raises:
        MemwatchError: ``reference`` is not a folder, ``out`` exists or lies inside ``reference``, a level is
            below 2, there are fewer images than canaries, or the copy cannot be written.
    """
    from memwatch.data.refset import load_reference_set

    src, dst = Path(reference), Path(out)
    doc_path = Path(manifest) if manifest else default_manifest(dst)
    if not src.is_dir():
        raise MemwatchError(f"REFERENCE {src} is not a folder: canaries are planted into a copy of an image folder")
    if dst.exists():
        raise MemwatchError(f"OUT {dst} exists: give a new folder (the planted copy is written there)")
    for option, target in (("OUT", dst), ("--manifest", doc_path)):
        if _inside(target, src):
            raise MemwatchError(
                f"{option} {target} is inside REFERENCE {src}: a training folder is never written into; give a "
                "path outside it"
            )
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
    picks = random.Random(seed).sample(refs.items, wanted)
    files, skipped = _files_to_copy(src)
    extra = sum(it.path.stat().st_size * (levels[k // per_level] - 1) for k, it in enumerate(picks))
    _check_room(dst.parent, sum(size for _, size in files) + extra)
    tmp = dst.parent / f".{dst.name}.planting-{os.getpid()}"
    try:
        for rel, _ in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, tmp / rel)
        canaries = []
        for k, item in enumerate(picks):
            level = levels[k // per_level]
            suffix = Path(item.id).suffix
            stem = Path(item.id).as_posix().replace("/", "__")[: -len(suffix) or None]
            copy_ids = []
            for j in range(1, level):
                rel = Path(CANARY_FOLDER) / f"x{level}" / f"{stem}-copy{j}{suffix}"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(item.path, tmp / rel)
                copy_ids.append(rel.as_posix())
            canaries.append({"id": item.id, "copies": level, "copy_ids": copy_ids})
        planted = load_reference_set(tmp, what="OUT").manifest_sha256  # ids are relative: the same once renamed
        tmp.rename(dst)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MemwatchError(
            f"cannot write the planted copy {dst} ({e.strerror or e}): nothing was left behind; free space or pass "
            "a writable OUT"
        ) from None
    doc = {"format": FORMAT, "source": str(src), "folder": str(dst), "seed": seed, "manifest_sha256": planted,
           "skipped": [{"path": p, "reason": r} for p, r in skipped], "canaries": canaries}  # fmt: skip
    try:
        write_output(doc_path, json.dumps(doc, indent=2) + "\n", "--manifest")
    except MemwatchError:
        shutil.rmtree(dst, ignore_errors=True)  # without its manifest the planted copy cannot be checked
        raise
    return doc


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (which may not exist yet) is ``folder`` or lies under it, links resolved."""
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _files_to_copy(src: Path) -> tuple[list[tuple[Path, int]], list[tuple[str, str]]]:
    """Every file under ``src`` (relative path, size), links followed; dangling links and unreadable entries are
    returned apart, with the reason (they are named in the manifest, not copied)."""
    files: list[tuple[Path, int]] = []
    skipped: list[tuple[str, str]] = []
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            try:
                files.append((path.relative_to(src), path.stat().st_size))
            except OSError as e:
                reason = f"dangling symbolic link (to {os.readlink(path)})" if path.is_symlink() else str(e.strerror)
                skipped.append((str(path), reason))
    return files, skipped


def _check_room(folder: Path, size: int) -> None:
    """Fail before copying when ``folder`` cannot be written or lacks the space for ``size`` bytes."""
    folder = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if not os.access(folder, os.W_OK):
        raise MemwatchError(f"OUT's folder {folder} cannot be written: pass a writable OUT")
    free = shutil.disk_usage(folder).free
    if free < size * 1.05 + (1 << 20):
        raise MemwatchError(
            f"OUT's folder {folder} has {free / 2**20:.1f} MiB free; the planted copy needs about "
            f"{size / 2**20:.1f} MiB: free space or pass another OUT"
        )


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
    _check_trained_on(data.info.get("reference"), doc, run_dir)
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


def _check_trained_on(reference: Any, doc: dict[str, Any], run_dir: str | Path) -> None:
    """Refuse to answer for a run whose training set is not the planted folder: it could not have caught them."""
    ref = reference if isinstance(reference, dict) else {}
    if doc.get("manifest_sha256") is not None:
        same = ref.get("manifest_sha256") == doc["manifest_sha256"]
    else:  # a manifest of memwatch 0.1 names the folder only
        same = ref.get("root") is not None and Path(str(ref["root"])).resolve() == Path(doc["folder"]).resolve()
    if not same:
        raise MemwatchError(
            f"cannot tell: the run in {run_dir} was probed against the training set {ref.get('root')} (manifest "
            f"{str(ref.get('manifest_sha256'))[:12]}), not the planted folder {doc['folder']}"
            + (f" (manifest {doc['manifest_sha256'][:12]})" if doc.get("manifest_sha256") else "")
            + ": check a run trained on the planted folder, with it as the reference"
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MemwatchError(f"MANIFEST {path} does not exist: pass the JSON 'memwatch canaries plant' wrote") from None
    except (OSError, ValueError) as e:
        raise MemwatchError(f"MANIFEST {path} is not readable JSON ({e}): pass the JSON 'plant' wrote") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("canaries"), list):
        raise MemwatchError(f"MANIFEST {path} is not a memwatch canaries manifest (format {FORMAT!r})")
    if not isinstance(doc.get("folder"), str):
        raise MemwatchError(f"MANIFEST {path}: field 'folder' is missing: pass the JSON 'plant' wrote, unedited")
    for i, c in enumerate(doc["canaries"]):
        fields = {"id": str, "copies": int, "copy_ids": list}
        bad = [f for f, kind in fields.items() if not isinstance(c, dict) or not isinstance(c.get(f), kind)]
        if not bad and not all(isinstance(x, str) for x in c["copy_ids"]):
            bad = ["copy_ids"]
        if bad:
            raise MemwatchError(
                f"MANIFEST {path}: canaries[{i}] lacks a valid {bad[0]!r}: pass the JSON 'plant' wrote, unedited"
            )
    return doc
