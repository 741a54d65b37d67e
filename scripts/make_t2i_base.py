"""Build the text-to-image benchmark's base model: a small Stable Diffusion pipeline that really works.

The diffusers example scripts fine-tune a *pretrained* pipeline, and a copy is only a copy if it can be seen
in pixels. So this script trains, once, on 2 CPU cores, each part the scripts load with
``--pretrained_model_name_or_path``:

- ``tokenizer/``: a ``CLIPTokenizer`` that spells any text by characters and merges the caption words of
  ``scripts/t2i_data.py`` into a token or a few (a caption is about 20 tokens: none is cut off at 77);
- ``text_encoder/``: a 2-layer ``CLIPTextModel`` (width 32), randomly initialised and frozen, as the scripts
  keep CLIP frozen: distinct captions give distinct embeddings, which is all the UNet needs to tell them apart;
- ``vae/``: an ``AutoencoderKL`` (32x32 pixels -> 16x16x4 latents) trained on random crops of the benchmark's
  photos at every zoom (a broad set: any window of any photo), its ``scaling_factor`` set to one over the
  latents' standard deviation as Stable Diffusion's is;
- ``unet/``: a ``UNet2DConditionModel`` (block widths 32 and 64, cross-attention width 32) pretrained on crops
  of two quadrants of each photo with captions (1 in 10 dropped, for classifier-free guidance); the
  fine-tuning images come from the other two, so the base model has never seen them;
- ``scheduler/``: the DDPM noise schedule of Stable Diffusion (scaled linear betas, 1,000 steps).

It writes the pipeline folder and ``BUILD.json`` (the settings, the measured reconstruction and the sha256 of
every weights file). The benchmark reads the folder from ``assets/t2i/base`` and checks those hashes.

    python scripts/make_t2i_base.py                     # writes assets/t2i/base (53 min on 2 cores)
    python scripts/make_t2i_base.py --out DIR --vae-steps 20 --unet-steps 20   # a quick smoke build
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from t2i_data import RESOLUTION, WORDS, draw_crop, load_photos

ROOT = Path(__file__).resolve().parents[1]
SEED = 20261207
#: broad-set crops drawn once (mirrored at random); VAE and UNet draw batches from them
BROAD = 20_000
BATCH = 32
TOKENS = 77  # CLIP's context length, which the scripts pad every caption to
CROSS_DIM = 32
#: Stable Diffusion's KL weight is tiny next to the reconstruction loss; here per latent element over pixels
KL_WEIGHT = 1e-4
CAPTION_DROP = 0.1


def build_tokenizer(folder: Path):
    """A ``CLIPTokenizer`` that spells any text by characters and merges each word of ``WORDS`` into one token
    or a few: its merges build each word from its first letter onwards, and where one word's merge comes first
    inside another (``as`` of astronaut inside grass), that word stays in pieces."""
    from transformers import CLIPTokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.'!?-"
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if f"{left} {right}" not in merges:
                merges.append(f"{left} {right}")
            left += right
            vocab.setdefault(left, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TOKENS)


def build_text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(SEED)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKENS, projection_dim=CROSS_DIM,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return CLIPTextModel(config).eval()


def broad_set(count: int, part: str) -> tuple[torch.Tensor, list[str]]:
    """``count`` random crops of the photos' quadrants ``part`` in [-1, 1] (N, 3, 32, 32) and their captions."""
    photos, rng = load_photos(), np.random.default_rng(SEED)
    crops = [draw_crop(photos, rng, part) for _ in range(count)]
    images = np.stack([c.image for c in crops]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [c.caption for c in crops]


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, steps: int, line: str, log) -> None:
    """One optimiser step, the learning rate 1e-3 on a cosine decay over ``steps``; logs ``line`` every 500."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
    if step % 500 == 0:
        log(line)


def train_vae(images: torch.Tensor, steps: int, log) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train the autoencoder (MSE + a small KL term); returns it and its reconstruction PSNR on held crops."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=RESOLUTION, mid_block_add_attention=False,
    )  # fmt: skip
    train, held = images[:-512], images[-512:]
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    t0 = time.time()
    for step in range(steps):
        x = train[torch.randint(len(train), (BATCH,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        loss = (rec - x).pow(2).mean() + KL_WEIGHT * posterior.kl().mean() / x[0].numel()
        descend(opt, loss, step, steps, f"vae step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", log)
    vae.eval()
    with torch.no_grad():
        posterior = vae.encode(held).latent_dist
        rec = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        mse = (rec - held).pow(2).mean(dim=(1, 2, 3))  # on [-1, 1]: PSNR = 10 log10(4 / mse)
        latents = vae.encode(train[:2048]).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    quality = {"psnr_db_median": float(10 * torch.log10(4 / mse).median()), "held_crops": len(held)}
    return vae, quality


def pretrain_unet(vae, text_encoder, tokenizer, scheduler, images, captions, steps: int, log):
    """Pretrain the UNet on the broad set, as the text-to-image script trains: epsilon loss on VAE latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    with torch.no_grad():  # every crop's latent distribution and every caption's embedding, once
        posterior = [vae.encode(images[i : i + 512]).latent_dist for i in range(0, len(images), 512)]
        mean = torch.cat([p.mean for p in posterior])
        std = torch.cat([p.std for p in posterior])
        ids = tokenizer([*captions, ""], padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
        embeds = torch.cat([text_encoder(ids[i : i + 1024])[0] for i in range(0, len(ids), 1024)])
    empty = embeds[-1]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(SEED + 1)
    scale = vae.config.scaling_factor
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(mean), (BATCH,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        cond = embeds[idx].clone()
        cond[torch.rand(BATCH, generator=gen) < CAPTION_DROP] = empty
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(scheduler.config.num_train_timesteps, (BATCH,), generator=gen)
        pred = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
        loss = (pred - noise).pow(2).mean()
        descend(opt, loss, step, steps, f"unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", log)
    return unet.eval()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, vae_steps: int, unet_steps: int, log=print) -> dict:
    """Train and save the base pipeline to ``out``; return what ``BUILD.json`` records."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    # The VAE learns every quadrant, as Stable Diffusion's VAE learned far more than any fine-tune brings (a VAE
    # trained on the base quadrants alone lost up to 0.14 of unseen crops: their round trips failed the ratio
    # test); the UNet learns only the base quadrants, so that it has never seen a fine-tuning image.
    images, _ = broad_set(BROAD, "all")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
        text_encoder = build_text_encoder(len(tokenizer))
        vae, quality = train_vae(images, vae_steps, log)
        images, captions = broad_set(BROAD, "base")
        log(f"vae: median PSNR {quality['psnr_db_median']:.1f} dB on {quality['held_crops']} held crops")
        scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, steps_offset=1, prediction_type="epsilon",
        )  # fmt: skip
        unet = pretrain_unet(vae, text_encoder, tokenizer, scheduler, images, captions, unet_steps, log)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.save_pretrained(out)
    record = {
        "seed": SEED, "broad_crops": BROAD, "batch": BATCH, "vae_steps": vae_steps, "unet_steps": unet_steps,
        "vae": quality, "build_s": round(time.time() - started), "torch": torch.__version__,
        "sha256": {str(p.relative_to(out)): sha256_of(p) for p in sorted(out.rglob("*.safetensors"))},
    }  # fmt: skip
    (out / "BUILD.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "t2i" / "base", help="pipeline folder to write")
    p.add_argument("--vae-steps", type=int, default=3000, help="autoencoder training steps (batch 32)")
    p.add_argument("--unet-steps", type=int, default=6000, help="UNet pretraining steps (batch 32)")
    args = p.parse_args()
    record = build(args.out, args.vae_steps, args.unet_steps, log=lambda m: print(m, flush=True))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
