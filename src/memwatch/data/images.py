"""Decoding image files and normalising them to a probe's resolution.

The one normalisation rule, used for training images, holdout images and generated images alike:

1. decode with Pillow and apply the EXIF orientation;
2. convert to RGB (palette and grey images are expanded; 16- and 32-bit grey images are scaled to
   8 bits, not clipped; an alpha channel is composited onto white, so transparent areas do not turn
   black; an animated GIF's first frame is used, as the diffusers loaders do);
3. resize so the *shorter* side equals the resolution (bicubic, antialiased), then centre-crop
   to a square ``resolution x resolution``;
4. scale to float32 values in [0, 1], shape ``(3, H, W)``.

This matches how the diffusers training scripts prepare images (``Resize`` + ``CenterCrop``),
so a memorized sample is compared with the training image as the model saw it.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps


def _openable_suffixes() -> tuple[str, ...]:
    """Every suffix Pillow can open: what diffusers' ``imagefolder`` (the ``datasets`` loader) accepts too."""
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


IMAGE_SUFFIXES = _openable_suffixes()


def is_image_path(path: str | Path) -> bool:
    """True if Pillow can open files with ``path``'s suffix (case-insensitive): png, jpg, webp, bmp, gif, tiff...

    Example:
        >>> is_image_path("a.PNG"), is_image_path("b.tiff"), is_image_path("notes.txt")
        (True, True, False)
    """
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to RGB, compositing transparency onto white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Deep grey images: convert("RGB") would clip every value above 255 to white. Scale instead:
        # 16-bit data by 1/257 (65535 -> 255); 32-bit ints and floats by their own maximum.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) <= 65535) else None
        top = top or float(max(arr.max(initial=0), 1e-12))
        img = Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic) and centre-crop a square."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path | BinaryIO, resolution: int) -> torch.Tensor:
    """Decode ``path`` and normalise it by the module's rule.

    Args:
        path: an image file, or a binary file object (an image read from a tar shard or a parquet file).
        resolution: output side length in pixels.

    Returns:
        float32 tensor ``(3, resolution, resolution)`` with values in [0, 1].

    Raises:
        OSError / PIL.UnidentifiedImageError / ValueError when the file cannot be decoded.

    Example:
        >>> load_image("assets/demo/train/000.png", 32).shape  # doctest: +SKIP
        torch.Size([3, 32, 32])
    """
    with Image.open(path) as img:
        img.load()
        rgb = resize_center_crop(to_rgb(img), resolution)
    return pil_to_tensor(rgb)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB Pillow image -> float32 ``(3, H, W)`` tensor in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """``(3, H, W)`` tensor in [0, 1] -> RGB Pillow image (values are clamped and rounded)."""
    arr = x.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, mode="RGB")
