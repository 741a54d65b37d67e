"""Snapshot folders laid out exactly as diffusers and its example training scripts write them.

Each ``save_*`` helper builds tiny models and saves them with the same library calls as the
script it names (huggingface/diffusers ``examples/``): ``accelerator.save_state`` with the
script's ``register_save_state_pre_hook`` hook, ``EMAModel.save_pretrained(.../unet_ema)``,
``save_lora_weights`` (with ``convert_state_dict_to_diffusers`` where the script uses it), and
``DiffusionPipeline.save_pretrained``.

Two stand-ins, because this environment lacks packages (neither is the code under test):

* ``peft`` is not installed, so the LoRA scripts' ``unet.add_adapter(LoraConfig(...))`` +
  ``get_peft_model_state_dict(unet)`` is replaced by :func:`peft_lora_state_dict`, which returns
  the same keys and shapes (``<module>.lora_A.weight`` ``(r, in)``, ``<module>.lora_B.weight``
  ``(out, r)`` for ``to_q``/``to_k``/``to_v``/``to_out.0``) with non-zero values, as after training.
* ``transformers`` is not installed, so Stable Diffusion pipelines are saved component by
  component (``unet/``, ``vae/``, ``scheduler/``, and ``model_index.json`` as
  ``StableDiffusionPipeline.save_pretrained`` writes it), without ``text_encoder/`` and
  ``tokenizer/``; text-to-image sampling tests use :class:`WordTokenizer` and
  :class:`TinyTextEncoder`, which have the call interface of ``CLIPTokenizer`` / ``CLIPTextModel``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from tinymodels import tiny_unet
from torch import nn

from memwatch.snapshots import Snapshot, TextComponents

CROSS_DIM = 32
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # train_text_to_image_lora.py's target_modules


# --------------------------------------------------------------------------- tiny models


def tiny_cond_unet(seed: int = 0, sample_size: int = 8) -> UNet2DConditionModel:
    """A two-block UNet2DConditionModel (cross-attention dim 32) that runs in milliseconds."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A two-block AutoencoderKL (scale factor 2, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def sd_scheduler() -> PNDMScheduler:
    """Stable Diffusion v1's scheduler config (scheduler/scheduler_config.json of SD 1.x)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


class WordTokenizer:
    """Stand-in for ``CLIPTokenizer``'s call: words -> ids (bos, words, eos, pad to max length)."""

    model_max_length = 8
    pad_token_id = 0
    vocab_size = 64

    def __call__(self, prompts, padding="max_length", max_length=None, truncation=True, return_tensors="pt"):
        n = max_length or self.model_max_length
        rows = []
        for text in prompts:
            # stable word ids (not Python's salted hash): sum of character codes
            words = [3 + sum(map(ord, w)) % (self.vocab_size - 3) for w in text.lower().split()]
            ids = ([1, *words][: n - 1] + [2] + [self.pad_token_id] * n)[:n]
            rows.append(ids)
        return SimpleNamespace(input_ids=torch.tensor(rows, dtype=torch.long))


class TinyTextEncoder(nn.Module):
    """Stand-in for ``CLIPTextModel``: ``encoder(input_ids)[0]`` is ``(B, L, CROSS_DIM)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(WordTokenizer.vocab_size, CROSS_DIM)
        self.position = nn.Parameter(torch.randn(WordTokenizer.model_max_length, CROSS_DIM, generator=g) * 0.1)
        self.mix = nn.Linear(CROSS_DIM, CROSS_DIM)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(self.embed.weight.shape, generator=g))
            self.mix.weight.copy_(torch.randn(self.mix.weight.shape, generator=g) / CROSS_DIM**0.5)
            self.mix.bias.zero_()

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        h = self.embed(input_ids) + self.position[: input_ids.shape[1]]
        # a causal running mean, so every position sees the words before it (as CLIP's causal mask)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, device=h.device)[None, :, None]
        return (self.mix(h),)


def t2i_snapshot(vae: bool = True) -> Snapshot:
    """A text-to-image :class:`Snapshot` of tiny models: latent (UNet + VAE), or pixel-space without VAE."""
    if vae:
        unet = tiny_cond_unet(seed=0)
    else:
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config({**tiny_cond_unet().config, "in_channels": 3, "out_channels": 3})
    text = TextComponents(WordTokenizer(), TinyTextEncoder(seed=0), tiny_vae(seed=0) if vae else None)
    return Snapshot(
        step=None, path=Path("."), kind="pipeline", unet=unet, scheduler=sd_scheduler(), weights_sha256="", text=text
    )


# --------------------------------------------------------------------------- pipelines and model folders


def save_ddpm_pipeline(folder: Path, seed: int = 0) -> UNet2DModel:
    """``DDPMPipeline(unet, scheduler).save_pretrained`` as at the end of train_unconditional.py."""
    unet = tiny_unet(16, seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return unet


def save_sd_pipeline(folder: Path, seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """A Stable Diffusion pipeline folder without text_encoder/ and tokenizer/ (see module docstring)."""
    unet, vae = tiny_cond_unet(seed), tiny_vae(seed)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    sd_scheduler().save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return unet, vae


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


def peft_lora_state_dict(unet: nn.Module, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """What ``get_peft_model_state_dict(unet)`` returns after ``add_adapter(LoraConfig(r=rank, ...
    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`` and some training (B no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS) and ".attn" in name:
            out[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / rank
            out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.05
    return out


def save_lora_checkpoint(run_dir: Path, step: int, *, script: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``checkpoint-<step>/`` of a LoRA script on a tiny SD UNet (trained adapters only).

    Args:
        script: ``"text_to_image_lora"`` (saves the peft state dict as is, via
            ``StableDiffusionPipeline.save_lora_weights(save_directory=..., unet_lora_layers=...,
            safe_serialization=True)``) or ``"dreambooth_lora"`` (``convert_state_dict_to_diffusers``
            first, then ``StableDiffusionLoraLoaderMixin.save_lora_weights(output_dir, ...)``).

    Returns:
        The peft-format LoRA state dict (keys without the ``unet.`` prefix).
    """
    unet = tiny_cond_unet(seed)
    unet.requires_grad_(False)
    lora = peft_lora_state_dict(unet, seed=seed + 1)
    holder = nn.Module()  # the scripts prepare the adapter-carrying UNet; its trainable part is the LoRA
    holder.params = nn.ParameterList([nn.Parameter(v.clone()) for v in lora.values()])

    def save_model_hook(accelerator, models, weights, output_dir):
        if accelerator.is_main_process:
            for _model in models:
                weights.pop()
            if script == "text_to_image_lora":
                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    save_directory=output_dir, unet_lora_layers=lora, safe_serialization=True
                )
            elif script == "dreambooth_lora":
                StableDiffusionLoraLoaderMixin.save_lora_weights(
                    output_dir, unet_lora_layers=convert_state_dict_to_diffusers(lora), text_encoder_lora_layers=None
                )
            else:
                raise ValueError(script)

    _save_state(holder, save_model_hook, run_dir / f"checkpoint-{step}")
    return lora
