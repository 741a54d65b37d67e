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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memwatch.errors import MemwatchError
from memwatch.modes import eval_mode, unwrap_model
from memwatch.probes.base import ProbeResult
from memwatch.probes.membership import TPR_FPR, roc_auc, tpr_at_fpr
from memwatch.sampling import ddim_from
from memwatch.t2i import encode_prompts, guided_eps, initial_latents, latent_shape, t2i_parts


@dataclass
class CondNoiseConfig:
    """Settings of the conditional-noise probe.

    Attributes:
        every: run every this many optimizer steps (0 turns the probe off). It runs only on
            text-to-image snapshots; unconditional models have no prompt to measure. Cost:
            ``(num_members + num_holdout) * num_generations * num_steps`` guided UNet calls (two
            rows each); no VAE, no full sampling, so it can run as often as the membership probe.
        num_members: training prompts probed.
        num_holdout: held-out prompts probed (captions of the same kind, not trained on).
        num_steps: first DDIM steps averaged. 1: Wen et al. report "high accuracy even at the
            first generation step, with a single generation per prompt" (abstract).
        num_generations: initial latents per prompt, averaged. 4: ``num_images_per_prompt=4`` in
            Wen et al.'s ``detect_mem.py``.
        num_inference_steps: length of the DDIM schedule the first steps are taken from; sets
            which timesteps are scored. 50: Wen et al. (and Stable Diffusion's default).
        guidance_scale: classifier-free guidance weight of the trajectory between scored steps
            (no effect when ``num_steps == 1``). 7.5: Wen et al. and StableDiffusionPipeline.
        seed_offset: generation ``g`` starts from seed ``seed_offset + g``.
        batch_size: prompts per UNet call (each call has ``2 * batch_size`` rows).
        top_k: highest-scoring prompts kept as evidence.
    """

    every: int = 50
    num_members: int = 32
    num_holdout: int = 32
    num_steps: int = 1
    num_generations: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed_offset: int = 0
    batch_size: int = 8
    top_k: int = 10

    def __post_init__(self) -> None:
        for name in ("num_members", "num_steps", "num_generations", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise MemwatchError(f"condnoise.{name}={getattr(self, name)}: must be at least 1")
        for name in ("every", "num_holdout", "top_k"):  # every: 0 turns the probe off
            if getattr(self, name) < 0:
                raise MemwatchError(f"condnoise.{name}={getattr(self, name)}: must be >= 0")
        if self.num_steps > self.num_inference_steps:
            raise MemwatchError(
                f"condnoise.num_steps={self.num_steps} exceeds num_inference_steps={self.num_inference_steps}"
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
    parts = t2i_parts(model)
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
