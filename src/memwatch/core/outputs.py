"""Where a probing session's metrics and events go besides the store: one small interface, several outputs.

An :class:`Output` receives each probed step's metrics and each event (after it is in the store). The
built-in ones are the log, the ``events.jsonl`` file, a tracker (``accelerator.log``: TensorBoard, W&B)
and the ``on_event`` callback; your own output (a chat notification, a pager) is one class with the same
two methods, passed to the monitor as ``outputs=[...]``, like an accelerate tracker. :class:`Outputs`
calls them all and keeps any error from reaching training: a failing output is logged once per call.

Example:
    >>> class Collect(Output):
    ...     def __init__(self):
    ...         self.seen = []
    ...     def event(self, event):
    ...         self.seen.append(event.rule)
    >>> c = Collect()
    >>> Outputs([c]).event(Event(1, "r", "info", "p/m", 1.0, 0.0, None, "hello"))
    >>> c.seen
    ['r']
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from memwatch.errors import failure_reason
from memwatch.signals.rules import Event

log = logging.getLogger("memwatch")

EVENTS_NAME = "events.jsonl"
_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}


class Output:
    """Receives what a session measured and what its rules raised (main process only). Override either method."""

    def metrics(self, values: dict[str, float], step: int) -> None:
        """The metrics of one probed step, keyed ``"probe/metric"``."""

    def event(self, event: Event) -> None:
        """One event, already recorded in the store."""


class LogOutput(Output):
    """Each event as a log line at its severity (logger ``memwatch``)."""

    def event(self, event: Event) -> None:
        log.log(_LEVELS[event.severity], "[%s] %s", event.rule, event.message)


class EventsFile(Output):
    """Each event as one JSON line in ``events.jsonl`` (for ``tail -f`` and shell tools).

    Args:
        path: the file (appended to).
        run: the run's name, written with each event.
    """

    def __init__(self, path: str | Path, run: str):
        self.path = Path(path)
        self.run = run

    def event(self, event: Event) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"run": self.run, **event.to_dict()}, sort_keys=True, default=str) + "\n")
        except OSError as e:
            log.error("memwatch: %s not written (%s): the event is in the store and the log", self.path.name, e)


class Tracker(Output):
    """Metrics and events to a tracker through a ``log(values, step)`` function (e.g. ``accelerator.log``),
    under ``memwatch/<probe>/<metric>`` and ``memwatch/events/<rule>``."""

    def __init__(self, log_fn: Callable[[dict[str, float], int], None]):
        self.log_fn = log_fn

    def metrics(self, values: dict[str, float], step: int) -> None:
        if values:
            self.log_fn({f"memwatch/{k}": v for k, v in values.items()}, step)

    def event(self, event: Event) -> None:
        self.log_fn({f"memwatch/events/{event.rule}": event.value}, event.step)


class Callback(Output):
    """Each event to a function of yours (``on_event``)."""

    def __init__(self, on_event: Callable[[Event], None]):
        self.on_event = on_event

    def event(self, event: Event) -> None:
        self.on_event(event)


class Outputs:
    """Every output of a session, called in order; an error in one is logged and the others still run.

    Args:
        outputs: the outputs.
    """

    def __init__(self, outputs: Sequence[Output]):
        self.outputs = list(outputs)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for out in self.outputs:
            try:
                out.metrics(values, step)
            except Exception as e:  # an output must not stop the monitor, nor the training
                log.error("memwatch: output %s raised %s", type(out).__name__, failure_reason(e))

    def event(self, event: Event) -> None:
        for out in self.outputs:
            try:
                out.event(event)
            except Exception as e:
                log.error("memwatch: output %s raised %s", type(out).__name__, failure_reason(e))


def standard_outputs(
    output_dir: Path,
    run: str,
    *,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    on_event: Callable[[Event], None] | None = None,
    extra: Sequence[Output] = (),
) -> Outputs:
    """The log, ``events.jsonl``, the tracker and the callback (when given), then ``extra``."""
    outs: list[Output] = [LogOutput(), EventsFile(output_dir / EVENTS_NAME, run)]
    if log_metrics is not None:
        outs.append(Tracker(log_metrics))
    if on_event is not None:
        outs.append(Callback(on_event))
    for out in extra:
        if not isinstance(out, Output):
            from memwatch.errors import MemwatchError

            raise MemwatchError(f"outputs= takes memwatch Output instances, got {type(out).__name__}")
    return Outputs([*outs, *extra])
