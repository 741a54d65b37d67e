"""Are prototypical training images memorized first? A training-set prior for the image-risk ranking, measured.

Aparicio Rodriguez et al. (ICML 2026, "Diffusion models preferentially memorize prototypical examples") find
that samples made of common parts are memorized first, even when every sample is unique. This script asks
whether that order holds on the warning benchmark's runs, and whether it helps memwatch's ranking of the images
at risk (issue 25: Spearman >= 0.5 at half the onset step).

For every run folder given (``bench_warnings.py`` runs: ``data/train`` and a ``truth.json`` with each dense
sample's nearest training image, ``nn1``), each training image gets two prototypicality scores, computed from
the training set alone (nothing the monitor does not have at its first probe):

* ``density``: the mean cosine similarity of the image to its ``k`` most similar other images (pixel
  embedder at the run's resolution; byte-identical copies counted once);
* ``parts``: how common its parts are: the mean, over its 4x4-pixel patches, of the distance to the closest
  patch of any other image (negated: common parts score high), the images' analogue of the paper's
  common substrings.

Measured per run: the Spearman correlation of each score with the true order of first copies (images never
copied tie last), and, where the run has a memwatch store, the Spearman of memwatch's ranking at half the
onset step as it is and with the images that have no evidence yet (not copied, no forecast) ordered by the
score instead of by their latest approach. Choose the score and ``k`` on tuning runs, report on others::

    python scripts/bench_prototypes.py runs/tune/n00*-s102 --json runs/prototypes_tune.json
    python scripts/bench_prototypes.py runs/report/n00* runs/canary/* --json docs/bench_prototypes.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

DENSITY_K = (1, 3, 5)
PATCH = 4


def scores(images: np.ndarray) -> dict[str, np.ndarray]:
    """Prototypicality scores of ``images`` (``(N, H, W, 3)`` floats in [0, 1]), one per image, higher = more
    typical; ``density_k`` for each ``k`` in ``DENSITY_K`` and ``parts``."""
    n = len(images)
    flat = images.reshape(n, -1) - images.reshape(n, -1).mean(axis=1, keepdims=True)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    sim = flat @ flat.T
    same = np.all(images.reshape(n, -1)[:, None] == images.reshape(n, -1)[None], axis=2)
    sim[same] = -np.inf  # itself and its byte copies: a copy is duplication (its own prior), not typicality
    out = {}
    for k in DENSITY_K:
        top = -np.sort(-sim, axis=1)[:, :k]
        top[~np.isfinite(top)] = np.nan
        out[f"density_{k}"] = np.nan_to_num(np.nanmean(top, axis=1), nan=-1.0)
    h, w = images.shape[1:3]
    patches = images.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, -1, PATCH * PATCH * 3)
    per = patches.shape[1]
    allp = patches.reshape(-1, PATCH * PATCH * 3)
    owner = np.repeat(np.arange(n), per)
    d2 = (allp**2).sum(1)[:, None] + (allp**2).sum(1)[None] - 2 * allp @ allp.T
    d2[same[owner][:, owner]] = np.inf  # patches of the image itself or its byte copies
    nearest = np.sqrt(np.maximum(d2.min(axis=1), 0)).reshape(n, per)
    out["parts"] = -nearest.mean(axis=1)
    # the opposite priors: d1/d2 judges a copy against the second-nearest image, so a sample near an isolated
    # image passes it sooner; which way the order goes is measured, not assumed
    out["rare_parts"] = -out["parts"]
    out["isolated_3"] = -out["density_3"]
    return out


def first_copies(truth: dict[str, Any]) -> dict[str, int]:
    """Each training image's first dense step with a sample copying it (d1/d2 < 1/3)."""
    first: dict[str, int] = {}
    for step, ratios, nns in zip(truth["steps"], truth["ratios"], truth["nn1"], strict=True):
        for r, nn in zip(ratios, nns, strict=True):
            if r is not None and r < 1 / 3:
                first.setdefault(nn, step)
    return first


def analyse(run_dir: Path) -> dict[str, Any] | None:
    """One run's Spearman correlations (see the module docstring); None without onset or truth."""
    from scipy.stats import spearmanr

    from memwatch.data.images import load_image
    from memwatch.data.refset import load_reference_set

    data = json.loads((run_dir / "truth.json").read_text())
    truth, onset = data["truth"], data.get("onset_step")
    if onset is None or "nn1" not in truth:
        return None
    refs = load_reference_set(run_dir / "data" / "train")
    first_id = {}
    for it in refs.items:
        first_id.setdefault(it.sha256, it.id)
    ids = sorted(first_id.values())  # one id per content, as the benchmark's image check counts them
    by_id = {it.id: it for it in refs.items}
    from bench_warnings import RESOLUTION

    images = np.stack([load_image(by_id[i].source, RESOLUTION).permute(1, 2, 0).numpy() for i in ids]).astype(
        np.float64
    )
    first = first_copies(truth)
    never = max(truth["steps"]) + 1
    order = [first.get(i, never) for i in ids]

    def rho(x: list[float]) -> float | None:
        r = spearmanr(x, order).statistic
        return None if r != r else round(float(r), 4)

    row: dict[str, Any] = {"run": run_dir.name, "n": data["n"], "seed": data["seed"], "onset_step": onset,
                           "images": len(ids), "images_copied": len(first)}  # fmt: skip
    for name, s in scores(images).items():
        row[f"truth_{name}"] = rho([-float(v) for v in s])  # typical first: a high score, an early copy
    store = run_dir / "memwatch" / "memwatch.sqlite"
    if store.is_file():
        row.update(_ranking(store, ids, images, order, onset, rho))
    return row


def _ranking(store_path: Path, ids: list[str], images: np.ndarray, order: list[int], onset: int, rho) -> dict:
    """memwatch's ranking at half the onset, as it is and with a prototypicality prior for the images that
    have no evidence yet."""
    import math

    from memwatch.signals.image_risk import image_trajectories, rank_images
    from memwatch.store import Store
    from memwatch.store.history import load_history

    with Store(store_path, readonly=True) as store:
        history = load_history(store)
    early = [r for r in history.seeds if r["step"] <= onset // 2]
    risks = rank_images(image_trajectories(early), threshold=history.mem_ratio, training_copies=history.training_copies)
    out = {}
    ranked = [r.training_id for r in risks]
    out["memwatch"] = rho([ranked.index(i) if i in ranked else len(ranked) for i in ids])
    evidence = {r.training_id for r in risks if r.first_copy_step is not None or math.isfinite(r.forecast_step)}
    copies = history.training_copies or {}
    for name, s in scores(images).items():
        score = dict(zip(ids, s, strict=True))
        rest = sorted((i for i in ids if i not in evidence), key=lambda i: (-(copies.get(i, 1)), -score[i], i))
        prior = [i for i in ranked if i in evidence] + rest
        out[f"memwatch_{name}"] = rho([prior.index(i) for i in ids])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="bench_warnings.py run folders")
    p.add_argument("--json", help="write the rows and medians here")
    args = p.parse_args(argv)
    rows = [r for r in (analyse(d) for d in args.runs if (d / "truth.json").is_file()) if r is not None]
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith(("truth_", "memwatch"))))
    medians = {}
    for k in keys:
        values = [r[k] for r in rows if r.get(k) is not None]
        medians[k] = round(statistics.median(values), 4) if values else None
    for r in rows:
        print(r)
    print(json.dumps({"runs": len(rows), "median": medians}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows, "median": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
