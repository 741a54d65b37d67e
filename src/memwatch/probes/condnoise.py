"""Sampling-free memorization signal for text-to-image models: the conditional-noise magnitude.

Wen et al. (ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models")
observe that for a memorized prompt the text-conditional prediction departs far from the
unconditional one from the very first sampling step: the model is pulled toward one training
image. Their detection score for prompt ``p`` is

    d(p) = 1/T * sum_{t=1..T} || eps(x_t, e_p) - eps(x_t, e_"") ||_2

over the first ``T`` steps of ordinary classifier-free-guided sampling, averaged over ``n``
generations (their code, ``detect_mem.py`` with ``track_noise_norm``: the L2 norm over all latent
elements of each sample, DDIM with 50 steps, guidance 7.5, 4 images per prompt). They report
high accuracy already at ``T = 1`` with one generation, i.e. one guided UNet call per prompt.

This probe computes exactly that, per prompt, on training prompts (members) and held-out prompts:
a model that starts to memorize its training captions gives members larger scores. What is
implemented:

* initial latents: generation ``g`` of *every* prompt starts from ``seed_noise(seed_offset + g)``
  (the same noise for all prompts: prompt scores then differ by the prompt alone, and the same
  prompt gets the same noise at every probe, so successive probes are comparable);
* DDIM (from the training scheduler's config, ``eta = 0``) with ``num_inference_steps`` steps;
  the first ``num_steps`` steps are scored, and ``x_t`` moves along the guided trajectory
  (``guidance_scale``) between them, as in the paper;
* the norm is of the UNet's raw output difference (noise for epsilon models), not scaled by the
  guidance weight.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memwatch.core.probe import Metric, Probe, ProbeContext, ProbeRecord, ProbeResult, ProbeSettings
from memwatch.errors import MemwatchError
from memwatch.models.modes import eval_mode, unwrap_model
from memwatch.models.parts import ModelParts
from memwatch.probes.membership import few_items
from memwatch.sampling.ddim import ddim_from
from memwatch.sampling.text_to_image import (
    encode_prompts,
    guided_eps,
    initial_latents,
    latent_shape,
    prompt_sets,
    uncaptioned_counts,
)
from memwatch.settings import setting
from memwatch.signals.stats import TPR_FPR, roc_auc, tpr_at_fpr

_WEN = "Wen et al. ICLR 2024"


@dataclass
class CondNoiseConfig(ProbeSettings):
    """Settings of the conditional-noise probe (text-to-image models only).

    Cost: ``(num_members + num_holdout) * num_generations * num_steps`` guided UNet calls (two rows
    each); no VAE, no full sampling, so it can run as often as the membership probe.
    """

    section = "probes.condnoise"
    every: int = setting(
        50,
        "run every this many training steps (0: off); text-to-image snapshots only",
        min=0,
        unit="steps",
        source="like membership: cheap (no VAE, no full sampling)",
    )
    num_members: int = setting(32, "training captions scored (first distinct ones, stable order)", min=1)
    num_holdout: int = setting(32, "held-out captions scored (AUC needs both; NaN without a holdout set)", min=0)
    num_steps: int = setting(
        1, "first DDIM steps averaged", min=1, source=f"{_WEN}: detect well already at the first step"
    )
    num_generations: int = setting(
        4, "initial latents per prompt", min=1, source=f"num_images_per_prompt=4 in {_WEN} (detect_mem.py)"
    )
    num_inference_steps: int = setting(
        50, "DDIM schedule the scored steps come from", min=1, source=f"{_WEN}; Stable Diffusion's default"
    )
    guidance_scale: float = setting(
        7.5,
        "guidance of the trajectory between scored steps (no effect at num_steps 1)",
        source=f"{_WEN}; StableDiffusionPipeline's default",
    )
    seed_offset: int = setting(0, "generation g of every prompt starts from seed seed_offset + g", min=0)
    batch_size: int = setting(8, "prompts per UNet call (2 rows each: conditional and empty prompt)", min=1)
    top_k: int = setting(10, "highest-scoring prompts kept as evidence", min=0)

    def check(self) -> None:
        if self.num_steps > self.num_inference_steps:
            raise self.invalid(
                "num_steps", f"({self.num_steps}) must not exceed num_inference_steps ({self.num_inference_steps})"
            )


def condnoise_scores(
    model: Any,
    prompts: Sequence[str],
    *,
    num_steps: int = 1,
    num_generations: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed_offset: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Wen et al.'s score ``d(p)`` for each prompt (see the module docstring).

    Runs in eval mode without gradients; the global RNG is not used. A prompt's score does not
    depend on which other prompts share its batch (up to float rounding).

    Args:
        model: a snapshot with text components, or a diffusers text-to-image pipeline.
        prompts: the prompts to score.
        num_steps: first DDIM steps averaged.
        num_generations: initial latents per prompt, averaged.
        num_inference_steps: DDIM schedule length.
        guidance_scale: guidance of the trajectory between scored steps.
        seed_offset: generation ``g`` uses seed ``seed_offset + g``.
        batch_size: prompts per UNet call.
        height, width: image size in pixels (default the UNet's).
        device: where inputs go; default the UNet's device.

    Returns:
        float32 CPU tensor ``(len(prompts),)``; the empty prompt scores 0.

    Example:
        >>> condnoise_scores(snap, ["a photo of sks dog", "a red car"], num_generations=1)  # doctest: +SKIP
        tensor([41.3, 12.9])
    """
    if not 1 <= num_steps <= num_inference_steps:
        raise MemwatchError(f"num_steps={num_steps}: must be in [1, num_inference_steps={num_inference_steps}]")
    if num_generations < 1 or batch_size < 1:
        raise MemwatchError("num_generations and batch_size must be at least 1")
    parts = ModelParts.of(model)
    unet = unwrap_model(parts.unet)
    param = next(unet.parameters())
    device = torch.device(device) if device is not None else param.device
    shape = latent_shape(parts, height, width)
    prompts = list(prompts)
    totals = torch.zeros(len(prompts), dtype=torch.float64)
    if not prompts:
        return totals.float()
    ddim = ddim_from(parts.scheduler)
    ddim.set_timesteps(num_inference_steps)
    scored = ddim.timesteps[:num_steps]
    noise = initial_latents([seed_offset + g for g in range(num_generations)], shape, ddim.init_noise_sigma)

    with eval_mode(parts.unet, parts.text_encoder):
        uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""]).to(device=device, dtype=param.dtype)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            cond = encode_prompts(parts.tokenizer, parts.text_encoder, batch).to(device=device, dtype=param.dtype)
            for g in range(num_generations):
                x = noise[g].expand(len(batch), *shape).to(device=device, dtype=param.dtype)
                for t in scored:
                    model_in = ddim.scale_model_input(x, t)
                    eps_u, eps_c = guided_eps(unet, model_in, t.to(device), cond, uncond)
                    diff = (eps_c - eps_u).float().flatten(1)
                    totals[start : start + len(batch)] += diff.norm(dim=1).double().cpu()
                    # DDIM with eta = 0 keeps no per-sample state, so stepping the whole batch is exact.
                    x = ddim.step(eps_u + guidance_scale * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return (totals / (num_steps * num_generations)).float()


def condnoise_probe(
    model: Any,
    member_prompts: Sequence[str],
    holdout_prompts: Sequence[str] | None,
    config: CondNoiseConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Conditional-noise scores of training prompts vs held-out prompts, and how well they separate.

    Args:
        model: a snapshot with text components, or a diffusers text-to-image pipeline.
        member_prompts: training captions (duplicates are scored once each time they appear).
        holdout_prompts: captions not trained on; may be empty or None (AUC is then NaN).
        config: the settings (default :class:`CondNoiseConfig`); ``num_members`` /
            ``num_holdout`` are the front-end's business: all prompts given here are scored.
        device: where inputs go; default the UNet's device.

    Returns:
        ``ProbeResult(probe="condnoise")``: metrics ``condnoise_member``, ``condnoise_holdout``
        (mean scores), ``condnoise_gap`` (member minus holdout), ``condnoise_auc`` (higher score =
        member) and ``condnoise_tpr_at_1fpr``; ``items`` one row per prompt ``{"item": prompt,
        "group", "score", "rank"}`` (rank 1 = highest score); ``timings["condnoise"]``.

    Example:
        >>> r = condnoise_probe(snap, train_captions, heldout_captions)  # doctest: +SKIP
        >>> r.metrics["condnoise_auc"]  # doctest: +SKIP
        0.81
    """
    cfg = config or CondNoiseConfig()
    start = time.perf_counter()
    groups = {"member": list(member_prompts), "holdout": list(holdout_prompts or [])}
    items: list[dict[str, Any]] = []
    for group, prompts in groups.items():
        scores = condnoise_scores(
            model,
            prompts,
            num_steps=cfg.num_steps,
            num_generations=cfg.num_generations,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            seed_offset=cfg.seed_offset,
            batch_size=cfg.batch_size,
            device=device,
        )
        items += [{"item": p, "group": group, "score": float(s)} for p, s in zip(prompts, scores.tolist(), strict=True)]
    return condnoise_from_items(items, seconds=time.perf_counter() - start)


def condnoise_from_items(items: Sequence[dict[str, Any]], *, seconds: float = 0.0) -> ProbeResult:
    """Condnoise metrics from per-prompt rows ``{"item", "group", "score"}`` (e.g. gathered from processes).

    Adds ``rank`` (1 = highest score, ties in input order) to a copy of each row.

    Example:
        >>> r = condnoise_from_items([{"item": "a", "group": "member", "score": 3.0},
        ...                           {"item": "b", "group": "holdout", "score": 1.0}])
        >>> r.metrics["condnoise_auc"], r.metrics["condnoise_gap"]
        (1.0, 2.0)
    """
    rows = [dict(r) for r in items]
    for group in {r["group"] for r in rows} - {"member", "holdout"}:
        raise MemwatchError(f"condnoise item group {group!r}: must be 'member' or 'holdout'")
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])
    for rank, i in enumerate(order, start=1):
        rows[i]["rank"] = rank
    member = torch.tensor([r["score"] for r in rows if r["group"] == "member"], dtype=torch.float64)
    holdout = torch.tensor([r["score"] for r in rows if r["group"] == "holdout"], dtype=torch.float64)

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else float("nan")

    metrics = {
        "num_member_prompts": float(member.numel()),
        "num_holdout_prompts": float(holdout.numel()),
        "condnoise_member": mean(member),
        "condnoise_holdout": mean(holdout),
        "condnoise_gap": mean(member) - mean(holdout),
        "condnoise_auc": roc_auc(member, holdout),
        "condnoise_tpr_at_1fpr": tpr_at_fpr(member, holdout, fpr=TPR_FPR),
    }
    return ProbeResult(probe="condnoise", metrics=metrics, items=rows, timings={"condnoise": seconds})


def condnoise_evidence(result: ProbeResult, top_k: int = 10) -> dict[str, Any]:
    """The ``top_k`` highest-scoring prompts (for warning events and reports).

    Example:
        >>> condnoise_evidence(condnoise_from_items([{"item": "a", "group": "member", "score": 3.0}]), 1)
        {'top_prompts': [{'prompt': 'a', 'group': 'member', 'score': 3.0}]}
    """
    top = sorted(result.items, key=lambda r: r["rank"])[:top_k]
    return {"top_prompts": [{"prompt": r["item"], "group": r["group"], "score": r["score"]} for r in top]}


class CondNoiseProbe(Probe):
    """Wen et al.'s conditional-noise magnitude of training vs held-out prompts (prompts split across processes)."""

    name = "condnoise"
    Settings = CondNoiseConfig
    order = 50
    text_to_image_only = True
    metrics = ("num_member_prompts", "num_holdout_prompts", "condnoise_member", "condnoise_holdout", "condnoise_gap",
               Metric("condnoise_auc", role="separability", label="conditional-noise AUC (training vs other prompts)",
                      threshold=0.5),
               "condnoise_tpr_at_1fpr", "uncaptioned_member", "uncaptioned_holdout")  # fmt: skip
    default_rules = (
        {
            "name": "condnoise-separable",
            "type": "threshold",
            "metric": "condnoise/condnoise_auc",
            "op": ">=",
            "value": 0.7,
            "for": 2,
            "severity": "info",
            "source": "Hanley & McNeil 1982: with 32 vs 32 prompts the AUC's standard error at 0.5 is about 0.07, so "
            "0.7 is about 3 SE; the signal is Wen et al. (ICLR 2024)",
            "message": "step {step}: training prompts stand out by conditional-noise magnitude (AUC {value:.2f})",
        },
    )

    def compute(self, ctx: ProbeContext) -> list[dict[str, Any]]:
        cfg = self.settings
        self._members, self._holdout = prompt_sets(
            ctx.data.refs, ctx.data.holdout, cfg.num_members, cfg.num_holdout, "condnoise scores training captions"
        )
        t0 = time.perf_counter()
        part = condnoise_probe(
            ctx.parts, ctx.workers.share(self._members.prompts), ctx.workers.share(self._holdout.prompts), cfg
        )
        self._seconds = time.perf_counter() - t0
        ctx.add_time("condnoise", self._seconds)
        return [{k: r[k] for k in ("item", "group", "score")} for r in part.items]

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult:
        bad = [r["item"] for r in rows if not math.isfinite(r["score"])]
        if bad:
            raise MemwatchError(
                f"{len(bad)} of {len(rows)} conditional-noise scores are NaN or Inf: the model's outputs are not finite"
            )
        images = dict(zip(self._members.prompts, self._members.images, strict=True))
        for row in rows:  # how many training images carry the caption (duplicates memorize sooner)
            row["images"] = images.get(row["item"], 0) if row["group"] == "member" else 0
        result = condnoise_from_items(rows, seconds=self._seconds)
        result.metrics.update(uncaptioned_counts(self._members, self._holdout))
        return result

    def evidence(self, result: ProbeResult) -> dict[str, Any]:
        return condnoise_evidence(result, self.settings.top_k)

    @classmethod
    def limitations(cls, record: ProbeRecord) -> list[tuple[str, str]]:
        return few_items(cls.name, record, "num_member_prompts", "num_holdout_prompts")
