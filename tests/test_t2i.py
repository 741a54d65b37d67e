"""Text-to-image sampling: fixed seeds, classifier-free guidance, VAE decoding, RNG left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.models import TOKENS, text_to_image_parts, tiny_clip_text_encoder, tiny_clip_tokenizer
from support.tolerance import SAMPLING

from memwatch.errors import MemwatchError
from memwatch.models.parts import ModelParts
from memwatch.sampling.ddim import seed_noise
from memwatch.sampling.text_to_image import encode_prompts, generate_text_to_image_samples, initial_latents
from memwatch.snapshots import Snapshot

STEPS = 3  # few DDIM steps keep the tests fast; every property below holds for any number


def test_shape_range_and_vae_scale(snap: ModelParts) -> None:
    imgs = generate_text_to_image_samples(snap, ["a red fox", "a blue car"], [0, 1], num_inference_steps=STEPS)
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == torch.float32  # 8 latent px x VAE factor 2
    assert imgs.min() >= 0 and imgs.max() <= 1 and imgs.std() > 0
    assert generate_text_to_image_samples(snap, [], [], num_inference_steps=STEPS).shape == (0, 3, 16, 16)


def test_a_seed_gives_the_same_image_in_any_batch(snap: ModelParts) -> None:
    prompts, seeds = ["a red fox", "a blue car", "a red fox"], [5, 6, 7]
    together = generate_text_to_image_samples(snap, prompts, seeds, num_inference_steps=STEPS, batch_size=2)
    alone = generate_text_to_image_samples(snap, prompts[1:2], seeds[1:2], num_inference_steps=STEPS, batch_size=1)
    torch.testing.assert_close(together[1:2], alone, **SAMPLING)
    # same prompt, other seed: another image; same seed, other prompt: another image
    assert not torch.allclose(together[0], together[2], atol=1e-3)
    again = generate_text_to_image_samples(snap, ["a blue car"], [5], num_inference_steps=STEPS)
    assert not torch.allclose(together[0], again[0], atol=1e-3)


def test_initial_latents_are_the_seeds_cpu_noise() -> None:
    x = initial_latents([3, 4], (4, 8, 8), init_noise_sigma=2.0)
    assert torch.equal(x[1], seed_noise(4, (4, 8, 8)) * 2.0)


def test_global_rng_is_neither_used_nor_changed(snap: ModelParts) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_text_to_image_samples(snap, ["a red fox"], [0], num_inference_steps=STEPS)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = generate_text_to_image_samples(snap, ["a red fox"], [0], num_inference_steps=STEPS)
    assert torch.equal(a, b)


def test_guidance_combines_conditional_and_empty_prompt(snap: ModelParts) -> None:
    def run(prompt: str, scale: float) -> torch.Tensor:
        return generate_text_to_image_samples(snap, [prompt], [0], guidance_scale=scale, num_inference_steps=STEPS)

    # w = 0 is the unconditional (empty-prompt) prediction alone, whatever the prompt
    torch.testing.assert_close(run("a red fox", 0.0), run("", 1.0), **SAMPLING)
    # w = 1 is the conditional prediction alone (the shortcut path agrees with the guided formula)
    torch.testing.assert_close(run("a red fox", 1.0), run("a red fox", 1.0 + 1e-7), **SAMPLING)
    assert not torch.allclose(run("a red fox", 7.5), run("a red fox", 1.0), atol=1e-3)


def test_pixel_space_conditional_unet_needs_no_vae() -> None:
    imgs = generate_text_to_image_samples(text_to_image_parts(vae=False), ["a red fox"], [0], num_inference_steps=STEPS)
    assert imgs.shape == (1, 3, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1


def test_encode_prompts_pads_like_clip() -> None:
    hidden = encode_prompts(tiny_clip_tokenizer(), tiny_clip_text_encoder(), ["a red fox", ""])
    assert hidden.shape == (2, TOKENS, 32)


def test_bad_input_is_reported(snap: ModelParts) -> None:
    with pytest.raises(MemwatchError, match=r"2 prompts but 1 seeds"):
        generate_text_to_image_samples(snap, ["a", "b"], [0])
    no_text = Snapshot(step=1, path=Path("ckpt"), layout="checkpoint", parts=ModelParts(snap.unet, snap.scheduler),
                       weights_sha256="")  # fmt: skip
    with pytest.raises(MemwatchError, match=r"snapshot ckpt has none: load it with 'base_model'"):
        generate_text_to_image_samples(no_text, ["a"], [0])
    with pytest.raises(MemwatchError, match=r"multiples of the VAE scale factor"):
        generate_text_to_image_samples(snap, ["a"], [0], height=15, num_inference_steps=1)
