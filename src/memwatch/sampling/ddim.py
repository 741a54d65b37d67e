"""Sample generation with fixed seeds for an unconditional diffusers UNet.

Successive probes must be comparable: seed ``s`` gets the same initial noise at every probe, on
every process and device, whatever batch it lands in. The noise for one seed is therefore drawn
alone from a CPU ``torch.Generator().manual_seed(s)`` (CPU ``randn`` is the same on every machine)
and only then moved to the model's device. Sampling uses DDIM built from the training scheduler's
config; with ``eta = 0`` it is deterministic, so a change in a seed's sample is a change in the
model. For ``eta > 0`` the per-step noise also comes from the seed's own generator.

The only remaining dependence on batch composition is floating-point rounding inside batched
convolutions (about 1e-6 on CPU), far below anything a probe measures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from memwatch.errors import MemwatchError
from memwatch.models.modes import eval_mode, unwrap_model


def image_shape(unet: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images ``unet`` generates, read from its config.

    Args:
        unet: a diffusers ``UNet2DModel`` (or a wrapper around one).

    Example:
        >>> image_shape(unet)  # doctest: +SKIP
        (3, 32, 32)
    """
    config = unwrap_model(unet).config
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return int(config.in_channels), h, w


def seed_generator(seed: int) -> torch.Generator:
    """A fresh CPU generator seeded with ``seed``: the single source of a seed's noise."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def seed_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Initial noise for one seed: float32 CPU ``randn(shape)`` from :func:`seed_generator`.

    Args:
        seed: the probe seed.
        shape: ``(C, H, W)``.

    Example:
        >>> torch.equal(seed_noise(3, (3, 8, 8)), seed_noise(3, (3, 8, 8)))
        True
    """
    return torch.randn(tuple(shape), generator=seed_generator(seed), dtype=torch.float32)


def ddim_from(scheduler: Any) -> Any:
    """A new ``DDIMScheduler`` with the training scheduler's config (the caller's is not touched).

    Args:
        scheduler: the training noise scheduler (e.g. ``DDPMScheduler``) or its config mapping.
    """
    from diffusers import DDIMScheduler

    config = scheduler if isinstance(scheduler, Mapping) else scheduler.config
    return DDIMScheduler.from_config(config)


def generate_samples(
    unet: nn.Module,
    scheduler: Any,
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 50,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    eta: float = 0.0,
    progress: bool = False,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one image per seed with DDIM, in eval mode and without touching the global RNG.

    Args:
        unet: an unconditional diffusers ``UNet2DModel`` (possibly DDP-/compile-wrapped); it stays
            where it is and its ``training`` flags are restored afterwards.
        scheduler: the training noise scheduler (or its config); DDIM is built from its config, so
            ``prediction_type`` (epsilon / v_prediction / sample) and the beta schedule carry over.
        seeds: one int per image; seed ``s`` always starts from :func:`seed_noise` ``(s, (C, H, W))``.
        num_inference_steps: DDIM steps.
        batch_size: images per UNet call.
        device: where inputs are placed; must be where the UNet's weights are. Defaults to the
            UNet's device. Inputs use the UNet's dtype.
        eta: DDIM eta; 0 gives deterministic sampling.
        progress: show a tqdm bar over denoising steps.
        initial: ``(len(seeds), C, H, W)`` initial noise to start from instead of each seed's (e.g. points between
            two seeds' noises, :func:`memwatch.faces.paths.slerp_noise`); the seeds still draw eta's noise.

    Returns:
        float32 CPU tensor ``(len(seeds), C, H, W)`` in [0, 1] (model range [-1, 1] mapped by
        ``(x + 1) / 2`` and clamped).

    Example:
        >>> imgs = generate_samples(unet, noise_scheduler, seeds=range(8), num_inference_steps=20)  # doctest: +SKIP
        >>> imgs.shape  # doctest: +SKIP
        torch.Size([8, 3, 32, 32])
    """
    if num_inference_steps < 1:
        raise MemwatchError(f"num_inference_steps={num_inference_steps}: must be at least 1")
    if batch_size < 1:
        raise MemwatchError(f"batch_size={batch_size}: must be at least 1")
    if eta < 0:
        raise MemwatchError(f"eta={eta}: must be >= 0 (0 = deterministic DDIM)")
    model = unwrap_model(unet)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = param.dtype
    shape = image_shape(model)
    seeds = [int(s) for s in seeds]
    if initial is not None and tuple(initial.shape) != (len(seeds), *shape):
        raise MemwatchError(f"initial noise of shape {tuple(initial.shape)}: give one {shape} tensor per seed")
    if not seeds:
        return torch.empty((0, *shape), dtype=torch.float32)

    ddim = ddim_from(scheduler)
    ddim.set_timesteps(num_inference_steps)
    timesteps = ddim.timesteps

    from tqdm.auto import tqdm

    out: list[torch.Tensor] = []
    with (
        eval_mode(unet),
        tqdm(total=len(seeds) * len(timesteps), disable=not progress, desc="memwatch sampling", unit="img-step") as bar,
    ):
        for start in range(0, len(seeds), batch_size):
            batch_seeds = seeds[start : start + batch_size]
            # Each seed keeps its own generator: it draws the initial noise, then (eta > 0) the
            # per-step noise, so a seed's trajectory never depends on its batch neighbours.
            gens = [seed_generator(s) for s in batch_seeds]
            x = torch.stack([torch.randn(shape, generator=g) for g in gens])
            if initial is not None:
                x = initial[start : start + batch_size]
            x = x.to(device=device, dtype=dtype)
            for t in timesteps:
                model_in = ddim.scale_model_input(x, t)
                pred = model(model_in, t.to(device)).sample
                step_kwargs: dict[str, Any] = {"eta": eta}
                if eta > 0:
                    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
                    step_kwargs["variance_noise"] = noise.to(device=device, dtype=dtype)
                x = ddim.step(pred, t, x, **step_kwargs).prev_sample
                bar.update(len(batch_seeds))
            out.append(((x.float() + 1.0) / 2.0).clamp_(0.0, 1.0).cpu())
    return torch.cat(out)
