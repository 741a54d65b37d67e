"""The fixed-seed samples that sample probes share: which seeds and prompts, and drawing them.

Successive probes must be comparable, so a probe draws the same seeds at every step: an
unconditional model draws ``num_samples`` seeds from ``seed_offset``; a text-to-image model draws
``samples_per_prompt`` seeds for each of up to ``max_prompts`` training captions and
``max_holdout_prompts`` held-out captions. The samples are generated in shares across processes and
gathered in order on the main process (:class:`memwatch.session.ProbeSession` does the gathering), where
every sample probe due at that step reads them.

The sampling settings are declared once here (:class:`SamplingSettings`) and live in config files
under ``probes.regurgitation`` (see :data:`memwatch.config.SAMPLING_SECTION`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memwatch.model_parts import ModelParts
from memwatch.probes.base import ProbeData, ProbeSettings, Samples
from memwatch.sampling import generate_samples
from memwatch.settings import setting
from memwatch.text_to_image import generate_text_to_image_samples, prompt_sets, uncaptioned_counts
from memwatch.workers import Workers


@dataclass
class SamplingSettings(ProbeSettings):
    """How the shared probe samples are drawn."""

    num_samples: int = setting(32, "generated samples per probe (unconditional models)", min=1)
    seed_offset: int = setting(0, "first probe seed; sample i uses seed seed_offset + i", min=0)
    inference_steps: int = setting(
        25, "DDIM steps per sample", min=1, unit="steps", source="costly: num_samples x inference_steps UNet passes"
    )
    batch_size: int = setting(16, "samples generated per forward pass", min=1)
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


def generate_share(settings: SamplingSettings, parts: ModelParts, plan: SamplePlan, workers: Workers) -> torch.Tensor:
    """This process's contiguous share of the plan's samples; concatenated in process order they are
    the plan's samples in order (the caller gathers them).

    Example:
        >>> images = generate_share(settings, parts, plan_samples(settings, parts, data), Workers())  # doctest: +SKIP
    """
    mine = workers.share(range(len(plan.seeds)))
    if not parts.text_to_image:
        return generate_samples(
            parts.unet,
            parts.scheduler,
            [plan.seeds[i] for i in mine],
            num_inference_steps=settings.inference_steps,
            batch_size=settings.batch_size,
        )
    assert plan.prompts is not None
    return generate_text_to_image_samples(
        parts,
        [plan.prompts[i] for i in mine],
        [plan.seeds[i] for i in mine],
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.inference_steps,
        batch_size=settings.batch_size,
    )


__all__ = ["SamplePlan", "Samples", "SamplingSettings", "generate_share", "plan_samples"]
