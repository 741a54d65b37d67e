"""Where a run stands: onset, at-risk and last clean step, the first alarm, whether to stop, and what to keep.

:class:`RunState` follows the probed steps of one run as the rules judge them (live, or replayed from the
store when a run resumes) and answers the questions a training loop and a summary ask: has copying
begun (the first value above 0 of a main-panel onset metric the probes declare), was it forecast (a
``forecast`` rule fired), what is the last clean step (before any warning), and which checkpoint to
keep when a warning fires (:meth:`RunState.keep_advice`).

Example:
    >>> state = RunState(onset_keys=["regurgitation/distinct_memorized"], forecast_rules={"onset-forecast"})
    >>> state.track(100, {"regurgitation/distinct_memorized": 0.0}, [])
    >>> state.track(200, {"regurgitation/distinct_memorized": 1.0}, [])
    >>> state.onset_step, state.last_clean_step
    (200, 200)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memwatch.errors import failure_reason
from memwatch.signals.rules import Event, severity_at_least
from memwatch.snapshots.checkpoints import last_clean_checkpoint

if TYPE_CHECKING:
    from memwatch.store import Store

log = logging.getLogger("memwatch")


@dataclass
class RunState:
    """The state of one run, step by step.

    Attributes:
        onset_keys: ``"probe/metric"`` whose first value above 0 is the onset (the first copy).
        forecast_rules: names of the rules whose firing means "at risk" (copying forecast, nothing copied yet).
        stop_on: the lowest severity that sets :attr:`should_stop` (None: never).
        onset_step: first probed step with a copy.
        at_risk_step: first probed step at which a forecast rule fired.
        first_alarm_step: first probed step with an event at ``warning`` or above.
        last_clean_step: the last probed step before the first alarm.
        should_stop: an event at or above ``stop_on`` fired.
        events: every event of the run (replayed and new), in order.
    """

    onset_keys: Sequence[str] = ()
    forecast_rules: Collection[str] = ()
    stop_on: str | None = None
    onset_step: int | None = None
    at_risk_step: int | None = None
    first_alarm_step: int | None = None
    last_clean_step: int | None = None
    should_stop: bool = False
    events: list[Event] = field(default_factory=list)

    @classmethod
    def from_store(cls, store: Store, run_id: int) -> RunState:
        """The first alarm and the last clean step of a recorded run (for commands run after it, or beside
        it): the last step probed without failure before the first event at ``warning`` or above.

        Example:
            >>> state = RunState.from_store(store, run_id)  # doctest: +SKIP
            >>> state.last_clean_step  # doctest: +SKIP
            400
        """
        alarms = [int(e["step"]) for e in store.events(run_id) if severity_at_least(e["severity"], "warning")]
        first_alarm = min(alarms, default=None)
        ok = {r["snapshot_id"] for r in store.results(run_id) if r["status"] == "ok"}
        probed = [int(s["step"]) for s in store.snapshots(run_id) if s["id"] in ok]
        clean = [step for step in probed if first_alarm is None or step < first_alarm]
        return cls(first_alarm_step=first_alarm, last_clean_step=max(clean, default=None))

    def track(self, step: int, values: dict[str, float], events: Sequence[Event]) -> None:
        """Take in one probed step: its metrics and the events they raised (:meth:`saw` adds the events)."""
        if self.onset_step is None and any(values.get(k, 0) > 0 for k in self.onset_keys):
            self.onset_step = step
        if self.at_risk_step is None and any(e.rule in self.forecast_rules for e in events):
            self.at_risk_step = step
        if self.first_alarm_step is None and any(severity_at_least(e.severity, "warning") for e in events):
            self.first_alarm_step = step
        if self.first_alarm_step is None:
            self.last_clean_step = step

    def saw(self, event: Event) -> None:
        """One event (it may set :attr:`should_stop`)."""
        self.events.append(event)
        if self.stop_on and severity_at_least(event.severity, self.stop_on):
            self.should_stop = True

    def replayed(self, events: Sequence[Event]) -> None:
        """The events a store already holds, for a run that resumes (they may set :attr:`should_stop`)."""
        self.events = []
        for event in events:
            self.saw(event)

    def events_by_severity(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.severity] = out.get(e.severity, 0) + 1
        return out

    def keep_advice(self, store: Store | None, run_id: int, run_dir: Path) -> str:
        """What to keep when a warning fires now: the newest checkpoint with clean weights
        (:meth:`clean_checkpoint`), in words."""
        if self.last_clean_step is None:
            return "the weights from before training (no clean probe yet)"
        path, matched = self.clean_checkpoint(store, run_id, run_dir)
        if path is None:
            return f"the model as of step {self.last_clean_step} (no checkpoint saved by then in {run_dir})"
        if matched == "weights":
            return f"{path} (the last clean checkpoint)"
        return f"{path} (saved by step {self.last_clean_step}, the last clean probe; matched by step, not by weights)"

    def clean_checkpoint(self, store: Store | None, run_id: int, run_dir: Path) -> tuple[Path | None, str]:
        """The newest checkpoint folder to keep, and how it was matched to the last clean step.

        First the newest checkpoint folder, still on disk, that holds weights the probes measured at or
        before the last clean step (a sighting in the store: ``memwatch probe``/``watch`` folders, and
        the monitor's ``save_state`` checkpoints): ``"weights"``. Else, for checkpoints saved without
        ``save_state``, the newest ``checkpoint-<step>`` in ``run_dir`` saved by the last clean step:
        ``"step"``. ``(None, "none")`` when there is no clean step or no such folder.
        """
        if self.last_clean_step is None:
            return None, "none"
        try:
            path = self._last_clean_sighting(store, run_id) if store is not None else None
        except Exception as e:  # the advice is a courtesy: a store that cannot be read leaves the fallback
            log.debug("memwatch: clean checkpoints not read: %s", failure_reason(e))
            path = None
        if path is not None:
            return Path(path), "weights"
        guess = last_clean_checkpoint(run_dir, self.last_clean_step)
        return (guess, "step") if guess is not None else (None, "none")

    def _last_clean_sighting(self, store: Store, run_id: int) -> str | None:
        """The newest checkpoint folder on disk whose weights were probed at or before the last clean step."""
        assert self.last_clean_step is not None
        probed = {r["snapshot_id"] for r in store.results(run_id) if r["status"] == "ok"}
        seen = [
            (g["step"], g["path"])
            for snap in store.snapshots(run_id)
            if snap["id"] in probed and snap["step"] <= self.last_clean_step
            for g in snap["sightings"]
            if g["kind"] == "checkpoint" and g["path"] and g["step"] <= self.last_clean_step
        ]
        kept = [(step, path) for step, path in seen if Path(path).is_dir()]
        return max(kept)[1] if kept else None

    def summary(self) -> dict[str, Any]:
        """The steps that matter and the events by severity, for ``summary.json``."""
        return {
            "onset_step": self.onset_step,
            "at_risk_step": self.at_risk_step,
            "first_alarm_step": self.first_alarm_step,
            "last_clean_step": self.last_clean_step,
            "events": self.events_by_severity(),
        }


def rounded(value: float, digits: int) -> float | None:
    """``value`` rounded, None when it is not finite (JSON has no NaN).

    Example:
        >>> rounded(0.123456, 3), rounded(float("nan"), 3)
        (0.123, None)
    """
    return round(value, digits) if math.isfinite(value) else None
