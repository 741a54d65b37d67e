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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memwatch.core.probe import Metric, Probe, ProbeContext, ProbeRecord, ProbeResult, ProbeSettings
from memwatch.data.refset import ReferenceSet
from memwatch.errors import MemwatchError, ProbeUnavailable
from memwatch.hashing import sha256_bytes
from memwatch.models.modes import eval_mode, unwrap_model
from memwatch.sampling.text_to_image import caption_of, encode_images, encode_prompts, no_captions
from memwatch.settings import setting
from memwatch.signals.stats import MIN_AUC_GROUP, TPR_FPR, roc_auc, tpr_at_fpr

# manual_seed takes 64-bit seeds; masking keeps huge user seeds valid (no effect on hashed ids).
_SEED_MASK = (1 << 64) - 1
# With 64 members vs 64 holdout the AUC's standard error at 0.5 is ~0.05 (Hanley & McNeil 1982).
_AUC_SE = "64 vs 64 resolves AUC to about +-0.05 (standard error at 0.5, Hanley & McNeil 1982)"
#: The member-loss-gap warning: members' loss this share below the holdout's. On the warning benchmark's tuning
#: runs (docs/data/tune) it came 0.35-0.7 before every onset, while no control passed 0.27 in 8,000 steps.
GAP_SHARE = 0.35
GAP_SHARE_SOURCE = (
    "memwatch: tuned with scripts/tune_forecast.py --gap on the warning benchmark's tuning seeds (docs/data/tune): "
    "beside the onset forecast, no false alarm in 12 controls and no miss in 12 memorizing runs under 8 perturbed "
    "cadences, where 0.3 left too little margin over the controls' largest gap (0.27); reported on other seeds"
)


@dataclass
class MembershipConfig(ProbeSettings):
    """Settings of the membership probe (see ``configs/default.yaml`` for each one's source)."""

    section = "probes.membership"
    every: int = setting(
        50,
        "run every this many training steps (0: off); a few forward passes per image",
        min=0,
        unit="steps",
        source="cheap, so it runs often (DESIGN.md: run the cheap ones often)",
    )
    num_members: int = setting(64, "training images probed", min=1, source=_AUC_SE)
    num_holdout: int = setting(64, "non-member images of the same distribution probed", min=0, source=_AUC_SE)
    timesteps: list[int] = setting(
        [50, 150, 300, 500],
        "training timesteps (of num_train_timesteps) at which the loss is averaged",
        min=0,
        source="early/mid timesteps carry the largest member/holdout gap (SecMI, Duan et al. 2023; PIA, Kong et al. "
        "2024 attack at t ~ 100-200 of 1000)",
    )
    batch_size: int = setting(16, "images per UNet forward pass", min=1)

    def check(self) -> None:
        if not self.timesteps:
            raise self.invalid("timesteps", "is empty: give at least one timestep, e.g. [50, 150]")


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
    :func:`~memwatch.models.modes.eval_mode`; the global RNG is not used.

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
            :func:`memwatch.sampling.text_to_image.encode_images` with their VAE.

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


#: Probes in the holdout-loss turning-point fit (this one and the ones before it).
TURN_WINDOW = 5


def loss_turn(earlier: Sequence[dict[str, Any]], step: int, now: dict[str, float]) -> dict[str, float]:
    """The holdout-loss turning point: is the holdout loss rising while the member loss falls?

    Least-squares slopes (per 1,000 steps) of ``loss_holdout`` and ``loss_member`` over the last
    :data:`TURN_WINDOW` probes, their t values, and ``holdout_turn`` = 1 when the holdout slope is
    significantly positive and the member slope significantly negative (one-sided 95% each), else 0
    (NaN with fewer than 3 probes). The validation loss turning up while the training loss keeps
    falling marks the onset of memorization (Bonnaire et al. 2025) but alone gives false alarms
    (Kaiser & Kollmann 2026), so it is a precursor, reported with an info rule only.

    Args:
        earlier: earlier results of the probe (``{"step", "metrics"}``), oldest first.
        step: this probe's step.
        now: this probe's metrics.

    Example:
        >>> past = [{"step": s, "metrics": {"loss_holdout": h, "loss_member": m}}
        ...         for s, h, m in [(100, 0.30, 0.30), (200, 0.31, 0.28)]]
        >>> loss_turn(past, 300, {"loss_holdout": 0.32, "loss_member": 0.26})["holdout_turn"]
        1.0
    """
    from memwatch.signals.forecast import fit_line, t95

    points = [(e["step"], e["metrics"]) for e in earlier][-(TURN_WINDOW - 1) :] + [(step, now)]
    out: dict[str, float] = {}
    significant = []
    for name in ("holdout", "member"):
        pts = [(s, m.get(f"loss_{name}")) for s, m in points]
        pts = [(s, float(v)) for s, v in pts if v is not None and math.isfinite(v)]
        fit = fit_line([s for s, _ in pts], [v for _, v in pts])
        if fit is None:
            out[f"{name}_slope"] = out[f"{name}_slope_t"] = math.nan
            continue
        out[f"{name}_slope"], out[f"{name}_slope_t"] = fit.slope * 1000, fit.slope_t
        significant.append(fit.slope_t >= t95(fit.n - 2) if name == "holdout" else fit.falls())
    out["holdout_turn"] = float(all(significant)) if len(significant) == 2 else math.nan
    return out


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

    def var_of_mean(x: torch.Tensor) -> float:
        return float(x.var(unbiased=True)) / x.numel() if x.numel() > 1 else float("nan")

    loss_member, loss_holdout = mean(member), mean(holdout)
    metrics = {
        "num_members": float(member.numel()),
        "num_holdout": float(holdout.numel()),
        "loss_member": loss_member,
        "loss_holdout": loss_holdout,
        "loss_gap": loss_holdout - loss_member,
        # the gap as a share of the holdout loss: scale-free, so one threshold serves any model and noise level
        "loss_gap_share": (loss_holdout - loss_member) / loss_holdout if loss_holdout > 0 else float("nan"),
        # Welch's standard error of the difference of the two means: the gap's uncertainty
        "loss_gap_se": math.sqrt(var_of_mean(member) + var_of_mean(holdout)),
        "mia_auc": roc_auc(-member, -holdout),
        "tpr_at_1fpr": tpr_at_fpr(-member, -holdout, fpr=TPR_FPR),
    }
    return ProbeResult(probe="membership", metrics=metrics, items=list(items), timings={"membership": seconds})


@dataclass
class _Subset:
    """Images of one membership group: tensors, ids, captions, and items skipped for lack of a caption."""

    images: torch.Tensor
    ids: list[str]
    captions: list[str]
    uncaptioned: int = 0


def _load_subset(refs: ReferenceSet | None, n: int, resolution: int, *, captioned: bool = False) -> _Subset:
    """The first ``n`` decodable items in a stable pseudo-random order (by hash of id), as [0, 1] tensors.

    With ``captioned``, only items with a caption are candidates; the others are counted. An item
    that cannot be decoded is skipped and counted by the set (:meth:`ReferenceSet.load`) and the next
    one takes its place.
    """
    candidates = list(refs.items) if refs is not None else []
    uncaptioned = 0
    if captioned:
        kept = [it for it in candidates if caption_of(it) is not None]
        uncaptioned = len(candidates) - len(kept)
        candidates = kept
    order = sorted(candidates, key=lambda it: sha256_bytes(it.id.encode()))
    images, items = [], []
    while order and len(items) < n and refs is not None:
        batch, order = order[: n - len(items)], order[n - len(items) :]
        decoded, ok = refs.load(batch, resolution)
        images.append(decoded)
        items += ok
    stacked = torch.cat(images) if images else torch.empty(0, 3, resolution, resolution)
    return _Subset(stacked, [it.id for it in items], [caption_of(it) or "" for it in items], uncaptioned)


class MembershipProbe(Probe):
    """The loss attack: training vs holdout denoising losses at fixed timesteps and noise.

    Each process computes the losses of its share of both groups; the main process turns the
    gathered per-example rows into metrics (:func:`membership_from_items`), so the metrics are
    the same whatever the number of processes. Text-to-image models are probed on VAE latents,
    each image conditioned on its own caption (uncaptioned items are skipped and counted).
    """

    name = "membership"
    Settings = MembershipConfig
    order = 40
    needs_holdout = True
    metrics = ("num_members", "num_holdout", "loss_member", "loss_holdout", "loss_gap", "loss_gap_se",
               Metric("loss_gap_share", role="precursor", label="member loss below holdout", threshold=GAP_SHARE),
               Metric("mia_auc", role="separability", label="membership AUC", threshold=0.5), "tpr_at_1fpr",
               "uncaptioned_member", "uncaptioned_holdout", "holdout_slope", "holdout_slope_t", "member_slope",
               "member_slope_t", "holdout_turn")  # fmt: skip
    default_rules = (
        {
            "name": "member-loss-gap",
            "type": "threshold",
            "metric": "membership/loss_gap_share",
            "op": ">=",
            "value": GAP_SHARE,
            "for": 1,
            "severity": "warning",
            "source": GAP_SHARE_SOURCE,
            "message": "step {step}: training images' denoising loss is {value:.0%} below the held-out images' "
            "(>= {threshold:.0%}): the model fits its training set far better than unseen images, which comes "
            "before copying; keep {keep} (a held-out set unlike the training images gives a gap of its own)",
        },
        {
            "name": "membership-separable",
            "type": "threshold",
            "metric": "membership/mia_auc",
            "op": ">=",
            "value": 0.6,
            "for": 3,
            "severity": "info",
            "source": "Hanley & McNeil 1982: with 64 members vs 64 holdout the AUC's standard error at 0.5 is about "
            "0.05; 0.6 sustained over 3 probes is well beyond chance",
            "message": "step {step}: training images are separable from holdout by loss (AUC {value:.2f})",
        },
        {
            "name": "holdout-loss-turning",
            "type": "first",
            "metric": "membership/holdout_turn",
            "op": ">=",
            "value": 1,
            "severity": "info",
            "source": "Bonnaire et al. 2025: the holdout loss turning up while the member loss falls marks onset; "
            "alone it gives false alarms (Kaiser & Kollmann 2026), hence info only",
            "message": "step {step}: the holdout loss is rising while the member loss falls (a precursor of "
            "memorization)",
        },
    )

    def __init__(self, settings: MembershipConfig | None = None, **values: Any):
        super().__init__(settings, **values)
        #: (resolution, text-to-image) -> group -> images, loaded once per run
        self._subsets: dict[tuple[int, bool], dict[str, _Subset]] = {}
        self._seconds = 0.0

    def compute(self, ctx: ProbeContext) -> list[dict[str, Any]]:
        cfg = self.settings
        parts = ctx.parts
        data = self._data(ctx)
        if parts.text_to_image and not data["member"].ids:
            raise ProbeUnavailable(
                no_captions(ctx.data.refs, "membership losses are conditioned on each image's caption")
            )
        share: dict[str, dict[str, Any]] = {}
        for group, subset in data.items():
            idx = ctx.workers.share(range(len(subset.ids)))
            cond = None
            if parts.text_to_image and idx:
                cond = encode_prompts(parts.tokenizer, parts.text_encoder, [subset.captions[i] for i in idx])
            share[group] = {"images": subset.images[idx], "ids": [subset.ids[i] for i in idx], "cond": cond}
        encode = None
        if parts.text_to_image and parts.vae is not None:
            vae = parts.vae

            def encode(images: torch.Tensor) -> torch.Tensor:
                return encode_images(vae, images)

        t0 = time.perf_counter()
        part = membership_probe(
            parts.unet,
            parts.scheduler,
            share["member"]["images"],
            share["holdout"]["images"],
            member_ids=share["member"]["ids"],
            holdout_ids=share["holdout"]["ids"],
            timesteps=cfg.timesteps,
            batch_size=cfg.batch_size,
            member_conditioning=share["member"]["cond"],
            holdout_conditioning=share["holdout"]["cond"],
            encode=encode,
        )
        self._seconds = time.perf_counter() - t0
        ctx.add_time("membership", self._seconds)
        return part.items

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult:
        bad = [r["item"] for r in rows if not math.isfinite(r["loss"])]
        if bad:
            raise MemwatchError(
                f"{len(bad)} of {len(rows)} denoising losses are NaN or Inf (e.g. {bad[0]}): the model's outputs are "
                "not finite, so membership cannot be measured"
            )
        result = membership_from_items(rows, seconds=self._seconds)
        result.metrics.update(loss_turn(ctx.earlier(self.name, TURN_WINDOW - 1), ctx.step, result.metrics))
        if ctx.parts.text_to_image:
            data = self._data(ctx)
            result.metrics.update({f"uncaptioned_{group}": float(s.uncaptioned) for group, s in data.items()})
        return result

    @classmethod
    def limitations(cls, record: ProbeRecord) -> list[tuple[str, str]]:
        return few_items(cls.name, record, "num_members", "num_holdout")

    def _data(self, ctx: ProbeContext) -> dict[str, _Subset]:
        resolution, text_to_image = ctx.parts.image_resolution, ctx.parts.text_to_image
        key = (resolution, text_to_image)
        if key not in self._subsets:
            cfg = self.settings
            self._subsets[key] = {
                "member": _load_subset(ctx.data.refs, cfg.num_members, resolution, captioned=text_to_image),
                "holdout": _load_subset(ctx.data.holdout, cfg.num_holdout, resolution, captioned=text_to_image),
            }
        return self._subsets[key]


def few_items(probe: str, record: ProbeRecord, members: str, holdout: str) -> list[tuple[str, str]]:
    """The report's note when an AUC of ``probe`` compared fewer than :data:`~memwatch.signals.stats.MIN_AUC_GROUP`
    items per group (``members``, ``holdout``: the metrics that count them).

    Example:
        >>> rows = [{"metric": "num_members", "snapshot_id": 1, "value": 4.0},
        ...         {"metric": "num_holdout", "snapshot_id": 1, "value": 4.0}]
        >>> few_items("membership", ProbeRecord(metrics=rows), "num_members", "num_holdout")[0][0]
        'membership-few-items'
    """
    sizes = {(m["metric"], m["snapshot_id"]): m["value"] for m in record.metrics}
    counts = {(int(n), int(sizes.get((holdout, sid), 0))) for (k, sid), n in sizes.items() if k == members}
    small = sorted((a, b) for a, b in counts if min(a, b) < MIN_AUC_GROUP)
    if not small:
        return []
    return [
        (
            f"{probe}-few-items",
            f"the {probe} AUC compares as few as {small[0][0]} members with {small[0][1]} held-out items: below "
            f"{MIN_AUC_GROUP} per group it says little (its standard error at 0.5 is above 0.1, Hanley & McNeil 1982)",
        )
    ]
