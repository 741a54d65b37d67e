"""Onset forecast probe: when will the first generated sample copy a training image?

On the shared fixed-seed samples it reads each seed's ratio d1/d2 (from the nearest training images the
samples share with the regurgitation probe: embedded and searched once per step) and, with the same
seeds' ratios at the run's earlier probes (from the store), forecasts the step at which a low quantile of
the ratios reaches the memorization threshold (:func:`memwatch.signals.forecast.forecast_onset`). It needs
no holdout set and no captions beyond what sampling needs, so it works on every run the regurgitation
probe works on.

Metrics (``forecast/...``): ``onset`` (NaN while no significant approach is seen), ``onset_low`` and
``onset_high`` (the band), ``steps_to_onset``, ``precursor`` (the quantile's value now),
``slope_t`` (the fall's significance) and ``seeds_approaching``. Items: one row per seed with its
ratio, its nearest training image, its own forecast crossing and, for text-to-image models, its prompt; the
evidence ranks the prompts by their seeds' earliest crossing (``prompts_at_risk``), since a text-to-image
model memorizes prompt by prompt. The default rule ``onset-forecast`` warns when the band's early
edge comes within 0.75 x the current step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from memwatch.core.evidence import nan_last
from memwatch.core.probe import Metric, Probe, ProbeContext, ProbeResult, ProbeSettings
from memwatch.probes.regurgitation import MEM_RATIO, MEM_RATIO_SOURCE, d1_d2
from memwatch.settings import setting
from memwatch.signals.forecast import forecast_onset

PROBE = "forecast"
#: Where the defaults below come from: tuned on scripts/bench_warnings.py's tuning seeds (memorizing n = 8-64
#: seeds 100-101, controls n = 256 seeds 100-103 and 106-109, the latter with late drifts; their truth is in
#: docs/data/tune) as the setting with no false alarm under every perturbed cadence of
#: scripts/tune_forecast.py --robust and the best lead at the default budget, reported on other seeds.
#: training images named in the warning's message (the closest first)
CLOSEST_IMAGES = 3
TUNED = "tuned on scripts/bench_warnings.py seeds 100-109 under perturbed cadences (docs/benchmarks.md)"


@dataclass
class ForecastSettings(ProbeSettings):
    """Settings of the onset forecast."""

    section = "probes.forecast"
    every: int | None = setting(
        None,
        "run every this many training steps (0: off; null: whenever the shared samples are drawn, sampling.every)",
        min=0,
        unit="steps",
    )
    threshold: float = setting(MEM_RATIO, "the d1/d2 at which a sample counts as a copy (the onset forecast)",
                               min=0.0, max=1.0, exclusive=True, threshold=True, source=MEM_RATIO_SOURCE)  # fmt: skip
    quantile: float = setting(
        0.0, "quantile of the seeds' ratios that is forecast (0: the smallest, the first copy)", min=0.0, max=1.0,
        threshold=True, source=TUNED,
    )  # fmt: skip
    closest: int = setting(
        2, "the precursor is the geometric mean of the quantile and this many - 1 ratios just above it (1: the "
        "quantile alone)", min=1, threshold=True, source=TUNED, was=1,
    )  # fmt: skip
    window: int = setting(8, "most recent probes in the forecast's line fit (3 or more)", min=3, source=TUNED)
    max_extrapolation: float = setting(
        1.5, "a crossing further ahead than this many times the fit's own span is no forecast", min=0.0,
        exclusive=True, source=TUNED,
    )  # fmt: skip


class ForecastProbe(Probe):
    """Forecast the first copy from the fixed seeds' approach towards d1/d2 = 1/3."""

    name = PROBE
    Settings = ForecastSettings
    order = 20
    needs_samples = True
    uses_embedder = True
    metrics = (Metric("onset", role="forecast", label="onset forecast"), "onset_low", "onset_high", "steps_to_onset",
               Metric("precursor", role="precursor", label="precursor: closest seeds' d1/d2", threshold="threshold"),
               "slope_t", "seeds_approaching")  # fmt: skip
    default_rules = (
        {
            "name": "onset-forecast",
            "type": "forecast",
            "metric": "forecast/onset",
            "horizon_share": 0.75,
            "severity": "warning",
            "source": "memwatch: warn while the forecast's early edge is within 0.75 x the current step, " + TUNED,
            "message": "step {step}: samples approach training images; copying is forecast at step {forecast_step} "
            "(band {forecast_low}-{forecast_high}); closest: {evidence[closest_images]}; keep {keep}",
        },
    )

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> ProbeResult:
        assert ctx.samples is not None
        plan = ctx.samples.plan
        index = ctx.reference_index()
        found = ctx.samples.neighbours(index, 2)
        _, _, ratio = d1_d2(found.distances)
        prompts = plan.prompts or [None] * len(plan.names)
        nearest = found.indices[:, 0]
        measured = [
            {"sample": name, "seed": seed, "ratio": float(r), "nn1": index.ids[int(i)], "prompt": prompt}
            for name, seed, r, i, prompt in zip(plan.names, plan.seeds, ratio, nearest, prompts, strict=True)
        ]
        now = {m["sample"]: m["ratio"] for m in measured}
        past = [
            (e["step"], {it["item"]: _float(it.get("ratio")) for it in e["items"]})
            for e in ctx.earlier(self.name, self.settings.window - 1)
        ]
        forecast = forecast_onset(
            [*past, (ctx.step, now)],
            threshold=self.settings.threshold,
            quantile=self.settings.quantile,
            closest=self.settings.closest,
            window=self.settings.window,
            max_extrapolation=self.settings.max_extrapolation,
        )
        items = [
            {"item": m["sample"], "seed": m["seed"], "ratio": m["ratio"], "nn1": m["nn1"],
             "crossing": forecast.per_seed.get(m["sample"], math.nan), **_prompt_of(m)}
            for m in measured
        ]  # fmt: skip
        return ProbeResult(PROBE, forecast.metrics(), items=items)

    def evidence(self, result: ProbeResult) -> dict[str, Any]:
        """The forecast band, the seeds closest to copying and, as text for messages, the training
        images they come closest to (``closest_images``: up to 3, closest first, with their d1/d2 and, for a
        text-to-image model, the prompt of the closest sample: copying there goes prompt by prompt)."""
        ranked = sorted(result.items, key=lambda it: nan_last(it.get("ratio")))
        images: dict[str, str] = {}
        for it in ranked:
            if it["nn1"] is not None and len(images) < CLOSEST_IMAGES and str(it["nn1"]) not in images:
                prompt = f', prompt "{_short(it["prompt"])}"' if it.get("prompt") else ""
                images[str(it["nn1"])] = f"{it['nn1']} (d1/d2 {_float(it['ratio']):.2f}{prompt})"
        closest = [
            {"seed": it["seed"], "ratio": it["ratio"], "training_id": it["nn1"], **_prompt_of(it)} for it in ranked[:5]
        ]
        return {
            "onset": result.metrics["onset"],
            "band": [result.metrics["onset_low"], result.metrics["onset_high"]],
            "closest": closest,
            "prompts_at_risk": prompts_at_risk(result.items),
            "closest_images": ", ".join(images.values()) or "none",
        }


def prompts_at_risk(items: list[dict[str, Any]], limit: int = 5) -> list[dict[str, Any]]:
    """Per prompt (text-to-image items only): its closest seed's d1/d2 and training image, and the earliest
    forecast crossing among its seeds; the prompts with a crossing first (earliest first), then by d1/d2.

    Example:
        >>> rows = [{"prompt": "a fox", "ratio": 0.5, "nn1": "fox.png", "crossing": 900.0},
        ...         {"prompt": "a fox", "ratio": 0.4, "nn1": "fox.png", "crossing": float("nan")},
        ...         {"prompt": "a cat", "ratio": 0.3, "nn1": "cat.png", "crossing": float("nan")}]
        >>> [(p["prompt"], p["ratio"], p["crossing"]) for p in prompts_at_risk(rows)]
        [('a fox', 0.4, 900.0), ('a cat', 0.3, nan)]
    """
    by_prompt: dict[str, dict[str, Any]] = {}
    for it in items:
        if not it.get("prompt"):
            continue
        ratio, crossing = _float(it.get("ratio")), _float(it.get("crossing"))
        row = by_prompt.setdefault(it["prompt"], {"prompt": it["prompt"], "ratio": math.nan, "training_id": None,
                                                  "crossing": math.nan})  # fmt: skip
        if nan_last(ratio) < nan_last(row["ratio"]):
            row["ratio"], row["training_id"] = ratio, it.get("nn1")
        row["crossing"] = min(row["crossing"], crossing, key=nan_last)
    ranked = sorted(by_prompt.values(), key=lambda r: (nan_last(r["crossing"]), nan_last(r["ratio"])))
    return ranked[:limit]


def _prompt_of(item: dict[str, Any]) -> dict[str, str]:
    return {"prompt": item["prompt"]} if item.get("prompt") else {}


def _short(prompt: str, limit: int = 60) -> str:
    """A prompt short enough for a one-line message."""
    return prompt if len(prompt) <= limit else prompt[: limit - 1].rstrip() + "…"


def _float(v: Any) -> float:
    """A stored number, NaN for missing (JSON has no NaN: the store writes null)."""
    return math.nan if v is None else float(v)
