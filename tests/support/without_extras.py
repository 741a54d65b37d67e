"""Run memwatch as an environment without its extras would: open_clip, facenet_pytorch, dlib, transformers and
torchvision cannot be imported (``sys.modules[name] = None`` makes ``import`` fail and
``importlib.util.find_spec`` answer None, as for a package that is not installed).

    python tests/support/without_extras.py monitor TRAIN HOLDOUT OUT   # a short watched training run
    python tests/support/without_extras.py cli ARGS...                 # memwatch ARGS...
"""

import sys

EXTRAS = ("open_clip", "facenet_pytorch", "dlib", "face_recognition_models", "transformers", "torchvision")


def block_extras() -> None:
    """Make the extras unimportable in this process (only when run as a script: pytest imports this file
    for its doctests)."""
    # peft (a test dependency here) imports transformers; an environment without the extras has neither
    for name in (*EXTRAS, "peft"):
        sys.modules[name] = None  # type: ignore[assignment]


def monitor(train: str, holdout: str, out: str) -> int:
    """A few DDPM steps on a tiny UNet, watched (support.models imports transformers for its text models)."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel

    from memwatch.data.images import load_image
    from memwatch.data.refset import load_reference_set
    from memwatch.frontends.monitor import MemorizationMonitor

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.stack([load_image(it.path, 16) for it in load_reference_set(train).items]) * 2 - 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(model, optimizer)
    config = {
        "sampling": {"every": 4, "num_samples": 4, "inference_steps": 3},
        "probes": {"membership": {"every": 4, "num_members": 8, "num_holdout": 8, "timesteps": [100, 400]}},
        "cadence": {"adaptive": False},
    }
    with MemorizationMonitor(acc, config, reference=train, holdout=holdout, output_dir=out) as m:
        for step in range(1, 9):
            batch = images[(4 * step) % len(images) :][:4]
            noise = torch.randn_like(batch)
            t = torch.randint(0, 1000, (batch.shape[0],))
            loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(batch, noise, t), t).sample, noise)
            acc.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            m.step(step, model, scheduler)
    return 0


if __name__ == "__main__":
    block_extras()
    if sys.argv[1] == "monitor":
        code = monitor(*sys.argv[2:5])
    else:
        from memwatch.cli import main

        code = main(sys.argv[2:])
    loaded = sorted(n for n in EXTRAS if sys.modules.get(n) is not None)
    print(f"extras loaded: {loaded}")
    sys.exit(code)
