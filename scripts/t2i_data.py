"""Captioned photo crops for the text-to-image benchmark: the images, their captions and the words of both.

Every image is a 32x32 window of a public-domain / CC0 photo that ships inside scikit-image (the photos of
``assets/demo/``, listed in ``assets/demo/LICENSE.md``), reduced by block averaging as the demo's crops are.
Its caption says what a person would write about the crop and tells crops apart: the photo's subject, how
far it is zoomed in, its colour, tone and texture, and where in the photo it lies, for example
``a close photo of a cat, orange, dark, smooth, top left``.

The same functions make the broad set the benchmark's base model was pretrained on
(``scripts/make_t2i_base.py``: random crops of two quadrants of each photo, mirrored at random) and each
benchmark run's fine-tuning and held-out sets (``scripts/bench_t2i.py``: distinct crops of the other two
quadrants, each caption unique in its set).

    >>> import numpy as np
    >>> photos = load_photos()
    >>> crop = draw_crop(photos, np.random.default_rng(0), "base")
    >>> crop.image.shape, crop.caption.startswith("a ")
    ((32, 32, 3), True)
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from make_demo_assets import MIN_PIXEL_STD, _skimage_sources, normalised_l2, quantise, to_rgb_float

RESOLUTION = 32
#: the word a caption uses for each photo
SUBJECTS = {
    "astronaut": "astronaut", "chelsea": "cat", "coffee": "coffee", "rocket": "rocket",
    "hubble_deep_field": "galaxies", "retina": "retina", "camera": "cameraman", "horse": "horse", "text": "text",
    "clock": "clock", "cell": "cell", "brick": "bricks", "grass": "grass", "gravel": "gravel",
}  # fmt: skip
ZOOMS = ("close", "medium", "wide")
COLOURS = ("red", "orange", "brown", "yellow", "green", "blue", "purple", "pink", "black", "grey", "white")
TONES = ("dark", "light", "even")
TEXTURES = ("smooth", "detailed")
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")
#: every word a caption can hold (numbers, which make equal captions unique, are spelled digit by digit)
WORDS = sorted(
    {"a", "photo", "of", *SUBJECTS.values(), *ZOOMS, *COLOURS, *TONES, *TEXTURES, *ROWS, *COLUMNS, "mirrored"}
)


@dataclass(frozen=True)
class Crop:
    """One captioned 32x32 crop: uint8 (H, W, 3) pixels and where they came from."""

    image: np.ndarray
    caption: str
    source: str


def load_photos() -> dict[str, np.ndarray]:
    """The photos, float (H, W, 3) in [0, 1], by their ``skimage.data`` name."""
    return {s.name: to_rgb_float(s.load()) for s in _skimage_sources()}


def colour_word(img: np.ndarray) -> str:
    """The colour a person would name for the crop's mean colour (float (H, W, 3) in [0, 1])."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in img.reshape(-1, 3).mean(axis=0)))
    if s < 0.2 or v < 0.15:  # unsaturated or near-black: named by lightness alone
        return "black" if v < 0.25 else "white" if v > 0.8 else "grey"
    hue = h * 360
    if hue < 15 or hue >= 330:
        return "pink" if v > 0.7 and s < 0.5 else "red"
    if hue < 45:
        return "brown" if v < 0.55 else "orange"
    if hue < 70:
        return "yellow"
    if hue < 165:
        return "green"
    if hue < 255:
        return "blue"
    return "purple"


def caption_of(img: np.ndarray, subject: str, share: float, centre: tuple[float, float], mirrored: bool) -> str:
    """The caption of a crop.

    Args:
        img: the crop, float (H, W, 3) in [0, 1].
        subject: the photo's ``skimage.data`` name.
        share: the crop's side over the shorter side of the quadrant it lies in (how far it is zoomed in).
        centre: the crop's centre as (row, column) shares of the photo's height and width.
        mirrored: whether the crop is mirrored left-right (its column is then counted from the right).
    """
    zoom = ZOOMS[0] if share < 0.35 else ZOOMS[1] if share < 0.7 else ZOOMS[2]
    lum = img.mean(axis=2)
    tone = TONES[0] if lum.mean() < 0.3 else TONES[1] if lum.mean() > 0.55 else TONES[2]
    # mean absolute difference of neighbouring pixels: fine detail against smooth areas
    detail = (np.abs(np.diff(lum, axis=0)).mean() + np.abs(np.diff(lum, axis=1)).mean()) / 2
    texture = TEXTURES[1] if detail > 0.06 else TEXTURES[0]
    row = ROWS[min(2, int(centre[0] * 3))]
    column = COLUMNS[min(2, int(centre[1] * 3))]
    words = [f"a {zoom} photo of {SUBJECTS[subject]}", colour_word(img), tone, texture, f"{row} {column}"]
    if mirrored:
        words.append("mirrored")
    return ", ".join(words)


#: Each photo is cut into quadrants: the base model's UNet learns the two on one diagonal (its VAE all four),
#: the fine-tuning sets come from the other two. A fine-tune then teaches the model pictures it has never seen
#: (as fine-tuning Stable Diffusion on one's own photos does), not crops of photos the base model already
#: reproduces: with one pool for both, the base model's samples came within 0.08 (normalised l2) of
#: fine-tuning images before any fine-tuning.
QUADRANTS = {"base": ((0, 0), (1, 1)), "tune": ((0, 1), (1, 0)), "all": ((0, 0), (0, 1), (1, 0), (1, 1))}


def draw_crop(photos: dict[str, np.ndarray], rng: np.random.Generator, part: str, min_share: float = 0.1) -> Crop:
    """One random crop of a random photo: a square window inside one of the photo's quadrants of ``part``
    (``QUADRANTS``), its side a multiple of 32 pixels and at least ``min_share`` of the quadrant's shorter side,
    reduced to 32x32 by block averaging, mirrored half the time."""
    names = sorted(photos)
    name = names[int(rng.integers(len(names)))]
    photo = photos[name]
    h, w, _ = photo.shape
    qr, qc = QUADRANTS[part][int(rng.integers(len(QUADRANTS[part])))]
    qh, qw = h // 2, w // 2
    k_max = min(qh, qw) // RESOLUTION
    k_min = max(1, min(k_max, int(np.ceil(min_share * min(qh, qw) / RESOLUTION))))
    side = RESOLUTION * int(rng.integers(k_min, k_max + 1))
    top = qr * qh + int(rng.integers(0, qh - side + 1))
    left = qc * qw + int(rng.integers(0, qw - side + 1))
    k = side // RESOLUTION
    img = photo[top : top + side, left : left + side].reshape(RESOLUTION, k, RESOLUTION, k, 3).mean(axis=(1, 3))
    mirrored = bool(rng.random() < 0.5)
    centre_col = (left + side / 2) / w
    if mirrored:
        img, centre_col = img[:, ::-1], 1 - centre_col
    caption = caption_of(img, name, side / min(qh, qw), ((top + side / 2) / h, centre_col), mirrored)
    return Crop(quantise(img), caption, name)


#: Photos of a texture, not a subject: every crop of one looks like every other (nearest neighbours 0.10-0.12
#: apart, normalised l2), and the VAE reconstructs their fine grain least well (0.05-0.06 against 0.03), so a
#: perfect copy of one would not pass the ratio test. They train the base model, not the fine-tunes.
TEXTURES_ONLY = ("brick", "grass", "gravel")
#: Fine-tuning images are at least this far apart (normalised l2 on [0, 1]; the demo's rule is 0.1), eight times
#: the VAE's median reconstruction error (0.03), so that the VAE's round trip of each image passes the ratio test
#: as a copy of it with room to spare (worst d1/d2 0.24-0.29 at n = 64 and 256; at 0.2 up to 0.32, at the demo's
#: 0.1 up to 0.60: tests/test_t2i_base.py).
MIN_SET_DISTANCE = 0.25


def distinct_crops(photos: dict[str, np.ndarray], rng: np.random.Generator, count: int,
                   avoid: list[Crop] = ()) -> list[Crop]:  # fmt: skip
    """``count`` crops of the subject photos (not ``TEXTURES_ONLY``), taken in turn, that are neither near-flat
    nor within ``MIN_SET_DISTANCE`` of one another or of ``avoid``, each caption unique among them and
    ``avoid``: a caption that repeats gets the number of its repeat appended (``..., top left, 2``)."""
    sources = [name for name in sorted(photos) if name not in TEXTURES_ONLY]
    taken = [c.image for c in avoid]
    seen = {c.caption for c in avoid}
    out: list[Crop] = []
    while len(out) < count:
        if not sources:
            raise RuntimeError(f"could not draw {count} distinct crops (drew {len(out)})")
        name = sources[len(out) % len(sources)]  # the photos in turn: a set as varied as its images allow
        for _ in range(100):
            crop = draw_crop({name: photos[name]}, rng, "tune", min_share=0.25)
            if crop.image.astype(np.float64).std() / 255.0 < MIN_PIXEL_STD:
                continue
            if taken and normalised_l2(crop.image, np.stack(taken)).min() < MIN_SET_DISTANCE:
                continue
            caption, repeat = crop.caption, 1
            while caption in seen:
                repeat += 1
                caption = f"{crop.caption}, {repeat}"
            seen.add(caption)
            taken.append(crop.image)
            out.append(Crop(crop.image, caption, crop.source))
            break
        else:  # this photo has no room left for another distinct crop
            sources.remove(name)
    return out
