"""Reference sets: the images a model may memorize (training data) or a holdout of non-members.

These forms are accepted, told apart by inspecting the path:

* a JSONL manifest file (``*.jsonl``): one object per line with ``path`` (relative to the
  manifest's folder, or absolute) and optional ``caption``, ``identity`` and ``id``;
* a diffusers ``imagefolder``: a folder with ``metadata.jsonl`` files (``file_name`` plus a
  ``text`` or ``caption`` column) beside the images;
* a plain image folder, searched recursively;
* images inside files (:mod:`memwatch.data.containers`), as the training scripts read them: a Hugging Face
  dataset by name from the local cache (``hf:NAME`` or ``hf:NAME:CONFIG``, split ``train``), a
  ``save_to_disk`` folder, parquet files, or webdataset tar shards (one file, or a folder of them, such as
  img2dataset writes: its ``.parquet`` files beside each ``.tar``, of the same name, are the shards'
  metadata, not images), with ``image_column`` / ``caption_column`` named like the scripts' flags. A
  folder that holds both loose images and containers is read whole: every image in it is a reference.

Every item gets a stable id (its path relative to the set's root, unless the manifest gives one; for
an image inside a file, that file's path and the image's name or row in it, e.g.
``shard-000.tar/0001.jpg`` or ``train.parquet/000017``) and the sha256 of its bytes; the set gets a
manifest hash over ``(id, sha256, caption, identity)``. Files, and images inside files, that cannot be
read or decoded are kept in :attr:`ReferenceSet.skipped` with the reason, counted and reported, never
dropped silently; an image used without its caption (unreadable) is named in
:attr:`ReferenceSet.caption_notes`. Names that are not UTF-8 become ids with their bytes escaped (``\\xff``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from memwatch.data.containers import safe_name, script_caption
from memwatch.data.file_hashes import FileHashCache
from memwatch.data.images import is_image_path, load_image
from memwatch.errors import MemwatchError
from memwatch.hashing import canonical_json, sha256_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
CAPTION_COLUMNS = ("text", "caption")  # diffusers' train_text_to_image default is "text"


@dataclass(frozen=True)
class ReferenceItem:
    """One image of a reference set.

    Attributes:
        path: the image file, or the file that holds it (a tar shard, a parquet or arrow file).
        locator: where in ``path`` the image is (:func:`memwatch.data.containers.read_member`); None for a file.
    """

    id: str
    path: Path
    sha256: str
    caption: str | None = None
    identity: str | None = None
    locator: tuple | None = None

    @property
    def source(self) -> Path | io.BytesIO:
        """What to decode: the file, or the image's bytes read from its container (fresh each time)."""
        if self.locator is None:
            return self.path
        from memwatch.data.containers import read_member

        return io.BytesIO(read_member(self.path, self.locator))


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
    #: files in the folder that are not images (a README, metadata.jsonl...): counted, not used
    not_images: int = 0
    #: ``(id, reason)`` of images used without their caption (it could not be read)
    caption_notes: list[tuple[str, str]] = field(default_factory=list)
    #: the image_column / caption_column settings it was read with (only those set)
    columns: dict[str, str] = field(default_factory=dict)

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
        name = safe_name(str(path))
        log.warning("skipping %s: %s", name, reason)
        self.skipped.append((name, reason))

    def summary(self) -> dict:
        """Counts and hash, for stores and reports."""
        return {
            "root": safe_name(str(self.root)),
            "n": len(self.items),
            "skipped": len(self.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped[:20]],
            "not_images": self.not_images,
            "captions_unreadable": len(self.caption_notes),
            "manifest_sha256": self.manifest_sha256,
            **({"columns": dict(self.columns)} if self.columns else {}),
        }

    def load(self, items: Sequence[ReferenceItem], resolution: int) -> tuple[torch.Tensor, list[ReferenceItem]]:
        """Decode ``items`` at ``resolution`` (the one normalisation rule of :mod:`memwatch.data.images`).

        An item that cannot be decoded now (a truncated file that passed the listing check, a file
        deleted since) is skipped, recorded in :attr:`skipped` with the reason and removed from
        :attr:`items`; the others are returned.

        Returns:
            ``(images, kept)``: float32 ``(len(kept), 3, resolution, resolution)`` in [0, 1] and the
            items decoded, in order.

        Example:
            >>> images, kept = refs.load(refs.items[:4], 32)  # doctest: +SKIP
        """
        import torch

        images, kept = [], []
        for it in items:
            try:
                images.append(load_image(it.source, resolution))
                kept.append(it)
            except Exception as e:  # decoding errors of any kind: the item is recorded as skipped
                self.skip(it.path, f"cannot decode image ({type(e).__name__}: {e})")
                self.items = [x for x in self.items if x.id != it.id]
        stacked = torch.stack(images) if images else torch.empty(0, 3, resolution, resolution)
        return stacked, kept


def load_reference_set(
    path: str | Path,
    *,
    what: str = "reference set",
    image_column: str | None = None,
    caption_column: str | None = None,
    hash_cache: bool = True,
) -> ReferenceSet:
    """Read a reference (or holdout) set from a folder, a JSONL manifest or files holding images.

    Args:
        path: an image folder, a diffusers imagefolder, a ``.jsonl`` manifest, ``hf:NAME[:CONFIG]`` (a
            Hugging Face dataset in the local cache), a ``save_to_disk`` folder, a parquet file, a tar
            shard, or a folder of parquet files or tar shards.
        what: how error messages name the set (e.g. ``"holdout set"``).
        image_column: the column holding images in a dataset, parquet file or shard (default ``image``;
            shards: any image suffix), as the training script's ``--image_column``.
        caption_column: the column holding captions (default ``text``, then ``caption``), as
            ``--caption_column``.
        hash_cache: take the sha256 of files unchanged since an earlier run (same size, modification
            time and inode) from :class:`memwatch.data.file_hashes.FileHashCache` instead of reading them.

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
    from memwatch.data.containers import is_container

    if str(path).startswith(HF_PREFIX):
        root = Path(str(path))
        refs = ReferenceSet(root=root, items=[])
        files, files_root = _hub_dataset_files(str(path)[len(HF_PREFIX) :], what)
        entries = _read_containers(files, files_root, refs, image_column, caption_column)
        base = root
    else:
        root = Path(path)
        if not root.exists():
            raise MemwatchError(f"{what} {root} does not exist: pass an image folder or a .jsonl manifest")
        refs = ReferenceSet(root=root, items=[])
        saved = _saved_dataset_files(root) if root.is_dir() else None
        if saved is not None:
            entries = _read_containers(saved, root, refs, image_column, caption_column)
        elif root.is_dir():
            entries = _read_folder(root, refs, image_column, caption_column)
        elif root.suffix.lower() == ".jsonl":
            entries = _read_manifest(root)
        elif is_container(root):
            entries = _read_containers([root], root.parent, refs, image_column, caption_column)
        else:
            raise MemwatchError(
                f"{what} {root} is a file but not a .jsonl manifest, a parquet file or a tar shard: pass a folder or "
                "one of those"
            )
        base = root if root.is_dir() else root.parent
    refs.columns = {k: v for k, v in (("image_column", image_column), ("caption_column", caption_column)) if v}
    seen: dict[str, Path] = {}
    hashes = FileHashCache() if hash_cache else None
    known = hashes.lookup(e["path"] for e in entries if "data" not in e) if hashes else {}
    hashed: dict[Path, str] = {}
    for entry in entries:
        p = entry["path"]
        if "data" not in entry and p in known:
            sha = known[p]  # unchanged since it was hashed and checked: not read again
        else:
            try:
                data = entry["data"] if "data" in entry else p.read_bytes()
                _check_decodable(io.BytesIO(data) if "data" in entry else p)
            except Exception as e:  # any reader error means the file is unusable: record it
                refs.skip(entry.get("id") or p, f"cannot decode image ({type(e).__name__}: {e})")
                continue
            sha = sha256_bytes(data)
            if "data" not in entry:
                hashed[p] = sha
        item_id = safe_name(entry.get("id") or (p.relative_to(base).as_posix() if _is_under(p, base) else str(p)))
        if item_id in seen:
            raise MemwatchError(
                f"{what} {root}: id {item_id!r} is used by both {seen[item_id]} and {p}; ids must be unique"
            )
        seen[item_id] = p
        refs.items.append(
            ReferenceItem(
                id=item_id,
                path=p,
                sha256=sha,
                caption=entry.get("caption"),
                identity=entry.get("identity"),
                locator=entry.get("locator"),
            )
        )
    if hashes:
        hashes.remember(hashed)
        hashes.close()
    refs.items.sort(key=lambda it: it.id)
    if not refs.items:
        detail = f"; {len(refs.skipped)} file(s) could not be decoded" if refs.skipped else ""
        raise MemwatchError(
            f"{what} {root} has no usable image (png, jpg, webp, bmp, gif, tiff...){detail}: "
            "point it at a folder of training images or a .jsonl manifest"
        )
    return refs


def _is_under(p: Path, base: Path) -> bool:
    try:
        p.relative_to(base)
        return True
    except ValueError:
        return False


def _check_decodable(p: Path | io.BytesIO) -> None:
    """Cheap structural check (header and chunk checksums) without decoding every pixel."""
    with Image.open(p) as img:
        img.verify()


def _read_folder(root: Path, refs: ReferenceSet, image_column: str | None, caption_column: str | None) -> list[dict]:
    """Image files under ``root`` (recursive, sorted, symbolic links followed once), with captions from any
    ``metadata.jsonl``; or, in a folder with no loose image, the images inside its parquet files or tar
    shards. Dangling links and link loops are recorded in ``refs.skipped``; other files are counted in
    ``refs.not_images``."""
    from memwatch.data.containers import is_container

    meta: dict[Path, dict] = {}
    files, metadata = _walk(root, refs)
    containers = _image_containers([p for p in files if is_container(p)])
    entries = _read_containers(containers, root, refs, image_column, caption_column) if containers else []
    files = [p for p in files if not is_container(p) or p not in containers]
    for mfile in metadata:
        for row in _jsonl_rows(mfile):
            name = row.get("file_name")
            if not isinstance(name, str):
                raise MemwatchError(f"{mfile}: every line needs a 'file_name' (diffusers imagefolder format)")
            caption = next((script_caption(row[c]) for c in CAPTION_COLUMNS if script_caption(row.get(c))), None)
            meta[(mfile.parent / name).resolve()] = {"caption": caption, "identity": row.get("identity")}
    for p in files:
        if is_image_path(p):
            extra = meta.get(p.resolve(), {})
            entries.append({"path": p, **{k: v for k, v in extra.items() if v is not None}})
        else:
            refs.not_images += 1
    if not containers:
        return entries
    refs.not_images += len(metadata)
    return entries


def _image_containers(containers: list[Path]) -> list[Path]:
    """The containers that hold images: beside tar shards, a table named like a shard (img2dataset's
    ``00000.parquet`` beside ``00000.tar``) is that shard's metadata, not images."""
    shards = {p.with_suffix("") for p in containers if p.suffix.lower() == ".tar"}
    return [p for p in containers if p.suffix.lower() == ".tar" or p.with_suffix("") not in shards]


def _walk(root: Path, refs: ReferenceSet) -> tuple[list[Path], list[Path]]:
    """Every regular file under ``root`` (sorted) and the ``metadata.jsonl`` files among them."""
    files: list[Path] = []
    visited: set[tuple[int, int]] = set()

    def walk(folder: Path) -> None:
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            refs.skip(folder, f"cannot list folder ({e.strerror or e})")
            return
        if (st.st_dev, st.st_ino) in visited:
            refs.skip(folder, "symbolic link loop: this folder was already read")
            return
        visited.add((st.st_dev, st.st_ino))
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():  # follows symbolic links, like the diffusers loaders
                    walk(path)
                elif entry.is_file():
                    files.append(path)
                elif entry.is_symlink():
                    refs.skip(path, f"dangling symbolic link (to {os.readlink(path)})")
            except OSError as e:  # e.g. ELOOP on a link that points at itself
                refs.skip(path, f"cannot read ({e.strerror or e})")

    walk(root)
    files.sort()
    return [p for p in files if p.name != METADATA_NAME], [p for p in files if p.name == METADATA_NAME]


HF_PREFIX = "hf:"


def _read_containers(
    files: list[Path], base: Path | None, refs: ReferenceSet, image_column: str | None, caption_column: str | None
) -> list[dict]:
    """Entries for the images inside container files; ids are ``<file relative to base>/<member>``."""
    from memwatch.data.containers import ColumnError, list_members

    entries = []
    for f in files:
        prefix = safe_name(f.relative_to(base).as_posix() if base is not None and _is_under(f, base) else f.name)
        try:
            listing = list_members(f, image_column, caption_column)
        except ColumnError:
            raise  # a wrong column name is a setting to fix, not a file to skip
        except MemwatchError as e:
            refs.skip(f, str(e))
            continue
        for name, reason in listing.skipped:
            refs.skip(f"{prefix}/{name}", reason)
        for name, reason in listing.notes:
            log.warning("%s/%s: %s", prefix, name, reason)
            refs.caption_notes.append((f"{prefix}/{name}", reason))
        for m in listing.members:
            entry: dict = {"path": f, "id": f"{prefix}/{m.name}", "data": m.data, "locator": m.locator}
            if m.caption is not None:
                entry["caption"] = m.caption
            entries.append(entry)
    return entries


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The arrow files of a ``datasets`` ``save_to_disk`` folder (a DatasetDict: its ``train`` split), or
    None if the folder is not one."""
    if (folder / "dataset_dict.json").is_file():
        splits = _json_file(folder / "dataset_dict.json").get("splits", [])
        if "train" not in splits:
            raise MemwatchError(
                f"{folder}: a DatasetDict without a 'train' split (splits: {splits}): pass a split folder"
            )
        folder = folder / "train"
    state = folder / "state.json"
    if not state.is_file() or not (folder / "dataset_info.json").is_file():
        return None
    files = _json_file(state).get("_data_files", [])
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files
    ):
        raise MemwatchError(f"{state}: '_data_files' is not a list of files: the folder is not a whole save_to_disk")
    return [folder / f["filename"] for f in files]


def _json_file(path: Path) -> dict:
    """A ``datasets`` folder's JSON file as a dict, or one line naming it when it is damaged."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, cut off
        raise MemwatchError(
            f"{path} cannot be read as JSON ({type(e).__name__}: {str(e).splitlines()[0]}): the dataset folder is "
            "damaged; save it again with save_to_disk"
        ) from None
    if not isinstance(doc, dict):
        raise MemwatchError(f"{path} is not a JSON object: the dataset folder is damaged; save it again")
    return doc


def _hub_dataset_files(spec: str, what: str) -> tuple[list[Path], Path | None]:
    """The files of a Hugging Face dataset ``NAME[:CONFIG]`` (split ``train``) already on this machine, and
    the folder ids are relative to; nothing is downloaded.

    First the datasets cache (what a training script's ``load_dataset(--dataset_name)`` prepared: arrow
    files), then the hub cache (a downloaded snapshot of the dataset repository: its parquet files, tar
    shards or arrow files, the ``train`` ones when files are named by split).
    """
    name, _, config = spec.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise MemwatchError(
            f"{what} hf:{spec} needs the datasets package ({e}): pip install 'memwatch[data]'"
        ) from None
    datasets.config.HF_HUB_OFFLINE = True  # the local caches only
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
        return [Path(f["filename"]) for f in ds.cache_files], None
    except Exception as e:
        prepared_error = f"{type(e).__name__}: {e}"
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(name, repo_type="dataset", local_files_only=True))
    except Exception:
        raise MemwatchError(
            f"{what} hf:{spec} is not in the local Hugging Face caches ({prepared_error}); download it where there "
            "is a network (datasets.load_dataset), or pass a save_to_disk folder"
        ) from None
    from memwatch.data.containers import is_container

    folder = root / config if config and (root / config).is_dir() else root
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_container(p))
    train = [p for p in files if "train" in p.relative_to(root).as_posix()]
    if not (train or files):
        raise MemwatchError(f"{what} hf:{spec}: its snapshot {folder} holds no parquet, arrow or tar files")
    return train or files, root


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MemwatchError(f"{path}: not UTF-8 text (byte {e.start}): save the manifest as UTF-8 JSON lines") from None
    except OSError as e:
        raise MemwatchError(f"{path}: cannot read ({e.strerror}): check the path and its permissions") from None
    for n, line in enumerate(text.splitlines(), start=1):
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
