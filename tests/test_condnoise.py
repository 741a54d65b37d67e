"""The conditional-noise (Wen et al. 2024) probe: scores, determinism and member/holdout metrics."""

from __future__ import annotations

import math

import pytest
import torch
from support.tolerance import ONE_PASS

from memwatch.errors import MemwatchError
from memwatch.models.parts import ModelParts
from memwatch.probes.condnoise import (
    CondNoiseConfig,
    condnoise_evidence,
    condnoise_from_items,
    condnoise_probe,
    condnoise_scores,
)
from memwatch.sampling.ddim import ddim_from, seed_noise
from memwatch.sampling.text_to_image import encode_prompts
from memwatch.signals.stats import roc_auc

FAST = {"num_inference_steps": 10, "num_generations": 2}


def test_first_step_score_is_the_norm_of_the_prediction_difference(snap: ModelParts) -> None:
    prompts = ["a red fox", "a blue car"]
    got = condnoise_scores(snap, prompts, num_steps=1, **FAST)
    # reference: UNet called directly at the first DDIM timestep on each generation's seed noise
    ddim = ddim_from(snap.scheduler)
    ddim.set_timesteps(FAST["num_inference_steps"])
    t = ddim.timesteps[0]
    text = snap
    with torch.no_grad():
        cond = encode_prompts(text.tokenizer, text.text_encoder, prompts)
        empty = encode_prompts(text.tokenizer, text.text_encoder, [""])
        expected = torch.zeros(2)
        for g in range(FAST["num_generations"]):
            x = seed_noise(g, (4, 8, 8))[None].expand(2, -1, -1, -1)
            diff = (
                snap.unet(x, t, encoder_hidden_states=cond).sample
                - snap.unet(x, t, encoder_hidden_states=empty.expand(2, -1, -1)).sample
            )
            expected += diff.flatten(1).norm(dim=1) / FAST["num_generations"]
    torch.testing.assert_close(got, expected, **ONE_PASS)


def test_empty_prompt_scores_zero_and_scores_do_not_depend_on_the_batch(snap: ModelParts) -> None:
    prompts = ["a red fox", "", "a blue car", "a red fox on grass"]
    together = condnoise_scores(snap, prompts, num_steps=2, batch_size=3, **FAST)
    # The empty prompt's conditional and unconditional predictions are equal up to float rounding
    # (they sit in different rows of a batched CPU convolution, which may round differently).
    assert together[1] < 1e-4 and (together[[0, 2, 3]] > 1e-2).all()
    alone = condnoise_scores(snap, prompts[2:3], num_steps=2, batch_size=1, **FAST)
    torch.testing.assert_close(together[2:3], alone, **ONE_PASS)
    assert torch.equal(condnoise_scores(snap, prompts, num_steps=2, batch_size=3, **FAST), together)


def test_guidance_only_matters_after_the_first_step(snap: ModelParts) -> None:
    prompts = ["a red fox", "a blue car"]

    def score(steps: int, scale: float) -> torch.Tensor:
        return condnoise_scores(snap, prompts, num_steps=steps, guidance_scale=scale, **FAST)

    torch.testing.assert_close(score(1, 1.0), score(1, 7.5))  # x_T is the seed noise either way
    assert not torch.allclose(score(3, 1.0), score(3, 7.5))  # later x_t follow the guided trajectory


def test_probe_rows_metrics_and_evidence(snap: ModelParts) -> None:
    members, holdout = ["a red fox", "a red fox on grass", "a fox"], ["a blue car", "a green boat"]
    cfg = CondNoiseConfig(num_steps=1, num_generations=1, num_inference_steps=10, batch_size=2, top_k=2)
    result = condnoise_probe(snap, members, holdout, cfg)
    assert result.probe == "condnoise" and result.timings["condnoise"] > 0
    assert [(r["item"], r["group"]) for r in result.items] == [(p, "member") for p in members] + [
        (p, "holdout") for p in holdout
    ]
    scores = {r["item"]: r["score"] for r in result.items}
    direct = condnoise_scores(snap, members + holdout, num_steps=1, num_generations=1, num_inference_steps=10)
    assert list(scores.values()) == pytest.approx(direct.tolist(), rel=1e-5)
    m = result.metrics
    assert m["condnoise_member"] == pytest.approx(sum(scores[p] for p in members) / 3)
    assert m["condnoise_holdout"] == pytest.approx(sum(scores[p] for p in holdout) / 2)
    assert m["condnoise_auc"] == roc_auc([scores[p] for p in members], [scores[p] for p in holdout])
    top = condnoise_evidence(result, cfg.top_k)["top_prompts"]
    assert [t["prompt"] for t in top] == sorted(scores, key=scores.get, reverse=True)[:2]


def test_metrics_from_items() -> None:
    rows = [
        {"item": "m1", "group": "member", "score": 9.0},
        {"item": "h1", "group": "holdout", "score": 5.0},
        {"item": "m2", "group": "member", "score": 4.0},
        {"item": "h2", "group": "holdout", "score": 1.0},
    ]
    r = condnoise_from_items(rows)
    assert r.metrics["condnoise_member"] == 6.5 and r.metrics["condnoise_holdout"] == 3.0
    assert r.metrics["condnoise_gap"] == 3.5
    assert r.metrics["condnoise_auc"] == 0.75  # pairs (m, h) with m > h: 3 of 4
    assert [x["rank"] for x in r.items] == [1, 2, 3, 4]
    assert "rank" not in rows[0]  # the caller's rows are not modified
    no_holdout = condnoise_from_items(rows[:1])
    assert math.isnan(no_holdout.metrics["condnoise_auc"]) and math.isnan(no_holdout.metrics["condnoise_holdout"])
    with pytest.raises(MemwatchError, match=r"group 'train'"):
        condnoise_from_items([{"item": "x", "group": "train", "score": 1.0}])


def test_config_is_validated() -> None:
    with pytest.raises(MemwatchError, match=r"setting 'probes.condnoise.num_steps' must be >= 1, got 0"):
        CondNoiseConfig(num_steps=0)
    with pytest.raises(MemwatchError, match=r"num_steps' \(5\) must not exceed num_inference_steps \(4\)"):
        CondNoiseConfig(num_steps=5, num_inference_steps=4)
