"""The one probe core every front-end calls: "probe this snapshot with this plan, write to this store".

A :class:`ProbeSession` holds what stays fixed across the snapshots of a run: the config, the
reference and holdout sets, the reference index, the store and its run, and the rule engine. The
front-ends (the in-training monitor, ``memwatch probe`` and ``memwatch watch``) only decide which
snapshot to probe and when, then call :meth:`ProbeSession.probe`.

Work inside a probe (sample generation, membership losses) is split across processes by a
:class:`Workers` description and gathered in process order; with one process it is a plain call.
Only the main process searches neighbours, writes the store and raises events.

One mechanism serves unconditional and text-to-image models: :meth:`ProbeSession.probe` takes a
bare UNet with its scheduler (the in-training monitor), or a model bundle (a loaded
:class:`~memwatch.snapshots.Snapshot`, a diffusers pipeline: anything with ``unet``, ``scheduler``
and, for ``UNet2DConditionModel``, tokenizer / text encoder / VAE), and picks the sampling from it
(:func:`model_bundle`). Text-to-image snapshots are prompted with the training captions, k samples
per prompt plus held-out captions; their membership losses are taken on VAE latents conditioned on
each image's caption; and the conditional-noise probe (Wen et al. 2024) runs on them only.
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
from memwatch.modes import eval_mode, preserved_rng, unwrap_model
from memwatch.probes.base import ProbeResult
from memwatch.probes.condnoise import condnoise_evidence, condnoise_from_items, condnoise_probe
from memwatch.probes.membership import membership_from_items, membership_probe
from memwatch.probes.regurgitation import ReferenceIndex, add_prompts, memorized_evidence, regurgitation_probe
from memwatch.refset import ReferenceSet, load_reference_set
from memwatch.rules import Event, RuleEngine, severity_at_least
from memwatch.sampling import generate_samples, split_for_process
from memwatch.store import STORE_NAME, Store
from memwatch.t2i import (
    CaptionPrompts,
    T2IParts,
    caption_of,
    caption_prompts,
    encode_images,
    encode_prompts,
    generate_t2i_samples,
    t2i_parts,
    vae_scale_factor,
)

log = logging.getLogger("memwatch")

EVENTS_NAME = "events.jsonl"
PROBES = ("membership", "regurgitation", "identity", "condnoise")
#: probes that look at generated samples; when several are due they share one set of samples
SAMPLE_PROBES = ("regurgitation", "identity")
#: probes that only apply to text-to-image models (they measure a prompt's effect)
T2I_ONLY_PROBES = ("condnoise",)
#: results recorded under a name of their own but configured by another probe's settings
SETTINGS_OF = {"identity_gallery": "identity"}


class ProbeUnavailable(MemwatchError):
    """A probe cannot run on this snapshot with this data (e.g. no captions to prompt with).

    The probe is recorded as failed with this message for the snapshot; the other probes run.
    """


@dataclass
class ModelBundle:
    """What the probes need from a snapshot.

    Attributes:
        unet: the denoiser (possibly wrapped).
        scheduler: its training noise scheduler.
        t2i: tokenizer, text encoder and VAE with the same UNet and scheduler, for text-to-image
            UNets; None for unconditional ones.
    """

    unet: nn.Module
    scheduler: Any
    t2i: T2IParts | None = None

    @property
    def text_to_image(self) -> bool:
        return self.t2i is not None


def model_bundle(model: Any, scheduler: Any = None) -> ModelBundle:
    """The UNet, scheduler and (text-to-image) text components of what a front-end passes.

    Args:
        model: a bare UNet (``UNet2DModel``, possibly wrapped), or anything with ``unet`` and
            ``scheduler`` attributes: a :class:`~memwatch.snapshots.Snapshot` (text components in
            ``.text``) or a diffusers pipeline (``tokenizer``, ``text_encoder``, ``vae``).
        scheduler: the training noise scheduler; default the bundle's own.

    Raises:
        MemwatchError: no scheduler, or a text-to-image UNet without tokenizer / text encoder.

    Example:
        >>> model_bundle(load_snapshot("runs/sd/checkpoint-500", base_model="sd15")).text_to_image  # doctest: +SKIP
        True
    """
    is_bundle = not isinstance(model, nn.Module) or hasattr(model, "unet")
    unet = getattr(model, "unet", None) if is_bundle else model
    sched = scheduler
    if sched is None and is_bundle:
        sched = getattr(model, "scheduler", None)
    if unet is None or sched is None:
        raise MemwatchError(
            f"{type(model).__name__}: no UNet or noise scheduler: pass the UNet and its training scheduler, or a "
            "snapshot / pipeline that has both"
        )
    if getattr(unwrap_model(unet).config, "cross_attention_dim", None) is None:
        return ModelBundle(unet, sched)
    if not is_bundle:
        raise MemwatchError(
            f"{type(unwrap_model(unet)).__name__} is text-conditioned: probe it with its tokenizer, text encoder and "
            "VAE (pass the loaded snapshot or pipeline instead of the bare UNet)"
        )
    return ModelBundle(unet, sched, dataclasses.replace(t2i_parts(model), scheduler=sched))


@dataclass
class SamplePlan:
    """Which samples a sample probe draws: one seed each, and for text-to-image models its prompt.

    Attributes:
        seeds: one per sample (distinct, so per-seed trajectories stay per sample).
        prompts: the prompt of each sample (text-to-image), else None.
        groups: ``"member"`` (training caption) or ``"holdout"`` per sample (text-to-image).
        counts: metrics about the prompts (items skipped for lack of a caption).
    """

    seeds: list[int]
    prompts: list[str] | None = None
    groups: list[str] | None = None
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [f"seed-{s:06d}" for s in self.seeds]


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
        #: (resolution, text-to-image) -> group -> (images, ids, captions); uncaptioned counts
        self._membership_data: dict[tuple[int, bool], dict[str, _Subset]] = {}
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

    def enabled(self, probe: str, *, text_to_image: bool = False) -> bool:
        """Whether ``probe`` runs at all on a model of this kind.

        Cadence > 0; a holdout set for membership; a text-to-image model for the probes that
        measure a prompt's effect (:data:`T2I_ONLY_PROBES`). The in-training monitor probes
        unconditional UNets and asks without ``text_to_image``.

        Args:
            probe: a name from :data:`PROBES`.
            text_to_image: whether the snapshot is a text-to-image model.
        """
        every = getattr(self.config, probe).every
        if probe in T2I_ONLY_PROBES and not text_to_image:
            return False
        return every > 0 and (probe != "membership" or self.holdout is not None)

    @staticmethod
    def applies(probe: str, bundle: ModelBundle) -> bool:
        """Whether ``probe`` can measure this kind of model (condnoise needs a text-to-image one)."""
        return probe not in T2I_ONLY_PROBES or bundle.text_to_image

    def probe(
        self,
        step: int,
        model: Any,
        scheduler: Any = None,
        probes: list[str] | None = None,
        *,
        kind: str = "live",
        path: str | None = None,
        weights_sha256: str | None = None,
    ) -> list[Event]:
        """Run ``probes`` on a model snapshot and record the results; call it on every process.

        The model is put in eval mode and every RNG stream is restored afterwards. Unconditional
        models are sampled from fixed seeds; text-to-image models (see :func:`model_bundle`) from
        training and held-out captions with fixed seeds. Probes that do not apply to the model
        (condnoise on an unconditional UNet) are skipped; when none is left nothing is recorded. A
        probe that cannot run on this data (:class:`ProbeUnavailable`, e.g. no captions) is
        recorded as failed with the reason, and the others still run.

        Args:
            step: training step of the snapshot.
            model: the (unwrapped) UNet, or a bundle: a loaded snapshot or a pipeline.
            scheduler: its noise scheduler (default: the bundle's).
            probes: names from :data:`PROBES` (default: every enabled probe).
            kind, path, weights_sha256: how the snapshot is recorded in the store.

        Returns:
            Events raised (main process; empty elsewhere).

        Example:
            >>> session.probe(1000, unet, noise_scheduler, ["membership"])  # doctest: +SKIP
            >>> session.probe(500, load_snapshot(ckpt, base_model="sd15"), probes=["condnoise"])  # doctest: +SKIP
        """
        t0 = time.perf_counter()
        bundle = model_bundle(model, scheduler)
        wanted = (
            [p for p in PROBES if self.enabled(p, text_to_image=bundle.text_to_image)]
            if probes is None
            else list(probes)
        )
        unknown = sorted(set(wanted) - set(PROBES))
        if unknown:
            raise MemwatchError(f"unknown probe(s) {unknown}: use names from {PROBES}")
        probes = [p for p in wanted if self.applies(p, bundle)]
        if not probes:
            return []
        results: dict[str, tuple[ProbeResult | None, torch.Tensor | None]] = {}
        failures: dict[str, str] = {}
        with preserved_rng(), eval_mode(bundle.unet):
            if "membership" in probes:
                results["membership"] = (self._attempt(["membership"], failures, self._membership, bundle), None)
            if "condnoise" in probes:
                results["condnoise"] = (self._attempt(["condnoise"], failures, self._condnoise, bundle), None)
            due = [p for p in SAMPLE_PROBES if p in probes]
            drawn = self._attempt(due, failures, self._samples, bundle) if due else None
            if drawn is not None and self.workers.is_main:
                samples, plan = drawn
                assert samples is not None
                if "regurgitation" in probes:
                    results["regurgitation"] = (self._regurgitation(samples, plan, bundle), samples)
                if "identity" in probes:
                    results.update(self._identity(samples, plan.seeds))
        events: list[Event] = []
        if self.workers.is_main:
            events = self._record(step, results, kind=kind, path=path, weights_sha256=weights_sha256, failures=failures)
        self._add_time("total", time.perf_counter() - t0)
        return events

    @staticmethod
    def _attempt(
        probes: list[str], failures: dict[str, str], run: Callable[[ModelBundle], Any], bundle: ModelBundle
    ) -> Any:
        """``run(bundle)``; a :class:`ProbeUnavailable` marks ``probes`` failed with its reason and gives None.

        The reasons come from the data (captions), which every process sees alike, so all
        processes skip the same probes and no collective call is left waiting.
        """
        try:
            return run(bundle)
        except ProbeUnavailable as e:
            log.warning("%s not run: %s", "/".join(probes), e)
            failures.update(dict.fromkeys(probes, str(e)))
            return None

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
    def _membership(self, bundle: ModelBundle) -> ProbeResult | None:
        cfg = self.config.membership
        w = self.workers
        t2i = bundle.t2i
        resolution = _image_resolution(bundle)
        key = (resolution, t2i is not None)
        if key not in self._membership_data:
            # Text-to-image losses are conditioned on each image's caption: uncaptioned items are skipped.
            self._membership_data[key] = {
                "member": _load_subset(self.refs, cfg.num_members, resolution, captioned=t2i is not None),
                "holdout": _load_subset(self.holdout, cfg.num_holdout, resolution, captioned=t2i is not None),
            }
        data = self._membership_data[key]
        if t2i is not None and not data["member"].ids:
            raise ProbeUnavailable(_no_captions(self.refs, "membership losses are conditioned on each image's caption"))
        share: dict[str, dict[str, Any]] = {}
        for group, subset in data.items():
            idx = split_for_process(range(len(subset.ids)), w.process_index, w.num_processes)
            cond = None
            if t2i is not None and idx:
                cond = encode_prompts(t2i.tokenizer, t2i.text_encoder, [subset.captions[i] for i in idx])
            share[group] = {"images": subset.images[idx], "ids": [subset.ids[i] for i in idx], "cond": cond}
        encode = None
        if t2i is not None and t2i.vae is not None:
            vae = t2i.vae

            def encode(images: torch.Tensor) -> torch.Tensor:
                return encode_images(vae, images)

        t0 = time.perf_counter()
        part = membership_probe(
            bundle.unet,
            bundle.scheduler,
            share["member"]["images"],
            share["holdout"]["images"],
            member_ids=share["member"]["ids"],
            holdout_ids=share["holdout"]["ids"],
            timesteps=cfg.timesteps,
            batch_size=cfg.batch_size,
            member_conditioning=share["member"]["cond"],
            holdout_conditioning=share["holdout"]["cond"],
            encode=encode,
        )
        items = w.gather(part.items)
        self._add_time("membership", time.perf_counter() - t0)
        if not w.is_main:
            return None
        result = membership_from_items(items, seconds=time.perf_counter() - t0)
        if t2i is not None:
            result.metrics.update({f"uncaptioned_{group}": float(subset.uncaptioned) for group, subset in data.items()})
        return result

    def _prompt_sets(self, num_members: int, num_holdout: int, why: str) -> tuple[CaptionPrompts, CaptionPrompts]:
        """Training captions and held-out captions (none that is also a training caption) to prompt with."""
        members = caption_prompts(self.refs, num_members)
        if not members.prompts:
            raise ProbeUnavailable(_no_captions(self.refs, why))
        trained = {c for c in map(caption_of, self.refs.items) if c is not None}
        return members, caption_prompts(self.holdout, num_holdout, exclude=trained)

    def _condnoise(self, bundle: ModelBundle) -> ProbeResult | None:
        """Wen et al.'s conditional-noise scores of training vs held-out captions (prompts split across processes)."""
        cfg = self.config.condnoise
        w = self.workers
        members, holdout = self._prompt_sets(cfg.num_members, cfg.num_holdout, "condnoise scores training captions")
        t0 = time.perf_counter()
        part = condnoise_probe(
            bundle.t2i,
            split_for_process(members.prompts, w.process_index, w.num_processes),
            split_for_process(holdout.prompts, w.process_index, w.num_processes),
            cfg,
        )
        items = w.gather([{k: r[k] for k in ("item", "group", "score")} for r in part.items])
        self._add_time("condnoise", time.perf_counter() - t0)
        if not w.is_main:
            return None
        images = dict(zip(members.prompts, members.images, strict=True))
        for row in items:  # how many training images carry the caption (duplicates memorize sooner)
            row["images"] = images.get(row["item"], 0) if row["group"] == "member" else 0
        result = condnoise_from_items(items, seconds=time.perf_counter() - t0)
        result.metrics.update(_uncaptioned(members, holdout))
        return result

    def _sample_plan(self, bundle: ModelBundle) -> SamplePlan:
        cfg = self.config.regurgitation
        if bundle.t2i is None:
            return SamplePlan(list(range(cfg.seed_offset, cfg.seed_offset + cfg.num_samples)))
        members, holdout = self._prompt_sets(
            cfg.max_prompts, cfg.max_holdout_prompts, "text-to-image samples are prompted with training captions"
        )
        k = cfg.samples_per_prompt
        chosen = [(p, "member") for p in members.prompts] + [(p, "holdout") for p in holdout.prompts]
        # Sample j of prompt i gets seed seed_offset + i * k + j: distinct seeds, the same at every probe.
        return SamplePlan(
            seeds=[cfg.seed_offset + i * k + j for i in range(len(chosen)) for j in range(k)],
            prompts=[p for p, _ in chosen for _ in range(k)],
            groups=[g for _, g in chosen for _ in range(k)],
            counts=_uncaptioned(members, holdout),
        )

    def _samples(self, bundle: ModelBundle) -> tuple[torch.Tensor | None, SamplePlan]:
        """The probe's fixed-seed samples, generated in shares across processes (main gets them all)."""
        cfg = self.config.regurgitation
        w = self.workers
        plan = self._sample_plan(bundle)
        mine = split_for_process(range(len(plan.seeds)), w.process_index, w.num_processes)
        t0 = time.perf_counter()
        if bundle.t2i is None:
            part = generate_samples(
                bundle.unet,
                bundle.scheduler,
                [plan.seeds[i] for i in mine],
                num_inference_steps=cfg.inference_steps,
                batch_size=cfg.batch_size,
            )
        else:
            assert plan.prompts is not None
            part = generate_t2i_samples(
                bundle.t2i,
                [plan.prompts[i] for i in mine],
                [plan.seeds[i] for i in mine],
                guidance_scale=cfg.guidance_scale,
                num_inference_steps=cfg.inference_steps,
                batch_size=cfg.batch_size,
            )
        samples = torch.cat(w.gather([part]))
        self._add_time("sampling", time.perf_counter() - t0)
        return (samples if w.is_main else None), plan

    def _regurgitation(self, samples: torch.Tensor, plan: SamplePlan, bundle: ModelBundle) -> ProbeResult:
        resolution = samples.shape[-1] if bundle.text_to_image else unwrap_model(bundle.unet).config.sample_size
        index = self._reference_index(resolution)
        result = regurgitation_probe(samples, index, self.config.regurgitation, names=plan.names, seeds=plan.seeds)
        if plan.prompts is not None and plan.groups is not None:
            add_prompts(result, plan.prompts, plan.groups)
            result.metrics.update(plan.counts)
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
        failures: dict[str, str] | None = None,
    ) -> list[Event]:
        assert self.store is not None
        t0 = time.perf_counter()
        snap = self.store.add_snapshot(self.run_id, step, kind=kind, path=path, weights_sha256=weights_sha256)
        for probe, reason in (failures or {}).items():
            self.store.record_failure(snap, probe, config_hash=self.config.probe_hash(probe), error=reason)
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
            elif probe == "condnoise":
                evidence[probe] = condnoise_evidence(result, self.config.condnoise.top_k)
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


@dataclass
class _Subset:
    """Images of one membership group: tensors, ids, captions, and items skipped for lack of a caption."""

    images: torch.Tensor
    ids: list[str]
    captions: list[str]
    uncaptioned: int = 0


def _load_subset(refs: ReferenceSet | None, n: int, resolution: int, *, captioned: bool = False) -> _Subset:
    """The first ``n`` items in a stable pseudo-random order (by hash of id), as [0, 1] tensors.

    With ``captioned``, only items with a caption are candidates; the others are counted.
    """
    candidates = list(refs.items) if refs is not None else []
    uncaptioned = 0
    if captioned:
        kept = [it for it in candidates if caption_of(it) is not None]
        uncaptioned = len(candidates) - len(kept)
        candidates = kept
    items = sorted(candidates, key=lambda it: sha256_bytes(it.id.encode()))[:n]
    images = (
        torch.stack([load_image(it.path, resolution) for it in items])
        if items
        else torch.empty(0, 3, resolution, resolution)
    )
    return _Subset(images, [it.id for it in items], [caption_of(it) or "" for it in items], uncaptioned)


def _image_resolution(bundle: ModelBundle) -> int:
    """Side of the images the model is trained on: the UNet's sample size (times the VAE factor for latents)."""
    size = unwrap_model(bundle.unet).config.sample_size
    side = size if isinstance(size, int) else int(size[0])
    return side * vae_scale_factor(bundle.t2i.vae) if bundle.t2i is not None else side


def _uncaptioned(members: CaptionPrompts, holdout: CaptionPrompts) -> dict[str, float]:
    """Items skipped for lack of a caption, as metrics (nothing is dropped silently)."""
    return {"uncaptioned_member": float(members.uncaptioned), "uncaptioned_holdout": float(holdout.uncaptioned)}


def _no_captions(refs: ReferenceSet, why: str) -> str:
    return (
        f"reference set {refs.root}: none of its {len(refs)} items has a caption ({why}): give captions in "
        "metadata.jsonl ('text' or 'caption' column) or in the manifest ('caption')"
    )


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
