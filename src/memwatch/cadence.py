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

Sampling-free probes (membership) keep their fixed ``every``. Without ``adaptive`` every probe runs at
the steps that are multiples of its ``every``, as before. The front-ends that probe saved checkpoints
(``memwatch probe`` / ``watch``) probe every checkpoint and ignore cadence.

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
        0.05,
        "most probe time per training time (0.05: 5%), measured on itself; null: no limit",
        min=0.0,
        exclusive=True,
        source="docs/benchmarks.md: 4.2% at the demo's fixed cadence",
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
        #: probe name -> the step at which it is next due (adaptive sample probes only)
        self.next_due: dict[str, int] = {}
        self._started: float | None = None
        self._probe_seconds = 0.0
        self._sample_seconds: list[float] = []
        self._steps_seen = 0

    def due(self, probe: str, step: int, *, every: int, sample_probe: bool) -> bool:
        """Whether ``probe`` (cadence ``every``) is due at ``step``."""
        if every <= 0:
            return False
        if not (self.settings.adaptive and sample_probe):
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
        if sampled:
            self._sample_seconds.append(seconds)

    def overhead(self) -> float:
        """Probe time / training time so far (NaN before any training time was measured)."""
        if self._started is None:
            return math.nan
        training = self.clock() - self._started - self._probe_seconds
        return self._probe_seconds / training if training > 0 else math.nan

    def schedule(self, step: int, probes: Mapping[str, int], low: float, receding: bool) -> dict[str, int]:
        """After sample probes ran at ``step``: when each runs next (main process; broadcast the result).

        Args:
            step: the step just probed.
            probes: name -> every of the sample probes that ran.
            low: the early edge of the latest onset forecast (NaN: no forecast).
            receding: the precursor is flat or moving away from the threshold.

        Returns:
            name -> next due step, also kept in :attr:`next_due`.

        Example:
            >>> c = Cadence(CadenceSettings(budget=None))
            >>> c.schedule(1000, {"regurgitation": 200}, low=1400.0, receding=False)
            {'regurgitation': 1100}
        """
        s = self.settings
        factor = 1.0
        if math.isfinite(low):
            # A quarter of the way to the early edge, so about four probes fall before it.
            factor = min(1.0, max(s.fastest, (low - step) / 4 / min(probes.values())))
        elif receding:
            factor = s.slowest  # nothing approaches the threshold: nothing to chase
        factor = max(factor, self._budget_factor(probes))
        self.factor = factor
        for name, every in probes.items():
            self.next_due[name] = step + max(1, round(every * factor))
        return dict(self.next_due)

    def _budget_factor(self, probes: Mapping[str, int]) -> float:
        """The smallest factor that keeps sampling within the budget (0 without a measurement)."""
        budget = self.settings.budget
        if budget is None or not self._sample_seconds or self._started is None or self._steps_seen < 2:
            return 0.0
        training = self.clock() - self._started - self._probe_seconds
        if training <= 0:
            return 0.0
        per_step = training / self._steps_seen
        recent = self._sample_seconds[-5:]
        per_probe = sum(recent) / len(recent)
        # What the other probes (fixed cadence) already take comes off the budget; sampling keeps at
        # least a tenth of it, so the forecast never stops altogether.
        other = (self._probe_seconds - sum(self._sample_seconds)) / training
        available = max(budget - other, 0.1 * budget)
        # interval (steps) x per_step x available >= per_probe
        return per_probe / (available * per_step) / min(probes.values())

    def state(self) -> dict[str, Any]:
        """What every process must share (broadcast from the main process)."""
        return {"next_due": dict(self.next_due), "factor": self.factor}

    def load(self, state: Mapping[str, Any]) -> None:
        self.next_due = dict(state["next_due"])
        self.factor = float(state["factor"])
