"""Which probes exist: every module of the :mod:`memwatch.probes` package, found when first asked, plus a
run's ``custom_probes``.

A built-in probe is one file in ``src/memwatch/probes/``: a :class:`~memwatch.core.probe.Probe` subclass
with a ``name``. Nothing else lists it: the config, ``configs/default.yaml``, the default rules, the
memorization chart, the report and the rules' metric checks all read the probes from here. Modules of the
package that define no probe (shared helpers) are skipped; a module that fails to import is an error
naming it.

Example:
    >>> [cls.name for cls in builtin_probes()][:2]
    ['regurgitation', 'forecast']
    >>> probe_class("membership").name
    'membership'
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Iterable

from memwatch.core.probe import Metric, Probe
from memwatch.errors import MemwatchError
from memwatch.plugins import load_class

#: The package whose modules are the built-in probes.
PROBES_PACKAGE = "memwatch.probes"


@functools.cache
def builtin_probes() -> tuple[type[Probe], ...]:
    """The probe classes defined in the modules of :data:`PROBES_PACKAGE`, by ``order`` then name.

    Raises:
        MemwatchError: a module cannot be imported, or two probes share a name.
    """
    package = importlib.import_module(PROBES_PACKAGE)
    found: dict[str, type[Probe]] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module_name = f"{PROBES_PACKAGE}.{info.name}"
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # a broken probe file must say which it is, not break `import memwatch`
            raise MemwatchError(f"probe module {module_name} cannot be imported ({type(e).__name__}: {e})") from None
        for cls in _probes_defined_in(module):
            if cls.name in found and found[cls.name] is not cls:
                first = found[cls.name].__module__
                raise MemwatchError(f"probe name {cls.name!r} is used twice: in {first} and in {module_name}")
            found[cls.name] = cls
    return tuple(sorted(found.values(), key=lambda c: (c.order, c.name)))


def _probes_defined_in(module: object) -> Iterable[type[Probe]]:
    """The named probe classes a module defines itself (not those it imports)."""
    for _, obj in inspect.getmembers(module, inspect.isclass):
        own = obj.__module__ == getattr(module, "__name__", None)
        if own and issubclass(obj, Probe) and obj is not Probe and obj.name:
            yield obj


def builtin_names() -> dict[str, str]:
    """Short name -> import path ``module:Class`` of every built-in probe."""
    return {cls.name: f"{cls.__module__}:{cls.__name__}" for cls in builtin_probes()}


def probe_class(spec: str) -> type[Probe]:
    """A probe class from a built-in name or an import path ``module:Class``.

    Raises:
        MemwatchError: an unknown name, or a path that is not a probe class.
    """
    return load_class(spec, builtin_names(), Probe, "probe")


def probe_classes(custom: Iterable[str] = ()) -> list[type[Probe]]:
    """The built-in probe classes, then the ``custom`` ones (import paths), in order."""
    return [*builtin_probes(), *(probe_class(spec) for spec in custom)]


def declared_metrics(classes: Iterable[type[Probe]]) -> dict[str, Metric]:
    """``"probe/metric"`` -> :class:`~memwatch.core.probe.Metric` for every metric the probes declare.

    Example:
        >>> declared_metrics(builtin_probes())["regurgitation/mem_fraction"].role
        'share'
    """
    return {f"{cls.name}/{name}": m for cls in classes for name, m in cls.declared().items()}


def known_classes(custom: Iterable[str] = ()) -> list[type[Probe]]:
    """The built-in probes and those of ``custom`` that can still be imported (a view of a stored run may
    name probes of a module that is gone; their metrics are then shown without declarations)."""
    out = list(builtin_probes())
    for spec in custom:
        try:
            out.append(probe_class(spec))
        except MemwatchError:
            continue
    return out
