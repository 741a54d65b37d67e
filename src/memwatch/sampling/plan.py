"""The fixed-seed samples that sample probes share: which seeds and prompts, drawing them, and finding their
nearest training images once.

Successive probes must be comparable, so the same seeds are drawn at every probed step: an
unconditional model draws ``num_samples`` seeds from ``seed_offset``; a text-to-image model draws
``samples_per_prompt`` seeds for each of up to ``max_prompts`` training captions and
``max_holdout_prompts`` held-out captions. The samples are generated in shares across processes and
gathered in order on the main process (:class:`memwatch.core.session.ProbeSession` does the gathering),
where every sample probe due at that step reads them, and where they are embedded and searched against
the training set once (:meth:`Samples.neighbours`), however many probes read them.

The settings are declared once here (:class:`SamplingSettings`, the config's ``sampling`` section).

Example:
    >>> SamplingSettings().num_samples
    32
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from memwatch.models.parts import ModelParts
from memwatch.sampling.ddim import generate_samples
from memwatch.sampling.text_to_image import generate_text_to_image_samples, prompt_sets, uncaptioned_counts
from memwatch.settings import Settings, setting

if TYPE_CHECKING:
    from memwatch.core.probe import ProbeData
    from memwatch.core.workers import Workers
    from memwatch.data.reference_index import ReferenceIndex

#: Settings that decide which samples are drawn: a probe that reads samples keys its results by them.
#: (``every`` and ``batch_size`` decide when and how fast, not what.)
SAMPLE_KEYS = (
    "num_samples",
    "seed_offset",
    "inference_steps",
    "samples_per_prompt",
    "max_prompts",
    "max_holdout_prompts",
    "guidance_scale",
)


@dataclass
class SamplingSettings(Settings):
    """How the shared probe samples are drawn (section ``sampling``)."""

    section = "sampling"
    every: int = setting(
        100,
        "draw the shared samples every this many training steps (0: never); a sample probe whose every is null "
        "follows it, and the adaptive cadence stretches it under its budget",
        min=0,
        unit="steps",
        source="costly (num_samples x inference_steps UNet passes), but the onset forecast needs several probes "
        "before onset: scripts/tune_forecast.py on bench_warnings.py seeds 100-105 (every 200 left runs of 8-16 "
        "images without lead)",
    )
    num_samples: int = setting(32, "generated samples per probe (unconditional models)", min=1)
    seed_offset: int = setting(0, "first probe seed; sample i uses seed seed_offset + i", min=0)
    inference_steps: int = setting(
        10, "DDIM steps per sample", min=1, unit="steps",
        source="costly: num_samples x inference_steps UNet passes; 10 steps track 25 (the smallest d1/d2 of the 32 "
        "seeds: Spearman 0.93-0.99 over training, first copies within a probe or two: scripts/tune_forecast.py "
        "--diagnose on bench_warnings.py seeds 100-102)",
    )  # fmt: skip
    batch_size: int | None = setting(
        None,
        "samples generated per forward pass; null: as many as training puts through the model at once (the monitor "
        "counts them: a batch that fits beside training), or 16 where no training is seen (memwatch probe / watch)",
        min=1,
        source="memwatch: few large passes cost less than many small ones (the demo recipe on 2 CPU cores: 32 "
        "samples x 10 steps in 0.47 s at 32 a pass, 0.58 s at 16, the same samples to the bit); no larger than "
        "training's own batch, so sampling never needs more memory than training has shown it has",
    )
    samples_per_prompt: int = setting(
        4,
        "text-to-image models: samples (seeds) per prompt, k",
        min=1,
        source="4 images per prompt as in Wen et al. 2024 (detect_mem.py)",
    )
    max_prompts: int = setting(
        8,
        "text-to-image models: training captions used as prompts",
        min=1,
        source="8 x 4 = 32 member samples: the unconditional num_samples budget",
    )
    max_holdout_prompts: int = setting(
        4,
        "text-to-image models: held-out captions sampled too, a control (0: none)",
        min=0,
        source="half the members: a control",
    )
    guidance_scale: float = setting(
        7.5, "text-to-image models: classifier-free guidance weight", source="StableDiffusionPipeline's default"
    )

    def key(self) -> dict[str, Any]:
        """What decides the samples (:data:`SAMPLE_KEYS`), for the keys of the results that read them."""
        values = self.to_dict()
        return {k: values[k] for k in SAMPLE_KEYS}


@dataclass
class SamplePlan:
    """Which samples the sample probes draw: one seed each, and for text-to-image models its prompt.

    Attributes:
        seeds: one per sample (distinct, so per-seed trajectories stay per sample).
        prompts: the prompt of each sample (text-to-image), else None.
        groups: ``"member"`` (training caption) or ``"holdout"`` per sample (text-to-image).
        counts: metrics about the prompts (items skipped for lack of a caption).

    Example:
        >>> SamplePlan([0, 7]).names
        ['seed-000000', 'seed-000007']
    """

    seeds: list[int]
    prompts: list[str] | None = None
    groups: list[str] | None = None
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [f"seed-{s:06d}" for s in self.seeds]


@dataclass
class Neighbours:
    """The nearest training images of every sample: ``distances`` and ``indices`` ``(N, k)``, nearest first,
    in the reference index's rows (``ids[j]`` names row ``j``)."""

    distances: torch.Tensor
    indices: torch.Tensor
    ids: list[str]

    @property
    def k(self) -> int:
        return int(self.distances.shape[1])

    def first(self, k: int) -> Neighbours:
        """The ``k`` nearest only."""
        return Neighbours(self.distances[:, :k], self.indices[:, :k], self.ids)


@dataclass
class Samples:
    """The fixed-seed samples drawn for the sample probes due at one step (main process).

    Attributes:
        images: ``(N, 3, H, W)`` in [0, 1].
        plan: which seed (and prompt) each sample came from.
        timings: seconds spent embedding and searching them (``embedding``, ``search``), once.
        settings: the ``sampling`` settings they were drawn with (a probe that draws more samples the same way
            reads them), None where unknown.

    Example:
        >>> s = Samples(torch.zeros(2, 3, 8, 8), SamplePlan([0, 1]))
        >>> s.plan.names
        ['seed-000000', 'seed-000001']
    """

    images: torch.Tensor
    plan: SamplePlan
    timings: dict[str, float] = field(default_factory=dict)
    settings: SamplingSettings | None = None
    _embedded: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _found: dict[int, Neighbours] = field(default_factory=dict, repr=False)

    def embedded(self, index: ReferenceIndex) -> torch.Tensor:
        """The samples in the index's embedding space, embedded on first use."""
        key = id(index)
        if key not in self._embedded:
            t0 = time.perf_counter()
            self._embedded[key] = index.embedder.embed(self.images)
            self._add("embedding", time.perf_counter() - t0)
        return self._embedded[key]

    def neighbours(self, index: ReferenceIndex, k: int, *, chunk_size: int = 4096) -> Neighbours:
        """The ``k`` nearest training images of every sample: embedded and searched once per step, shared by
        every sample probe that asks (a later probe that needs more neighbours searches again, without
        embedding again).

        Args:
            index: the training set ready for search.
            k: neighbours wanted (at most the index's size).
            chunk_size: reference rows per search chunk (bounds memory; results do not depend on it).
        """
        k = min(k, len(index))
        found = self._found.get(id(index))
        if found is None or found.k < k:
            query = self.embedded(index)
            t0 = time.perf_counter()
            distances, indices = index.search(query, k, chunk_size=chunk_size)
            self._add("search", time.perf_counter() - t0)
            found = self._found[id(index)] = Neighbours(distances, indices, index.ids)
        return found.first(k)

    def _add(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


def plan_samples(settings: SamplingSettings, parts: ModelParts, data: ProbeData) -> SamplePlan:
    """The seeds (and prompts) to draw for this model.

    Raises:
        ProbeUnavailable: a text-to-image model, but the training set has no captions.
    """
    if not parts.text_to_image:
        return SamplePlan(list(range(settings.seed_offset, settings.seed_offset + settings.num_samples)))
    members, holdout = prompt_sets(
        data.refs,
        data.holdout,
        settings.max_prompts,
        settings.max_holdout_prompts,
        "text-to-image samples are prompted with training captions",
    )
    k = settings.samples_per_prompt
    chosen = [(p, "member") for p in members.prompts] + [(p, "holdout") for p in holdout.prompts]
    # Sample j of prompt i gets seed seed_offset + i * k + j: distinct seeds, the same at every probe.
    return SamplePlan(
        seeds=[settings.seed_offset + i * k + j for i in range(len(chosen)) for j in range(k)],
        prompts=[p for p, _ in chosen for _ in range(k)],
        groups=[g for _, g in chosen for _ in range(k)],
        counts=uncaptioned_counts(members, holdout),
    )


#: samples per forward pass where ``sampling.batch_size`` is null and no training batch was seen
FALLBACK_BATCH = 16


def generate_share(
    settings: SamplingSettings, parts: ModelParts, plan: SamplePlan, workers: Workers, training_batch: int = 0
) -> torch.Tensor:
    """This process's contiguous share of the plan's samples; concatenated in process order they are
    the plan's samples in order (the caller gathers them).

    Args:
        settings: the ``sampling`` section.
        parts: the snapshot's model parts.
        plan: which seeds (and prompts) to draw.
        workers: the processes sharing the work.
        training_batch: the most images training put through the model at once (0: unknown); with
            ``batch_size`` null, samples are drawn that many at a time (else :data:`FALLBACK_BATCH`).

    Example:
        >>> images = generate_share(settings, parts, plan_samples(settings, parts, data), Workers())  # doctest: +SKIP
    """
    batch_size = settings.batch_size or training_batch or FALLBACK_BATCH
    mine = workers.share(range(len(plan.seeds)))
    if not parts.text_to_image:
        return generate_samples(
            parts.unet,
            parts.scheduler,
            [plan.seeds[i] for i in mine],
            num_inference_steps=settings.inference_steps,
            batch_size=batch_size,
        )
    assert plan.prompts is not None
    return generate_text_to_image_samples(
        parts,
        [plan.prompts[i] for i in mine],
        [plan.seeds[i] for i in mine],
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.inference_steps,
        batch_size=batch_size,
    )


__all__ = ["Neighbours", "SamplePlan", "Samples", "SamplingSettings", "generate_share", "plan_samples"]
