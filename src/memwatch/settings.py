"""Every setting declared once: its default, allowed values, unit and where the default comes from.

A settings *section* is a dataclass derived from :class:`Settings` whose fields are made with
:func:`setting`. Everything else is derived from those declarations:

* validation, with one error format (``"<source>: setting '<path>' must be ..., got ..."``), when a
  section is built from a config file (:func:`build_section`) or constructed in Python;
* the merged config (:mod:`memwatch.core.config` builds every section from its declaration);
* the report's table of thresholds and their sources (settings declared with ``threshold=True``);
* ``configs/default.yaml``, written by :func:`memwatch.core.config.defaults_yaml` and checked against the
  declarations by a test.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo(Settings):
    ...     section = "demo"
    ...     every: int = setting(50, "probe every this many steps (0: off)", min=0, unit="steps")
    >>> build_section(Demo, {"every": 100}, source="my.yaml").every
    100
    >>> build_section(Demo, {"every": "often"}, source="my.yaml")
    Traceback (most recent call last):
    ...
    memwatch.settings.SettingError: my.yaml: setting 'demo.every' must be a whole number, got 'often'
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from memwatch.errors import MemwatchError


class SettingError(MemwatchError):
    """A setting has a value it may not have; the message names the source, the setting and the fix."""


@dataclass(frozen=True)
class SettingInfo:
    """What a declaration says about one setting besides its default (see :func:`setting`)."""

    help: str
    source: str | None = None
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    #: the bound itself is not allowed (e.g. a rate in (0, 1))
    exclusive: bool = False
    choices: tuple[Any, ...] | None = None
    #: a path; in a config file it is relative to the file's folder
    path: bool = False
    #: a threshold a verdict depends on: listed with its source in the audit report
    threshold: bool = False
    #: for a setting added after results were stored: the value that measures what memwatch measured before it
    #: existed (at that value it is left out of the results' keys, so those results still count); None: none
    was: Any = None


def setting(
    default: Any,
    help: str,
    *,
    source: str | None = None,
    unit: str | None = None,
    min: float | None = None,
    max: float | None = None,
    exclusive: bool = False,
    choices: tuple[Any, ...] | None = None,
    path: bool = False,
    threshold: bool = False,
    was: Any = None,
) -> Any:
    """Declare one setting of a :class:`Settings` dataclass.

    Args:
        default: the value used when a config does not set it.
        help: what it does, in one sentence (shown in ``configs/default.yaml``).
        source: where the default comes from (a paper, a library's default, or "memwatch heuristic").
        unit: e.g. ``"steps"``, ``"pixels"``.
        min, max: allowed range of a number (or of every number in a list).
        exclusive: the bounds themselves are not allowed.
        choices: the allowed values.
        path: the value is a path, relative to the config file's folder.
        threshold: the value is a threshold behind a verdict (the report lists it with ``source``).
        was: for a setting added to a section whose results are stored: the value at which it measures what
            memwatch measured before the setting existed (see :meth:`Settings.keyed`).

    Example:
        >>> @dataclass
        ... class S(Settings):
        ...     size: int = setting(64, "side in pixels", min=1, unit="pixels")
        >>> S().size
        64
    """
    info = SettingInfo(help, source, unit, min, max, exclusive, choices, path, threshold, was)
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"setting": info})
    return dataclasses.field(default=default, metadata={"setting": info})


@dataclass
class Settings:
    """Base of every settings section: validates its values whenever it is constructed.

    Subclasses set :attr:`section` (the dotted path of the section in a config file, e.g.
    ``"probes.membership"``) and may override :meth:`check` for rules that involve several settings.
    """

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f, hint in _declared(type(self)):
            setattr(self, f.name, _checked(getattr(self, f.name), hint, f, self._path(f.name)))
        self.check()

    def check(self) -> None:
        """Rules between settings; raise :meth:`invalid` for the first one broken."""

    def invalid(self, name: str, problem: str) -> SettingError:
        """The error for setting ``name`` (``problem`` completes "setting '<path>' ...")."""
        return SettingError(f"setting '{self._path(name)}' {problem}")

    def _path(self, name: str) -> str:
        return f"{self.section}.{name}" if self.section else name

    def to_dict(self) -> dict[str, Any]:
        """The values as plain YAML/JSON types (tuples become lists), in declaration order.

        Example:
            >>> @dataclass
            ... class S(Settings):
            ...     sizes: tuple[int, int] = setting((1, 2), "two sizes")
            >>> S().to_dict()
            {'sizes': [1, 2]}
        """
        return {f.name: _plain(getattr(self, f.name)) for f, _ in _declared(type(self))}

    def keyed(self) -> dict[str, Any]:
        """:meth:`to_dict` less the settings at their ``was`` value: what the results measured with these settings
        are stored under, so that a setting added later, left at the value that measures as before, keys the
        results stored before it the same.

        Example:
            >>> @dataclass
            ... class S(Settings):
            ...     window: int = setting(6, "probes in the fit")
            ...     closest: int = setting(2, "seeds averaged", was=1)
            >>> S().keyed(), S(closest=1).keyed()
            ({'window': 6, 'closest': 2}, {'window': 6})
        """
        infos = {name: info for name, _, info in declarations(type(self))}
        return {k: v for k, v in self.to_dict().items() if infos[k].was is None or v != infos[k].was}


def declarations(cls: type[Settings]) -> list[tuple[str, Any, SettingInfo]]:
    """``(name, default, info)`` of every declared setting of a section, in declaration order.

    Example:
        >>> [name for name, _, _ in declarations(ExampleSettings)]
        ['every', 'rate']
    """
    out = []
    for f, _ in _declared(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append((f.name, default, f.metadata["setting"]))
    return out


def build_section(cls: type[Settings], data: Mapping[str, Any] | None, *, source: str) -> Any:
    """A section from a mapping of user values: unknown names and invalid values are errors.

    Args:
        cls: the section's dataclass.
        data: setting name -> value (missing ones take their default).
        source: names the config in error messages (a file path, "config dict"...).

    Raises:
        SettingError: ``"<source>: setting '<path>' ..."`` for the first problem found.
    """
    data = dict(data or {})
    known = [name for name, _, _ in declarations(cls)]
    for key in data:
        if key not in known:
            where = f"{cls.section}.{key}" if cls.section else str(key)
            raise SettingError(f"{source}: setting '{where}' is unknown; known settings here: {', '.join(known)}")
    try:
        return cls(**data)
    except SettingError as e:
        raise SettingError(f"{source}: {e}") from None


@dataclass
class ExampleSettings(Settings):
    """A section used by this module's examples."""

    section = "example"
    every: int = setting(10, "probe every this many steps (0: off)", min=0, unit="steps")
    rate: float = setting(0.5, "a share", min=0.0, max=1.0)


# ---------------------------------------------------------------------------------------------
# Checking one value against its declaration


def _declared(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def _checked(value: Any, hint: Any, f: dataclasses.Field, path: str) -> Any:
    info: SettingInfo = f.metadata["setting"]
    value = _typed(value, hint, path)
    if value is None:
        return None
    if info.choices is not None and value not in info.choices:
        choices = ", ".join(str(c) for c in info.choices)
        raise SettingError(f"setting '{path}' must be one of {choices}, got {value!r}")
    numbers = value if isinstance(value, list | tuple) else [value]
    for v in numbers:
        if isinstance(v, int | float) and not isinstance(v, bool):
            _check_range(v, info, path)
    return value


def _check_range(v: float, info: SettingInfo, path: str) -> None:
    lo, hi = info.min, info.max
    low_bad = lo is not None and (v <= lo if info.exclusive else v < lo)
    high_bad = hi is not None and (v >= hi if info.exclusive else v > hi)
    if not (low_bad or high_bad):
        return
    if lo is not None and hi is not None:
        br = "(" if info.exclusive else "["
        ket = ")" if info.exclusive else "]"
        want = f"in {br}{lo:g}, {hi:g}{ket}"
    elif lo is not None:
        want = f"{'>' if info.exclusive else '>='} {lo:g}"
    else:
        want = f"{'<' if info.exclusive else '<='} {hi:g}"
    unit = f" {info.unit}" if info.unit else ""
    raise SettingError(f"setting '{path}' must be {want}{unit}, got {v!r}")


def _typed(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked against the annotation (ints accepted for floats, lists for tuples)."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _typed(value, inner[0], path)
        for a in inner:  # e.g. str | int: the first that fits
            try:
                return _typed(value, a, path)
            except SettingError:
                continue
        raise SettingError(f"setting '{path}' must be {_describe(hint)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise SettingError(f"setting '{path}' must be {_describe(hint)}, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise SettingError(f"setting '{path}' must be {_describe(hint)}, got {value!r}")
        item = args[0] if args else Any
        items = [_typed(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SettingError(f"setting '{path}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingError(f"setting '{path}' must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise SettingError(f"setting '{path}' must be {_number_hint(value)}, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SettingError(f"setting '{path}' must be a string, got {value!r}")
        return value
    return value


def _number_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
            return "a number (YAML read this as text: write 1.0e-3, with a dot, not 1e-3)"
        except ValueError:
            pass
    return "a finite number"


def _describe(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple):
        item = args[0] if args else Any
        count = f"{len(args)} " if origin is tuple and args and args[-1] is not Ellipsis else ""
        return f"a list of {count}{_describe(item).removeprefix('a ')}s"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint, str(hint))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
