"""Tiny diffusers models and an accelerate training loop, built by the tests themselves.

Text components are real ``transformers`` classes at tiny sizes: a ``CLIPTokenizer`` built from a
``vocab.json`` / ``merges.txt`` written here (characters and their end-of-word forms, no merges: a
character-level BPE, as transformers' own CLIP tokenizer tests build one offline) and a two-layer
``CLIPTextModel``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler, PNDMScheduler, UNet2DConditionModel, UNet2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.models.parts import ModelParts

CROSS_DIM = 32
TOKENS = 16  # tokenizer model_max_length (CLIP's is 77; short prompts fit in 16)
#: probe settings for fast monitor runs on the tiny models
FAST_MONITOR = {
    "sampling": {"every": 4, "num_samples": 6, "inference_steps": 4, "batch_size": 4},
    "probes": {
        "membership": {"every": 3, "num_members": 8, "num_holdout": 8, "timesteps": [100, 400], "batch_size": 8},
    },
    "cadence": {"adaptive": False},  # the fixed cadence: tests of the adaptive one pass a fake clock
}


def tiny_unet(sample_size: int = 16, seed: int = 0) -> UNet2DModel:
    """A UNet2DModel small enough to train for a few steps in well under a second each on a CPU."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def accelerate_launch(num_processes: int, port: int, script: str | Path, *args: str) -> list[str]:
    """The command line that runs ``script`` under ``accelerate launch`` in ``num_processes`` CPU processes (gloo).

    ``--cpu`` would start ONE process whatever ``--num_processes`` says (accelerate's simple launcher);
    ``--multi_gpu`` starts them through torchrun, and on a machine without GPUs (and with
    ``Accelerator(cpu=True)`` in the script) they run on the CPU with the gloo backend.
    """
    import sys

    multi = ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), str(script), *args,
    ]  # fmt: skip


def train(
    accelerator: Accelerator,
    data_dir: Path,
    steps: int,
    *,
    monitor=None,
    sample_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """A plain DDPM loop (as in diffusers' train_unconditional.py); returns the loss at each step."""
    torch.manual_seed(seed)
    model = tiny_unet(sample_size, seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.stack([load_image(it.path, sample_size) for it in load_reference_set(data_dir).items]) * 2 - 1
    loader = torch.utils.data.DataLoader(images, batch_size=4, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses: list[float] = []
    step = 0
    while step < steps:
        for batch in loader:
            noise = torch.randn_like(batch)
            t = torch.randint(0, 1000, (batch.shape[0],), device=batch.device)
            loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(batch, noise, t), t).sample, noise)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            losses.append(float(loss.detach()))
            if monitor is not None:
                monitor.step(step, model, scheduler)
                if monitor.should_stop:
                    return losses
            if step >= steps:
                break
    return losses


def train_unconditional_like(
    run_dir: Path, data: Path, steps: int, every: int, *, total_limit: int | None = None
) -> None:
    """A tiny accelerate loop that saves like train_unconditional.py: save hook -> checkpoint-<step>/unet/,
    rotation to `total_limit` checkpoints before each save, and the final DDPMPipeline in run_dir."""
    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(run_dir)))
    torch.manual_seed(0)
    model = tiny_unet()
    sched = DDPMScheduler(num_train_timesteps=1000)

    def save_model_hook(models, weights, output_dir):  # as in train_unconditional.py
        if acc.is_main_process:
            for m in models:
                m.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    acc.register_save_state_pre_hook(save_model_hook)
    images = torch.stack([load_image(it.path, 16) for it in load_reference_set(data).items]) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    for step in range(1, steps + 1):
        noise = torch.randn_like(images)
        t = torch.randint(0, 1000, (images.shape[0],))
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(images, noise, t), t).sample, noise)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if step % every == 0 and acc.is_main_process:
            if total_limit is not None:  # the scripts' rotation: delete the oldest before saving
                names = os.listdir(run_dir) if run_dir.exists() else []
                ckpts = sorted((d for d in names if d.startswith("checkpoint")), key=lambda d: int(d.split("-")[1]))
                for old in ckpts[: max(0, len(ckpts) - total_limit + 1)]:
                    shutil.rmtree(run_dir / old)
            acc.save_state(str(run_dir / f"checkpoint-{step}"))
    DDPMPipeline(unet=acc.unwrap_model(model), scheduler=sched).save_pretrained(str(run_dir))


# --------------------------------------------------------------------------- tiny text-to-image models


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


def tiny_clip_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """A character-level ``CLIPTokenizer`` from a ``vocab.json`` and ``merges.txt`` written to ``folder``.

    The vocabulary is CLIP's two special tokens, then every lowercase letter and digit alone and
    with CLIP's end-of-word suffix ``</w>``; ``merges.txt`` has only its version line, so each word
    is spelled out character by character. Without ``folder`` the files go to a temporary folder
    that is removed once the tokenizer has read them.
    """
    chars = list(string.ascii_lowercase + string.digits)
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TOKENS
        )


def tiny_clip_text_encoder(seed: int = 0) -> CLIPTextModel:
    """A two-layer ``CLIPTextModel`` (hidden size 32: the UNet's cross-attention dim) for the tiny tokenizer."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=2 + 2 * 36,
        hidden_size=CROSS_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENS,
        bos_token_id=0,  # <|startoftext|>
        eos_token_id=1,  # <|endoftext|> (also CLIP's pad token)
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def text_to_image_parts(vae: bool = True) -> ModelParts:
    """Tiny text-to-image :class:`ModelParts`: latent (UNet + VAE), or pixel-space without VAE."""
    if vae:
        unet = tiny_cond_unet(seed=0)
    else:
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config({**tiny_cond_unet().config, "in_channels": 3, "out_channels": 3})
    vae_model = tiny_vae(seed=0) if vae else None
    return ModelParts(unet, sd_scheduler(), tiny_clip_tokenizer(), tiny_clip_text_encoder(seed=0), vae_model)


def stage_unconditional_saves(
    root: Path,
    data: Path,
    *,
    steps: int,
    checkpoint_every: int,
    pipeline_steps: tuple[int, ...],
    use_ema: bool = False,
    scheduler: DDPMScheduler | None = None,
) -> Path:
    """Train like train_unconditional.py and keep every save apart, for scripted replays of a run.

    ``root/checkpoint-<s>/`` are the checkpoints as the script's save hook writes them (``unet/``, and
    ``unet_ema/`` with ``use_ema``); ``root/pipeline-<s>/`` is the ``DDPMPipeline`` the script saves in
    OUTPUT_DIR at step ``s`` (holding the EMA weights with ``use_ema``, as the script swaps them in).
    """
    from diffusers.training_utils import EMAModel

    acc = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(root)))
    torch.manual_seed(0)
    model = tiny_unet()
    sched = scheduler or DDPMScheduler(num_train_timesteps=1000)
    ema = EMAModel(model.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=model.config) if use_ema else None

    def save_model_hook(models, weights, output_dir):  # as in train_unconditional.py
        if acc.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for m in models:
                m.save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    acc.register_save_state_pre_hook(save_model_hook)
    images = torch.stack([load_image(it.path, 16) for it in load_reference_set(data).items]) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    for step in range(1, steps + 1):
        noise = torch.randn_like(images)
        t = torch.randint(0, sched.config.num_train_timesteps, (images.shape[0],))
        target = {"epsilon": noise, "sample": images}.get(sched.config.prediction_type, noise)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(images, noise, t), t).sample, target)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        if ema is not None:
            ema.step(model.parameters())
        if step % checkpoint_every == 0:
            acc.save_state(str(root / f"checkpoint-{step}"))
        if step in pipeline_steps:
            unet = acc.unwrap_model(model)
            if ema is not None:
                ema.store(unet.parameters())
                ema.copy_to(unet.parameters())
            DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(root / f"pipeline-{step}"))
            if ema is not None:
                ema.restore(unet.parameters())
    return root
