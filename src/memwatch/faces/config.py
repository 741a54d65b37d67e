"""Settings of the identity probe: face detection, the face matcher, the threshold and interpolation.

Every default names its source. The verification threshold is normally *calibrated* from the data
(the impostor distribution of the gallery, see :mod:`memwatch.faces.gallery`); the fallback below
only applies when there are too few impostor pairs to estimate the target false-match rate, and
results then say so (``threshold_calibrated = 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memwatch.core.probe import ProbeSettings
from memwatch.settings import setting

#: Face matchers. ``dlib``: dlib's ResNet descriptor (installed with ``memwatch[faces]``, offline;
#: :mod:`memwatch.faces.dlib_matcher`). ``vggface2`` / ``casia-webface``: the two InceptionResnetV1
#: weight sets facenet-pytorch publishes (davidsandberg/facenet models 20180402-114759 and
#: 20180408-102900), which must be in the torch hub cache or a local file. Several are offered because
#: identity leakage shows for some matchers and not others (Tinsley et al. 2021, "This face does not
#: exist... but it might be yours!"). ``auto``: dlib when installed, else vggface2.
MATCHERS = ("auto", "dlib", "vggface2", "casia-webface")


@dataclass
class IdentityConfig(ProbeSettings):
    """Settings of the face pipeline and the identity probe (each declared with its source below)."""

    section = "probes.identity"
    every: int | None = setting(
        0,
        "run every this many training steps (0: off; null: whenever the shared samples are drawn, sampling.every); "
        "it reads the shared samples (same seeds as the regurgitation probe)",
        min=0,
        unit="steps",
        source="off unless asked for: the probe needs face-matcher weights",
    )
    matcher: str = setting(
        "auto",
        "face matcher: dlib (offline, memwatch[faces]), vggface2 or casia-webface (InceptionResnetV1 weights); "
        "auto: dlib when installed (and weights is not a FaceNet file), else vggface2",
        choices=MATCHERS,
        source="dlib's ResNet descriptor ships with face_recognition_models (public domain) and needs no download; "
        "leakage shows for some matchers only (Tinsley et al. 2021)",
    )
    weights: str | None = setting(
        None,
        "dlib: a folder holding its two model files (null: the face_recognition_models package); FaceNet: a "
        "local weights file (.safetensors, or a .pt state dict; null: the torch hub cache)",
        path=True,
    )
    download: bool = setting(False, "allow downloading matcher weights that are not cached (never by default)")
    device: str | None = setting(None, "torch device for MTCNN and the matcher; null: CUDA when available, else CPU")
    batch_size: int = setting(32, "face crops per InceptionResnetV1 forward pass", min=1)
    detect_batch_size: int = setting(16, "images per MTCNN pass", min=1)
    min_face_size: int = setting(
        20, "smallest face MTCNN searches for", min=1, unit="pixels", source="facenet-pytorch MTCNN default"
    )
    detect_min_side: int = setting(
        160,
        "images are upsampled so their shorter side is at least this before detection",
        min=1,
        unit="pixels",
        source="memwatch: 16 px generated faces become >= 20 px, MTCNN's minimum face, and the canvas stays above "
        "it (MTCNN's image pyramid is empty below)",
    )
    detect_max_side: int = setting(
        1024,
        "images are downscaled so their longer side is at most this before detection",
        min=1,
        unit="pixels",
        source="caps detection cost on large photos (MTCNN's pyramid grows with the image area)",
    )
    detect_pad: float = setting(
        0.1,
        "fraction of the (resized) image side added as replicated-edge padding on every side",
        min=0.0,
        max=2.0,
        source="memwatch check: scikit-image's 25 px LFW faces cropped to 19 px, 93/100 found with 10% padding, "
        "89/100 without",
    )
    mtcnn_thresholds: tuple[float, float, float] = setting(
        (0.6, 0.7, 0.7),
        "MTCNN's P-, R- and O-net score thresholds",
        min=0.0,
        max=1.0,
        source="facenet-pytorch MTCNN defaults, from Zhang et al. 2016",
    )
    min_face_prob: float = setting(
        0.9,
        "a detection counts as a face only at or above this probability",
        min=0.0,
        max=1.0,
        threshold=True,
        source="facenet-pytorch's own cut-off for a confident face (MTCNN select_boxes)",
    )
    face_size: int = setting(
        160, "side of the square face crop fed to the FaceNet matcher (dlib aligns its own 150 px chips)", min=1,
        unit="pixels",
        source="InceptionResnetV1 was trained on 160 px crops (facenet-pytorch MTCNN image_size=160)",
    )  # fmt: skip
    face_margin: int = setting(
        0, "margin around the detected box", min=0, unit="pixels", source="facenet-pytorch MTCNN default"
    )
    reference_resolution: int | None = setting(
        None, "normalise training faces to this resolution before detection (null: their own size)", min=1
    )
    threshold: float | None = setting(
        None,
        "fixed verification threshold (cosine similarity); null: calibrate at target_fmr",
        min=-1.0,
        max=1.0,
        threshold=True,
        source="null: the face verification threshold is calibrated on the gallery's impostor pairs at target_fmr",
    )
    target_fmr: float = setting(
        1e-4,
        "false-match rate of the calibrated threshold",
        min=0.0,
        max=1.0,
        exclusive=True,
        threshold=True,
        source="false-match rate 1e-4: the TAR@FAR=1e-4 operating point of face verification benchmarks (IJB-B/IJB-C)",
    )
    min_impostor_pairs: int | None = setting(
        None, "fewest impostor pairs needed to calibrate (null: ceil(1 / target_fmr))", min=1
    )
    fallback_threshold: float | None = setting(
        None,
        "threshold used when there are too few impostor pairs to calibrate (null: the matcher's documented one)",
        min=-1.0,
        max=1.0,
        threshold=True,
        source="dlib: its same-person distance 0.6 as a cosine, 0.907 (faces/dlib_matcher.py); FaceNet (Schroff et "
        "al. 2015): squared l2 1.1 between unit embeddings, i.e. cosine 0.45",
    )
    balance_tolerance: float = setting(
        0.2,
        "largest |s_A - s_B| for a face to count as blending identities A and B",
        min=0.0,
        max=2.0,
        threshold=True,
        source="memwatch heuristic (faces/config.py): a blend matches both parents about equally",
    )
    slerp_end_margin: float = setting(
        0.25,
        "a blend's nearest point on the A-B slerp arc must lie in [margin, 1 - margin]",
        min=0.0,
        max=0.5,
        threshold=True,
        source="morphing data sets blend two faces at 0.5 (Scherhag et al. 2019): the middle half of the A-B slerp arc",
    )
    slerp_min_similarity: float | None = setting(
        None, "a blend must verify against its nearest arc point at this similarity (null: the threshold)",
        min=-1.0, max=1.0,
    )  # fmt: skip
    chunk_size: int = setting(2048, "rows compared at a time in pairwise similarity scans (bounds memory)", min=1)
    instance: tuple[str, ...] = setting(
        (),
        "training identities the fine-tune is meant to learn (the subject of a DreamBooth or LoRA run, by identity "
        "label): faces of them count as instance_faces, kept apart from leaks of anyone else, which the leak "
        "metrics, the leak forecast and the leak rules count; a blend of them with another person is still a blend",
    )
    paths: int = setting(
        3,
        "pairs of training people whose identity path is drawn at each probe: faces generated between a seed that "
        "reproduces one person and a seed that reproduces the other (faces/paths.py; unconditional models); 0: off",
        min=0,
        source="memwatch (issue 24): the ability to blend two people, tested actively instead of waiting for a "
        "lucky sample; 3 pairs cost 3 x (path_points - 2) extra samples a probe",
    )
    path_points: int = setting(
        9,
        "faces along each identity path, its two ends (the shared samples that reproduce each person) included",
        min=3,
        source="memwatch: 7 faces between the ends, mixtures every 1/8 of the way, as the path test's morphs",
    )

    def check(self) -> None:
        if self.detect_min_side < self.min_face_size:
            raise self.invalid(
                "detect_min_side",
                f"({self.detect_min_side}) must be at least probes.identity.min_face_size ({self.min_face_size}): "
                "MTCNN cannot search images smaller than its minimum face",
            )
        if self.detect_max_side < self.detect_min_side:
            raise self.invalid("detect_max_side", "must be at least probes.identity.detect_min_side")
        if self.face_margin >= self.face_size:
            raise self.invalid("face_margin", "must be smaller than probes.identity.face_size")
        if self.slerp_end_margin >= 0.5:
            raise self.invalid("slerp_end_margin", "must be below 0.5 (the arc's middle)")

    @property
    def resolved_matcher(self) -> str:
        """The matcher used: ``matcher``, with ``auto`` resolved: vggface2 when ``weights`` names a file
        (FaceNet weights; dlib's are a folder), else dlib when installed, else vggface2."""
        if self.matcher != "auto":
            return self.matcher
        from pathlib import Path

        from memwatch.faces.dlib_matcher import dlib_available

        if self.weights and not Path(self.weights).expanduser().is_dir():
            return "vggface2"
        return "dlib" if dlib_available() else "vggface2"

    @property
    def required_impostor_pairs(self) -> int:
        """Impostor pairs needed to resolve ``target_fmr``: at least one pair per 1/FMR."""
        if self.min_impostor_pairs is not None:
            return int(self.min_impostor_pairs)
        return math.ceil(1.0 / self.target_fmr - 1e-9)
