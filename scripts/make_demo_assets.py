"""Build the image sets that ``memwatch demo`` trains and probes on.

The demo needs three small sets of 32x32 RGB images:

- ``assets/demo/train/``   a few visually distinct images; a tiny DDPM trained on them memorizes them
  within minutes on a CPU, so the demo can show ``mem_fraction`` rising;
- ``assets/demo/holdout/`` images made the same way that are *not* in the training set (non-members,
  for the membership probes and as a sanity check that unseen images are not flagged);
- ``assets/demo/control/`` the training images plus many more crops; a model trained on it for the same
  number of steps does not memorize (memorization onset moves later with training-set size,
  Bonnaire et al. 2025), so the control run's curve stays at zero.

Every image is a crop of a photo that ships inside scikit-image (``skimage.data``) and is public domain or
CC0 according to its docstring; ``assets/demo/LICENSE.md`` lists each source. Crops are square windows whose
side is a multiple of 32, reduced to 32x32 by averaging k x k pixel blocks in numpy, so
the pixels do not depend on an image library's resampling code. A fixed seed makes the output identical on
every run (the PNG bytes depend only on Pillow's zlib settings, which are fixed here).

Usage:
    .venv/bin/python scripts/make_demo_assets.py            # writes assets/demo/
    .venv/bin/python scripts/make_demo_assets.py --out DIR  # writes elsewhere

scikit-image is a test extra of memwatch (``pip install -e .[test]``); it is only needed to rebuild the assets,
never to run the demo.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RESOLUTION = 32  # demo model's sample_size
SEED = 20240601  # fixed so that re-running gives identical files
N_HOLDOUT = 16
N_CONTROL_EXTRA = 376  # control = the 8 training images + these = 384 images

# A crop covers between this share of the photo's shorter side and all of it: large enough that a crop
# still shows the photo's subject (recognisable evidence pairs), small enough to give many distinct views.
MIN_CROP_SHARE = 0.5
CONTROL_MIN_CROP_SHARE = 0.25  # control crops may zoom in further, for variety

# Crops whose pixel std is below this are near-flat (sky, black background) and are skipped.
MIN_PIXEL_STD = 0.06

# Minimum normalised l2 (l2 / sqrt(H*W*C) on [0, 1] images, the metric of mem_fraction) between any two
# images of the demo. Near-duplicates would make the ratio test d(x, NN1) / d(x, NN2) < 1/3 (Gu et al. 2023)
# blind: a copy of one image would also be close to its near-duplicate. Shifting a 32x32 training view by
# one pixel moves it 0.07-0.25 (measured on assets/demo/train), so 0.1 only rejects near-copies.
MIN_PAIR_DISTANCE = 0.1


@dataclass(frozen=True)
class Source:
    """One photo from ``skimage.data`` and the licence its docstring states."""

    name: str
    load: Callable[[], np.ndarray]
    title: str
    licence: str
    credit: str


def _skimage_sources() -> list[Source]:
    """The public-domain / CC0 photos of ``skimage.data`` that are stored inside the package."""
    from skimage import data  # lazy: only this script needs scikit-image

    return [
        Source(
            "astronaut",
            data.astronaut,
            "Eileen Collins, NASA astronaut",
            "Public domain",
            "NASA Great Images database (https://flic.kr/p/r9qvLn)",
        ),
        Source("chelsea", data.chelsea, "Chelsea the cat", "CC0", "Stefan van der Walt"),
        Source("coffee", data.coffee, "Coffee cup", "CC0", "Rachel Michetti (courtesy of Pikolo Espresso Bar)"),
        Source(
            "rocket",
            data.rocket,
            "Launch of DSCOVR on Falcon 9",
            "Public domain",
            "SpaceX (https://www.flickr.com/photos/spacexphotos/16511594820/)",
        ),
        Source(
            "hubble_deep_field",
            data.hubble_deep_field,
            "Hubble eXtreme Deep Field",
            "Public domain",
            "NASA (http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/)",
        ),
        Source(
            "retina",
            data.retina,
            "Fundus photograph of a normal left eye",
            "CC0 1.0",
            "Mikael Häggström, via Wikimedia Commons",
        ),
        Source("camera", data.camera, "Cameraman", "CC0", "Lav Varshney"),
        Source(
            "horse",
            data.horse,
            "Horse silhouette",
            "CC0",
            "Andreas Preuss (marauder), openclipart (http://openclipart.org/detail/158377/horse-by-marauder)",
        ),
        Source(
            "text",
            data.text,
            "Text for corner detection",
            "Public domain",
            "Wikipedia (https://en.wikipedia.org/wiki/File:Corner.png)",
        ),
        Source("clock", data.clock, "Motion-blurred wall clock", "Public domain", "Stefan van der Walt"),
        Source(
            "cell",
            data.cell,
            "Cell floating in saline (quantitative phase image)",
            "CC0",
            "Müller, Schürmann, Girardo, Cojoc, Guck, Optics Express 26(8) 2018 (doi:10.1364/OE.26.010729)",
        ),
        Source("brick", data.brick, "Brick wall", "CC0", "CC0Textures (https://cc0textures.com/view.php?tex=Bricks25)"),
        Source(
            "grass",
            data.grass,
            "Grass",
            "CC0",
            "linolafett, DeviantArt (https://www.deviantart.com/linolafett/art/Grass-01-434853879)",
        ),
        Source("gravel", data.gravel, "Gravel", "CC0", "CC0Textures (https://cc0textures.com/view.php?tex=Gravel04)"),
    ]


# The training set takes one centred view of each of these photos: colourful or high-contrast subjects that
# look different from one another even at 32x32 (every pair is >= 0.25 apart in normalised l2), so a sample
# that copies one of them passes the ratio test clearly. Eight, not more: memorization onset moves later
# with training-set size (Bonnaire et al. 2025), and the demo must show it within a few CPU minutes.
# The number is the side in source pixels of the centred square (None = the largest square): the deep
# field seen whole at 32x32 is near-black, so it is zoomed in. The low-contrast grey photos (text, clock,
# cell, brick, grass, gravel) only feed the holdout and control sets.
TRAIN_VIEWS: tuple[tuple[str, int | None], ...] = (
    ("astronaut", None), ("chelsea", None), ("coffee", None), ("rocket", None),
    ("hubble_deep_field", 256), ("retina", None), ("camera", None), ("horse", None),
)  # fmt: skip


def to_rgb_float(arr: np.ndarray) -> np.ndarray:
    """Any skimage.data array -> float64 (H, W, 3) in [0, 1]."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64) / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr[:, :, :3]


def block_reduce(window: np.ndarray, size: int) -> np.ndarray:
    """Average ``k x k`` pixel blocks of a square window of side ``k * size`` down to ``size x size``."""
    k = window.shape[0] // size
    return window.reshape(size, k, size, k, 3).mean(axis=(1, 3))


def random_crop(photo: np.ndarray, rng: np.random.Generator, min_share: float) -> np.ndarray:
    """A random square window (side a multiple of RESOLUTION) reduced to RESOLUTION x RESOLUTION."""
    h, w, _ = photo.shape
    k_max = min(h, w) // RESOLUTION
    k_min = max(1, min(k_max, int(np.ceil(min_share * min(h, w) / RESOLUTION))))
    side = RESOLUTION * int(rng.integers(k_min, k_max + 1))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return block_reduce(photo[top : top + side, left : left + side], RESOLUTION)


def centre_view(photo: np.ndarray, side: int | None = None) -> np.ndarray:
    """A centred square of ``side`` pixels (default: the largest multiple of RESOLUTION that fits),
    reduced to RESOLUTION x RESOLUTION."""
    h, w, _ = photo.shape
    side = side or RESOLUTION * (min(h, w) // RESOLUTION)
    top, left = (h - side) // 2, (w - side) // 2
    return block_reduce(photo[top : top + side, left : left + side], RESOLUTION)


def quantise(img: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8, the way the PNG will store it."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def normalised_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """l2 / sqrt(H*W*C) between uint8 image ``a`` and each image of stack ``b``, on [0, 1] values."""
    diff = b.reshape(len(b), -1).astype(np.float64) / 255.0 - a.reshape(1, -1).astype(np.float64) / 255.0
    return np.sqrt((diff**2).mean(axis=1))


class Pool:
    """Accepted images so far, so that every new image is kept away from all earlier ones."""

    def __init__(self) -> None:
        self.images: list[np.ndarray] = []

    def admits(self, img: np.ndarray) -> bool:
        if img.astype(np.float64).std() / 255.0 < MIN_PIXEL_STD:
            return False
        if not self.images:
            return True
        return bool(normalised_l2(img, np.stack(self.images)).min() >= MIN_PAIR_DISTANCE)

    def add(self, img: np.ndarray) -> None:
        self.images.append(img)


def draw(
    photos: dict[str, np.ndarray],
    names: list[str],
    pool: Pool,
    rng: np.random.Generator,
    count: int,
    min_share: float,
    flips: bool,
) -> list[tuple[str, np.ndarray]]:
    """Draw ``count`` random crops (source chosen uniformly) that the pool admits."""
    out: list[tuple[str, np.ndarray]] = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 200 * count:  # the thresholds above leave far more room than this needs
            raise RuntimeError(f"could not draw {count} distinct crops; lower MIN_PAIR_DISTANCE")
        name = names[int(rng.integers(len(names)))]
        img = random_crop(photos[name], rng, min_share)
        if flips and rng.random() < 0.5:
            img = img[:, ::-1]
        img = quantise(img)
        if pool.admits(img):
            pool.add(img)
            out.append((name, img))
    return out


def write_set(folder: Path, items: list[tuple[str, np.ndarray]]) -> None:
    """Write ``NNN_source.png`` files (sorted names give the drawing order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, img) in enumerate(items):
        # Fixed compression settings and no metadata: identical bytes on every run.
        Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(
            folder / f"{i:03d}_{name}.png", format="PNG", optimize=False, compress_level=9
        )


def licence_text(sources: list[Source], counts: dict[str, dict[str, int]]) -> str:
    rows = "\n".join(
        f"| `{s.name}` | {s.title} | {s.credit} | {s.licence} | "
        f"{counts['train'].get(s.name, 0)} | {counts['holdout'].get(s.name, 0)} | {counts['control'].get(s.name, 0)} |"
        for s in sources
    )
    return f"""# Demo images: sources and licence

Every image under `assets/demo/` is a 32x32 crop of one of the photos below, which ship inside the
scikit-image package (`skimage.data`). Each photo's licence is the one its `skimage.data` docstring states
(scikit-image {_skimage_version()}); only photos that are in the public domain or dedicated to it under CC0
are used.

The crops (square windows reduced by block averaging, some mirrored left-right) are derived works and are
distributed under the same terms as their source photo: public domain / CC0 1.0
(https://creativecommons.org/publicdomain/zero/1.0/). The file name of each crop ends with its source.

They were made by `scripts/make_demo_assets.py` (fixed seed {SEED}); re-running it rebuilds them.

| source | subject | author / origin | licence | train | holdout | control |
|---|---|---|---|---|---|---|
{rows}

`control/` holds the {len(TRAIN_VIEWS)} training images (same pixels) plus {N_CONTROL_EXTRA} further crops.
"""


def _skimage_version() -> str:
    import skimage

    return skimage.__version__


def build(out: Path) -> dict[str, int]:
    """Write train/, holdout/, control/ and LICENSE.md under ``out``; return image counts per set."""
    sources = _skimage_sources()
    photos = {s.name: to_rgb_float(s.load()) for s in sources}
    all_names = [s.name for s in sources]
    rng = np.random.default_rng(SEED)

    pool = Pool()
    # Training set: the whole (centred) view of each chosen photo, the most recognisable 32x32 picture of it.
    train = []
    for name, side in TRAIN_VIEWS:
        img = quantise(centre_view(photos[name], side))
        if not pool.admits(img):
            raise RuntimeError(f"training view of {name} is flat or too close to another")
        pool.add(img)
        train.append((name, img))
    # Holdout: the same kind of views (large crops, no flips) from all photos, kept apart from the training set.
    holdout = draw(photos, all_names, pool, rng, N_HOLDOUT, MIN_CROP_SHARE, flips=False)
    # Control: the training images plus many more crops and mirrored crops, apart from train and holdout.
    control = train + draw(photos, all_names, pool, rng, N_CONTROL_EXTRA, CONTROL_MIN_CROP_SHARE, flips=True)

    if out.exists():
        for sub in ("train", "holdout", "control"):
            shutil.rmtree(out / sub, ignore_errors=True)
    sets = {"train": train, "holdout": holdout, "control": control}
    for sub, items in sets.items():
        write_set(out / sub, items)
    counts = {sub: {} for sub in sets}
    for sub, items in sets.items():
        for name, _ in items:
            counts[sub][name] = counts[sub].get(name, 0) + 1
    (out / "LICENSE.md").write_text(licence_text(sources, counts), encoding="utf-8")
    return {sub: len(items) for sub, items in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=root / "assets" / "demo", help="output folder")
    args = parser.parse_args()
    counts = build(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {counts} to {args.out} ({size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
