"""The one probe core every front-end calls: "probe this snapshot with this plan, write to this store".

A :class:`ProbeSession` holds what stays fixed across the snapshots of a run: the config, the
reference and holdout sets, the reference index, the store and its run, and the rule engine. The
front-ends (the in-training monitor, ``memwatch probe`` and ``memwatch watch``) only decide which
snapshot to probe and when, then call :meth:`ProbeSession.probe`.

Work inside a probe (sample generation, membership losses) is split across processes by a
:class:`Workers` description and gathered in process order; with one process it is a plain call.
Only the main process searches neighbours, writes the store and raises events.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwatch import __version__
from memwatch.config import MonitorConfig
from memwatch.embed_cache import EmbeddingCache
from memwatch.embedders import make_embedder
from memwatch.errors import MemwatchError
from memwatch.evidence import identity_pairs, regurgitation_pairs, save_evidence_grid
from memwatch.faces.probe import identity_evidence
from memwatch.hashing import sha256_bytes
from memwatch.images import load_image
from memwatch.modes import eval_mode, preserved_rng
from memwatch.probes.base import ProbeResult
from memwatch.probes.membership import membership_from_items, membership_probe
from memwatch.probes.regurgitation import ReferenceIndex, memorized_evidence, regurgitation_probe
from memwatch.refset import ReferenceSet, load_reference_set
from memwatch.rules import Event, RuleEngine, severity_at_least
from memwatch.sampling import generate_samples, split_for_process
from memwatch.store import STORE_NAME, Store

log = logging.getLogger("memwatch")

EVENTS_NAME = "events.jsonl"
PROBES = ("membership", "regurgitation", "identity")
#: probes that look at generated samples; when several are due they share one set of samples
SAMPLE_PROBES = ("regurgitation", "identity")
#: results recorded under a name of their own but configured by another probe's settings
SETTINGS_OF = {"identity_gallery": "identity"}


@dataclass
class Workers:
    """This process's place among the processes that share a probe's work.

    Attributes:
        process_index: rank of this process.
        num_processes: how many processes share the work.
        gather: concatenates per-process lists in process order (a collective call when
            ``num_processes > 1``; every process must call it).
    """

    process_index: int = 0
    num_processes: int = 1
    gather: Callable[[list], list] = field(default=list)

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> Workers:
        """Workers for an ``accelerate.Accelerator`` (``gather_object`` across its processes)."""
        if accelerator.num_processes == 1:
            return cls()
        from accelerate.utils import gather_object

        return cls(accelerator.process_index, accelerator.num_processes, gather_object)


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
        holdout: non-members (enables the membership probe), or None.
        output_dir: where the store, ``events.jsonl`` and evidence go.
        workers: how work is split across processes (default: this process alone).
        on_event: called with each event on the main process.
        log_metrics: called on the main process with ``({"memwatch/<probe>/<metric>": value}, step)``
            (e.g. ``accelerator.log``).

    Example:
        >>> session = ProbeSession(load_config(None), load_reference_set("train"), None, "out")  # doctest: +SKIP
        >>> events = session.probe(1000, unet, scheduler, ["regurgitation"])  # doctest: +SKIP
    """

    def __init__(
        self,
        config: MonitorConfig,
        refs: ReferenceSet,
        holdout: ReferenceSet | None,
        output_dir: str | Path,
        *,
        workers: Workers | None = None,
        on_event: Callable[[Event], None] | None = None,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
    ):
        self.config = config
        self.refs = refs
        self.holdout = holdout
        self.output_dir = Path(output_dir)
        self.workers = workers or Workers()
        self.on_event = on_event
        self.log_metrics = log_metrics
        self.engine = RuleEngine(config.rules)
        self.events: list[Event] = []
        self.should_stop = False
        self.onset_step: int | None = None
        self.first_alarm_step: int | None = None
        self.last_clean_step: int | None = None
        #: latest value of every metric, keyed "probe/metric" (for progress bars and callbacks)
        self.latest: dict[str, float] = {}
        self.timings: dict[str, float] = {}
        self._index: ReferenceIndex | None = None
        self._gallery: Any = None
        self._membership_data: dict[str, tuple[torch.Tensor, list[str]]] | None = None
        self.store: Store | None = None
        self.run_name = config.run_name or "run-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        if self.holdout is None and config.membership.every:
            log.warning("membership probe off: no holdout set given (config 'holdout')")
        if self.workers.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.store = Store(self.output_dir / STORE_NAME)
            self.run_id = self.store.ensure_run(
                self.run_name,
                config=config.raw,
                reference=refs.summary(),
                holdout=holdout.summary() if holdout else None,
                info=environment_info(),
            )

    def enabled(self, probe: str) -> bool:
        """Whether ``probe`` runs at all (cadence > 0, and a holdout set for membership)."""
        every = getattr(self.config, probe).every
        return every > 0 and (probe != "membership" or self.holdout is not None)

    def probe(
        self,
        step: int,
        unet: nn.Module,
        scheduler: Any,
        probes: list[str],
        *,
        kind: str = "live",
        path: str | None = None,
        weights_sha256: str | None = None,
    ) -> list[Event]:
        """Run ``probes`` on a model snapshot and record the results; call it on every process.

        The model is put in eval mode and every RNG stream is restored afterwards.

        Args:
            step: training step of the snapshot.
            unet: the (unwrapped) model to probe.
            scheduler: its noise scheduler.
            probes: names from :data:`PROBES`.
            kind, path, weights_sha256: how the snapshot is recorded in the store.

        Returns:
            Events raised (main process; empty elsewhere).
        """
        t0 = time.perf_counter()
        results: dict[str, tuple[ProbeResult | None, torch.Tensor | None]] = {}
        with preserved_rng(), eval_mode(unet):
            if "membership" in probes:
                results["membership"] = (self._membership(unet, scheduler), None)
            if any(p in probes for p in SAMPLE_PROBES):
                samples, seeds = self._samples(unet, scheduler)
                if self.workers.is_main:
                    if "regurgitation" in probes:
                        results["regurgitation"] = (self._regurgitation(samples, seeds, unet), samples)
                    if "identity" in probes:
                        results.update(self._identity(samples, seeds))
        events: list[Event] = []
        if self.workers.is_main:
            events = self._record(step, results, kind=kind, path=path, weights_sha256=weights_sha256)
        self._add_time("total", time.perf_counter() - t0)
        return events

    def summary(self, last_step: int | None = None) -> dict[str, Any]:
        """Onset step, last clean step, events by severity and the paths written."""
        by_sev: dict[str, int] = {}
        for e in self.events:
            by_sev[e.severity] = by_sev.get(e.severity, 0) + 1
        return {
            "run": self.run_name,
            "last_step": last_step,
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

    def close(self, last_step: int | None = None) -> dict[str, Any]:
        """Write ``summary.json`` and close the store (main process); returns the summary."""
        summary = self.summary(last_step)
        if self.store is not None:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.store.close()
            self.store = None
        return summary

    # ------------------------------------------------------------------ probes
    def _membership(self, unet: nn.Module, scheduler: Any) -> ProbeResult | None:
        cfg = self.config.membership
        w = self.workers
        if self._membership_data is None:
            res = unet.config.sample_size
            self._membership_data = {
                "member": _load_subset(self.refs, cfg.num_members, res),
                "holdout": _load_subset(self.holdout, cfg.num_holdout, res),
            }
        share = {}
        for group, (images, ids) in self._membership_data.items():
            idx = split_for_process(range(len(ids)), w.process_index, w.num_processes)
            share[group] = (images[idx], [ids[i] for i in idx])
        t0 = time.perf_counter()
        part = membership_probe(
            unet,
            scheduler,
            share["member"][0],
            share["holdout"][0],
            member_ids=share["member"][1],
            holdout_ids=share["holdout"][1],
            timesteps=cfg.timesteps,
            batch_size=cfg.batch_size,
        )
        items = w.gather(part.items)
        self._add_time("membership", time.perf_counter() - t0)
        if not w.is_main:
            return None
        return membership_from_items(items, seconds=time.perf_counter() - t0)

    def _samples(self, unet: nn.Module, scheduler: Any) -> tuple[torch.Tensor | None, list[int]]:
        """The probe's fixed-seed samples, generated in shares across processes (main gets them all)."""
        cfg = self.config.regurgitation
        w = self.workers
        seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.num_samples))
        mine = split_for_process(seeds, w.process_index, w.num_processes)
        t0 = time.perf_counter()
        part = generate_samples(
            unet, scheduler, mine, num_inference_steps=cfg.inference_steps, batch_size=cfg.batch_size
        )
        samples = torch.cat(w.gather([part]))
        self._add_time("sampling", time.perf_counter() - t0)
        return (samples if w.is_main else None), seeds

    def _regurgitation(self, samples: torch.Tensor, seeds: list[int], unet: nn.Module) -> ProbeResult:
        index = self._reference_index(unet.config.sample_size)
        names = [f"seed-{s:06d}" for s in seeds]
        result = regurgitation_probe(samples, index, self.config.regurgitation, names=names, seeds=seeds)
        for phase in ("embedding", "search"):
            self._add_time(phase, result.timings[phase])
        return result

    def _identity(self, samples: torch.Tensor, seeds: list[int]) -> dict[str, tuple[ProbeResult, None]]:
        """Identity leakage/interpolation; the first call also records the identity gallery."""
        from memwatch.faces import build_gallery, identity_probe, load_face_pipeline

        cfg = self.config.identity
        out: dict[str, tuple[ProbeResult, None]] = {}
        if self._gallery is None:
            t0 = time.perf_counter()
            self._gallery = build_gallery(
                self.refs,
                load_face_pipeline(cfg),
                cfg,
                cache=EmbeddingCache(self.config.cache_dir),
                holdout=self.holdout,
            )
            summary = {k: float(v) for k, v in self._gallery.summary().items() if isinstance(v, int | float)}
            out["identity_gallery"] = (ProbeResult("identity_gallery", summary, items=self._gallery.assignments), None)
            self._add_time("face_gallery", time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = identity_probe(samples, self._gallery, cfg, names=[f"seed-{s:06d}" for s in seeds], seeds=seeds)
        self._add_time("identity", time.perf_counter() - t0)
        out["identity"] = (result, samples)
        return out

    def _reference_index(self, resolution: int) -> ReferenceIndex:
        if self._index is None:
            cfg = self.config.embedder
            embedder = make_embedder(cfg.name, **cfg.options(default_resolution=resolution))
            self._index = ReferenceIndex(self.refs, embedder, EmbeddingCache(self.config.cache_dir))
            self._add_time("reference_embedding", self._index.seconds)
        return self._index

    # ------------------------------------------------------------------ recording (main process)
    def _record(
        self,
        step: int,
        results: dict[str, tuple[ProbeResult | None, torch.Tensor | None]],
        *,
        kind: str,
        path: str | None,
        weights_sha256: str | None,
    ) -> list[Event]:
        assert self.store is not None
        t0 = time.perf_counter()
        snap = self.store.add_snapshot(self.run_id, step, kind=kind, path=path, weights_sha256=weights_sha256)
        flat: dict[str, float] = {}
        evidence: dict[str, dict] = {}
        for probe, (result, samples) in results.items():
            if result is None:
                continue
            if samples is not None and probe in SAMPLE_PROBES:
                pairs = (
                    regurgitation_pairs(result.matches) if probe == "regurgitation" else identity_pairs(result.items)
                )
                grid = save_evidence_grid(
                    self.output_dir / "evidence" / f"{probe}-step{step:08d}.png",
                    samples,
                    pairs,
                    {it.id: it.path for it in self.refs.items},
                    top=self.config.evidence_top,
                )
                if grid is not None:
                    result.evidence.append(str(grid.relative_to(self.output_dir)))
            if probe == "regurgitation":
                evidence[probe] = memorized_evidence(result)
            elif probe == "identity":
                evidence[probe] = identity_evidence(result)
            settings = SETTINGS_OF.get(probe, probe)
            self.store.write_result(
                snap, result, config_hash=self.config.probe_hash(settings), host=socket.gethostname()
            )
            flat.update({f"{probe}/{k}": v for k, v in result.metrics.items()})
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
        if self.onset_step is None and flat.get("regurgitation/distinct_memorized", 0) > 0:
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
        by_step: dict[int, dict[str, float]] = {}
        for row in self.store.metrics(self.run_id):
            by_step.setdefault(row["step"], {})[f"{row['probe']}/{row['metric']}"] = row["value"]
        keep = {f.name for f in dataclasses.fields(Event)}
        self.events = [
            Event.from_dict({k: v for k, v in e.items() if k in keep}) for e in self.store.events(self.run_id)
        ]
        for step in sorted(by_step):
            self._track(step, by_step[step], self.engine.observe(step, by_step[step]))
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


def _load_subset(refs: ReferenceSet, n: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` items in a stable pseudo-random order (by hash of id), as [0, 1] tensors."""
    items = sorted(refs.items, key=lambda it: sha256_bytes(it.id.encode()))[:n]
    images = torch.stack([load_image(it.path, resolution) for it in items])
    return images, [it.id for it in items]


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
