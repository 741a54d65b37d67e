"""CLIP image embedder (open_clip): semantic similarity between samples and training images.

Images are resized to the model's input size, normalised with the mean/std the weights were trained
with, encoded with the image tower and L2-normalised. Distance is cosine distance ``1 - q @ r.T``;
similarity is cosine similarity.

Weights never come from the network here. ``pretrained`` is either

* an open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``...), looked up in the local Hugging Face
  hub cache only (open_clip itself would try to download, which hangs or fails on offline
  machines), or
* a path to a local weights file: ``.safetensors`` (preferred), or ``.bin``/``.pt``/``.pth`` read
  with ``torch.load(weights_only=True)`` and nothing else.

open_clip is imported inside the constructor, so ``import memwatch`` does not pay for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from memwatch.embedders.base import Embedder
from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file
from memwatch.models.weights import read_state_dict

# Cosine similarity at or above which a sample counts as a copy of its nearest training image.
# This is a configurable heuristic, not a calibrated value: Somepalli et al. 2023 calibrated a copy
# threshold (0.5) for SSCD, a copy-detection model, not for CLIP. CLIP embeddings are semantic, so
# different photos of the same subject already reach ~0.8-0.9; work on de-duplicating LAION with
# CLIP image embeddings (e.g. Webster et al. 2023, "On the de-duplication of LAION-2B") treats only
# pairs in the mid-0.9s and above as near-duplicates. 0.95 follows that practice; set
# embedder.copy_threshold to calibrate it on your own data.
CLIP_COPY_THRESHOLD = 0.95

# Suffixes of safetensors files; any other weights file is read with torch.load(weights_only=True).
# Suffixes that mark ``pretrained`` as a file path even when the file is missing (so the error names
# the missing file instead of calling it an unknown tag).
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# open_clip's hub file names (open_clip.constants); repeated here so resolving a tag needs no download.
_HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
_HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
# open_clip logs this when a model is built without weights; we load them right after, so it misleads.
_RANDOM_INIT_LOG = "No pretrained weights loaded for model"


class ClipEmbedder(Embedder):
    """Embed images with an open_clip CLIP image tower.

    Args:
        model: open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-B-32"``.
        pretrained: an open_clip pretrained tag resolved from the local Hugging Face hub cache, or a
            path to a local weights file (``.safetensors``, or ``.bin``/``.pt`` state dict).
        device: torch device for the model; ``None`` picks CUDA when available, else the CPU.
        copy_threshold: cosine similarity at or above which a sample counts as a copy
            (default :data:`CLIP_COPY_THRESHOLD`).
        batch_size: images encoded per forward pass.

    Raises:
        MemwatchError: open_clip missing, unknown architecture or tag, weights not in the local cache,
            a missing or unreadable weights file, or weights that do not fit the architecture.

    Example:
        >>> emb = ClipEmbedder("ViT-B-32", "openai")  # doctest: +SKIP
        >>> feats = emb.embed(torch.rand(4, 3, 256, 256))  # doctest: +SKIP
        >>> emb.similarity(emb.pairwise_distance(feats, feats)).diagonal()  # doctest: +SKIP
        tensor([1.0000, 1.0000, 1.0000, 1.0000])
    """

    name = "clip"
    builtin_copy_threshold = CLIP_COPY_THRESHOLD
    copy_threshold_source = (
        "CLIP de-duplication practice (embedders/clip.py; e.g. Webster et al. 2023): cosine >= 0.95 is a near-duplicate"
    )

    @classmethod
    def from_settings(cls, settings: Any, default_resolution: int | None = None) -> ClipEmbedder:
        if settings.resolution is not None:
            raise MemwatchError("setting 'embedder.resolution' applies to pixel only: clip uses its model's input size")
        return cls(settings.model, settings.pretrained, copy_threshold=settings.copy_threshold)

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str = "openai",
        *,
        device: str | torch.device | None = None,
        copy_threshold: float | None = None,
        batch_size: int = 32,
    ):
        if batch_size < 1:
            raise MemwatchError(f"embedder.batch_size must be at least 1, got {batch_size}")
        if copy_threshold is not None and not -1.0 <= copy_threshold <= 1.0:
            raise MemwatchError(
                f"embedder.copy_threshold {copy_threshold} is not a cosine similarity: give a value in [-1, 1]"
            )
        open_clip = _import_open_clip()
        self.model_name = _check_model_name(open_clip, model)
        self.batch_size = batch_size
        self.default_copy_threshold = CLIP_COPY_THRESHOLD if copy_threshold is None else copy_threshold
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")

        pretrained = os.fspath(pretrained) if pretrained is not None else ""  # config may hand over a Path
        tag_cfg = open_clip.get_pretrained_cfg(self.model_name, pretrained) if pretrained else {}
        if tag_cfg:
            self.tag: str | None = pretrained.lower().replace("-", "_")  # open_clip's own tag normalisation
            self.weights_path = _cached_tag_weights(self.model_name, self.tag, tag_cfg)
            self.weights_sha256: str | None = None
        else:
            self.tag = None
            self.weights_path = _local_weights_path(open_clip, self.model_name, pretrained)
            # Hash the file: a changed file must change spec(), and with it the embedding cache key.
            self.weights_sha256 = sha256_file(self.weights_path)

        mean, std = _preprocess_constants(open_clip, self.model_name, tag_cfg)
        self.model = _build_model(open_clip, self.model_name, quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
        _load_weights(self.model, self.model_name, self.weights_path)
        self.model.to(self.device).eval()

        image_size = self.model.visual.image_size
        sizes = set(image_size) if isinstance(image_size, tuple | list) else {image_size}
        if len(sizes) != 1:
            raise MemwatchError(
                f"CLIP model {self.model_name} takes non-square {image_size} images; choose a square-input model"
            )
        self.resolution = int(sizes.pop())
        # The model's own constants (from the tag, or shared by all its tags), shaped to broadcast.
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def spec(self) -> dict[str, Any]:
        """Model, weights identity (tag, or file path and sha256) and resolution."""
        if self.tag is not None:
            pretrained: Any = self.tag
        else:
            pretrained = {"path": str(self.weights_path), "sha256": self.weights_sha256}
        return {"name": self.name, "model": self.model_name, "pretrained": pretrained, "resolution": self.resolution}

    @torch.no_grad()
    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise with the model's mean/std, encode in batches, L2-normalise; float32 on the CPU."""
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size].to(self.device, torch.float32)
            features = self.model.encode_image((batch - self.mean) / self.std)
            outputs.append(F.normalize(features.float(), dim=-1).cpu())
        if not outputs:
            return torch.empty(0, self.model.visual.output_dim)
        return torch.cat(outputs)

    def pairwise_distance(self, query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Cosine distance ``1 - q @ r.T`` between L2-normalised embeddings, shape ``(Q, R)``."""
        return 1.0 - query @ reference.T

    def similarity(self, distance: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``1 - distance`` (1 for identical embeddings)."""
        return 1.0 - distance

    def distance_lower_bound(self, l2: torch.Tensor, dim: int) -> torch.Tensor:
        """``l2**2 / 2``: for unit vectors the cosine distance is half the squared euclidean one (the
        factor below 1 absorbs float32 normalisation error)."""
        return l2.square() * (0.5 * (1 - 1e-5))


def _import_open_clip() -> Any:
    """Import open_clip, or explain which package to install."""
    try:
        import open_clip
    except ImportError as e:
        raise MemwatchError(
            f"the clip embedder needs open_clip ({e}): pip install 'memwatch[clip]', or use the pixel embedder"
        ) from None
    return open_clip


def _check_model_name(open_clip: Any, model: str) -> str:
    """Return open_clip's name for a built-in architecture, or explain what names are accepted."""
    if model.startswith(("hf-hub:", "local-dir:")):
        # Both schemas make open_clip fetch configs/weights itself (hub download, unrestricted torch.load).
        raise MemwatchError(
            f"embedder.model '{model}': give an open_clip architecture name (e.g. ViT-B-32) and set "
            "embedder.pretrained to the local weights file instead"
        )
    name = model.replace("/", "-")  # open_clip accepts "ViT-B/32" for "ViT-B-32"
    if open_clip.get_model_config(name) is None:
        raise MemwatchError(
            f"embedder.model '{model}' is not an open_clip architecture: use a name from "
            "open_clip.list_models(), e.g. ViT-B-32"
        )
    return name


def _hub_cache_dir() -> str:
    """The Hugging Face hub cache folder (honours HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_tag_weights(model: str, tag: str, tag_cfg: dict[str, Any]) -> Path:
    """Find the weights of an open_clip tag in the local Hugging Face hub cache, without network.

    open_clip resolves a tag to ``hf_hub = "org/repo/[filename]"`` (default file
    ``open_clip_pytorch_model.bin``, with a ``.safetensors`` twin preferred) and downloads it. We do
    the same lookup with ``huggingface_hub.try_to_load_from_cache``, which only reads the cache.
    """
    if tag_cfg.get("file"):
        return _local_weights_path(None, model, str(tag_cfg["file"]))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise MemwatchError(
            f"CLIP weights {model}/{tag} are looked up in the Hugging Face cache, which needs huggingface_hub: "
            "pip install huggingface_hub, or set embedder.pretrained to a local weights file"
        ) from None
    cache = _hub_cache_dir()
    # "org/repo/" means open_clip's default file name; "org/repo/file.bin" names the file.
    repo_id, filename = os.path.split(str(tag_cfg.get("hf_hub") or ""))
    for candidate in _weights_file_candidates(filename or _HF_WEIGHTS_NAME) if repo_id else []:
        found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache)
        if isinstance(found, str):  # None: not cached; a sentinel object: cached as "does not exist"
            return Path(found)
    where = f"hub repo {repo_id}" if repo_id else "a download URL"
    raise MemwatchError(
        f"CLIP weights {model}/{tag} ({where}) are not in the local cache ({cache}) and memwatch does not "
        "download: download them where there is network (open_clip.create_model"
        f"('{model}', pretrained='{tag}')) or set embedder.pretrained to a local weights file"
    )


def _weights_file_candidates(filename: str) -> list[str]:
    """The hub file names to try for ``filename``: a safetensors twin first, as open_clip does."""
    if filename == _HF_WEIGHTS_NAME:
        return [_HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _local_weights_path(open_clip: Any, model: str, pretrained: str | None) -> Path:
    """Resolve ``pretrained`` as a local weights file, or explain why it is neither a file nor a tag."""
    if not pretrained:
        raise MemwatchError(
            f"embedder.pretrained is empty for CLIP model {model}: give an open_clip tag or a weights file"
        )
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        raise MemwatchError(f"embedder.pretrained {path} is a folder: point it at the weights file inside")
    looks_like_path = os.sep in pretrained or "/" in pretrained or path.suffix.lower() in WEIGHTS_SUFFIXES
    if looks_like_path:
        raise MemwatchError(f"CLIP weights file {path} does not exist: fix embedder.pretrained")
    tags = open_clip.list_pretrained_tags_by_model(model) if open_clip is not None else []
    shown = ", ".join(tags[:6]) + (f" and {len(tags) - 6} more" if len(tags) > 6 else "")
    known = f"known tags: {shown}" if tags else "open_clip has no pretrained tags for it"
    raise MemwatchError(
        f"embedder.pretrained '{pretrained}' is neither an open_clip tag for {model} ({known}) nor an "
        "existing weights file: fix the tag or the path"
    )


def _preprocess_constants(
    open_clip: Any, model: str, tag_cfg: dict[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the weights expect.

    A tag carries its own. For a local file we use the constants all of the architecture's tags
    share (e.g. SigLIP models use 0.5/0.5, CLIP ViTs OpenAI's), and OpenAI's when they disagree or
    there are no tags, which is open_clip's own default.
    """
    if tag_cfg:
        return tuple(tag_cfg["mean"]), tuple(tag_cfg["std"])
    consts = {
        (tuple(cfg["mean"]), tuple(cfg["std"]))
        for tag in open_clip.list_pretrained_tags_by_model(model)
        if "mean" in (cfg := open_clip.get_pretrained_cfg(model, tag)) and "std" in cfg
    }
    if len(consts) == 1:
        return consts.pop()
    return tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)


@contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Drop open_clip's 'initialized randomly' log line while we build a model we load right after."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_RANDOM_INIT_LOG)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _build_model(open_clip: Any, model: str, *, quick_gelu: bool) -> torch.nn.Module:
    """Build the architecture on the CPU with no weights and nothing downloaded."""
    try:
        with _quiet_random_init_warning():
            return open_clip.create_model(
                model,
                pretrained=None,
                device="cpu",
                # Weights come from our own loader; never let open_clip fetch tower weights.
                pretrained_image=False,
                pretrained_text=False,
                # Tags trained with QuickGELU (OpenAI's) need it; open_clip only warns on a mismatch.
                force_quick_gelu=quick_gelu,
            )
    except Exception as e:  # open_clip raises RuntimeError/ImportError/ValueError for unusable configs
        raise MemwatchError(
            f"cannot build CLIP model {model} ({type(e).__name__}: {e}): choose another embedder.model"
        ) from None


def _load_weights(model: torch.nn.Module, model_name: str, path: Path) -> None:
    """Load ``path`` into ``model`` strictly, with open_clip's format fix-ups."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    # Read here rather than with open_clip's reader, which falls back to an unrestricted torch.load
    # when the restricted one raises TypeError (a crafted file can trigger that).
    state = read_state_dict(path, what="CLIP weights", setting="embedder.pretrained")
    try:
        # The same fix-ups as open_clip.load_checkpoint, applied to the dict we read safely.
        state = convert_state_dict(model, state)
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        for key in ("logit_scale", "logit_bias"):
            target = getattr(model, key, None)
            if key in state and target is not None and target.ndim != state[key].ndim:
                state[key] = state[key].reshape(target.shape)
        if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
            state["logit_bias"] = torch.zeros_like(state["logit_scale"])
        state.pop("text.transformer.embeddings.position_ids", None)
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        # torch lists every mismatched key; the first lines say enough to recognise the problem.
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])[:300]
        raise MemwatchError(
            f"CLIP weights file {path} does not fit model {model_name} ({detail}): set embedder.model to the "
            "architecture the weights were trained with"
        ) from None
