"""The in-training monitor: probes a model inside its accelerate training loop.

Three lines in a training loop::

    from memwatch import MemorizationMonitor
    with MemorizationMonitor(accelerator, "memwatch.yaml", reference="data/train", holdout="data/holdout") as monitor:
        ...
            monitor.step(global_step, model, noise_scheduler)   # every step; probes run when due

What it guarantees:

* Probing never disturbs training: modes, gradients and every RNG stream are restored, and probes
  call the unwrapped module (no DDP collectives), so a seeded run follows the same loss trajectory
  with or without the monitor.
* Multi-process: every process calls ``step`` at the same steps (the cadence depends only on the
  step number); sample generation and membership losses are split across processes and gathered
  with ``gather_object``. Only the main process writes the store, logs and events. The monitor makes
  no collective call anywhere else, so a checkpoint saved on the main process alone cannot hang.
* Results go to the store (one transaction per probe result), to ``accelerator.log`` under
  ``memwatch/<probe>/<metric>``, and through the rules to events (store, log, trackers,
  ``events.jsonl`` and the ``on_event`` callback).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from memwatch.config import MonitorConfig, load_config
from memwatch.errors import MemwatchError
from memwatch.modes import unwrap_model
from memwatch.refset import ReferenceSet
from memwatch.rules import Event
from memwatch.session import PROBES, ProbeSession, Workers, as_refset
from memwatch.store import OUTPUT_SUBDIR


class MemorizationMonitor:
    """Probe a diffusion model periodically while it trains, and warn when it starts to memorize.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        config: YAML path, dict or :class:`MonitorConfig` (None: ``configs/default.yaml``).
        reference: training images (path or :class:`ReferenceSet`); default ``config.reference``.
        holdout: non-member images for the membership probe; default ``config.holdout``.
        output_dir: where the store, events and evidence go; default ``config.output_dir``, else
            ``<accelerator project_dir>/memwatch``, else ``./memwatch``.
        on_event: called with each :class:`memwatch.rules.Event` on the main process.

    Example:
        >>> with MemorizationMonitor(acc, "configs/demo.yaml", reference="data/train") as monitor:  # doctest: +SKIP
        ...     for step, batch in enumerate(loader):
        ...         ...  # forward, backward, optimizer step
        ...         monitor.step(step, model, noise_scheduler)
        ...         if monitor.should_stop:
        ...             break
    """

    def __init__(
        self,
        accelerator: Any,
        config: str | Path | dict | MonitorConfig | None = None,
        reference: str | Path | ReferenceSet | None = None,
        holdout: str | Path | ReferenceSet | None = None,
        *,
        output_dir: str | Path | None = None,
        on_event: Callable[[Event], None] | None = None,
    ):
        self.accelerator = accelerator
        self.config = load_config(config)
        holdout = holdout if holdout is not None else self.config.holdout
        self.session = ProbeSession(
            self.config,
            as_refset(reference if reference is not None else self.config.reference, "reference set"),
            as_refset(holdout, "holdout set") if holdout is not None else None,
            output_dir or self.config.output_dir or _default_output_dir(accelerator),
            workers=Workers.from_accelerator(accelerator),
            on_event=on_event,
            log_metrics=lambda values, step: accelerator.log(values, step=step),
        )
        self.last_step: int | None = None
        self._probed: dict[str, int] = {}
        self._last_args: tuple[nn.Module, Any, Any] | None = None
        self._closed = False

    # Read-only views of the session's state, for training loops and callbacks.
    @property
    def should_stop(self) -> bool:
        """True once an event at or above ``stop_on`` fired (the same on every process)."""
        return self.session.should_stop

    @property
    def latest(self) -> dict[str, float]:
        """Latest value of every metric, keyed ``"probe/metric"`` (main process)."""
        return self.session.latest

    @property
    def events(self) -> list[Event]:
        return self.session.events

    @property
    def last_clean_step(self) -> int | None:
        """Last probed step before any rule at ``warning`` or above fired."""
        return self.session.last_clean_step

    @property
    def onset_step(self) -> int | None:
        """First probed step at which a sample regurgitated a training image."""
        return self.session.onset_step

    @property
    def first_alarm_step(self) -> int | None:
        return self.session.first_alarm_step

    @property
    def output_dir(self) -> Path:
        return self.session.output_dir

    def step(self, global_step: int, model: nn.Module, scheduler: Any, *, ema: Any = None) -> list[Event]:
        """Run the probes that are due at ``global_step``; call it every step on every process.

        Args:
            global_step: the optimizer step just completed.
            model: the UNet being trained (wrapped or not).
            scheduler: the training noise scheduler.
            ema: a diffusers ``EMAModel`` or an EMA copy of the model; probed instead of the raw
                weights when the config says ``weights: ema``.

        Returns:
            The events this step raised (main process; empty elsewhere).
        """
        self.last_step = global_step
        self._last_args = (model, scheduler, ema)
        due = [p for p in PROBES if self._due(p, global_step)]
        return self._probe(global_step, model, scheduler, ema, due) if due else []

    def close(self) -> dict[str, Any]:
        """Finish: probe the last step seen by :meth:`step` if it was not probed, write ``summary.json``.

        Call it on every process (the final probe is collective like :meth:`step`); using the
        monitor as a context manager calls it for you.

        Returns:
            The summary (see :meth:`summary`).
        """
        if self._closed:
            return self.summary()
        if self._last_args is not None and self.last_step is not None:
            due = [p for p in PROBES if self.session.enabled(p) and self._probed.get(p) != self.last_step]
            if due:
                self._probe(self.last_step, *self._last_args, due)
        self._closed = True
        self._last_args = None
        return self.session.close(self.last_step)

    def summary(self) -> dict[str, Any]:
        """Onset step, last clean step, events by severity, timings and the paths written."""
        return self.session.summary(self.last_step)

    def __enter__(self) -> MemorizationMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _due(self, probe: str, step: int) -> bool:
        every = getattr(self.config, probe).every
        return self.session.enabled(probe) and step % every == 0 and self._probed.get(probe) != step

    def _probe(self, step: int, model: nn.Module, scheduler: Any, ema: Any, due: list[str]) -> list[Event]:
        with _probe_weights(model, ema, self.config.weights) as unet:
            events = self.session.probe(step, unet, scheduler, due)
        for p in due:
            self._probed[p] = step
        self._sync_stop()
        return events

    def _sync_stop(self) -> None:
        """Make every process agree on ``should_stop`` (called at probe steps, which all processes share)."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            flag = [self.session.should_stop]
            broadcast_object_list(flag, from_process=0)
            self.session.should_stop = bool(flag[0])


def _default_output_dir(accelerator: Any) -> Path:
    project = getattr(getattr(accelerator, "project_configuration", None), "project_dir", None)
    return Path(project) / OUTPUT_SUBDIR if project else Path(OUTPUT_SUBDIR)


class _probe_weights:
    """Context manager yielding the module to probe: raw weights, or the EMA weights swapped in."""

    def __init__(self, model: nn.Module, ema: Any, which: str):
        self.model, self.ema, self.which = unwrap_model(model), ema, which
        self._swapped = False

    def __enter__(self) -> nn.Module:
        if self.which != "ema":
            return self.model
        if self.ema is None:
            raise MemwatchError("config 'weights: ema' but monitor.step() got no ema=...: pass the EMA model")
        if isinstance(self.ema, nn.Module):
            return unwrap_model(self.ema)
        params = list(self.model.parameters())
        self.ema.store(params)
        self.ema.copy_to(params)
        self._swapped = True
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self._swapped:
            self.ema.restore(list(self.model.parameters()))
