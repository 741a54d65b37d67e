"""Training images stored inside files: webdataset tar shards, parquet files and Hugging Face datasets.

The diffusers training scripts read ``--dataset_name`` (a Hugging Face dataset: arrow files in the
local cache, or a ``save_to_disk`` folder) with ``--image_column`` / ``--caption_column``; large image
sets live in parquet files or in webdataset tar shards (img2dataset's output). Each image is then a
*member* of a container file. This module lists the members once (their bytes are hashed like a
file's) and reads one back later by its *locator*, without extracting anything:

* tar shard: members are grouped by key (the name up to the first dot of its base name, the webdataset
  convention); a key's image is its member with an image suffix (or the suffix named by the image
  column), its caption the ``.txt`` member (or the caption column's suffix), else a ``.json`` member's
  ``caption``/``text`` field. Locator: ``("tar", data offset, size)``; reading is one seek.
* parquet file / arrow file (a ``save_to_disk`` folder or the datasets cache): the image column holds
  ``{"bytes", "path"}`` structs (the ``datasets.Image`` feature), raw bytes, or file paths; the
  caption column holds strings. Locator: ``("parquet", row group, row in group)`` or
  ``("arrow", row)``.

One bad item never costs its file: an empty image cell, a member cut off by a truncated shard, a caption
that is not UTF-8 JSON are each named in :attr:`Listing.skipped` (the image is not used) or
:attr:`Listing.notes` (the image is used, its caption is not), and the rest of the file is read. Samples are
grouped as webdataset groups them: consecutive members with the same key, a repeated suffix starting a new
sample, so two images under one key are two samples (the second named ``<name>#2``). Names that are not
UTF-8 are kept with their bytes escaped (``\\xff``), so they can be stored and shown.

Example:
    >>> import io, tarfile, tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> shard = Path(tempfile.mkdtemp()) / "shard-000.tar"
    >>> with tarfile.open(shard, "w") as tar:
    ...     for name, data in [("0001.png", png_bytes := io.BytesIO()), ("0001.txt", io.BytesIO(b"a red square"))]:
    ...         if name.endswith(".png"):
    ...             Image.new("RGB", (4, 4), (255, 0, 0)).save(data, format="PNG")
    ...         info = tarfile.TarInfo(name)
    ...         info.size = len(data.getvalue())
    ...         tar.addfile(info, io.BytesIO(data.getvalue()))
    >>> [(m.name, m.caption) for m in list_members(shard).members]
    [('0001.png', 'a red square')]
    >>> read_member(shard, list_members(shard).members[0].locator) == png_bytes.getvalue()
    True
"""

from __future__ import annotations

import functools
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwatch.data.images import IMAGE_SUFFIXES
from memwatch.errors import MemwatchError

#: file suffixes that hold images as members
CONTAINER_SUFFIXES = (".tar", ".parquet", ".arrow")
#: the diffusers scripts' defaults: ``--image_column image``, ``--caption_column text``
DEFAULT_IMAGE_COLUMN = "image"
CAPTION_FALLBACKS = ("text", "caption")
#: rows read at a time while listing a table (memory: this many images' bytes)
BATCH_ROWS = 256


@dataclass(frozen=True)
class Member:
    """One image inside a container file.

    Attributes:
        name: its name within the container (tar: the member's name; tables: the row, 6 digits).
        data: its bytes (hashed by the caller; not kept).
        caption: its caption, if the container has one.
        locator: how :func:`read_member` finds it again.
    """

    name: str
    data: bytes
    caption: str | None
    locator: tuple


@dataclass
class Listing:
    """What one container file holds.

    Attributes:
        members: the images, in the container's order.
        skipped: ``(name, reason)`` of every item whose image could not be read (not used).
        notes: ``(name, reason)`` of items used without something (a caption that could not be read).
    """

    members: list[Member] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


class ColumnError(MemwatchError):
    """A table has no column of the name the settings give: a setting to fix, not a file to skip."""


def safe_name(name: str) -> str:
    """``name`` with bytes that are not UTF-8 (read as surrogate escapes) written as ``\\xNN``.

    Example:
        >>> safe_name(b"caf\\xe9.png".decode("utf-8", "surrogateescape"))
        'caf\\\\xe9.png'
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_container(path: Path) -> bool:
    """True for a file whose members are images (``.tar``, ``.parquet``, ``.arrow``)."""
    return path.suffix.lower() in CONTAINER_SUFFIXES


def list_members(path: Path, image_column: str | None = None, caption_column: str | None = None) -> Listing:
    """Every image of one container file, in the container's order, and what could not be read in it.

    Args:
        path: a ``.tar`` shard, a ``.parquet`` file or an ``.arrow`` file.
        image_column: the table column (or tar suffix) holding images; default ``image`` (tars: any image suffix).
        caption_column: the column (or tar suffix) holding captions; default ``text``, then ``caption``.

    Raises:
        ColumnError: a table has no such image (or caption) column.
        MemwatchError: the file as a whole cannot be read (empty, not a container, unreadable).
    """
    suffix = path.suffix.lower()
    listing = Listing()
    try:
        if path.stat().st_size == 0:
            raise MemwatchError(f"{path}: an empty file (0 bytes), not a {suffix[1:]} file")
        if suffix == ".tar":
            _tar_members(path, image_column, caption_column, listing)
        else:
            _table_members(path, image_column or DEFAULT_IMAGE_COLUMN, caption_column, listing)
    except MemwatchError:
        raise
    except (OSError, tarfile.TarError) as e:
        raise MemwatchError(f"{path}: cannot read ({e}): check the file") from None
    except Exception as e:  # pyarrow's errors for a damaged file: name the file
        raise MemwatchError(f"{path}: cannot read ({type(e).__name__}: {e}): check the file") from None
    return listing


def read_member(path: Path, locator: tuple) -> bytes:
    """The bytes of the member at ``locator`` in ``path`` (see :class:`Member`)."""
    kind = locator[0]
    if kind == "tar":
        _, offset, size = locator
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    if kind == "arrow":
        return _image_bytes(_arrow_table(str(path)).column(locator[2])[locator[1]].as_py(), path)
    if kind == "parquet":
        _, group, row, column = locator
        return _image_bytes(_parquet_group(str(path), group, column).column(0)[row].as_py(), path)
    raise ValueError(f"unknown locator {locator!r}")


# ---------------------------------------------------------------------------------------------- tar


def _tar_members(path: Path, image_column: str | None, caption_column: str | None, listing: Listing) -> None:
    samples: list[dict[str, tarfile.TarInfo]] = []
    keys: list[str] = []
    damaged = None
    # names as bytes that are not UTF-8 come back as surrogate escapes, written out by safe_name()
    with tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape") as tar:  # read back by seeking
        while True:
            try:
                info = tar.next()
            except tarfile.TarError as e:  # a shard cut off or damaged: what came before it is still good
                if not samples:
                    raise
                damaged = str(e)
                break
            if info is None:
                break
            if not info.isfile():
                continue
            folder, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key, ext = (f"{folder}/{stem}" if folder else stem), ext.lower()
            # webdataset's grouping: a new sample when the key changes or a suffix repeats within one
            if not samples or keys[-1] != key or ext in samples[-1]:
                samples.append({})
                keys.append(key)
            samples[-1][ext] = info
        size = path.stat().st_size
        seen: dict[str, int] = {}
        with open(path, "rb") as f:
            for members in samples:
                image = _pick_image(members, image_column)
                if image is None:
                    continue
                name = safe_name(image.name)
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    name = f"{name}#{seen[name]}"  # a second sample under the same name: both were trained on
                if image.offset_data + image.size > size:
                    listing.skipped.append((name, "cut off: the shard ends inside this member"))
                    damaged = None  # said
                    continue
                f.seek(image.offset_data)
                data = f.read(image.size)
                caption = _tar_caption(tar, members, caption_column, name, listing)
                listing.members.append(Member(name, data, caption, ("tar", image.offset_data, image.size)))
        if damaged is not None:
            listing.skipped.append((f"after {safe_name(keys[-1])}", f"the shard ends in a damaged member ({damaged})"))


def _pick_image(members: dict[str, tarfile.TarInfo], image_column: str | None) -> tarfile.TarInfo | None:
    if image_column and image_column.lower() in members:
        return members[image_column.lower()]
    return next((info for ext, info in members.items() if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES), None)


def _tar_caption(
    tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], caption_column: str | None, name: str, listing: Listing
) -> str | None:
    """A sample's caption: the caption suffix's text, else a ``.json`` member's caption field; a caption that
    cannot be read is noted, and the image is used without it."""
    try:
        for ext in ([caption_column.lower()] if caption_column else []) + ["txt"]:
            if ext in members and ext != "json":
                f = tar.extractfile(members[ext])
                return f.read().decode("utf-8", errors="replace").strip() if f else None
        if "json" in members:
            f = tar.extractfile(members["json"])
            meta = json.loads(f.read().decode("utf-8")) if f else {}
            for column in ([caption_column] if caption_column else []) + list(CAPTION_FALLBACKS):
                if isinstance(meta, dict) and isinstance(meta.get(column), str):
                    return meta[column]
    except (ValueError, OSError, tarfile.TarError) as e:  # not UTF-8, not JSON, cut off
        listing.notes.append((name, f"caption not read ({type(e).__name__}: {str(e).splitlines()[0][:80]})"))
    return None


# ------------------------------------------------------------------------------------------- tables


def pyarrow() -> Any:
    """pyarrow, or a one-line error naming the extra that brings it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise MemwatchError(
            f"reading parquet and arrow files needs pyarrow ({e}): pip install 'memwatch[data]'"
        ) from None
    return pyarrow


def _table_members(path: Path, image_column: str, caption_column: str | None, listing: Listing) -> None:
    pyarrow()
    if path.suffix.lower() == ".parquet":
        pf = _parquet_file(str(path))
        names = pf.schema_arrow.names
        caption = _caption_column(names, caption_column, path)
        _check_column(image_column, names, path)
        row0 = 0
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[image_column] + ([caption] if caption else []))
            texts = table.column(caption).to_pylist() if caption else [None] * table.num_rows
            for row, (value, text) in enumerate(zip(table.column(image_column).to_pylist(), texts, strict=True)):
                _add_row(listing, f"{row0 + row:06d}", value, text, path, ("parquet", group, row, image_column))
            row0 += table.num_rows
        return
    table = _arrow_table(str(path))
    names = table.schema.names
    _check_column(image_column, names, path)
    caption = _caption_column(names, caption_column, path)
    images = table.column(image_column)
    texts = table.column(caption) if caption else None
    for start in range(0, table.num_rows, BATCH_ROWS):
        values = images.slice(start, BATCH_ROWS).to_pylist()
        captions = texts.slice(start, BATCH_ROWS).to_pylist() if texts is not None else [None] * len(values)
        for k, (value, text) in enumerate(zip(values, captions, strict=True)):
            row = start + k
            _add_row(listing, f"{row:06d}", value, text, path, ("arrow", row, image_column))


def _add_row(listing: Listing, name: str, value: Any, text: Any, path: Path, locator: tuple) -> None:
    """One table row: its image (or why it is skipped) and its caption (a non-string caption is noted)."""
    try:
        data = _image_bytes(value, path)
    except (ValueError, OSError) as e:
        listing.skipped.append((name, f"no image in this row ({e})"))
        return
    caption = script_caption(text)
    if text is not None and caption is None:
        listing.notes.append((name, f"caption is a {type(text).__name__}, not text: not used"))
    listing.members.append(Member(name, data, caption, locator))


def script_caption(value: Any) -> str | None:
    """The caption a diffusers training script reads from a caption cell outside training: a string, or the
    first of a list of strings (the scripts train on a random one of the list each time they read the row, and
    validate with the first); None for anything else.

    Example:
        >>> script_caption("a cat"), script_caption(["a cat", "a cat, photo"]), script_caption(3)
        ('a cat', 'a cat', None)
    """
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[0]
    return None


def _check_column(column: str, names: list[str], path: Path) -> None:
    if column not in names:
        raise ColumnError(
            f"{path}: no image column {column!r} (columns: {', '.join(names)}): set image_column "
            "(--image-column), as the training script's --image_column"
        )


def _caption_column(names: list[str], caption_column: str | None, path: Path) -> str | None:
    if caption_column:
        if caption_column not in names:
            raise ColumnError(
                f"{path}: no caption column {caption_column!r} (columns: {', '.join(names)}): set caption_column "
                "(--caption-column), as the training script's --caption_column"
            )
        return caption_column
    return next((c for c in CAPTION_FALLBACKS if c in names), None)


def _image_bytes(value: Any, path: Path) -> bytes:
    """The bytes of one image cell: a ``{"bytes", "path"}`` struct, raw bytes, or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        p = Path(value)
        return (p if p.is_absolute() else path.parent / p).read_bytes()
    raise ValueError(
        "an empty image cell" if value in (None, b"", "") else f"an image cell of type {type(value).__name__}"
    )


@functools.lru_cache(maxsize=8)
def _arrow_table(path: str) -> Any:
    """An arrow file, memory-mapped (the datasets library writes the IPC stream format)."""
    pa = pyarrow()

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


@functools.lru_cache(maxsize=8)
def _parquet_file(path: str) -> Any:
    return pyarrow().parquet.ParquetFile(path)


@functools.lru_cache(maxsize=4)
def _parquet_group(path: str, group: int, column: str) -> Any:
    return _parquet_file(path).read_row_group(group, columns=[column])
