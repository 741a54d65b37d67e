"""Settings of the identity probe: face detection, the face matcher, the threshold and interpolation.

Every default names its source. The verification threshold is normally *calibrated* from the data
(the impostor distribution of the gallery, see :mod:`memwatch.faces.gallery`); the fallback below
only applies when there are too few impostor pairs to estimate the target false-match rate, and
results then say so (``threshold_calibrated = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memwatch.errors import MemwatchError

#: The two InceptionResnetV1 weight sets facenet-pytorch publishes (davidsandberg/facenet models
#: 20180402-114759 trained on VGGFace2 and 20180408-102900 trained on CASIA-WebFace). Both are
#: supported because identity leakage shows for some matchers and not others (Tinsley et al. 2021,
#: "This face does not exist... but it might be yours!").
MATCHERS = ("vggface2", "casia-webface")


@dataclass
class IdentityConfig:
    """Settings of the face pipeline and the identity probe.

    Attributes:
        every: run the identity probe every this many training steps (0: off). It reuses the
            regurgitation probe's samples when both are due.
        matcher: InceptionResnetV1 weights, ``"vggface2"`` or ``"casia-webface"``.
        weights: a local weights file for the matcher (``.safetensors``, or a ``.pt`` state dict read
            with ``torch.load(weights_only=True)``); None looks in the torch hub cache.
        download: allow downloading the matcher weights when they are not cached. Off by default:
            memwatch never touches the network unless told to.
        device: torch device for MTCNN and the matcher; None picks CUDA when available, else the CPU.
        batch_size: face crops per InceptionResnetV1 forward pass.
        detect_batch_size: images per MTCNN pass.
        min_face_size: smallest face MTCNN searches for, in pixels of the detection canvas.
        detect_min_side: images are upsampled so their shorter side is at least this before detection.
        detect_max_side: images are downscaled so their longer side is at most this before detection.
        detect_pad: fraction of the (resized) image side added as padding on every side.
        mtcnn_thresholds: MTCNN's P-, R- and O-net score thresholds.
        min_face_prob: a detection counts as a face only at or above this probability.
        face_size: side of the square face crop fed to InceptionResnetV1.
        face_margin: margin around the detected box, in pixels of the face crop.
        reference_resolution: resolution training/holdout images are normalised to before detection
            (``memwatch.images`` rule); None keeps each image's own size.
        threshold: a fixed verification threshold (cosine similarity); None calibrates it.
        target_fmr: false-match rate the calibrated threshold is chosen for.
        min_impostor_pairs: fewest impostor pairs needed to calibrate; None means ``ceil(1 / target_fmr)``.
        fallback_threshold: threshold used when calibration is impossible.
        balance_tolerance: largest ``|s_A - s_B|`` for a face to count as blending A and B.
        slerp_end_margin: the face's nearest point on the slerp arc between the two identity centroids
            must lie in ``[margin, 1 - margin]`` of the arc (a blend, not either parent alone).
        slerp_min_similarity: cosine similarity between the face and that nearest arc point must be
            at least this; None uses the verification threshold.
        chunk_size: rows compared at a time in pairwise similarity scans (bounds memory).
    """

    # Off unless asked for: the probe needs face-matcher weights (monitor cadence, in training steps).
    every: int = 0
    matcher: str = "vggface2"
    weights: str | None = None
    download: bool = False
    device: str | None = None
    batch_size: int = 32
    detect_batch_size: int = 16
    # facenet-pytorch MTCNN default (min_face_size=20).
    min_face_size: int = 20
    # Generated images can be 16-64 px. Upsampling the shorter side to 160 px (10x for 16 px) turns a
    # face that fills an eighth of the frame or more into >= 20 px, MTCNN's minimum face; it also keeps
    # the canvas above the minimum face size, below which MTCNN's image pyramid is empty and it raises.
    detect_min_side: int = 160
    # Caps detection cost on large photos: MTCNN's pyramid grows with the image area.
    detect_max_side: int = 1024
    # Faces that fill a generated image are cut by its borders. A small border of replicated edge pixels
    # helps MTCNN there (memwatch check: scikit-image's 25 px LFW faces cropped to 19 px, 93/100 found
    # with 10% padding, 89/100 without); larger borders cost detection time without finding more.
    detect_pad: float = 0.1
    # facenet-pytorch MTCNN defaults (thresholds=[0.6, 0.7, 0.7]), from Zhang et al. 2016.
    mtcnn_thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    # facenet-pytorch's own cut-off for a confident face (MTCNN.select_boxes, "largest_over_threshold").
    min_face_prob: float = 0.9
    # InceptionResnetV1 was trained on 160 px crops (facenet-pytorch MTCNN image_size=160).
    face_size: int = 160
    # facenet-pytorch MTCNN default margin (0).
    face_margin: int = 0
    reference_resolution: int | None = None
    threshold: float | None = None
    # A standard face-verification operating point (e.g. IJB-B/IJB-C results are given as TAR at
    # FAR = 1e-4); the product issue's default.
    target_fmr: float = 1e-4
    min_impostor_pairs: int | None = None
    # FaceNet (Schroff et al. 2015, Fig. 1) separates same/different pairs at squared L2 distance 1.1
    # between unit embeddings, i.e. cosine 1 - 1.1 / 2 = 0.45; DeepFace's tuned euclidean_l2 threshold
    # for the same 512-d model as the vggface2 weights (Facenet512: 1.04) gives cosine 0.46.
    fallback_threshold: float = 0.45
    # memwatch heuristic (no published value): a blend matches both parents about equally. Between
    # unrelated parents (orthogonal centroids) and faces at similarity ~0.9 to their own centroid, a
    # slerp blend at factor f has |s_A - s_B| ~ 0.9 * |cos(f * 90deg) - sin(f * 90deg)|, so 0.2 admits
    # blend factors of about 0.4-0.6 around the 0.5 that morphing attacks use; tune it on your data.
    balance_tolerance: float = 0.2
    # Morphing-attack data sets mostly blend two faces at factor 0.5 (Scherhag et al. 2019 survey);
    # the middle half of the arc keeps faces clearly between the parents and excludes those near one.
    slerp_end_margin: float = 0.25
    # The face must verify against the blend itself (same threshold as any verification).
    slerp_min_similarity: float | None = None
    chunk_size: int = 2048

    def __post_init__(self) -> None:
        self.mtcnn_thresholds = tuple(float(t) for t in self.mtcnn_thresholds)  # YAML gives lists
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MemwatchError` naming the first bad setting."""
        if self.matcher not in MATCHERS:
            raise MemwatchError(f"identity.matcher '{self.matcher}' is unknown: choose one of {', '.join(MATCHERS)}")
        for name in ("batch_size", "detect_batch_size", "min_face_size", "face_size", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise MemwatchError(f"identity.{name} must be at least 1, got {getattr(self, name)}")
        if self.detect_min_side < self.min_face_size:
            raise MemwatchError(
                f"identity.detect_min_side ({self.detect_min_side}) must be at least identity.min_face_size "
                f"({self.min_face_size}): MTCNN cannot search images smaller than its minimum face"
            )
        if self.detect_max_side < self.detect_min_side:
            raise MemwatchError("identity.detect_max_side must be at least identity.detect_min_side")
        if not 0.0 <= self.detect_pad <= 2.0:
            raise MemwatchError(f"identity.detect_pad {self.detect_pad} must be a fraction in [0, 2]")
        if len(self.mtcnn_thresholds) != 3 or not all(0.0 <= t <= 1.0 for t in self.mtcnn_thresholds):
            raise MemwatchError("identity.mtcnn_thresholds must be three probabilities in [0, 1]")
        if not 0.0 <= self.min_face_prob <= 1.0:
            raise MemwatchError(f"identity.min_face_prob {self.min_face_prob} must be a probability in [0, 1]")
        if not 0 <= self.face_margin < self.face_size:
            raise MemwatchError("identity.face_margin must be at least 0 and smaller than identity.face_size")
        for name in ("threshold", "fallback_threshold", "slerp_min_similarity"):
            value = getattr(self, name)
            if value is not None and not -1.0 <= value <= 1.0:
                raise MemwatchError(f"identity.{name} {value} is not a cosine similarity: give a value in [-1, 1]")
        if not 0.0 < self.target_fmr < 1.0:
            raise MemwatchError(f"identity.target_fmr {self.target_fmr} must be in (0, 1), e.g. 1e-4")
        if self.min_impostor_pairs is not None and self.min_impostor_pairs < 1:
            raise MemwatchError("identity.min_impostor_pairs must be at least 1 (or null for 1 / target_fmr)")
        if not 0.0 <= self.balance_tolerance <= 2.0:
            raise MemwatchError("identity.balance_tolerance must be in [0, 2]")
        if not 0.0 <= self.slerp_end_margin < 0.5:
            raise MemwatchError("identity.slerp_end_margin must be in [0, 0.5)")
        if self.reference_resolution is not None and self.reference_resolution < 1:
            raise MemwatchError("identity.reference_resolution must be a positive size in pixels (or null)")

    @property
    def required_impostor_pairs(self) -> int:
        """Impostor pairs needed to resolve ``target_fmr``: at least one pair per 1/FMR."""
        if self.min_impostor_pairs is not None:
            return int(self.min_impostor_pairs)
        return math.ceil(1.0 / self.target_fmr - 1e-9)
