"""Near duplicates: different files that are the same photo (re-encoded, resized, slightly shifted or cropped).

A distance between whole images cannot tell these apart from distinct photos. Measured on real photos
(``scripts/bench_near_duplicates.py``), a copy of a textured photo cropped by 8% lies farther from its
original in pixel space at 32 px than two distinct low-contrast textures lie from each other, and a photo
with several copies has no gap between its nearest and second-nearest image (both are copies), so neither
an absolute threshold nor the ratio d1/d2 finds the group.

What a person does instead is align the two images and compare them. This module does that, cheaply:

1. **thumbnails**: grey level at :data:`SIDE` px (the one normalisation rule of
   :mod:`memwatch.data.images`), band-passed by a difference of Gaussians (:data:`BAND`). Removing the
   lowest frequencies keeps two distinct smooth images (a blurred clock, a colour wheel) from correlating;
   removing the finest keeps a texture's copy correlated after a slight change of scale;
2. **candidates**: each image's :data:`CANDIDATES` nearest by cosine between coarse descriptors (the
   thumbnail blurred and pooled to 8x8), found in blocks (``n**2 * 64`` multiply-adds);
3. **alignment**: for each candidate pair, the centre window (:data:`WINDOW` of :data:`SIDE` px) of one
   image is slid over the other at several zooms (:data:`ZOOMS`, up to 1.12: a crop that keeps 89% of a
   side), in both directions; the score is the best zero-mean normalised cross-correlation (the
   template-matching measure of Lewis 1995, "Fast normalized cross-correlation"), computed for all shifts
   at once with FFTs and window sums (about 0.4 ms a pair on 2 cores). The range is kept small on
   purpose: every extra shift or zoom is another chance for two distinct images with one bright blob each
   to line up;
4. pairs scoring at or above :data:`THRESHOLD`, whose mean colours differ by at most :data:`COLOUR` in
   every channel, are near duplicates. The correlation ignores brightness and colour by design (a
   re-encode shifts them slightly); the colour check puts back what a person sees first: a dark micrograph
   of a cell and a light grey photo of a blurred clock are not the same photo, whatever their shapes.

The threshold is the middle of the gap measured on the tuning half of the benchmark's images: copies of
real photos (JPEG re-encodes, 2-4 px shifts, 90% resizes, 8-10% crops) score at least 0.882; distinct
photos (other photos of the same person included) at most 0.456, and 32 px crops of different photos with
the same mean colour (one bright blob on a plain ground, the hardest) at most 0.648. It was checked on the
other half; ``docs/benchmarks.md`` gives the figures.

Limits: copies cropped by more than about 10% of a side, shifted by more than about 6%, rotated, mirrored
or recoloured are not found; near-uniform images (no structure to align) are never near
duplicates of anything (identical files still are exact duplicates).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> photo = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=40, mode="bicubic")
    >>> images = torch.cat([photo[..., 4:36, 4:36], photo[..., 6:38, 5:37], torch.rand(1, 3, 32, 32, generator=g)])
    >>> [(i, j) for i, j, _ in near_duplicate_pairs(images.clamp(0, 1))]  # the shifted copy, not the noise
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
THRESHOLD = 0.765
THRESHOLD_SOURCE = (
    "memwatch (data/near_duplicates.py): best normalised cross-correlation >= 0.765 after aligning shift and "
    "zoom; chosen on real photos and their copies (scripts/bench_near_duplicates.py)"
)
#: candidates verified per image
CANDIDATES = 8
#: largest difference of mean colour (per channel, in [0, 1]) between near duplicates; copies of the
#: benchmark's photos differ by at most 0.104 (a 90% crop of a photo with a black border)
COLOUR = 0.15
#: below this band-passed energy per pixel an image has no structure to align (near-uniform)
FLAT = 1e-6


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Band-passed grey thumbnails ``(n, SIDE, SIDE)`` of images ``(n, 3, H, W)`` in [0, 1]."""
    x = images.float()
    if x.shape[-1] != SIDE or x.shape[-2] != SIDE:
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    return (_blur(grey, BAND[0]) - _blur(grey, BAND[1]))[:, 0]


def near_duplicate_pairs(
    images: torch.Tensor,
    *,
    threshold: float = THRESHOLD,
    candidates: int = CANDIDATES,
    chunk_size: int = 2048,
) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, score)`` with ``i < j`` whose aligned correlation is at or above ``threshold``.

    Args:
        images: ``(n, 3, H, W)`` in [0, 1], as :meth:`memwatch.data.refset.ReferenceSet.load` gives them.
        threshold: aligned correlation at or above which a pair is a near duplicate.
        candidates: nearest images by coarse descriptor verified per image.
        chunk_size: rows (and pairs) handled at a time, bounding memory.

    Returns:
        Pairs sorted by ``(i, j)``.
    """
    thumbs = thumbnails(images)
    colour = images.float().mean(dim=(2, 3))
    pairs = candidate_pairs(thumbs, candidates, chunk_size=chunk_size)
    out: list[tuple[int, int, float]] = []
    for a in range(0, len(pairs), chunk_size):
        block = pairs[a : a + chunk_size]
        scores = aligned_similarity(thumbs[block[:, 0]], thumbs[block[:, 1]])
        same_colour = (colour[block[:, 0]] - colour[block[:, 1]]).abs().amax(dim=1) <= COLOUR
        keep = (scores >= threshold) & same_colour
        kept = zip(block[keep].tolist(), scores[keep].tolist(), strict=True)
        out += [(int(i), int(j), float(s)) for (i, j), s in kept]
    return sorted(out)


def candidate_pairs(thumbs: torch.Tensor, k: int, *, chunk_size: int = 2048) -> torch.Tensor:
    """Unique pairs ``(m, 2)`` with ``i < j``: each thumbnail with its ``k`` nearest by coarse descriptor."""
    n = thumbs.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.empty(0, 2, dtype=torch.long)
    desc = F.adaptive_avg_pool2d(thumbs.unsqueeze(1), 8).flatten(1)
    desc = F.normalize(desc - desc.mean(dim=1, keepdim=True), dim=1)
    found = []
    for a in range(0, n, chunk_size):
        sims = desc[a : a + chunk_size] @ desc.T
        rows = torch.arange(a, min(a + chunk_size, n))
        sims[rows - a, rows] = -2.0  # never itself
        cols = sims.topk(k, dim=1).indices
        found.append(torch.stack([rows.repeat_interleave(k), cols.flatten()], dim=1))
    pairs = torch.cat(found)
    pairs = torch.stack([pairs.min(dim=1).values, pairs.max(dim=1).values], dim=1)
    return torch.unique(pairs, dim=0)


def aligned_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Best normalised cross-correlation of thumbnail pairs ``a[p], b[p]`` over shifts and zooms, both ways.

    Args:
        a, b: thumbnails ``(m, SIDE, SIDE)`` from :func:`thumbnails`.

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
                image = F.interpolate(image.unsqueeze(1), size=(n, n), mode="bilinear", antialias=True)[:, 0]
            best = torch.maximum(best, _best_correlation(template[:, c : c + WINDOW, c : c + WINDOW], image))
    flat = (a.pow(2).mean(dim=(1, 2)) < FLAT) | (b.pow(2).mean(dim=(1, 2)) < FLAT)
    return best.masked_fill(flat, -1.0)


def _best_correlation(template: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Max over positions of the zero-mean normalised cross-correlation of ``template`` ``(m, T, T)`` slid
    over ``image`` ``(m, N, N)`` (every position where it fits).

    The products come from float32 FFTs (1e-7 from float64, at half the time); the window sums are float64,
    where ``sum(x**2) - sum(x)**2 / T**2`` would otherwise lose the variance of a low-contrast window."""
    n, t = image.shape[-1], template.shape[-1]
    tz = template.float() - template.float().mean(dim=(1, 2), keepdim=True)
    # Circular correlation of size n is exact at the positions where the template fits (no wrap-around).
    num = torch.fft.irfft2(torch.fft.rfft2(image.float()) * torch.fft.rfft2(tz, s=(n, n)).conj(), s=(n, n))
    num = num[:, : n - t + 1, : n - t + 1]
    x = image.double()
    s1, s2 = _window_sums(x, t), _window_sums(x * x, t)
    window_norm = (s2 - s1 * s1 / (t * t)).clamp_min(0).sqrt().float()
    norm = window_norm * tz.flatten(1).norm(dim=1)[:, None, None]
    return (num / norm.clamp_min(1e-9)).flatten(1).max(dim=1).values


def _window_sums(x: torch.Tensor, t: int) -> torch.Tensor:
    """Sums over every ``t x t`` window of ``x`` ``(m, N, N)``, from an integral image."""
    c = F.pad(x, (1, 0, 1, 0)).cumsum(1).cumsum(2)
    return c[:, t:, t:] - c[:, :-t, t:] - c[:, t:, :-t] + c[:, :-t, :-t]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(n, 1, H, W)`` with reflected borders (separable, radius 3 sigma)."""
    r = int(3 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
