"""Shared test fixtures: small image sets written to temporary folders, an isolated cache, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from support.images import write_images
from support.models import text_to_image_parts, tiny_unet

from memwatch.models.parts import ModelParts

# A script run by tests under `accelerate launch`, not a module to import.
collect_ignore = ["support/mp_monitor_job.py"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real demo-sized monitored run (support/demo_run.py), built once per session (about 15 s).

    Tests only read it: reports are written to their own folders.
    """
    from support.demo_run import make_demo_run

    torch.manual_seed(0)
    # One thread: these tensors are tiny, and on 2 busy cores a second thread spinning costs 4-8x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_demo_run(tmp_path_factory.mktemp("demo-run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    """A tiny unconditional UNet at a fixed random init (read-only in the tests that share it)."""
    return tiny_unet()


@pytest.fixture(scope="module")
def snap() -> ModelParts:
    """Tiny text-to-image parts: UNet2DConditionModel, CLIP tokenizer and text encoder, VAE."""
    return text_to_image_parts()


@pytest.fixture
def train_holdout(tmp_path: Path) -> tuple[Path, Path]:
    """Eight 16 px training images and eight holdout images of the same kind."""
    write_images(tmp_path / "train", list(range(8)), size=16)
    write_images(tmp_path / "holdout", list(range(100, 108)), size=16)
    return tmp_path / "train", tmp_path / "holdout"


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    """Twelve distinct smooth training images."""
    write_images(tmp_path / "train", list(range(12)))
    return tmp_path / "train"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own embedding cache, so no test depends on another's leftovers."""
    monkeypatch.setenv("MEMWATCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: MTCNN's many small convolutions run faster on one thread
    than on two contended ones (measured on the 2-core development machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
