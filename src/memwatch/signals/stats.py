"""Statistics shared by probes: how well two groups of scores separate.

Membership attacks and the conditional-noise probe both score members (training images or
prompts) against non-members and report the ROC AUC and the true-positive rate at a low
false-positive rate. Both are exact, with no interpolation, and equal scikit-learn's
``roc_auc_score`` and ``roc_curve`` points (the tests compare against it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from memwatch.errors import MemwatchError

#: FPR at which ``tpr_at_1fpr`` is reported: low-FPR TPR is the figure of merit for membership
#: attacks recommended by Carlini et al. 2022 ("Membership Inference Attacks From First Principles").
TPR_FPR = 0.01
#: Fewest members (and held-out items) per group for an AUC to mean something: with 10 vs 10 the AUC's
#: standard error at 0.5 is about 0.13 (Hanley & McNeil 1982).
MIN_AUC_GROUP = 10

Scores = Sequence[float] | np.ndarray | torch.Tensor


def _as_array(scores: Scores) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    return np.asarray(scores, dtype=np.float64).reshape(-1)


def roc_auc(member_scores: Scores, holdout_scores: Scores) -> float:
    """ROC AUC of "higher score = member": the Mann-Whitney U statistic, ties counted one half.

    Equals P(member score > holdout score) + 0.5 * P(equal). NaN when either group is empty or a
    score is NaN (e.g. a diverged model), so a probe never fails on it.

    Args:
        member_scores: scores of training examples.
        holdout_scores: scores of non-members.

    Example:
        >>> roc_auc([3.0, 2.0], [1.0, 2.0])
        0.875
    """
    pos, neg = _as_array(member_scores), _as_array(holdout_scores)
    if pos.size == 0 or neg.size == 0 or np.isnan(pos).any() or np.isnan(neg).any():
        return float("nan")
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")  # holdout scores strictly below each member
    equal = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below.sum() + 0.5 * equal.sum()) / (pos.size * neg.size))


def tpr_at_fpr(member_scores: Scores, holdout_scores: Scores, fpr: float = TPR_FPR) -> float:
    """Largest true-positive rate over thresholds whose false-positive rate is at most ``fpr``.

    An example is called a member when its score is *strictly greater* than the threshold;
    thresholds range over every observed score and minus infinity. These are exactly the points of
    ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``. No interpolation between points:
    with 64 holdout images, FPR 1% admits no false positive at all. NaN when either group is empty
    or a score is NaN.

    Args:
        member_scores: scores of training examples (higher = more likely member).
        holdout_scores: scores of non-members.
        fpr: the FPR limit, in [0, 1].

    Example:
        >>> tpr_at_fpr([3.0, 2.0, 0.5], [1.0, 0.0], fpr=0.0)
        0.6666666666666666
    """
    if not 0.0 <= fpr <= 1.0:
        raise MemwatchError(f"fpr={fpr}: must be in [0, 1]")
    pos, neg = _as_array(member_scores), _as_array(holdout_scores)
    if pos.size == 0 or neg.size == 0 or np.isnan(pos).any() or np.isnan(neg).any():
        return float("nan")
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    thresholds = np.concatenate([[-np.inf], np.unique(np.concatenate([pos, neg]))])
    tp = pos.size - np.searchsorted(pos_sorted, thresholds, side="right")
    fp = neg.size - np.searchsorted(neg_sorted, thresholds, side="right")
    # Compare counts, not rates, so fpr=0.01 with 100 holdout examples admits exactly one.
    allowed = math.floor(fpr * neg.size + 1e-9)
    return float(tp[fp <= allowed].max() / pos.size)
