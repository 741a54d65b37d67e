"""The built-in probes, one module each, and the API to write your own.

Every module here that defines a :class:`Probe` subclass is a built-in probe: it is found by
:mod:`memwatch.core.registry` and needs no other edit. Your own probes import the same names::

    from memwatch.probes import Metric, Probe, ProbeContext, ProbeResult, ProbeSettings, setting

Example:
    >>> from memwatch.probes import Probe
    >>> Probe.order
    100
"""

from memwatch.core.probe import Metric, Probe, ProbeContext, ProbeRecord, ProbeResult, ProbeSettings
from memwatch.settings import setting

__all__ = ["Metric", "Probe", "ProbeContext", "ProbeRecord", "ProbeResult", "ProbeSettings", "setting"]
