"""Regurgitation probe: do generated samples copy training images?

For every sample it finds the nearest training images in the embedder's space and reports

* ``nn1``, ``d1``, ``d2``: nearest training image and the distances to the nearest and the
  second-nearest *distinct* training image (byte-identical duplicates count once, so a sample that
  copies a duplicated image is not hidden by its twin);
* ``ratio = d1 / d2``: memorized when below ``mem_ratio`` (1/3; Gu et al. 2023, Bonnaire et al. 2025);
* ``extraction = d1 / (alpha * mean of the n nearest distances)``: extracted when <= 1
  (Carlini et al. 2023, alpha = 0.5, n = 50); NaN (undefined) when the set has fewer than n
  distinct images;
* ``similarity``: the embedder's similarity to ``nn1``; copied when >= the copy threshold
  (Somepalli et al. 2023 report the 95th percentile and a threshold share).

and the metrics ``mem_fraction``, ``extracted_fraction``, ``copy_fraction``, ``sim_p50``,
``sim_p95``, ``sim_max``, ``distinct_memorized`` and ``num_samples``, and the precursors
``ratio_min``, ``ratio_p10`` and ``ratio_p50`` (quantiles of d1/d2 over the samples).

The samples are the shared fixed-seed samples (section ``sampling``), embedded and searched once for every
probe that reads them (:meth:`memwatch.sampling.plan.Samples.neighbours`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from memwatch.core.evidence import EvidencePair, nan_last
from memwatch.core.probe import Metric, Probe, ProbeContext, ProbeRecord, ProbeResult, ProbeSettings
from memwatch.data.reference_index import ReferenceIndex
from memwatch.errors import MemwatchError
from memwatch.settings import setting

PROBE = "regurgitation"
#: The memorization threshold of d1/d2 and where it comes from (the forecast probe forecasts its crossing).
MEM_RATIO, MEM_RATIO_SOURCE = 1 / 3, "d1/d2 < 1/3: Gu et al. 2023 (mem_ratio.py), Bonnaire et al. 2025 (f_mem)"


@dataclass
class RegurgitationConfig(ProbeSettings):
    """Settings of the regurgitation probe (the samples it reads are the ``sampling`` section's)."""

    section = "probes.regurgitation"
    every: int | None = setting(
        None,
        "run every this many training steps (0: off; null: whenever the shared samples are drawn, sampling.every)",
        min=0,
        unit="steps",
    )
    mem_ratio: float = setting(
        MEM_RATIO,
        "a sample is memorized when d1/d2 (nearest / second-nearest training image) is below this",
        min=0.0,
        max=1.0,
        exclusive=True,
        threshold=True,
        source=MEM_RATIO_SOURCE,
    )
    extraction_alpha: float = setting(
        0.5,
        "Carlini's alpha: extracted when d1 <= alpha x mean distance to the n nearest training images",
        min=0.0,
        exclusive=True,
        threshold=True,
        source="Carlini et al. 2023 (alpha = 0.5)",
    )
    extraction_n: int = setting(
        50, "Carlini's n nearest training images", min=1, threshold=True,
        source="Carlini et al. 2023 (n = 50 nearest training images)",
    )  # fmt: skip
    copy_threshold: float | None = setting(
        None, "similarity counted as a copy; overrides embedder.copy_threshold for this probe", min=-1.0, max=1.0
    )
    chunk_size: int = setting(4096, "reference rows per search chunk (bounds memory)", min=1)


def regurgitation_probe(
    samples: torch.Tensor,
    index: ReferenceIndex,
    config: RegurgitationConfig,
    *,
    names: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> ProbeResult:
    """Compare generated samples with the training set.

    Args:
        samples: ``(N, 3, H, W)`` images in [0, 1].
        index: the reference index (training set and embedder).
        config: thresholds.
        names: sample names for match rows (default: their seeds, or their positions).
        seeds: the seed each sample was generated from, if any.

    Returns:
        A :class:`ProbeResult` with the metrics above and one match row per sample.

    Example:
        >>> r = regurgitation_probe(torch.rand(4, 3, 32, 32), index, RegurgitationConfig())  # doctest: +SKIP
        >>> sorted(r.metrics)[:3]  # doctest: +SKIP
        ['copy_fraction', 'distinct_memorized', 'extracted_fraction']
    """
    from memwatch.sampling.plan import SamplePlan, Samples

    shared = Samples(samples, SamplePlan(list(seeds) if seeds is not None else list(range(samples.shape[0]))))
    found = shared.neighbours(index, neighbours_needed(config), chunk_size=config.chunk_size)
    result = regurgitation_from_neighbours(found.distances, found.indices, index, config, names=names, seeds=seeds)
    result.timings = dict(shared.timings)
    return result


def regurgitation_from_embeddings(
    query: torch.Tensor,
    index: ReferenceIndex,
    config: RegurgitationConfig,
    *,
    names: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> ProbeResult:
    """:func:`regurgitation_probe` on samples already embedded (``memwatch score`` embeds a folder through the
    embedding cache)."""
    dist, idx = index.search(query, neighbours_needed(config), chunk_size=config.chunk_size)
    return regurgitation_from_neighbours(dist, idx, index, config, names=names, seeds=seeds)


def neighbours_needed(config: RegurgitationConfig) -> int:
    """Neighbours per sample: two for d1/d2, Carlini's n for extraction."""
    return max(2, config.extraction_n)


def d1_d2(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d1, d2, d1/d2)`` from each sample's sorted distances to the nearest distinct training images.

    The ratio is NaN with a single distinct training image (no second neighbour), and 0 when d2 is 0 (two
    distinct files decode to the same pixels; then d1 is 0 too and the sample is a copy).

    Example:
        >>> [round(float(v), 2) for v in d1_d2(torch.tensor([[1.0, 4.0]]))[2]]
        [0.25]
    """
    d1 = dist[:, 0]
    d2 = dist[:, 1] if dist.shape[1] > 1 else torch.full_like(d1, float("nan"))
    ratio = torch.where(d2 > 0, d1 / d2.clamp_min(1e-12), torch.zeros_like(d1))
    return d1, d2, torch.where(torch.isnan(d2), d2, ratio)


def regurgitation_from_neighbours(
    dist: torch.Tensor,
    idx: torch.Tensor,
    index: ReferenceIndex,
    config: RegurgitationConfig,
    *,
    names: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> ProbeResult:
    """The probe's arithmetic on the samples' nearest training images (``(N, k)`` distances and index rows,
    nearest first, k at least :func:`neighbours_needed`; see :func:`regurgitation_probe`)."""
    n = dist.shape[0]
    if names is None:
        names = [str(s) for s in seeds] if seeds is not None else [str(i) for i in range(n)]
    embedder = index.embedder
    d1, d2, ratio = d1_d2(dist)
    if len(index) >= config.extraction_n:
        near = dist[:, : config.extraction_n]
        extraction = d1 / (config.extraction_alpha * near.mean(dim=1)).clamp_min(1e-12)
    else:
        # Carlini's statistic compares d1 with the mean over the n nearest training images; with fewer
        # than n images that mean turns into "the average training image", and blurry samples pass.
        # It is undefined there: NaN, never "extracted".
        extraction = torch.full_like(d1, float("nan"))
    similarity = embedder.similarity(d1)
    threshold = embedder.default_copy_threshold if config.copy_threshold is None else config.copy_threshold

    memorized = ratio < config.mem_ratio  # NaN compares False
    extracted = extraction <= 1.0
    copied = similarity >= threshold
    matches = []
    for i in range(n):
        matches.append(
            {
                "sample": names[i],
                "seed": None if seeds is None else int(seeds[i]),
                "nn1": index.ids[int(idx[i, 0])],
                "d1": float(d1[i]),
                "d2": float(d2[i]),
                "ratio": float(ratio[i]),
                "similarity": float(similarity[i]),
                "extraction": float(extraction[i]),
                "memorized": bool(memorized[i]),
                "copied": bool(copied[i]),
                "extracted": bool(extracted[i]),
            }
        )
    sims = similarity.double()
    metrics = {
        "mem_fraction": memorized.double().mean().item(),
        "extracted_fraction": extracted.double().mean().item() if len(index) >= config.extraction_n else float("nan"),
        "copy_fraction": copied.double().mean().item(),
        "sim_p50": torch.quantile(sims, 0.50).item(),
        "sim_p95": torch.quantile(sims, 0.95).item(),
        "sim_max": sims.max().item(),
        "distinct_memorized": float(len({m["nn1"] for m in matches if m["memorized"]})),
        "num_samples": float(n),
        **ratio_quantiles(ratio),
    }
    return ProbeResult(probe=PROBE, metrics=metrics, matches=matches)


def ratio_quantiles(ratio: torch.Tensor) -> dict[str, float]:
    """``ratio_min``, ``ratio_p10``, ``ratio_p50``: how close the samples come to copying (precursors).

    They fall towards ``mem_ratio`` before the first sample crosses it, while ``mem_fraction`` is still 0.

    Example:
        >>> ratio_quantiles(torch.tensor([0.9, 0.5, 0.7]))["ratio_min"]
        0.5
    """
    finite = ratio[torch.isfinite(ratio)].double()
    if finite.numel() == 0:
        return dict.fromkeys(("ratio_min", "ratio_p10", "ratio_p50"), float("nan"))
    return {
        "ratio_min": finite.min().item(),
        "ratio_p10": torch.quantile(finite, 0.10).item(),
        "ratio_p50": torch.quantile(finite, 0.50).item(),
    }


def add_prompts(
    result: ProbeResult, prompts: Sequence[str], groups: Sequence[str], captions: Mapping[str, str | None] | None = None
) -> ProbeResult:
    """Per-prompt regurgitation of a text-to-image probe: annotate matches, add prompt rows and metrics.

    Sample ``i`` of ``result`` was generated from ``prompts[i]``, a training caption (group
    ``"member"``) or a held-out caption (``"holdout"``). Each match row gets ``prompt`` and
    ``group`` and, given the training images' ``captions``, ``own_image``: whether the sample's nearest
    training image is one whose caption is the prompt (a caption that reproduces its own image, against one
    that reproduces another training image); ``items`` get one row per distinct prompt, in first-seen order::

        {"item": prompt, "prompt", "group", "num_samples", "mem_fraction", "copy_fraction",
         "extracted_fraction", "sim_max", "sim_mean", "distinct_memorized", "nn1"}

    (``nn1``: the training image most of the prompt's samples are nearest to). The overall
    metrics stay as they are (over all samples) and gain ``num_prompts``, ``prompts_memorized``
    (prompts with at least one memorized sample), ``mem_fraction_member`` and
    ``mem_fraction_holdout`` (NaN without such prompts).

    Args:
        result: :func:`regurgitation_probe`'s result, one match per sample.
        prompts: the prompt of each sample.
        groups: ``"member"`` or ``"holdout"`` for each sample.
        captions: training id -> its caption (None: ``own_image`` is not set).

    Returns:
        ``result``, updated in place.

    Example:
        >>> r = add_prompts(regurgitation_probe(imgs, index, cfg), ["a fox"] * 4, ["member"] * 4)  # doctest: +SKIP
        >>> r.items[0]["prompt"], r.metrics["num_prompts"]  # doctest: +SKIP
        ('a fox', 1.0)
    """
    if not len(prompts) == len(groups) == len(result.matches):
        raise MemwatchError(
            f"{len(prompts)} prompts and {len(groups)} groups for {len(result.matches)} samples: give one per sample"
        )
    by_prompt: dict[str, list[dict]] = {}
    for match, prompt, group in zip(result.matches, prompts, groups, strict=True):
        match["prompt"], match["group"] = prompt, group
        if captions is not None:
            match["own_image"] = captions.get(match["nn1"]) == prompt
        by_prompt.setdefault(prompt, []).append(match)

    def share(rows: list[dict], key: str) -> float:
        return sum(bool(r[key]) for r in rows) / len(rows) if rows else float("nan")

    items = []
    for prompt, rows in by_prompt.items():
        sims = [r["similarity"] for r in rows]
        nearest = [r["nn1"] for r in rows]
        items.append(
            {
                "item": prompt,
                "prompt": prompt,
                "group": rows[0]["group"],
                "num_samples": len(rows),
                "mem_fraction": share(rows, "memorized"),
                "copy_fraction": share(rows, "copied"),
                "extracted_fraction": share(rows, "extracted"),
                "sim_max": max(sims),
                "sim_mean": sum(sims) / len(sims),
                "distinct_memorized": len({r["nn1"] for r in rows if r["memorized"]}),
                "nn1": max(dict.fromkeys(nearest), key=nearest.count),
            }
        )
    result.items = items
    result.metrics["num_prompts"] = float(len(items))
    result.metrics["prompts_memorized"] = float(sum(it["mem_fraction"] > 0 for it in items))
    for group in ("member", "holdout"):
        result.metrics[f"mem_fraction_{group}"] = share([m for m in result.matches if m["group"] == group], "memorized")
    return result


def memorized_evidence(result: ProbeResult) -> dict:
    """Seeds, sample names, training ids (and prompts, text-to-image) of the memorized samples (for events)."""
    hits = [m for m in result.matches if m["memorized"]]
    evidence = {
        "seeds": [m["seed"] for m in hits if m["seed"] is not None],
        "samples": [m["sample"] for m in hits],
        "training_ids": sorted({m["nn1"] for m in hits}),
    }
    if any("prompt" in m for m in result.matches):
        evidence["prompts"] = sorted({m["prompt"] for m in hits})
    return evidence


def regurgitation_pairs(matches: Sequence[dict[str, Any]]) -> list[EvidencePair]:
    """Every sample with its nearest training image, ranked by d1/d2 ratio."""
    return [
        EvidencePair(i, m["nn1"], nan_last(m["ratio"]), f"seed {m['seed']} r={m['ratio']:.2f}", bool(m["memorized"]))
        for i, m in enumerate(matches)
    ]


class RegurgitationProbe(Probe):
    """Do the shared fixed-seed samples copy training images? (Gu et al.'s d1/d2, Carlini's extraction)."""

    name = PROBE
    Settings = RegurgitationConfig
    order = 10
    needs_samples = True
    uses_embedder = True
    metrics = (Metric("mem_fraction", role="share", label="copying: share of samples with d1/d2 < 1/3",
                      out_of="num_samples"),
               "extracted_fraction", "copy_fraction", "sim_p50", "sim_p95", "sim_max",
               Metric("distinct_memorized", onset="first copy", label="training images regurgitated"),
               "num_samples", "num_prompts", "prompts_memorized", "mem_fraction_member",
               "mem_fraction_holdout", "uncaptioned_member", "uncaptioned_holdout", "ratio_min", "ratio_p10",
               "ratio_p50")  # fmt: skip
    unmeasured = "no regurgitation probe result: no generated sample was compared with training"
    matches_threshold = "mem_ratio"
    default_rules = (
        {
            "name": "first-regurgitation",
            "type": "first",
            "metric": "regurgitation/distinct_memorized",
            "op": ">",
            "value": 0,
            "severity": "warning",
            "source": "Gu et al. 2023: any sample with d1/d2 < 1/3 is a copy, so the first one marks the onset",
            "message": "step {step}: a generated sample regurgitates a training image (d1/d2 < 1/3, Gu et al. 2023)",
        },
        {
            "name": "mem-fraction-rising",
            "type": "trend",
            "metric": "regurgitation/mem_fraction",
            "op": ">=",
            "value": 0.1,
            "window": 4,
            "min_points": 3,
            "horizon": 2000,
            "severity": "warning",
            "source": "memwatch default: 10% of samples copying is far past onset for a generative model; the trend "
            "rule warns before it is reached",
            "message": "mem_fraction {value:.3f} is forecast to reach {threshold} at step {forecast_step}",
        },
        {
            "name": "mem-fraction-high",
            "type": "threshold",
            "metric": "regurgitation/mem_fraction",
            "op": ">=",
            "value": 0.1,
            "for": 2,
            "severity": "critical",
            "source": "memwatch default: 10% of samples copying is far past onset for a generative model (sustained "
            "for 2 probes)",
            "message": "step {step}: {value:.0%} of samples regurgitate training images (>= {threshold:.0%} for 2 "
            "probes)",
        },
    )

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult:
        assert ctx.samples is not None
        plan = ctx.samples.plan
        index = ctx.reference_index()
        found = ctx.samples.neighbours(index, neighbours_needed(self.settings), chunk_size=self.settings.chunk_size)
        result = regurgitation_from_neighbours(
            found.distances, found.indices, index, self.settings, names=plan.names, seeds=plan.seeds
        )
        if plan.prompts is not None and plan.groups is not None:
            add_prompts(result, plan.prompts, plan.groups, {it.id: it.caption for it in ctx.data.refs.items})
            result.metrics.update(plan.counts)
        return result

    def evidence(self, result: ProbeResult) -> dict[str, Any]:
        return memorized_evidence(result)

    @classmethod
    def evidence_pairs(cls, result: ProbeResult) -> list[EvidencePair]:
        return regurgitation_pairs(result.matches)

    @classmethod
    def limitations(cls, record: ProbeRecord) -> list[tuple[str, str]]:
        out = super().limitations(record)
        if any(m.get("extraction") is None or m["extraction"] != m["extraction"] for m in record.matches):
            n_ref = (record.reference or {}).get("n")
            n = record.settings.get("extraction_n", RegurgitationConfig().extraction_n)
            out.append(
                (
                    "extraction-undefined",
                    f"Carlini et al.'s extraction statistic is undefined (null): the reference set has {n_ref} images, "
                    f"fewer than its n = {n} nearest neighbours; 'extracted' is never set",
                )
            )
        return out
