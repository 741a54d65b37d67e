"""Sampling-free membership signal: the denoising-loss gap between training and holdout images.

A model that fits its training images better than unseen images of the same distribution has a
lower denoising loss on them; the gap and the separability of the two loss distributions (ROC AUC,
TPR at a low FPR) grow as the model starts to memorize, typically before its samples copy. This is
the loss attack of Matsumoto et al. (2023) with the fixed-timestep, fixed-noise protocol of SecMI
(Duan et al. 2023) and PIA (Kong et al. 2024). It costs ``len(timesteps)`` forward passes per image.

Everything is deterministic: example ``i`` at the ``k``-th timestep always gets the noise from
``torch.Generator().manual_seed(noise_seed_i * 1000 + k)``, and ``noise_seed`` is a hash of the
item's id, so the same image gets the same noise at every probe whatever subset or order it is in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from memwatch.errors import MemwatchError
from memwatch.hashing import sha256_bytes
from memwatch.modes import eval_mode, unwrap_model
from memwatch.probes.base import ProbeResult

#: FPR at which ``tpr_at_1fpr`` is reported: low-FPR TPR is the figure of merit for membership
#: attacks recommended by Carlini et al. 2022 ("Membership Inference Attacks From First Principles").
TPR_FPR = 0.01

# manual_seed takes 64-bit seeds; masking keeps huge user seeds valid (no effect on hashed ids).
_SEED_MASK = (1 << 64) - 1


@dataclass
class MembershipConfig:
    """Settings of the membership probe.

    Attributes:
        every: run the probe every this many optimizer steps. It costs a few forward passes
            (``(num_members + num_holdout) * len(timesteps)`` images), so it can run far more
            often than sample-based probes (DESIGN.md: "run the cheap ones often").
        num_members: training images probed. 64 vs 64 resolves AUC to about +-0.05 (standard
            error of the Mann-Whitney AUC at 0.5, Hanley & McNeil 1982), enough to see a trend.
        num_holdout: non-member images of the same distribution probed.
        timesteps: training timesteps (of ``num_train_timesteps = 1000``) at which the loss is
            averaged. Early/mid timesteps are where the member/holdout loss gap is largest
            (SecMI, Duan et al. 2023, and PIA, Kong et al. 2024, both attack at t of order
            100-200 of 1000); large t are nearly pure noise and carry little membership signal.
        batch_size: images per UNet forward pass.
    """

    every: int = 50
    num_members: int = 64
    num_holdout: int = 64
    timesteps: list[int] = field(default_factory=lambda: [50, 150, 300, 500])
    batch_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_members", "batch_size"):
            if getattr(self, name) < 1:
                raise MemwatchError(f"probes.membership.{name}={getattr(self, name)}: must be at least 1")
        for name in ("every", "num_holdout"):  # every: 0 turns the probe off
            if getattr(self, name) < 0:
                raise MemwatchError(f"probes.membership.{name}={getattr(self, name)}: must be >= 0")
        if not self.timesteps:
            raise MemwatchError("probes.membership.timesteps is empty: give at least one timestep, e.g. [50, 150]")


def noise_seed_for(item_id: Any) -> int:
    """Stable noise seed of an item: the first 8 hex digits of sha256(str(item_id)) as an int.

    Example:
        >>> noise_seed_for("img_001.png") == noise_seed_for("img_001.png")
        True
    """
    return int(sha256_bytes(str(item_id).encode("utf-8"))[:8], 16)


def _target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the model was trained to predict, by ``scheduler.config.prediction_type``."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        if not hasattr(scheduler, "get_velocity"):
            raise MemwatchError(
                f"{type(scheduler).__name__} has no get_velocity for prediction_type=v_prediction: "
                "pass the training DDPMScheduler"
            )
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise MemwatchError(f"scheduler prediction_type={kind!r} is not supported: use epsilon, v_prediction or sample")


def denoising_losses(
    unet: nn.Module,
    scheduler: Any,
    images: torch.Tensor,
    *,
    timesteps: Sequence[int],
    noise_seeds: Sequence[int],
    batch_size: int = 16,
    device: torch.device | str | None = None,
    conditioning: torch.Tensor | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-example denoising loss at fixed timesteps with fixed noise.

    For example ``i`` and the ``k``-th timestep ``t_k``: ``x0 = 2 * image - 1`` (or
    ``encode(image)``, e.g. VAE latents), noise from
    ``torch.Generator().manual_seed(noise_seeds[i] * 1000 + k)``, ``x_t = scheduler.add_noise(x0,
    noise, t_k)``, and the loss is the mean squared error between ``unet(x_t, t_k)`` (with
    ``encoder_hidden_states=conditioning[i]`` for text-to-image UNets) and the training target
    (noise, velocity or x0 per ``prediction_type``). The result is the mean over timesteps. Runs in
    :func:`~memwatch.modes.eval_mode`; the global RNG is not used.

    Args:
        unet: the diffusers UNet being trained (possibly wrapped); it is not moved.
        scheduler: the *training* noise scheduler (``add_noise``, ``get_velocity``, ``config``).
        images: ``(N, C, H, W)`` in [0, 1], at the model's resolution (the VAE's input resolution
            for latent models).
        timesteps: training timesteps, each in ``[0, num_train_timesteps)``.
        noise_seeds: one int per image (see :func:`noise_seed_for`).
        batch_size: images per forward pass.
        device: where inputs are placed; defaults to the UNet's device.
        conditioning: ``(N, L, D)`` text-encoder hidden states, one row per image (its caption),
            passed as ``encoder_hidden_states``; None for unconditional UNets.
        encode: maps a batch of images in [0, 1] (float32, on ``device``) to the model's clean
            input ``x0``; default ``2 * image - 1`` (pixel-space models). Latent models pass
            :func:`memwatch.t2i.encode_images` with their VAE.

    Returns:
        float32 CPU tensor ``(N,)``.

    Example:
        >>> denoising_losses(unet, sched, imgs, timesteps=[50, 150], noise_seeds=[1, 2]).shape  # doctest: +SKIP
        torch.Size([2])
    """
    if images.ndim != 4:
        raise MemwatchError(f"images have shape {tuple(images.shape)}: expected (N, C, H, W)")
    if len(noise_seeds) != images.shape[0]:
        raise MemwatchError(f"{len(noise_seeds)} noise_seeds for {images.shape[0]} images: give one per image")
    if not timesteps:
        raise MemwatchError("timesteps is empty: give at least one training timestep")
    if batch_size < 1:
        raise MemwatchError(f"batch_size={batch_size}: must be at least 1")
    if conditioning is not None and conditioning.shape[0] != images.shape[0]:
        raise MemwatchError(
            f"{conditioning.shape[0]} conditioning rows for {images.shape[0]} images: give one caption per image"
        )
    num_train = int(scheduler.config.num_train_timesteps)
    bad = [t for t in timesteps if not 0 <= int(t) < num_train]
    if bad:
        raise MemwatchError(f"timesteps {bad} are outside [0, {num_train}) of the training scheduler")

    model = unwrap_model(unet)
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    n = images.shape[0]
    totals = torch.zeros(n, dtype=torch.float64)
    with eval_mode(unet):
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            x0 = batch * 2.0 - 1.0 if encode is None else encode(batch).to(device=device, dtype=torch.float32)
            seeds = noise_seeds[start : start + batch_size]
            kwargs: dict[str, Any] = {}
            if conditioning is not None:
                hidden = conditioning[start : start + batch_size]
                kwargs["encoder_hidden_states"] = hidden.to(device=device, dtype=param.dtype)
            for k, t_val in enumerate(timesteps):
                noise = torch.stack(
                    [
                        torch.randn(
                            x0.shape[1:],
                            generator=torch.Generator().manual_seed((int(s) * 1000 + k) & _SEED_MASK),
                        )
                        for s in seeds
                    ]
                ).to(device)
                t = torch.full((x0.shape[0],), int(t_val), dtype=torch.long, device=device)
                x_t = scheduler.add_noise(x0, noise, t)
                pred = model(x_t.to(param.dtype), t, **kwargs).sample.float()
                target = _target(scheduler, x0, noise, t).float()
                totals[start : start + x0.shape[0]] += (pred - target).pow(2).flatten(1).mean(1).double().cpu()
    return (totals / len(timesteps)).float()


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


def membership_probe(
    unet: nn.Module,
    scheduler: Any,
    members: torch.Tensor,
    holdout: torch.Tensor | None,
    *,
    member_ids: Sequence[Any],
    holdout_ids: Sequence[Any],
    timesteps: Sequence[int] | None = None,
    batch_size: int = 16,
    device: torch.device | str | None = None,
    member_conditioning: torch.Tensor | None = None,
    holdout_conditioning: torch.Tensor | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ProbeResult:
    """Denoising losses of members and holdout images, and how well they separate.

    For text-to-image models each image is conditioned on its own caption (as in training) and
    latent models encode images with their VAE first; see :func:`denoising_losses`.

    Args:
        unet: the diffusers UNet being trained (possibly wrapped).
        scheduler: the training noise scheduler.
        members: training images ``(N, C, H, W)`` in [0, 1].
        holdout: non-member images ``(M, C, H, W)`` in [0, 1]; may be empty or ``None``.
        member_ids: one id per member (e.g. the image's path or hash); seeds its noise.
        holdout_ids: one id per holdout image.
        timesteps: training timesteps; default :class:`MembershipConfig` ``().timesteps``.
        batch_size: images per forward pass.
        device: where inputs are placed; defaults to the UNet's device.
        member_conditioning, holdout_conditioning: ``(N, L, D)`` / ``(M, L, D)`` hidden states of
            each image's caption (text-to-image UNets), else None.
        encode: images -> the model's ``x0`` (VAE latents for latent models), else None.

    Returns:
        ``ProbeResult(probe="membership")`` with metrics ``loss_member``, ``loss_holdout``,
        ``loss_gap`` (holdout minus member; positive when members are fitted better), ``mia_auc``
        (score = -loss) and ``tpr_at_1fpr``; NaN where a group is empty. ``items`` has one row per
        example ``{"item", "group", "loss"}``; ``timings`` has ``membership`` seconds.

    Example:
        >>> r = membership_probe(unet, sched, train_imgs, holdout_imgs,
        ...                      member_ids=train_names, holdout_ids=holdout_names)  # doctest: +SKIP
        >>> r.metrics["mia_auc"]  # doctest: +SKIP
        0.62
    """
    start = time.perf_counter()
    timesteps = list(MembershipConfig().timesteps if timesteps is None else timesteps)
    groups = {"member": (members, list(member_ids)), "holdout": (holdout, list(holdout_ids))}
    conditioning = {"member": member_conditioning, "holdout": holdout_conditioning}
    losses: dict[str, torch.Tensor] = {}
    for group, (images, ids) in groups.items():
        count = 0 if images is None else images.shape[0]
        if count != len(ids):
            raise MemwatchError(f"{count} {group} images but {len(ids)} {group}_ids: give one id per image")
        if count == 0:
            losses[group] = torch.empty(0)
            continue
        losses[group] = denoising_losses(
            unet,
            scheduler,
            images,
            timesteps=timesteps,
            noise_seeds=[noise_seed_for(i) for i in ids],
            batch_size=batch_size,
            device=device,
            conditioning=conditioning[group],
            encode=encode,
        )

    items = [
        {"item": item, "group": group, "loss": float(loss)}
        for group, (_, ids) in groups.items()
        for item, loss in zip(ids, losses[group].tolist(), strict=True)
    ]
    return membership_from_items(items, seconds=time.perf_counter() - start)


def membership_from_items(items: Sequence[dict[str, Any]], *, seconds: float = 0.0) -> ProbeResult:
    """Membership metrics from per-example rows ``{"item", "group", "loss"}``.

    Front-ends that split the examples across processes gather the rows and call this once, so the
    metrics are the same whatever the number of processes.

    Args:
        items: one row per example; ``group`` is ``"member"`` or ``"holdout"``.
        seconds: time spent computing the losses (kept in ``timings``).

    Example:
        >>> r = membership_from_items([{"item": "a", "group": "member", "loss": 0.1},
        ...                            {"item": "b", "group": "holdout", "loss": 0.3}])
        >>> round(r.metrics["loss_gap"], 3), r.metrics["mia_auc"]
        (0.2, 1.0)
    """
    member = torch.tensor([r["loss"] for r in items if r["group"] == "member"], dtype=torch.float64)
    holdout = torch.tensor([r["loss"] for r in items if r["group"] == "holdout"], dtype=torch.float64)

    def mean(x: torch.Tensor) -> float:
        return float(x.mean()) if x.numel() else float("nan")

    loss_member, loss_holdout = mean(member), mean(holdout)
    metrics = {
        "loss_member": loss_member,
        "loss_holdout": loss_holdout,
        "loss_gap": loss_holdout - loss_member,
        "mia_auc": roc_auc(-member, -holdout),
        "tpr_at_1fpr": tpr_at_fpr(-member, -holdout, fpr=TPR_FPR),
    }
    return ProbeResult(probe="membership", metrics=metrics, items=list(items), timings={"membership": seconds})
