"""Face pipeline of the identity probe: identity leakage and identity interpolation.

* :mod:`~memwatch.faces.detect`: MTCNN on a padded, upsampled canvas (finds 16-64 px faces), cropping;
* :mod:`~memwatch.faces.embed`: InceptionResnetV1 (``vggface2`` / ``casia-webface``) and the
  detect-crop-embed :class:`FacePipeline`;
* :mod:`~memwatch.faces.gallery`: training identities (labels or clustering) and threshold calibration;
* :mod:`~memwatch.faces.probe`: :func:`identity_probe` (leak and interpolation metrics).

facenet-pytorch is imported only when a detector or matcher is built.

Example:
    >>> cfg = IdentityConfig(weights="weights/vggface2.safetensors")  # doctest: +SKIP
    >>> gallery = build_gallery(load_reference_set("faces.jsonl"), load_face_pipeline(cfg), cfg)  # doctest: +SKIP
    >>> identity_probe(samples, gallery, cfg).metrics["identity_leak_rate"]  # doctest: +SKIP
    0.0
"""

from memwatch.faces.config import MATCHERS, IdentityConfig
from memwatch.faces.detect import Detection, FaceCrops, FaceDetector
from memwatch.faces.embed import (
    FaceEmbeddings,
    FaceMatcher,
    FacePipeline,
    documented_threshold,
    load_face_pipeline,
    resolve_weights,
)
from memwatch.faces.gallery import (
    Calibration,
    FaceGallery,
    build_gallery,
    calibrate_threshold,
    cluster_identities,
    gallery_from_embeddings,
    threshold_at_fmr,
)
from memwatch.faces.probe import PROBE, identity_from_embeddings, identity_probe, match_faces, slerp_position

__all__ = [
    "MATCHERS",
    "PROBE",
    "Calibration",
    "Detection",
    "FaceCrops",
    "FaceDetector",
    "FaceEmbeddings",
    "FaceGallery",
    "FaceMatcher",
    "FacePipeline",
    "IdentityConfig",
    "build_gallery",
    "calibrate_threshold",
    "cluster_identities",
    "documented_threshold",
    "gallery_from_embeddings",
    "identity_from_embeddings",
    "identity_probe",
    "load_face_pipeline",
    "match_faces",
    "resolve_weights",
    "slerp_position",
    "threshold_at_fmr",
]
