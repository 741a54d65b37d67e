"""The identity probe: do generated faces leak training identities, or blend two of them?

The face pipeline, the gallery of training identities and the metrics live in :mod:`memwatch.faces`;
this is the probe object that plugs them into every front-end. It reads the shared fixed-seed
samples. The gallery is built once per run, on first use; that first result also records the
gallery itself (``identity_gallery``: identities, faces, calibration) as a companion result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from memwatch.core.evidence import EvidencePair
from memwatch.core.probe import Metric, Probe, ProbeContext, ProbeRecord, ProbeResult
from memwatch.faces.config import IdentityConfig


def identity_pairs(items: Sequence[dict[str, Any]]) -> list[EvidencePair]:
    """Faces that leak a training identity or blend two, beside the matched training face."""
    pairs = []
    for i, it in enumerate(items):
        if (it.get("leak") or it.get("interpolation")) and it.get("identity_item"):
            # a blend names both parents (the training face shown is the closer one's)
            who = f"blend {it['parent_a']}+{it['parent_b']}" if it.get("interpolation") else f"leak {it['identity']}"
            label = f"seed {it['seed']} {who} s={float(it['similarity']):.2f}"
            pairs.append(EvidencePair(i, it["identity_item"], 1.0 - float(it["similarity"]), label, True))
    return pairs


#: The memorization chart's panel of faces.
FACES = "faces"


class IdentityProbe(Probe):
    """Identity leakage and interpolation of the shared samples (see :mod:`memwatch.faces.probe`)."""

    name = "identity"
    Settings = IdentityConfig
    order = 30
    needs_samples = True
    companions = ("identity_gallery", "identity_paths")
    metrics = ("num_samples", "faces_found", "face_detection_rate", "face_detect_errors",
               Metric("identity_leak_rate", role="share", panel=FACES, out_of="faces_found",
                      label="identity leak rate: faces that are a training person"),
               Metric("identities_leaked", role="count", panel=FACES, label="people leaked",
                      onset="first identity leak"),
               Metric("identity_interpolation_rate", role="share", panel=FACES,
                      label="identity interpolation rate: faces that blend two people"),
               "identity_leak_share", "identity_interpolations", "identity_pairs_interpolated", "identity_sim_p50",
               "identity_sim_p95", "instance_faces", "instance_face_rate",
               Metric("identity_sim_max", role="precursor", panel=FACES, threshold="identity_threshold",
                      label="precursor: closest approach of any face to a training person"),
               "gallery_identities", "gallery_faces", "identity_threshold", "threshold_calibrated",
               "threshold_target_fmr", "threshold_fmr", "threshold_fnmr", "threshold_impostor_pairs",
               "identity_leak_baseline", "identity_leak_excess",
               Metric("leak_onset", role="forecast", panel=FACES, label="identity leak forecast"), "leak_onset_low",
               "leak_onset_high", "leak_steps_to_onset", "leak_slope_t", "people_approaching",
               Metric("path_blend_ability", role="share", panel=FACES, out_of="path_pairs",
                      label="blend ability: identity paths with a face that passes as both people"),
               Metric("path_pairs_blending", role="count", panel=FACES, label="people pairs blended on a path",
                      onset="first blend on an identity path"),
               "path_pairs", "path_pairs_snapping", "path_mmpmr", "path_face_rate",
               Metric("path_closeness", role="precursor", panel=FACES, threshold="identity_threshold",
                      label="precursor: closest any identity path comes to a face passing as both"),
               Metric("blend_onset", role="forecast", panel=FACES, label="identity blend forecast"),
               "blend_onset_low", "blend_onset_high", "blend_steps_to_onset")  # fmt: skip
    unmeasured = "no identity probe result: faces were not checked for leaked training identities"
    default_rules = (
        {
            "name": "first-identity-leak",
            "type": "first",
            "metric": "identity/identities_leaked",
            "op": ">",
            "value": 0,
            "severity": "warning",
            "source": "a generated face verifies against a training identity at the calibrated false-match rate "
            "(default 1e-4)",
            "message": "step {step}: a generated face matches a training identity (verification threshold passed)",
        },
        {
            "name": "identity-leak-high",
            "type": "threshold",
            "metric": "identity/identity_leak_share",
            "op": ">=",
            "value": 0.1,
            "for": 2,
            "severity": "critical",
            "source": "memwatch default: 10% of all generated samples being training identities, sustained for 2 "
            "probes (over all samples, not the faces found: one face of 32 samples is not 100% leaking)",
            "message": "step {step}: {value:.0%} of generated samples are training identities (>= {threshold:.0%} "
            "for 2 probes)",
        },
        {
            "name": "first-identity-blend",
            "type": "first",
            "metric": "identity/identity_interpolations",
            "op": ">",
            "value": 0,
            "severity": "warning",
            "source": "MMPMR-style (Scherhag et al. 2017): the face verifies against two training identities that do "
            "not verify against each other",
            "message": "step {step}: a generated face blends two training identities",
        },
        {
            "name": "first-identity-path-blend",
            "type": "first",
            "metric": "identity/path_pairs_blending",
            "op": ">",
            "value": 0,
            "severity": "warning",
            "source": "MMPMR over an identity path (Scherhag et al. 2017): asked for faces between two training people "
            "it reproduces, the model makes one that verifies against both (faces/paths.py)",
            "message": "step {step}: the model can blend two training people: a face on the path between them passes "
            "as both",
        },
        {
            "name": "identity-blend-forecast",
            "type": "forecast",
            "metric": "identity/blend_onset",
            "horizon_share": 0.5,
            "severity": "warning",
            "source": "the leak forecast (faces/probe.py leak_forecast) applied to the identity paths' closest "
            "approach to a face that passes as both people (path_closeness); not tuned on blends",
            "message": "step {step}: faces between two training people approach passing as both; a blend is "
            "forecast at step {forecast_step} (band {forecast_low}-{forecast_high}); keep {keep}",
        },
        {
            "name": "identity-leak-forecast",
            "type": "forecast",
            "metric": "identity/leak_onset",
            "horizon_share": 0.5,
            "severity": "warning",
            "source": "the onset forecast's rule applied to the people's closest approaches (faces/probe.py "
            "leak_forecast); its settings were tuned for copies (scripts/bench_warnings.py), not for faces",
            "message": "step {step}: generated faces approach training people; a leak is forecast at step "
            "{forecast_step} (band {forecast_low}-{forecast_high}); closest: {evidence[closest_people]}; keep {keep}",
        },
    )

    def __init__(self, settings: IdentityConfig | None = None, **values: Any):
        super().__init__(settings, **values)
        self._gallery: Any = None

    def reduce(self, rows: list[dict[str, Any]], ctx: ProbeContext) -> list[ProbeResult]:
        from memwatch.data.embed_cache import EmbeddingCache
        from memwatch.faces import build_gallery, identity_probe, load_face_pipeline
        from memwatch.faces.paths import draw_paths
        from memwatch.faces.probe import LEAK_WINDOW, check_instance, closest_approaches, leak_forecast

        assert ctx.samples is not None
        cfg = self.settings
        out: list[ProbeResult] = []
        if self._gallery is None:
            t0 = time.perf_counter()
            self._gallery = build_gallery(
                ctx.data.refs,
                load_face_pipeline(cfg),
                cfg,
                cache=EmbeddingCache(ctx.data.cache_dir),
                holdout=ctx.data.holdout,
            )
            check_instance(self._gallery, cfg)
            summary = {k: float(v) for k, v in self._gallery.summary().items() if isinstance(v, int | float)}
            gallery = ProbeResult(f"{self.name}_gallery", summary, items=self._gallery.assignments)
            ctx.add_time("face_gallery", time.perf_counter() - t0)
        else:
            gallery = None
        t0 = time.perf_counter()
        seeds = ctx.samples.plan.seeds
        result = identity_probe(
            ctx.samples.images, self._gallery, cfg, names=[f"seed-{s:06d}" for s in seeds], seeds=seeds
        )
        ctx.add_time("identity", time.perf_counter() - t0)
        # each person's closest approach over time: the precursor of the first identity leak
        past = [(e["step"], closest_approaches(e["items"])) for e in ctx.earlier(self.name, LEAK_WINDOW - 1)]
        forecast = leak_forecast([*past, (ctx.step, closest_approaches(result.items))], self._gallery.threshold)
        result.metrics.update(forecast["metrics"])
        if cfg.paths:  # the ability to blend, asked of the model directly (faces/paths.py)
            t0 = time.perf_counter()
            metrics, rows = draw_paths(ctx, result.items, self._gallery, cfg)
            result.metrics.update(metrics)
            # the paths' closest approach to a face passing as both people, over time: the blend's precursor
            closeness = [
                (e["step"], e["metrics"].get("path_closeness")) for e in ctx.earlier(self.name, LEAK_WINDOW - 1)
            ]
            trajectory = [(s, {"paths": c}) for s, c in [*closeness, (ctx.step, metrics["path_closeness"])]
                          if c is not None and math.isfinite(c)]  # fmt: skip
            blend = leak_forecast(trajectory, self._gallery.threshold)["metrics"] if trajectory else {}
            keys = ("leak_onset", "leak_onset_low", "leak_onset_high", "leak_steps_to_onset")
            result.metrics.update({k.replace("leak_", "blend_"): blend.get(k, math.nan) for k in keys})
            out.append(ProbeResult(f"{self.name}_paths", {k: float(v) for k, v in metrics.items()}, items=rows))
            ctx.add_time("identity_paths", time.perf_counter() - t0)
        out.insert(0, result)
        if gallery is not None:
            out.append(gallery)
        return out

    def evidence(self, result: ProbeResult) -> dict[str, Any]:
        from memwatch.faces.probe import identity_evidence

        return identity_evidence(result)

    @classmethod
    def evidence_pairs(cls, result: ProbeResult) -> list[EvidencePair]:
        return identity_pairs(result.items)

    @classmethod
    def limitations(cls, record: ProbeRecord) -> list[tuple[str, str]]:
        out = super().limitations(record)
        if not record.results:
            return out
        latest = {m["metric"]: m["value"] for m in record.metrics}  # rows come by step: the last one wins
        if latest.get("threshold_calibrated") == 0.0:
            out.append(
                (
                    "face-threshold-uncalibrated",
                    "the face verification threshold was not calibrated on this data: identity leaks rest on a "
                    "generic threshold",
                )
            )
        rows = [r for r in record.items if r.get("probe") == cls.name]
        if not rows or any(not r.get("matcher_weights_sha256") for r in rows):  # rows of older versions name none
            out.append(
                (
                    "face-weights-unverified",
                    "the face matcher's weights sha256 is not recorded in the store: their provenance cannot be "
                    "checked from this report",
                )
            )
        return out
