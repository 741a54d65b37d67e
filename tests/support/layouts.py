"""Snapshot folders laid out exactly as diffusers and its example training scripts write them.

Each ``save_*`` helper builds tiny models and saves them with the same library calls as the
script it names (huggingface/diffusers ``examples/``): ``accelerator.save_state`` with the
script's ``register_save_state_pre_hook`` hook, ``EMAModel.save_pretrained(.../unet_ema)``,
``unet.add_adapter(LoraConfig(...))`` + ``get_peft_model_state_dict`` (+
``convert_state_dict_to_diffusers`` where the script uses it) + ``save_lora_weights``, and
``StableDiffusionPipeline(...).save_pretrained``.

Text components are real ``transformers`` classes at tiny sizes: a ``CLIPTokenizer`` built from a
``vocab.json`` / ``merges.txt`` written here (characters and their end-of-word forms, no merges: a
character-level BPE, as transformers' own CLIP tokenizer tests build one offline) and a two-layer
``CLIPTextModel``. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from support.models import (
    sd_scheduler,
    tiny_clip_text_encoder,
    tiny_clip_tokenizer,
    tiny_cond_unet,
    tiny_unet,
    tiny_vae,
)

#: LoraConfig target_modules of each LoRA script (add_k_proj/add_v_proj: none in these UNets)
LORA_TARGETS = {
    "text_to_image_lora": ["to_k", "to_q", "to_v", "to_out.0"],
    "dreambooth_lora": ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"],
}


# --------------------------------------------------------------------------- pipelines and model folders


def save_ddpm_pipeline(folder: Path, seed: int = 0) -> UNet2DModel:
    """``DDPMPipeline(unet, scheduler).save_pretrained`` as at the end of train_unconditional.py."""
    unet = tiny_unet(16, seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return unet


def sd_pipeline(seed: int = 0, unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion pipeline (no safety checker / feature extractor, as the scripts' tests use)."""
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(seed),
        tokenizer=tiny_clip_tokenizer(),
        unet=unet if unet is not None else tiny_cond_unet(seed),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_sd_pipeline(folder: Path, seed: int = 0) -> StableDiffusionPipeline:
    """``StableDiffusionPipeline(...).save_pretrained(folder)``: the base model a run starts from."""
    pipe = sd_pipeline(seed)
    pipe.save_pretrained(folder)
    return pipe


def save_final_sd_pipeline(run_dir: Path, base: Path, unet: UNet2DConditionModel) -> None:
    """The end of train_text_to_image.py: the base pipeline with the trained UNet, saved in OUTPUT_DIR."""
    pipeline = StableDiffusionPipeline.from_pretrained(base, unet=unet)
    pipeline.save_pretrained(run_dir)


# --------------------------------------------------------------------------- checkpoint-<step> folders


def _save_state(model: nn.Module, hook: Callable, folder: Path) -> None:
    """prepare(model, optimizer, lr_scheduler), register the script's hook, ``save_state(folder)``."""
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] or [nn.Parameter(torch.zeros(1))])
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.register_save_state_pre_hook(lambda models, weights, out: hook(accelerator, models, weights, out))
    accelerator.save_state(str(folder))


@torch.no_grad()
def _train_a_little(model: nn.Module, seed: int) -> None:
    """Move every weight, as training would, so raw and EMA weights differ."""
    g = torch.Generator().manual_seed(seed + 1000)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.01)


def save_full_checkpoint(
    run_dir: Path,
    step: int,
    *,
    conditional: bool = False,
    use_ema: bool = True,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """``checkpoint-<step>/`` of train_unconditional.py (or train_text_to_image.py if ``conditional``).

    Returns:
        ``{"raw": unet state dict, "ema": EMA state dict}`` (``"ema"`` only with ``use_ema``).
    """
    model = tiny_cond_unet(seed) if conditional else tiny_unet(16, seed)
    cls = type(model)
    ema = EMAModel(model.parameters(), model_cls=cls, model_config=model.config) if use_ema else None
    _train_a_little(model, seed)

    def save_model_hook(accelerator, models, weights, output_dir):  # the scripts' hook
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(str(Path(output_dir) / "unet_ema"))
            for _model in models:
                _model.save_pretrained(str(Path(output_dir) / "unet"))
                weights.pop()

    _save_state(model, save_model_hook, run_dir / f"checkpoint-{step}")
    out = {"raw": {k: v.clone() for k, v in model.state_dict().items()}}
    if ema is not None:
        shadow = cls.from_config(model.config)
        ema.copy_to(shadow.parameters())
        out["ema"] = shadow.state_dict()
    return out


def lora_unet(script: str, seed: int = 0, rank: int = 4, base_seed: int = 0) -> UNet2DConditionModel:
    """The base UNet with the script's LoRA adapter, after "training" (the adapter's B matrices no longer zero).

    ``unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
    target_modules=...))`` as the LoRA scripts call it; the base weights stay frozen.
    """
    unet = tiny_cond_unet(base_seed)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS[script])
    )
    g = torch.Generator().manual_seed(seed + 2000)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return unet


def save_lora_checkpoint(run_dir: Path, step: int, *, script: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``checkpoint-<step>/`` of a LoRA script on a tiny SD UNet (trained adapters only).

    Args:
        script: ``"text_to_image_lora"`` (its hook saves ``get_peft_model_state_dict(model)`` as is
            via ``StableDiffusionPipeline.save_lora_weights(save_directory=..., unet_lora_layers=...,
            safe_serialization=True)``) or ``"dreambooth_lora"`` (``convert_state_dict_to_diffusers``
            first, then ``StableDiffusionLoraLoaderMixin.save_lora_weights(output_dir, ...)``).
        seed: varies the trained adapter weights.

    Returns:
        The peft-format LoRA state dict (``get_peft_model_state_dict``; keys without the ``unet.`` prefix).
    """
    unet = lora_unet(script, seed)

    def save_model_hook(accelerator, models, weights, output_dir):  # the scripts' hook
        if accelerator.is_main_process:
            unet_lora_layers_to_save = None
            for model in models:
                if not isinstance(model, UNet2DConditionModel):
                    raise ValueError(f"unexpected save model: {model.__class__}")
                if script == "text_to_image_lora":
                    unet_lora_layers_to_save = get_peft_model_state_dict(model)
                else:
                    unet_lora_layers_to_save = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                weights.pop()
            if script == "text_to_image_lora":
                StableDiffusionPipeline.save_lora_weights(
                    save_directory=output_dir, unet_lora_layers=unet_lora_layers_to_save, safe_serialization=True
                )
            elif script == "dreambooth_lora":
                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    output_dir, unet_lora_layers=unet_lora_layers_to_save, text_encoder_lora_layers=None
                )
            else:
                raise ValueError(script)

    _save_state(unet, save_model_hook, run_dir / f"checkpoint-{step}")
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def save_final_lora(run_dir: Path, *, script: str = "text_to_image_lora", seed: int = 0) -> None:
    """The end of a LoRA script: ``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` saved
    with ``StableDiffusionPipeline.save_lora_weights(save_directory=OUTPUT_DIR, ..., safe_serialization=True)``."""
    unet = lora_unet(script, seed)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=run_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True,
    )
