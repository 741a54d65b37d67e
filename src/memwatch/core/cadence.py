"""When in-training probes run: each probe's ``every``, adapted for the sample probes under a time budget.

Sampling is what costs (``num_samples x inference_steps`` UNet passes). With ``cadence.adaptive`` on,
the sample probes (regurgitation, forecast, ...) run

* more often as the onset forecast approaches: the next probe comes at most a quarter of the way to the
  forecast band's early edge, and at least every ``every x fastest`` steps, so several probes fall
  between a warning and the onset it forecasts;
* less often while the precursor is flat or moving away from the threshold (``every x slowest``);
* never more often than the budget allows: the monitor measures its own time and the training's (wall
  clock between ``step()`` calls, probes excluded) and keeps ``probe time / training time`` at or below
  ``budget`` by stretching the interval.

Sampling-free probes (membership) keep their ``every`` unless they alone would take more than half the
budget; then they are stretched too, so sampling always has at least half of it. Without ``adaptive``
every probe runs at the steps that are multiples of its ``every``, as before. The front-ends that probe
saved checkpoints (``memwatch probe`` / ``watch``) probe every checkpoint and ignore cadence.

Example:
    >>> c = Cadence(CadenceSettings(), clock=iter([0.0, 1.0, 1.1]).__next__)
    >>> c.due("regurgitation", 200, every=200, sample_probe=True)
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from memwatch.settings import Settings, setting


@dataclass
class CadenceSettings(Settings):
    """How often in-training probes run (section ``cadence``)."""

    section = "cadence"
    adaptive: bool = setting(
        True, "sample probes run more often as the onset forecast approaches, less while the precursor is flat"
    )
    budget: float | None = setting(
        0.1,
        "most probe time per training time (0.1: 10%), measured on itself; null: no limit",
        min=0.0,
        exclusive=True,
        source="memwatch: a tenth of training for an early warning; docs/benchmarks.md has the overhead measured",
    )
    fastest: float = setting(
        0.25, "shortest interval between sample probes, as a share of their every", min=0.0, max=1.0, exclusive=True
    )
    slowest: float = setting(2.0, "longest interval between sample probes, as a multiple of their every", min=1.0)


class Cadence:
    """Decides, step by step, which probes are due (one per session; the same answer on every process).

    Args:
        settings: the ``cadence`` section.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, settings: CadenceSettings, clock: Callable[[], float] = time.perf_counter):
        self.settings = settings
        self.clock = clock
        #: share of ``every`` the next sample probe waits (1.0: the fixed cadence)
        self.factor = 1.0
        #: probe name -> the step at which it is next due (adaptive cadence only)
        self.next_due: dict[str, int] = {}
        self._started: float | None = None
        self._probe_seconds = 0.0
        #: seconds of recent probings, those that drew samples and those that did not
        self._seconds: dict[bool, list[float]] = {True: [], False: []}
        self._steps_seen = 0
        self._known: dict[str, tuple[int, bool]] = {}

    def due(self, probe: str, step: int, *, every: int, sample_probe: bool) -> bool:
        """Whether ``probe`` (cadence ``every``) is due at ``step``."""
        if every <= 0:
            return False
        if not self.settings.adaptive:
            return step % every == 0
        return step >= self.next_due.setdefault(probe, every)

    def tick(self) -> None:
        """Called at every ``step()``: the clock starts at the first one."""
        if self._started is None:
            self._started = self.clock()
        self._steps_seen += 1

    def probed(self, seconds: float, *, sampled: bool) -> None:
        """Record the time of one probing (main process), ``sampled`` when it drew samples."""
        self._probe_seconds += seconds
        self._seconds[sampled] = [*self._seconds[sampled][-4:], seconds]

    def overhead(self) -> float:
        """Probe time / training time so far (NaN before any training time was measured)."""
        training = self._training_seconds()
        return self._probe_seconds / training if training > 0 else math.nan

    def schedule(
        self, step: int, ran: Mapping[str, tuple[int, bool]], low: float = math.nan, receding: bool = False
    ) -> dict[str, int]:
        """After probes ran at ``step``: when each runs next (main process; broadcast the result).

        The budget is shared: the sampling-free probes may take at most half of it (their interval is
        stretched when they would take more), the sample probes the rest.

        Args:
            step: the step just probed.
            ran: name -> (every, whether it is a sample probe) of the probes that ran.
            low: the early edge of the latest onset forecast (NaN: no forecast).
            receding: the precursor is flat or moving away from the threshold.

        Returns:
            name -> next due step, also kept in :attr:`next_due`.

        Example:
            >>> c = Cadence(CadenceSettings(budget=None))
            >>> c.schedule(1000, {"regurgitation": (200, True), "membership": (50, False)}, low=1400.0)
            {'regurgitation': 1100, 'membership': 1050}
        """
        if not self.settings.adaptive:
            return {}
        s = self.settings
        self._known.update(ran)  # the budget split needs every probe's cadence, not only those that ran now
        samples = {n: e for n, (e, sample) in ran.items() if sample}
        others = [e for e, sample in self._known.values() if not sample]
        other_factor, other_rate = self._fit_budget(False, min(others, default=0), s.budget and s.budget / 2)
        if samples:
            factor = 1.0
            if math.isfinite(low) and low > step:
                # A quarter of the way to the early edge, so about four probes fall before it. (An edge at
                # the current step means onset is reached: nothing left to forecast, the usual cadence.)
                factor = min(1.0, max(s.fastest, (low - step) / 4 / min(samples.values())))
            elif receding:
                factor = s.slowest  # nothing approaches the threshold: nothing to chase
            left = s.budget - other_rate if s.budget is not None else None
            self.factor = max(factor, self._fit_budget(True, min(samples.values()), left)[0])
        for name, every in ran.items():
            f = self.factor if every[1] else other_factor
            self.next_due[name] = step + max(1, round(every[0] * f))
        return {n: self.next_due[n] for n in ran}

    def _training_seconds(self) -> float:
        if self._started is None:
            return 0.0
        return self.clock() - self._started - self._probe_seconds

    def _fit_budget(self, sampled: bool, every: int, share: float | None) -> tuple[float, float]:
        """The factor on ``every`` that keeps these probings within ``share`` of the training time, and the
        share they then take (``(1, 0)`` without a budget or a measurement)."""
        recent = self._seconds[sampled]
        training = self._training_seconds()
        if not share or not recent or every <= 0 or training <= 0 or self._steps_seen < 2:
            return 1.0 if not sampled else 0.0, 0.0
        per_step = training / self._steps_seen
        per_probing = sum(recent) / len(recent)
        needed = per_probing / (share * per_step) / every  # interval (steps) x per_step x share >= per_probing
        factor = max(needed, 1.0 if not sampled else 0.0)
        return factor, per_probing / (every * factor * per_step)

    def state(self) -> dict[str, Any]:
        """What every process must share (broadcast from the main process)."""
        return {"next_due": dict(self.next_due), "factor": self.factor}

    def load(self, state: Mapping[str, Any]) -> None:
        self.next_due = dict(state["next_due"])
        self.factor = float(state["factor"])
