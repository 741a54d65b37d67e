"""Fixed-seed DDIM sampling and the eval-mode guard, on a tiny randomly initialised UNet."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from support.models import tiny_unet
from support.tolerance import SAMPLING

from memwatch.core.workers import split_for_process
from memwatch.errors import MemwatchError
from memwatch.models.modes import eval_mode, unwrap_model
from memwatch.sampling.ddim import generate_samples, seed_noise

STEPS = 10  # DDIM steps in these tests: enough to exercise the loop, cheap on 2 cores


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


def test_same_seeds_give_identical_samples_across_calls(unet, scheduler):
    a = generate_samples(unet, scheduler, [3, 7, 11], num_inference_steps=STEPS)
    b = generate_samples(unet, scheduler, [3, 7, 11], num_inference_steps=STEPS)
    assert torch.equal(a, b)


def test_output_shape_dtype_range(unet, scheduler):
    out = generate_samples(unet, scheduler, [0, 1], num_inference_steps=STEPS)
    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0.01  # not a constant image


def test_batching_and_process_split_do_not_change_a_seeds_sample(unet, scheduler):
    seeds = [5, 1, 9, 2, 8]
    whole = generate_samples(unet, scheduler, seeds, num_inference_steps=STEPS, batch_size=5)
    small = generate_samples(unet, scheduler, seeds, num_inference_steps=STEPS, batch_size=2)
    parts = [
        generate_samples(unet, scheduler, split_for_process(seeds, i, 2), num_inference_steps=STEPS) for i in range(2)
    ]
    alone = generate_samples(unet, scheduler, [9], num_inference_steps=STEPS)
    # Batched convolutions round differently (seen up to ~1e-4 after 5 DDIM steps); different noise would
    # differ by O(1).
    torch.testing.assert_close(small, whole, **SAMPLING)
    torch.testing.assert_close(torch.cat(parts), whole, **SAMPLING)
    torch.testing.assert_close(alone[0], whole[2], **SAMPLING)


def test_different_seeds_differ(unet, scheduler):
    out = generate_samples(unet, scheduler, [0, 1], num_inference_steps=STEPS)
    assert (out[0] - out[1]).abs().mean() > 1e-2


def test_seed_noise_is_the_seeds_own_generator():
    expected = torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(42))
    assert torch.equal(seed_noise(42, (3, 4, 4)), expected)
    assert not torch.equal(seed_noise(43, (3, 4, 4)), expected)


def test_global_rng_untouched_also_with_eta(unet, scheduler):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate_samples(unet, scheduler, [0, 1], num_inference_steps=STEPS)
    generate_samples(unet, scheduler, [0, 1], num_inference_steps=STEPS, eta=1.0)
    assert torch.equal(torch.get_rng_state(), before)


def test_eta_sampling_is_seeded_and_batch_independent(unet, scheduler):
    a = generate_samples(unet, scheduler, [0, 1, 2], num_inference_steps=STEPS, eta=1.0, batch_size=3)
    b = generate_samples(unet, scheduler, [0, 1, 2], num_inference_steps=STEPS, eta=1.0, batch_size=1)
    torch.testing.assert_close(a, b, **SAMPLING)
    deterministic = generate_samples(unet, scheduler, [0, 1, 2], num_inference_steps=STEPS)
    assert (a - deterministic).abs().mean() > 1e-3  # eta really injects noise


def test_training_flags_requires_grad_and_grads_are_restored(scheduler):
    net = tiny_unet()
    net.train()
    net.conv_in.eval()  # a submodule the caller set differently must keep its own flag
    net.conv_out.weight.requires_grad_(False)
    flags = {name: m.training for name, m in net.named_modules()}
    grads = {name: p.requires_grad for name, p in net.named_parameters()}
    generate_samples(net, scheduler, [0], num_inference_steps=2)
    assert {name: m.training for name, m in net.named_modules()} == flags
    assert {name: p.requires_grad for name, p in net.named_parameters()} == grads
    assert all(p.grad is None for p in net.parameters())
    assert torch.is_grad_enabled()


def test_callers_scheduler_not_mutated(unet, scheduler):
    config = dict(scheduler.config)
    timesteps = scheduler.timesteps.clone()
    generate_samples(unet, scheduler, [0], num_inference_steps=STEPS)
    assert dict(scheduler.config) == config
    assert torch.equal(scheduler.timesteps, timesteps)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_other_prediction_types(unet, prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    out = generate_samples(unet, sched, [0, 1], num_inference_steps=STEPS)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_wrapped_model_and_empty_seeds(unet, scheduler):
    wrapped = torch.nn.DataParallel(unet)
    assert unwrap_model(wrapped) is unet
    a = generate_samples(wrapped, scheduler, [4], num_inference_steps=STEPS)
    b = generate_samples(unet, scheduler, [4], num_inference_steps=STEPS)
    assert torch.equal(a, b)
    assert generate_samples(unet, scheduler, [], num_inference_steps=STEPS).shape == (0, 3, 16, 16)


def test_bad_settings_raise(unet, scheduler):
    with pytest.raises(MemwatchError, match="batch_size"):
        generate_samples(unet, scheduler, [0], batch_size=0)
    with pytest.raises(MemwatchError, match="num_inference_steps"):
        generate_samples(unet, scheduler, [0], num_inference_steps=0)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_split_for_process_is_contiguous_and_balanced(n, k):
    seeds = list(range(100, 100 + n))
    parts = [split_for_process(seeds, i, k) for i in range(k)]
    assert sum(parts, []) == seeds
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_split_for_process_rejects_bad_index():
    with pytest.raises(MemwatchError, match="process_index"):
        split_for_process([1, 2], 2, 2)
    with pytest.raises(MemwatchError, match="num_processes"):
        split_for_process([1, 2], 0, 0)


def test_eval_mode_restores_flags_on_exception():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    net.train()
    net[2].eval()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net, None):
        assert not any(m.training for m in net.modules())
        assert not torch.is_grad_enabled()
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [True, True, True, False]
    assert torch.is_grad_enabled()


def test_given_initial_noise_replaces_the_seeds_and_must_fit(unet, scheduler):
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    seeds = [3, 4]
    own = torch.stack([seed_noise(s, shape) for s in seeds])
    same = generate_samples(unet, scheduler, seeds, num_inference_steps=3, initial=own)
    assert torch.equal(same, generate_samples(unet, scheduler, seeds, num_inference_steps=3))
    swapped = generate_samples(unet, scheduler, seeds, num_inference_steps=3, initial=own.flip(0))
    assert torch.equal(swapped, same.flip(0))  # the noise, not the seed, decides the image (eta 0)
    with pytest.raises(MemwatchError, match="initial noise"):
        generate_samples(unet, scheduler, seeds, num_inference_steps=3, initial=own[:1])
