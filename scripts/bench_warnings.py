#!/usr/bin/env python
"""The warning benchmark: do memwatch's default rules warn *before* memorization begins, and how early?

A sweep over training-set sizes n, several seeds each. Every run trains a small DDPM (the demo's recipe
at 16x16: a 0.16M-parameter UNet2DModel, v-prediction, batch 32, AdamW 1e-3) with memwatch's
in-training monitor at its default settings (default probes, cadence and rules), and measures the
ground truth beside it with dense, large probes: every 50 steps (controls with the monitor: every 200),
64 fixed-seed samples, each compared with the training set by d1/d2 (the regurgitation probe's own
definition, so the truth and the monitor measure the same thing).

* onset step: the first dense probe at which ``mem_fraction`` >= 0.05; first copy: the first dense probe
  at which any sample has d1/d2 < 1/3;
* first warning: the first event of severity warning or above in the monitor's store;
* lead: onset - first warning (steps, and as a share of the onset step); a miss is an onset without an
  earlier warning; a false alarm is any warning in a run without onset within the step budget.

Images: the demo's public-domain photo crops (``assets/demo/control``, 384 crops; sizes up to 256) and
scikit-learn's handwritten digits (1,797 images of 8x8, upsampled; sizes above 256), all at 16x16.
Each run also gets 32 held-out images of the same family (the membership probe).

Which images (``--canaries 2 4 8``): some training images are planted as duplicates (byte copies, each
level once per run; :mod:`memwatch.frontends.canaries`), and the dense truth records every seed's nearest training
image, so each image's true first copy is known. Per memorizing run: the Spearman correlation between
memwatch's image ranking at half the onset step (:mod:`memwatch.signals.image_risk`, from the monitor's own
probes up to then) and the true order of first copies; the precision of its top-k against the first k
images copied (k = 5, or fewer when fewer were copied); for each canary, its first copy and when memwatch
first put it at risk, against the onset.

Runs are independent processes (``--jobs``, one torch thread each). Each run leaves its folder under
``--out``: the monitor's store (``memwatch/``) and ``truth.json`` (the dense probes: every seed's d1/d2 and
nearest training image at every dense step). Analysis only (``--analyse``) re-reads those folders;
``--same-as OTHER`` compares each run's probed steps and events with the same run in another ``--out``
(the same seeds run at another time, under another load: the cadence counts work, so they must agree).

    python scripts/bench_warnings.py --quick --json runs/bench_warnings_quick.json
    python scripts/bench_warnings.py --json docs/bench_warnings.json --plots docs/img
    python scripts/bench_warnings.py --t2i --help     # text-to-image fine-tunes: scripts/bench_t2i.py

The full sweep takes hours on 2 cores; it can be measured in parts (``--sizes``/``--seeds``), each added to
one JSON with ``--merge``. Every row says when and with which memwatch sources it was measured
(``measured``), and the summary lists the sources (``measured_with``): one entry, or the parts are not one sweep.

The summary JSON: ``{"runs": [{"n", "seed", "family", "onset_step", "first_copy_step",
"first_warning_step", "first_warning_rule", "lead_steps", "lead_fraction", ...}], "summary": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16
HOLDOUT = 32
ONSET_FRACTION = 0.05
#: the monitor's seeds (its default num_samples): the truth also records them sampled with FAST_STEPS
MONITOR_SEEDS = 32
FAST_STEPS = 10
#: DDIM steps of the dense truth's 64 samples: fixed (the tuning runs' truth was sampled so), not the
#: monitor's default, so that the truth does not move when the monitor's sampling does
TRUTH_STEPS = 25
#: Sizes that memorize within the budget, and the controls (sizes that do not), each with its seeds. The
#: controls get more seeds: a false alarm is rarer than a lead is variable. Tuning and reporting seeds are
#: disjoint (``--tune``: the defaults were chosen on those runs; the report is on the others).
MEMORIZING, CONTROLS = [8, 16, 32, 64], [256, 1024]
FULL = {"memorizing": [0, 1, 2], "controls": [0, 1, 2, 3, 4, 5], "steps": 8000}
TUNE = {"memorizing": [100, 101, 102], "controls": [100, 101, 102, 103, 104, 105], "steps": 8000}
#: <= 12 minutes on 2 cores: three small runs on one core, and on the other the n = 256 seed whose closest
#: seed's d1/d2 drifted late in the full sweeps (false alarms at 2,800 on 2026-12-01, 5,528 on 2026-12-06), run
#: past that drift.
QUICK = {"sizes": {8: [0, 1], 16: [0], 256: [1]}, "steps": 6000}
#: A control's truth, when the monitor runs, only has to show that no onset came (and it counts against the
#: monitor: an onset the sparser truth overlooks turns a warning into a false alarm): measured every 200 steps,
#: a quarter of the cost. Tuning runs (``--no-monitor``) keep every 50: tune_forecast.py replays probes there.
CONTROL_DENSE_EVERY = 200


@dataclass
class RunSpec:
    n: int
    seed: int
    steps: int
    out: str
    dense_every: int = 50
    dense_samples: int = 64
    monitor: bool = True
    config: str | None = None
    canaries: tuple[int, ...] = ()
    #: scripts/bench_interventions.py: ``none``, ``drop`` (ImageWeights), ``gate`` (LossGate) or ``rollback``
    #: (rollback to the last clean checkpoint at the first warning, the images at risk dropped); every arm
    #: trains exactly as ``none`` until its intervention first changes something
    intervention: str = "none"
    #: train the whole budget (no stop after onset), and measure quality at the end
    full_budget: bool = False

    @property
    def family(self) -> str:
        return "photos" if self.n <= 256 else "digits"

    @property
    def name(self) -> str:
        return f"n{self.n:04d}-s{self.seed}"


# ---------------------------------------------------------------------------------------------- data


def image_pool(family: str) -> list[Any]:
    """The family's images as 16x16 RGB PIL images, in a fixed order."""
    from PIL import Image

    if family == "photos":
        files = sorted((ROOT / "assets" / "demo" / "control").glob("*.png"))
        return [Image.open(f).convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BICUBIC) for f in files]
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (1797, 8, 8), values 0..16
    out = []
    for d in digits:
        gray = Image.fromarray((np.asarray(d) * (255 / 16)).astype("uint8"), mode="L")
        out.append(gray.resize((RESOLUTION, RESOLUTION), Image.BICUBIC).convert("RGB"))
    return out


def write_sets(spec: RunSpec, run_dir: Path) -> tuple[Path, Path]:
    """Draw n training and 32 held-out images (disjoint, by the run's seed) and write them as PNGs."""
    import numpy as np

    pool = image_pool(spec.family)
    if spec.n + HOLDOUT > len(pool):
        raise SystemExit(f"n={spec.n}: the {spec.family} pool has only {len(pool)} images")
    order = np.random.default_rng(1000 + spec.seed).permutation(len(pool))
    source = run_dir / "data" / ("source" if spec.canaries else "train")
    train, holdout = run_dir / "data" / "train", run_dir / "data" / "holdout"
    for folder, picks in ((source, order[: spec.n]), (holdout, order[spec.n : spec.n + HOLDOUT])):
        folder.mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(picks):
            pool[int(k)].save(folder / f"{i:04d}_{spec.family}{int(k):04d}.png")
    if spec.canaries:
        from memwatch.frontends.canaries import plant_canaries

        plant_canaries(source, train, levels=spec.canaries, seed=spec.seed, manifest=run_dir / "canaries.json")
    return train, holdout


# ---------------------------------------------------------------------------------------------- one run


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one run with the monitor and the dense ground truth; write and return its record."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel

    from memwatch import MemorizationMonitor
    from memwatch.data.reference_index import ReferenceIndex
    from memwatch.data.refset import load_reference_set
    from memwatch.embedders.pixel import PixelEmbedder
    from memwatch.probes.regurgitation import RegurgitationConfig, regurgitation_probe
    from memwatch.sampling.ddim import generate_samples

    torch.set_num_threads(1)
    run_dir = Path(spec.out) / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train_dir, holdout_dir = write_sets(spec, run_dir)
    refs = load_reference_set(train_dir)
    images = torch.stack([_tensor(it.path) for it in refs.items])  # [0, 1]
    index = ReferenceIndex(refs, PixelEmbedder(RESOLUTION), None)
    regurgitation = RegurgitationConfig()
    inference_steps = TRUTH_STEPS
    from memwatch.probes.membership import MembershipConfig, membership_probe

    members = images[: min(len(images), 64)]
    held = torch.stack([_tensor(f) for f in sorted(holdout_dir.glob("*.png"))])
    timesteps = MembershipConfig().timesteps

    torch.manual_seed(spec.seed)
    model = UNet2DModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=16,
    )  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    config: dict[str, Any] = {"run_name": spec.name}
    if spec.config:
        import yaml

        config.update(yaml.safe_load(Path(spec.config).read_text()) or {})
    config["output_dir"] = str(run_dir / "memwatch")
    monitor = (
        MemorizationMonitor(accelerator, config, reference=refs, holdout=str(holdout_dir)) if spec.monitor else None
    )
    arm = Intervention(spec, monitor, refs, run_dir, accelerator, model)
    gen = torch.Generator().manual_seed(spec.seed)
    truth: dict[str, Any] = {"steps": [], "ratios": [], "nn1": [], "mem_fraction": [], "ratios_fast": [],
                             "membership": [], "fast_steps": FAST_STEPS}  # fmt: skip
    onset = first_copy = None
    t0 = time.perf_counter()
    monitor_s = dense_s = 0.0
    step = 0
    for step in range(1, spec.steps + 1):
        picked = arm.draw(len(images), 32, gen)
        x = images[picked] * 2 - 1
        noise = torch.randn(x.shape, generator=gen)
        t = torch.randint(0, 1000, (x.shape[0],), generator=gen)
        pred = model(scheduler.add_noise(x, noise, t), t).sample
        loss = arm.loss(pred, scheduler.get_velocity(x, noise, t), t, picked, step)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        if monitor is not None:
            m0 = time.perf_counter()
            monitor.step(step, model, scheduler)
            monitor_s += time.perf_counter() - m0
            arm.after_step(step)
        if step % spec.dense_every == 0:
            d0 = time.perf_counter()
            samples = generate_samples(model, scheduler, range(spec.dense_samples),
                                       num_inference_steps=inference_steps, batch_size=64)  # fmt: skip
            result = regurgitation_probe(samples, index, regurgitation, seeds=list(range(spec.dense_samples)))
            ratios = [m["ratio"] for m in result.matches]
            frac = result.metrics["mem_fraction"]
            truth["steps"].append(step)
            truth["ratios"].append([round(r, 5) for r in ratios])
            truth["nn1"].append([m["nn1"] for m in result.matches])
            truth["mem_fraction"].append(frac)
            # the monitor's 32 seeds with fewer denoising steps: does a cheaper precursor track the full one?
            fast = generate_samples(model, scheduler, range(MONITOR_SEEDS), num_inference_steps=FAST_STEPS,
                                    batch_size=64)  # fmt: skip
            fast_result = regurgitation_probe(fast, index, regurgitation, seeds=list(range(MONITOR_SEEDS)))
            truth["ratios_fast"].append([round(m["ratio"], 5) for m in fast_result.matches])
            # the sampling-free signal at the same step: members (up to 64) against the 32 held-out images
            ms = membership_probe(model, scheduler, members, held, member_ids=[str(i) for i in range(len(members))],
                                  holdout_ids=[f"h{i}" for i in range(len(held))], timesteps=timesteps,
                                  batch_size=64).metrics  # fmt: skip
            truth["membership"].append({k: round(ms[k], 6) for k in ("loss_member", "loss_holdout", "mia_auc")})
            if first_copy is None and frac > 0:
                first_copy = step
            if onset is None and frac >= ONSET_FRACTION:
                onset = step
            dense_s += time.perf_counter() - d0
            # A memorizing run is followed a while past its onset, then stopped: the rest is cost only.
            if onset is not None and step >= max(1.3 * onset, onset + 400) and not spec.full_budget:
                break
    wall = time.perf_counter() - t0
    quality = final_quality(model, scheduler, spec, run_dir, members, held) if spec.full_budget else None
    arm.close(step)
    summary = monitor.close() if monitor is not None else {}
    record = {
        **asdict(spec),
        "family": spec.family,
        "steps_trained": step,
        "onset_step": onset,
        "first_copy_step": first_copy,
        "wall_s": round(wall, 1),
        "monitor_s": round(monitor_s, 1),
        "dense_s": round(dense_s, 1),
        "measured": provenance(),
        "intervention": spec.intervention,
        "interventions": arm.changes,
        "quality": quality,
        "monitor_summary": {
            k: summary.get(k) for k in ("onset_step", "first_alarm_step", "last_clean_step", "at_risk_step", "events")
        },  # fmt: skip
    }
    (run_dir / "truth.json").write_text(json.dumps({**record, "truth": truth}) + "\n")
    return record


class Intervention:
    """One arm of scripts/bench_interventions.py inside :func:`run_one`'s loop (``none``: the loop as it was).

    Every arm draws and computes its loss exactly as ``none`` until its intervention first changes
    something (weights left at 1 draw with the same ``randint``; a gate of 1s uses the same loss), so an arm
    and its baseline are the same run up to that step.
    """

    def __init__(self, spec: RunSpec, monitor: Any, refs: Any, run_dir: Path, accelerator: Any, model: Any):
        from memwatch.interventions import ImageWeights, LossGate

        self.kind, self.monitor, self.run_dir = spec.intervention, monitor, run_dir
        self.accelerator, self.model = accelerator, model
        self.ids = [it.id for it in refs.items]
        drops = self.kind in ("drop", "rollback") and monitor is not None
        self.weights = ImageWeights(monitor, self.ids) if drops else None
        self.gate = LossGate(monitor, num_train_timesteps=1000) if self.kind == "gate" else None
        self.rolled_back = False
        self.changes: list[dict[str, Any]] = []
        self.every = spec.dense_every

    def draw(self, n: int, k: int, gen: Any) -> Any:
        import torch

        w = self.weights.weights if self.weights is not None else None
        if w is None or bool((w == 1).all()) or not bool((w > 0).any()):  # (ImageWeights never drops all)
            return torch.randint(0, n, (k,), generator=gen)
        return torch.multinomial(w, k, replacement=True, generator=gen)

    def loss(self, pred: Any, target: Any, t: Any, picked: Any, step: int) -> Any:
        import torch.nn.functional as F

        if self.gate is None:
            return F.mse_loss(pred, target)
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        w = self.gate(per.detach(), t, ids=[self.ids[i] for i in picked.tolist()], step=step)
        return F.mse_loss(pred, target) if bool((w == 1).all()) else (per * w).mean()

    def after_step(self, step: int) -> None:
        from memwatch.interventions import rollback

        if self.weights is not None and self.weights.update(step):
            self.changes.append({"step": step, "kind": "weights", "images": list(self.weights.reweighted)})
        if self.kind != "rollback":
            return
        if step % self.every == 0:  # checkpoints a rollback can return to (saving changes nothing in training)
            self.accelerator.save_state(str(self.run_dir / f"checkpoint-{step}"))
        if not self.rolled_back and self.monitor.first_alarm_step is not None:
            self.rolled_back = True
            back = rollback(self.accelerator, self.monitor, self.model, self.run_dir, weights=self.weights)
            self.changes.append({"step": step, "kind": "rollback", "to_step": back})

    def close(self, step: int) -> None:
        if self.gate is not None:
            self.gate.close(step)
            self.changes.append({"kind": "gate", "gated": self.gate.gated, "examples": self.gate.examples})
        for folder in self.run_dir.glob("checkpoint-*"):  # the benchmark keeps truth and store, not states
            shutil.rmtree(folder, ignore_errors=True)


QUALITY_SAMPLES = 256


def final_quality(model: Any, scheduler: Any, spec: RunSpec, run_dir: Path, members: Any, held: Any) -> dict:
    """Sample quality at the end of a run, without downloaded weights: the kernel inception distance's
    estimator (Binkowski et al. 2018: unbiased MMD^2, cubic polynomial kernel) of 256 samples against the
    family's images the run never trained on, in the pixel embedder's space; and the held-out denoising loss."""
    import torch

    from memwatch.embedders.pixel import PixelEmbedder
    from memwatch.probes.membership import MembershipConfig, membership_probe
    from memwatch.sampling.ddim import generate_samples

    train = {p.name.split("_", 1)[1] for p in (run_dir / "data" / "train").glob("*.png")}
    unseen = [img for k, img in enumerate(image_pool(spec.family)) if f"{spec.family}{k:04d}.png" not in train]
    import numpy as np

    pool = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1) for im in unseen])
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(7))[:512]]
    samples = generate_samples(model, scheduler, range(10_000, 10_000 + QUALITY_SAMPLES),
                               num_inference_steps=TRUTH_STEPS, batch_size=64)  # fmt: skip
    embed = PixelEmbedder(RESOLUTION)
    kid = kernel_distance(embed.embed(samples), embed.embed(pool))
    ms = membership_probe(model, scheduler, members, held, member_ids=[str(i) for i in range(len(members))],
                          holdout_ids=[f"h{i}" for i in range(len(held))], timesteps=MembershipConfig().timesteps,
                          batch_size=64).metrics  # fmt: skip
    return {"kid": round(kid, 6), "holdout_loss": round(ms["loss_holdout"], 6), "unseen_images": len(pool),
            "samples": QUALITY_SAMPLES}  # fmt: skip


def kernel_distance(x: Any, y: Any) -> float:
    """Unbiased MMD^2 between rows of ``x`` and ``y`` with the kernel (x.y / d + 1)^3 (KID's estimator).

    Example:
        >>> import torch
        >>> a = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
        >>> abs(kernel_distance(a[:100], a[100:])) < 0.1
        True
    """
    x, y = x.double().flatten(1), y.double().flatten(1)
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m, n = len(x), len(y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def provenance() -> dict[str, Any]:
    """When and with which memwatch a run was measured: the git tree of ``src/`` (a run measured with changed
    sources says ``+changes``), so the parts of a sweep run in several sittings can be shown to be one version."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    tree = git("rev-parse", "HEAD:src") or "unknown"
    if git("status", "--porcelain", "--", "src"):
        tree += "+changes"
    return {"date": time.strftime("%Y-%m-%d"), "memwatch_src": tree}


def _tensor(path: Path) -> Any:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------- analysis


def warnings_of(run_dir: Path) -> list[dict[str, Any]]:
    """The monitor's stored events of severity warning or above, in step order."""
    from memwatch.signals.rules import severity_at_least
    from memwatch.store import Store

    store_path = run_dir / "memwatch" / "memwatch.sqlite"
    if not store_path.is_file():
        return []
    with Store(store_path, readonly=True) as store:
        run = store.runs()[0]["id"]
        events = store.events(run)
    return sorted((e for e in events if severity_at_least(e["severity"], "warning")), key=lambda e: e["step"])


def probes_and_events(run_dir: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
    """The monitor's probed (probe, step) pairs and its (rule, step, severity) events, in order."""
    from memwatch.store import Store

    store_path = run_dir / "memwatch" / "memwatch.sqlite"
    if not store_path.is_file():
        return [], []
    with Store(store_path, readonly=True) as store:
        run = store.runs()[0]["id"]
        probed = sorted((r["probe"], r["step"]) for r in store.results(run) if r["kind"] == "live")
        events = sorted((e["rule"], e["step"], e["severity"]) for e in store.events(run))
    return probed, events


def same_as(out: Path, other: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Did the runs in ``other`` (the same seeds and config, another time, another load) probe the same steps
    and raise the same events as those in ``out``? Compared up to the shorter run's last step, which that run
    probed only because it stopped there (the monitor probes the last step seen): of runs of other lengths, the
    steps before it."""
    compared, differ = [], []
    for row in rows:
        name = f"n{row['n']:04d}-s{row['seed']}"
        if not (other / name / "truth.json").is_file():
            continue
        lengths = (row["steps_trained"], json.loads((other / name / "truth.json").read_text())["steps_trained"])
        last = min(lengths) - (lengths[0] != lengths[1])
        records = []
        for folder in (out / name, other / name):
            probed, events = probes_and_events(folder)
            records.append(([p for p in probed if p[1] <= last], [e for e in events if e[1] <= last]))
        compared.append(name)
        if records[0] != records[1]:
            differ.append(name)
    return {"other": str(other), "runs_compared": compared, "runs_that_differ": differ}


def analyse_run(run_dir: Path) -> dict[str, Any]:
    """One run's row: truth, first warning, lead."""
    data = json.loads((run_dir / "truth.json").read_text())
    warnings = warnings_of(run_dir)
    first = warnings[0] if warnings else None
    onset = data["onset_step"]
    row = {
        "n": data["n"],
        "seed": data["seed"],
        "family": data["family"],
        "steps_trained": data["steps_trained"],
        "onset_step": onset,
        "first_copy_step": data["first_copy_step"],
        "first_warning_step": first["step"] if first else None,
        "first_warning_rule": first["rule"] if first else None,
        "forecast_at_warning": first.get("forecast_step") if first else None,
        "lead_steps": None,
        "lead_fraction": None,
        "wall_s": data["wall_s"],
        "monitor_s": data["monitor_s"],
        "measured": data.get("measured"),
    }
    row["images"] = image_check(run_dir, data)
    if onset is not None and first is not None:
        row["lead_steps"] = onset - first["step"]
        row["lead_fraction"] = round((onset - first["step"]) / onset, 4)
    return row


TOP_K = 5


def image_check(run_dir: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    """Which images: memwatch's ranking at half the onset step against the true order of first copies
    (Spearman, top-k precision), and each canary's true first copy and first at-risk step."""
    from scipy.stats import spearmanr

    from memwatch.data.refset import load_reference_set
    from memwatch.frontends.canaries import check_canaries
    from memwatch.signals.image_risk import image_trajectories, rank_images
    from memwatch.store import Store
    from memwatch.store.history import load_history

    truth, onset = data["truth"], data["onset_step"]
    store_path = run_dir / "memwatch" / "memwatch.sqlite"
    if onset is None or "nn1" not in truth or not store_path.is_file():
        return None
    first: dict[str, int] = {}  # true first copy of each training image (dense probes)
    for step, ratios, nns in zip(truth["steps"], truth["ratios"], truth["nn1"], strict=True):
        for r, nn in zip(ratios, nns, strict=True):
            if r is not None and r < 1 / 3:
                first.setdefault(nn, step)
    with Store(store_path, readonly=True) as store:
        history = load_history(store)
    early = [r for r in history.seeds if r["step"] <= onset // 2]
    refs = load_reference_set(run_dir / "data" / "train")
    ids = sorted({it.sha256: it.id for it in reversed(refs.items)}.values())  # the first id of each content
    never = max(truth["steps"]) + 1
    k = min(TOP_K, len(first))
    kth = sorted(first.values())[k - 1] if k else None
    truly_first = {i for i, st in first.items() if kth is not None and st <= kth}  # ties at the k-th step count

    def agreement(copies: dict[str, int] | None) -> tuple[float | None, float | None]:
        """Spearman and precision@k of the ranking at half the onset, with or without the data-set prior."""
        ranked = [r.training_id for r in rank_images(image_trajectories(early), threshold=history.mem_ratio,
                                                     training_copies=copies)]  # fmt: skip
        position = {i: n for n, i in enumerate(ranked)}
        rho = spearmanr([position.get(i, len(ranked)) for i in ids], [first.get(i, never) for i in ids]).statistic
        precision = len(set(ranked[:k]) & truly_first) / k if k else None
        return (None if rho != rho else round(float(rho), 4)), (None if precision is None else round(precision, 4))

    rho, precision = agreement(history.training_copies)  # the ranking memwatch reports
    rho_traj, precision_traj = agreement(None)  # from the run's samples alone
    analysed = history.training_set and history.training_set.get("analysis")
    grouped = {i for g in (analysed or {}).get("duplicate_groups", []) for i in g["ids"]}
    canaries = []
    manifest = run_dir / "canaries.json"
    if manifest.is_file():
        monitor = {c["id"]: c for c in check_canaries(run_dir, manifest)["canaries"]}
        for c in json.loads(manifest.read_text())["canaries"]:
            steps = [first[i] for i in (c["id"], *c["copy_ids"]) if i in first]
            canaries.append({
                "copies": c["copies"], "id": c["id"], "true_first_copy": min(steps) if steps else None,
                "monitor_first_at_risk": monitor[c["id"]]["first_at_risk_step"],
                "monitor_first_copy": monitor[c["id"]]["first_copy_step"],
                "in_duplicate_group": c["id"] in grouped,  # named by the training-set analysis at the first probe
            })  # fmt: skip
    planted = {c["id"] for c in canaries}
    others = sorted(st for i, st in first.items() if i not in planted)
    return {
        "spearman": rho,
        "top_k": k,
        "precision_at_k": precision,
        "spearman_samples_only": rho_traj,
        "precision_at_k_samples_only": precision_traj,
        "first_probe_step": history.steps[0] if history.steps else None,
        "images": len(ids),
        "images_copied": len(first),
        "ranked_at_step": onset // 2,
        "canaries": canaries,
        "others_median_first_copy": statistics.median(others) if others else None,
    }


def forecast_check(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """``memwatch forecast`` on the stores of all but the largest memorizing size, for the largest one."""
    from memwatch.views.planning import forecast_from_stores

    memorizing = sorted({r["n"] for r in rows if r["onset_step"] is not None})
    if len(memorizing) < 3:
        return None
    target = memorizing[-1]
    pilots = [out / f"n{r['n']:04d}-s{r['seed']}" for r in rows if r["n"] in memorizing[:-1]]
    plan = forecast_from_stores(pilots, target_n=target)
    truth = [r["onset_step"] for r in rows if r["n"] == target and r["onset_step"] is not None]
    inside = [plan.low <= t <= plan.high for t in truth]
    return {"target_n": target, "pilot_sizes": memorizing[:-1], **plan.to_dict(), "true_onsets": truth,
            "within_interval": sum(inside), "of": len(inside)}  # fmt: skip


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median lead, misses, false alarms, and the onset-vs-n line."""
    memorizing = [r for r in rows if r["onset_step"] is not None]
    controls = [r for r in rows if r["onset_step"] is None]
    misses = [r for r in memorizing if r["first_warning_step"] is None or r["first_warning_step"] >= r["onset_step"]]
    leads = [r["lead_fraction"] for r in memorizing if r["lead_fraction"] is not None]
    fit = None
    if len({r["n"] for r in memorizing}) >= 2:
        xs, ys = [r["n"] for r in memorizing], [r["onset_step"] for r in memorizing]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = my - slope * mx
        ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
        ss_tot = sum((y - my) ** 2 for y in ys)
        fit = {"slope": round(slope, 3), "intercept": round(intercept, 1),
               "r2": round(1 - ss_res / ss_tot, 4) if ss_tot else None}  # fmt: skip
    return {
        "median_lead_fraction": round(statistics.median(leads), 4) if leads else None,
        "median_lead_steps": statistics.median([r["lead_steps"] for r in memorizing if r["lead_steps"] is not None])
        if leads
        else None,
        "misses": len(misses),
        "false_alarms": sum(r["first_warning_step"] is not None for r in controls),
        "memorizing_runs": len(memorizing),
        "control_runs": len(controls),
        "onset_vs_n": fit,
        **image_summary(rows),
    }


def image_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median Spearman and top-k precision over the runs with per-image truth; per canary level, the median
    true first copy and first at-risk step as a share of the run's onset (level 1: the other images)."""
    checks = [(r, r["images"]) for r in rows if r.get("images")]
    rhos = [c["spearman"] for _, c in checks if c["spearman"] is not None]
    precisions = [c["precision_at_k"] for _, c in checks if c["precision_at_k"] is not None]
    rhos_samples = [c["spearman_samples_only"] for _, c in checks if c.get("spearman_samples_only") is not None]
    precisions_samples = [
        c["precision_at_k_samples_only"] for _, c in checks if c.get("precision_at_k_samples_only") is not None
    ]
    levels: dict[int, dict[str, list[float]]] = {}
    for r, c in checks:
        for x in c["canaries"]:
            level = levels.setdefault(x["copies"], {"copy": [], "at_risk": [], "caught": [], "named": []})
            level["named"].append(float(bool(x.get("in_duplicate_group"))))
            if x["true_first_copy"] is not None:
                level["copy"].append(x["true_first_copy"] / r["onset_step"])
                at_risk = x["monitor_first_at_risk"]
                level["caught"].append(float(at_risk is not None and at_risk < x["true_first_copy"]))
            if x["monitor_first_at_risk"] is not None:
                level["at_risk"].append(x["monitor_first_at_risk"] / r["onset_step"])
        if c["others_median_first_copy"] is not None:
            level = levels.setdefault(1, {"copy": [], "at_risk": [], "caught": [], "named": []})
            level["copy"].append(c["others_median_first_copy"] / r["onset_step"])

    def med(v: list[float]) -> float | None:
        return round(statistics.median(v), 3) if v else None

    return {
        "image_runs": len(checks),
        "median_spearman": med(rhos),
        "median_precision_at_k": med(precisions),
        "median_spearman_samples_only": med(rhos_samples),
        "median_precision_at_k_samples_only": med(precisions_samples),
        "canaries": {
            str(level): {
                "median_first_copy_over_onset": med(v["copy"]),
                "median_first_at_risk_over_onset": med(v["at_risk"]),
                "at_risk_before_first_copy": f"{int(sum(v['caught']))} of {len(v['caught'])}",
                "copied": len(v["copy"]),
                "named_by_data_analysis": f"{int(sum(v['named']))} of {len(v['named'])}",
            }
            for level, v in sorted(levels.items())
        },  # fmt: skip
    }


def plots(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], folder: Path) -> list[Path]:
    """Onset and first warning against n (with the fitted line), and one run's precursor with its forecast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    mem = [r for r in rows if r["onset_step"] is not None]
    ax.scatter([r["n"] for r in mem], [r["onset_step"] for r in mem], label="onset (mem_fraction >= 0.05)", c="C3")
    warned = [r for r in rows if r["first_warning_step"] is not None]
    ax.scatter([r["n"] * 1.04 for r in warned], [r["first_warning_step"] for r in warned], marker="v",
               label="first warning", c="C0")  # fmt: skip
    ctrl = [r for r in rows if r["onset_step"] is None]
    if ctrl:
        ax.scatter([r["n"] for r in ctrl], [r["steps_trained"] for r in ctrl], marker="x", c="grey",
                   label="control: no onset within the budget")  # fmt: skip
    fit = summary.get("onset_vs_n")
    if fit:
        xs = sorted({r["n"] for r in mem})
        ax.plot(xs, [fit["intercept"] + fit["slope"] * x for x in xs], c="C3", lw=1,
                label=f"onset = {fit['intercept']:.0f} + {fit['slope']:.1f} n (R² {fit['r2']})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images n")
    ax.set_ylabel("training step")
    ax.set_title("Memorization onset and memwatch's first warning")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "bench_warnings_onset.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
    return written


def image_markdown(rows: list[dict[str, Any]]) -> str:
    """Per run with per-image truth: the ranking's agreement with the true order of first copies, and each
    canary's true first copy (and first at-risk step) as a share of the run's onset."""
    checks = [r for r in rows if r.get("images")]
    if not checks:
        return ""
    levels = sorted({x["copies"] for r in checks for x in r["images"]["canaries"]})
    head = ["n", "seed", "onset", "ranked at", "Spearman", "(samples only)", "precision@k", "(samples only)"]
    head += [f"canary x{c}: first copy / onset (at risk)" for c in levels] + ["others: median first copy / onset"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def share(step: int | None, onset: int) -> str:
        return "-" if step is None else f"{step / onset:.2f}"

    for r in sorted(checks, key=lambda r: (r["n"], r["seed"])):
        c = r["images"]
        by = {x["copies"]: x for x in c["canaries"]}
        cells = [r["n"], r["seed"], r["onset_step"], c["ranked_at_step"], c["spearman"], c.get("spearman_samples_only"),
                 f"{c['precision_at_k']} (k={c['top_k']})", c.get("precision_at_k_samples_only")]  # fmt: skip
        for level in levels:
            x = by.get(level)
            cells.append("-" if x is None else f"{share(x['true_first_copy'], r['onset_step'])} "
                         f"({share(x['monitor_first_at_risk'], r['onset_step'])})")  # fmt: skip
        cells.append(share(c["others_median_first_copy"], r["onset_step"]))
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in cells) + " |")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| n | seed | onset | first copy | first warning (rule) | lead (steps) | lead / onset |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["n"], r["seed"])):
        warn = "-" if r["first_warning_step"] is None else f"{r['first_warning_step']} ({r['first_warning_rule']})"
        lead = "-" if r["lead_steps"] is None else str(r["lead_steps"])
        frac = "-" if r["lead_fraction"] is None else f"{r['lead_fraction']:.0%}"
        onset = "none" if r["onset_step"] is None else str(r["onset_step"])
        copy = "none" if r["first_copy_step"] is None else str(r["first_copy_step"])
        lines.append(f"| {r['n']} | {r['seed']} | {onset} | {copy} | {warn} | {lead} | {frac} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--t2i" in argv:  # the text-to-image benchmark: its own options, the same summary and JSON schema
        import bench_t2i

        return bench_t2i.main([a for a in argv if a != "--t2i"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"sizes and seeds {QUICK['sizes']}, {QUICK['steps']} steps "
                   "(<= 12 min on 2 cores)")  # fmt: skip
    p.add_argument("--tune", action="store_true", help=f"the tuning seeds (memorizing {TUNE['memorizing']}, controls "
                   f"{TUNE['controls']}) instead of the reporting ones")  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", help=f"training-set sizes (default {MEMORIZING + CONTROLS})")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds for every size (default: the preset's)")
    p.add_argument("--steps", type=int, help=f"step budget per run (default {FULL['steps']})")
    p.add_argument("--out", default="runs/bench_warnings", help="run folders go here")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel (one thread each)")
    p.add_argument("--config", default=None, help="a memwatch config for the monitor (default: memwatch's defaults)")
    p.add_argument("--no-monitor", action="store_true", help="dense ground truth only (for tuning)")
    p.add_argument("--canaries", type=int, nargs="*", default=[], help="plant duplicated canaries (e.g. 2 4 8)")
    p.add_argument("--analyse", action="store_true", help="only re-read the run folders under --out")
    p.add_argument("--json", default=None, help="write runs and summary here")
    p.add_argument("--merge", action="store_true", help="keep the runs already in --json that this invocation did "
                   "not measure (a sweep run in parts, in several sittings); the summary covers them all")  # fmt: skip
    p.add_argument("--same-as", default=None, help="another --out folder of the same seeds: compare probed steps "
                   "and events run by run (up to the shorter run's last step)")  # fmt: skip
    p.add_argument("--plots", default=None, help="write the figures into this folder")
    args = p.parse_args(argv)
    if args.quick:
        plan = {n: list(s) for n, s in QUICK["sizes"].items()}
        steps = args.steps or QUICK["steps"]
    else:
        preset = TUNE if args.tune else FULL
        plan = {n: list(preset["memorizing"]) for n in MEMORIZING} | {n: list(preset["controls"]) for n in CONTROLS}
        steps = args.steps or preset["steps"]
    if args.sizes:
        plan = {n: plan.get(n, plan.get(max(plan))) for n in args.sizes}
    if args.seeds:
        plan = {n: list(args.seeds) for n in plan}
    out = Path(args.out)
    t0 = time.perf_counter()
    if not args.analyse:
        out.mkdir(parents=True, exist_ok=True)
        specs = [
            RunSpec(
                n,
                s,
                steps,
                str(out),
                dense_every=CONTROL_DENSE_EVERY if n in CONTROLS and not args.no_monitor else 50,
                monitor=not args.no_monitor,
                config=args.config,
                canaries=tuple(args.canaries),
            )
            for n in sorted(plan, reverse=True)
            for s in plan[n]
        ]  # fmt: skip  (longest first)
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
            for record in pool.map(run_one, specs):
                print(f"{record['n']:>5} seed {record['seed']}: onset {record['onset_step']}, first copy "
                      f"{record['first_copy_step']}, {record['steps_trained']} steps in {record['wall_s']} s",
                      flush=True)  # fmt: skip
    folders = sorted(d for d in out.iterdir() if (d / "truth.json").is_file())
    rows = [analyse_run(d) for d in folders]
    rows = [r for r in rows if r["seed"] in plan.get(r["n"], [])]
    check = forecast_check(out, rows) if not args.no_monitor else None
    if args.merge and args.json and Path(args.json).is_file():
        earlier = json.loads(Path(args.json).read_text())
        mine = {(r["n"], r["seed"]) for r in rows}
        rows += [r for r in earlier["runs"] if (r["n"], r["seed"]) not in mine]
        check = check or earlier["summary"].get("forecast_check")
    summary = summarise(rows)
    summary["forecast_check"] = check
    summary["measured_with"] = sorted({(r.get("measured") or {}).get("memwatch_src", "unknown") for r in rows})
    if args.same_as:
        summary["same_as"] = same_as(out, Path(args.same_as), rows)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(markdown_table(rows))
    print(image_markdown(rows))
    print(json.dumps(summary, indent=2))
    if args.plots:
        for path in plots(out, rows, summary, Path(args.plots)):
            print(f"wrote {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"runs": rows, "summary": summary}, indent=2, default=_nan) + "\n")
    return 0


def _nan(obj: Any) -> Any:
    return None if isinstance(obj, float) and math.isnan(obj) else str(obj)


if __name__ == "__main__":
    sys.exit(main())
