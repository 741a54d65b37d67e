"""memwatch index: embeds a reference set once into the cache (resumably, split across accelerate
processes) and keeps its search index where probes find it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.images import write_images
from support.models import accelerate_launch

from memwatch.cli import main
from memwatch.data.embed_cache import EmbeddingCache, embed_items
from memwatch.data.reference_index import ReferenceIndex
from memwatch.data.refset import load_reference_set
from memwatch.embedders.pixel import PixelEmbedder


@pytest.fixture
def train(tmp_path: Path) -> Path:
    write_images(tmp_path / "train", list(range(10)), size=16)
    return tmp_path / "train"


def test_index_embeds_once_resumes_and_keeps_the_search(train: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("faiss", reason="the kept search index needs faiss-cpu (memwatch[search])")
    cache_dir = tmp_path / "cache"
    embedder = PixelEmbedder(16)
    refs = load_reference_set(train)
    # an earlier run was interrupted after 4 images: those are in the cache
    embed_items(refs, refs.items[:4], embedder, EmbeddingCache(cache_dir))
    args = ["index", str(train), "--resolution", "16", "--cache-dir", str(cache_dir), "--search", "flat"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "process 0: embedded 6 of 6 to do (4 were cached)" in out and "search flat: built and kept" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "embedded 0 of 0 to do (10 were cached)" in out and "search flat: loaded (already built)" in out
    # a probe's index with the same embedder and reference set loads both instead of computing them
    index = ReferenceIndex(load_reference_set(train), embedder, EmbeddingCache(cache_dir), search="flat")
    assert index.computed == 0 and index.prepare_search().loaded


def test_two_accelerate_processes_share_the_embedding(train: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cmd = accelerate_launch(2, 29541, "--module", "memwatch.cli", "index", str(train), "--resolution", "16",
                            "--cache-dir", str(cache_dir))  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0: embedded 5 of 10 to do" in proc.stdout and "process 1: embedded 5 of 10 to do" in proc.stdout
    refs = load_reference_set(train)
    cached = EmbeddingCache(cache_dir).get(PixelEmbedder(16).key, [it.sha256 for it in refs.items])
    assert len(cached) == 10  # every image once, from one process or the other
