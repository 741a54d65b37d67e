"""Face-model fixtures shared by the face tests: real images and InceptionResnetV1 weights written here."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data


def rgb_tensor(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(arr)).float()
    x = x / 255.0 if x.max() > 1.0 else x
    x = x.unsqueeze(-1).repeat(1, 1, 3) if x.ndim == 2 else x[..., :3]
    return x.permute(2, 0, 1).contiguous()


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)[0]


def face_state_dict() -> dict[str, torch.Tensor]:
    """InceptionResnetV1 at a fixed random init, last batch-norm re-centred on LFW crops (see the face tests)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    model = InceptionResnetV1().eval()
    lfw = data.lfw_subset()
    crops = F.interpolate(torch.stack([rgb_tensor(lfw[i]) for i in range(0, 80, 5)]), size=(160, 160), mode="bilinear")
    feats: list[torch.Tensor] = []
    hook = model.last_linear.register_forward_hook(lambda mod, inp, out: feats.append(out))
    with torch.no_grad():
        model((crops * 255 - 127.5) / 128)
    hook.remove()
    model.last_bn.running_mean.copy_(feats[0].mean(0))
    model.last_bn.running_var.copy_(feats[0].var(0))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


# --- the real portraits of assets/faces (sources in assets/faces/LICENSE.md) -------------------------

PORTRAITS = {
    "obama_2012_official": "barack_obama",
    "obama_blue_room": "barack_obama",
    "biden_2013_official": "joe_biden",
    "biden_blue_room": "joe_biden",
    "collins_astronaut": "eileen_collins",
}


def portrait(name: str):
    """One portrait of ``assets/faces`` as an RGB PIL image."""
    from pathlib import Path

    from PIL import Image

    return Image.open(Path(__file__).resolve().parents[2] / "assets" / "faces" / f"{name}.jpg").convert("RGB")


def pil_tensor(image) -> torch.Tensor:
    """A PIL image as ``(3, H, W)`` in [0, 1]."""
    return rgb_tensor(np.array(image))


def small_copy(image, box, size: int = 64, face_fraction: float = 0.5, shift: tuple[int, int] = (2, 1)):
    """A ``size`` px square copy of a photo whose face (``box``) is ``face_fraction`` of the width,
    shifted by ``shift`` output pixels: a generated image that reproduces a training face."""
    from PIL import Image

    x1, y1, x2, y2 = box
    side = (x2 - x1) / face_fraction
    pad = int(side)  # edge pixels repeated around the photo, so the square may run past its borders
    padded = Image.fromarray(np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    cx = (x1 + x2) / 2 + shift[0] * side / size + pad
    cy = (y1 + y2) / 2 + shift[1] * side / size + pad
    area = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return padded.resize((size, size), Image.Resampling.BICUBIC, box=area)


def aligned_morph(a, box_a, b, box_b, *, weight: float = 0.5, size: int = 64, chip: int = 256):
    """A landmark-aligned morph of two faces: each face is aligned to dlib's 5-point template (eyes
    and nose put at the same places, ``dlib.get_face_chip``), the aligned chips are blended
    ``weight : 1 - weight`` pixel by pixel, and the blend is resized to ``size`` px."""
    import dlib
    from PIL import Image

    from memwatch.faces.dlib_matcher import LANDMARKS_FILE, find_model_dir

    predictor = dlib.shape_predictor(str(find_model_dir(None) / LANDMARKS_FILE))

    def aligned(image, box) -> np.ndarray:
        pixels = np.asarray(image)
        shape = predictor(pixels, dlib.rectangle(*(round(v) for v in box)))
        return np.asarray(dlib.get_face_chip(pixels, shape, size=chip, padding=0.5), dtype=np.float32)

    blend = weight * aligned(a, box_a) + (1.0 - weight) * aligned(b, box_b)
    return Image.fromarray(blend.round().clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)


def plain_average(a, b, size: tuple[int, int] = (256, 320)):
    """The pixel average of two photos resized to one size, faces not aligned."""
    from PIL import Image

    x = (np.asarray(a.resize(size), dtype=np.float32) + np.asarray(b.resize(size), dtype=np.float32)) / 2
    return Image.fromarray(x.round().astype(np.uint8))
