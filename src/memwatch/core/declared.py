"""The read side of the probes' declarations: what each stored metric means, for the views and the run state.

A probe declares its metrics (:class:`~memwatch.core.probe.Metric`: role, panel, threshold, onset). The
memorization chart, the report's verdicts and limitations, the summary's onset and the images at risk are
built from these declarations, never from probe names, so a new probe shows up in all of them by
declaring its metrics. A stored run is read with the probes its config names (built-ins, and the
``custom_probes`` that can still be imported); metrics nobody declares are details.

Example:
    >>> d = Declarations.of_config({})
    >>> d.keys(role="share")[:1]
    ['regurgitation/mem_fraction']
    >>> d.onset_keys()
    ['regurgitation/distinct_memorized']
    >>> round(d.sample_threshold(), 4)
    0.3333
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from memwatch.core.probe import MAIN_PANEL, Metric, Probe
from memwatch.core.registry import known_classes
from memwatch.settings import declarations

if TYPE_CHECKING:
    from memwatch.store import Store
    from memwatch.store.history import RunHistory


class Declarations:
    """The declared metrics of a set of probe classes, with the settings a run used.

    Args:
        classes: the probe classes.
        settings: probe name -> its settings in the run's config (missing ones take the declared defaults).
    """

    def __init__(self, classes: Sequence[type[Probe]], settings: Mapping[str, Mapping[str, Any]] | None = None):
        self.classes = list(classes)
        self.metrics: dict[str, Metric] = {
            f"{cls.name}/{name}": m for cls in self.classes for name, m in cls.declared().items()
        }
        self._settings = {
            cls.name: {**_defaults(cls), **dict((settings or {}).get(cls.name) or {})} for cls in self.classes
        }

    @classmethod
    def of_config(cls, config: Mapping[str, Any]) -> Declarations:
        """The declarations of the probes a stored run's config names (``probes`` settings, ``custom_probes``)."""
        custom = config.get("custom_probes")
        probes = config.get("probes")
        return cls(
            known_classes(custom if isinstance(custom, list) else []),
            probes if isinstance(probes, Mapping) else {},
        )

    @classmethod
    def of_probes(cls, probes: Sequence[Probe]) -> Declarations:
        """The declarations of live probe objects, with their settings."""
        return cls([type(p) for p in probes], {p.name: p.settings.to_dict() for p in probes})

    def metric(self, key: str) -> Metric | None:
        """The declaration of ``"probe/metric"`` (a ``@ema`` series is its metric's), or None."""
        return self.metrics.get(key.split("@", 1)[0])

    def keys(self, *, role: str | None = None, panel: str | None = None) -> list[str]:
        """``"probe/metric"`` keys with that role (and panel), in probe order."""
        return [
            k
            for k, m in self.metrics.items()
            if (role is None or m.role == role) and (panel is None or m.panel == panel)
        ]

    def onset_keys(self, panel: str = MAIN_PANEL) -> list[str]:
        """The metrics whose first value above 0 marks the onset on ``panel`` (on the main panel: the run's onset)."""
        return [k for k, m in self.metrics.items() if m.onset and m.panel == panel]

    def panels(self) -> list[str]:
        """The chart's panels: the main one first, then the others in probe order."""
        out = [MAIN_PANEL]
        for m in self.metrics.values():
            if m.role != "detail" and m.panel not in out:
                out.append(m.panel)
        return out

    def threshold(self, key: str, values: Mapping[str, float] | None = None) -> float | None:
        """The threshold of ``"probe/metric"``: a number, the probe's setting, or the probe's metric of that name in
        ``values`` (``"probe/metric"`` -> value, at one step)."""
        m = self.metric(key)
        if m is None:
            return None
        probe = key.split("/", 1)[0]
        own = {k.split("/", 1)[1]: v for k, v in (values or {}).items() if k.startswith(probe + "/")}
        return m.threshold_value(self._settings.get(probe, {}), own)

    def sample_threshold(self, default: float = 1 / 3) -> float:
        """The per-sample d1/d2 below which a stored match row counts as a copy: the setting the probe that writes
        match rows names (:attr:`~memwatch.core.probe.Probe.matches_threshold`), else ``default``."""
        for cls in self.classes:
            value = self._settings.get(cls.name, {}).get(cls.matches_threshold or "")
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                return float(value)
        return default


def load_run(store: Store, run: str | None = None) -> RunHistory:
    """:func:`memwatch.store.history.load_history`, with the copy threshold the run's probes declare.

    Args:
        store: an open store.
        run: the run's name; None: the most recent run.
    """
    from memwatch.store.history import load_history

    history = load_history(store, run)
    return dataclasses.replace(history, mem_ratio=Declarations.of_config(history.config).sample_threshold())


def _defaults(cls: type[Probe]) -> dict[str, Any]:
    """The declared defaults of a probe's settings (what a run's config omits)."""
    try:
        return {name: default for name, default, _ in declarations(cls.Settings)}
    except TypeError:  # a settings class that is not a dataclass of declared settings
        return {}
