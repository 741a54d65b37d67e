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
    >>> [(m.name, m.caption) for m in list_members(shard)]
    [('0001.png', 'a red square')]
    >>> read_member(shard, list_members(shard)[0].locator) == png_bytes.getvalue()
    True
"""

from __future__ import annotations

import functools
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
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


def is_container(path: Path) -> bool:
    """True for a file whose members are images (``.tar``, ``.parquet``, ``.arrow``)."""
    return path.suffix.lower() in CONTAINER_SUFFIXES


def list_members(path: Path, image_column: str | None = None, caption_column: str | None = None) -> list[Member]:
    """Every image of one container file, in the container's order.

    Args:
        path: a ``.tar`` shard, a ``.parquet`` file or an ``.arrow`` file.
        image_column: the table column (or tar suffix) holding images; default ``image`` (tars: any image suffix).
        caption_column: the column (or tar suffix) holding captions; default ``text``, then ``caption``.

    Raises:
        MemwatchError: the file cannot be read, or a table has no such image column.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".tar":
            return list(_tar_members(path, image_column, caption_column))
        return list(_table_members(path, image_column or DEFAULT_IMAGE_COLUMN, caption_column))
    except MemwatchError:
        raise
    except (OSError, tarfile.TarError) as e:
        raise MemwatchError(f"{path}: cannot read ({e}): check the file") from None
    except Exception as e:  # pyarrow's errors for a damaged file: name the file
        raise MemwatchError(f"{path}: cannot read ({type(e).__name__}: {e}): check the file") from None


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


def _tar_members(path: Path, image_column: str | None, caption_column: str | None) -> Iterator[Member]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    with tarfile.open(path, "r:") as tar:  # uncompressed: members are read back by seeking to them
        for info in tar:
            if not info.isfile():
                continue
            folder, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            if key not in groups:
                groups[key] = {}
                order.append(key)
            groups[key][ext.lower()] = info
        with open(path, "rb") as f:
            for key in order:
                members = groups[key]
                image = _pick_image(members, image_column)
                if image is None:
                    continue
                f.seek(image.offset_data)
                data = f.read(image.size)
                yield Member(
                    image.name, data, _tar_caption(tar, members, caption_column), ("tar", image.offset_data, image.size)
                )


def _pick_image(members: dict[str, tarfile.TarInfo], image_column: str | None) -> tarfile.TarInfo | None:
    if image_column and image_column.lower() in members:
        return members[image_column.lower()]
    return next((info for ext, info in members.items() if f".{ext.rsplit('.', 1)[-1]}" in IMAGE_SUFFIXES), None)


def _tar_caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], caption_column: str | None) -> str | None:
    for ext in ([caption_column.lower()] if caption_column else []) + ["txt"]:
        if ext in members and ext != "json":
            f = tar.extractfile(members[ext])
            return f.read().decode("utf-8", errors="replace").strip() if f else None
    if "json" in members:
        f = tar.extractfile(members["json"])
        try:
            meta = json.loads(f.read()) if f else {}
        except json.JSONDecodeError:
            return None
        for column in ([caption_column] if caption_column else []) + list(CAPTION_FALLBACKS):
            if isinstance(meta, dict) and isinstance(meta.get(column), str):
                return meta[column]
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


def _table_members(path: Path, image_column: str, caption_column: str | None) -> Iterator[Member]:
    pyarrow()
    if path.suffix.lower() == ".parquet":
        pf = _parquet_file(str(path))
        names = pf.schema_arrow.names
        caption = _caption_column(names, caption_column, path)
        _check_column(image_column, names, path)
        row0 = 0
        for group in range(pf.num_row_groups):
            table = pf.read_row_group(group, columns=[image_column] + ([caption] if caption else []))
            for row, value in enumerate(table.column(image_column).to_pylist()):
                text = table.column(caption)[row].as_py() if caption else None
                yield Member(
                    f"{row0 + row:06d}", _image_bytes(value, path), text, ("parquet", group, row, image_column)
                )
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
            yield Member(f"{row:06d}", _image_bytes(value, path), text, ("arrow", row, image_column))


def _check_column(column: str, names: list[str], path: Path) -> None:
    if column not in names:
        raise MemwatchError(
            f"{path}: no image column {column!r} (columns: {', '.join(names)}): set image_column "
            "(--image-column), as the training script's --image_column"
        )


def _caption_column(names: list[str], caption_column: str | None, path: Path) -> str | None:
    if caption_column:
        if caption_column not in names:
            raise MemwatchError(
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
    raise ValueError(f"an empty image cell in {path}")


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
