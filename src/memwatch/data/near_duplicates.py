"""Near duplicates: different files that are the same photo (re-encoded, resized, slightly shifted or cropped).

A distance between whole images cannot tell these apart from distinct photos. Measured on real photos
(``scripts/bench_near_duplicates.py``), a copy of a textured photo cropped by 8% lies farther from its
original in pixel space at 32 px than two distinct low-contrast textures lie from each other, and a photo
with several copies has no gap between its nearest and second-nearest image (both are copies), so neither
an absolute threshold nor the ratio d1/d2 finds the group.

What a person does instead is align the two images and compare them, and ask whether they are far more
alike than the image is to anything else. This module does that, cheaply:

1. **thumbnails**: each colour channel at :data:`SIDE` px (the one normalisation rule of
   :mod:`memwatch.data.images`), band-passed by a difference of Gaussians (:data:`BAND`). Removing the
   lowest frequencies keeps two distinct smooth images (a blurred clock, a colour wheel) from correlating;
   removing the finest keeps a texture's copy correlated after a slight change of scale. The channels stay
   apart: two random colour fields with the same brightness pattern are not the same picture;
2. **candidates**: each image's :data:`CANDIDATES` nearest by cosine between coarse descriptors (the
   thumbnail pooled to 8x8), found in blocks (``n**2 * 192`` multiply-adds), and its
   :data:`REFERENCE_RANK`-th nearest, whose aligned distance is the image's **background**;
3. **alignment**: for each candidate pair, the centre window (:data:`WINDOW` of :data:`SIDE` px) of one
   image is slid over the other at several zooms (:data:`ZOOMS`, up to 1.12: a crop that keeps 89% of a
   side), in both directions; the score is the best zero-mean normalised cross-correlation, the channels
   together (the template-matching measure of Lewis 1995, "Fast normalized cross-correlation"), computed
   for all shifts at once with FFTs and window sums (about 0.7 ms a pair on 2 cores). The range is kept
   small on purpose: every extra shift or zoom is another chance for two distinct images to line up;
4. a pair is a near duplicate when all three hold:

   * its score reaches :data:`THRESHOLD`;
   * it **stands out**: its distance ``1 - score`` is at most :data:`RATIO` of the larger of its two images'
     backgrounds (the regurgitation probe's d1/d2 < 1/3, here inside the set, with a background far enough
     down the list that a group of copies does not hide it), or its score reaches :data:`IDENTICAL`
     (near-identical, however many copies there are). In a large set of low-information images (smooth
     colour fields) the nearest distinct image scores high, but no higher than the image's thirty-odd
     other neighbours: only a copy stands out;
   * the mean colours differ by at most :data:`COLOUR` in every channel. The correlation ignores brightness
     by design (a re-encode shifts it slightly); the colour check puts back what a person sees first: a
     dark micrograph of a cell and a light grey photo of a blurred clock are not the same photo, whatever
     their shapes.

The threshold is the middle of the gap measured on the tuning half of the benchmark's images: copies of
real photos (JPEG re-encodes, 2-4 px shifts, 90% resizes, 8-10% crops) score at least 0.877; distinct
photos (other photos of the same person included) at most 0.440, and 32 px crops of different photos with
the same mean colour (one bright blob on a plain ground, the hardest) at most 0.630. Copies stand out at a
ratio of at most 0.14, distinct photos at 0.64 or more. It was checked on the other half and on 8,100 smooth
colour fields with 100 re-encodes planted; ``docs/benchmarks.md`` gives the figures.

Limits: copies cropped by more than about 10% of a side, shifted by more than about 6%, rotated, mirrored
or recoloured are not found; nor are shifted or cropped copies of a photo that has more than about 30
copies (re-encodes and resizes of it still are); near-uniform images (no structure to align) are never near
duplicates of anything (identical files still are exact duplicates).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> photo = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=40, mode="bicubic")
    >>> images = torch.cat([photo[..., 4:36, 4:36], photo[..., 6:38, 5:37], torch.rand(1, 3, 32, 32, generator=g)])
    >>> [(i, j) for i, j, _ in near_duplicate_pairs(*describe(images.clamp(0, 1)))]  # the shifted copy only
    [(0, 1)]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: side of the grey thumbnails compared, px
SIDE = 32
#: side of the centre window slid over the other image, px (shifts up to 2 px = 6% of a side each way)
WINDOW = 28
#: zooms of the other image tried (1/0.89 ~ 1.12: a crop keeping 89% of a side)
ZOOMS = (1.0, 1.04, 1.08, 1.12)
#: difference-of-Gaussians band in px at SIDE: (fine sigma, coarse sigma); chosen by measurement
BAND = (1.0, 4.0)
#: best aligned correlation at or above which two images are the same photo (scripts/bench_near_duplicates.py)
THRESHOLD = 0.753
THRESHOLD_SOURCE = (
    "memwatch (data/near_duplicates.py): best normalised cross-correlation >= 0.753 after aligning shift and "
    "zoom, standing out (1 - correlation at most 1/3 of the larger of the two images' distances to their 32nd "
    "nearest) and with the same mean colour; chosen on real photos and their copies (scripts/bench_near_duplicates.py)"
)
#: candidates verified per image
CANDIDATES = 8
#: the neighbour (by coarse descriptor) whose aligned distance is an image's background: far enough down
#: the list that it is not a copy in any group of fewer than this many copies
REFERENCE_RANK = 32
#: a near duplicate is at most this share of the background's distance (1 - correlation) away: the ratio the
#: regurgitation probe uses for copies (d1/d2 < 1/3, Gu et al. 2023), here inside the set
RATIO = 1 / 3
#: a score this high needs no background: near-identical images (re-encodes, resizes), however many copies a
#: photo has; distinct images of the benchmark score at most 0.89 (two blobs) and 0.79 (smooth colour fields)
IDENTICAL = 0.98
#: largest difference of mean colour (per channel, in [0, 1]) between near duplicates; copies of the
#: benchmark's photos differ by at most 0.104 (a 90% crop of a photo with a black border)
COLOUR = 0.15
#: below this band-passed energy per pixel an image has no structure to align (near-uniform)
FLAT = 1e-6


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Band-passed colour thumbnails ``(n, 3, SIDE, SIDE)`` of images ``(n, 3, H, W)`` in [0, 1]."""
    x = images.float()
    if x.shape[-1] != SIDE or x.shape[-2] != SIDE:
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    n = x.shape[0]
    flat = x.reshape(n * 3, 1, SIDE, SIDE)  # each channel alone: the blur does not mix them
    return (_blur(flat, BAND[0]) - _blur(flat, BAND[1])).reshape(n, 3, SIDE, SIDE)


def describe(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the comparison needs of each image: its thumbnail and its mean colour ``(n, 3)``. Call it on
    chunks of a large set and concatenate, so only the thumbnails are ever held."""
    return thumbnails(images), images.float().mean(dim=(2, 3))


def near_duplicate_pairs(
    thumbs: torch.Tensor,
    colours: torch.Tensor,
    *,
    threshold: float = THRESHOLD,
    candidates: int = CANDIDATES,
    chunk_size: int = 2048,
) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, score)`` with ``i < j`` that is a near duplicate (the module's steps 2-4).

    Args:
        thumbs, colours: from :func:`describe`.
        threshold: aligned correlation at or above which a pair can be a near duplicate.
        candidates: nearest images by coarse descriptor verified per image.
        chunk_size: rows (and pairs) handled at a time, bounding memory.

    Returns:
        Pairs sorted by ``(i, j)``.
    """
    pairs, reference = candidate_pairs(thumbs, candidates, chunk_size=chunk_size)
    if not len(pairs):
        return []
    background = torch.cat(
        [1.0 - aligned_similarity(thumbs[a : a + chunk_size], thumbs[reference[a : a + chunk_size]])
         for a in range(0, len(thumbs), chunk_size)]
    )  # fmt: skip
    out: list[tuple[int, int, float]] = []
    for a in range(0, len(pairs), chunk_size):
        i, j = pairs[a : a + chunk_size].unbind(dim=1)
        scores = aligned_similarity(thumbs[i], thumbs[j])
        stands_out = (1.0 - scores <= RATIO * torch.maximum(background[i], background[j])) | (scores >= IDENTICAL)
        same_colour = (colours[i] - colours[j]).abs().amax(dim=1) <= COLOUR
        keep = (scores >= threshold) & stands_out & same_colour
        out += list(zip(i[keep].tolist(), j[keep].tolist(), scores[keep].tolist(), strict=True))
    return sorted(out)


def candidate_pairs(thumbs: torch.Tensor, k: int, *, chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each thumbnail's ``k`` nearest by coarse descriptor, as unique pairs ``(m, 2)`` with ``i < j``, and
    each thumbnail's :data:`REFERENCE_RANK`-th nearest ``(n,)`` (the last one, in a smaller set)."""
    n = thumbs.shape[0]
    k, rank = min(k, n - 1), min(REFERENCE_RANK, n - 1)
    if k < 1:
        return torch.empty(0, 2, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    desc = F.adaptive_avg_pool2d(thumbs, 8).flatten(1)
    desc = F.normalize(desc - desc.mean(dim=1, keepdim=True), dim=1)
    found, reference = [], []
    for a in range(0, n, chunk_size):
        sims = desc[a : a + chunk_size] @ desc.T
        rows = torch.arange(a, min(a + chunk_size, n))
        sims[rows - a, rows] = -2.0  # never itself
        nearest = sims.topk(max(k, rank), dim=1).indices
        found.append(torch.stack([rows.repeat_interleave(k), nearest[:, :k].flatten()], dim=1))
        reference.append(nearest[:, rank - 1])
    pairs = torch.cat(found)
    pairs = torch.stack([pairs.min(dim=1).values, pairs.max(dim=1).values], dim=1)
    return torch.unique(pairs, dim=0), torch.cat(reference)


def aligned_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Best normalised cross-correlation of thumbnail pairs ``a[p], b[p]`` over shifts and zooms, both ways.

    Args:
        a, b: thumbnails ``(m, 3, SIDE, SIDE)`` from :func:`thumbnails`.

    Returns:
        ``(m,)`` scores in [-1, 1]; -1 where either image is near-uniform.

    Example:
        >>> t = thumbnails(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        >>> round(float(aligned_similarity(t[:1], t[:1])[0]), 3)
        1.0
    """
    c = (SIDE - WINDOW) // 2
    best = torch.full((a.shape[0],), -1.0)
    for zoom in ZOOMS:
        n = round(SIDE * zoom)
        for template, image in ((a, b), (b, a)):
            if n != SIDE:
                image = F.interpolate(image, size=(n, n), mode="bilinear", antialias=True)
            best = torch.maximum(best, _best_correlation(template[..., c : c + WINDOW, c : c + WINDOW], image))
    flat = (a.pow(2).mean(dim=(1, 2, 3)) < FLAT) | (b.pow(2).mean(dim=(1, 2, 3)) < FLAT)
    return best.masked_fill(flat, -1.0)


def _best_correlation(template: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Max over positions of the zero-mean normalised cross-correlation of ``template`` ``(m, C, T, T)`` slid
    over ``image`` ``(m, C, N, N)`` (every position where it fits), the channels taken together.

    The products come from float32 FFTs (1e-7 from float64, at half the time); the window sums are float64,
    where ``sum(x**2) - sum(x)**2 / T**2`` would otherwise lose the variance of a low-contrast window."""
    n, t = image.shape[-1], template.shape[-1]
    tz = template.float() - template.float().mean(dim=(-2, -1), keepdim=True)
    # Circular correlation of size n is exact at the positions where the template fits (no wrap-around).
    spectrum = (torch.fft.rfft2(image.float()) * torch.fft.rfft2(tz, s=(n, n)).conj()).sum(dim=1)
    num = torch.fft.irfft2(spectrum, s=(n, n))[:, : n - t + 1, : n - t + 1]
    x = image.double()
    s1, s2 = _window_sums(x, t), _window_sums(x * x, t)
    window_norm = (s2 - s1 * s1 / (t * t)).clamp_min(0).sum(dim=1).sqrt().float()
    norm = window_norm * tz.flatten(1).norm(dim=1)[:, None, None]
    return (num / norm.clamp_min(1e-9)).flatten(1).max(dim=1).values


def _window_sums(x: torch.Tensor, t: int) -> torch.Tensor:
    """Sums over every ``t x t`` window of ``x`` ``(..., N, N)``, from an integral image."""
    c = F.pad(x, (1, 0, 1, 0)).cumsum(-2).cumsum(-1)
    return c[..., t:, t:] - c[..., :-t, t:] - c[..., t:, :-t] + c[..., :-t, :-t]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(n, 1, H, W)`` with reflected borders (separable, radius 3 sigma)."""
    r = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
