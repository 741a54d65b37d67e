"""Writing the files a user asked for: whole or not at all, and one line naming the path when it fails.

Every output of the command line (reports, curves, ``--json`` summaries) goes through
:func:`write_output`: it writes a temporary file beside the target and renames it, so a reader never
sees half a file, and turns every OS error (a folder where a file belongs, a read-only or full disk)
into one :class:`MemwatchError` line that names the path and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from memwatch.errors import MemwatchError


def write_output(path: str | Path, content: str | bytes, option: str = "the output path") -> Path:
    """Write ``content`` (text as UTF-8 with ``\\n`` line ends) to ``path`` atomically.

    Args:
        path: the file to write; parent folders are created.
        content: text or bytes.
        option: how the user gave the path, for the error (e.g. ``"--json"``).

    Raises:
        MemwatchError: the path is a folder, or cannot be written.

    Example:
        >>> import tempfile
        >>> write_output(Path(tempfile.mkdtemp()) / "a" / "b.json", "{}").read_text()
        '{}'
    """
    path = Path(path)
    if path.is_dir():
        raise MemwatchError(f"{option} {path} is a folder: pass a file path")
    # names with bytes that are not UTF-8 (surrogate escapes) are written with those bytes as \\xNN
    data = content.encode("utf-8", "backslashreplace") if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise MemwatchError(f"cannot write {option} {path} ({e.strerror or e}): pass a writable file path") from None
    return path


def ensure_folder(path: str | Path, option: str = "the output folder") -> Path:
    """Create ``path`` as a folder (with parents), or one line naming it when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MemwatchError(f"{option} {path} is a file: pass a folder") from None
    except OSError as e:
        raise MemwatchError(f"cannot create {option} {path} ({e.strerror or e}): pass a writable folder") from None
    return path
