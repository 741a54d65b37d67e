"""A copy of a training folder without the images at risk: the intervention for scripts memwatch does not run.

An unmodified diffusers example script reads its images from ``--train_data_dir`` and resumes with
``--resume_from_checkpoint``; memwatch cannot reach into its loop. What it can do is hand the script a
training folder without the images it named at risk, and name the checkpoint to resume from
(``memwatch exclude``). The new folder mirrors the old one file for file (hard links where the file system
allows, copies otherwise, so it costs no space and the originals are never touched), except:

* the images left out, with their caption side files (``<stem>.txt``, ``<stem>.caption``);
* the rows of a ``metadata.jsonl`` or ``metadata.csv`` (the Hugging Face ``imagefolder`` layout the
  diffusers scripts read) whose ``file_name`` is an image left out; every other row is kept as it was;
* with ``recaption``, the ``metadata.jsonl`` rows of the images named there, whose caption becomes a list of
  captions (``memwatch recaption``: the scripts train on a random one of the list each time).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "train").mkdir()
    >>> for name in ("a.png", "b.png", "b.txt"):
    ...     _ = (d / "train" / name).write_bytes(b"x")
    >>> _ = (d / "train" / "metadata.jsonl").write_text('{"file_name": "a.png"}\\n{"file_name": "b.png"}\\n')
    >>> done = write_filtered_folder(d / "train", d / "train-kept", ["b.png"])
    >>> sorted(p.name for p in (d / "train-kept").iterdir()), done.rows_left_out
    (['a.png', 'metadata.jsonl'], 1)
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from memwatch.errors import MemwatchError

#: side files that carry an image's caption (kohya-style ``<stem>.txt``) and go with it
CAPTION_SUFFIXES = (".txt", ".caption")
METADATA = ("metadata.jsonl", "metadata.csv")


@dataclass
class FilteredFolder:
    """What :func:`write_filtered_folder` wrote.

    Attributes:
        out: the new folder.
        left_out: the files not carried over (images and their caption side files), relative paths.
        files: files carried over.
        rows_left_out: metadata rows dropped with their image.
        linked: whether the files are hard links (False: copies).
        recaptioned: images whose metadata row got the captions given in ``recaption``.
    """

    out: Path
    left_out: list[str]
    files: int
    rows_left_out: int
    linked: bool
    recaptioned: list[str] = field(default_factory=list)


def write_filtered_folder(
    folder: str | Path,
    out: str | Path,
    leave_out: Iterable[str],
    recaption: Mapping[str, list[str]] | None = None,
) -> FilteredFolder:
    """Mirror ``folder`` into ``out`` without the images ``leave_out``.

    Args:
        folder: the training folder (images, optionally caption side files and ``metadata.jsonl``/``.csv``).
        out: the new folder; must not exist yet (or be empty), nor lie inside ``folder``.
        leave_out: image ids as memwatch names them: paths relative to ``folder``, with ``/``.
        recaption: image id -> the captions its ``metadata.jsonl`` row gets instead of its caption (in the
            row's ``text`` or ``caption`` field, whichever it has).

    Returns:
        A :class:`FilteredFolder`.

    Raises:
        MemwatchError: ``folder`` is not a folder, ``out`` is not empty or lies inside ``folder``, an id
            in ``leave_out`` or ``recaption`` is not a file of ``folder`` (the run watched another set), or an
            image to recaption has its caption in a ``metadata.csv`` (a CSV cell holds one caption).
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise MemwatchError(f"{folder}: not a folder; only a folder of image files can be filtered")
    if out.resolve().is_relative_to(folder.resolve()):
        raise MemwatchError(f"--out {out}: lies inside the training folder {folder}; choose a folder beside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemwatchError(f"--out {out}: exists and is not an empty folder; choose a new folder")
    drop = {str(PurePosixPath(i)) for i in leave_out}
    new_captions = {str(PurePosixPath(i)): list(c) for i, c in (recaption or {}).items()}
    missing = sorted(i for i in drop | set(new_captions) if not (folder / i).is_file())
    if missing:
        raise MemwatchError(
            f"{folder}: has no file {missing[0]} ({len(missing)} image(s) at risk not found): "
            "give the folder the run watched with --reference"
        )
    stems = {str(PurePosixPath(i).with_suffix("")) for i in drop}
    out.mkdir(parents=True, exist_ok=True)
    left_out: list[str] = []
    recaptioned: list[str] = []
    files = rows = 0
    linked = True
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel in drop or (path.suffix in CAPTION_SUFFIXES and rel.removesuffix(path.suffix) in stems):
            left_out.append(rel)
            continue
        if path.name in METADATA:
            text, dropped = _filtered_metadata(path, PurePosixPath(rel).parent, drop, new_captions, recaptioned)
            target.write_text(text, encoding="utf-8")
            rows += dropped
        else:
            linked = _link_or_copy(path, target) and linked
        files += 1
    return FilteredFolder(out, left_out, files, rows, linked, recaptioned)


def _filtered_metadata(
    path: Path, where: PurePosixPath, drop: set[str], captions: Mapping[str, list[str]], recaptioned: list[str]
) -> tuple[str, int]:
    """The metadata file without the rows of dropped images (``file_name`` is relative to its folder), and with
    the captions of the rows in ``captions`` replaced (their ids appended to ``recaptioned``)."""

    def image(file_name: object) -> str | None:
        return str(where / file_name) if isinstance(file_name, str) else None

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        lines, kept = text.splitlines(), []
        for line in lines:
            row = _row(line, path) if line.strip() else None
            rel = image(row.get("file_name")) if row else None
            if rel in drop:
                continue
            field_name = next((c for c in ("text", "caption") if c in row), None) if rel in captions else None
            if field_name is not None:
                row[field_name] = captions[rel]
                recaptioned.append(rel)
                line = json.dumps(row, ensure_ascii=False)
            kept.append(line)
        return "".join(line + "\n" for line in kept), len(lines) - len(kept)
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    listed = sorted(r for r in (image(row.get("file_name")) for row in rows) if r in captions)
    if listed:
        raise MemwatchError(
            f"{path}: the caption of {listed[0]} is in a CSV file, which holds one caption per image; convert it "
            "to metadata.jsonl (one JSON object per line) to give it several"
        )
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=reader.fieldnames or [], lineterminator="\n")
    writer.writeheader()
    kept_rows = [r for r in rows if image(r.get("file_name")) not in drop]
    writer.writerows(kept_rows)
    return buf.getvalue(), len(rows) - len(kept_rows)


def _row(line: str, path: Path) -> dict:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise MemwatchError(f"{path}: a line is not a JSON object ({e}); fix the file or filter by hand") from e
    if not isinstance(row, dict):
        raise MemwatchError(f"{path}: a line is not a JSON object; fix the file or filter by hand")
    return row


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link ``source`` at ``target`` (True), or copy it where links are not possible (False)."""
    try:
        os.link(source, target)
        return True
    except OSError:  # another file system, or links not allowed: a copy costs space, not correctness
        shutil.copy2(source, target)
        return False
