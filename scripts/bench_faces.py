#!/usr/bin/env python
"""How the identity probe (dlib matcher) classifies copies, blends and strangers made from the portraits.

The gallery is four portraits of two people (assets/faces: Barack Obama and Joe Biden, two photos each);
Eileen Collins is the stranger. Samples, scored with ``memwatch score --identity --matcher dlib`` as a
user runs it:

* copies of every portrait, small (a 16-256 px square whose face is 40-75% of its width), shifted by a
  few pixels, and transformed (mirrored, JPEG quality 30, brighter, darker, grey, rotated 8 degrees,
  blurred, less contrast): a gallery person's copy should be a leak of that person, the stranger's neither;
* landmark-aligned morphs of every Obama photo with every Biden photo (weights 0.4, 0.5, 0.6; 64 and
  128 px): a blend where it verifies against both parents;
* plain pixel averages of the unaligned photos (measured: what do they verify as?).

    python scripts/bench_faces.py            # prints the tables of docs/benchmarks.md

The helpers that make copies and morphs are the tests' (tests/support/faces.py), so the benchmark
and the tests make their samples one way.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.faces import PORTRAITS, aligned_morph, pil_tensor, plain_average, portrait, small_copy  # noqa: E402

from memwatch.cli import main as memwatch  # noqa: E402
from memwatch.data.refset import load_reference_set  # noqa: E402
from memwatch.faces import IdentityConfig, build_gallery, load_face_pipeline  # noqa: E402

GALLERY = ["obama_2012_official", "obama_blue_room", "biden_2013_official", "biden_blue_room"]
#: (image side, face width as a share of it)
SIZES = [(16, 0.75), (24, 0.6), (32, 0.6), (48, 0.6), (64, 0.4), (64, 0.5), (96, 0.5), (128, 0.6), (256, 0.5),
         (64, 0.75)]  # fmt: skip


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


TRANSFORMS = {
    "none": lambda im: im,
    "mirrored": ImageOps.mirror,
    "jpeg q30": lambda im: _jpeg(im, 30),
    "brighter 25%": lambda im: ImageEnhance.Brightness(im).enhance(1.25),
    "darker 25%": lambda im: ImageEnhance.Brightness(im).enhance(0.75),
    "grey": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "rotated 8 deg": lambda im: im.rotate(8, resample=Image.Resampling.BICUBIC),
    "blurred": lambda im: im.filter(ImageFilter.GaussianBlur(0.8)),
    "contrast 70%": lambda im: ImageEnhance.Contrast(im).enhance(0.7),
}


def main() -> int:
    pipeline = load_face_pipeline(IdentityConfig(matcher="dlib"))
    names = list(PORTRAITS)
    photos = {n: portrait(n) for n in names}
    found = pipeline.embed_images([pil_tensor(photos[n]) for n in names])
    box = {n: d.box for n, d in zip(names, found.detections, strict=True)}
    work = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    train, samples = work / "train", work / "samples"
    train.mkdir()
    samples.mkdir()
    for n in GALLERY:
        shutil.copy(ROOT / "assets" / "faces" / f"{n}.jpg", train / f"{n}.jpg")
    manifest = train / "faces.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"{n}.jpg", "identity": PORTRAITS[n]}) + "\n" for n in GALLERY))

    expect: dict[str, tuple[str, str, str | None]] = {}  # file -> (kind, detail, expected identity)
    for n in names:
        for size, share in SIZES:
            copy = small_copy(photos[n], box[n], size, share, shift=(3, -2))
            for label, transform in TRANSFORMS.items():
                f = f"copy_{n}_{size}_{share}_{label.replace(' ', '_')}.png"
                transform(copy).save(samples / f)
                kind = "copy of a gallery person" if n in GALLERY else "copy of the stranger"
                expect[f] = (kind, label, PORTRAITS[n] if n in GALLERY else None)
    obama, biden = GALLERY[:2], GALLERY[2:]
    for a in obama:
        for b in biden:
            for weight in (0.4, 0.5, 0.6):
                for size in (64, 128):
                    f = f"morph_{a}_{b}_{weight}_{size}.png"
                    aligned_morph(photos[a], box[a], photos[b], box[b], weight=weight, size=size).save(samples / f)
                    expect[f] = ("aligned morph", f"weight {weight}", None)
            f = f"average_{a}_{b}.png"
            plain_average(photos[a], photos[b]).save(samples / f)
            expect[f] = ("plain average", "", None)

    out = work / "score.json"
    assert memwatch(["score", str(samples), str(manifest), "--identity", "--matcher", "dlib", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())["identity"]
    rows = {r["sample"]: r for r in doc["items"]}
    gallery = build_gallery(load_reference_set(manifest), pipeline, IdentityConfig(matcher="dlib"))

    def verdict(r: dict) -> str:
        if not r["face_found"]:
            return "no face"
        if r["interpolation"]:
            return "blend"
        return f"leak of {r['identity']}" if r["leak"] else "neither"

    print(f"threshold {doc['threshold']['threshold']:.3f} ({doc['threshold']['threshold_source']}); "
          f"{len(rows)} samples\n")  # fmt: skip
    print("| samples | transformation | n | verdicts | correct |")
    print("|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[str]] = {}
    for f, (kind, detail, _) in expect.items():
        groups.setdefault((kind, detail if kind.startswith("copy") else ""), []).append(f)
    for (kind, detail), files in groups.items():
        verdicts = Counter(verdict(rows[f]) for f in files)
        if kind == "copy of a gallery person":
            correct = sum(verdict(rows[f]) == f"leak of {expect[f][2]}" for f in files)
        elif kind == "copy of the stranger":
            correct = verdicts["neither"]
        else:
            correct = None
        listed = ", ".join(f"{v} {k}" for k, v in verdicts.most_common())
        print(f"| {kind} | {detail or '-'} | {len(files)} | {listed} | {'-' if correct is None else correct} |")

    print("\n| image size (face width) | copies of gallery people, all transformations | leak of the right person |")
    print("|---|---|---|")
    for size, share in SIZES:
        files = [f for f, (kind, _, _) in expect.items()
                 if kind == "copy of a gallery person" and f"_{size}_{share}_" in f]  # fmt: skip
        right = sum(verdict(rows[f]) == f"leak of {expect[f][2]}" for f in files)
        print(f"| {size} px ({round(size * share)} px) | {len(files)} | {right} |")

    # the morphs: does the verdict follow "verifies against both parents"?
    both = flagged = flagged_when_both = 0
    for f, (kind, _, _) in expect.items():
        if kind != "aligned morph":
            continue
        vec = pipeline.embed_images([pil_tensor(Image.open(samples / f).convert("RGB"))]).embeddings[0]
        sims = vec @ gallery.embeddings.T
        per: dict[str, float] = {}
        for i, face_id in enumerate(gallery.face_identity.tolist()):
            person = gallery.identities[face_id]
            per[person] = max(per.get(person, -1.0), float(sims[i]))
        verifies_both = min(per.values()) >= gallery.threshold
        both += verifies_both
        flagged += rows[f]["interpolation"]
        flagged_when_both += verifies_both and rows[f]["interpolation"]
    print(f"\naligned morphs: {both} of 24 verify against both parents (at the sample's own size); "
          f"{flagged} flagged as blends, {flagged_when_both} of them among those {both}")  # fmt: skip
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
