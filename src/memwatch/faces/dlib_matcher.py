"""dlib's ResNet face descriptor, aligned with dlib's 5-point landmarks: an offline face matcher.

The model files come with the ``face_recognition_models`` package (public domain; installed by
``memwatch[faces]``) and are read with ``dlib-bin`` (a prebuilt dlib). Nothing is downloaded.
``face_recognition_models/__init__.py`` imports ``pkg_resources``, which current setuptools no
longer ships, so the package is *found* (``importlib.util.find_spec``) but never imported.

Faces are found by the same detector as for FaceNet (:class:`memwatch.faces.detect.FaceDetector`,
MTCNN on an upsampled, padded canvas, so 16-64 px generated faces are found). For each face, the
region around its box is cut out and upsampled so the face is about :data:`ALIGN_FACE_SIDE` pixels
wide; dlib's 5-point shape predictor places the eye corners and the nose; dlib aligns the face chip
(150 px, padding 0.25) from those points and computes the 128-D descriptor. The 68-point model in
the same package is never used: its training data (iBUG 300-W) is licensed for non-commercial use only.

**Comparison.** dlib compares descriptors by Euclidean distance, same person below 0.6 (dlib's
``dnn_face_recognition_ex.cpp``; 99.38% on LFW by its authors). memwatch compares every matcher's
faces by the cosine of unit vectors (one mechanism for thresholds, clustering and blends), so the
descriptors are normalised, and dlib's 0.6 is carried over at the descriptors' typical length:
``cos = 1 - 0.6**2 / (2 * r**2)`` with r = :data:`DESCRIPTOR_NORM` (measured 1.32-1.42 on the 11
faces of ``assets/faces``: the carried threshold is 0.907, 0.897-0.911 across that range).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_file

if TYPE_CHECKING:  # faces.config imports this module for the matcher's threshold
    from memwatch.faces.config import IdentityConfig
    from memwatch.faces.detect import Detection

#: The two model files used, as named in ``face_recognition_models/models/``.
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
#: dlib's same-person distance (dlib/examples/dnn_face_recognition_ex.cpp, face_recognition's tolerance).
DLIB_DISTANCE = 0.6
#: Typical Euclidean length of a dlib descriptor (mean over the faces of assets/faces: 1.39, range 1.32-1.42).
DESCRIPTOR_NORM = 1.39
#: Faces are upsampled to about this width before landmarks are placed (dlib's chips are 150 px with
#: padding 0.25, so the face itself is about 100 px in them; the landmarks need a face at least that big).
ALIGN_FACE_SIDE = 120
EMBEDDING_DIM = 128


def cosine_threshold(distance: float = DLIB_DISTANCE, norm: float = DESCRIPTOR_NORM) -> float:
    """dlib's Euclidean ``distance`` between descriptors of length ``norm``, as a cosine of unit vectors.

    Example:
        >>> round(cosine_threshold(), 3)
        0.907
    """
    return 1.0 - distance**2 / (2.0 * norm**2)


def find_model_dir(weights: str | None) -> Path:
    """The folder holding both model files: ``identity.weights`` if set, else ``face_recognition_models``'.

    Raises:
        MemwatchError: the folder or a file is missing (names which, and how to install them).

    Example:
        >>> (find_model_dir(None) / DESCRIPTOR_FILE).is_file()  # doctest: +SKIP
        True
    """
    if weights:
        folder = Path(weights).expanduser()
        where = f"identity.weights {folder}"
    else:
        spec = importlib.util.find_spec("face_recognition_models")  # found, not imported (pkg_resources)
        if spec is None or not spec.submodule_search_locations:
            raise MemwatchError(
                "the dlib face matcher needs the face_recognition_models package: pip install 'memwatch[faces]', "
                "or set identity.weights to a folder holding its model files"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "models"
        where = f"face_recognition_models ({folder})"
    missing = [name for name in (DESCRIPTOR_FILE, LANDMARKS_FILE) if not (folder / name).is_file()]
    if missing:
        raise MemwatchError(f"{where} lacks {', '.join(missing)}: reinstall face_recognition_models or fix the folder")
    return folder


def import_dlib() -> Any:
    """Import dlib, or explain which package to install."""
    try:
        import dlib
    except ImportError as e:
        raise MemwatchError(f"the dlib face matcher needs dlib ({e}): pip install 'memwatch[faces]'") from None
    return dlib


def dlib_available() -> bool:
    """Whether dlib and the model files are installed (the ``auto`` matcher then picks dlib)."""
    if importlib.util.find_spec("dlib") is None:
        return False
    try:
        find_model_dir(None)
    except MemwatchError:
        return False
    return True


class DlibMatcher:
    """dlib's 128-D ResNet descriptor of 5-point-aligned faces, as unit vectors.

    Args:
        config: ``weights`` (a folder with both model files; default the installed package) is read.

    Attributes:
        threshold: dlib's documented same-person threshold as a cosine (see the module docs), the
            fallback when the gallery cannot calibrate one (:func:`memwatch.faces.embed.documented_threshold`).

    Example:
        >>> from memwatch.faces import Detection, IdentityConfig
        >>> m = DlibMatcher(IdentityConfig(matcher="dlib"))  # doctest: +SKIP
        >>> m.embed_faces([torch.rand(3, 64, 64)], [Detection(0.99, (16, 16, 48, 48))])[0].shape  # doctest: +SKIP
        torch.Size([1, 128])
    """

    name = "dlib"
    dim = EMBEDDING_DIM
    #: dlib's same-person distance 0.6 (dnn_face_recognition_ex.cpp) at descriptor length 1.39 (measured
    #: on assets/faces): cosine 1 - 0.6^2 / (2 * 1.39^2) = 0.907
    threshold = cosine_threshold()

    def __init__(self, config: IdentityConfig):
        dlib = import_dlib()
        self.config = config
        folder = find_model_dir(config.weights)
        self.weights_path = folder / DESCRIPTOR_FILE
        self.landmarks_path = folder / LANDMARKS_FILE
        # Both files decide the embedding: a changed file changes spec() and the embedding cache key.
        self.weights_sha256 = sha256_file(self.weights_path)
        self.landmarks_sha256 = sha256_file(self.landmarks_path)
        self.landmarks = dlib.shape_predictor(str(self.landmarks_path))
        self.model = dlib.face_recognition_model_v1(str(self.weights_path))
        self._rectangle = dlib.rectangle

    def spec(self) -> dict[str, Any]:
        """Matcher, both model files' sha256, and the alignment settings."""
        return {
            "model": "dlib_resnet_v1",
            "matcher": self.name,
            "weights_file": DESCRIPTOR_FILE,
            "weights_sha256": self.weights_sha256,
            "landmarks_file": LANDMARKS_FILE,
            "landmarks_sha256": self.landmarks_sha256,
            "align_face_side": ALIGN_FACE_SIDE,
        }

    def embed_faces(
        self, images: Sequence[torch.Tensor], detections: Sequence[Detection | None]
    ) -> tuple[torch.Tensor, list[bool]]:
        """Align and embed the detected face of each image.

        Args:
            images: ``(3, H, W)`` images in [0, 1].
            detections: one :class:`Detection` or None per image.

        Returns:
            ``(vectors, embedded)``: unit vectors ``(M, 128)`` in image order for the faces that
            could be embedded, and per image whether it was.
        """
        vectors: list[np.ndarray] = []
        embedded: list[bool] = []
        for image, det in zip(images, detections, strict=True):
            v = None if det is None else self._embed_one(image, det)
            embedded.append(v is not None)
            if v is not None:
                vectors.append(v)
        if not vectors:
            return torch.empty(0, EMBEDDING_DIM), embedded
        out = torch.from_numpy(np.stack(vectors)).float()
        return F.normalize(out, dim=1), embedded

    def _embed_one(self, image: torch.Tensor, det: Detection) -> np.ndarray | None:
        region, box = _face_region(image, det.box, ALIGN_FACE_SIDE)
        if region is None:
            return None
        rect = self._rectangle(*(round(v) for v in box))
        shape = self.landmarks(region, rect)
        v = np.asarray(self.model.compute_face_descriptor(region, shape, 0, 0.25), dtype=np.float32)
        return v if np.isfinite(v).all() and np.linalg.norm(v) > 0 else None


def _face_region(
    image: torch.Tensor, box: tuple[float, float, float, float], side: int
) -> tuple[np.ndarray | None, tuple[float, float, float, float]]:
    """The face and its surroundings (half a face on every side, edge pixels replicated past the image),
    resized so the face is ``side`` pixels wide, as contiguous uint8 ``(H, W, 3)``; and the box in it."""
    x1, y1, x2, y2 = box
    size = max(x2 - x1, y2 - y1)
    if not math.isfinite(size) or size < 1:
        return None, box
    h, w = int(image.shape[-2]), int(image.shape[-1])
    left, top = math.floor(x1 - size / 2), math.floor(y1 - size / 2)
    right, bottom = math.ceil(x2 + size / 2), math.ceil(y2 + size / 2)
    pads = (max(0, -left), max(0, right - w), max(0, -top), max(0, bottom - h))
    x = torch.nan_to_num(image.float(), nan=0.0).clamp(0.0, 1.0).unsqueeze(0)
    if any(pads):
        x = F.pad(x, pads, mode="replicate")
    x = x[:, :, top + pads[2] : bottom + pads[2], left + pads[0] : right + pads[0]]
    scale = side / size
    out = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
    x = F.interpolate(x, size=out, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
    pixels = np.ascontiguousarray(x[0].mul(255.0).round().to(torch.uint8).permute(1, 2, 0).numpy())
    sy, sx = out[0] / (bottom - top), out[1] / (right - left)
    return pixels, ((x1 - left) * sx, (y1 - top) * sy, (x2 - left) * sx, (y2 - top) * sy)
