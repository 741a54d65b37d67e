"""Shared test fixtures: small image sets written to temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from imagegen import write_images


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
