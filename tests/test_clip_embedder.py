"""ClipEmbedder: real open_clip loading from weights files and a hub cache these tests write themselves.

A tiny open_clip architecture (32 px ViT, one layer, 16-d embeddings) is registered through
open_clip's model-config mechanism; its weights are saved with safetensors / torch.save, and the
embedder must load exactly those weights, preprocess like the model expects, and refuse bad inputs
with a MemwatchError that names the file, tag or model. No network is used or needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.tolerance import ONE_PASS

from memwatch.errors import MemwatchError

open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402

from memwatch.embedders.clip import CLIP_COPY_THRESHOLD, ClipEmbedder  # noqa: E402

TINY = "memwatch-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Register the tiny architecture with open_clip, as a user would add a custom config."""
    folder = tmp_path_factory.mktemp("clip_configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)


def tiny_state(seed: int, **overrides: int) -> dict[str, torch.Tensor]:
    """State dict of a freshly initialised tiny model (contiguous, ready for safetensors)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, **overrides)
    # Random init leaves some tensors at 0/1; perturb all so "loaded" cannot pass by coincidence.
    return {k: (v + 0.01 * torch.randn_like(v)).contiguous() for k, v in model.state_dict().items()}


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, str(path))
    return path


def reference_features(state: dict[str, torch.Tensor], images: torch.Tensor, mean, std, quick_gelu=False):
    """Features computed directly with open_clip, independent of the embedder's code path."""
    model = open_clip.create_model(TINY, force_quick_gelu=quick_gelu)
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        return F.normalize(model.encode_image((images - mean) / std), dim=-1)


def images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_weights_equal(embedder: ClipEmbedder, state: dict[str, torch.Tensor]) -> None:
    loaded = embedder.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key].cpu(), value, rtol=0, atol=0, msg=key)


def test_safetensors_weights_are_loaded_and_embed_like_open_clip(tmp_path: Path) -> None:
    state = tiny_state(seed=0)
    path = save_safetensors(state, tmp_path / "tiny.safetensors")
    emb = ClipEmbedder(TINY, str(path), device="cpu")

    assert_weights_equal(emb, state)
    assert emb.resolution == 32
    x = images(4)
    feats = emb.embed(x)
    assert feats.shape == (4, 16) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(4))
    # The model's own preprocessing: a tiny model without tags gets open_clip's OpenAI constants.
    torch.testing.assert_close(feats, reference_features(state, x, OPENAI_MEAN, OPENAI_STD), **ONE_PASS)

    sim = emb.similarity(emb.pairwise_distance(feats, feats))
    torch.testing.assert_close(sim.diagonal(), torch.ones(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(emb.pairwise_distance(feats, feats), 1 - feats @ feats.T)
    assert sim.shape == (4, 4) and bool((sim <= 1 + 1e-5).all())


def test_other_sizes_are_resized_and_batching_does_not_change_results(tmp_path: Path) -> None:
    path = save_safetensors(tiny_state(seed=0), tmp_path / "tiny.safetensors")
    x = images(5, size=48)
    whole = ClipEmbedder(TINY, str(path), device="cpu", batch_size=32).embed(x)
    in_pairs = ClipEmbedder(TINY, str(path), device="cpu", batch_size=2).embed(x)
    assert whole.shape == (5, 16)
    torch.testing.assert_close(in_pairs, whole, **ONE_PASS)
    assert ClipEmbedder(TINY, str(path), device="cpu").embed(x[:0]).shape == (0, 16)


def test_spec_names_the_file_and_changes_with_its_contents(tmp_path: Path) -> None:
    path = save_safetensors(tiny_state(seed=0), tmp_path / "tiny.safetensors")
    first = ClipEmbedder(TINY, str(path), device="cpu")
    spec = first.spec()
    assert spec["name"] == "clip" and spec["model"] == TINY and spec["resolution"] == 32
    assert spec["pretrained"]["path"] == str(path.resolve())
    assert len(spec["pretrained"]["sha256"]) == 64
    assert ClipEmbedder(TINY, str(path), device="cpu").key == first.key

    save_safetensors(tiny_state(seed=1), path)  # same name, new weights
    changed = ClipEmbedder(TINY, str(path), device="cpu")
    assert changed.spec()["pretrained"]["sha256"] != spec["pretrained"]["sha256"]
    assert changed.key != first.key


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_torch_save_files_load_through_weights_only(tmp_path: Path, wrap: str) -> None:
    state = tiny_state(seed=2)
    payload: object = state
    if wrap == "state_dict":
        payload = {"state_dict": state, "epoch": 3}  # open_clip training checkpoint layout
    elif wrap == "module_prefix":
        payload = {f"module.{k}": v for k, v in state.items()}  # saved from DDP
    path = tmp_path / "tiny.pt"
    torch.save(payload, path)
    emb = ClipEmbedder(TINY, str(path), device="cpu")
    assert_weights_equal(emb, state)


UNPICKLED = []


class _Payload:
    """A pickled object whose unpickling leaves a trace; weights_only must refuse it first."""

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append(state)


def test_pickled_objects_are_refused_without_being_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.bin"
    torch.save({"visual.proj": torch.zeros(2), "x": _Payload()}, path)
    with pytest.raises(MemwatchError, match="evil.bin"):
        ClipEmbedder(TINY, str(path), device="cpu")
    assert UNPICKLED == []


def test_missing_weights_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(MemwatchError, match="weights.safetensors") as err:
        ClipEmbedder(TINY, str(missing), device="cpu")
    assert str(missing) in str(err.value)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    path = save_safetensors(tiny_state(seed=0, embed_dim=8), tmp_path / "other.safetensors")
    with pytest.raises(MemwatchError) as err:
        ClipEmbedder(TINY, str(path), device="cpu")
    assert str(path) in str(err.value) and TINY in str(err.value)


def test_unknown_tag_fails_fast_and_names_it() -> None:
    start = time.monotonic()
    with pytest.raises(MemwatchError, match="no_such_tag_xyz") as err:
        ClipEmbedder("ViT-B-32", "no_such_tag_xyz", device="cpu")
    assert time.monotonic() - start < 5
    assert "ViT-B-32" in str(err.value)


def test_known_tag_missing_from_cache_fails_fast_without_network(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    empty_cache = tmp_path / "hub"
    empty_cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty_cache))
    start = time.monotonic()
    with pytest.raises(MemwatchError) as err:
        ClipEmbedder("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert "ViT-B-32/laion2b_s34b_b79k" in message and str(empty_cache) in message
    assert "embedder.pretrained" in message


def test_tag_resolves_from_the_hub_cache_with_its_own_preprocessing(tmp_path: Path, monkeypatch) -> None:
    """A tag is looked up in a hub cache laid out like huggingface_hub's, and its config is honoured."""
    from huggingface_hub import constants

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    tag_cfg = {"hf_hub": "memwatch/tiny-clip/", "mean": mean, "std": std, "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"memwatch_test": tag_cfg})
    cache = tmp_path / "hub"
    repo = cache / "models--memwatch--tiny-clip"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = tiny_state(seed=3)
    save_safetensors(state, repo / "snapshots" / commit / "open_clip_model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    emb = ClipEmbedder(TINY, "memwatch-test", device="cpu")  # open_clip normalises '-' to '_'
    assert_weights_equal(emb, state)
    assert emb.spec() == {"name": "clip", "model": TINY, "pretrained": "memwatch_test", "resolution": 32}
    x = images(3)
    expected = reference_features(
        state, x, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1), quick_gelu=True
    )
    torch.testing.assert_close(emb.embed(x), expected, **ONE_PASS)


def test_unknown_architecture_is_named() -> None:
    with pytest.raises(MemwatchError, match="ViT-Q-99"):
        ClipEmbedder("ViT-Q-99", "openai", device="cpu")


def test_missing_open_clip_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(MemwatchError, match=r"memwatch\[clip\]"):
        ClipEmbedder(TINY, "whatever.safetensors", device="cpu")


def test_copy_threshold_default_override_and_range(tmp_path: Path) -> None:
    path = save_safetensors(tiny_state(seed=0), tmp_path / "tiny.safetensors")
    assert ClipEmbedder(TINY, str(path), device="cpu").default_copy_threshold == CLIP_COPY_THRESHOLD
    assert ClipEmbedder(TINY, str(path), device="cpu", copy_threshold=0.9).default_copy_threshold == 0.9
    with pytest.raises(MemwatchError, match="copy_threshold"):
        ClipEmbedder(TINY, str(path), device="cpu", copy_threshold=1.5)
    with pytest.raises(MemwatchError, match="batch_size"):
        ClipEmbedder(TINY, str(path), device="cpu", batch_size=0)


def test_importing_the_module_does_not_import_open_clip() -> None:
    code = "import sys, memwatch, memwatch.embedders.clip; assert 'open_clip' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
