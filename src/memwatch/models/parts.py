"""The one container of a model snapshot's parts that every probe reads.

A probe needs the denoiser and its training noise scheduler, and for a text-to-image model also the
tokenizer, text encoder and VAE. Front-ends hand those over in different shapes: the in-training
monitor has a bare UNet and its scheduler, ``memwatch probe`` a loaded
:class:`~memwatch.snapshots.Snapshot`, a user a diffusers pipeline. :meth:`ModelParts.of` turns any
of them into a :class:`ModelParts`; nothing else in memwatch looks at the original object.

A model is *text-to-image* when its UNet takes text conditioning (``cross_attention_dim`` in its
config, as ``UNet2DConditionModel`` has); only then are tokenizer and text encoder required.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from memwatch.errors import MemwatchError
from memwatch.models.modes import unwrap_model


@dataclass
class ModelParts:
    """What the probes need from a snapshot.

    Attributes:
        unet: the denoiser (``UNet2DModel`` or ``UNet2DConditionModel``; possibly wrapped).
        scheduler: its training noise scheduler.
        tokenizer: text-to-image models: a ``transformers`` tokenizer, called as
            ``tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt")``.
        text_encoder: text-to-image models: ``text_encoder(input_ids)[0]`` are the hidden states.
        vae: latent models: the ``AutoencoderKL``; None for pixel-space models.

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
        ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
        >>> parts = ModelParts.of(unet, DDPMScheduler())
        >>> parts.text_to_image, parts.image_resolution
        (False, 8)
    """

    unet: nn.Module
    scheduler: Any
    tokenizer: Any = None
    text_encoder: nn.Module | None = None
    vae: nn.Module | None = None

    @property
    def text_to_image(self) -> bool:
        """Whether the UNet is text-conditioned (then tokenizer and text encoder are set)."""
        return is_text_conditioned(self.unet)

    @property
    def image_resolution(self) -> int:
        """Side of the images the model is trained on: the UNet's sample size (times the VAE factor)."""
        size = unwrap_model(self.unet).config.sample_size
        side = size if isinstance(size, int) else int(size[0])
        return side * vae_scale_factor(self.vae)

    @classmethod
    def of(cls, model: Any, scheduler: Any = None) -> ModelParts:
        """The parts of what a front-end passes.

        Args:
            model: a bare UNet (possibly wrapped), a :class:`ModelParts`, or anything with ``unet`` and
                ``scheduler`` attributes and, for text-to-image UNets, ``tokenizer``, ``text_encoder``
                and ``vae`` (a :class:`~memwatch.snapshots.Snapshot`'s ``parts``, a diffusers pipeline).
            scheduler: the training noise scheduler; default the object's own.

        Raises:
            MemwatchError: no UNet or scheduler, or a text-to-image UNet without tokenizer / text encoder.
        """
        if isinstance(model, ModelParts):
            out = model
            fix = "pass its tokenizer, text encoder and VAE too"
        elif isinstance(getattr(model, "parts", None), ModelParts):  # a loaded snapshot
            out = model.parts
            fix = f"snapshot {model.path} has none: load it with 'base_model' set to the pipeline folder it was "
            fix += "trained from (and transformers installed)"
        else:
            bare = isinstance(model, nn.Module) and not hasattr(model, "unet")
            unet = model if bare else getattr(model, "unet", None)
            sched = scheduler if scheduler is not None else (None if bare else getattr(model, "scheduler", None))
            if unet is None or sched is None:
                raise MemwatchError(
                    f"{type(model).__name__}: no UNet or noise scheduler: pass the UNet and its training scheduler, "
                    "or a snapshot / pipeline that has both"
                )
            out = cls(
                unet,
                sched,
                getattr(model, "tokenizer", None),
                getattr(model, "text_encoder", None),
                getattr(model, "vae", None),
            )
            fix = "pass the loaded snapshot or pipeline instead of the bare UNet"
        if out.text_to_image and (out.tokenizer is None or out.text_encoder is None):
            name = type(unwrap_model(out.unet)).__name__
            raise MemwatchError(
                f"{name} is text-conditioned: probe it with its tokenizer, text encoder and VAE ({fix})"
            )
        if scheduler is not None and out.scheduler is not scheduler:  # the caller's scheduler wins
            out = dataclasses.replace(out, scheduler=scheduler)
        return out

    def modules(self) -> list[nn.Module]:
        """The torch modules among the parts (for eval mode and device moves)."""
        return [m for m in (self.unet, self.text_encoder, self.vae) if m is not None]


def is_text_conditioned(unet: nn.Module) -> bool:
    """Whether a UNet takes text conditioning (its config has ``cross_attention_dim``)."""
    return getattr(unwrap_model(unet).config, "cross_attention_dim", None) is not None


def vae_scale_factor(vae: nn.Module | None) -> int:
    """Pixels per latent along each side: ``2 ** (len(block_out_channels) - 1)`` (1 without a VAE)."""
    if vae is None:
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)
