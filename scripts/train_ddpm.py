#!/usr/bin/env python
"""Train a small unconditional DDPM with accelerate, with memwatch watching it.

A plain training script in the style of diffusers' ``train_unconditional.py``, for users to copy.
memwatch is added in three lines, marked ``# memwatch (n/3)``. It runs on CPU or GPU, and under
``accelerate launch --multi_gpu --num_processes 2`` (on a machine without GPUs the processes run on the
CPU; ``--cpu --num_processes 2`` would start only one).

    python scripts/train_ddpm.py --train-data assets/demo/train --holdout-data assets/demo/holdout \\
        --output-dir runs/my-ddpm --steps 2000
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from memwatch import MemorizationMonitor  # memwatch (1/3)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image under a folder, resized and centre-cropped like diffusers' training scripts."""

    def __init__(self, folder: str, resolution: int, flip: bool):
        self.paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise SystemExit(f"--train-data {folder}: no images found")
        self.resolution = resolution
        self.flip = flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        """torchvision's Resize (shorter side, bicubic), CenterCrop, RandomHorizontalFlip, ToTensor and
        Normalize(0.5, 0.5), as the diffusers scripts compose them, with PIL and torch only (torchvision is
        an optional part of memwatch's environment)."""
        r = self.resolution
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
            w, h = img.size
            size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
            img = img.resize(size, Image.Resampling.BICUBIC)
            left, top = int(round((size[0] - r) / 2.0)), int(round((size[1] - r) / 2.0))
            img = img.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        if self.flip and torch.rand(1) < 0.5:
            x = x.flip(-1)
        return (x - 0.5) / 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-data", required=True, help="folder of training images")
    p.add_argument("--holdout-data", default=None, help="folder of non-member images (membership probe)")
    p.add_argument("--output-dir", default="runs/ddpm", help="checkpoints, logs and memwatch/ go here")
    p.add_argument("--memwatch-config", default=None, help="memwatch YAML config (default: memwatch's defaults)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="repeat the image set this many times per epoch (fills batches larger than the set)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--block-channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument(
        "--prediction-type",
        default="epsilon",
        choices=("epsilon", "v_prediction", "sample"),
        help="what the UNet predicts (diffusers DDPMScheduler prediction_type)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (slows memorization)")
    p.add_argument("--checkpointing-steps", type=int, default=0, help="save checkpoint-<step>/ every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default=None, help="tensorboard, wandb, ... (accelerate trackers)")
    p.add_argument(
        "--drop-at-risk",
        action="store_true",
        help="an intervention (memwatch.interventions.ImageWeights): once memwatch warns, draw the batches without "
        "the training images it names at risk (at most half of them)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    accelerator = Accelerator(
        # Without GPUs, accelerate runs `launch --multi_gpu` processes as one-process runs unless cpu=True.
        cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
        log_with=args.report_to,
    )
    if args.report_to:
        accelerator.init_trackers("train_ddpm", config={k: str(v) for k, v in vars(args).items()})
    set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    n_blocks = len(args.block_channels)
    model = UNet2DModel(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=tuple(args.block_channels),
        down_block_types=("DownBlock2D",) * n_blocks,
        up_block_types=("UpBlock2D",) * n_blocks,
        norm_num_groups=min(32, args.block_channels[0]),
    )
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=args.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    images = ImageFolderDataset(args.train_data, args.resolution, args.flip)
    dataset = torch.utils.data.ConcatDataset([images] * args.repeats) if args.repeats > 1 else images
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=False)

    # Checkpoints get a unet/ folder, as in diffusers' train_unconditional.py.
    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    accelerator.register_save_state_pre_hook(save_model_hook)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    progress = tqdm(total=args.steps, disable=not accelerator.is_local_main_process, desc="training")
    # memwatch reports warnings through Python logging; route them above the progress bar.
    with (
        logging_redirect_tqdm(),
        MemorizationMonitor(  # memwatch (2/3)
            accelerator, args.memwatch_config, reference=args.train_data, holdout=args.holdout_data
        ) as monitor,
    ):
        image_weights = None
        if args.drop_at_risk:  # opt-in: batches drawn by weights that drop the images at risk after a warning
            from memwatch.interventions import ImageWeights

            ids = [p.relative_to(args.train_data).as_posix() for p in images.paths]  # memwatch's ids in a folder
            image_weights = ImageWeights(monitor, ids * max(1, args.repeats))
            loader = accelerator.prepare(
                torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=image_weights.sampler())
            )
        step = 0
        for _epoch in range(math.ceil(args.steps / len(loader))):
            model.train()
            for clean in loader:
                noise = torch.randn_like(clean)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
                with accelerator.accumulate(model):
                    pred = model(noise_scheduler.add_noise(clean, noise, t), t).sample
                    if args.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(clean, noise, t)
                    else:
                        target = clean if args.prediction_type == "sample" else noise
                    loss = F.mse_loss(pred.float(), target.float())
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                step += 1
                if args.checkpointing_steps and step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))
                monitor.step(step, model, noise_scheduler)  # memwatch (3/3)
                if image_weights is not None:
                    image_weights.update()
                accelerator.log({"loss": loss.item()}, step=step)
                progress.update(1)
                mem = monitor.latest.get("regurgitation/mem_fraction")
                progress.set_postfix(loss=f"{loss.item():.4f}", mem_fraction="-" if mem is None else f"{mem:.2f}")
                if step >= args.steps or monitor.should_stop:
                    break
            if step >= args.steps or monitor.should_stop:
                break
    progress.close()
    if accelerator.is_main_process:  # the final pipeline, as train_unconditional.py saves it
        DDPMPipeline(unet=accelerator.unwrap_model(model), scheduler=noise_scheduler).save_pretrained(args.output_dir)
    accelerator.end_training()
    return monitor.summary()


if __name__ == "__main__":
    main()
