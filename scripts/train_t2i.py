#!/usr/bin/env python
"""Fine-tune a Stable Diffusion pipeline's UNet on captioned images with accelerate, with memwatch in the loop.

A plain text-to-image training loop in the style of diffusers' ``train_text_to_image.py`` (VAE latents, the
frozen text encoder's hidden states, the scheduler's noise or velocity target, AdamW, a constant learning
rate), for users to copy. memwatch is added in three lines, marked ``# memwatch (n/3)``: the monitor is given
the UNet being trained together with the pipeline's tokenizer, text encoder and VAE (``ModelParts``), so it
samples from the training captions as the pipeline would. Checkpoints are saved as the diffusers script saves
them (``checkpoint-<step>/unet``), so ``memwatch probe`` and the text-to-image benchmark read them alike.

The training folder holds the images and a ``metadata.jsonl`` with ``{"file_name": ..., "text": ...}`` rows
(a list of captions: one is drawn each time, as the diffusers script does).

    python scripts/train_t2i.py --base assets/t2i/base --train-data runs/my-set/train \\
        --holdout-data runs/my-set/holdout --output-dir runs/my-t2i --steps 1500 --checkpointing-steps 100
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from memwatch import MemorizationMonitor  # memwatch (1/3)
from memwatch.models.parts import ModelParts


class CaptionedFolder(torch.utils.data.Dataset):
    """The images of a folder's ``metadata.jsonl`` with their captions, resized and centre-cropped like the
    diffusers scripts (shorter side to the resolution, bilinear), scaled to [-1, 1]."""

    def __init__(self, folder: str, resolution: int):
        meta = Path(folder) / "metadata.jsonl"
        if not meta.is_file():
            raise SystemExit(f"--train-data {folder}: no metadata.jsonl; write one row per image: "
                             '{"file_name": "a.png", "text": "a caption"}')  # fmt: skip
        self.rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        self.folder, self.resolution = Path(folder), resolution

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        row, r = self.rows[i], self.resolution
        with Image.open(self.folder / row["file_name"]) as img:
            img = img.convert("RGB")
            w, h = img.size
            size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
            img = img.resize(size, Image.Resampling.BILINEAR)
            left, top = int(round((size[0] - r) / 2.0)), int(round((size[1] - r) / 2.0))
            img = img.crop((left, top, left + r, top + r))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        text = row["text"]
        # a list of captions: draw one each time, as train_text_to_image.py does
        return (x - 0.5) / 0.5, random.choice(text) if isinstance(text, list) else text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a Stable Diffusion pipeline folder (unet, vae, text_encoder, ...)")
    p.add_argument("--train-data", required=True, help="folder of training images with metadata.jsonl")
    p.add_argument("--holdout-data", default=None, help="folder of non-member images with captions (membership)")
    p.add_argument("--output-dir", default="runs/t2i", help="checkpoints and memwatch/ go here")
    p.add_argument("--memwatch-config", default=None, help="memwatch YAML config (default: memwatch's defaults)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--checkpointing-steps", type=int, default=0, help="save checkpoint-<step>/ every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
    )
    set_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(args.base, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(args.base, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(args.base, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(args.base, subfolder="scheduler")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    data = CaptionedFolder(args.train_data, args.resolution)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True)

    def save_model_hook(models, weights, output_dir):  # checkpoint-<step>/unet, as train_text_to_image.py
        if accelerator.is_main_process:
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, "unet"))
                weights.pop()

    accelerator.register_save_state_pre_hook(save_model_hook)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    # what memwatch samples with: the UNet being trained and the pipeline's frozen parts
    parts = ModelParts(unet, noise_scheduler, tokenizer, text_encoder, vae)
    with MemorizationMonitor(  # memwatch (2/3)
        accelerator, args.memwatch_config, reference=args.train_data, holdout=args.holdout_data
    ) as monitor:
        step = 0
        for _epoch in range(math.ceil(args.steps / len(loader))):
            unet.train()
            for pixels, captions in loader:
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                    ids = tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length",
                                    truncation=True, return_tensors="pt").input_ids.to(latents.device)  # fmt: skip
                    hidden = text_encoder(ids, return_dict=False)[0]
                noise = torch.randn_like(latents)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)  # fmt: skip
                with accelerator.accumulate(unet):
                    pred = unet(noise_scheduler.add_noise(latents, noise, t), t, hidden, return_dict=False)[0]
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, t)
                    else:
                        target = noise
                    loss = F.mse_loss(pred.float(), target.float())
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                step += 1
                if args.checkpointing_steps and step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))
                monitor.step(step, parts, noise_scheduler)  # memwatch (3/3)
                if step >= args.steps or monitor.should_stop:
                    break
            if step >= args.steps or monitor.should_stop:
                break
    accelerator.end_training()
    return monitor.summary()


if __name__ == "__main__":
    main()
