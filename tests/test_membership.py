"""Membership probe: denoising losses, rank metrics against scikit-learn, and a briefly overfit model."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from sklearn.metrics import roc_auc_score, roc_curve
from support.models import tiny_unet
from support.tolerance import ONE_PASS

from memwatch.errors import MemwatchError
from memwatch.probes.membership import (
    MembershipConfig,
    denoising_losses,
    membership_probe,
    noise_seed_for,
)
from memwatch.signals.stats import roc_auc, tpr_at_fpr

TIMESTEPS = [50, 150, 300, 500]
# Overfitting run for the end-to-end check: ~1-2 s on 2 idle cores; 100 Adam steps on 4 random
# 16x16 images already separate all 4 members from 4 holdout images in trial runs.
OVERFIT_STEPS = 100
OVERFIT_LR = 2e-3


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def overfit():
    """A UNet trained only on 4 images, plus 4 holdout images from the same distribution."""
    net = tiny_unet(seed=1)
    sched = DDPMScheduler(num_train_timesteps=1000)
    data = images(8, seed=7)
    members, holdout = data[:4], data[4:]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=OVERFIT_LR)
    net.train()
    for _ in range(OVERFIT_STEPS):
        x0 = members * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        loss = (net(sched.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return net, sched, members, holdout


# ---- rank metrics against scikit-learn ---------------------------------------------------------


def sklearn_tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    f, t, _ = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    return float(t[f <= fpr + 1e-12].max())


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_metrics_match_sklearn(seed, tied):
    rng = np.random.default_rng(seed)
    pos = rng.normal(0.5, 1.0, 150)
    neg = rng.normal(0.0, 1.0, 200)
    if tied:  # few distinct values: many ties within and across groups
        pos, neg = np.round(pos), np.round(neg)
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    assert roc_auc(pos, neg) == pytest.approx(roc_auc_score(y, np.r_[pos, neg]), abs=1e-12)
    for fpr in [0.0, 0.01, 0.05, 0.1, 0.3, 1.0]:
        assert tpr_at_fpr(pos, neg, fpr) == pytest.approx(sklearn_tpr_at_fpr(pos, neg, fpr), abs=1e-12)


def test_roc_metrics_small_cases_and_tensors():
    assert roc_auc([3.0, 2.0], [1.0, 2.0]) == 0.875
    assert roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    # strict ">": tied member and holdout scores cannot both be called members at FPR 0
    assert tpr_at_fpr([2.0, 1.0], [1.0], fpr=0.0) == 0.5
    assert tpr_at_fpr([2.0, 1.0], [1.0], fpr=1.0) == 1.0


def test_roc_metrics_nan_when_undefined():
    assert math.isnan(roc_auc([1.0], []))
    assert math.isnan(tpr_at_fpr([], [1.0]))
    assert math.isnan(roc_auc([float("nan")], [1.0]))
    with pytest.raises(MemwatchError, match="fpr"):
        tpr_at_fpr([1.0], [0.0], fpr=1.5)


# ---- denoising losses --------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_matches_its_definition(unet, prediction_type):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    x = images(2, seed=3)
    seeds = [11, 12]
    got = denoising_losses(unet, sched, x, timesteps=[100, 400], noise_seeds=seeds)
    expected = []
    with torch.no_grad():
        for i in range(2):
            x0 = x[i : i + 1] * 2 - 1
            per_t = []
            for k, t_val in enumerate([100, 400]):
                noise = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(seeds[i] * 1000 + k))
                t = torch.tensor([t_val])
                pred = unet(sched.add_noise(x0, noise, t), t).sample
                target = {
                    "epsilon": noise,
                    "v_prediction": sched.get_velocity(x0, noise, t),
                    "sample": x0,
                }[prediction_type]
                per_t.append(float((pred - target).pow(2).mean()))
            expected.append(sum(per_t) / 2)
    torch.testing.assert_close(got, torch.tensor(expected), **ONE_PASS)


def test_losses_deterministic_batch_and_order_independent(unet):
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = images(5, seed=4)
    seeds = [noise_seed_for(f"img{i}") for i in range(5)]
    a = denoising_losses(unet, sched, x, timesteps=TIMESTEPS, noise_seeds=seeds, batch_size=5)
    b = denoising_losses(unet, sched, x, timesteps=TIMESTEPS, noise_seeds=seeds, batch_size=5)
    assert torch.equal(a, b)
    c = denoising_losses(unet, sched, x, timesteps=TIMESTEPS, noise_seeds=seeds, batch_size=2)
    torch.testing.assert_close(c, a, **ONE_PASS)
    perm = [3, 0, 4, 1, 2]
    d = denoising_losses(unet, sched, x[perm], timesteps=TIMESTEPS, noise_seeds=[seeds[i] for i in perm])
    torch.testing.assert_close(d, a[perm], **ONE_PASS)
    other = denoising_losses(unet, sched, x, timesteps=TIMESTEPS, noise_seeds=[s + 1 for s in seeds])
    assert not torch.allclose(other, a)


def test_losses_leave_rng_and_training_state_alone():
    net = tiny_unet()
    net.train()
    sched = DDPMScheduler(num_train_timesteps=1000)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    denoising_losses(net, sched, images(2, seed=0), timesteps=[10], noise_seeds=[1, 2])
    assert torch.equal(torch.get_rng_state(), before)
    assert all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_losses_reject_bad_input(unet):
    sched = DDPMScheduler(num_train_timesteps=1000)
    x = images(2, seed=0)
    with pytest.raises(MemwatchError, match="noise_seeds"):
        denoising_losses(unet, sched, x, timesteps=[10], noise_seeds=[1])
    with pytest.raises(MemwatchError, match="outside"):
        denoising_losses(unet, sched, x, timesteps=[1000], noise_seeds=[1, 2])


# ---- the probe ---------------------------------------------------------------------------------


def test_overfit_model_fits_members_better(overfit):
    net, sched, members, holdout = overfit
    result = membership_probe(
        net,
        sched,
        members,
        holdout,
        member_ids=[f"m{i}" for i in range(4)],
        holdout_ids=[f"h{i}" for i in range(4)],
        timesteps=TIMESTEPS,
    )
    m = result.metrics
    assert result.probe == "membership"
    assert m["loss_member"] < m["loss_holdout"]
    assert m["loss_gap"] == pytest.approx(m["loss_holdout"] - m["loss_member"])
    assert m["loss_gap_share"] == pytest.approx(m["loss_gap"] / m["loss_holdout"])
    assert m["mia_auc"] > 0.5
    assert 0.0 <= m["tpr_at_1fpr"] <= 1.0
    assert [(r["item"], r["group"]) for r in result.items] == [(f"m{i}", "member") for i in range(4)] + [
        (f"h{i}", "holdout") for i in range(4)
    ]
    member_losses = [r["loss"] for r in result.items if r["group"] == "member"]
    assert m["loss_member"] == pytest.approx(np.mean(member_losses))
    assert result.timings["membership"] >= 0.0


def test_probe_per_item_loss_independent_of_subset(overfit):
    net, sched, members, holdout = overfit
    ids = ["a", "b", "c", "d"]
    full = membership_probe(net, sched, members, holdout[:0], member_ids=ids, holdout_ids=[], timesteps=[50])
    sub = membership_probe(
        net, sched, members[[2, 0]], holdout[:0], member_ids=["c", "a"], holdout_ids=[], timesteps=[50]
    )
    by_id = {r["item"]: r["loss"] for r in full.items}
    for row in sub.items:
        assert row["loss"] == pytest.approx(by_id[row["item"]], abs=1e-5)


def test_empty_holdout_gives_nan_metrics(overfit):
    net, sched, members, _ = overfit
    result = membership_probe(net, sched, members[:2], None, member_ids=["a", "b"], holdout_ids=[], timesteps=[50])
    m = result.metrics
    assert math.isfinite(m["loss_member"])
    for key in ("loss_holdout", "loss_gap", "loss_gap_share", "mia_auc", "tpr_at_1fpr"):
        assert math.isnan(m[key]), key
    assert len(result.items) == 2


def test_v_prediction_probe_runs(unet):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    result = membership_probe(
        unet, sched, images(2, 1), images(2, 2), member_ids=["a", "b"], holdout_ids=["c", "d"], timesteps=[50]
    )
    assert all(math.isfinite(v) for v in result.metrics.values())


def test_probe_rejects_mismatched_ids(unet):
    sched = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(MemwatchError, match="member_ids"):
        membership_probe(unet, sched, images(2, 1), None, member_ids=["a"], holdout_ids=[])


def test_config_defaults_and_validation():
    cfg = MembershipConfig()
    assert (cfg.every, cfg.num_members, cfg.num_holdout, cfg.batch_size) == (50, 64, 64, 16)
    assert cfg.timesteps == [50, 150, 300, 500]
    with pytest.raises(MemwatchError, match="membership.timesteps"):
        MembershipConfig(timesteps=[])
    assert MembershipConfig(every=0).every == 0  # 0 turns the probe off
    with pytest.raises(MemwatchError, match="membership.every"):
        MembershipConfig(every=-1)


def test_noise_seed_is_sha256_prefix():
    assert noise_seed_for("x.png") == int(hashlib.sha256(b"x.png").hexdigest()[:8], 16)
    assert noise_seed_for("x.png") != noise_seed_for("y.png")
    assert noise_seed_for(17) == noise_seed_for("17")  # ids are hashed as text


def test_default_rules_warn_on_a_large_loss_gap():
    """The member-loss-gap warning fires once the members' loss is GAP_SHARE below the holdout's, not before,
    and only once while the gap stays open."""
    from memwatch.core.config import load_config
    from memwatch.probes.membership import GAP_SHARE
    from memwatch.signals.rules import RuleEngine

    engine = RuleEngine(load_config(None).rules)
    fired = {}
    for step, share in [(100, 0.1), (200, GAP_SHARE - 0.01), (300, GAP_SHARE), (400, 0.6)]:
        for event in engine.observe(step, {"membership/loss_gap_share": share}):
            fired.setdefault(event.rule, (step, event.severity, event.message))
    step, severity, message = fired["member-loss-gap"]
    assert (step, severity) == (300, "warning")
    assert "35% below the held-out images'" in message
