"""The training set of ``memwatch demo --faces``: augmented face crops of the bundled portraits.

Each portrait of ``assets/faces`` (public domain; sources in its ``LICENSE.md``) is cut into a few
square crops centred on its face, each shifted and scaled a little at random, and resized to the
demo's resolution. The crops are written as a diffusers ``imagefolder`` whose ``metadata.jsonl``
gives each crop's person (``identity``), so the identity probe's gallery has real labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from memwatch.errors import MemwatchError

#: The face is this share of the crop's side: about 29 px in a 48 px crop. dlib verifies faces of that
#: size reliably (docs/benchmarks.md, "Faces with the real matcher"); at 32 px crops, faces of ~19 px
#: drift towards the threshold.
FACE_SHARE = 0.6
#: Random shift (share of the crop's side) and scale of each augmented crop.
SHIFT = 0.06
SCALE = (0.92, 1.08)


def make_face_training_set(
    portraits: Path, dest: Path, *, resolution: int, crops_per_photo: int, seed: int = 0
) -> list[dict]:
    """Write augmented face crops of every portrait listed in ``portraits/faces.jsonl`` into ``dest``.

    Args:
        portraits: folder with the photos and ``faces.jsonl`` (``path`` and ``identity`` per line).
        dest: output folder (created); gets the crops as PNG and ``metadata.jsonl``.
        resolution: side of the square crops in pixels.
        crops_per_photo: augmented crops per photo (the first is centred, unscaled).
        seed: seed of the augmentations.

    Returns:
        The metadata rows written (``file_name``, ``identity``, ``source``).

    Raises:
        MemwatchError: the manifest is missing, or a photo has no detectable face.

    Example:
        >>> rows = make_face_training_set(Path("assets/faces"), Path("/tmp/faces-train"), resolution=48,
        ...                               crops_per_photo=4)  # doctest: +SKIP
        >>> len(rows), rows[0]["identity"]  # doctest: +SKIP
        (20, 'barack_obama')
    """
    import torch

    from memwatch.faces.config import IdentityConfig
    from memwatch.faces.detect import FaceDetector

    manifest = portraits / "faces.jsonl"
    if not manifest.is_file():
        raise MemwatchError(f"{manifest} is missing: the faces demo needs the bundled portraits")
    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    photos = [Image.open(portraits / e["path"]).convert("RGB") for e in entries]
    tensors = [torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255.0 for p in photos]
    detections, _ = FaceDetector(IdentityConfig()).detect(tensors)
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry, photo, det in zip(entries, photos, detections, strict=True):
        if det is None:
            raise MemwatchError(f"{portraits / entry['path']}: no face found; the faces demo needs one per portrait")
        x1, y1, x2, y2 = det.box
        side0 = max(x2 - x1, y2 - y1) / FACE_SHARE
        for k in range(crops_per_photo):
            shift = (0.0, 0.0) if k == 0 else rng.uniform(-SHIFT, SHIFT, 2)
            side = side0 * (1.0 if k == 0 else rng.uniform(*SCALE))
            cx, cy = (x1 + x2) / 2 + shift[0] * side, (y1 + y2) / 2 + shift[1] * side
            crop = square_crop(photo, (cx, cy), side, resolution)
            name = f"{Path(entry['path']).stem}_{k}.png"
            crop.save(dest / name)
            rows.append({"file_name": name, "identity": entry["identity"], "source": entry["path"]})
    (dest / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def square_crop(photo: Image.Image, centre: tuple[float, float], side: float, resolution: int) -> Image.Image:
    """The square of ``side`` pixels around ``centre``, edge pixels repeated where it runs past the photo,
    resized to ``resolution`` (Lanczos).

    Example:
        >>> square_crop(Image.new("RGB", (40, 30)), (5.0, 5.0), 20.0, 8).size
        (8, 8)
    """
    pad = int(np.ceil(side))
    padded = Image.fromarray(np.pad(np.asarray(photo), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    cx, cy = centre[0] + pad, centre[1] + pad
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return padded.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
