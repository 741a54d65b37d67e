"""Tiny diffusers models and an accelerate training loop, built by the tests themselves."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from memwatch.images import load_image
from memwatch.refset import load_reference_set


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
    """The command line that runs ``script`` under ``accelerate launch`` on CPU processes (gloo)."""
    import sys

    return [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(num_processes),
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
    run_dir: Path, data: Path, steps: int, every: int, *, total_limit: int | None = None, pause: float = 0.0
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
            time.sleep(pause)
    DDPMPipeline(unet=acc.unwrap_model(model), scheduler=sched).save_pretrained(str(run_dir))
