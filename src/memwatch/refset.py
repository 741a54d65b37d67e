"""Reference sets: the images a model may memorize (training data) or a holdout of non-members.

Three forms are accepted, told apart by inspecting the path:

* a JSONL manifest file (``*.jsonl``): one object per line with ``path`` (relative to the
  manifest's folder, or absolute) and optional ``caption``, ``identity`` and ``id``;
* a diffusers ``imagefolder``: a folder with ``metadata.jsonl`` files (``file_name`` plus a
  ``text`` or ``caption`` column) beside the images;
* a plain image folder, searched recursively.

Every item gets a stable id (its path relative to the set's root, unless the manifest gives one)
and the sha256 of its file bytes; the set gets a manifest hash over ``(id, sha256, caption,
identity)``. Files that cannot be read or decoded are kept in :attr:`ReferenceSet.skipped` with the
reason, counted and reported, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from memwatch.errors import MemwatchError
from memwatch.hashing import canonical_json, sha256_bytes
from memwatch.images import is_image_path

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption")  # diffusers' train_text_to_image default is "text"


@dataclass(frozen=True)
class ReferenceItem:
    """One image of a reference set."""

    id: str
    path: Path
    sha256: str
    caption: str | None = None
    identity: str | None = None


@dataclass
class ReferenceSet:
    """An ordered, hashed collection of images.

    Attributes:
        root: the folder or manifest the set was read from.
        items: usable items, in a stable order (sorted by id).
        skipped: ``(path, reason)`` for every file that could not be used.
    """

    root: Path
    items: list[ReferenceItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]

    @property
    def manifest_sha256(self) -> str:
        """sha256 over the canonical JSON of ``(id, sha256, caption, identity)`` of every item."""
        rows = [[it.id, it.sha256, it.caption, it.identity] for it in self.items]
        return sha256_bytes(canonical_json(rows).encode())

    def skip(self, path: str | Path, reason: str) -> None:
        """Record an unusable file (logged as a warning, and reported by every front-end)."""
        log.warning("skipping %s: %s", path, reason)
        self.skipped.append((str(path), reason))

    def summary(self) -> dict:
        """Counts and hash, for stores and reports."""
        return {
            "root": str(self.root),
            "n": len(self.items),
            "skipped": len(self.skipped),
            "manifest_sha256": self.manifest_sha256,
        }


def load_reference_set(path: str | Path, *, what: str = "reference set") -> ReferenceSet:
    """Read a reference (or holdout) set from a folder or a JSONL manifest.

    Args:
        path: an image folder, a diffusers imagefolder, or a ``.jsonl`` manifest.
        what: how error messages name the set (e.g. ``"holdout set"``).

    Returns:
        A :class:`ReferenceSet` with at least one usable item.

    Raises:
        MemwatchError: the path does not exist, a manifest line is malformed, ids repeat, or no
            usable image was found.

    Example:
        >>> refs = load_reference_set("assets/demo/train")  # doctest: +SKIP
        >>> len(refs), refs.manifest_sha256[:8]  # doctest: +SKIP
        (16, '3fa2c1d0')
    """
    root = Path(path)
    if not root.exists():
        raise MemwatchError(f"{what} {root} does not exist: pass an image folder or a .jsonl manifest")
    if root.is_file():
        if root.suffix.lower() != ".jsonl":
            raise MemwatchError(f"{what} {root} is a file but not a .jsonl manifest: pass a folder or a .jsonl")
        entries = _read_manifest(root)
        base = root.parent
    else:
        entries = _read_folder(root)
        base = root
    refs = ReferenceSet(root=root, items=[])
    seen: dict[str, Path] = {}
    for entry in entries:
        p = entry["path"]
        try:
            data = p.read_bytes()
            _check_decodable(p)
        except Exception as e:  # any reader error means the file is unusable: record it
            refs.skip(p, f"cannot decode image ({type(e).__name__}: {e})")
            continue
        item_id = entry.get("id") or (p.relative_to(base).as_posix() if _is_under(p, base) else str(p))
        if item_id in seen:
            raise MemwatchError(
                f"{what} {root}: id {item_id!r} is used by both {seen[item_id]} and {p}; ids must be unique"
            )
        seen[item_id] = p
        refs.items.append(
            ReferenceItem(
                id=item_id,
                path=p,
                sha256=sha256_bytes(data),
                caption=entry.get("caption"),
                identity=entry.get("identity"),
            )
        )
    refs.items.sort(key=lambda it: it.id)
    if not refs.items:
        detail = f"; {len(refs.skipped)} file(s) could not be decoded" if refs.skipped else ""
        raise MemwatchError(
            f"{what} {root} has no usable image (png, jpg, jpeg, webp, bmp){detail}: "
            "point it at a folder of training images or a .jsonl manifest"
        )
    return refs


def _is_under(p: Path, base: Path) -> bool:
    try:
        p.relative_to(base)
        return True
    except ValueError:
        return False


def _check_decodable(p: Path) -> None:
    """Cheap structural check (header and chunk checksums) without decoding every pixel."""
    with Image.open(p) as img:
        img.verify()


def _read_folder(root: Path) -> list[dict]:
    """Image files under ``root`` (recursive, sorted), with captions from any ``metadata.jsonl``."""
    meta: dict[Path, dict] = {}
    for mfile in sorted(root.rglob(METADATA_NAME)):
        for row in _jsonl_rows(mfile):
            name = row.get("file_name")
            if not isinstance(name, str):
                raise MemwatchError(f"{mfile}: every line needs a 'file_name' (diffusers imagefolder format)")
            caption = next((row[c] for c in CAPTION_COLUMNS if isinstance(row.get(c), str)), None)
            meta[(mfile.parent / name).resolve()] = {"caption": caption, "identity": row.get("identity")}
    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and is_image_path(p):
            extra = meta.get(p.resolve(), {})
            entries.append({"path": p, **{k: v for k, v in extra.items() if v is not None}})
    return entries


def _read_manifest(manifest: Path) -> list[dict]:
    entries = []
    for row in _jsonl_rows(manifest):
        if not isinstance(row.get("path"), str):
            raise MemwatchError(f"{manifest}: every line needs a 'path' string (line {row['_line']})")
        p = Path(row["path"])
        entry: dict = {"path": p if p.is_absolute() else manifest.parent / p}
        for key in ("caption", "identity", "id"):
            if row.get(key) is not None:
                entry[key] = str(row[key])
        entries.append(entry)
    return entries


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MemwatchError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise MemwatchError(f"{path}:{n}: each line must be a JSON object")
        row["_line"] = n
        rows.append(row)
    return rows
