"""The evidence section of a report: flagged samples beside their training images, identities, files.

Pixels come from two places only: the probes' evidence grids (paths relative to the memwatch folder),
cut into one cell per sample, and the reference (training) images resolved by id under the run's
``reference.root``. A grid is used only when its rows provably match the stored rows (same ranking as
:func:`memwatch.core.evidence.save_evidence_grid`, and each row's training cell looks like the named file);
anything missing or mismatched is a limitation, never an error.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memwatch.hashing import sha256_bytes, sha256_file
from memwatch.signals.image_risk import ImageRisk, rank_prompts
from memwatch.store.history import RunHistory, training_images
from memwatch.views.report.common import Limits, data_uri, png_uri

if TYPE_CHECKING:
    from memwatch.core.probe import Probe

FLAGS = ("memorized", "copied", "extracted")
AT_RISK_SHOWN = 10  # training images most at risk listed in the report (curves' image_risk.csv lists all)
MATCH_FIELDS = ("sample", "seed", "nn1", "d1", "d2", "ratio", "similarity", "extraction", *FLAGS)
# Training thumbnails: large enough to recognise an image, small enough that a gallery of a few
# hundred stays a few MB. Smaller images are kept at their size and scaled up by the browser.
THUMB_PX = 128
# Evidence files above this size are listed but not inlined (a report must stay openable by e-mail).
MAX_INLINE_BYTES = 4 << 20
# Checking that a grid row shows the training image its stored row names: both images reduced to
# CHECK_PX x CHECK_PX and compared by mean absolute difference. The grid's copy went through the probe's
# resize and a nearest-neighbour upscale, which moves a few levels; two different images differ by tens.
CHECK_PX = 8
CHECK_TOLERANCE = 12.0  # mean |difference| in 0-255 levels
IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


class ReferenceFiles:
    """Reference images by id: ``<reference.root>/<id>``, the paths a ``.jsonl`` manifest gives, or the
    images inside the set's files (tar shards, parquet or arrow files, ``hf:`` datasets), read again.

    A relative root is tried from the working directory, then from the training output dir (the
    memwatch folder's parent). Ids that would leave the root (``..``) are refused.
    """

    def __init__(self, summary: Any, store_dir: Path, limits: Limits):
        self.limits = limits
        self.root: Path | None = None
        self.manifest: dict[str, Path] = {}
        self.columns: dict[str, str] = {}
        self._members: dict[str, Any] | None = None
        raw = summary.get("root") if isinstance(summary, dict) else None
        if not raw:
            return
        self.columns = dict(summary.get("columns") or {})
        candidates = [Path(raw), store_dir.parent / raw]
        for candidate in candidates:
            if str(raw).startswith("hf:") or candidate.exists():
                self.root = candidate
                break
        if self.root is None:
            limits.add(
                "reference-root-missing",
                f"reference set {raw} (recorded with the run) was not found from here: training images are "
                "shown by id only; run the report where the reference folder is reachable",
            )
        elif self.root.is_file() and self.root.suffix.lower() == ".jsonl":
            self.manifest = _manifest_paths(self.root)

    def resolve(self, item_id: str) -> tuple[Path | io.BytesIO | None, str]:
        """(the file or the image's bytes, status); status is ``ok``, ``missing``, ``outside-root`` or
        ``no-reference-root``."""
        if self.root is None:
            return None, "no-reference-root"
        if self.manifest:
            path = self.manifest.get(item_id)
            return (path, "ok") if path is not None and path.is_file() else (None, "missing")
        if self.root.is_dir():
            path = self.root / item_id
            try:
                path.resolve().relative_to(self.root.resolve())
            except ValueError:
                return None, "outside-root"
            if path.is_file():
                return path, "ok"
        item = self.members().get(item_id)
        return (item.source, "ok") if item is not None else (None, "missing")

    def members(self) -> dict[str, Any]:
        """id -> item of a set whose images are inside files, read once on first need (empty otherwise)."""
        if self._members is None:
            from memwatch.data.containers import is_container
            from memwatch.data.refset import load_reference_set

            self._members = {}
            root = self.root
            inside = root is not None and (
                str(root).startswith("hf:") or is_container(root) or (root.is_dir() and _holds_containers(root))
            )
            if inside:
                try:
                    refs = load_reference_set(root, **self.columns)  # type: ignore[arg-type]
                    self._members = {it.id: it for it in refs.items}
                except Exception as e:  # the report still shows ids and scores
                    self.limits.add("reference-unreadable", f"reference set {root} cannot be read again ({e})")
        return self._members


def _holds_containers(folder: Path) -> bool:
    """A save_to_disk folder, or a folder with parquet files or tar shards at its top."""
    from memwatch.data.containers import is_container

    names = {p.name for p in folder.iterdir()}
    return "state.json" in names or "dataset_dict.json" in names or any(is_container(Path(n)) for n in names)


def _manifest_paths(manifest: Path) -> dict[str, Path]:
    """id -> file of a ``.jsonl`` reference manifest (the rules of :mod:`memwatch.data.refset`)."""
    out: dict[str, Path] = {}
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            continue
        p = Path(row["path"])
        p = p if p.is_absolute() else manifest.parent / p
        item_id = str(row["id"]) if row.get("id") is not None else _relative_id(p, manifest.parent)
        out[item_id] = p
    return out


def _relative_id(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def _positions(rows: Iterable[Mapping[str, Any]]) -> list[tuple[tuple[int, int], Mapping[str, Any]]]:
    """Each row keyed by (result id, its position among that result's rows, in store order)."""
    seen: dict[int, int] = {}
    out = []
    for row in rows:
        pos = seen.get(row["result_id"], 0)
        seen[row["result_id"]] = pos + 1
        out.append(((row["result_id"], pos), row))
    return out


def sample_crops(
    results: Sequence[Mapping[str, Any]],
    matches: Sequence[Mapping[str, Any]],
    item_rows: Sequence[Mapping[str, Any]],
    store_dir: Path,
    refs: ReferenceFiles,
    limits: Limits,
    probes: Mapping[str, type[Probe]],
) -> dict[tuple[int, int], dict[str, Any]]:
    """(result id, row position) -> {"image", "training", "training_id", "source"}: a sample's cell and
    its training image's cell, cut from the result's evidence grid (:func:`memwatch.core.evidence.save_evidence_grid`).

    A grid holds the ``evidence_top`` best-ranked pairs of the probe's ``evidence_pairs`` (``probes``: name ->
    probe class), one row each, ordered by (rank, sample position). The pairs are rebuilt here from the
    stored rows with the same method; stored rows come back in
    the order the probe produced them (matches by sample name, which for the front-ends' zero-padded
    ``seed-NNNNNN`` names is that order; items in insertion order), so the positions agree.
    """
    from PIL import Image

    from memwatch.core.evidence import CELL, LABEL_H
    from memwatch.core.probe import ProbeResult

    matches_of: dict[int, list[dict[str, Any]]] = {}
    items_of: dict[int, list[dict[str, Any]]] = {}
    for rows, into in ((matches, matches_of), (item_rows, items_of)):
        for row in rows:
            into.setdefault(row["result_id"], []).append(dict(row))
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for r in results:
        cls = probes.get(r["probe"])
        if cls is None or r["status"] != "ok" or not r["evidence"]:
            continue
        stored = ProbeResult(r["probe"], {}, matches=matches_of.get(r["id"], []), items=items_of.get(r["id"], []))
        pairs = cls.evidence_pairs(stored)
        if not pairs:
            continue
        for rel in r["evidence"]:
            path = store_dir / rel
            where = f"evidence file {rel} ({r['probe']}, step {r['step']})"
            if not path.is_file():
                limits.add("evidence-missing", f"{where} is missing: its samples are shown by ids and scores only")
                continue
            try:
                with Image.open(path) as img:
                    grid = img.convert("RGB")
            except Exception as e:  # any decoder error: the file is unusable, say so
                limits.add("evidence-unreadable", f"{where} cannot be read ({type(e).__name__}): ids and scores only")
                continue
            width, height = grid.size
            n_rows = height // (CELL + LABEL_H)
            chosen = sorted(pairs, key=lambda p: (p.rank, p.sample))[:n_rows]  # save_evidence_grid's order
            if width != 2 * CELL or height % (CELL + LABEL_H) or len(chosen) != n_rows:
                limits.add("evidence-layout", f"{where} is not an evidence grid of this memwatch: not cut into samples")
                continue
            cells = []
            for row, pair in enumerate(chosen):
                y = row * (CELL + LABEL_H) + LABEL_H
                cells.append((pair, grid.crop((0, y, CELL, y + CELL)), grid.crop((CELL, y, 2 * CELL, y + CELL)), row))
            wrong = [p.training_id for p, _, training, _ in cells if not _same_picture(training, refs, p.training_id)]
            if wrong:
                # A row shows another training image than the stored row names: never pair a sample with
                # the wrong training image in an audit; keep ids and scores only.
                limits.add(
                    "evidence-mismatch",
                    f"{where}: its rows do not match the stored results (e.g. {wrong[0]!r}): not cut into samples",
                )
                continue
            for pair, sample, training, row in cells:
                out[(r["id"], pair.sample)] = {
                    "image": png_uri(sample),
                    "training": png_uri(training),
                    "training_id": pair.training_id,
                    "source": f"{rel} row {row + 1}",
                }
            break
    return out


def _same_picture(cell: Any, refs: ReferenceFiles, item_id: str) -> bool:
    """Whether a grid's training cell shows reference image ``item_id`` (True when the file is not here).

    Both are reduced to :data:`CHECK_PX` squares (the file centre-cropped as the probes load it) and
    compared by mean absolute difference in 0-255 levels.
    """
    from PIL import Image

    from memwatch.data.images import resize_center_crop, to_rgb

    path, _ = refs.resolve(item_id)
    if path is None:
        return True
    try:
        with Image.open(path) as img:
            img.load()
            ref = resize_center_crop(to_rgb(img), cell.size[0])
    except Exception:  # unreadable: reported with the thumbnails; nothing to compare with
        return True
    a, b = (np.asarray(x.resize((CHECK_PX, CHECK_PX), Image.Resampling.BOX), dtype=np.float32) for x in (cell, ref))
    return float(np.abs(a - b).mean()) <= CHECK_TOLERANCE


def collect_evidence(
    curves: RunHistory,
    matches: Sequence[Mapping[str, Any]],
    identity_rows: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    crops: Mapping[tuple[int, int], Mapping[str, Any]],
    refs: ReferenceFiles,
    store_dir: Path,
    redact: bool,
    limits: Limits,
    risks: Sequence[ImageRisk],
) -> dict[str, Any]:
    samples = []
    for key, m in _positions(matches):
        if not any(m.get(f) for f in FLAGS):
            continue
        row = {"step": m["step"], "kind": m["kind"], "probe": m["probe"], "result_id": m["result_id"]}
        row.update({k: m.get(k) for k in MATCH_FIELDS})
        row.update({f: None if m.get(f) is None else bool(m[f]) for f in FLAGS})
        samples.append(_with_pixels(row, crops.get(key)))
    identity = _identities(_positions(identity_rows), crops)
    flagged = samples + identity["leaks"] + identity["interpolations"]
    missing_pixels = sum(1 for s in flagged if s["image"] is None)
    if missing_pixels and not redact:
        limits.add(
            "samples-without-pixels",
            f"{missing_pixels} of {len(flagged)} flagged samples have no pixels in this report: evidence grids keep "
            "only the evidence_top best-ranked samples of each probe (or were not found); they are listed with "
            "ids and scores",
        )
    faces = {r["identity_item"] for r in identity["leaks"] + identity["interpolations"] if r["identity_item"]}
    at_risk = _at_risk(risks, matches, crops)
    prompts = _prompts_at_risk(curves, matches, crops)
    wanted = sorted(
        {s["nn1"] for s in samples if s["nn1"]}
        | faces
        | {r["training_id"] for r in at_risk}
        | {r["copies_image"] for r in prompts if r["copies_image"]}
    )
    grid_cells: dict[str, str] = {}  # training cells of the grids: each image as the model saw it
    for crop in crops.values():
        grid_cells.setdefault(crop["training_id"], crop["training"])
    training = [_training_image(i, refs, grid_cells.get(i), redact, limits) for i in wanted]
    return {
        "samples": samples,
        "training_images": training,
        "first_seen": training_images(curves.seeds),
        "at_risk_images": at_risk,
        "at_risk_prompts": prompts,
        "identities": identity,
        "files": _evidence_files(results, store_dir, crops, redact, limits),
    }


def _at_risk(
    risks: Sequence[ImageRisk],
    matches: Sequence[Mapping[str, Any]],
    crops: Mapping[tuple[int, int], Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The training images most at risk (ranked by :mod:`memwatch.signals.image_risk`), each with the sample that
    came closest to it (its pixels when that sample is in an evidence grid)."""
    crop_of = {(int(m["step"]), m.get("sample")): crops.get(key) for key, m in _positions(matches)}
    return [_with_pixels(r.row(), crop_of.get((r.min_step, r.min_sample))) for r in risks[:AT_RISK_SHOWN]]


def _prompts_at_risk(
    curves: RunHistory, matches: Sequence[Mapping[str, Any]], crops: Mapping[tuple[int, int], Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """A text-to-image run's captions most at risk (:func:`memwatch.signals.image_risk.rank_prompts`), each with
    the training image its samples copy or approach and the closest sample's pixels; empty for other runs."""
    crop_of = {(int(m["step"]), m.get("sample")): crops.get(key) for key, m in _positions(matches)}
    ranked = rank_prompts(curves.seeds, threshold=curves.mem_ratio)[:AT_RISK_SHOWN]
    return [_with_pixels(r, crop_of.get((r["ratio_min_step"], r["ratio_min_sample"]))) for r in ranked]


def _with_pixels(row: dict[str, Any], crop: Mapping[str, Any] | None) -> dict[str, Any]:
    row["image"] = crop["image"] if crop else None
    row["image_source"] = crop["source"] if crop else None
    return row


def _training_image(
    item_id: str, refs: ReferenceFiles, grid_cell: str | None, redact: bool, limits: Limits
) -> dict[str, Any]:
    path, status = refs.resolve(item_id)
    entry: dict[str, Any] = {
        "id": item_id,
        "file_status": status,
        "file_sha256": None,
        "thumbnail": None,
        "thumbnail_source": None,
    }
    if path is not None:
        try:
            data = path.read_bytes() if isinstance(path, Path) else path.getvalue()
            entry["file_sha256"] = sha256_bytes(data)
            if not redact:
                entry["thumbnail"], entry["thumbnail_source"] = _thumbnail(data), "reference file"
        except Exception as e:  # unreadable or undecodable: report, do not fail
            entry["file_status"] = "unreadable"
            limits.add("reference-unreadable", f"training image {item_id!r} cannot be read ({type(e).__name__})")
    elif status != "no-reference-root":
        limits.add("reference-image-missing", f"training image {item_id!r} was not found under the reference root")
    if entry["thumbnail"] is None and grid_cell is not None and not redact:
        entry["thumbnail"], entry["thumbnail_source"] = grid_cell, "evidence grid"
    return entry


def _thumbnail(data: bytes) -> str:
    from PIL import Image

    from memwatch.data.images import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)
    if max(rgb.size) > THUMB_PX:
        rgb.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    return png_uri(rgb)


def _identities(
    rows: Sequence[tuple[tuple[int, int], Mapping[str, Any]]], crops: Mapping[tuple[int, int], Mapping[str, Any]]
) -> dict[str, Any]:
    """Leaked and blended identities from the identity probe's item rows (absent: empty lists)."""
    leak_keys = ("step", "kind", "sample", "seed", "identity", "identity_item", "similarity")
    blend_keys = (*leak_keys, "parent_a", "parent_b", "sim_a", "sim_b", "slerp_t", "slerp_similarity")
    leaks = [_with_pixels({k: r.get(k) for k in leak_keys}, crops.get(key)) for key, r in rows if r.get("leak")]
    blends = [
        _with_pixels({k: r.get(k) for k in blend_keys}, crops.get(key)) for key, r in rows if r.get("interpolation")
    ]
    first: dict[str, dict[str, Any]] = {}
    for r in leaks:
        name = str(r["identity"])
        f = first.setdefault(
            name, {"identity": name, "first_step": r["step"], "first_seeds": [], "leaks": 0, "max_similarity": None}
        )
        f["leaks"] += 1
        if r["step"] < f["first_step"]:
            f["first_step"], f["first_seeds"] = r["step"], []
        if r["step"] == f["first_step"] and r.get("seed") is not None and r["seed"] not in f["first_seeds"]:
            f["first_seeds"].append(r["seed"])
        sim = r.get("similarity")
        if sim is not None and (f["max_similarity"] is None or sim > f["max_similarity"]):
            f["max_similarity"] = sim
    first_seen = sorted(first.values(), key=lambda f: (f["first_step"], f["identity"]))
    for f in first_seen:
        f["first_seeds"].sort()
    return {"probed": bool(rows), "leaks": leaks, "interpolations": blends, "first_seen": first_seen}


def _evidence_files(
    results: Sequence[Mapping[str, Any]],
    store_dir: Path,
    crops: Mapping[tuple[int, int], Mapping[str, Any]],
    redact: bool,
    limits: Limits,
) -> list[dict[str, Any]]:
    """Every evidence file of every result; files not cut into samples are inlined whole (unredacted)."""
    cut = {c["source"].rsplit(" row ", 1)[0] for c in crops.values()}
    out = []
    for r in results:
        for rel in r["evidence"]:
            path = store_dir / rel
            entry = {"probe": r["probe"], "step": r["step"], "path": rel, "exists": path.is_file(), "sha256": None}
            entry["image"] = None
            if entry["exists"]:
                entry["sha256"] = sha256_file(path)
                if not redact and rel not in cut:
                    entry["image"] = _inline_file(path, rel, limits)
            else:
                where = f"evidence file {rel} ({r['probe']}, step {r['step']})"
                limits.add("evidence-missing", f"{where} is missing: its samples are shown by ids and scores only")
            out.append(entry)
    return out


def _inline_file(path: Path, rel: str, limits: Limits) -> str | None:
    if path.stat().st_size > MAX_INLINE_BYTES:
        limits.add("evidence-large", f"evidence file {rel} is over {MAX_INLINE_BYTES >> 20} MiB: listed, not inlined")
        return None
    data = path.read_bytes()
    mime = next((m for magic, m in IMAGE_TYPES.items() if data.startswith(magic)), None)
    return data_uri(data, mime) if mime else None
