"""Text-to-image sampling with fixed seeds for ``UNet2DConditionModel`` pipelines (Stable Diffusion).

The same rules as :mod:`memwatch.sampling.ddim` hold: sample ``i`` starts from the initial latents of
seed ``seeds[i]``, drawn alone from a CPU ``torch.Generator().manual_seed(seed)`` (so the same on
every machine and in every batch), sampling is deterministic DDIM (``eta = 0``) built from the
training scheduler's config, and the global RNG is never used. Classifier-free guidance uses the
empty prompt as the unconditional input, as ``StableDiffusionPipeline`` does without a negative
prompt: ``eps = eps(x, "") + w * (eps(x, c) - eps(x, ""))``. Latent models are decoded with the
VAE (``latents / scaling_factor``); pixel-space conditional UNets (no VAE) are mapped from [-1, 1].

How many samples per prompt is the caller's choice: repeat a prompt with different seeds.
Probes take their prompts from the training captions (:func:`caption_prompts`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from memwatch.data.refset import ReferenceItem, ReferenceSet
from memwatch.errors import MemwatchError, ProbeUnavailable
from memwatch.hashing import sha256_bytes
from memwatch.models.modes import eval_mode, unwrap_model
from memwatch.models.parts import ModelParts, vae_scale_factor
from memwatch.sampling.ddim import ddim_from, seed_noise


def latent_shape(parts: ModelParts, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """``(C, h, w)`` of the initial latents for images of ``height x width`` (default: the UNet's size).

    Example:
        >>> latent_shape(parts, 512, 512)  # doctest: +SKIP
        (4, 64, 64)
    """
    config = unwrap_model(parts.unet).config
    factor = vae_scale_factor(parts.vae)
    size = config.sample_size
    sh, sw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    height = height or sh * factor
    width = width or sw * factor
    if height % factor or width % factor:
        raise MemwatchError(f"height/width {height}x{width}: must be multiples of the VAE scale factor {factor}")
    return int(config.in_channels), height // factor, width // factor


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states for ``prompts``, as ``StableDiffusionPipeline.encode_prompt`` makes them.

    Args:
        tokenizer: called with ``padding="max_length"``, ``max_length=tokenizer.model_max_length``,
            ``truncation=True``, ``return_tensors="pt"``.
        text_encoder: ``text_encoder(input_ids)[0]`` are the hidden states.
        prompts: the texts ("" for the unconditional input).

    Returns:
        ``(len(prompts), L, D)`` on the text encoder's device.

    Example:
        >>> encode_prompts(tok, enc, ["a cat", ""]).shape  # doctest: +SKIP
        torch.Size([2, 77, 768])
    """
    param = next(text_encoder.parameters())
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(param.device)
    kwargs: dict[str, Any] = {}
    config = getattr(text_encoder, "config", None)
    if getattr(config, "use_attention_mask", False):  # as encode_prompt: only some encoders want the mask
        kwargs["attention_mask"] = (ids != getattr(tokenizer, "pad_token_id", -1)).long()
    with eval_mode(text_encoder):
        return text_encoder(ids, **kwargs)[0]


def guided_eps(
    unet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's unconditional and conditional predictions at ``(x, t)``, in one batched call.

    Args:
        unet: a plain (unwrapped) ``UNet2DConditionModel``.
        x: ``(B, C, h, w)`` scaled model input.
        t: the timestep (0-d tensor).
        cond: ``(B, L, D)`` prompt hidden states.
        uncond: ``(1, L, D)`` or ``(B, L, D)`` empty-prompt hidden states.

    Returns:
        ``(eps_uncond, eps_cond)``, each ``(B, C, h, w)`` (the model's output: noise, velocity or
        sample, per its ``prediction_type``).
    """
    b = x.shape[0]
    hidden = torch.cat([uncond.expand(b, -1, -1), cond])
    out = unet(torch.cat([x, x]), t, encoder_hidden_states=hidden).sample
    return out[:b], out[b:]


def initial_latents(seeds: Sequence[int], shape: Sequence[int], init_noise_sigma: float = 1.0) -> torch.Tensor:
    """Initial latents, one :func:`~memwatch.sampling.ddim.seed_noise` draw per seed, times ``init_noise_sigma``.

    Example:
        >>> initial_latents([0, 1], (4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """
    return torch.stack([seed_noise(s, shape) for s in seeds]) * float(init_noise_sigma)


def decode(parts: ModelParts, latents: torch.Tensor) -> torch.Tensor:
    """Latents to float32 CPU images in [0, 1] (VAE decode, or identity for pixel-space UNets)."""
    if parts.vae is None:
        images = latents
    else:
        vae = parts.vae
        vparam = next(vae.parameters())
        z = latents.to(device=vparam.device, dtype=vparam.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:  # SD3-style VAEs; Stable Diffusion 1/2 have none
            z = z + shift
        with eval_mode(vae):
            images = vae.decode(z).sample
    return ((images.float() + 1.0) / 2.0).clamp_(0.0, 1.0).cpu()


def encode_images(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] to the latents a latent diffusion model is trained on.

    As the diffusers training scripts do (``vae.encode(pixels).latent_dist`` times
    ``scaling_factor``), but with the posterior *mean* instead of a sample: a probe must be
    deterministic, and the sample's extra noise would only blur the loss gap it measures.

    Args:
        vae: an ``AutoencoderKL``.
        images: ``(N, 3, H, W)`` in [0, 1].

    Returns:
        ``(N, C, H / f, W / f)`` latents on the VAE's device and dtype.

    Example:
        >>> encode_images(vae, torch.rand(2, 3, 512, 512)).shape  # doctest: +SKIP
        torch.Size([2, 4, 64, 64])
    """
    vparam = next(vae.parameters())
    pixels = images.to(device=vparam.device, dtype=vparam.dtype) * 2.0 - 1.0
    with eval_mode(vae):
        z = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:  # the inverse of decode()'s shift (SD3-style VAEs)
        z = z - shift
    return z * vae.config.scaling_factor


def caption_of(item: ReferenceItem) -> str | None:
    """An item's caption, stripped; None when it has none (or only whitespace)."""
    text = (item.caption or "").strip()
    return text or None


@dataclass
class CaptionPrompts:
    """Prompts taken from a reference set's captions (see :func:`caption_prompts`).

    Attributes:
        prompts: the distinct captions chosen, in a stable pseudo-random order.
        images: how many items of the set carry each chosen caption (duplicated captions are
            memorized sooner: Carlini et al. 2023, Somepalli et al. 2023).
        uncaptioned: items without a caption: skipped, and counted so that reports show them.
        available: distinct usable captions in the set (before ``limit``).
    """

    prompts: list[str] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    uncaptioned: int = 0
    available: int = 0


def caption_prompts(refs: ReferenceSet | None, limit: int, *, exclude: Collection[str] = ()) -> CaptionPrompts:
    """The first ``limit`` distinct captions of ``refs`` in a stable pseudo-random order.

    The order is by sha256 of the caption, so the same prompts are chosen at every probe and
    whatever order the set lists its items in.

    Args:
        refs: a reference (training) or holdout set; None gives no prompts.
        limit: most prompts returned (0: none).
        exclude: captions not to use (e.g. held-out captions that are also training captions,
            which are not held out as prompts).

    Example:
        >>> caption_prompts(load_reference_set("data/train"), 8).prompts[:1]  # doctest: +SKIP
        ['a photo of a red fox']
    """
    if refs is None:
        return CaptionPrompts()
    counts: dict[str, int] = {}
    uncaptioned = 0
    for item in refs.items:
        text = caption_of(item)
        if text is None:
            uncaptioned += 1
        elif text not in exclude:
            counts[text] = counts.get(text, 0) + 1
    order = sorted(counts, key=lambda c: (sha256_bytes(c.encode("utf-8")), c))[: max(0, limit)]
    return CaptionPrompts(order, [counts[c] for c in order], uncaptioned, len(counts))


def prompt_sets(
    refs: ReferenceSet, holdout: ReferenceSet | None, num_members: int, num_holdout: int, why: str
) -> tuple[CaptionPrompts, CaptionPrompts]:
    """Training captions and held-out captions (none that is also a training caption) to prompt with.

    Args:
        refs: the training set.
        holdout: the holdout set, or None.
        num_members, num_holdout: most prompts of each kind.
        why: what the prompts are for (completes the error message).

    Raises:
        ProbeUnavailable: the training set has no caption at all.

    Example:
        >>> members, held_out = prompt_sets(refs, holdout, 8, 4, "condnoise scores captions")  # doctest: +SKIP
    """
    members = caption_prompts(refs, num_members)
    if not members.prompts:
        raise ProbeUnavailable(no_captions(refs, why))
    trained = {c for c in map(caption_of, refs.items) if c is not None}
    return members, caption_prompts(holdout, num_holdout, exclude=trained)


def uncaptioned_counts(members: CaptionPrompts, holdout: CaptionPrompts) -> dict[str, float]:
    """Items skipped for lack of a caption, as metrics (nothing is dropped silently)."""
    return {"uncaptioned_member": float(members.uncaptioned), "uncaptioned_holdout": float(holdout.uncaptioned)}


def no_captions(refs: ReferenceSet, why: str) -> str:
    """Why a probe cannot prompt with ``refs``, and how to give it captions."""
    return (
        f"reference set {refs.root}: none of its {len(refs)} items has a caption ({why}): write a JSONL manifest "
        'beside the images ({"path": ..., "caption": ...} per line) and set \'reference\' to it; not a '
        "metadata.jsonl inside a DreamBooth instance folder, which the script would open as an image"
    )


def generate_text_to_image_samples(
    model: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = 7.5,
    num_inference_steps: int = 25,
    batch_size: int = 4,
    height: int | None = None,
    width: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """One image per ``(prompt, seed)`` pair with DDIM and classifier-free guidance.

    Args:
        model: :class:`~memwatch.models.parts.ModelParts` of a text-to-image model, a loaded snapshot or
            a diffusers text-to-image pipeline.
        prompts: one prompt per image (repeat a prompt to draw several samples of it).
        seeds: one seed per image; seed ``s`` starts from ``seed_noise(s, (C, h, w))``.
        guidance_scale: classifier-free guidance weight ``w`` (7.5: StableDiffusionPipeline's
            default); 1 uses the conditional prediction alone, 0 the unconditional one.
        num_inference_steps: DDIM steps (25 keeps probes affordable; Stable Diffusion's default is 50).
        batch_size: images per UNet call (the UNet sees twice as many rows with guidance).
        height, width: image size in pixels; default the UNet's ``sample_size`` times the VAE
            scale factor.
        device: where inputs go; default the UNet's device.
        progress: show a tqdm bar.

    Returns:
        float32 CPU tensor ``(len(prompts), 3, H, W)`` in [0, 1].

    Example:
        >>> imgs = generate_text_to_image_samples(snap, ["a sks dog"] * 4, seeds=[0, 1, 2, 3])  # doctest: +SKIP
        >>> imgs.shape  # doctest: +SKIP
        torch.Size([4, 3, 512, 512])
    """
    if len(prompts) != len(seeds):
        raise MemwatchError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    if num_inference_steps < 1:
        raise MemwatchError(f"num_inference_steps={num_inference_steps}: must be at least 1")
    if batch_size < 1:
        raise MemwatchError(f"batch_size={batch_size}: must be at least 1")
    parts = ModelParts.of(model)
    if not parts.text_to_image:
        raise MemwatchError(
            f"{type(unwrap_model(parts.unet)).__name__} is not text-conditioned: use sampling.ddim.generate_samples"
        )
    unet = unwrap_model(parts.unet)
    param = next(unet.parameters())
    device = torch.device(device) if device is not None else param.device
    shape = latent_shape(parts, height, width)
    seeds = [int(s) for s in seeds]
    if not seeds:
        factor = vae_scale_factor(parts.vae)
        channels = 3 if parts.vae is not None else shape[0]
        return torch.empty((0, channels, shape[1] * factor, shape[2] * factor))

    ddim = ddim_from(parts.scheduler)
    ddim.set_timesteps(num_inference_steps)
    from tqdm.auto import tqdm

    out: list[torch.Tensor] = []
    with (
        eval_mode(parts.unet, parts.text_encoder, parts.vae),
        tqdm(
            total=len(seeds) * len(ddim.timesteps), disable=not progress, desc="memwatch text-to-image", unit="img-step"
        ) as bar,
    ):
        uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""]).to(device=device, dtype=param.dtype)
        for start in range(0, len(seeds), batch_size):
            batch_prompts = list(prompts[start : start + batch_size])
            batch_seeds = seeds[start : start + batch_size]
            cond = encode_prompts(parts.tokenizer, parts.text_encoder, batch_prompts).to(
                device=device, dtype=param.dtype
            )
            x = initial_latents(batch_seeds, shape, ddim.init_noise_sigma).to(device=device, dtype=param.dtype)
            for t in ddim.timesteps:
                model_in = ddim.scale_model_input(x, t)
                t_dev = t.to(device)
                if guidance_scale == 1.0:  # exactly the conditional prediction: skip the unconditional pass
                    eps = unet(model_in, t_dev, encoder_hidden_states=cond).sample
                else:
                    eps_u, eps_c = guided_eps(unet, model_in, t_dev, cond, uncond)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                x = ddim.step(eps, t, x, eta=0.0).prev_sample
                bar.update(len(batch_seeds))
            out.append(decode(parts, x))
    return torch.cat(out)
