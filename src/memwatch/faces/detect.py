"""Face detection (MTCNN, facenet-pytorch) that works on small generated images, and face cropping.

Generated images are often 16-64 px, and their faces fill the frame. MTCNN was built for photos: its
smallest face is ``min_face_size`` (20 px), it raises when the image is smaller than that (its image
pyramid is empty), and it misses faces whose box runs off the image. So every image is first put on
a *detection canvas*:

1. resized so its shorter side is at least ``detect_min_side`` (upsampling small images; bicubic)
   and its longer side at most ``detect_max_side`` (downscaling large photos, for speed);
2. padded on every side by ``detect_pad`` of its side, replicating the edge pixels.

MTCNN runs on the canvas; the largest face at or above ``min_face_prob`` is kept and its box mapped
back to the original image, where the face is cropped with facenet-pytorch's margin rule and resized
to ``face_size``. Training, holdout and generated images all go through this same function, so their
crops are comparable. Images without a face come back as ``None``; nothing here raises on an image.

facenet-pytorch is imported when a detector is built, so ``import memwatch`` stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from memwatch.errors import MemwatchError

if TYPE_CHECKING:
    from memwatch.faces.config import IdentityConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """One detected face.

    Attributes:
        prob: MTCNN's face probability.
        box: ``(x1, y1, x2, y2)`` in pixels of the original image (may extend past its borders).
    """

    prob: float
    box: tuple[float, float, float, float]


@dataclass
class FaceCrops:
    """Detection results for a batch of images.

    Attributes:
        detections: one entry per image, None where no face was found.
        crops: ``(M, 3, face_size, face_size)`` crops in [0, 1], one per found face, in image order.
        errors: images on which MTCNN itself failed (counted as "no face", and logged).
    """

    detections: list[Detection | None]
    crops: torch.Tensor
    errors: int = 0

    @property
    def found(self) -> list[bool]:
        """Per image: was a face found."""
        return [d is not None for d in self.detections]


def import_facenet() -> Any:
    """Import facenet_pytorch, or explain which package to install."""
    try:
        import facenet_pytorch
    except ImportError as e:
        raise MemwatchError(f"the identity probe needs facenet-pytorch ({e}): pip install 'memwatch[faces]'") from None
    return facenet_pytorch


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    return torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")


class FaceDetector:
    """MTCNN on a padded, resized canvas, plus cropping of the detected face.

    Args:
        config: detection settings (``min_face_size``, ``detect_*``, ``mtcnn_thresholds``,
            ``min_face_prob``, ``face_size``, ``face_margin``, ``detect_batch_size``, ``device``).

    Example:
        >>> det = FaceDetector(IdentityConfig())  # doctest: +SKIP
        >>> out = det.detect_and_crop(torch.rand(2, 3, 32, 32))  # doctest: +SKIP
        >>> out.found, out.crops.shape  # doctest: +SKIP
        ([False, False], torch.Size([0, 3, 160, 160]))
    """

    def __init__(self, config: IdentityConfig):
        facenet = import_facenet()
        self.config = config
        self.device = pick_device(config.device)
        # keep_all + select_largest: every face, largest first; we then take the largest confident one
        # (generated faces are portraits; the largest face is the subject).
        self.mtcnn = facenet.MTCNN(
            image_size=config.face_size,
            margin=config.face_margin,
            min_face_size=config.min_face_size,
            thresholds=list(config.mtcnn_thresholds),
            select_largest=True,
            keep_all=True,
            post_process=False,
            device=self.device,
        ).eval()

    def spec(self) -> dict[str, Any]:
        """Every setting that changes which face is found or how it is cropped."""
        c = self.config
        return {
            "detector": "mtcnn",
            "min_face_size": c.min_face_size,
            "detect_min_side": c.detect_min_side,
            "detect_max_side": c.detect_max_side,
            "detect_pad": c.detect_pad,
            "mtcnn_thresholds": list(c.mtcnn_thresholds),
            "min_face_prob": c.min_face_prob,
            "face_size": c.face_size,
            "face_margin": c.face_margin,
        }

    def detect(self, images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[Detection | None], int]:
        """Find the largest confident face in each image.

        Args:
            images: ``(N, 3, H, W)`` in [0, 1], or a list of ``(3, H, W)`` images of any sizes.

        Returns:
            ``(detections, errors)``: one :class:`Detection` or None per image, and how many images
            MTCNN failed on (reported as None).

        Example:
            >>> dets, errors = FaceDetector(IdentityConfig()).detect(torch.rand(1, 3, 16, 16))  # doctest: +SKIP
            >>> dets, errors  # doctest: +SKIP
            ([None], 0)
        """
        images = as_image_list(images)
        out: list[Detection | None] = [None] * len(images)
        errors = 0
        # MTCNN batches only equal-sized images; group by size, keep the caller's order in the output.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(i)
        for (h, w), idx in groups.items():
            if h < 1 or w < 1:
                continue  # an empty image has no face
            for start in range(0, len(idx), self.config.detect_batch_size):
                part = idx[start : start + self.config.detect_batch_size]
                found, failed = self._detect_group(torch.stack([images[i] for i in part]))
                errors += failed
                for i, det in zip(part, found, strict=True):
                    out[i] = det
        return out, errors

    def crop(self, image: torch.Tensor, det: Detection) -> torch.Tensor | None:
        """:func:`crop_face` with this detector's ``face_size`` and ``face_margin``."""
        return crop_face(image, det, self.config.face_size, self.config.face_margin)

    def detect_and_crop(self, images: torch.Tensor | Sequence[torch.Tensor]) -> FaceCrops:
        """Detect (see :meth:`detect`) and crop every found face.

        Example:
            >>> out = FaceDetector(IdentityConfig()).detect_and_crop(samples)  # doctest: +SKIP
            >>> sum(out.found), out.crops.shape  # doctest: +SKIP
            (7, torch.Size([7, 3, 160, 160]))
        """
        images = as_image_list(images)
        dets, errors = self.detect(images)
        crops = []
        for i, det in enumerate(dets):
            if det is None:
                continue
            face = self.crop(clean_pixels(images[i]), det)
            if face is None:
                dets[i] = None
            else:
                crops.append(face)
        size = self.config.face_size
        stacked = torch.stack(crops) if crops else torch.empty(0, 3, size, size)
        return FaceCrops(detections=dets, crops=stacked, errors=errors)

    def _canvas(self, batch: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Resize and pad a batch of equal-sized images; return uint8 ``(B, H', W', 3)``, scale, pad."""
        c = self.config
        h, w = batch.shape[-2:]
        scale = max(1.0, c.detect_min_side / min(h, w))
        scale = min(scale, c.detect_max_side / max(h, w))
        # Never let the shorter side fall below MTCNN's minimum face: its pyramid would be empty.
        scale = max(scale, c.min_face_size / min(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = batch
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
        pad = round(c.detect_pad * max(size))
        if pad > 0:
            x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        canvas = x.mul(255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        # Scale as realised after rounding (per axis they differ by < 1 px; the mean is exact enough).
        realised = (size[0] / h + size[1] / w) / 2
        return canvas, realised, pad

    def _detect_group(self, batch: torch.Tensor) -> tuple[list[Detection | None], int]:
        """Detect on equal-sized images; on an MTCNN failure retry image by image."""
        canvas, scale, pad = self._canvas(clean_pixels(batch))
        try:
            return self._run_mtcnn(canvas, scale, pad), 0
        except Exception as e:  # MTCNN raises RuntimeError/IndexError on degenerate inputs
            if batch.shape[0] == 1:
                log.warning("face detection failed on an image (%s: %s); counted as no face", type(e).__name__, e)
                return [None], 1
        out: list[Detection | None] = []
        errors = 0
        for i in range(batch.shape[0]):
            found, failed = self._detect_group(batch[i : i + 1])
            out.extend(found)
            errors += failed
        return out, errors

    @torch.no_grad()
    def _run_mtcnn(self, canvas: torch.Tensor, scale: float, pad: int) -> list[Detection | None]:
        boxes, probs = self.mtcnn.detect(canvas.to(self.device))
        out: list[Detection | None] = []
        for img_boxes, img_probs in zip(boxes, probs, strict=True):
            best = None
            if img_boxes is not None:
                # Boxes come largest first (select_largest=True); keep the largest confident one.
                for box, prob in zip(img_boxes, img_probs, strict=True):
                    if prob is not None and float(prob) >= self.config.min_face_prob:
                        x1, y1, x2, y2 = ((float(v) - pad) / scale for v in box)
                        best = Detection(prob=float(prob), box=(x1, y1, x2, y2))
                        break
            out.append(best)
        return out


def crop_face(image: torch.Tensor, det: Detection, size: int, margin: int) -> torch.Tensor | None:
    """Cut the face out of ``image`` (``(3, H, W)`` in [0, 1]) as facenet-pytorch's ``extract_face`` does.

    The margin is given in pixels of the output crop and converted to image pixels; the box is
    clamped to the image and resized (bilinear, antialiased) to ``size`` squared.
    Returns None if the clamped box is empty.

    Example:
        >>> crop_face(torch.rand(3, 40, 40), Detection(0.99, (10, 10, 30, 30)), 160, 0).shape
        torch.Size([3, 160, 160])
    """
    x1, y1, x2, y2 = det.box
    mx = margin * (x2 - x1) / (size - margin)
    my = margin * (y2 - y1) / (size - margin)
    h, w = int(image.shape[-2]), int(image.shape[-1])
    left, top = int(max(x1 - mx / 2, 0)), int(max(y1 - my / 2, 0))
    right, bottom = int(min(x2 + mx / 2, w)), int(min(y2 + my / 2, h))
    if right <= left or bottom <= top:
        return None
    face = image[:, top:bottom, left:right].unsqueeze(0).float()
    face = F.interpolate(face, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return face[0].clamp(0.0, 1.0)


def as_image_list(images: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Accept ``(N, 3, H, W)`` or a sequence of ``(3, H, W)``; check the channel count."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
        images = list(images)
    for img in images:
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"expected RGB images of shape (3, H, W), got {tuple(img.shape)}")
    return [img.detach().float().cpu() for img in images]


def clean_pixels(x: torch.Tensor) -> torch.Tensor:
    """Replace NaN/inf (a diverged model can produce them) and clamp to [0, 1]."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
