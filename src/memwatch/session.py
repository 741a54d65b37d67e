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

import contextlib
import datetime as _dt
import json
import logging
import math
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from memwatch import __version__
from memwatch.cadence import Cadence
from memwatch.checkpoints import checkpoint_step, last_clean_checkpoint
from memwatch.config import MonitorConfig
from memwatch.embedders import build_embedder
from memwatch.errors import MemwatchError, ProbeUnavailable, failure_reason
from memwatch.evidence import save_evidence_grid
from memwatch.hashing import state_sha256
from memwatch.history import load_history
from memwatch.model_parts import ModelParts
from memwatch.modes import ema_weights, eval_mode, preserved_rng, unwrap_model
from memwatch.probes.base import Probe, ProbeContext, ProbeData, ProbeResult, Samples
from memwatch.refset import ReferenceSet, load_reference_set
from memwatch.rules import FORECAST, Event, Rule, RuleEngine, parse_rules, severity_at_least
from memwatch.samples import generate_share, plan_samples
from memwatch.store import STORE_NAME, Store
from memwatch.workers import Workers

log = logging.getLogger("memwatch")

EVENTS_NAME = "events.jsonl"


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
        run_name: the run's name in the store; default ``config.run_name``, else ``run-<UTC time>``.
            A run that already exists is resumed: its stored history is replayed into the rules.
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
        run_name: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.workers = workers or Workers()
        self.on_event = on_event
        self.log_metrics = log_metrics
        self.probes = _merge_probes(config.make_probes(), probes)
        self.data = ProbeData(
            refs, holdout, lambda resolution: build_embedder(config.embedder, resolution), config.cache_dir,
            search=config.search,
        )  # fmt: skip
        self.engine = RuleEngine(check_rule_metrics(self.rules(), self.probes, config.source))
        self.cadence = Cadence(config.cadence, clock)
        self.events: list[Event] = []
        self.should_stop = False
        self.onset_step: int | None = None
        #: first probed step at which a forecast rule fired (copying forecast within its horizon)
        self.at_risk_step: int | None = None
        self.first_alarm_step: int | None = None
        self.last_clean_step: int | None = None
        #: latest value of every metric, keyed "probe/metric" (for progress bars and callbacks)
        self.latest: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self.last_step: int | None = None
        #: probe name -> the last step it ran at
        self.probed_at: dict[str, int] = {}
        #: probes that could not run, each with its reason, in the order they failed
        self.failures: list[dict[str, Any]] = []
        self.closed = False
        self._final: dict[str, Any] | None = None  # the summary written at close (with the images at risk)
        self._data_analysed = False  # the training-set analysis is made once per run (main process)
        #: what the training-set analysis found (counts), or why it failed; None before it ran
        self.training_set: dict[str, Any] | None = None
        self._last_args: tuple[Any, Any, Any] | None = None
        self._repeat_warned = False
        self._closed_warned = False
        self._skipped = (len(refs.skipped), len(holdout.skipped) if holdout else 0)
        self.store: Store | None = None
        self.run_id = 0
        name = run_name or config.run_name
        self.run_name = name or "run-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
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
        error = self.workers.broadcast(error)
        if error is not None:
            raise MemwatchError(error)
        self.should_stop = self.workers.broadcast(self.should_stop)

    def _open_store(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MemwatchError(
                f"cannot create the output folder {self.output_dir} ({e.strerror}): pass a writable output_dir"
            ) from None
        self.store = Store(self.output_dir / STORE_NAME)
        self.run_id = self.store.ensure_run(
            self.run_name,
            config=self.run_config(),
            reference=self.refs.summary(),
            holdout=self.holdout.summary() if self.holdout else None,
            info={**environment_info(), "processes": self.workers.num_processes},
        )
        self.replay()

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
        """Applicable probes whose cadence (:mod:`memwatch.cadence`) falls on ``step`` and that have not run at it."""
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
        self.cadence.tick()
        try:
            due = self.due(step, text_to_image=ModelParts.of(model, scheduler).text_to_image)
        except MemwatchError as e:
            self._fail_all(step, self.applicable(), f"cannot probe this model: {e}")
            return []
        return self._probe_live(step, model, scheduler, ema, due) if due else []

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
            model, _, ema = self._last_args
            step = checkpoint_step(path)
            step = self.last_step if step is None else step
            with ema_weights(model, ema, self.config.weights) as unet:
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
        return self._probe_live(self.last_step, model, scheduler, ema, pending) if pending else []

    def _probe_live(self, step: int, model: Any, scheduler: Any, ema: Any, probes: list[Probe]) -> list[Event]:
        t0 = self.cadence.clock()
        try:
            with ema_weights(model, ema, self.config.weights) as unet:
                events = self.probe(step, unet, scheduler, [p.name for p in probes], weights=self.config.weights)
        except Exception as e:  # the last line of defence: nothing reaches the training loop
            self._fail_all(step, probes, failure_reason(e))
            events = []
        if self.workers.is_main:
            sampled = any(p.needs_samples for p in probes)
            self.cadence.probed(self.cadence.clock() - t0, sampled=sampled)
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
        if self.store is None:
            return
        try:
            with self.store.batch():
                snap = self.store.add_snapshot(self.run_id, step, kind="live")
                for p in probes:
                    self.store.record_failure(snap, p.name, config_hash=self.probe_hash(p), error=reason)
        except Exception as e:  # e.g. a step the store cannot hold: said, never raised into training
            log.warning("memwatch: could not record the failure either: %s", failure_reason(e))

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
        self.should_stop, cadence = self.workers.broadcast((self.should_stop, self.cadence.state()))
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
            model: the UNet (with ``scheduler``), :class:`~memwatch.model_parts.ModelParts`, a loaded
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
        outcomes: list[tuple[Probe, list[ProbeResult], float]] = []
        if todo:
            with preserved_rng(), eval_mode(*parts.modules()):
                for probe in [p for p in todo if not p.needs_samples]:
                    started = time.time()
                    rows = self._gathered(probe.name, failures, lambda probe=probe: probe.compute(ctx))
                    if rows is not None and self.workers.is_main:
                        results = self._reduced(probe, rows, ctx, failures)
                        if results:
                            outcomes.append((probe, results, started))
                sample_probes = [p for p in todo if p.needs_samples]
                if sample_probes:
                    started = time.time()
                    ctx.samples = self._samples(ctx, [p.name for p in sample_probes], failures)
                    for probe in sample_probes:
                        if ctx.samples is not None and self.workers.is_main:
                            results = self._reduced(probe, [], ctx, failures)
                            if results:
                                outcomes.append((probe, results, started))
        events: list[Event] = []
        if self.workers.is_main and (todo or failures):
            events = self._record(snapshot, outcomes, ctx, failures)
        self._add_time("total", time.perf_counter() - t0)
        return events

    def _analyse_data(self, ctx: ProbeContext) -> None:
        """Main process, once per run: duplicates and isolated images of the training set (``memwatch data``)
        in the reference index the probes share, into the store; a failure is recorded, never raised."""
        from memwatch.training_set import analyse_training_set

        self._data_analysed = True
        assert self.store is not None
        manifest = self.refs.summary().get("manifest_sha256")
        try:
            known = self.store.training_set(self.run_id)
            if known is not None and known["manifest_sha256"] == manifest and known["analysis"] is not None:
                self.training_set = _training_set_counts(known["analysis"])  # a resumed run: made already
                return
            index = ctx.reference_index()  # the probes' own (its time is reference_embedding's)
            t0 = time.perf_counter()
            result = analyse_training_set(self.refs, index.embedder, index=index)
            self._add_time("training_set", time.perf_counter() - t0)
            analysis = result.to_dict(all_nearest=False)
            self.store.write_training_set(self.run_id, manifest, analysis)
            self.training_set = _training_set_counts(analysis)
        except Exception as e:
            reason = failure_reason(e)
            log.warning("memwatch: training-set analysis failed: %s", reason)
            self.failures.append({"step": ctx.step, "probe": "training_set", "error": reason})
            self.training_set = {"error": reason}
            with contextlib.suppress(Exception):
                self.store.write_training_set(self.run_id, manifest, None, reason)

    def _past(self, step: int, weights: str | None) -> Callable[[str, int], list[dict[str, Any]]] | None:
        """Main process: the reader of a probe's results on this run's earlier snapshots (same weights kind)."""
        store = self.store
        if store is None:
            return None
        hashes = {p.name: self.probe_hash(p) for p in self.probes}
        hashes.update({c: self.probe_hash(p) for p in self.probes for c in p.companions})

        def earlier(probe: str, limit: int) -> list[dict[str, Any]]:
            if probe not in hashes or limit < 1:
                return []
            return store.earlier_results(self.run_id, probe, hashes[probe], before_step=step, weights=weights,
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
            todo = [
                p.name
                for p in chosen
                if existing is None or not self.store.has_result(existing, p.name, self.probe_hash(p))
            ]
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
            mine: tuple[str | None, Any] = (None, generate_share(self.config.sampling, ctx.parts, plan, self.workers))
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
        return Samples(images, plan)

    # ------------------------------------------------------------------ recording (main process)

    def _record(
        self,
        snapshot: dict[str, Any],
        outcomes: list[tuple[Probe, list[ProbeResult], float]],
        ctx: ProbeContext,
        failures: dict[str, str],
    ) -> list[Event]:
        """Write the snapshot, its results and failures and the events they raise in ONE transaction,
        then tell the user (log, ``events.jsonl``, trackers, ``on_event``)."""
        assert self.store is not None
        t0 = time.perf_counter()
        step = snapshot["step"]
        by_name = {p.name: p for p in self.probes}
        flat: dict[str, float] = {}
        evidence: dict[str, dict] = {}
        for probe, results, _ in outcomes:
            main = results[0]
            if probe.needs_samples and ctx.samples is not None:
                self._evidence_grid(probe, main, ctx, snapshot)
            evidence[probe.name] = probe.evidence(main)
            for result in results:
                flat.update({f"{result.probe}/{k}": v for k, v in result.metrics.items()})
        events = self.engine.observe(step, flat, evidence, {"keep": self.keep_advice()}) if flat else []
        for name, reason in failures.items():
            self.failures.append({"step": step, "probe": name, "error": reason})
        try:
            with self.store.batch():
                skipped = (len(self.refs.skipped), len(self.holdout.skipped) if self.holdout else 0)
                if skipped != self._skipped:  # images found unreadable while probing: counted and named
                    holdout = self.holdout.summary() if self.holdout else None
                    self.store.update_run_sets(self.run_id, self.refs.summary(), holdout)
                    self._skipped = skipped
                snap = self.store.add_snapshot(self.run_id, **snapshot)
                for name, reason in failures.items():
                    self.store.record_failure(snap, name, config_hash=self.probe_hash(by_name[name]), error=reason)
                for probe, results, started in outcomes:
                    for result in results:
                        self.store.write_result(snap, result, config_hash=self.probe_hash(probe), started_at=started,
                                                host=socket.gethostname())  # fmt: skip
                for event in events:
                    self.store.add_event(self.run_id, {**event.to_dict(), "snapshot_id": snap})
        except Exception as e:
            # The training goes on; the warnings below still reach the log and the callback.
            log.error("memwatch: step %d could not be recorded: %s", step, failure_reason(e))
        self._add_time("store", time.perf_counter() - t0)
        self.latest.update(flat)
        if self.log_metrics is not None and flat:
            self.log_metrics({f"memwatch/{k}": v for k, v in flat.items()}, step)
        self._track(step, flat, events)
        for event in events:
            self._emit(event)
        return events

    def _evidence_grid(self, probe: Probe, result: ProbeResult, ctx: ProbeContext, snapshot: dict[str, Any]) -> None:
        """The sample/training pairs of a sample probe as one PNG, named by run, step and weights."""
        assert ctx.samples is not None
        sha = (snapshot["weights_sha256"] or "unhashed")[:12]
        name = f"run{self.run_id:03d}/step{snapshot['step']:08d}-{sha}-{probe.name}.png"
        try:
            grid = save_evidence_grid(
                self.output_dir / "evidence" / name,
                ctx.samples.images,
                probe.evidence_pairs(result),
                {it.id: it for it in self.refs.items},
                top=self.config.evidence_top,
            )
        except Exception as e:  # a training image gone since listing, a full disk: the result still counts
            log.warning("memwatch: evidence grid %s not written: %s", name, failure_reason(e))
            return
        if grid is not None:
            result.evidence.append(str(grid.relative_to(self.output_dir)))

    def keep_advice(self) -> str:
        """What to keep when a warning fires now: the newest checkpoint with clean weights.

        First the newest checkpoint folder, still on disk, that holds weights the probes measured at or
        before the last clean step (a sighting in the store: ``memwatch probe``/``watch`` folders, and
        the monitor's ``save_state`` checkpoints). Else, for checkpoints saved without ``save_state``,
        the newest ``checkpoint-<step>`` beside the output folder saved by the last clean step, said to
        be matched by step only.
        """
        if self.last_clean_step is None:
            return "the weights from before training (no clean probe yet)"
        try:
            path = self._last_clean_sighting()
        except Exception as e:  # the advice is a courtesy: a store that cannot be read leaves the fallback
            log.debug("memwatch: clean checkpoints not read: %s", failure_reason(e))
            path = None
        if path is not None:
            return f"{path} (the last clean checkpoint)"
        run_dir = self.output_dir.parent
        guess = last_clean_checkpoint(run_dir, self.last_clean_step)
        if guess is None:
            return f"the model as of step {self.last_clean_step} (no checkpoint saved by then in {run_dir})"
        return f"{guess} (saved by step {self.last_clean_step}, the last clean probe; matched by step, not by weights)"

    def _last_clean_sighting(self) -> str | None:
        """The newest checkpoint folder on disk whose weights were probed at or before the last clean step."""
        if self.store is None or self.last_clean_step is None:
            return None
        probed = {r["snapshot_id"] for r in self.store.results(self.run_id) if r["status"] == "ok"}
        seen = [
            (g["step"], g["path"])
            for snap in self.store.snapshots(self.run_id)
            if snap["id"] in probed and snap["step"] <= self.last_clean_step
            for g in snap["sightings"]
            if g["kind"] == "checkpoint" and g["path"] and g["step"] <= self.last_clean_step
        ]
        kept = [(step, path) for step, path in seen if Path(path).is_dir()]
        return max(kept)[1] if kept else None

    def _track(self, step: int, flat: dict[str, float], events: list[Event]) -> None:
        """Update onset, at-risk, first alarm and last clean step from one probed step."""
        onset = [f"{p.name}/{p.onset_metric}" for p in self.probes if p.onset_metric]
        if self.onset_step is None and any(flat.get(m, 0) > 0 for m in onset):
            self.onset_step = step
        forecast_rules = {r.name for r in self.engine.rules if r.type == FORECAST}
        if self.at_risk_step is None and any(e.rule in forecast_rules for e in events):
            self.at_risk_step = step
        if self.first_alarm_step is None and any(severity_at_least(e.severity, "warning") for e in events):
            self.first_alarm_step = step
        if self.first_alarm_step is None:
            self.last_clean_step = step

    def replay(self) -> int:
        """Rebuild rule state, onset and last clean step from this run's stored results.

        Called when the session opens, so a run probed in several invocations (``memwatch probe``
        from cron, a resumed training) continues where it stopped: rules keep their state and
        once-per-run rules do not fire again. Events the replay raises that the store lacks (a job
        killed between a result and its events, in stores of older versions) are recorded and
        emitted now: no warning is lost.

        Returns:
            The number of stored snapshots replayed.
        """
        if self.store is None:
            return 0
        history = load_history(self.store, self.run_name)
        self.events = [Event.from_dict(e) for e in history.events]
        stored = {(e["rule"], e["step"]) for e in history.events}
        observations = history.observations()
        missing: list[tuple[int, Event]] = []
        for step, snapshot_id, values in observations:
            events = self.engine.observe(step, values)
            self._track(step, values, events)
            missing += [(snapshot_id, e) for e in events if (e.rule, e.step) not in stored]
        for snapshot_id, event in missing:
            if self.store.add_event(self.run_id, {**event.to_dict(), "snapshot_id": snapshot_id}) is not None:
                log.warning("memwatch: recording an event the store had lost: [%s] step %s", event.rule, event.step)
                self._emit(event)
        if self.config.stop_on:
            self.should_stop = any(severity_at_least(e.severity, self.config.stop_on) for e in self.events)
        return len(observations)

    def _emit(self, event: Event) -> None:
        """Tell the user about an event already in the store: log, ``events.jsonl``, trackers, ``on_event``."""
        self.events.append(event)
        level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}[event.severity]
        log.log(level, "[%s] %s", event.rule, event.message)
        try:
            with open(self.output_dir / EVENTS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps({"run": self.run_name, **event.to_dict()}, sort_keys=True, default=str) + "\n")
        except OSError as e:
            log.error("memwatch: %s not written (%s): the event is in the store and the log", EVENTS_NAME, e)
        if self.log_metrics is not None:
            self.log_metrics({f"memwatch/events/{event.rule}": event.value}, event.step)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception as e:  # the user's callback must not stop the monitor either
                log.error("memwatch: on_event callback raised %s", failure_reason(e))
        if self.config.stop_on and severity_at_least(event.severity, self.config.stop_on):
            self.should_stop = True

    def _add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    # ------------------------------------------------------------------ summary

    def summary(self) -> dict[str, Any]:
        """Onset, at-risk and last clean step, events by severity, failed probes and the paths written;
        after :meth:`close`, the summary it wrote (which adds ``images_at_risk``)."""
        if self._final is not None:
            return dict(self._final)
        by_sev: dict[str, int] = {}
        for e in self.events:
            by_sev[e.severity] = by_sev.get(e.severity, 0) + 1
        return {
            "run": self.run_name,
            "last_step": self.last_step,
            "onset_step": self.onset_step,
            "at_risk_step": self.at_risk_step,
            "first_alarm_step": self.first_alarm_step,
            "last_clean_step": self.last_clean_step,
            "events": by_sev,
            "failed_probes": list(self.failures),
            "training_set": self.training_set,
            "stopped": self.should_stop,
            "output_dir": str(self.output_dir),
            "store": str(self.output_dir / STORE_NAME),
            "events_file": str(self.output_dir / EVENTS_NAME),
            "timings": {k: round(v, 3) for k, v in sorted(self.timings.items())},
            # probe time / training time, as the cadence measured it (in-loop front-ends)
            "probe_overhead": _rounded(self.cadence.overhead(), 4),
        }

    def _images_at_risk(self, most: int = 5) -> list[dict[str, Any]]:
        """The training images most at risk (copied, or forecast to be), from the store's per-sample rows
        (:mod:`memwatch.image_risk`); empty if they cannot be read."""
        from memwatch.history import load_history
        from memwatch.image_risk import image_trajectories, rank_images

        try:
            data = load_history(self.store, self.run_name)
            risks = rank_images(
                image_trajectories(data.seeds), threshold=data.mem_ratio, training_copies=data.training_copies
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
        if self.store is not None:
            summary["images_at_risk"] = self._images_at_risk()
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
    declared = {p.name: set(p.metrics) for p in probes}
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


def _rounded(value: float, digits: int) -> float | None:
    """``value`` rounded, None when it is not finite (JSON has no NaN)."""
    return round(value, digits) if math.isfinite(value) else None


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
