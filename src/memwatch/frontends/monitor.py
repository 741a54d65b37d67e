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
* Checkpoints saved with ``accelerator.save_state`` are recorded as sightings of the probed weights
  (a save-state pre-hook that only reads the model), so the report can name the last clean checkpoint.
* Results go to the store (one transaction per probe result), to ``accelerator.log`` under
  ``memwatch/<probe>/<metric>``, and through the rules to events (store, log, trackers,
  ``events.jsonl``, the ``on_event`` callback, and any :class:`~memwatch.core.outputs.Output` of yours).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from memwatch.core.config import MonitorConfig, load_config
from memwatch.core.outputs import Output
from memwatch.core.probe import Probe
from memwatch.core.session import ProbeSession, as_refset
from memwatch.core.workers import Workers
from memwatch.data.refset import ReferenceSet
from memwatch.signals.rules import Event
from memwatch.store import OUTPUT_SUBDIR


class MemorizationMonitor:
    """Probe a diffusion model periodically while it trains, and warn when it starts to memorize.

    Everything but the accelerate specifics (processes, trackers, the project folder) is the
    :class:`~memwatch.core.session.ProbeSession`'s: cadence, EMA swap, stop sync, probing and recording.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        config: YAML path, dict or :class:`MonitorConfig` (None: the defaults).
        reference: training images (path or :class:`ReferenceSet`); default ``config.reference``.
        holdout: non-member images for the membership probe; default ``config.holdout``.
        output_dir: where the store, events and evidence go; default ``config.output_dir``, else
            ``<accelerator project_dir>/memwatch``, else ``./memwatch``.
        on_event: called with each :class:`memwatch.signals.rules.Event` on the main process.
        probes: your own :class:`~memwatch.core.probe.Probe` instances, run with the configured ones
            (an instance replaces a configured probe of the same name).
        outputs: your own :class:`~memwatch.core.outputs.Output` objects (e.g. a chat notification): each is
            told of every probed step's metrics and every event, like an accelerate tracker.

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
        probes: Sequence[Probe] = (),
        outputs: Sequence[Output] = (),
    ):
        self.accelerator = accelerator
        self.config = load_config(config)
        holdout = holdout if holdout is not None else self.config.holdout
        cols = self.config.columns
        self.session = ProbeSession(
            self.config,
            as_refset(reference if reference is not None else self.config.reference, "reference set", cols),
            as_refset(holdout, "holdout set", cols) if holdout is not None else None,
            output_dir or self.config.output_dir or _default_output_dir(accelerator),
            probes=probes,
            workers=Workers.from_accelerator(accelerator),
            on_event=on_event,
            log_metrics=lambda values, step: accelerator.log(values, step=step),
            outputs=outputs,
        )
        self._closed = False
        # Checkpoints saved with accelerator.save_state become sightings of the weights the probes measured.
        register = getattr(accelerator, "register_save_state_pre_hook", None)
        self._save_hook = register(self._on_save_state) if callable(register) else None

    def _on_save_state(self, models: Any, weights: Any, output_dir: str) -> None:
        """accelerate's save-state pre-hook: leaves ``models`` and ``weights`` as they are (never raises)."""
        self.session.saw_checkpoint(output_dir)

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
    def last_step(self) -> int | None:
        return self.session.last_step

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
        return self.session.step(global_step, model, scheduler, ema=ema)

    def close(self) -> dict[str, Any]:
        """Finish: probe the last step seen by :meth:`step` if it was not probed, write ``summary.json``.

        Call it on every process (the final probe is collective like :meth:`step`); using the
        monitor as a context manager calls it for you.

        Returns:
            The summary (see :meth:`summary`).
        """
        if not self._closed:
            self._closed = True
            if self._save_hook is not None:
                self._save_hook.remove()
            self.session.finish()
            return self.session.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Onset step, last clean step, events by severity, timings and the paths written."""
        return self.session.summary()

    def __enter__(self) -> MemorizationMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _default_output_dir(accelerator: Any) -> Path:
    project = getattr(getattr(accelerator, "project_configuration", None), "project_dir", None)
    return Path(project) / OUTPUT_SUBDIR if project else Path(OUTPUT_SUBDIR)
