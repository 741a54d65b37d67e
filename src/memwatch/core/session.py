"""The one probe core every front-end calls: "probe this snapshot with this plan, write to this store".

A :class:`ProbeSession` holds what stays fixed across the snapshots of a run: the config and its
probe objects, the reference and holdout sets, the store and its run, and the rule engine. It decides

* *when*: :meth:`ProbeSession.due` (each probe's cadence) and :meth:`ProbeSession.step` for in-loop
  front-ends, which also swaps EMA weights in and makes every process agree on ``should_stop``;
* *whether*: :meth:`ProbeSession.applicable` (cadence on, holdout given, text-to-image model);
* *how*: :meth:`ProbeSession.probe` runs each probe's per-process part, gathers the rows in process
  order, reduces them on the main process, and draws the shared samples once for all sample probes.

and hands the rest to three parts, each in its own module:

* :class:`~memwatch.core.recording.Recorder` writes the snapshot, its results, failures and events in one
  transaction;
* :class:`~memwatch.core.outputs.Outputs` tell the user (log, ``events.jsonl``, trackers, callbacks, your own);
* :class:`~memwatch.core.run_state.RunState` follows onset, at-risk and last clean step, and the keep advice.

The front-ends (the in-training monitor, ``memwatch probe`` and ``memwatch watch``) only decide which
snapshot to probe and when. Nothing here knows a probe by name: probes are objects
(:class:`memwatch.core.probe.Probe`), configured by the config or handed over as instances.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from memwatch.core.cadence import Cadence, WorkMeter
from memwatch.core.config import MonitorConfig, legacy_probe_hash
from memwatch.core.declared import Declarations
from memwatch.core.outputs import EVENTS_NAME, Output, standard_outputs
from memwatch.core.probe import Probe, ProbeContext, ProbeData, ProbeResult
from memwatch.core.recording import Outcome, Recorder
from memwatch.core.run_identity import RunIdentity
from memwatch.core.run_state import RunState, rounded
from memwatch.core.workers import Workers
from memwatch.data.refset import ReferenceSet, load_reference_set
from memwatch.embedders import build_embedder
from memwatch.errors import MemwatchError, ProbeUnavailable, failure_reason
from memwatch.hashing import state_sha256
from memwatch.models.modes import ema_weights, eval_mode, preserved_rng, unwrap_model
from memwatch.models.parts import ModelParts
from memwatch.sampling.plan import Samples, generate_share, plan_samples
from memwatch.signals.forecast import MIN_POINTS, sparse_samples_message
from memwatch.signals.rules import FORECAST, Event, Rule, RuleEngine, parse_rules
from memwatch.snapshots.checkpoints import checkpoint_step
from memwatch.store import STORE_NAME, Store
from memwatch.store.history import load_history
from memwatch.version import __version__

log = logging.getLogger("memwatch")

__all__ = ["EVENTS_NAME", "ProbeSession", "as_refset", "check_rule_metrics", "environment_info"]


def as_refset(
    value: str | Path | ReferenceSet | None, what: str, columns: dict[str, str] | None = None
) -> ReferenceSet:
    """A :class:`ReferenceSet` from a path (or the set itself); ``columns``: ``image_column`` /
    ``caption_column`` for sets stored in datasets, parquet files or tar shards."""
    if value is None:
        raise MemwatchError(f"no {what}: pass it to the front-end or set '{what.split()[0]}' in the config")
    return value if isinstance(value, ReferenceSet) else load_reference_set(value, what=what, **(columns or {}))


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
        outputs: your own :class:`~memwatch.core.outputs.Output` objects, told of every probed step and event.
        run_name: the run's name in the store; default ``config.run_name``; else the run of the store with
            this ``identity`` (resumed), else ``identity``'s name; else ``run-<UTC time>``. A run that already
            exists is resumed: its stored history is replayed into the rules.
        identity: what makes this run the same training run (its folder and data), recorded with it.
        clock: monotonic seconds for the cadence's time budget (tests pass a fake clock).

    Raises:
        MemwatchError: the store cannot be opened or written (on every process alike).

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
        outputs: Sequence[Output] = (),
        run_name: str | None = None,
        identity: RunIdentity | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.workers = workers or Workers()
        self.probes = [config.bind(p) for p in _merge_probes(config.make_probes(), probes)]
        self.data = ProbeData(
            refs, holdout, lambda resolution: build_embedder(config.embedder, resolution), config.cache_dir,
            search=config.search,
        )  # fmt: skip
        self.engine = RuleEngine(check_rule_metrics(self.rules(), self.probes, config.source))
        self.cadence = Cadence(config.cadence, clock)
        #: denoiser evaluations of training and of the probes: the cadence budgets work, not seconds
        self.meter = WorkMeter()
        self.declarations = Declarations.of_probes(self.probes)
        self.state = RunState(
            onset_keys=self.declarations.onset_keys(),
            forecast_rules={r.name for r in self.engine.rules if r.type == FORECAST},
            stop_on=config.stop_on,
        )
        #: latest value of every metric, keyed "probe/metric" (for progress bars and callbacks)
        self.latest: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.last_step: int | None = None
        #: probe name -> the last step it ran at
        self.probed_at: dict[str, int] = {}
        #: probes that could not run, each with its reason, in the order they failed
        self.failures: list[dict[str, Any]] = []
        #: in-loop: the steps at which samples were drawn (the forecast needs MIN_POINTS of them to warn)
        self.sampled_steps: list[int] = []
        self.closed = False
        self._final: dict[str, Any] | None = None  # the summary written at close (with the images at risk)
        self._data_analysed = False  # the training-set analysis is made once per run (main process)
        #: what the training-set analysis found (counts), or why it failed; None before it ran
        self.training_set: dict[str, Any] | None = None
        self._last_args: tuple[Any, Any, Any] | None = None
        self._repeat_warned = False
        self._closed_warned = False
        self.store: Store | None = None
        self.recorder: Recorder | None = None
        self.run_id = 0
        self.identity = identity
        self._legacy_config: dict[str, Any] | None = None  # the run's config, when an older memwatch started it
        self.run_name = run_name or config.run_name or ""
        for p in self.probes:
            if p.every and p.needs_holdout and holdout is None:
                log.warning("%s probe off: no holdout set given (config 'holdout')", p.name)
        error = None
        if self.workers.is_main:
            try:
                self._open_store()
            except MemwatchError as e:
                error = str(e)
        # Every process learns whether the store opened, so none is left waiting for the others.
        error, self.run_name = self.workers.broadcast((error, self.run_name))
        if error is not None:
            raise MemwatchError(error)
        self.outputs = standard_outputs(
            self.output_dir, self.run_name, log_metrics=log_metrics, on_event=on_event, extra=outputs
        )
        if self.workers.is_main:
            self.replay()
        self.state.should_stop = self.workers.broadcast(self.state.should_stop)

    def _open_store(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemwatchError(
                f"cannot create the output folder {self.output_dir} ({e.strerror}): pass a writable output_dir"
            ) from None
        self.store = Store(self.output_dir / STORE_NAME)
        if not self.run_name and self.identity is not None:
            # The same training run (folder and data) resumes whatever memwatch version or settings run now.
            self.run_name = self.store.run_with_identity(self.identity.hash) or self.identity.default_name
        if not self.run_name:
            self.run_name = "run-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.run_id = self.store.ensure_run(
            self.run_name,
            config=self.run_config(),
            identity=self.identity.hash if self.identity else None,
            reference=self.refs.summary(),
            holdout=self.holdout.summary() if self.holdout else None,
            info={**environment_info(), "processes": self.workers.num_processes},
        )
        first = self.store.run_config(self.run_id, first=True)
        self._legacy_config = first if first is not None and "sampling" not in first else None
        self.recorder = Recorder(
            self.store, self.run_id, self.output_dir, self.refs, self.holdout, evidence_top=self.config.evidence_top
        )

    # ------------------------------------------------------------------ the run's state, for loops and front-ends

    @property
    def refs(self) -> ReferenceSet:
        return self.data.refs

    @property
    def holdout(self) -> ReferenceSet | None:
        return self.data.holdout

    @property
    def events(self) -> list[Event]:
        return self.state.events

    @property
    def should_stop(self) -> bool:
        return self.state.should_stop

    @property
    def onset_step(self) -> int | None:
        return self.state.onset_step

    @property
    def at_risk_step(self) -> int | None:
        """First probed step at which a forecast rule fired (copying forecast within its horizon)."""
        return self.state.at_risk_step

    @property
    def first_alarm_step(self) -> int | None:
        return self.state.first_alarm_step

    @property
    def last_clean_step(self) -> int | None:
        return self.state.last_clean_step

    def last_model(self) -> tuple[Any, Any] | None:
        """The model and scheduler last passed to :meth:`step` (None before the first step and after
        :meth:`finish`)."""
        return None if self._last_args is None else (self._last_args[0], self._last_args[1])

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

    def result_keys(self, probe: Probe) -> list[str]:
        """The keys under which this probe's results count as measured: its key, and the key an older memwatch
        stored the same measurement under (when this run was started by one)."""
        keys = [self.probe_hash(probe)]
        if self._legacy_config is not None:
            legacy = legacy_probe_hash(probe, self.config, self._legacy_config)
            if legacy is not None and legacy not in keys:
                keys.append(legacy)
        return keys

    def measured(self, snapshot_id: int, probe: Probe) -> bool:
        """Whether the snapshot has a result of this probe with these settings (main process)."""
        assert self.store is not None
        return any(self.store.has_result(snapshot_id, probe.name, key) for key in self.result_keys(probe))

    def keep_advice(self) -> str:
        """What to keep when a warning fires now (:meth:`RunState.keep_advice`)."""
        return self.state.keep_advice(self.store, self.run_id, self.output_dir.parent)

    # ------------------------------------------------------------------ when and whether

    def applicable(self, *, text_to_image: bool = False) -> list[Probe]:
        """Probes that run on a model of this kind with this run's data (cadence on, needs met)."""
        has_holdout = self.holdout is not None
        return [p for p in self.probes if p.applies(text_to_image=text_to_image, has_holdout=has_holdout)]

    def due(self, step: int, *, text_to_image: bool = False) -> list[Probe]:
        """Applicable probes whose cadence (:mod:`~memwatch.core.cadence`) falls on ``step``, not yet run at it."""
        return [
            p
            for p in self.applicable(text_to_image=text_to_image)
            if self.cadence.due(p.name, step, every=p.every, sample_probe=p.needs_samples)
            and self.probed_at.get(p.name) != step
        ]

    def step(self, step: int, model: Any, scheduler: Any, *, ema: Any = None) -> list[Event]:
        """In-loop front-ends: run the probes due at ``step``; call it once per optimizer step on every process.

        The cadence depends only on the step number, so every process probes at the same steps.
        With ``weights: ema`` the EMA weights are swapped in for the probes and restored afterwards.
        A step already probed is not probed again (call it once per optimizer step); after
        :meth:`close` it does nothing. It never raises: a problem is recorded as a failed probe.

        Args:
            step: the optimizer step just completed.
            model: the UNet being trained (wrapped or not).
            scheduler: the training noise scheduler.
            ema: a diffusers ``EMAModel`` or an EMA copy of the model.

        Returns:
            The events raised (main process; empty elsewhere).
        """
        if self.closed:
            if not self._closed_warned:
                log.warning("memwatch: step() after close(): nothing is probed any more")
                self._closed_warned = True
            return []
        step = int(step)
        if self.last_step == step and not self._repeat_warned:
            log.warning("memwatch: step %d seen twice: it is probed once (call step() once per optimizer step)", step)
            self._repeat_warned = True
        self.last_step = step
        self._last_args = (model, scheduler, ema)
        try:
            parts = ModelParts.of(model, scheduler)
        except MemwatchError as e:
            self._fail_all(step, self.applicable(), f"cannot probe this model: {e}")
            return []
        self.meter.watch(parts.unet)  # the denoiser's passes, whether a bare UNet or a pipeline's parts came in
        self.cadence.tick(self.meter.training)
        due = self.due(step, text_to_image=parts.text_to_image)
        return self._probe_live(step, parts, ema, due) if due else []

    def saw_checkpoint(self, path: str | Path) -> None:
        """In-loop front-ends: the training script is saving the model last passed to :meth:`step` to ``path``.

        The folder is recorded as a sighting of those weights, identified as the probes identify them
        (the probed weights' :func:`~memwatch.hashing.state_sha256`), so a checkpoint saved at a probed step
        is that probed snapshot: the report can name it as the last clean checkpoint. A checkpoint saved
        between probes is recorded as a snapshot without results (unaudited). Its step is the one in a
        ``checkpoint-<step>`` name, else the last step seen. Main process only; never raises.

        Args:
            path: the folder being written.
        """
        if not self.workers.is_main or self.store is None or self._last_args is None or self.closed:
            return
        try:
            model, scheduler, ema = self._last_args
            step = checkpoint_step(path)
            step = self.last_step if step is None else step
            with ema_weights(ModelParts.of(model, scheduler).unet, ema, self.config.weights) as unet:
                sha = state_sha256(unwrap_model(unet))
            self.store.add_snapshot(self.run_id, step, kind="checkpoint", path=str(path), weights_sha256=sha,
                                    weights=self.config.weights)  # fmt: skip
        except Exception as e:  # training's own save goes on; only the link to the probes is missing
            log.warning("memwatch: checkpoint %s not recorded: %s", path, failure_reason(e))

    def finish(self) -> list[Event]:
        """In-loop front-ends: probe the last step seen by :meth:`step` with every applicable probe
        that has not run at it (so the final model is always measured). Collective, like :meth:`step`."""
        if self._last_args is None or self.last_step is None:
            return []
        model, scheduler, ema = self._last_args
        self._last_args = None
        pending = [p for p in self.applicable() if self.probed_at.get(p.name) != self.last_step]
        if not pending:
            return []
        try:
            parts = ModelParts.of(model, scheduler)
        except MemwatchError as e:
            self._fail_all(self.last_step, pending, f"cannot probe this model: {e}")
            return []
        return self._probe_live(self.last_step, parts, ema, pending)

    def _probe_live(self, step: int, parts: ModelParts, ema: Any, probes: list[Probe]) -> list[Event]:
        t0, work0 = self.cadence.clock(), self.meter.probing_work
        try:
            with ema_weights(parts.unet, ema, self.config.weights) as unet, self.meter.probing():
                self.meter.watch(unet)  # an EMA copy is another module
                events = self.probe(step, replace(parts, unet=unet), None, [p.name for p in probes],
                                    weights=self.config.weights)  # fmt: skip
        except Exception as e:  # the last line of defence: nothing reaches the training loop
            self._fail_all(step, probes, failure_reason(e))
            events = []
        if self.workers.is_main:
            sampled = any(p.needs_samples for p in probes)
            if sampled:
                self.sampled_steps.append(step)
            work = self.meter.probing_work - work0
            self.cadence.probed(self.cadence.clock() - t0, sampled=sampled, work=work)
            ran = {p.name: (p.every, p.needs_samples) for p in probes}
            self.cadence.schedule(step, ran, *self._forecast_now())
        self._sync()
        return events

    def _fail_all(self, step: int, probes: list[Probe], reason: str) -> None:
        """Record (main process) and log that ``probes`` could not run at ``step``."""
        log.warning("memwatch: probes %s not run at step %d: %s", [p.name for p in probes], step, reason)
        for p in probes:
            self.probed_at[p.name] = step
            self.failures.append({"step": step, "probe": p.name, "error": reason})
        if self.recorder is not None:
            self.recorder.write_failures(step, {p.name: (self.probe_hash(p), reason) for p in probes})

    def _forecast_now(self) -> tuple[float, bool]:
        """The earliest band edge of the forecast rules' latest forecasts (NaN: none), and whether every
        forecasting probe's precursor is moving away from its threshold (``<probe>/slope_t`` >= 0)."""
        rules = [r for r in self.engine.rules if r.type == FORECAST]
        lows = [self.latest.get(f"{r.metric}_low", math.nan) for r in rules]
        slopes = [self.latest.get(f"{r.probe}/slope_t", math.nan) for r in rules]
        finite = [v for v in lows if math.isfinite(v)]
        receding = bool(slopes) and all(math.isfinite(t) and t >= 0 for t in slopes)
        return (min(finite) if finite else math.nan), receding

    def _sync(self) -> None:
        """Make every process agree on ``should_stop`` and the cadence (only the main process sees results)."""
        self.state.should_stop, cadence = self.workers.broadcast((self.state.should_stop, self.cadence.state()))
        self.cadence.load(cadence)

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
        weights: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> list[Event]:
        """Run probes on a model snapshot and record the results; call it on every process.

        The model is put in eval mode and every RNG stream is restored afterwards. A snapshot is
        its weights: weights already measured (by these probes with these settings) are not
        measured again, only seen again. Probes that do not apply to the model (a text-to-image-only
        probe on an unconditional UNet) are skipped. Anything that goes wrong inside a probe is
        recorded as a failed probe with its reason, and the others still run: weights or samples
        that are not finite, data a probe cannot use (:class:`~memwatch.errors.ProbeUnavailable`),
        or an error on any process (every process learns it, so no collective call is left waiting).

        Args:
            step: training step of the snapshot.
            model: the UNet (with ``scheduler``), :class:`~memwatch.models.parts.ModelParts`, a loaded
                snapshot or a pipeline.
            scheduler: its noise scheduler (default: the object's own).
            probes: probe names (default: every applicable probe).
            kind, path: where the snapshot was seen (``live``, ``checkpoint`` or ``final``).
            weights_sha256: the weights' hash (a file's); default: hashed from the live module.
            weights: ``"raw"`` or ``"ema"``, if known.
            info: how the snapshot was loaded (noise scheduler and its source, notes), for the store.

        Returns:
            Events raised (main process; empty elsewhere).
        """
        t0 = time.perf_counter()
        step = int(step)
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
        for p in chosen:
            self.probed_at[p.name] = step
        snapshot = {"step": step, "kind": kind, "path": path, "weights_sha256": weights_sha256,
                    "weights": weights, "info": dict(info or {})}  # fmt: skip
        plan = self._plan(parts, chosen, snapshot) if self.workers.is_main else None
        plan = self.workers.broadcast(plan)  # every process takes the main process's decision
        todo = [known[name] for name in plan["todo"]]
        failures: dict[str, str] = dict.fromkeys(plan["fail"], plan["reason"]) if plan["fail"] else {}
        ctx = ProbeContext(step, parts, self.data, self.workers, timings=self.timings, past=self._past(step, weights))
        if todo and self.workers.is_main and self.config.analyse_data and not self._data_analysed:
            self._analyse_data(ctx)
        outcomes = self._measure(todo, ctx, failures) if todo else []
        events: list[Event] = []
        if self.workers.is_main and (todo or failures):
            events = self._record(snapshot, outcomes, ctx, failures)
        self._add_time("total", time.perf_counter() - t0)
        return events

    def _measure(self, todo: list[Probe], ctx: ProbeContext, failures: dict[str, str]) -> list[Outcome]:
        """Run ``todo`` on the snapshot in ``ctx`` (every process): the sampling-free probes first, then the sample
        probes on one set of shared samples. Modes and RNG streams are restored afterwards."""
        outcomes: list[Outcome] = []
        with preserved_rng(), eval_mode(*ctx.parts.modules()):
            for probe in [p for p in todo if not p.needs_samples]:
                started = time.time()
                rows = self._gathered(probe.name, failures, lambda probe=probe: probe.compute(ctx))
                if rows is not None and self.workers.is_main:
                    results = self._reduced(probe, rows, ctx, failures)
                    if results:
                        outcomes.append(Outcome(probe, results, started))
            sample_probes = [p for p in todo if p.needs_samples]
            if not sample_probes:
                return outcomes
            started = time.time()
            ctx.samples = self._samples(ctx, [p.name for p in sample_probes], failures)
            if ctx.samples is None:  # not drawn, or not on this process
                return outcomes
            for probe in sample_probes:
                results = self._reduced(probe, [], ctx, failures)
                if results:
                    outcomes.append(Outcome(probe, results, started))
            for phase, seconds in ctx.samples.timings.items():  # embedded and searched once for all of them
                ctx.add_time(phase, seconds)
        return outcomes

    def _analyse_data(self, ctx: ProbeContext) -> None:
        """Main process, once per run, at the first probe: :meth:`analyse_training_set` in the reference index
        the probes share (its time is reference_embedding's)."""
        self.analyse_training_set(ctx.parts.image_resolution, step=ctx.step)

    def analyse_training_set(self, resolution: int, *, step: int | None = None) -> dict[str, Any] | None:
        """Duplicates and isolated images of the training set (``memwatch data``), made once per run into the
        store and returned (a resumed run reads it back); a failure is recorded and logged, never raised.

        Args:
            resolution: the model's image resolution (the reference index the probes share is built at it).
            step: the step it is made at, for the record of a failure (default: the last step seen).

        Returns:
            The analysis (:meth:`TrainingSetAnalysis.to_dict` without the nearest-neighbour list), or None.
        """
        from memwatch.data.training_set import analyse_training_set

        if not self.workers.is_main or self.store is None:
            return None
        self._data_analysed = True
        manifest = self.refs.summary().get("manifest_sha256")
        try:
            known = self.store.training_set(self.run_id)
            if known is not None and known["manifest_sha256"] == manifest and known["analysis"] is not None:
                self.training_set = _training_set_counts(known["analysis"])  # a resumed run: made already
                return known["analysis"]
            index = self.data.reference_index(resolution)
            t0 = time.perf_counter()
            result = analyse_training_set(self.refs, index.embedder, index=index)
            self._add_time("training_set", time.perf_counter() - t0)
            analysis = result.to_dict(all_nearest=False)
            self.store.write_training_set(self.run_id, manifest, analysis)
            self.training_set = _training_set_counts(analysis)
            return analysis
        except Exception as e:
            reason = failure_reason(e)
            log.warning("memwatch: training-set analysis failed: %s", reason)
            self.failures.append({"step": self.last_step if step is None else step, "probe": "training_set",
                                  "error": reason})  # fmt: skip
            self.training_set = {"error": reason}
            with contextlib.suppress(Exception):
                self.store.write_training_set(self.run_id, manifest, None, reason)
            return None

    def _past(self, step: int, weights: str | None) -> Callable[[str, int], list[dict[str, Any]]] | None:
        """Main process: the reader of a probe's results on this run's earlier snapshots (same weights kind)."""
        store = self.store
        if store is None:
            return None
        keys = {p.name: self.result_keys(p) for p in self.probes}
        keys.update({c: self.result_keys(p) for p in self.probes for c in p.companions})

        def earlier(probe: str, limit: int) -> list[dict[str, Any]]:
            if probe not in keys or limit < 1:
                return []
            return store.earlier_results(self.run_id, probe, keys[probe], before_step=step, weights=weights,
                                         limit=limit)  # fmt: skip

        return earlier

    def _plan(self, parts: ModelParts, chosen: list[Probe], snapshot: dict[str, Any]) -> dict[str, Any]:
        """Main process: which probes still need these weights, or why none can run on them."""
        names = [p.name for p in chosen]
        try:
            if snapshot["weights_sha256"] is None:
                snapshot["weights_sha256"] = state_sha256(unwrap_model(parts.unet))
            bad = _non_finite(parts)
            if bad:
                return {"todo": [], "fail": names, "reason": f"the weights contain NaN or Inf ({bad}): not probed"}
            assert self.store is not None
            existing = self.store.find_snapshot(self.run_id, snapshot["weights_sha256"])
            todo = [p.name for p in chosen if existing is None or not self.measured(existing, p)]
            if existing is not None and not todo:  # the same weights again: seen, not measured twice
                self.store.add_snapshot(self.run_id, **snapshot)
            return {"todo": todo, "fail": [], "reason": None}
        except Exception as e:  # e.g. the store's disk is full: no probe runs, training goes on
            return {"todo": [], "fail": names, "reason": failure_reason(e)}

    def _gathered(self, name: str, failures: dict[str, str], compute: Callable[[], list]) -> list | None:
        """Every process's rows of one probe, in process order; None (and a failure) if any process failed.

        Each process reports its own error with its rows, so a failure on one process reaches all of
        them at the gather and none is left waiting in a collective call.
        """
        try:
            mine: tuple[str | None, list] = (None, compute())
        except ProbeUnavailable as e:
            mine = (str(e), [])
        except Exception as e:
            log.debug("probe %s failed", name, exc_info=True)
            mine = (failure_reason(e), [])
        gathered = self.workers.gather([mine])
        errors = [err for err, _ in gathered if err]
        if errors:
            log.warning("%s not run: %s", name, errors[0])
            failures[name] = errors[0]
            return None
        return [row for _, rows in gathered for row in rows]

    def _reduced(
        self, probe: Probe, rows: list, ctx: ProbeContext, failures: dict[str, str]
    ) -> list[ProbeResult] | None:
        """The probe's results on the main process, or None (and a failure) if reducing failed."""
        try:
            return _results(probe.reduce(rows, ctx))
        except Exception as e:
            log.debug("probe %s failed", probe.name, exc_info=True)
            log.warning("%s not run: %s", probe.name, failure_reason(e))
            failures[probe.name] = failure_reason(e)
            return None

    def _samples(self, ctx: ProbeContext, names: list[str], failures: dict[str, str]) -> Samples | None:
        """The shared fixed-seed samples (main process), drawn in shares across processes."""
        t0 = time.perf_counter()
        plan = None
        try:
            plan = plan_samples(self.config.sampling, ctx.parts, ctx.data)
            mine: tuple[str | None, Any] = (None, generate_share(self.config.sampling, ctx.parts, plan, self.workers,
                                                                      self.meter.largest_batch))  # fmt: skip
        except ProbeUnavailable as e:
            mine = (str(e), None)
        except Exception as e:
            log.debug("sampling failed", exc_info=True)
            mine = (failure_reason(e), None)
        gathered = self.workers.gather([mine])
        self._add_time("sampling", time.perf_counter() - t0)
        errors = [err for err, _ in gathered if err]
        if not errors and self.workers.is_main:
            images = torch.cat([part for _, part in gathered])
            if not torch.isfinite(images).all():
                errors = ["the generated samples contain NaN or Inf (the model's outputs are not finite)"]
        if errors:
            log.warning("%s not run: %s", "/".join(names), errors[0])
            failures.update(dict.fromkeys(names, errors[0]))
            return None
        if not self.workers.is_main:
            return None
        assert plan is not None
        return Samples(images, plan, settings=self.config.sampling)

    # ------------------------------------------------------------------ recording and telling (main process)

    def _record(
        self, snapshot: dict[str, Any], outcomes: list[Outcome], ctx: ProbeContext, failures: dict[str, str]
    ) -> list[Event]:
        """Evaluate the rules on the step's metrics, write everything in ONE transaction
        (:class:`~memwatch.core.recording.Recorder`), then tell the outputs."""
        assert self.recorder is not None
        t0 = time.perf_counter()
        step = snapshot["step"]
        flat: dict[str, float] = {}
        evidence: dict[str, dict] = {}
        for outcome in outcomes:
            main = outcome.results[0]
            if outcome.probe.needs_samples and ctx.samples is not None:
                self.recorder.evidence_grid(outcome.probe, main, ctx.samples, snapshot)
            evidence[outcome.probe.name] = outcome.probe.evidence(main)
            for result in outcome.results:
                flat.update({f"{result.probe}/{k}": v for k, v in result.metrics.items()})
        events = self.engine.observe(step, flat, evidence, {"keep": self.keep_advice()}) if flat else []
        for name, reason in failures.items():
            self.failures.append({"step": step, "probe": name, "error": reason})
        by_name = {p.name: p for p in self.probes}
        lost = self.recorder.write(
            snapshot, outcomes, failures, events, key=self.probe_hash,
            key_of={name: self.probe_hash(by_name[name]) for name in failures},
        )  # fmt: skip
        if lost is not None:  # measured but not on the record: the front-ends count it as failed
            for outcome in outcomes:
                self.failures.append({"step": step, "probe": outcome.probe.name, "error": f"not recorded: {lost}"})
        self._add_time("store", time.perf_counter() - t0)
        self.latest.update(flat)
        self.outputs.metrics(flat, step)
        self.state.track(step, flat, events)
        for event in events:
            self._emit(event)
        return events

    def record_intervention(
        self,
        kind: str,
        step: int | None,
        images: Sequence[str] = (),
        detail: dict[str, Any] | None = None,
        *,
        message: str = "",
        error: str | None = None,
    ) -> bool:
        """Put a change to training on the record (:mod:`memwatch.interventions`): a store row and an ``info``
        event (``intervention-<kind>``) in one transaction, then the outputs hear the event. Main process
        only; never raises (a change that could not be recorded is logged and reported as False).

        Args:
            kind: what changed (``reweight``, ``loss-gate``, ``rollback``...).
            step: the training step from which it applies (default: the last step seen).
            images: the training image ids it applies to.
            detail: its settings and figures.
            message: one line for the log and the event.
            error: why it could not be applied (nothing changed).

        Returns:
            Whether it is in the store.
        """
        if not self.workers.is_main or self.store is None:
            return False
        step = self.last_step if step is None else int(step)
        images = [str(i) for i in images]
        detail = dict(detail or {})
        event = Event.intervention(kind, step, images, detail, message=message, error=error)
        try:
            self.store.add_intervention(self.run_id, kind, step, images, detail, error=error, event=event.to_dict())
        except Exception as e:  # the change itself stands (or failed) either way; only its record is missing
            log.error("memwatch: intervention %s at step %s not recorded: %s", kind, step, failure_reason(e))
            return False
        (log.warning if error else log.info)("memwatch: %s", event.message)
        self._emit(event)
        return True

    def _emit(self, event: Event) -> None:
        """Tell the outputs of an event already in the store, and take it into the run's state."""
        self.state.saw(event)
        self.outputs.event(event)

    def replay(self) -> int:
        """Rebuild rule state, onset and last clean step from this run's stored results.

        Called when the session opens, so a run probed in several invocations (``memwatch probe``
        from cron, a resumed training) continues where it stopped: rules keep their state and
        once-per-run rules do not fire again. Events the replay raises that the store lacks (a rule new to
        the run, or a job killed between a result and its events) are recorded and emitted now: a new
        rule is judged on what was measured, without probing again, and no warning is lost.

        Returns:
            The number of stored snapshots replayed.
        """
        if self.store is None:
            return 0
        history = load_history(self.store, self.run_name)
        self.state.replayed([Event.from_dict(e) for e in history.events])
        stored = {(e["rule"], e["step"]) for e in history.events}
        observations = history.observations()
        missing: list[tuple[int, Event]] = []
        for step, snapshot_id, values in observations:
            events = self.engine.observe(step, values)
            self.state.track(step, values, events)
            missing += [(snapshot_id, e) for e in events if (e.rule, e.step) not in stored]
        assert self.recorder is not None
        for snapshot_id, event in missing:
            if self.recorder.add_lost_event(snapshot_id, event):
                log.warning("memwatch: [%s] step %s raised by results already stored (a rule new to this run, or an "
                            "event a stopped job had not recorded)", event.rule, event.step)  # fmt: skip
                self._emit(event)
        return len(observations)

    def _add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """Onset, at-risk and last clean step, events by severity, failed probes and the paths written;
        after :meth:`close`, the summary it wrote (which adds ``images_at_risk``)."""
        if self._final is not None:
            return dict(self._final)
        return {
            "run": self.run_name,
            "last_step": self.last_step,
            **self.state.summary(),
            "failed_probes": list(self.failures),
            "training_set": self.training_set,
            "stopped": self.state.should_stop,
            "output_dir": str(self.output_dir),
            "store": str(self.output_dir / STORE_NAME),
            "events_file": str(self.output_dir / EVENTS_NAME),
            "timings": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            # probe time / training time on the wall clock, and probe work / training work in denoiser
            # evaluations (what the cadence budgets), in-loop front-ends
            "probe_overhead": rounded(self.cadence.overhead(), 4),
            "probe_work_share": rounded(self.cadence.work_share(), 4),
            "budget_unit": self.cadence.unit,
            "sampled_steps": list(self.sampled_steps),  # in-loop: where samples were drawn
        }

    def images_at_risk(self, most: int | None = 5) -> list[dict[str, Any]]:
        """The training images most at risk (copied, or forecast to be), most at risk first, from the store's
        per-sample rows (:mod:`memwatch.signals.image_risk`); empty if they cannot be read.

        Args:
            most: at most this many (None: all of them).
        """
        from memwatch.signals.image_risk import image_trajectories, rank_images

        try:
            data = load_history(self.store, self.run_name)  # type: ignore[arg-type]
            risks = rank_images(
                image_trajectories(data.seeds),
                threshold=self.declarations.sample_threshold(),
                training_copies=data.training_copies,
            )
        except Exception as e:  # a summary line is not worth a failed close: say so and go on
            log.warning("memwatch: images at risk not ranked: %s", e)
            return []
        keys = ("training_id", "first_copy_step", "forecast_step", "ratio_min", "training_copies")
        return [{k: r.row()[k] for k in keys} for r in risks if r.at_risk][:most]

    def close(self) -> dict[str, Any]:
        """Write ``summary.json`` and close the store (main process); returns the summary."""
        summary = self.summary()
        self.closed = True
        self.meter.close()
        if self.workers.is_main and 0 < len(self.sampled_steps) <= MIN_POINTS:
            log.warning("memwatch: %s", sparse_samples_message(self.sampled_steps))
        if self.store is not None:
            summary["images_at_risk"] = self.images_at_risk()
            self._final = summary
            try:
                (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            except OSError as e:
                log.error("memwatch: summary.json not written: %s", e)
            self.store.close()
            self.store = None
        return summary


def check_rule_metrics(rules: list[Rule], probes: Sequence[Probe], source: str = "config") -> list[Rule]:
    """``rules``, after checking that each names a metric one of ``probes`` reports (a typo never fires).

    Raises:
        MemwatchError: naming the rule, its metric and the metrics that exist.
    """
    declared = {p.name: set(p.declared()) for p in probes}
    free = {c for p in probes for c in p.companions} | {p.name for p in probes if not p.metrics}
    for rule in rules:
        probe, _, metric = rule.metric.partition("/")
        if probe in free:
            continue
        if probe not in declared:
            raise MemwatchError(
                f"{source}: rule {rule.name!r}: setting 'metric' is {rule.metric!r}, but no probe is called "
                f"{probe!r}; probes: {', '.join(sorted(declared))}"
            )
        if metric not in declared[probe]:
            raise MemwatchError(
                f"{source}: rule {rule.name!r}: setting 'metric' is {rule.metric!r}, which probe {probe} does not "
                f"report; its metrics: {', '.join(sorted(declared[probe]))}"
            )
    return rules


def _merge_probes(configured: list[Probe], given: Sequence[Probe]) -> list[Probe]:
    """The configured probes with given instances replacing those of the same name, new ones appended."""
    for p in given:
        if not isinstance(p, Probe):
            raise MemwatchError(f"probes= takes Probe instances, got {type(p).__name__}")
    by_name = {p.name: p for p in given}
    out = [by_name.pop(p.name, p) for p in configured]
    return out + list(by_name.values())


def _training_set_counts(analysis: dict[str, Any]) -> dict[str, Any]:
    """The summary's line on the training set: counts from a stored analysis."""
    keys = ("n", "distinct", "exact_duplicate_images", "near_duplicate_groups")
    return {**{k: analysis.get(k) for k in keys}, "isolated": len(analysis.get("isolated", []))}


def _results(out: ProbeResult | Sequence[ProbeResult]) -> list[ProbeResult]:
    return [out] if isinstance(out, ProbeResult) else list(out)


def _non_finite(parts: ModelParts) -> str | None:
    """The first tensor of the trained weights (UNet, text encoder) that holds NaN or Inf (its name), or None."""
    for module in (m for m in (parts.unet, parts.text_encoder) if m is not None):
        for name, tensor in unwrap_model(module).state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name
    return None


def environment_info() -> dict[str, Any]:
    """Versions of memwatch and the libraries that shape its results, the host name, and torch's CPU threads (its
    kernels add in an order that depends on them: the same seed trains other weights on another thread count)."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("memwatch", "torch", "diffusers", "accelerate", "open_clip_torch", "facenet-pytorch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["memwatch"] = versions["memwatch"] or __version__
    return {"versions": versions, "host": socket.gethostname(), "torch_threads": torch.get_num_threads()}
