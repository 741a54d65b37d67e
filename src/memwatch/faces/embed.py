"""Face matchers and the detect-align-embed pipeline.

The pipeline finds faces with :class:`~memwatch.faces.detect.FaceDetector` and hands the images and
boxes to a matcher, which crops or aligns the face its own way and returns unit vectors:
:class:`~memwatch.faces.dlib_matcher.DlibMatcher` (``dlib``, offline) or :class:`FaceMatcher`
(InceptionResnetV1 from facenet-pytorch, ``vggface2`` / ``casia-webface``; this module).

FaceNet weights are never fetched behind the user's back. For matcher ``vggface2`` / ``casia-webface`` they
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
from memwatch.faces.detect import (
    Detection,
    FaceDetector,
    as_image_list,
    clean_pixels,
    crop_face,
    import_facenet,
    pick_device,
)
from memwatch.hashing import config_hash, sha256_file
from memwatch.models.weights import read_state_dict as read_weights

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
    matcher = config.resolved_matcher
    candidates = weights_candidates(matcher)
    for path in candidates:
        if path.is_file():
            return path
    name = weights_file_name(matcher)
    if config.download:
        return _download(matcher, candidates[0])
    looked = ", ".join(str(p.parent) for p in candidates)
    raise MemwatchError(
        f"face matcher '{matcher}' needs weights file {name}, not found in {looked}: copy it there "
        f"(from {WEIGHTS_URLS[matcher]}), set identity.weights to a local file, set identity.download: true on "
        "a machine with network, or use the offline matcher dlib (pip install 'memwatch[faces]')"
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

    dim = EMBEDDING_DIM
    #: FaceNet (Schroff et al. 2015): squared L2 1.1 between unit embeddings, i.e. cosine 0.45; the fallback
    #: when the gallery cannot calibrate a threshold (:func:`documented_threshold`)
    threshold = 0.45

    def __init__(self, config: IdentityConfig):
        facenet = import_facenet()
        self.config = config
        self.name = config.resolved_matcher
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
        """Matcher name, its weights file and the file's sha256, and the crop settings."""
        return {
            "model": "inception_resnet_v1",
            "matcher": self.name,
            "weights_file": self.weights_path.name,
            "weights_sha256": self.weights_sha256,
            "face_size": self.config.face_size,
            "face_margin": self.config.face_margin,
        }

    def embed_faces(
        self, images: Sequence[torch.Tensor], detections: Sequence[Detection | None]
    ) -> tuple[torch.Tensor, list[bool]]:
        """Crop (facenet-pytorch's margin rule, ``face_size`` squared) and embed the detected faces.

        Returns:
            ``(vectors, embedded)``: ``(M, 512)`` unit vectors in image order, and per image whether
            its face was embedded.
        """
        crops, embedded = [], []
        size, margin = self.config.face_size, self.config.face_margin
        for image, det in zip(images, detections, strict=True):
            face = None if det is None else crop_face(clean_pixels(image), det, size, margin)
            embedded.append(face is not None)
            if face is not None:
                crops.append(face)
        return self.embed(torch.stack(crops) if crops else torch.empty(0, 3, size, size)), embedded

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
        embeddings: ``(N, D)`` unit vectors (D: 128 for dlib, 512 for FaceNet); rows without a face are zero.
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
    """Detect, align and embed faces, identically for training, holdout and generated images.

    Args:
        config: detection and matcher settings (``matcher``: dlib, vggface2, casia-webface or auto).

    Example:
        >>> pipe = FacePipeline(IdentityConfig(matcher="dlib"))  # doctest: +SKIP
        >>> out = pipe.embed_images(torch.rand(4, 3, 64, 64))  # doctest: +SKIP
        >>> out.found.sum().item(), out.embeddings.shape  # doctest: +SKIP
        (0, torch.Size([4, 128]))
    """

    def __init__(self, config: IdentityConfig):
        self.config = config
        self.matcher = build_matcher(config)
        self.detector = FaceDetector(config)

    def spec(self) -> dict[str, Any]:
        """Detector and matcher settings: equal specs give equal embeddings."""
        return {"name": "faces", **self.matcher.spec(), **self.detector.spec()}

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
        images = as_image_list(images)
        t0 = time.perf_counter()
        detections, errors = self.detector.detect(images)
        t1 = time.perf_counter()
        vecs, embedded = self.matcher.embed_faces(images, detections)
        t2 = time.perf_counter()
        detections = [d if ok else None for d, ok in zip(detections, embedded, strict=True)]
        found = torch.tensor(embedded, dtype=torch.bool)
        embeddings = torch.zeros(len(images), self.matcher.dim)
        embeddings[found] = vecs
        probs = torch.tensor([d.prob if d is not None else float("nan") for d in detections])
        return FaceEmbeddings(
            found=found,
            probs=probs,
            embeddings=embeddings,
            detections=detections,
            errors=errors,
            timings={"detection": t1 - t0, "embedding": t2 - t1},
        )


def build_matcher(config: IdentityConfig) -> Any:
    """The matcher ``config.matcher`` names (``auto``: dlib when installed, else vggface2).

    Example:
        >>> build_matcher(IdentityConfig(matcher="dlib")).spec()["matcher"]  # doctest: +SKIP
        'dlib'
    """
    return matcher_class(config.resolved_matcher)(config)


def matcher_class(name: str) -> type:
    """The class of matcher ``name`` (``dlib``, or a FaceNet weight set); it carries the matcher's
    documented threshold (``threshold``) without loading any weights.

    Example:
        >>> matcher_class("vggface2").threshold
        0.45
    """
    if name == "dlib":
        from memwatch.faces.dlib_matcher import DlibMatcher

        return DlibMatcher
    return FaceMatcher


def documented_threshold(config: IdentityConfig) -> float:
    """``fallback_threshold``, or the matcher's documented threshold (cosine) when it is null.

    Example:
        >>> documented_threshold(IdentityConfig(matcher="vggface2"))
        0.45
    """
    if config.fallback_threshold is not None:
        return float(config.fallback_threshold)
    return float(matcher_class(config.resolved_matcher).threshold)


def load_face_pipeline(config: IdentityConfig | None = None) -> FacePipeline:
    """Build the face pipeline (MTCNN and the configured matcher) from ``config`` (defaults if None).

    Example:
        >>> pipe = load_face_pipeline(IdentityConfig(matcher="casia-webface"))  # doctest: +SKIP
    """
    return FacePipeline(config or IdentityConfig())
