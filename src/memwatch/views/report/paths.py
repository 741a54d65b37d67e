"""Portable reports: paths relative to the run folder, and no other path of the machine that wrote them.

A store records paths as the training script gave them, often absolute (``/home/alice/runs/sd/checkpoint-400``):
right on the machine that trained, noise in a filed report, and a leak of that machine's layout. The report
is built as usual, then every string in it is rewritten: the run folder's absolute path becomes relative to
it (``checkpoint-400``), and any other absolute path — inside a message as well as alone — keeps only its
last part (``<path>/model.safetensors``). Where that happened is listed (JSON pointers), so a reader knows
what was left out. ``absolute=True`` (``memwatch report --absolute-paths``) keeps every path as recorded.

Example:
    >>> r = {"a": "/runs/sd/checkpoint-400", "b": ["keep /runs/sd/checkpoint-200", "d1/d2 < 1/3", "/etc/x.yaml"]}
    >>> portable, redacted = make_portable(r, Path("/runs/sd"))
    >>> portable
    {'a': 'checkpoint-400', 'b': ['keep checkpoint-200', 'd1/d2 < 1/3', '<path>/x.yaml']}
    >>> redacted
    ['/b/2']
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

#: An absolute path inside text: a POSIX one (``/a/b``) or a Windows one (``C:\\a\\b``) that starts the text or
#: follows a space, quote, bracket, ``=`` or ``,`` (so a ratio's ``d1/d2``, a URL's ``//`` or an id such as
#: ``a</b>.png`` is left alone), up to whitespace or a quote.
_ABSOLUTE = re.compile(r"""(?:^|(?<=[\s"'(\[=,]))(?:/(?:[^\s/"'<>]+/)*[^\s/"'<>,;)]+|[A-Za-z]:\\[^\s"'<>,;)]+)""")
#: What an absolute path outside the run folder becomes (its last part follows).
PLACEHOLDER = "<path>"


def make_portable(report: Any, run_folder: Path) -> tuple[Any, list[str]]:
    """The report with paths made portable, and the JSON pointers of the strings where a path outside the run
    folder was cut to its last part.

    Args:
        report: the report's content (JSON types).
        run_folder: the training run's folder (absolute paths under it become relative to it).
    """
    roots = sorted({str(run_folder), str(run_folder.resolve())}, key=len, reverse=True)
    redacted: list[str] = []

    def text(s: str, pointer: str) -> str:
        if s.startswith("data:"):  # an embedded image: base64 has slashes, never paths
            return s
        for root in roots:
            s = _relative_to(s, root)
        out = _ABSOLUTE.sub(lambda m: f"{PLACEHOLDER}/{_last_part(m.group(0))}", s)
        if out != s:
            redacted.append(pointer)
        return out

    def walk(v: Any, pointer: str) -> Any:
        if isinstance(v, str):
            return text(v, pointer)
        if isinstance(v, dict):
            return {text(k, pointer) if isinstance(k, str) else k: walk(x, f"{pointer}/{_escape(str(k))}")
                    for k, x in v.items()}  # fmt: skip
        if isinstance(v, list):
            return [walk(x, f"{pointer}/{i}") for i, x in enumerate(v)]
        return v

    return walk(report, ""), redacted


def _relative_to(s: str, root: str) -> str:
    """``root`` and what follows it, relative: the folder itself becomes ``.``."""
    s = s.replace(root + "/", "")
    return re.sub(re.escape(root) + r"(?=$|[\s\"',;)])", ".", s)


def _last_part(path: str) -> str:
    pure = PureWindowsPath(path) if re.match(r"[A-Za-z]:\\", path) else PurePosixPath(path)
    return pure.name or "."


def _escape(key: str) -> str:
    """A JSON pointer's escaping of a key (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")
