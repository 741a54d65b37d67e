#!/usr/bin/env python
"""Benchmark: does ``memwatch data`` find copies of a photo as near duplicates, and nothing else?

Real photos: the public-domain / CC0 photos stored inside scikit-image (``skimage.data``, the demo's sources)
and the portraits of ``assets/faces`` (two photos each of two people: other photos of the same person must
not be grouped). Each photo gets the copies a data set collects: JPEG re-encodes (quality 75 and 50), shifts of
2, 3 and 4 px (the edge cut off), a 90% resize, a centre crop keeping 90% of each side and a corner crop
keeping 92% (:data:`COPIES`).

The photos are split in two halves by name, the demo's 32 px crops (windows of the same 14 photos, many
overlapping: crops of one photo) by file order. On the **tuning** halves every pair of photos is scored
with :func:`memwatch.data.near_duplicates.aligned_similarity`, and the candidate pairs of crops of different
photos with the same mean colour; the threshold is the middle of the gap between the worst-scoring pair of
copies and the best-scoring pair of distinct images (the crops' are the harder). On the **reporting**
halves the shipped threshold (:data:`memwatch.data.near_duplicates.THRESHOLD`) is checked the way the user meets
it, through :func:`memwatch.data.training_set.analyse_training_set` on a folder of files: each photo must form
one group with exactly its copies; groups among the crops are listed, and those that mix crops of
different photos (none should).

    python scripts/bench_near_duplicates.py --json docs/bench_near_duplicates.json
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_warnings import provenance  # noqa: E402
from make_demo_assets import _skimage_sources  # noqa: E402

from memwatch.data.images import to_rgb  # noqa: E402
from memwatch.data.near_duplicates import (  # noqa: E402
    CANDIDATES,
    COLOUR,
    THRESHOLD,
    aligned_similarity,
    candidate_pairs,
    describe,
    near_duplicate_pairs,
    thumbnails,
)
from memwatch.data.refset import load_reference_set  # noqa: E402
from memwatch.data.training_set import analyse_training_set  # noqa: E402
from memwatch.embedders.pixel import PixelEmbedder  # noqa: E402

#: the same photo as a data set collects it; the names are the files' suffixes
COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {}


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img: Image.Image, keep: float, corner: bool) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * keep), round(h * keep)
    left, top = (w - cw, 0) if corner else ((w - cw) // 2, (h - ch) // 2)
    return img.crop((left, top, left + cw, top + ch))


COPIES.update(
    {
        "jpeg75": lambda im: _jpeg(im, 75),
        "jpeg50": lambda im: _jpeg(im, 50),
        **{f"shift{px}": (lambda im, px=px: im.crop((px, px, im.width, im.height))) for px in (2, 3, 4)},
        "resize90": lambda im: im.resize((round(im.width * 0.9), round(im.height * 0.9)), Image.Resampling.LANCZOS),
        "crop90": lambda im: _crop(im, 0.9, corner=False),
        "corner92": lambda im: _crop(im, 0.92, corner=True),
    }
)


def photos() -> dict[str, Image.Image]:
    """Every photo by name: scikit-image's, then the face portraits (Collins's is the astronaut photo: left out)."""
    out = {}
    for s in _skimage_sources():
        a = s.load()
        out[s.name] = to_rgb(Image.fromarray(a if a.dtype == np.uint8 else (a * 255).astype(np.uint8)))
    for p in sorted((ROOT / "assets" / "faces").glob("*.jpg")):
        if "collins" not in p.stem:  # the same NASA photo as skimage's astronaut
            out[p.stem] = to_rgb(Image.open(p))
    return out


def with_copies(subset: dict[str, Image.Image]) -> tuple[list[str], list[Image.Image]]:
    names, images = [], []
    for name, img in subset.items():
        names.append(name)
        images.append(img)
        for kind, make in COPIES.items():
            names.append(f"{name}~{kind}")
            images.append(make(img))
    return names, images


def score_all_pairs(names: list[str], images: list[Image.Image]) -> dict:
    """Every pair's aligned score and its ratio to the pair's background (the relative test), split into copies
    (same source photo) and distinct photos, and the largest difference of mean colour between copies."""
    from memwatch.data.images import pil_to_tensor, resize_center_crop
    from memwatch.data.near_duplicates import SIDE

    x = torch.stack([pil_to_tensor(resize_center_crop(im, SIDE)) for im in images])
    thumbs = thumbnails(x)
    pairs = list(itertools.combinations(range(len(names)), 2))
    i, j = (torch.tensor(x) for x in zip(*pairs, strict=True))
    scores_t = aligned_similarity(thumbs[i], thumbs[j])
    scores = scores_t.tolist()
    background = 1.0 - aligned_similarity(thumbs, thumbs[candidate_pairs(thumbs, CANDIDATES)[1]])
    ratio = (1.0 - scores_t) / torch.maximum(background[i], background[j])
    src = [n.split("~")[0] for n in names]
    same = torch.tensor([src[a] == src[b] for a, b in pairs])
    colour = x.mean(dim=(2, 3))
    colour_diff = (colour[i] - colour[j]).abs().amax(dim=1)
    copy = [(s, names[a], names[b]) for (a, b), s in zip(pairs, scores, strict=True) if src[a] == src[b]]
    other = [(s, names[a], names[b]) for (a, b), s in zip(pairs, scores, strict=True) if src[a] != src[b]]
    copy.sort()
    other.sort(reverse=True)
    return {
        "pairs": len(pairs),
        "copy_pairs": len(copy),
        "worst_copies": [{"score": round(s, 4), "a": a, "b": b} for s, a, b in copy[:5]],
        "best_distinct": [{"score": round(s, 4), "a": a, "b": b} for s, a, b in other[:5]],
        "copies_max_colour_difference": round(float(colour_diff[same].max()), 4),
        "copies_max_ratio": round(float(ratio[same].max()), 4),
        "distinct_min_ratio": round(float(ratio[~same].min()), 4),
        "gap": round(copy[0][0] - other[0][0], 4),
        "suggested_threshold": round((copy[0][0] + other[0][0]) / 2, 4),
    }


def analyse_folder(names: list[str], images: list[Image.Image]) -> dict:
    """``memwatch data``'s analysis of the photos saved as files (PNG, so only the copies' own changes count)."""
    with tempfile.TemporaryDirectory() as d:
        for name, img in zip(names, images, strict=True):
            img.save(Path(d) / f"{name}.png")
        t0 = time.perf_counter()
        result = analyse_training_set(load_reference_set(d), PixelEmbedder(32))
        seconds = time.perf_counter() - t0
    groups = [sorted(i.removesuffix(".png") for i in g.ids) for g in result.duplicate_groups if g.kind == "near"]
    expected = {n: sorted(x for x in names if x.split("~")[0] == n) for n in names if "~" not in n}
    found = {g[0].split("~")[0]: g for g in groups}
    return {
        "images": len(names),
        "seconds": round(seconds, 2),
        "groups": len(groups),
        "photos_grouped_exactly": sum(found.get(n) == members for n, members in expected.items()),
        "photos": len(expected),
        "wrong_groups": [g for g in groups if g != expected.get(g[0].split("~")[0])],
        "near_threshold": result.near_threshold,
    }


def source_of(crop_id: str) -> str:
    """A demo crop's source photo: its file name ends with it (``control/019_cell.png`` -> ``cell``)."""
    return crop_id.rsplit("_", 1)[-1].removesuffix(".png")


def demo_refs(half: int):
    """Half of the demo's 32 px crops (every other file): 0 tunes, 1 reports."""
    refs = load_reference_set(ROOT / "assets" / "demo")
    refs.items = refs.items[half::2]
    return refs


def demo_distinct_best(refs) -> dict:
    """The best-scoring candidate pair of crops of *different* photos that passes the colour check: the
    hardest negatives (32 px windows of smooth photos: one bright blob on a plain ground)."""
    images, kept = refs.load(refs.items, 32)
    thumbs = thumbnails(images)
    pairs = candidate_pairs(thumbs, CANDIDATES)[0]
    scores = aligned_similarity(thumbs[pairs[:, 0]], thumbs[pairs[:, 1]])
    colour = images.mean(dim=(2, 3))
    same_colour = (colour[pairs[:, 0]] - colour[pairs[:, 1]]).abs().amax(dim=1) <= COLOUR
    distinct = torch.tensor([source_of(kept[a].id) != source_of(kept[b].id) for a, b in pairs.tolist()])
    scores[~(distinct & same_colour)] = -1.0
    k = int(scores.argmax())
    return {"score": round(float(scores[k]), 4), "a": kept[pairs[k, 0]].id, "b": kept[pairs[k, 1]].id}


def smooth_fields(n: int = 8000, planted: int = 100, seed: int = 0) -> dict:
    """Low-information images where the absolute score is not enough: ``scripts/bench_data.py``'s smooth random
    colour fields (4x4x3 upsampled, fine noise), ``planted`` of them re-encoded as JPEG q90. In a large set the
    nearest distinct field is close; only the relative test (the ratio to each image's background) keeps them
    apart. Counts the planted pairs found and every other pair."""
    rng = np.random.default_rng(seed)
    fields = []
    for _ in range(n):
        small = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8)).resize((32, 32), Image.BICUBIC)
        noisy = np.asarray(small, dtype=np.int16) + rng.integers(-6, 7, (32, 32, 3))
        fields.append(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))
    fields += [_jpeg(fields[k], 90) for k in range(planted)]
    from memwatch.data.images import pil_to_tensor

    t0 = time.perf_counter()
    found = near_duplicate_pairs(*describe(torch.stack([pil_to_tensor(f) for f in fields])))
    seconds = time.perf_counter() - t0
    hits = {(i, j) for i, j, _ in found}
    return {
        "images": len(fields),
        "planted_found": sum((k, n + k) in hits for k in range(planted)),
        "planted": planted,
        "other_pairs": len(hits - {(k, n + k) for k in range(planted)}),
        "seconds": round(seconds, 1),
    }


def demo_crops(refs) -> dict:
    """Groups among half of the demo's 32 px crops (windows of 14 photos; train, holdout and control)."""
    t0 = time.perf_counter()
    result = analyse_training_set(refs, PixelEmbedder(32))
    groups = [g.ids for g in result.duplicate_groups if g.kind == "near"]
    return {
        "images": result.n,
        "seconds": round(time.perf_counter() - t0, 2),
        "near_groups": groups,
        # a crop's file name ends with its source photo: a group that mixes sources joins distinct photos
        "groups_mixing_photos": [g for g in groups if len({source_of(i) for i in g}) > 1],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    allp = photos()
    ordered = sorted(allp)
    tune = {n: allp[n] for n in ordered[0::2]}
    report = {n: allp[n] for n in ordered[1::2]}
    out = {
        "threshold": THRESHOLD,
        "copies": list(COPIES),
        "tuning_photos": list(tune),
        "reporting_photos": list(report),
        "tuning": score_all_pairs(*with_copies(tune)),
        "tuning_demo_distinct_best": demo_distinct_best(demo_refs(0)),
        "reporting_scores": score_all_pairs(*with_copies(report)),
        "reporting": analyse_folder(*with_copies(report)),
        "reporting_demo_distinct_best": demo_distinct_best(demo_refs(1)),
        "demo_crops": demo_crops(demo_refs(1)),
        "smooth_fields": smooth_fields(),
        "measured": provenance(),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
