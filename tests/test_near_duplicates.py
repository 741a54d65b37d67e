"""Near duplicates on real photos: re-encoded, shifted, resized and cropped copies are grouped with their
photo, and nothing else is (other photos of the same person, low-contrast textures, smooth photos)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from memwatch.cli import main
from memwatch.data.near_duplicates import aligned_similarity, describe, near_duplicate_pairs, thumbnails

data = pytest.importorskip("skimage.data", reason="the real photos ship inside scikit-image (memwatch[test])")

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT / "assets" / "faces"
COPIED = ["astronaut", "coffee", "camera", "obama_2012_official"]
# Distinct photos that must stay alone: the other photo of the same person, photos of other people, smooth
# photos and low-contrast textures (whole-image distances put these closest together).
ALONE = ["obama_blue_room", "biden_2013_official", "biden_blue_room", "chelsea", "rocket", "retina",
         "hubble_deep_field", "clock", "cell", "brick", "grass", "gravel", "text"]  # fmt: skip


def photo(name: str) -> Image.Image:
    if (FACES / f"{name}.jpg").exists():
        return Image.open(FACES / f"{name}.jpg").convert("RGB")
    a = getattr(data, name)()
    return Image.fromarray(a if a.dtype == np.uint8 else (a * 255).astype(np.uint8)).convert("RGB")


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def copies(img: Image.Image) -> dict[str, Image.Image]:
    """What a scraped data set holds of one photo (other settings than the benchmark's)."""
    w, h = img.size
    return {
        "reencoded.jpg": jpeg(img, 60),
        "shift2.png": img.crop((0, 2, w - 2, h)),  # moved 2 px right and up
        "shift4.png": img.crop((4, 0, w, h - 4)),
        "resized.png": img.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BICUBIC),
        "cropped.png": img.crop((0, round(h * 0.06), round(w * 0.94), h)),  # 6% off the top and the right
    }


def test_memwatch_data_groups_each_photo_with_its_copies_and_nothing_else(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    expected = set()
    for name in COPIED:
        img = photo(name)
        img.save(folder / f"{name}.png")
        for suffix, copy in copies(img).items():
            copy.save(folder / f"{name}_{suffix}")
        expected.add(frozenset([f"{name}.png", *(f"{name}_{s}" for s in copies(img))]))
    for name in ALONE:
        photo(name).save(folder / f"{name}.png")
    out = tmp_path / "data.json"
    assert main(["data", str(folder), "--json", str(out), "--no-cache"]) == 0
    doc = json.loads(out.read_text())
    found = {frozenset(g["ids"]) for g in doc["duplicate_groups"] if g["kind"] == "near"}
    assert found == expected
    assert all(g["min_similarity"] >= doc["near_threshold"] for g in doc["duplicate_groups"])


def test_the_score_is_blind_to_brightness_but_the_colour_check_is_not() -> None:
    def crop(photo: np.ndarray, top: int, left: int) -> torch.Tensor:
        img = torch.from_numpy(photo).permute(2, 0, 1).float().div(255).unsqueeze(0)
        return torch.nn.functional.interpolate(img, size=(128, 192), mode="area")[..., top : top + 32, left : left + 32]

    small = crop(data.coffee(), 40, 80)
    dimmer, far = small * 0.97, small * 0.5  # 3% dimmer: the same photo; half as bright: not a copy
    others = [crop(data.astronaut(), 20, 40), crop(data.chelsea(), 30, 60), crop(data.rocket(), 50, 90),
              crop(data.camera()[..., None].repeat(3, axis=2), 40, 60)]  # fmt: skip
    images = torch.cat([small, dimmer, far, *others])
    t = thumbnails(images)
    assert aligned_similarity(t[[0, 0]], t[[1, 2]]).min() > 0.99  # the correlation sees no difference
    assert [(i, j) for i, j, _ in near_duplicate_pairs(*describe(images))] == [(0, 1)]


def test_the_help_states_the_threshold_the_code_uses(capsys) -> None:
    from memwatch.data.near_duplicates import THRESHOLD

    with pytest.raises(SystemExit):
        main(["data", "--help"])
    assert f"default {THRESHOLD}" in " ".join(capsys.readouterr().out.split())
