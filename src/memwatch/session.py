"""The one probe core every front-end calls: "probe this snapshot with this plan, write to this store".

A :class:`ProbeSession` holds what stays fixed across the snapshots of a run: the config and its
probe objects, the reference and holdout sets, the store and its run, and the rule engine. It owns

* *when*: :meth:`ProbeSession.due` (each probe's cadence) and :meth:`ProbeSession.step` for in-loop
  front-ends, which also swaps EMA weights in and makes every process agree on ``should_stop``;
* *whether*: :meth:`ProbeSession.applicable` (cadence on, holdout given, text-to-image model);
* *how*: :meth:`ProbeSession.probe` runs each probe's per-process part, gathers the rows in process
  order, reduces them on the main process, draws the shared samples once for all sample probes,
  records every result with its evidence in the store, and turns the metrics into events.

The front-ends (the in-training monitor, ``memwatch probe`` and ``memwatch watch``) only decide which
snapshot to probe and when. Nothing here knows a probe by name: probes are objects
(:class:`memwatch.probes.base.Probe`), configured by the config or handed over as instances.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memwatch import __version__
from memwatch.config import MonitorConfig
from memwatch.embedders import build_embedder
from memwatch.errors import MemwatchError, ProbeUnavailable
from memwatch.evidence import save_evidence_grid
from memwatch.history import load_history
from memwatch.model_parts import ModelParts
from memwatch.modes import ema_weights, eval_mode, preserved_rng
from memwatch.probes.base import Probe, ProbeContext, ProbeData, ProbeResult, Samples
from memwatch.refset import ReferenceSet, load_reference_set
from memwatch.rules import Event, Rule, RuleEngine, parse_rules, severity_at_least
from memwatch.samples import draw_samples, plan_samples
from memwatch.store import STORE_NAME, Store
from memwatch.workers import Workers

log = logging.getLogger("memwatch")

EVENTS_NAME = "events.jsonl"


def as_refset(value: str | Path | ReferenceSet | None, what: str) -> ReferenceSet:
    """A :class:`ReferenceSet` from a path (or the set itself)."""
    if value is None:
        raise MemwatchError(f"no {what}: pass it to the front-end or set '{what.split()[0]}' in the config")
    return value if isinstance(value, ReferenceSet) else load_reference_set(value, what=what)


class ProbeSession:
    """Probe snapshots of one run and record everything.

    Args:
        config: the validated config.
        refs: the training set.
        holdout: non-members (enables probes that need them), or None.
        output_dir: where the store, ``events.jsonl`` and evidence go.
        probes: probe instances to use besides (or instead of, by name) the configured ones.
        workers: how work is split across processes (default: this process alone).
        on_event: called with each event on the main process.
        log_metrics: called on the main process with ``({"memwatch/<probe>/<metric>": value}, step)``
            (e.g. ``accelerator.log``).

    Example:
        >>> session = ProbeSession(load_config(None), load_reference_set("train"), None, "out")  # doctest: +SKIP
        >>> events = session.probe(1000, unet, scheduler)  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MonitorConfig,
        refs: ReferenceSet,
        holdout: ReferenceSet | None,
        output_dir: str | Path,
        *,
        probes: Sequence[Probe] = (),
        workers: Workers | None = None,
        on_event: Callable[[Event], None] | None = None,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.workers = workers or Workers()
        self.on_event = on_event
        self.log_metrics = log_metrics
        self.probes = _merge_probes(config.make_probes(), probes)
        self.data = ProbeData(
            refs, holdout, lambda resolution: build_embedder(config.embedder, resolution), config.cache_dir
        )
        self.engine = RuleEngine(self.rules())
        self.events: list[Event] = []
        self.should_stop = False
        self.onset_step: int | None = None
        self.first_alarm_step: int | None = None
        self.last_clean_step: int | None = None
        #: latest value of every metric, keyed "probe/metric" (for progress bars and callbacks)
        self.latest: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.last_step: int | None = None
        #: probe name -> the last step it ran at
        self.probed_at: dict[str, int] = {}
        self._last_args: tuple[Any, Any, Any] | None = None
        self.store: Store | None = None
        self.run_name = config.run_name or "run-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        for p in self.probes:
            if p.every and p.needs_holdout and holdout is None:
                log.warning("%s probe off: no holdout set given (config 'holdout')", p.name)
        if self.workers.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.store = Store(self.output_dir / STORE_NAME)
            self.run_id = self.store.ensure_run(
                self.run_name,
                config=self.run_config(),
                reference=refs.summary(),
                holdout=holdout.summary() if holdout else None,
                info=environment_info(),
            )

    @property
    def refs(self) -> ReferenceSet:
        return self.data.refs

    @property
    def holdout(self) -> ReferenceSet | None:
        return self.data.holdout

    def run_config(self) -> dict[str, Any]:
        """The config stored with the run: the validated config with every probe's actual settings."""
        return {
            **self.config.raw,
            "probes": {p.name: p.settings.to_dict() for p in self.probes},
            "rules": [r.to_dict() for r in self.engine.rules],
        }

    def rules(self) -> list[Rule]:
        """The config's rules, plus the default rules of probes handed over as instances when the config
        uses the default rules (a user's ``rules:`` list is taken as complete)."""
        if not self.config.default_rules:
            return list(self.config.rules)
        configured = {cls.name for cls in self.config.probe_classes()}
        extra = [rule for p in self.probes if p.name not in configured for rule in p.default_rules]
        return list(self.config.rules) + parse_rules(extra, "probes=")

    def probe_hash(self, probe: Probe) -> str:
        """Key of a probe's stored results (see :meth:`MonitorConfig.probe_hash`)."""
        return self.config.probe_hash(probe)

    # ------------------------------------------------------------------ when and whether

    def applicable(self, *, text_to_image: bool = False) -> list[Probe]:
        """Probes that run on a model of this kind with this run's data (cadence on, needs met)."""
        has_holdout = self.holdout is not None
        return [p for p in self.probes if p.applies(text_to_image=text_to_image, has_holdout=has_holdout)]

    def due(self, step: int, *, text_to_image: bool = False) -> list[Probe]:
        """Applicable probes whose cadence falls on ``step`` and that have not run at it yet."""
        return [
            p
            for p in self.applicable(text_to_image=text_to_image)
            if step % p.every == 0 and self.probed_at.get(p.name) != step
        ]

    def step(self, step: int, model: Any, scheduler: Any, *, ema: Any = None) -> list[Event]:
        """In-loop front-ends: run the probes due at ``step``; call it every step on every process.

        The cadence depends only on the step number, so every process probes at the same steps.
        With ``weights: ema`` the EMA weights are swapped in for the probes and restored afterwards.

        Args:
            step: the optimizer step just completed.
            model: the UNet being trained (wrapped or not).
            scheduler: the training noise scheduler.
            ema: a diffusers ``EMAModel`` or an EMA copy of the model.

        Returns:
            The events raised (main process; empty elsewhere).
        """
        self.last_step = step
        self._last_args = (model, scheduler, ema)
        due = self.due(step, text_to_image=ModelParts.of(model, scheduler).text_to_image)
        return self._probe_live(step, model, scheduler, ema, due) if due else []

    def finish(self) -> list[Event]:
        """In-loop front-ends: probe the last step seen by :meth:`step` with every applicable probe
        that has not run at it (so the final model is always measured). Collective, like :meth:`step`."""
        if self._last_args is None or self.last_step is None:
            return []
        model, scheduler, ema = self._last_args
        self._last_args = None
        pending = [p for p in self.applicable() if self.probed_at.get(p.name) != self.last_step]
        return self._probe_live(self.last_step, model, scheduler, ema, pending) if pending else []

    def _probe_live(self, step: int, model: Any, scheduler: Any, ema: Any, probes: list[Probe]) -> list[Event]:
        with ema_weights(model, ema, self.config.weights) as unet:
            events = self.probe(step, unet, scheduler, [p.name for p in probes])
        self._sync_stop()
        return events

    def _sync_stop(self) -> None:
        """Make every process agree on ``should_stop`` (only the main process sees events)."""
        if self.workers.num_processes > 1:
            self.should_stop = any(self.workers.gather([self.should_stop]))

    # ------------------------------------------------------------------ probing

    def probe(
        self,
        step: int,
        model: Any,
        scheduler: Any = None,
        probes: Sequence[str] | None = None,
        *,
        kind: str = "live",
        path: str | None = None,
        weights_sha256: str | None = None,
    ) -> list[Event]:
        """Run probes on a model snapshot and record the results; call it on every process.

        The model is put in eval mode and every RNG stream is restored afterwards. Probes that do
        not apply to the model (a text-to-image-only probe on an unconditional UNet) are skipped;
        when none is left nothing is recorded. A probe that cannot run on this data
        (:class:`~memwatch.errors.ProbeUnavailable`, e.g. no captions) is recorded as failed with
        the reason, and the others still run.

        Args:
            step: training step of the snapshot.
            model: the UNet (with ``scheduler``), :class:`~memwatch.model_parts.ModelParts`, a loaded
                snapshot or a pipeline.
            scheduler: its noise scheduler (default: the object's own).
            probes: probe names (default: every applicable probe).
            kind, path, weights_sha256: how the snapshot is recorded in the store.

        Returns:
            Events raised (main process; empty elsewhere).
        """
        t0 = time.perf_counter()
        parts = ModelParts.of(model, scheduler)
        known = {p.name: p for p in self.probes}
        if probes is None:
            chosen = self.applicable(text_to_image=parts.text_to_image)
        else:
            unknown = sorted(set(probes) - set(known))
            if unknown:
                raise MemwatchError(f"unknown probe(s) {unknown}: use names from {sorted(known)}")
            chosen = [known[name] for name in probes]
        chosen = [p for p in chosen if parts.text_to_image or not p.text_to_image_only]
        if not chosen:
            return []
        ctx = ProbeContext(step, parts, self.data, self.workers, timings=self.timings)
        outcomes: list[tuple[Probe, list[ProbeResult]]] = []
        failures: dict[str, str] = {}
        with preserved_rng(), eval_mode(*parts.modules()):
            for probe in [p for p in chosen if not p.needs_samples]:
                rows = self._gathered(probe.name, failures, lambda probe=probe: probe.compute(ctx))
                if rows is not None and self.workers.is_main:
                    outcomes.append((probe, _results(probe.reduce(rows, ctx))))
            sample_probes = [p for p in chosen if p.needs_samples]
            if sample_probes:
                ctx.samples = self._samples(ctx, [p.name for p in sample_probes], failures)
                for probe in sample_probes:
                    if ctx.samples is not None and self.workers.is_main:
                        outcomes.append((probe, _results(probe.reduce([], ctx))))
        events: list[Event] = []
        if self.workers.is_main:
            events = self._record(step, outcomes, ctx, kind=kind, path=path, weights_sha256=weights_sha256,
                                  failures=failures)  # fmt: skip
        for p in chosen:
            self.probed_at[p.name] = step
        self._add_time("total", time.perf_counter() - t0)
        return events

    def _gathered(self, name: str, failures: dict[str, str], compute: Callable[[], list]) -> list | None:
        """Every process's rows of one probe, in process order; None (and a failure) if it cannot run.

        The reasons a probe cannot run come from the data (captions), which every process sees
        alike, so all processes skip the same probes and no collective call is left waiting.
        """
        try:
            rows = compute()
        except ProbeUnavailable as e:
            log.warning("%s not run: %s", name, e)
            failures[name] = str(e)
            return None
        return self.workers.gather(rows)

    def _samples(self, ctx: ProbeContext, names: list[str], failures: dict[str, str]) -> Samples | None:
        """The shared fixed-seed samples (main process), drawn in shares across processes."""
        try:
            plan = plan_samples(self.config.sampling, ctx.parts, ctx.data)
        except ProbeUnavailable as e:
            log.warning("%s not run: %s", "/".join(names), e)
            failures.update(dict.fromkeys(names, str(e)))
            return None
        images, seconds = draw_samples(self.config.sampling, ctx.parts, plan, self.workers)
        self._add_time("sampling", seconds)
        return Samples(images, plan) if images is not None else None

    # ------------------------------------------------------------------ recording (main process)

    def _record(
        self,
        step: int,
        outcomes: list[tuple[Probe, list[ProbeResult]]],
        ctx: ProbeContext,
        *,
        kind: str,
        path: str | None,
        weights_sha256: str | None,
        failures: dict[str, str],
    ) -> list[Event]:
        assert self.store is not None
        t0 = time.perf_counter()
        by_name = {p.name: p for p in self.probes}
        snap = self.store.add_snapshot(self.run_id, step, kind=kind, path=path, weights_sha256=weights_sha256)
        for name, reason in failures.items():
            self.store.record_failure(snap, name, config_hash=self.probe_hash(by_name[name]), error=reason)
        flat: dict[str, float] = {}
        evidence: dict[str, dict] = {}
        for probe, results in outcomes:
            main = results[0]
            if probe.needs_samples and ctx.samples is not None:
                grid = save_evidence_grid(
                    self.output_dir / "evidence" / f"{probe.name}-step{step:08d}.png",
                    ctx.samples.images,
                    probe.evidence_pairs(main),
                    {it.id: it.path for it in self.refs.items},
                    top=self.config.evidence_top,
                )
                if grid is not None:
                    main.evidence.append(str(grid.relative_to(self.output_dir)))
            evidence[probe.name] = probe.evidence(main)
            for result in results:
                self.store.write_result(snap, result, config_hash=self.probe_hash(probe), host=socket.gethostname())
                flat.update({f"{result.probe}/{k}": v for k, v in result.metrics.items()})
        self._add_time("store", time.perf_counter() - t0)
        self.latest.update(flat)
        if self.log_metrics is not None:
            self.log_metrics({f"memwatch/{k}": v for k, v in flat.items()}, step)
        events = self.engine.observe(step, flat, evidence)
        self._track(step, flat, events)
        for event in events:
            self._emit(event)
        return events

    def _track(self, step: int, flat: dict[str, float], events: list[Event]) -> None:
        """Update onset, first alarm and last clean step from one probed step."""
        onset = [f"{p.name}/{p.onset_metric}" for p in self.probes if p.onset_metric]
        if self.onset_step is None and any(flat.get(m, 0) > 0 for m in onset):
            self.onset_step = step
        if self.first_alarm_step is None and any(severity_at_least(e.severity, "warning") for e in events):
            self.first_alarm_step = step
        if self.first_alarm_step is None:
            self.last_clean_step = step

    def replay(self) -> int:
        """Rebuild rule state, onset and last clean step from this run's stored metrics.

        A front-end that probes a run in several invocations (``memwatch probe`` from cron) calls
        this first, so rules continue where they stopped: the events they raise again for stored
        steps were already recorded and are not emitted twice.

        Returns:
            The number of stored steps replayed.
        """
        if self.store is None:
            return 0
        history = load_history(self.store, self.run_name)
        self.events = [Event.from_dict(e) for e in history.events]
        by_step = history.by_step()
        for step, values in by_step.items():
            self._track(step, values, self.engine.observe(step, values))
        if self.config.stop_on:
            self.should_stop = any(severity_at_least(e.severity, self.config.stop_on) for e in self.events)
        return len(by_step)

    def _emit(self, event: Event) -> None:
        assert self.store is not None
        self.events.append(event)
        self.store.add_event(self.run_id, event.to_dict())
        level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}[event.severity]
        log.log(level, "[%s] %s", event.rule, event.message)
        with open(self.output_dir / EVENTS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run": self.run_name, **event.to_dict()}, sort_keys=True, default=str) + "\n")
        if self.log_metrics is not None:
            self.log_metrics({f"memwatch/events/{event.rule}": event.value}, event.step)
        if self.on_event is not None:
            self.on_event(event)
        if self.config.stop_on and severity_at_least(event.severity, self.config.stop_on):
            self.should_stop = True

    def _add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """Onset step, last clean step, events by severity and the paths written."""
        by_sev: dict[str, int] = {}
        for e in self.events:
            by_sev[e.severity] = by_sev.get(e.severity, 0) + 1
        return {
            "run": self.run_name,
            "last_step": self.last_step,
            "onset_step": self.onset_step,
            "first_alarm_step": self.first_alarm_step,
            "last_clean_step": self.last_clean_step,
            "events": by_sev,
            "stopped": self.should_stop,
            "output_dir": str(self.output_dir),
            "store": str(self.output_dir / STORE_NAME),
            "events_file": str(self.output_dir / EVENTS_NAME),
            "timings": {k: round(v, 3) for k, v in sorted(self.timings.items())},
        }

    def close(self) -> dict[str, Any]:
        """Write ``summary.json`` and close the store (main process); returns the summary."""
        summary = self.summary()
        if self.store is not None:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.store.close()
            self.store = None
        return summary


def _merge_probes(configured: list[Probe], given: Sequence[Probe]) -> list[Probe]:
    """The configured probes with given instances replacing those of the same name, new ones appended."""
    for p in given:
        if not isinstance(p, Probe):
            raise MemwatchError(f"probes= takes Probe instances, got {type(p).__name__}")
    by_name = {p.name: p for p in given}
    out = [by_name.pop(p.name, p) for p in configured]
    return out + list(by_name.values())


def _results(out: ProbeResult | Sequence[ProbeResult]) -> list[ProbeResult]:
    return [out] if isinstance(out, ProbeResult) else list(out)


def environment_info() -> dict[str, Any]:
    """Versions of memwatch and the libraries that shape its results, and the host name."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("memwatch", "torch", "diffusers", "accelerate", "open_clip_torch", "facenet-pytorch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["memwatch"] = versions["memwatch"] or __version__
    return {"versions": versions, "host": socket.gethostname()}
