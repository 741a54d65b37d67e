"""A real demo-sized run for the report tests (tests/test_report.py, tests/test_report_browser.py).

A tiny UNet2DModel is trained a few steps under MemorizationMonitor, a saved and hashed checkpoint
is probed as a checkpoint, then the same monitor probes models that reproduce their training images.
The training folder holds an image whose id is ``<script>alert(1)</script>.png``; it is duplicated
in the memorizing models' data, so samples copy it and it shows in the evidence.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image

from memwatch.data.images import load_image
from memwatch.data.refset import load_reference_set
from memwatch.frontends.monitor import MemorizationMonitor
from memwatch.hashing import sha256_file
from support.images import smooth_image, write_images
from support.models import train

PLANTED_ID = "<script>alert(1)</script>.png"
SIZE = 16


DEMO_CONFIG = {
    "run_name": "demo-<b>report</b>",
    "sampling": {"every": 4, "num_samples": 8, "inference_steps": 4, "batch_size": 8},
    "probes": {
        "membership": {"every": 3, "num_members": 8, "num_holdout": 8, "timesteps": [100, 400], "batch_size": 8},
    },
    "cadence": {"adaptive": False},
}
TRAIN_STEPS = 4
MEMORIZING_STEPS = (8, 12)  # probes of the memorizing model, after the checkpoint at TRAIN_STEPS
PLANTED_WEIGHT = 8  # copies of the planted image in the memorizing model's data (duplicates are memorized first)


class MemorizingDenoiser(torch.nn.Module):
    """The closed-form optimal denoiser of a finite data set: a model that has memorized it perfectly.

    E[x0 | x_t] over the empirical training distribution is a softmax-weighted mean of the training
    images; a DDPM that over-fits converges to it (Gu et al. 2023), and DDIM sampling with it ends on a
    training image. Shaped like a UNet2DModel as far as memwatch's probes need (``config``, a
    parameter, ``forward(x, t).sample`` predicting the noise).
    """

    def __init__(self, images: torch.Tensor, scheduler: DDPMScheduler, sharpness: float = 1.0):
        super().__init__()
        # < 1: a softer posterior, samples between images (a model still learning); a buffer, so that models
        # of different sharpness are different weights
        self.register_buffer("sharpness", torch.tensor(float(sharpness)))
        self.config = SimpleNamespace(sample_size=images.shape[-1], in_channels=images.shape[1])
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device and dtype source
        self.register_buffer("data", images * 2 - 1)  # model range [-1, 1]
        self.register_buffer("alphas", scheduler.alphas_cumprod.clone().float())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        a = self.alphas[t.long().flatten()].view(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        flat = self.data.flatten(1)  # (N, D)
        dist = torch.cdist((x / a.sqrt()).flatten(1), flat).pow(2)  # (B, N)
        weights = torch.softmax(-dist * self.sharpness * a.flatten()[:, None] / (2 * (1 - a.flatten()[:, None])), dim=1)
        x0 = (weights @ flat).view_as(x)
        return SimpleNamespace(sample=(x - a.sqrt() * x0) / (1 - a).sqrt())


class _Recorder:
    """Passes steps to the monitor and keeps the model the training loop hands it."""

    def __init__(self, monitor: MemorizationMonitor):
        self.monitor, self.model = monitor, None

    @property
    def should_stop(self) -> bool:
        return self.monitor.should_stop

    def step(self, step: int, model: Any, scheduler: Any) -> list:
        self.model = model
        return self.monitor.step(step, model, scheduler)


def make_demo_run(root: Path) -> dict[str, Any]:
    """Train, checkpoint and probe a tiny model under MemorizationMonitor; returns paths and facts.

    Returns:
        ``run_dir`` (training output dir), ``train_dir``, ``checkpoint`` (its unet folder),
        ``weights_sha256`` of the checkpoint's weights file, ``planted`` (the planted file), ``summary``
        (the monitor's).
    """
    train_dir, holdout_dir, out = root / "train", root / "holdout", root / "out"
    write_images(train_dir, list(range(6)), size=SIZE)
    write_images(holdout_dir, list(range(100, 108)), size=SIZE)
    # "/" cannot be part of a file name, so the id "<script>alert(1)</script>.png" is a folder
    # "<script>alert(1)<" holding "script>.png" (ids are paths relative to the reference root).
    planted = train_dir / "<script>alert(1)<" / "script>.png"
    planted.parent.mkdir()
    Image.fromarray(smooth_image(4242, SIZE)).save(planted)

    acc = Accelerator(cpu=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    monitor = MemorizationMonitor(
        acc, DEMO_CONFIG, reference=train_dir, holdout=holdout_dir, output_dir=out / "memwatch"
    )
    recorder = _Recorder(monitor)
    train(acc, train_dir, TRAIN_STEPS, monitor=recorder, sample_size=SIZE)

    # A checkpoint as the diffusers scripts save it, hashed and probed as a checkpoint snapshot.
    checkpoint = out / f"checkpoint-{TRAIN_STEPS}" / "unet"
    unet = acc.unwrap_model(recorder.model)
    unet.save_pretrained(checkpoint)
    weights_sha = sha256_file(checkpoint / "diffusion_pytorch_model.safetensors")
    monitor.session.probe(
        TRAIN_STEPS,
        unet,
        scheduler,
        ["regurgitation"],
        kind="checkpoint",
        path=str(checkpoint),
        weights_sha256=weights_sha,
    )

    # Training cannot copy images in a few CPU steps; the monitor probes a model that has memorized
    # its data (the planted image duplicated, as duplicated images are memorized first: Carlini 2023).
    refs = load_reference_set(train_dir)
    images = [load_image(it.path, SIZE) for it in refs.items]
    weights = [PLANTED_WEIGHT if it.id == PLANTED_ID else 1 for it in refs.items]
    data = torch.stack([img for img, w in zip(images, weights, strict=True) for _ in range(w)])
    for k, step in enumerate(MEMORIZING_STEPS):
        # two memorizing models with different weights (the same weights would be one measurement)
        monitor.step(step, MemorizingDenoiser(data[k:], scheduler), scheduler)
    summary = monitor.close()
    return {
        "summary": summary,
        "summary_after_close": monitor.summary(),  # what a script returns after the `with` block
        "run_dir": out,
        "train_dir": train_dir,
        "checkpoint": checkpoint,
        "weights_sha256": weights_sha,
        "planted": planted,
    }
