"""What memwatch caches is checked before it is trusted: a damaged, cut or rewritten vector shard or search
index is detected and rebuilt, with neighbours equal to an undamaged run's; concurrent builders never share
a temporary file; a command whose job is storing says so, and exits non-zero, when nothing could be stored."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from support.images import write_images

from memwatch.cli import main
from memwatch.data.embed_cache import EmbeddingCache
from memwatch.data.reference_index import ReferenceIndex
from memwatch.data.refset import load_reference_set
from memwatch.embedders.pixel import PixelEmbedder

faiss = pytest.importorskip("faiss", reason="the kept search index needs faiss-cpu (memwatch[search])")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def train(tmp_path: Path) -> Path:
    write_images(tmp_path / "train", list(range(12)), size=16)
    return tmp_path / "train"


def queries(seed: int = 5) -> torch.Tensor:
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def nearest(train: Path, cache_dir: Path | None, search: str = "exact") -> tuple[ReferenceIndex, torch.Tensor]:
    cache = EmbeddingCache(cache_dir) if cache_dir is not None else None
    index = ReferenceIndex(load_reference_set(train), PixelEmbedder(16), cache, search=search)
    return index, index.search(index.embedder.embed(queries()), 3)[1]


def shard_of(cache_dir: Path) -> Path:
    (shard,) = EmbeddingCache(cache_dir).shard_dir(PixelEmbedder(16).key).glob("*.npy")
    return shard


@pytest.mark.parametrize(
    "damage",
    ["rows", "cut", "other_width", "removed", "zeros_same_size"],
)
def test_a_damaged_vector_shard_is_embedded_again(train: Path, tmp_path: Path, damage: str, caplog) -> None:
    _, clean = nearest(train, None)
    cache_dir = tmp_path / "cache"
    first, _ = nearest(train, cache_dir)
    assert first.computed == 12
    shard = shard_of(cache_dir)
    data = bytearray(shard.read_bytes())
    if damage == "rows":  # the header intact, one vector's bytes changed
        data[-100:-96] = np.float32(7.5).tobytes()
        shard.write_bytes(bytes(data))
    elif damage == "cut":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "other_width":  # a valid .npy of other vectors written over it
        np.save(shard, np.ones((12, 10), dtype=np.float32))
    elif damage == "removed":
        shard.unlink()
    else:
        shard.write_bytes(bytes(data[:128]) + bytes(len(data) - 128))
    again, found = nearest(train, cache_dir)
    assert again.computed == 12 and torch.equal(found, clean)
    assert torch.equal(again.embeddings, first.embeddings)
    if damage != "removed":
        assert "cannot be used" in caplog.text
    third, _ = nearest(train, cache_dir)  # the new shard is recorded and served
    assert third.computed == 0


def test_a_shard_of_an_older_cache_is_checked_then_trusted(train: Path, tmp_path: Path, caplog) -> None:
    cache_dir = tmp_path / "cache"
    first, _ = nearest(train, cache_dir)
    db = sqlite3.connect(cache_dir / "embeddings.sqlite")
    db.execute("DELETE FROM shards")  # as a cache of memwatch 0.1 has no checksums
    db.commit()
    db.close()
    again, _ = nearest(train, cache_dir)
    assert again.computed == 0  # whole, finite, float32: taken, and recorded
    db = sqlite3.connect(cache_dir / "embeddings.sqlite")
    assert db.execute("SELECT rows, dim FROM shards").fetchall() == [(12, 3 * 16 * 16)]
    db.execute("DELETE FROM shards")
    db.commit()
    db.close()
    shard = shard_of(cache_dir)
    block = np.load(shard)
    block[3, 5] = np.nan
    np.save(shard, block)
    third, _ = nearest(train, cache_dir)
    assert third.computed == 12 and "not finite" in caplog.text


def test_cached_vectors_of_another_width_are_embedded_again(train: Path, tmp_path: Path, caplog) -> None:
    cache_dir = tmp_path / "cache"
    nearest(train, cache_dir)
    refs = load_reference_set(train)
    # another program wrote narrower vectors for some of the images under this embedder's key
    EmbeddingCache(cache_dir).put(PixelEmbedder(16).key, {it.sha256: torch.ones(5) for it in refs.items[:4]})
    again, found = nearest(train, cache_dir)
    assert again.computed == 4 and "are not 768 wide" in caplog.text
    assert torch.equal(found, nearest(train, None)[1])


@pytest.mark.parametrize("damage", ["cut", "flipped", "other_shape", "no_checksum"])
def test_a_damaged_search_index_is_built_again(train: Path, tmp_path: Path, damage: str, caplog, capsys) -> None:
    cache_dir = tmp_path / "cache"
    args = ["index", str(train), "--resolution", "16", "--cache-dir", str(cache_dir), "--search", "flat"]
    assert main(args) == 0
    (kept,) = (cache_dir / "indexes").glob("*.faiss")
    data = bytearray(kept.read_bytes())
    if damage == "cut":
        kept.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "flipped":  # still a readable index, with other numbers in it
        data[-40] ^= 0xFF
        kept.write_bytes(bytes(data))
    elif damage == "other_shape":
        faiss.write_index(faiss.IndexFlatL2(768), str(kept))
    else:  # an index kept by memwatch 0.1: no checksum beside it; whole, so it is used and recorded
        kept.with_name(kept.name + ".sha256").unlink()
    _, clean = nearest(train, None)
    index, found = nearest(train, cache_dir, search="flat")
    assert torch.equal(found, clean)
    used = index._search  # the search this index built on first use
    if damage == "no_checksum":
        assert used.loaded and kept.with_name(kept.name + ".sha256").is_file()
    else:
        assert "cannot be used" in caplog.text and not used.loaded and used.kept
        assert nearest(train, cache_dir, search="flat")[0]._search.loaded  # rebuilt and kept


BUILDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from memwatch.embedders.pixel import PixelEmbedder
    from memwatch.search.index import FaissSearch
    ref = torch.rand(20000, 96, generator=torch.Generator().manual_seed(0))
    start = float(sys.argv[2])
    while time.time() < start:
        time.sleep(0.01)
    search = FaissSearch(ref, PixelEmbedder(4), compressed=False, path=Path(sys.argv[1]))
    print(search.kept, search.loaded)
    """
)


def test_two_jobs_building_one_index_never_share_a_temporary_file(tmp_path: Path) -> None:
    import time

    path = tmp_path / "indexes" / "same.faiss"
    script = tmp_path / "build.py"
    script.write_text(BUILDER)
    start = str(time.time() + 3)  # both start writing at the same moment
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(path), start], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert all(o[0].split()[0] == "True" for o in outs)  # each kept it
    assert faiss.read_index(str(path)).ntotal == 20000
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_index_with_a_read_only_cache_fails_and_says_so(train: Path, tmp_path: Path, capsys) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the permission cannot be tested as root")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        code = main(["index", str(train), "--resolution", "16", "--cache-dir", str(cache_dir)])
    finally:
        cache_dir.chmod(stat.S_IRWXU)
    err = capsys.readouterr().err
    assert code == 2 and "could not store" in err


FULL_DISK_JOB = textwrap.dedent(
    """
    import resource, sys
    from memwatch.cli import main
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # files beyond 20 kB: the disk is full
    sys.exit(main(["index", sys.argv[1], "--resolution", "16", "--cache-dir", sys.argv[2], "--search", sys.argv[3]]))
    """
)


@pytest.mark.parametrize("search", ["exact", "flat"])
def test_index_on_a_full_disk_fails_and_says_so(train: Path, tmp_path: Path, search: str) -> None:
    job = tmp_path / "job.py"
    job.write_text(FULL_DISK_JOB)
    cache_dir = tmp_path / "cache"
    if search == "flat":  # the vectors fit; only the index is too large to keep
        assert main(["index", str(train), "--resolution", "16", "--cache-dir", str(cache_dir)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(job), str(train), str(cache_dir), search], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("memwatch: error: ") and "Traceback" not in proc.stderr
    assert ("could not store" if search == "exact" else "could not be kept") in last
