"""When in-training probes run: each probe's ``every``, adapted for the sample probes under a budget of counted work.

Sampling is what costs (``num_samples x inference_steps`` UNet passes). With ``cadence.adaptive`` on,
the sample probes (regurgitation, forecast, ...) run

* more often as the onset forecast approaches: the next probe comes at most a quarter of the way to the
  forecast band's early edge, and at least every ``every x fastest`` steps, so several probes fall
  between a warning and the onset it forecasts;
* less often while the precursor is flat or moving away from the threshold (``every x slowest``);
* never more often than the budget allows: the probes' *work* is kept at or below ``budget`` times the
  training's work, both counted in denoiser evaluations (images through the UNet's forward pass,
  :class:`WorkMeter`; a training step's forward and backward count three, the usual estimate of a
  backward pass as twice a forward: Kaplan et al. 2020). The budget is a bank: work not spent while the
  precursor is far from the threshold (probes every ``every x slowest`` steps) is spent when it
  approaches, so probes come densely where the forecast needs them and the run's total stays within it.

Work is counted, not timed, so the same seed and config probe at the same steps on any machine and under
any load, and a recorded run can be replayed exactly; the measured wall time is still reported
(:meth:`Cadence.overhead`). Sampling-free probes (membership) keep their ``every`` unless they alone would
take more than a quarter of the budget (:data:`SAMPLING_FREE_SHARE`); then they are stretched too, so sampling,
which the forecast reads, always has the rest.
Without ``adaptive`` every probe runs at the steps that are multiples of its ``every``. The front-ends that
probe saved checkpoints (``memwatch probe`` / ``watch``) probe every checkpoint and ignore cadence.

Example:
    >>> c = Cadence(CadenceSettings())
    >>> c.due("regurgitation", 100, every=100, sample_probe=True)
    True
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from memwatch.settings import Settings, setting

#: Work of a training step per image through the forward pass: forward plus backward, the backward about
#: twice the forward (Kaplan et al. 2020, "Scaling laws for neural language models": 6N per token to train,
#: 2N per token forward).
TRAINING_PASS_WORK = 3
#: The most of the budget the sampling-free probes (membership) may take; the sample probes, which the onset
#: forecast reads, have the rest (scripts/tune_forecast.py --robust replays a quarter and a half).
SAMPLING_FREE_SHARE = 0.25


@dataclass
class CadenceSettings(Settings):
    """How often in-training probes run (section ``cadence``)."""

    section = "cadence"
    adaptive: bool = setting(
        True, "sample probes run more often as the onset forecast approaches, less while the precursor is flat"
    )
    budget: float | None = setting(
        0.02,
        "most probe work per training work (0.02: 2%), both counted in denoiser evaluations, so that the cadence "
        "is the same on any machine; null: no limit",
        min=0.0,
        exclusive=True,
        source="memwatch: a monitor left on by default costs at most 3% of training time; on the demo recipe the "
        "wall clock runs ~1.1x the counted share (sampling's scheduler, embedding and store are not UNet passes), "
        "so 2% of the work leaves margin (docs/benchmarks.md, scripts/bench_monitor.py)",
    )
    fastest: float = setting(
        0.25, "shortest interval between sample probes, as a share of their every", min=0.0, max=1.0, exclusive=True
    )
    slowest: float = setting(2.0, "longest interval between sample probes, as a multiple of their every", min=1.0)


class WorkMeter:
    """Counts denoiser evaluations: images through the forward pass of the modules it watches, training's and
    the probes' apart. It only reads the inputs' batch size (a forward pre-hook), never changes anything.

    Example:
        >>> import torch
        >>> net, meter = torch.nn.Linear(2, 2), WorkMeter()
        >>> meter.watch(net)
        >>> _ = net(torch.zeros(4, 2)).sum().backward()  # a training step of 4 images
        >>> with meter.probing():
        ...     with torch.no_grad():
        ...         _ = net(torch.zeros(8, 2))
        >>> meter.training, meter.probing_work, meter.largest_batch
        (12, 8, 4)
    """

    def __init__(self) -> None:
        self.training = 0
        self.probing_work = 0
        #: the most images training has put through a watched module in one forward pass (0: none seen): a
        #: batch that fits beside training, so the probes may sample as many at once
        self.largest_batch = 0
        self._probing = False
        self._handles: dict[int, Any] = {}

    def watch(self, module: Any) -> None:
        """Count the forward passes of ``module`` from now on (once per module; wrappers are unwrapped)."""
        from memwatch.models.modes import unwrap_model

        inner = unwrap_model(module)
        register = getattr(inner, "register_forward_pre_hook", None)
        if id(inner) in self._handles or register is None:
            return
        try:
            self._handles[id(inner)] = register(self._count, with_kwargs=True)
        except TypeError:  # a module class whose hooks take no kwargs: count what is seen positionally
            self._handles[id(inner)] = register(lambda m, args: self._count(m, args, {}))

    def _count(self, module: Any, args: tuple, kwargs: dict) -> None:
        import torch

        try:
            x = args[0] if args else kwargs.get("sample", kwargs.get("x"))
            n = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
        except Exception:  # a hook inside the training's forward pass must never raise into it
            n = 1
        if self._probing:
            self.probing_work += n
        else:
            self.training += n * (TRAINING_PASS_WORK if torch.is_grad_enabled() else 1)
            self.largest_batch = max(self.largest_batch, n)

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """Forward passes inside the block are the probes' work."""
        self._probing = True
        try:
            yield
        finally:
            self._probing = False

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


class Cadence:
    """Decides, step by step, which probes are due (one per session; the same answer on every process).

    Args:
        settings: the ``cadence`` section.
        clock: seconds, monotonic, for the measured wall time only (tests pass a fake one); the cadence itself
            follows counted work.
    """

    def __init__(self, settings: CadenceSettings, clock: Callable[[], float] = time.perf_counter):
        self.settings = settings
        self.clock = clock
        #: share of ``every`` the next sample probe waits (1.0: the fixed cadence)
        self.factor = 1.0
        #: probe name -> the step at which it is next due (adaptive cadence only)
        self.next_due: dict[str, int] = {}
        self._started: float | None = None
        self._steps_seen = 0
        self._known: dict[str, tuple[int, bool]] = {}
        self._training_work = 0.0
        #: per unit ("work", "seconds"): the probes' total, their recent probings (those that drew samples and
        #: those that did not) and the first sample probing's cost (the bank's opening grant)
        self._probes = {unit: _Ledger() for unit in ("work", "seconds")}

    def due(self, probe: str, step: int, *, every: int, sample_probe: bool) -> bool:
        """Whether ``probe`` (cadence ``every``) is due at ``step``."""
        if every <= 0:
            return False
        if not self.settings.adaptive:
            return step % every == 0
        return step >= self.next_due.setdefault(probe, every)

    def tick(self, training_work: float = 0.0) -> None:
        """Called at every ``step()`` with the training work counted so far (cumulative); the clock starts at
        the first call."""
        if self._started is None:
            self._started = self.clock()
        self._steps_seen += 1
        self._training_work = max(self._training_work, float(training_work))

    def probed(self, seconds: float, *, sampled: bool, work: float = 0.0) -> None:
        """Record one probing (main process): its wall time, whether it drew samples, and its counted work."""
        self._probes["seconds"].add(seconds, sampled)
        self._probes["work"].add(work, sampled)

    def overhead(self) -> float:
        """Probe time / training time so far, measured on the wall clock (NaN before any training time)."""
        training = self._training_seconds()
        return self._probes["seconds"].total / training if training > 0 else math.nan

    def work_share(self) -> float:
        """Probe work / training work so far, in denoiser evaluations (NaN before any training work was counted)."""
        return self._probes["work"].total / self._training_work if self._training_work > 0 else math.nan

    @property
    def unit(self) -> str:
        """What the budget is counted in: ``"work"``, or ``"seconds"`` when the model handed to ``step()`` did no
        counted forward pass (it is not the one that trains, e.g. an EMA copy): the wall clock is then the only
        measure, and the cadence depends on the machine's load (the summary says so)."""
        return "work" if self._training_work > 0 or self._steps_seen < 2 else "seconds"

    def _training(self) -> float:
        return self._training_work if self.unit == "work" else self._training_seconds()

    def schedule(
        self, step: int, ran: Mapping[str, tuple[int, bool]], low: float = math.nan, receding: bool = False
    ) -> dict[str, int]:
        """After probes ran at ``step``: when each runs next (main process; broadcast the result).

        The budget is shared: the sampling-free probes may take at most :data:`SAMPLING_FREE_SHARE` of it (their
        interval is stretched when they would take more), the sample probes the rest.

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
        other_factor, _ = self._fit_budget(False, min(others, default=0), s.budget and s.budget * SAMPLING_FREE_SHARE)
        earliest = step
        if samples:
            factor = 1.0
            if math.isfinite(low) and low > step:
                # A quarter of the way to the early edge, so about four probes fall before it. (An edge at
                # the current step means onset is reached: nothing left to forecast, the usual cadence.)
                factor = min(1.0, max(s.fastest, (low - step) / 4 / min(samples.values())))
            elif receding:
                factor = s.slowest  # nothing approaches the threshold: nothing to chase
            self.factor = factor
            earliest = self._affordable(step)
        for name, every in ran.items():
            f = self.factor if every[1] else other_factor
            self.next_due[name] = max(step + max(1, round(every[0] * f)), earliest if every[1] else step)
        return {n: self.next_due[n] for n in ran}

    def _affordable(self, step: int) -> int:
        """The first step at which the bank (``budget`` x training work, less every probe's work so far) holds
        the next sample probing's work; ``step`` itself without a budget or a measurement. The first probing
        is granted: the bank starts with its cost."""
        probes, training, budget = self._probes[self.unit], self._training(), self.settings.budget
        recent = probes.recent[True]
        if budget is None or not recent or training <= 0 or self._steps_seen < 2:
            return step
        per_step = training / self._steps_seen
        cost = sum(recent) / len(recent)
        granted = probes.first_sampling or cost
        short = probes.total + cost - granted - budget * training
        return step + max(0, math.ceil(short / (budget * per_step)))

    def _training_seconds(self) -> float:
        if self._started is None:
            return 0.0
        return self.clock() - self._started - self._probes["seconds"].total

    def _fit_budget(self, sampled: bool, every: int, share: float | None) -> tuple[float, float]:
        """The factor on ``every`` that keeps these probings within ``share`` of the training (in the budget's
        unit), and the share they then take (``(1, 0)`` without a budget, or before training was measured)."""
        recent, training = self._probes[self.unit].recent[sampled], self._training()
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


@dataclass
class _Ledger:
    """The probes' cost in one unit: the total, the last five probings of each kind, the first sample probing."""

    total: float = 0.0
    recent: dict[bool, list[float]] = field(default_factory=lambda: {True: [], False: []})
    first_sampling: float | None = None

    def add(self, cost: float, sampled: bool) -> None:
        self.total += cost
        if sampled and self.first_sampling is None:
            self.first_sampling = cost
        self.recent[sampled] = [*self.recent[sampled][-4:], cost]
