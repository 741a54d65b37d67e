"""Face embeddings with InceptionResnetV1 (facenet-pytorch), and the detect-crop-embed pipeline.

Weights are never fetched behind the user's back. For matcher ``vggface2`` / ``casia-webface`` they
come from, in order:

1. ``identity.weights``: a local file (``.safetensors`` read with safetensors; anything else with
   ``torch.load(weights_only=True)``);
2. the torch hub cache, where facenet-pytorch itself stores them:
   ``$TORCH_HOME/checkpoints/<file>`` (``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``, i.e.
   ``~/.cache/torch``), and torch.hub's ``<hub dir>/checkpoints/<file>``;
3. a download into facenet-pytorch's cache path, only when ``identity.download`` is true.

Otherwise one :class:`MemwatchError` names the expected file and where it was looked for.

Embeddings are 512-d and L2-normalised; faces are compared by cosine similarity.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from memwatch.errors import MemwatchError
from memwatch.faces.config import IdentityConfig
from memwatch.faces.detect import Detection, FaceDetector, import_facenet, pick_device
from memwatch.hashing import config_hash, sha256_file
from memwatch.weights import read_state_dict as read_weights

#: facenet-pytorch's release files (models/inception_resnet_v1.py, ``load_weights``).
WEIGHTS_URLS = {
    "vggface2": "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt",
    "casia-webface": (
        "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180408-102900-casia-webface.pt"
    ),
}
EMBEDDING_DIM = 512


def weights_file_name(matcher: str) -> str:
    """The file name facenet-pytorch caches ``matcher``'s weights under."""
    return WEIGHTS_URLS[matcher].rsplit("/", 1)[1]


def facenet_cache_dir() -> Path:
    """facenet-pytorch's weights folder: ``$TORCH_HOME/checkpoints`` (its own ``get_torch_home`` rule)."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(torch_home)) / "checkpoints"


def weights_candidates(matcher: str) -> list[Path]:
    """Where cached weights for ``matcher`` may be, in the order they are tried."""
    name = weights_file_name(matcher)
    paths = [facenet_cache_dir() / name, Path(torch.hub.get_dir()) / "checkpoints" / name]
    return list(dict.fromkeys(paths))


def resolve_weights(config: IdentityConfig) -> Path:
    """Find (or, if allowed, download) the matcher's weights file.

    Args:
        config: ``matcher``, ``weights`` and ``download`` are read.

    Returns:
        Path of an existing weights file.

    Raises:
        MemwatchError: the configured file is missing, or nothing is cached and downloading is off
            (or failed); the message names the expected file.

    Example:
        >>> resolve_weights(IdentityConfig(weights="faces/vggface2.safetensors"))  # doctest: +SKIP
        PosixPath('faces/vggface2.safetensors')
    """
    if config.weights:
        path = Path(config.weights).expanduser()
        if path.is_file():
            return path
        what = "is a folder" if path.is_dir() else "does not exist"
        raise MemwatchError(f"face matcher weights file {path} {what}: fix identity.weights")
    candidates = weights_candidates(config.matcher)
    for path in candidates:
        if path.is_file():
            return path
    name = weights_file_name(config.matcher)
    if config.download:
        return _download(config.matcher, candidates[0])
    looked = ", ".join(str(p.parent) for p in candidates)
    raise MemwatchError(
        f"face matcher '{config.matcher}' needs weights file {name}, not found in {looked}: copy it there "
        f"(from {WEIGHTS_URLS[config.matcher]}), set identity.weights to a local file, or set "
        "identity.download: true on a machine with network"
    )


def _download(matcher: str, dest: Path) -> Path:
    """Download facenet-pytorch's release file to ``dest`` (only called when the user allowed it)."""
    url = WEIGHTS_URLS[matcher]
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=False)
    except Exception as e:  # URLError, HTTPError, timeouts, disk errors: all mean "no weights"
        raise MemwatchError(
            f"could not download face matcher weights {dest.name} from {url} ({type(e).__name__}: {e}): "
            f"copy the file to {dest} or set identity.weights to a local file"
        ) from None
    return dest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: safetensors, else ``torch.load(weights_only=True)``.

    Drops the classifier (``logits.*``; the release files carry an 8631- or 10575-way head that
    embeddings do not use) and a ``module.`` prefix (DataParallel checkpoints).
    """
    state = read_weights(path, what="face matcher weights", setting="identity.weights", model="InceptionResnetV1")
    return {k: v for k, v in state.items() if not k.startswith("logits.")}


class FaceMatcher:
    """InceptionResnetV1 face embeddings (512-d, L2-normalised).

    Args:
        config: ``matcher``, ``weights``, ``download``, ``device``, ``batch_size`` are read.

    Raises:
        MemwatchError: facenet-pytorch missing, weights not found, unreadable or not fitting.

    Example:
        >>> m = FaceMatcher(IdentityConfig(weights="vggface2.safetensors"))  # doctest: +SKIP
        >>> m.embed(torch.rand(2, 3, 160, 160)).shape  # doctest: +SKIP
        torch.Size([2, 512])
    """

    def __init__(self, config: IdentityConfig):
        facenet = import_facenet()
        self.config = config
        self.device = pick_device(config.device)
        self.weights_path = resolve_weights(config)
        # A changed file must change spec(), and with it the embedding cache key.
        self.weights_sha256 = sha256_file(self.weights_path)
        state = read_state_dict(self.weights_path)
        self.model = facenet.InceptionResnetV1(pretrained=None, classify=False)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])[:300]
            raise MemwatchError(
                f"face matcher weights file {self.weights_path} does not fit InceptionResnetV1 ({detail}): "
                "use facenet-pytorch's vggface2 or casia-webface weights"
            ) from None
        self.model.to(self.device).eval()

    def spec(self) -> dict[str, Any]:
        """Matcher name and the sha256 of its weights file."""
        return {"model": "inception_resnet_v1", "matcher": self.config.matcher, "weights_sha256": self.weights_sha256}

    @torch.no_grad()
    def embed(self, crops: torch.Tensor) -> torch.Tensor:
        """Embed face crops ``(M, 3, S, S)`` in [0, 1]; returns float32 ``(M, 512)`` on the CPU."""
        outputs = []
        for start in range(0, crops.shape[0], self.config.batch_size):
            batch = crops[start : start + self.config.batch_size].to(self.device, torch.float32)
            # facenet-pytorch's fixed_image_standardization on 0-255 pixels: (x - 127.5) / 128.
            batch = (batch * 255.0 - 127.5) / 128.0
            outputs.append(torch.nn.functional.normalize(self.model(batch).float(), dim=-1).cpu())
        return torch.cat(outputs) if outputs else torch.empty(0, EMBEDDING_DIM)


@dataclass
class FaceEmbeddings:
    """Faces found in a batch of images and their embeddings.

    Attributes:
        found: ``(N,)`` bool, a face was found in image i.
        probs: ``(N,)`` detection probabilities (NaN where no face).
        embeddings: ``(N, 512)`` unit vectors; rows without a face are zero.
        detections: per image, the :class:`Detection` or None.
        errors: images MTCNN failed on (counted as no face).
        timings: seconds spent in ``detection`` and ``embedding``.
    """

    found: torch.Tensor
    probs: torch.Tensor
    embeddings: torch.Tensor
    detections: list[Detection | None]
    errors: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class FacePipeline:
    """Detect, crop and embed faces, identically for training, holdout and generated images.

    Args:
        config: detection and matcher settings.

    Example:
        >>> pipe = FacePipeline(IdentityConfig(weights="vggface2.safetensors"))  # doctest: +SKIP
        >>> out = pipe.embed_images(torch.rand(4, 3, 64, 64))  # doctest: +SKIP
        >>> out.found.sum().item(), out.embeddings.shape  # doctest: +SKIP
        (0, torch.Size([4, 512]))
    """

    def __init__(self, config: IdentityConfig):
        self.config = config
        self.matcher = FaceMatcher(config)
        self.detector = FaceDetector(config)

    def spec(self) -> dict[str, Any]:
        """Detector and matcher settings: equal specs give equal embeddings."""
        return {"name": "facenet", **self.matcher.spec(), **self.detector.spec()}

    @property
    def key(self) -> str:
        """Hash of :meth:`spec`."""
        return config_hash(self.spec())

    def embed_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> FaceEmbeddings:
        """Detect the face in each image and embed it; images without a face are not embedded.

        Args:
            images: ``(N, 3, H, W)`` in [0, 1], or a list of ``(3, H, W)`` images of any sizes.

        Returns:
            :class:`FaceEmbeddings` aligned with ``images``.
        """
        t0 = time.perf_counter()
        crops = self.detector.detect_and_crop(images)
        t1 = time.perf_counter()
        vecs = self.matcher.embed(crops.crops)
        t2 = time.perf_counter()
        n = len(crops.detections)
        found = torch.tensor(crops.found, dtype=torch.bool)
        embeddings = torch.zeros(n, vecs.shape[1] if vecs.numel() else EMBEDDING_DIM)
        embeddings[found] = vecs
        probs = torch.tensor([d.prob if d is not None else float("nan") for d in crops.detections])
        return FaceEmbeddings(
            found=found,
            probs=probs,
            embeddings=embeddings,
            detections=crops.detections,
            errors=crops.errors,
            timings={"detection": t1 - t0, "embedding": t2 - t1},
        )


def load_face_pipeline(config: IdentityConfig | None = None) -> FacePipeline:
    """Build the face pipeline (MTCNN + InceptionResnetV1) from ``config`` (defaults if None).

    Example:
        >>> pipe = load_face_pipeline(IdentityConfig(matcher="casia-webface"))  # doctest: +SKIP
    """
    return FacePipeline(config or IdentityConfig())
