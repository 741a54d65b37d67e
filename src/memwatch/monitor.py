"""The in-training monitor: probes a model inside its accelerate training loop.

Three lines in a training loop::

    monitor = MemorizationMonitor(accelerator, "memwatch.yaml", reference="data/train", holdout="data/holdout")
    ...
        monitor.step(global_step, model, noise_scheduler)   # every step; probes run when due
    monitor.close()                                         # or use the monitor as a context manager

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

import datetime as _dt
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwatch import __version__
from memwatch.config import MonitorConfig, load_config
from memwatch.embed_cache import EmbeddingCache
from memwatch.embedders import make_embedder
from memwatch.errors import MemwatchError
from memwatch.evidence import save_evidence_grid
from memwatch.hashing import sha256_bytes
from memwatch.images import load_image
from memwatch.modes import eval_mode, preserved_rng, unwrap_model
from memwatch.probes.base import ProbeResult
from memwatch.probes.membership import membership_from_items, membership_probe
from memwatch.probes.regurgitation import ReferenceIndex, memorized_evidence, regurgitation_probe
from memwatch.refset import ReferenceSet, load_reference_set
from memwatch.rules import Event, RuleEngine, severity_at_least
from memwatch.sampling import generate_samples, split_for_process
from memwatch.store import Store

log = logging.getLogger("memwatch")

STORE_NAME = "memwatch.sqlite"
EVENTS_NAME = "events.jsonl"
PROBES = ("membership", "regurgitation")


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
        self.on_event = on_event
        self.refs = _as_refset(reference if reference is not None else self.config.reference, "reference set")
        holdout = holdout if holdout is not None else self.config.holdout
        self.holdout = _as_refset(holdout, "holdout set") if holdout is not None else None
        self.output_dir = Path(output_dir or self.config.output_dir or _default_output_dir(accelerator))
        self.is_main = accelerator.is_main_process
        self.engine = RuleEngine(self.config.rules)
        self.events: list[Event] = []
        self.should_stop = False
        self.last_step: int | None = None
        self.last_clean_step: int | None = None
        self.first_alarm_step: int | None = None
        self.onset_step: int | None = None
        self.timings: dict[str, float] = {}
        #: latest value of every metric, keyed "probe/metric" (for progress bars and callbacks)
        self.latest: dict[str, float] = {}
        self._probed: dict[str, int] = {}
        self._last_args: tuple[nn.Module, Any, Any] | None = None
        self._index: ReferenceIndex | None = None
        self._membership_data: dict[str, tuple[torch.Tensor, list[str]]] | None = None
        self._closed = False
        self.store: Store | None = None
        if self.holdout is None and self.config.membership.every:
            log.warning("membership probe off: no holdout set given (config 'holdout' or holdout=...)")
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.store = Store(self.output_dir / STORE_NAME)
            run_name = self.config.run_name or "run-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            self.run_name = run_name
            self.run_id = self.store.ensure_run(
                run_name,
                config=self.config.raw,
                reference=self.refs.summary(),
                holdout=self.holdout.summary() if self.holdout else None,
                info=_environment_info(),
            )

    # ------------------------------------------------------------------ public API
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
        if not due:
            return []
        return self._probe(global_step, model, scheduler, ema, due)

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
            due = [p for p in PROBES if self._enabled(p) and self._probed.get(p) != self.last_step]
            if due:
                self._probe(self.last_step, *self._last_args, due)
        self._closed = True
        self._last_args = None
        summary = self.summary()
        if self.is_main and self.store is not None:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.store.close()
        return summary

    def summary(self) -> dict[str, Any]:
        """Onset step, last clean step, events by severity and the paths written."""
        by_sev: dict[str, int] = {}
        for e in self.events:
            by_sev[e.severity] = by_sev.get(e.severity, 0) + 1
        return {
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

    def __enter__(self) -> MemorizationMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ probing
    def _enabled(self, probe: str) -> bool:
        every = getattr(self.config, probe).every
        return every > 0 and (probe != "membership" or self.holdout is not None)

    def _due(self, probe: str, step: int) -> bool:
        return (
            self._enabled(probe) and step % getattr(self.config, probe).every == 0 and self._probed.get(probe) != step
        )

    def _probe(self, step: int, model: nn.Module, scheduler: Any, ema: Any, due: list[str]) -> list[Event]:
        t0 = time.perf_counter()
        results: dict[str, tuple[ProbeResult, torch.Tensor | None]] = {}
        with preserved_rng(), _probe_weights(model, ema, self.config.weights) as unet, eval_mode(unet):
            if "membership" in due:
                results["membership"] = (self._membership(unet, scheduler), None)
            if "regurgitation" in due:
                results["regurgitation"] = self._regurgitation(unet, scheduler)
        for p in due:
            self._probed[p] = step
        events: list[Event] = []
        if self.is_main:
            events = self._record(step, results)
        self._sync_stop()
        self._add_time("total", time.perf_counter() - t0)
        return events

    def _membership(self, unet: nn.Module, scheduler: Any) -> ProbeResult | None:
        cfg = self.config.membership
        acc = self.accelerator
        if self._membership_data is None:
            res = unet.config.sample_size
            self._membership_data = {
                "member": _load_subset(self.refs, cfg.num_members, res),
                "holdout": _load_subset(self.holdout, cfg.num_holdout, res),
            }
        share = {}
        for group, (images, ids) in self._membership_data.items():
            idx = split_for_process(range(len(ids)), acc.process_index, acc.num_processes)
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
        items = _gather(acc, part.items)
        self._add_time("membership", time.perf_counter() - t0)
        if not self.is_main:
            return None
        return membership_from_items(items, seconds=time.perf_counter() - t0)

    def _regurgitation(self, unet: nn.Module, scheduler: Any) -> tuple[ProbeResult | None, torch.Tensor | None]:
        cfg = self.config.regurgitation
        acc = self.accelerator
        seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.num_samples))
        mine = split_for_process(seeds, acc.process_index, acc.num_processes)
        t0 = time.perf_counter()
        part = generate_samples(
            unet, scheduler, mine, num_inference_steps=cfg.inference_steps, batch_size=cfg.batch_size
        )
        samples = torch.cat(_gather(acc, [part]))
        sampling = time.perf_counter() - t0
        self._add_time("sampling", sampling)
        if not self.is_main:
            return None, None
        index = self._reference_index(unet.config.sample_size)
        result = regurgitation_probe(samples, index, cfg, names=[f"seed-{s:06d}" for s in seeds], seeds=seeds)
        result.timings["sampling"] = sampling
        for phase in ("embedding", "search"):
            self._add_time(phase, result.timings[phase])
        return result, samples

    def _reference_index(self, resolution: int) -> ReferenceIndex:
        if self._index is None:
            cfg = self.config.embedder
            embedder = make_embedder(cfg.name, **cfg.options(default_resolution=resolution))
            self._index = ReferenceIndex(self.refs, embedder, EmbeddingCache(self.config.cache_dir))
            self._add_time("reference_embedding", self._index.seconds)
        return self._index

    # ------------------------------------------------------------------ recording (main process)
    def _record(self, step: int, results: dict[str, tuple[ProbeResult | None, torch.Tensor | None]]) -> list[Event]:
        assert self.store is not None
        t0 = time.perf_counter()
        snap = self.store.add_snapshot(self.run_id, step, kind="live")
        flat: dict[str, float] = {}
        evidence: dict[str, dict] = {}
        for probe, (result, samples) in results.items():
            if result is None:
                continue
            if probe == "regurgitation" and samples is not None:
                grid = save_evidence_grid(
                    self.output_dir / "evidence" / f"regurgitation-step{step:08d}.png",
                    samples,
                    result.matches,
                    {it.id: it.path for it in self.refs.items},
                    top=self.config.evidence_top,
                )
                if grid is not None:
                    result.evidence.append(str(grid.relative_to(self.output_dir)))
                evidence[probe] = memorized_evidence(result)
                if self.onset_step is None and result.metrics["distinct_memorized"] > 0:
                    self.onset_step = step
            self.store.write_result(snap, result, config_hash=self.config.probe_hash(probe), host=socket.gethostname())
            flat.update({f"{probe}/{k}": v for k, v in result.metrics.items()})
        self._add_time("store", time.perf_counter() - t0)
        self.latest.update(flat)
        self.accelerator.log({f"memwatch/{k}": v for k, v in flat.items()}, step=step)
        events = self.engine.observe(step, flat, evidence)
        alarm = any(severity_at_least(e.severity, "warning") for e in events)
        if alarm and self.first_alarm_step is None:
            self.first_alarm_step = step
        if self.first_alarm_step is None:
            self.last_clean_step = step
        for event in events:
            self._emit(event)
        return events

    def _emit(self, event: Event) -> None:
        self.events.append(event)
        self.store.add_event(self.run_id, event.to_dict())
        level = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}[event.severity]
        log.log(level, "[%s] %s", event.rule, event.message)
        with open(self.output_dir / EVENTS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps({"run": self.run_name, **event.to_dict()}, sort_keys=True, default=str) + "\n")
        self.accelerator.log({f"memwatch/events/{event.rule}": event.value}, step=event.step)
        if self.on_event is not None:
            self.on_event(event)
        if self.config.stop_on and severity_at_least(event.severity, self.config.stop_on):
            self.should_stop = True

    def _sync_stop(self) -> None:
        """Make every process agree on ``should_stop`` (called at probe steps, which all processes share)."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            flag = [self.should_stop]
            broadcast_object_list(flag, from_process=0)
            self.should_stop = bool(flag[0])

    def _add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


# ---------------------------------------------------------------------- helpers
def _as_refset(value: str | Path | ReferenceSet | None, what: str) -> ReferenceSet:
    if value is None:
        raise MemwatchError(f"no {what}: pass reference=... to the monitor or set 'reference' in the config")
    return value if isinstance(value, ReferenceSet) else load_reference_set(value, what=what)


def _default_output_dir(accelerator: Any) -> Path:
    project = getattr(getattr(accelerator, "project_configuration", None), "project_dir", None)
    return Path(project) / "memwatch" if project else Path("memwatch")


def _load_subset(refs: ReferenceSet, n: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``n`` items in a stable pseudo-random order (by hash of id), as [0, 1] tensors."""
    items = sorted(refs.items, key=lambda it: sha256_bytes(it.id.encode()))[:n]
    images = torch.stack([load_image(it.path, resolution) for it in items])
    return images, [it.id for it in items]


def _gather(accelerator: Any, objects: list) -> list:
    """Concatenate per-process lists in process order (a collective when there are several processes)."""
    if accelerator.num_processes == 1:
        return list(objects)
    from accelerate.utils import gather_object

    return gather_object(objects)


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


def _environment_info() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("memwatch", "torch", "diffusers", "accelerate", "open_clip_torch", "facenet-pytorch"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["memwatch"] = versions["memwatch"] or __version__
    return {"versions": versions, "host": socket.gethostname()}
