"""Finding a class by name: a built-in's short name, or an import path ``package.module:Class``.

Probes and embedders are chosen by name in a config file. A built-in has a short name
(``"membership"``, ``"clip"``); a user's own class is named by its import path, so it plugs in
without any memwatch source file being edited.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from memwatch.errors import MemwatchError


def load_class(spec: str, builtins: Mapping[str, str], base: type, what: str) -> Any:
    """The class named by ``spec``: a key of ``builtins`` or an import path ``module:Class``.

    Args:
        spec: short name or import path (``module:Class`` or ``module.Class``).
        builtins: short name -> import path of the built-in classes.
        base: the class it must derive from.
        what: names the setting in error messages (e.g. ``"probe"``).

    Raises:
        MemwatchError: unknown name, module not importable, no such class, or not a ``base``.

    Example:
        >>> load_class("collections:OrderedDict", {}, dict, "mapping").__name__
        'OrderedDict'
    """
    path = builtins.get(spec, spec)
    if ":" in path:
        module_name, _, attr = path.partition(":")
    elif "." in path:
        module_name, _, attr = path.rpartition(".")
    else:
        known = ", ".join(builtins) or "none"
        raise MemwatchError(f"{what} {spec!r} is unknown: use one of {known}, or an import path module:Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MemwatchError(f"{what} {spec!r}: cannot import {module_name} ({e}); check the import path") from None
    except Exception as e:  # a SyntaxError, or an error raised by the module's own code while it is imported
        where = f" ({e.filename}, line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise MemwatchError(
            f"{what} {spec!r}: importing {module_name} failed: {type(e).__name__}{where}: {first}; fix that module"
        ) from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise MemwatchError(f"{what} {spec!r}: {module_name} has no {base.__name__} subclass {attr!r}")
    return cls
